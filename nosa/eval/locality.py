"""Locality of block selection during decoding (spec sec. 5), per layer and KV head.

Prefill a prompt with the transformers cache, then decode step by step (teacher-forced on held-out text,
so every mode sees the same tokens) while each attention layer's `selection_log` records the selected
blocks. For consecutive steps t-1, t of one (layer, sequence, KV head):
  overlap(t) = |G(t) & G(t-1)| / |G(t)|      new(t) = |G(t) - G(t-1)|  (blocks a cache would have to load)
The statistics and the spec's bound are defined once, in `nosa.results.locality`.
"""

from __future__ import annotations

import contextlib

import torch

from nosa.layers.attention import NosaAttention
from nosa.results.locality import bound_quota, locality_summary


def _attention_layers(model) -> list[NosaAttention]:
    return [m for m in model.modules() if isinstance(m, NosaAttention)]


@contextlib.contextmanager
def recording(model):
    layers = _attention_layers(model)
    for layer in layers:
        layer.selection_log = []
    try:
        yield layers
    finally:
        for layer in layers:
            layer.selection_log = None


def _cache_of(output):
    # transformers renamed the output field `past_key_values` -> `cache` during 5.x (the old name warns).
    for name in ("cache", "past_key_values"):
        if name in output.keys():
            return output[name]
    raise RuntimeError("the model returned no cache although use_cache=True")


@torch.no_grad()
def decode_locality(model, token_ids: torch.Tensor, prompt_len: int, device, autocast=None) -> dict:
    """token_ids: [B, P + S] int64 (prompt then the S tokens fed one by one). Returns per-layer and overall
    overlap / new-block statistics over the S - 1 step pairs."""
    sparse = model.config.sparse
    if not sparse.is_sparse:
        raise ValueError("locality statistics need a sparse attn_mode (nosa, dma or infllmv2), not dense")
    if token_ids.dim() != 2 or not 1 <= prompt_len < token_ids.shape[1] - 1:
        raise ValueError(f"need [B, T] tokens with 1 <= prompt_len < T - 1; got {tuple(token_ids.shape)} and {prompt_len}")
    model.eval()
    ids = token_ids.to(device)
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids[:, :prompt_len], use_cache=True)
    cache = _cache_of(out)
    steps = ids.shape[1] - prompt_len
    with recording(model) as layers:
        for t in range(steps):
            with ctx:
                out = model(input_ids=ids[:, prompt_len + t : prompt_len + t + 1], cache=cache, use_cache=True)
            cache = _cache_of(out)
        logs = [torch.cat(layer.selection_log, dim=1)[:, :, :, :] for layer in layers]  # each [B, S, H, K]
    summary = locality_summary([sel.cpu() for sel in logs], prompt_len, sparse.block_size, sparse.topk_blocks,
                               bound_quota(sparse))
    block = sparse.block_size
    result = {
        "attn_mode": sparse.attn_mode,
        "prompt_len": prompt_len,
        "query_blocks": sparse.query_blocks,
        # Violations are expected to be 0 only where the geometry has the bound (docs/locality.md).
        "has_locality_bound": sparse.has_locality_bound,
        "visible_blocks_first_step": prompt_len // block + 1,
        "visible_blocks_last_step": (prompt_len + steps - 1) // block + 1,
        **summary,
    }
    return result
