"""The user API: `LLM(model_or_path, ...)` and `llm.generate(prompts, SamplingParams(...))`, a loop over the
step-level API of `EngineCore` (core.py)."""

from __future__ import annotations

import dataclasses
import os

import torch

from nosa.engine.budget import DEFAULT_MAX_PREFILL_TOKENS, DEFAULT_PREFILL_CHUNK
from nosa.engine.core import EngineCore
from nosa.engine.sampling import SamplingParams
from nosa.engine.sequence import RequestOutput
from nosa.engine.stats import EngineStats

__all__ = ["LLM", "EngineStats"]


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


class LLM(EngineCore):
    """An offloading NOSA engine.

    model_or_path: a NosaForCausalLM or a save_pretrained directory (a ByteTokenizer beside it enables text
    prompts). offload: keep the KV store in host memory (pinned on CUDA) and only the selected blocks on the
    device; False keeps everything on the device (the on-GPU baseline, same code). gpu_memory_budget: bytes
    of device memory for KV state (rows, tables, selection state, prefill workspace, and the store when
    offload is off); None: room for max_num_seqs rows. host_memory_budget: a cap on the host KV store
    (which grows to it as requests are admitted, each growth checked against the machine's available
    memory); None: room for every row at max_model_len. max_model_len: the longest prompt + generation.
    cuda_graphs: capture the decode step (CUDA only); False runs it eagerly. device_cache_blocks (sparse
    modes): blocks the device holds per (layer, sequence, KV head), >= topk_blocks (None: topk_blocks, only
    the selection); the extra ones keep blocks that left the selection, least recently selected replaced
    first, so a block that comes back is a device copy instead of a host load. Charged to the budget.
    "auto": the largest cache up to 2 x topk_blocks that still leaves gpu_memory_budget room for
    max_num_seqs rows (memory no row would use; none without a budget or with offload off); the size
    chosen is `device_cache_blocks` on the engine.
    max_prefill_tokens: prompt tokens prefilled per step, across the prompts being prefilled (one packed
    forward beside each decode step, so a long prompt delays decoding by at most this many tokens' work);
    prefill_chunk: the most tokens of one prompt per step (below max_prefill_tokens, several prompts move
    at once, so short prompts behind a long one get their first token within a step or two).
    micro_batches: run each decode step as this many micro-batches of rows, on CUDA on their own streams so
    one's host->device loads overlap another's matmuls and selection (the weights are read once per
    micro-batch); 1: the whole batch at once. The same selections and loads either way, logits to rounding
    (a matmul or the decode kernel over fewer rows may round differently), so in low precision a near tie
    may sample another token.
    """

    def __init__(self, model_or_path, device=None, offload: bool = True, gpu_memory_budget: int | None = None,
                 host_memory_budget: int | None = None, max_model_len: int | None = None, max_num_seqs: int = 16,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, dtype: torch.dtype | None = None, tokenizer=None,
                 cuda_graphs: bool = True, device_cache_blocks: int | str | None = None,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS, micro_batches: int = 1):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, loaded_tokenizer = _load_model(model_or_path, device, dtype)
        super().__init__(model, tokenizer or loaded_tokenizer, device, offload, gpu_memory_budget, host_memory_budget,
                         max_model_len, max_num_seqs, prefill_chunk, cuda_graphs, device_cache_blocks, max_prefill_tokens,
                         micro_batches)

    # ----------------------------------------------------------------------------------- generate
    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, return_logits: bool = False,
                 raise_on_error: bool = True, record_selections: bool = False) -> list[RequestOutput]:
        """prompts: a str, a list of token ids, or a list of either; sampling_params: one SamplingParams or
        one per prompt. Returns one RequestOutput per prompt, in order (request_id = index in this call). A
        request that is invalid or can never fit raises ValueError before anything runs (raise_on_error=True)
        or comes back with `error` set while the others run unchanged (False). return_logits: keep each
        step's logits [V] (tests). record_selections: each output carries its decode steps' selections.
        Built on `add_request` / `step`: requests queued before this call by `add_request` run too (their
        results stay for `output`)."""
        from tqdm.auto import tqdm

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
        mine: dict[int, int] = {}  # engine request id -> index in this call
        sequences = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                request_id = self._new_request_id(None)
                sequences.append(self._make_sequence(i, request_id, prompt, p, return_logits, record_selections))
                mine[request_id] = i
            except ValueError as err:
                if raise_on_error:
                    raise
                ids = prompt if isinstance(prompt, list) else []
                outputs[i] = RequestOutput(i, prompt if isinstance(prompt, str) else None, ids, finish_reason="error", error=str(err))
        for seq in sequences:
            self._queue(seq)
        bar = tqdm(total=len(sequences), desc="generate", unit="req", disable=not use_tqdm)
        try:
            while any(rid in self._requests for rid in mine):
                for out in self.step():
                    if out.finished and out.request_id in mine:
                        bar.update(1)
                bar.set_postfix(tok_s=f"{self.clock.last_step_tokens_per_s:.1f}", running=self.num_running)
        except BaseException:
            # An error (or Ctrl-C) mid-call must not leave this call's requests holding rows and pages (the
            # failing step gave back its own; the others of this call are dropped too), then re-raise.
            for rid in mine:
                if self.abort(rid) is False:
                    self._finished.pop(rid, None)
            raise
        finally:
            bar.close()
        for rid, i in mine.items():
            outputs[i] = dataclasses.replace(self.output(rid), request_id=i)
        return outputs
