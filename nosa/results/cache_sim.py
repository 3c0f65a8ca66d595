"""Device block cache vs its size on recorded selection traces (CPU): how many blocks a cache of C blocks
per (layer, sequence, KV head) would load from the host per decoding step.

Two simulators over the same sequences of selections (int `[N, S, K]`, N independent (sequence, layer,
head) streams, step s the query at positions[n] + s, -1 unused):
- `engine_cache_loads`: the engine's own bookkeeping ops (`ops.block_ops.spill_step`, then the slot-table
  diff of `plan_step`) run on 1-token, 1-dim stand-in blocks: exactly what the engine does, LRU spill
  included (the tests check it against the engine's load counts);
- `policy_cache_loads`: a cache of C blocks in which the current selection is always resident and the
  other blocks are replaced by a policy: 'lru' (least recently selected first, what the engine does),
  'lfu' (least often selected so far, ties by LRU), 'belady' (the block selected again furthest in the
  future: the offline optimum, an upper bound for any online order).
A load is a selected block the cache does not hold, except a tail block that starts at this step (nothing
is on the host yet). Both start warm: the cache holds `initial` (default the first step's selection), and
counting starts at the step after it.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from nosa.ops import block_ops

POLICIES = ("lru", "lfu", "belady")


def _fresh(selection: torch.Tensor, position: torch.Tensor, block_size: int) -> torch.Tensor:
    own = torch.div(position, block_size, rounding_mode="floor")
    return (position % block_size == 0)[:, None] & (selection == own[:, None])


def engine_cache_loads(selections, positions, block_size: int, cache_blocks: int, initial=None) -> dict:
    """selections: int `[N, S, K]`; positions: int `[N]`, the position of step 0 of each stream;
    cache_blocks >= K. initial: `[N, K]` the selection held before step 0 (None: step 0's, counted from
    step 1). Returns {'loads': int64 [N, S'], 'spill_hits': int64 [N, S'], 'selected': int64 [N, S']} for
    the S' counted steps."""
    sel = torch.as_tensor(np.asarray(selections), dtype=torch.int32)
    N, S, K = sel.shape
    if cache_blocks < K:
        raise ValueError(f"cache_blocks must be >= the selection's {K} blocks, got {cache_blocks}")
    first = torch.as_tensor(np.asarray(positions), dtype=torch.int64)
    E = cache_blocks - K
    table = torch.full((N, 1, K), -1, dtype=torch.int32)
    # Stand-in blocks of one token and one dim: the ops move them like real ones, nobody reads them.
    slots = block_ops.LayerSlots(table, torch.zeros(N * K, 1, 1, 1), torch.zeros(N * K, 1, 1, 1),
                                 torch.full((N, 1), -1, dtype=torch.int32))
    spill = None
    if E:
        spill = block_ops.SpillSlots(torch.full((N, 1, E), -1, dtype=torch.int32), torch.full((N, 1, E), -1, dtype=torch.int32),
                                     torch.zeros(N * E, 1, 1, 1), torch.zeros(N * E, 1, 1, 1), torch.zeros((N, 1), dtype=torch.int64))
    active = torch.ones(N, dtype=torch.bool)
    start = 0
    if initial is None:
        initial, start = sel[:, 0], 1
    table.copy_(block_ops.diff_slot_tables(table.view(N, K), torch.as_tensor(initial, dtype=torch.int32).view(N, K))[0].view(N, 1, K))
    loads, hits, selected = [], [], []
    for s in range(start, S):
        step = sel[:, s]
        position = first + s
        before = spill.hits.clone() if spill is not None else None
        if spill is not None:
            block_ops.spill_step(slots, step[:, None], position, active, spill)
        new_table, miss_block, _ = block_ops.diff_slot_tables(table.view(N, K), step)
        table.copy_(new_table.view(N, 1, K))
        loads.append(((miss_block >= 0) & ~_fresh(miss_block, position, block_size)).sum(1))
        hits.append((spill.hits - before)[:, 0] if spill is not None else torch.zeros(N, dtype=torch.int64))
        selected.append((step >= 0).sum(1))
    stack = lambda xs: torch.stack(xs, 1).long() if xs else torch.zeros((N, 0), dtype=torch.long)  # noqa: E731
    return {"loads": stack(loads), "spill_hits": stack(hits), "selected": stack(selected)}


def policy_cache_loads(selection, position: int, block_size: int, cache_blocks: int, policy: str, initial=None) -> np.ndarray:
    """One stream: selection int `[S, K]`, step s at position + s. Returns the loads of the counted steps
    (int64 `[S']`, from step 1, or step 0 when `initial` [K] is given) under `policy` (POLICIES)."""
    steps = policy_cache_steps(selection, position, block_size, cache_blocks, policy, initial)
    return np.asarray([len(misses) for _, misses in steps], dtype=np.int64)


def policy_cache_steps(selection, position: int, block_size: int, cache_blocks: int, policy: str, initial=None):
    """`policy_cache_loads`'s simulation, step by step: per counted step, (the blocks the cache holds before
    it, the step's loads: selected blocks it lacks, less a tail block that starts at the step)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    steps = [set(int(b) for b in row if b >= 0) for row in np.asarray(selection)]
    uses: dict[int, list[int]] = {}
    for s, chosen in enumerate(steps):
        for b in chosen:
            uses.setdefault(b, []).append(s)
    if initial is None:
        cache, start = set(steps[0]), 1
    else:
        cache, start = set(int(b) for b in np.asarray(initial) if b >= 0), 0
    last = {b: start - 1 for b in cache}
    count = {b: 1 for b in cache}
    out = []
    for s in range(start, len(steps)):
        chosen = steps[s]
        own = (position + s) // block_size
        fresh = own if (position + s) % block_size == 0 else None
        out.append((set(cache), {b for b in chosen - cache if b != fresh}))
        cache |= chosen
        for b in chosen:
            last[b] = s
            count[b] = count.get(b, 0) + 1
        excess = len(cache) - max(cache_blocks, len(chosen))
        if excess > 0:
            others = [b for b in cache if b not in chosen]
            if policy == "lru":
                key = lambda b: (last[b], b)  # noqa: E731
            elif policy == "lfu":
                key = lambda b: (count[b], last[b], b)  # noqa: E731
            else:  # belady: furthest next use first out (never again: infinitely far)
                def key(b):
                    i = bisect.bisect_right(uses.get(b, []), s)
                    return (-(uses[b][i] if i < len(uses.get(b, [])) else len(steps) + 1), b)
            for b in sorted(others, key=key)[:excess]:
                cache.discard(b)
    return out


def streams(traces: list[np.ndarray], first_positions: list[int]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Traces `[L, S, H, K]` (one per prompt, same S) -> ([N, S, K] streams, [N] positions, what each is)."""
    rows, positions, names = [], [], []
    for i, (trace, first) in enumerate(zip(traces, first_positions)):
        L, S, H, K = trace.shape
        for l in range(L):
            for h in range(H):
                rows.append(trace[l, :, h])
                positions.append(first)
                names.append({"trace": i, "layer": l, "head": h})
    return np.stack(rows), np.asarray(positions), names


def layer_prefetch(trace: np.ndarray, position: int, block_size: int, cache_blocks: int) -> dict:
    """Could layer l's host loads start before its own selection, from layer l-1's at the same step (known by
    then)? trace: int `[L, S, H, K]`, step s at position + s; each (layer, head) has a cache of cache_blocks,
    least recently selected out (`policy_cache_steps`, 'lru', the engine's order). For each layer l >= 1 and two predictors of
    layer l's misses at a step: 'from_selection' (the blocks layer l-1 selects that layer l's cache lacks)
    and 'from_misses' (the blocks layer l-1 itself had to load), summed over heads and steps 1..S-1: misses, prefetched
    (the predictor's blocks that layer l's cache lacks: what a prefetch would load), useful (prefetched and
    then missed by layer l), coverage = useful / misses, precision = useful / prefetched."""
    L, S, H, _ = trace.shape
    per_layer = [[policy_cache_steps(trace[l, :, h], position, block_size, cache_blocks, "lru") for h in range(H)]
                 for l in range(L)]
    rows = []
    for l in range(1, L):
        totals = {"misses": 0, "selection": [0, 0], "misses_prev": [0, 0]}
        for h in range(H):
            for s in range(1, S):
                cache, misses = per_layer[l][h][s - 1]
                prev_selected = {int(b) for b in trace[l - 1, s, h] if b >= 0}
                prev_misses = per_layer[l - 1][h][s - 1][1]
                totals["misses"] += len(misses)
                for key, predictor in (("selection", prev_selected), ("misses_prev", prev_misses)):
                    prefetched = predictor - cache
                    totals[key][0] += len(prefetched)
                    totals[key][1] += len(prefetched & misses)
        row = {"layer": l, "misses": totals["misses"]}
        for key, name in (("selection", "from_selection"), ("misses_prev", "from_misses")):
            prefetched, useful = totals[key]
            row[name] = {"prefetched": prefetched, "useful": useful,
                         "coverage": useful / totals["misses"] if totals["misses"] else None,
                         "precision": useful / prefetched if prefetched else None}
        rows.append(row)
    return {"layers": rows}
