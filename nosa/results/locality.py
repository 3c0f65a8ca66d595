"""Locality statistics of selection traces (spec sec. 5), the one definition that evaluation, the demo,
the quality study and the trace-driven benchmark all use.

A trace is, per layer, the selected block ids of consecutive decoding steps: int `[B, S, H_kv, K]`, -1 for
unused slots, step s at position `first_position + s`. For consecutive steps t-1, t of one (layer, sequence,
KV head):
  overlap(t) = |G(t) & G(t-1)| / |G(t)|      new(t) = |G(t) - G(t-1)|  (blocks a cache would have to load)
The spec's bound: new(t) <= query_blocks while t stays inside one block, one more on the step that enters a
new block (dma: query_blocks = 0; infllmv2 and dense have no bound). It holds only for geometries that meet
`SparseAttentionConfig.has_locality_bound`; elsewhere violations are counted but expected.
"""

from __future__ import annotations

import torch


def step_changes(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """selected: int `[B, S, H, K]`, -1 unused. Returns (overlap float `[B, S-1, H]`, new int `[B, S-1, H]`)."""
    selected = selected.long().cpu()
    num_blocks = int(selected.max()) + 2
    mask = torch.zeros(selected.shape[:-1] + (num_blocks,), dtype=torch.bool)
    mask.scatter_(-1, torch.where(selected >= 0, selected, num_blocks - 1), True)
    mask = mask[..., : num_blocks - 1]  # the last column collected the -1 slots
    prev, cur = mask[:, :-1], mask[:, 1:]
    overlap = (prev & cur).sum(-1).float() / cur.sum(-1).clamp_min(1).float()
    new = (cur & ~prev).sum(-1)
    return overlap, new


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.float(), q)) if x.numel() else float("nan")


def locality_summary(traces: list[torch.Tensor], first_position: int, block_size: int, topk_blocks: int,
                     quota: int | None) -> dict:
    """traces: one int `[B, S, H, K]` per layer (S >= 2), step s at position first_position + s.
    quota: newly needed blocks allowed per step inside a block (query_blocks for nosa, 0 for dma, None: no
    bound). Returns per-layer and overall overlap (mean, 5th percentile, min) and newly needed blocks per
    (layer, sequence, KV head) per step (mean, p95, max), with bound violations where there is a bound."""
    if not traces or traces[0].shape[1] < 2:
        raise ValueError("locality needs at least two decoding steps per layer")
    steps = traces[0].shape[1]
    positions = torch.arange(first_position + 1, first_position + steps)
    crossing = positions % block_size == 0  # the step enters a new block (its own block is new)
    per_layer, all_overlap, all_new = [], [], []
    for index, trace in enumerate(traces):
        overlap, new = step_changes(trace)
        within, boundary = new[:, ~crossing], new[:, crossing]
        record = {
            "layer": index,
            "overlap_mean": float(overlap.mean()),
            "overlap_p5": _quantile(overlap, 0.05),
            "overlap_min": float(overlap.min()),
            "new_blocks_mean": float(new.float().mean()),
            "new_blocks_p95": _quantile(new, 0.95),
            "new_blocks_max": int(new.max()),
            "new_blocks_max_within_block": int(within.max()) if within.numel() else None,
            "new_blocks_max_at_boundary": int(boundary.max()) if boundary.numel() else None,
            "overlap_mean_per_head": overlap.mean(dim=(0, 1)).tolist(),
        }
        if quota is not None:
            record["violations_within_block"] = int((within > quota).sum())
            record["violations_at_boundary"] = int((boundary > quota + 1).sum())
        per_layer.append(record)
        all_overlap.append(overlap.flatten())
        all_new.append(new.flatten())
    overlap_all, new_all = torch.cat(all_overlap), torch.cat(all_new)
    result = {
        "decode_steps": steps,
        "batch": traces[0].shape[0],
        "topk_blocks": topk_blocks,
        "overlap_mean": float(overlap_all.mean()),
        "overlap_p5": _quantile(overlap_all, 0.05),
        "overlap_min": float(overlap_all.min()),
        "new_blocks_mean": float(new_all.float().mean()),
        "new_blocks_p95": _quantile(new_all, 0.95),
        "new_blocks_max": int(new_all.max()),
        "overlap_bound": (topk_blocks - quota) / topk_blocks if quota is not None else None,
        "per_layer": per_layer,
    }
    if quota is not None:
        violations = sum(r["violations_within_block"] + r["violations_at_boundary"] for r in per_layer)
        result["violations"] = violations
        result["violation_rate"] = violations / max(1, new_all.numel())
    return result


def bound_quota(sparse) -> int | None:
    """The per-step quota of the locality bound for a SparseAttentionConfig (None where the mode has none)."""
    return sparse.locality_quota
