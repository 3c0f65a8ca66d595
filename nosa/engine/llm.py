"""The user API: `LLM(model_or_path, ...)` and `llm.generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from nosa.engine.block_cache import BlockCache
from nosa.engine.cuda_graph import GraphedDecode
from nosa.engine.host_store import HostStore
from nosa.engine.model_runner import ModelRunner
from nosa.engine.sampling import SamplingParams, sample
from nosa.engine.scheduler import Scheduler
from nosa.engine.sequence import RequestOutput, Sequence


@dataclass
class EngineStats:
    """Since the engine was built. hit_rate_per_layer: share of selected blocks that needed no host->device
    load at decode (1 - loads / selected; a tail block that starts at the step has nothing to load and so
    counts as a hit);
    blocks_loaded_per_step: host->device block loads (per KV head) per decode step, all layers and rows;
    bytes_host_to_device: KV bytes gathered at decode and prefill install."""

    decode_steps: int
    decode_tokens: int
    decode_s: float
    prefill_tokens: int
    prefill_s: float
    hit_rate_per_layer: list[float]
    blocks_loaded_per_step: float
    bytes_host_to_device: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _load_model(model_or_path, device, dtype):
    from nosa.models import NosaForCausalLM

    tokenizer = None
    if isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.isdir(model_or_path):
            raise ValueError(f"model path {model_or_path!r} is not a directory saved with save_pretrained")
        model = NosaForCausalLM.from_pretrained(model_or_path, dtype=dtype or torch.float32)
        from nosa.tokenizer import TOKENIZER_FILE, ByteTokenizer

        if os.path.exists(os.path.join(model_or_path, TOKENIZER_FILE)):
            tokenizer = ByteTokenizer.from_pretrained(model_or_path)
    elif isinstance(model_or_path, NosaForCausalLM):
        model = model_or_path
    else:
        raise ValueError(f"LLM takes a NosaForCausalLM or a directory path, got {type(model_or_path).__name__}")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer


class LLM:
    """An offloading NOSA engine.

    model_or_path: a NosaForCausalLM or a save_pretrained directory (a ByteTokenizer beside it enables text
    prompts). offload: keep the KV store in host memory (pinned on CUDA) and only the selected blocks on the
    device; False keeps everything on the device (the on-GPU baseline, same code). gpu_memory_budget: bytes
    of device memory for KV state (rows, tables, selection state, prefill workspace, and the store when
    offload is off); None: room for max_num_seqs rows. host_memory_budget: bytes of host KV store; None:
    room for every row at max_model_len. max_model_len: the longest prompt + generation. cuda_graphs:
    capture the decode step (CUDA only); False runs it eagerly.
    """

    def __init__(self, model_or_path, device=None, offload: bool = True, gpu_memory_budget: int | None = None,
                 host_memory_budget: int | None = None, max_model_len: int | None = None, max_num_seqs: int = 16,
                 prefill_chunk: int = 512, dtype: torch.dtype | None = None, tokenizer=None,
                 cuda_graphs: bool = True):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, loaded_tokenizer = _load_model(model_or_path, device, dtype)
        self.tokenizer = tokenizer or loaded_tokenizer
        config = self.model.config
        self.config, self.device, self.offload = config, device, offload
        for name, value, low in (("max_num_seqs", max_num_seqs, 1), ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        max_model_len = config.max_position_embeddings if max_model_len is None else max_model_len
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not 1 <= max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len must be an integer in [1, max_position_embeddings={config.max_position_embeddings}], got {max_model_len!r}")
        self.max_model_len = max_model_len
        cfg, L = config.sparse, config.num_hidden_layers
        H, D, dtype = config.num_key_value_heads, config.head_dim, self.model.dtype
        page_bytes = HostStore.page_bytes(L, H, cfg.block_size, D, dtype)
        max_blocks = -(-max_model_len // cfg.block_size)
        row_bytes, workspace = self.device_bytes(config, dtype, offload, max_model_len)
        rows = max_num_seqs
        if gpu_memory_budget is not None:
            if isinstance(gpu_memory_budget, bool) or not isinstance(gpu_memory_budget, int) or gpu_memory_budget <= 0:
                raise ValueError(f"gpu_memory_budget must be a positive number of bytes, got {gpu_memory_budget!r}")
            rows = min(rows, (gpu_memory_budget - workspace) // row_bytes)
            if rows < 1:
                raise ValueError(
                    f"gpu_memory_budget={gpu_memory_budget} bytes is too small: one sequence of max_model_len="
                    f"{max_model_len} tokens needs {row_bytes} bytes of device state plus {workspace} bytes of "
                    f"prefill workspace ({row_bytes + workspace} in all); raise the budget or lower max_model_len"
                )
        if offload:
            pages = rows * max_blocks
            if host_memory_budget is not None:
                if isinstance(host_memory_budget, bool) or not isinstance(host_memory_budget, int) or host_memory_budget <= 0:
                    raise ValueError(f"host_memory_budget must be a positive number of bytes, got {host_memory_budget!r}")
                pages = host_memory_budget // page_bytes
                if pages < 1:
                    raise ValueError(
                        f"host_memory_budget={host_memory_budget} bytes is too small: one block of {cfg.block_size} "
                        f"tokens needs {page_bytes} bytes (K and V of {L} layers)"
                    )
        else:
            pages = rows * max_blocks
        self.store = HostStore(L, pages, H, cfg.block_size, D, dtype, device, offload)
        self.cache = BlockCache(L, rows, H, D, dtype, device, cfg, max_model_len)
        self.runner = ModelRunner(self.model, self.cache, self.store, prefill_chunk)
        self.graphed = GraphedDecode(self.runner) if (cuda_graphs and device.type == "cuda") else None
        self.scheduler = Scheduler(rows, self.store, cfg.block_size, max_model_len)
        self._steps = self._decode_tokens = self._prefill_tokens = 0
        self._decode_s = self._prefill_s = 0.0

    @staticmethod
    def device_bytes(config, dtype: torch.dtype, offload: bool, max_model_len: int) -> tuple[int, int]:
        """(bytes per row, fixed workspace bytes) that `gpu_memory_budget` is charged: the engine admits
        min(max_num_seqs, (budget - workspace) // row) rows. Benchmarks that give several configurations the
        same budget read it from here, so they use the engine's own accounting."""
        cfg, L = config.sparse, config.num_hidden_layers
        H, D = config.num_key_value_heads, config.head_dim
        elem = torch.empty((), dtype=dtype).element_size()
        row_bytes = BlockCache.row_bytes(L, H, D, dtype, cfg, max_model_len)["total"]
        if not offload:
            # The store lives on the device: a full sequence per row.
            row_bytes += -(-max_model_len // cfg.block_size) * HostStore.page_bytes(L, H, cfg.block_size, D, dtype)
        # Prefill keeps one prompt's K/V (and eviction scores) of every layer on the device at a time.
        workspace = L * max_model_len * H * (2 * D * elem + 4)
        return row_bytes, workspace

    @property
    def max_num_seqs(self) -> int:
        return self.cache.rows

    def _eos_ids(self) -> set[int]:
        ids = {self.config.eos_token_id} if isinstance(self.config.eos_token_id, int) else set(self.config.eos_token_id or [])
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _make_sequence(self, index: int, prompt, params: SamplingParams, keep_logits: bool) -> Sequence:
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"request {index}: text prompts need a tokenizer (pass tokenizer= or token ids)")
            text, prompt = prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"request {index}: a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"request {index}: the prompt is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"request {index}: token ids {bad[:5]} lie outside [0, vocab_size={self.config.vocab_size})")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {index}: sampling params must be a SamplingParams, got {type(params).__name__}")
        seq = Sequence(index, text, list(prompt), params, self.device, keep_logits)
        self.scheduler.check(seq)
        return seq

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, return_logits: bool = False,
                 raise_on_error: bool = True) -> list[RequestOutput]:
        """prompts: a str, a list of token ids, or a list of either; sampling_params: one SamplingParams or
        one per prompt. Returns one RequestOutput per prompt, in order. A request that is invalid or can never
        fit raises ValueError before anything runs (raise_on_error=True) or comes back with `error` set while
        the others run unchanged (False). return_logits: keep each step's logits [V] (tests)."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        sequences = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                sequences.append(self._make_sequence(i, prompt, p, return_logits))
            except ValueError as err:
                if raise_on_error:
                    raise
                ids = prompt if isinstance(prompt, list) else []
                outputs[i] = RequestOutput(i, prompt if isinstance(prompt, str) else None, ids, finish_reason="error", error=str(err))
        for seq in sequences:
            self.scheduler.add(seq)
        self._run(sequences, use_tqdm)
        for seq in sequences:
            outputs[seq.request_id] = seq.output()
        return outputs

    def _run(self, sequences: list[Sequence], use_tqdm: bool) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sequences), desc="generate", unit="req", disable=not use_tqdm)
        eos = self._eos_ids()
        rows = self.cache.rows
        try:
            while self.scheduler.has_work:
                for seq in self.scheduler.admit():
                    start = time.perf_counter()
                    logits = self.runner.prefill(seq.row, seq.prompt_token_ids, seq.pages)
                    token = sample(logits[None], [seq.params], [seq.generator])[0]
                    self._prefill_s += time.perf_counter() - start
                    self._prefill_tokens += len(seq.prompt_token_ids)
                    seq.append(token, logits, eos, self.tokenizer)
                    self._retire_if_done(seq, bar)
                running = list(self.scheduler.running.values())
                if not running:
                    continue
                start = time.perf_counter()
                logits = self._decode(running, rows)
                tokens = sample(logits[[s.row for s in running]], [s.params for s in running], [s.generator for s in running])
                elapsed = time.perf_counter() - start
                self._decode_s += elapsed
                self._steps += 1
                self._decode_tokens += len(running)
                bar.set_postfix(tok_s=f"{len(running) / elapsed:.1f}", running=len(running))
                for seq, token in zip(running, tokens):
                    seq.append(token, logits[seq.row], eos, self.tokenizer)
                    self._retire_if_done(seq, bar)
        except BaseException:
            # An error (or Ctrl-C) mid-call must not leave this call's requests holding rows and pages:
            # the next generate would otherwise decode them again. Give everything back, then re-raise.
            for seq in sequences:
                if seq.finish_reason is None and seq.row is not None and self.scheduler.running.get(seq.row) is seq:
                    self.cache.release_row(seq.row)
                self.scheduler.abort(seq)
            raise
        finally:
            bar.close()

    def _decode(self, running: list[Sequence], rows: int) -> torch.Tensor:
        # Built as Python lists and moved in one copy: per-element tensor writes cost microseconds each,
        # which at 64 rows added up to a visible share of a ~ms decode step.
        tokens, positions, active = [0] * rows, [0] * rows, [0] * rows
        for seq in running:
            tokens[seq.row] = seq.output_token_ids[-1]
            positions[seq.row] = seq.cached_tokens
            active[seq.row] = 1
        uniform = len({s.cached_tokens for s in running}) == 1
        if uniform:
            # Free rows take the common position so one selection call serves every row; they have no
            # host pages, so nothing of theirs is loaded or written back.
            positions = [running[0].cached_tokens] * rows
        packed = torch.tensor([tokens, positions, active], dtype=torch.long).to(self.device)
        tokens, positions, active = packed[0], packed[1], packed[2].bool()
        if self.graphed is not None and self.runner.load_log is None:
            return self.graphed(tokens, positions, active, uniform)
        return self.runner.decode_step(tokens, positions, active, uniform)

    def _retire_if_done(self, seq: Sequence, bar) -> None:
        if seq.finish_reason is not None:
            self.cache.release_row(seq.row)
            self.scheduler.finish(seq)
            bar.update(1)

    def stats(self) -> EngineStats:
        loaded = self.runner.loaded.cpu()
        selected = self.runner.selected.cpu()
        cfg = self.config
        block_bytes = 2 * cfg.sparse.block_size * cfg.head_dim * torch.empty((), dtype=self.model.dtype).element_size()
        total_loaded = int(loaded.sum()) + int(self.runner.install_loaded.sum())
        return EngineStats(
            decode_steps=self._steps, decode_tokens=self._decode_tokens, decode_s=self._decode_s,
            prefill_tokens=self._prefill_tokens, prefill_s=self._prefill_s,
            hit_rate_per_layer=[1.0 - float(l) / float(s) if s > 0 else 1.0 for l, s in zip(loaded, selected)],
            blocks_loaded_per_step=float(loaded.sum()) / self._steps if self._steps else 0.0,
            bytes_host_to_device=total_loaded * block_bytes,
        )
