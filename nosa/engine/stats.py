"""The engine's statistics: time and tokens of prefill and decode, and the offload counters."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineStats:
    """Since the engine was built. hit_rate_per_layer: share of selected blocks that needed no host->device
    load at decode (1 - loads / selected; a tail block that starts at the step has nothing to load and so
    counts as a hit);
    blocks_loaded_per_step: host->device block loads (per KV head) per decode step, all layers and rows;
    bytes_host_to_device: KV bytes gathered at decode and prefill install;
    spill_hits_per_step: selected blocks per decode step that were served from the device cache beyond the
    selection (`device_cache_blocks`) by a device copy (counted as hits in hit_rate_per_layer)."""

    decode_steps: int
    decode_tokens: int
    decode_s: float
    prefill_tokens: int
    prefill_s: float
    hit_rate_per_layer: list[float]
    blocks_loaded_per_step: float
    bytes_host_to_device: int
    spill_hits_per_step: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class StepClock:
    """Counts what the engine did: tokens and seconds of prefill and decode, decode steps."""

    def __init__(self):
        self.decode_steps = self.decode_tokens = self.prefill_tokens = 0
        self.decode_s = self.prefill_s = 0.0
        self.last_step_tokens_per_s = 0.0

    def prefilled(self, tokens: int, seconds: float) -> None:
        self.prefill_tokens += tokens
        self.prefill_s += seconds

    def decoded(self, tokens: int, seconds: float) -> None:
        self.decode_steps += 1
        self.decode_tokens += tokens
        self.decode_s += seconds
        self.last_step_tokens_per_s = tokens / seconds if seconds > 0 else 0.0

    def stats(self, runner, config, dtype: torch.dtype) -> EngineStats:
        loaded = runner.loaded.cpu()
        selected = runner.selected.cpu()
        block_bytes = 2 * config.sparse.block_size * config.head_dim * torch.empty((), dtype=dtype).element_size()
        total_loaded = int(loaded.sum()) + int(runner.install_loaded.sum())
        steps = self.decode_steps
        return EngineStats(
            decode_steps=steps, decode_tokens=self.decode_tokens, decode_s=self.decode_s,
            prefill_tokens=self.prefill_tokens, prefill_s=self.prefill_s,
            hit_rate_per_layer=[1.0 - float(l) / float(s) if s > 0 else 1.0 for l, s in zip(loaded, selected)],
            blocks_loaded_per_step=float(loaded.sum()) / steps if steps else 0.0,
            bytes_host_to_device=total_loaded * block_bytes,
            spill_hits_per_step=float(runner.spill_hits.sum()) / steps if steps else 0.0,
        )
