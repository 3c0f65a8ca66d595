"""Locality of block selection during decoding (spec sec. 5), per layer and KV head.

Prefill a prompt with the transformers cache, then decode step by step (teacher-forced on held-out text,
so every mode sees the same tokens) while each attention layer's `selection_log` records the selected
blocks. For consecutive steps t-1, t of one (layer, sequence, KV head):
  overlap(t) = |G(t) & G(t-1)| / |G(t)|      new(t) = |G(t) - G(t-1)|  (blocks a cache would have to load)
The spec's bound for nosa: new(t) <= query_blocks while t stays inside one block, one more on the step
that enters a new block; dma: the same with query_blocks = 0. infllmv2 has no bound. Reported as counts
of violations, so a run shows whether the trained model keeps the bound.
"""

from __future__ import annotations

import contextlib

import torch

from nosa.layers.attention import NosaAttention


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
    block = sparse.block_size
    positions = torch.arange(prompt_len, prompt_len + steps)
    crossing = (positions[1:] % block == 0)  # step t enters a new block (its own block is new)
    quota = {"nosa": sparse.query_blocks, "dma": 0}.get(sparse.attn_mode)
    per_layer = []
    all_overlap, all_new = [], []
    for index, sel in enumerate(logs):
        sel = sel.cpu().long()
        num_blocks = int(sel.max()) + 2
        mask = torch.zeros(sel.shape[:-1] + (num_blocks,), dtype=torch.bool)
        mask.scatter_(-1, torch.where(sel >= 0, sel, num_blocks - 1), True)
        mask = mask[..., : num_blocks - 1]  # [B, S, H, NB]; the last column collected the -1 slots
        prev, cur = mask[:, :-1], mask[:, 1:]
        inter = (prev & cur).sum(-1).float()
        size = cur.sum(-1).float()
        new = (cur & ~prev).sum(-1)  # [B, S-1, H]
        overlap = inter / size
        record = {
            "layer": index,
            "overlap_mean": float(overlap.mean()),
            "overlap_min": float(overlap.min()),
            "new_blocks_mean": float(new.float().mean()),
            "new_blocks_max": int(new.max()),
            "new_blocks_max_within_block": int(new[:, ~crossing].max()) if bool((~crossing).any()) else None,
            "new_blocks_max_at_boundary": int(new[:, crossing].max()) if bool(crossing.any()) else None,
            "overlap_mean_per_head": overlap.mean(dim=(0, 1)).tolist(),
        }
        if quota is not None:
            record["violations_within_block"] = int((new[:, ~crossing] > quota).sum())
            record["violations_at_boundary"] = int((new[:, crossing] > quota + 1).sum())
        per_layer.append(record)
        all_overlap.append(overlap.flatten())
        all_new.append(new.flatten().float())
    overlap_all, new_all = torch.cat(all_overlap), torch.cat(all_new)
    k = sparse.topk_blocks
    result = {
        "attn_mode": sparse.attn_mode,
        "prompt_len": prompt_len,
        "decode_steps": steps,
        "batch": ids.shape[0],
        "topk_blocks": k,
        "query_blocks": sparse.query_blocks,
        "visible_blocks_first_step": prompt_len // block + 1,
        "visible_blocks_last_step": (prompt_len + steps - 1) // block + 1,
        "overlap_mean": float(overlap_all.mean()),
        "overlap_min": float(overlap_all.min()),
        "new_blocks_mean": float(new_all.mean()),
        "new_blocks_max": int(new_all.max()),
        "overlap_bound": (k - quota) / k if quota is not None else None,
        "per_layer": per_layer,
    }
    if quota is not None:
        result["violations"] = sum(r["violations_within_block"] + r["violations_at_boundary"] for r in per_layer)
    return result
