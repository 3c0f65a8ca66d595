"""The engine's statistics: time and tokens of prefill and decode, the offload counters, and the decode
steps that broke the locality bound (spec sec. 5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(repr=False)
class EngineStats:
    """Since the engine was built. hit_rate_per_layer: share of selected blocks that needed no host->device
    load at decode (1 - loads / selected; a tail block that starts at the step has nothing to load and so
    counts as a hit);
    blocks_loaded_per_step: host->device block loads (per KV head) per decode step, all layers and rows;
    bytes_host_to_device: KV bytes gathered at decode and prefill install;
    spill_hits_per_step: selected blocks per decode step that were served from the device cache beyond the
    selection (`device_cache_blocks`) on the device: a device copy, or with the pooled cache a page-map swap
    (counted as hits in hit_rate_per_layer);
    locality_quota: the bound's loads per (layer, row, KV head) and decode step, one more on a step that
    enters a new block (`SparseAttentionConfig.locality_quota`; None: this attn_mode has no bound);
    has_locality_bound: whether this geometry meets the bound's condition (docs/locality.md);
    bound_violations_per_layer: (row, KV head) decode steps per layer that loaded more than the bound
    allows (0 expected where has_locality_bound; empty where there is no quota)."""

    decode_steps: int
    decode_tokens: int
    decode_s: float
    prefill_tokens: int
    prefill_s: float
    hit_rate_per_layer: list[float]
    blocks_loaded_per_step: float
    bytes_host_to_device: int
    spill_hits_per_step: float = 0.0
    locality_quota: int | None = None
    has_locality_bound: bool = False
    bound_violations_per_layer: list[int] | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def bound_violations(self) -> int:
        """All layers' `bound_violations_per_layer` (0 where there is no bound)."""
        return sum(self.bound_violations_per_layer or [])

    def _locality_line(self) -> str:
        if self.locality_quota is None:
            return "locality bound: none (every free slot query-aware, or dense)"
        bound = f"<= {self.locality_quota} loads per (layer, row, KV head) and step, +1 entering a block"
        if self.bound_violations_per_layer is None:
            return f"locality bound: {bound}"
        counts = f"{self.bound_violations} violations (per layer {self.bound_violations_per_layer})"
        if self.has_locality_bound:
            return f"locality bound: {bound}: {counts}" + ("  <- the bound is broken" if self.bound_violations else "")
        return f"locality bound: {bound}, not guaranteed for this geometry (docs/locality.md): {counts}"

    def __repr__(self) -> str:
        hits = " ".join(f"{h:.3f}" for h in self.hit_rate_per_layer)
        return "\n".join([
            "EngineStats(",
            f"  decode: {self.decode_tokens} tokens in {self.decode_steps} steps, {self.decode_s:.3f} s, "
            f"{self.decode_tokens_per_s:.1f} tokens/s",
            f"  prefill: {self.prefill_tokens} tokens, {self.prefill_s:.3f} s, {self.prefill_tokens_per_s:.1f} tokens/s",
            f"  offload: hit rate per layer [{hits}], {self.blocks_loaded_per_step:.2f} blocks loaded per step, "
            f"{self.spill_hits_per_step:.2f} served per step from the device cache beyond the selection, "
            f"{self.bytes_host_to_device / 2**20:.2f} MiB host->device",
            f"  {self._locality_line()})",
        ])


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
        quota = runner.locality_quota
        return EngineStats(
            decode_steps=steps, decode_tokens=self.decode_tokens, decode_s=self.decode_s,
            prefill_tokens=self.prefill_tokens, prefill_s=self.prefill_s,
            hit_rate_per_layer=[1.0 - float(l) / float(s) if s > 0 else 1.0 for l, s in zip(loaded, selected)],
            blocks_loaded_per_step=float(loaded.sum()) / steps if steps else 0.0,
            bytes_host_to_device=total_loaded * block_bytes,
            spill_hits_per_step=float(runner.spill_hits.sum()) / steps if steps else 0.0,
            locality_quota=quota, has_locality_bound=config.sparse.has_locality_bound,
            bound_violations_per_layer=runner.over_bound.cpu().tolist() if quota is not None else None,
        )
