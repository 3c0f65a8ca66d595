"""The spill step of the device cache beyond the selection (`nosa.ops.block_ops.spill_step`, contract there)
as two Triton launches per layer instead of ~50 small PyTorch ops and three gathers:

- `_spill_plan_kernel`, one program per (row, KV head): which selected misses the spill slots hold (hits)
  and the selection slot each one goes to, which leaving blocks are kept and in which spill slot (least
  recently selected replaced first), the new slot table, spill table and stamps, the hit counter, and one
  copy entry per selection slot for the second launch;
- `_spill_copy_kernel`, one program per (row, KV head, selection slot): that slot's copies.

The reference runs its copies as three ordered gathers (leaving blocks whose slot receives a hit, then the
hits, then the other leaving blocks) because some of them read what others overwrite. Those dependencies
never leave one selection slot's chain: slot j's old block goes out (to a spill slot nobody reads this step),
the hit comes in from spill slot e, and the leaving block that takes e refills e. So one program does the
chain of its slot, all loads before all stores, and programs touch disjoint memory: the copies need one
launch and no ordering between programs. The ranks and orders the reference takes from cumsums and stable
argsorts are counted here from comparison matrices ([slot, selected], [selected, spill], [spill, spill]),
so the tables are equal to the reference's bit for bit (`tests/ops/test_spill.py`).

No host sync and no data-dependent shape (the copy grid is R*H*K, slots without copies exit at once), so the
step is captured in the CUDA graph with the rest of the layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nosa.ops import block_ops
from nosa.ops.block_ops import LayerSlots, SpillSlots
from nosa.ops.kernels.gather import MAX_DIFF_SLOTS, _index, _index_out, _resident, gather_blocks

# The plan holds [K, K], [K, E] and [E, E] comparisons per program; wider tables take the reference.
MAX_SPILL_SLOTS = 128


@triton.jit
def _spill_plan_kernel(
    Table, Sel, s_sel_r, s_sel_h, SpillTable, Stamp, Pos, Active, Hits, SaveTo, HitFrom, RefillFrom, PoolMap,
    H, K, E, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, POOLED: tl.constexpr,
):
    # POOLED: the slots' and spill slots' pages are named by PoolMap [R, H, K + E] (`LayerSlots.pool_map`),
    # and the copies become swaps of its entries, made here (the copy kernel is not launched).
    pid = tl.program_id(0)
    r = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    j = tl.arange(0, BLOCK_K)  # selection slot j, or index i into the selection
    in_k = j < K
    e = tl.arange(0, BLOCK_E)  # spill slot
    in_e = e < E
    t = tl.load(Table + pid * K + j, mask=in_k, other=-1)
    s = tl.load(Sel + r * s_sel_r + h * s_sel_h + j, mask=in_k, other=-1)
    st = tl.load(SpillTable + pid * E + e, mask=in_e, other=-1)
    stamp = tl.load(Stamp + pid * E + e, mask=in_e, other=0)
    keep, resident = _resident(t, s)
    miss = (s >= 0) & (resident == 0)
    # Hits: selected blocks neither resident nor new, found in spill slot src_e (read this step).
    match = miss[:, None] & (s[:, None] == st[None, :]) & (st[None, :] >= 0)  # [i, e]
    hit = tl.max(match.to(tl.int32), axis=1) > 0
    read = tl.max(match.to(tl.int32), axis=0) > 0
    src_e = tl.sum(tl.where(match, e[None, :], 0), axis=1)
    # The free slots in the order hits take them: empty ones first, then those of leaving blocks, by slot.
    free = (keep == 0) & in_k
    empty = free & (t < 0)
    leaving = free & (t >= 0)
    free_rank = tl.where(t < 0, tl.cumsum(empty.to(tl.int32), axis=0) - 1,
                         tl.sum(empty.to(tl.int32), axis=0) + tl.cumsum(leaving.to(tl.int32), axis=0) - 1)
    hit_rank = tl.cumsum(hit.to(tl.int32), axis=0) - 1
    place = free[:, None] & hit[None, :] & (free_rank[:, None] == hit_rank[None, :])  # [slot j, i]: hit i into j
    receives = tl.max(place.to(tl.int32), axis=1) > 0
    placed_block = tl.sum(tl.where(place, s[None, :], 0), axis=1)
    hit_from = tl.where(receives, tl.sum(tl.where(place, src_e[None, :], 0), axis=1), -1)
    first = leaving & receives
    later = leaving & (receives == 0)
    # Spill slots in replacement order (the reference's stable argsort): not read this step, empty first,
    # then by stamp (least recently selected), ties by slot; the read ones last.
    key = tl.where(read, 2147483647, tl.where(st >= 0, stamp, -1))
    before = in_e[None, :] & ((key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (e[None, :] < e[:, None])))
    other_rank = tl.sum(before.to(tl.int32), axis=1)  # [e]
    others = tl.sum((in_e & (read == 0)).to(tl.int32), axis=0)
    reads = tl.sum(read.to(tl.int32), axis=0)
    read_rank = tl.cumsum(read.to(tl.int32), axis=0) - 1
    # Leaving blocks whose slot receives a hit take the unread spill slots in that order; the others take
    # the slots read this step (emptied by their hits), then the rest of the unread ones.
    rank_first = tl.cumsum(first.to(tl.int32), axis=0) - 1
    saved_first = first & (rank_first < others)
    used = tl.sum(saved_first.to(tl.int32), axis=0)
    rank_later = tl.cumsum(later.to(tl.int32), axis=0) - 1
    into_read = later & (rank_later < reads)
    rank_other = used + rank_later - reads
    saved = saved_first | into_read | (later & (rank_other < others))
    want = tl.where(first, rank_first, tl.where(into_read, rank_later, rank_other))
    by_rank = tl.where(into_read[:, None], read[None, :] & (read_rank[None, :] == want[:, None]),
                       other_rank[None, :] == want[:, None])
    chosen = saved[:, None] & in_e[None, :] & by_rank  # [slot j, e]: slot j's block goes to spill slot e
    target = tl.sum(tl.where(chosen, e[None, :], 0), axis=1)
    into = tl.max(chosen.to(tl.int32), axis=0) > 0
    inserted = tl.sum(tl.where(chosen, t[:, None], 0), axis=0)
    tl.store(SpillTable + pid * E + e, tl.where(into, inserted, tl.where(read, -1, st)), mask=in_e)
    tl.store(Stamp + pid * E + e, tl.where(into, tl.load(Pos + r).to(tl.int32), stamp), mask=in_e)
    tl.store(Table + pid * K + j, tl.where(receives, placed_block, t), mask=in_k)
    if tl.load(Active + r) != 0:
        # One program per (row, head) owns its counter: no atomics.
        tl.store(Hits + pid, tl.load(Hits + pid) + tl.sum(hit.to(tl.int64), axis=0))
    # Slot j's copy chain: its block out (not into a read spill slot), the hit in, and the leaving block
    # that takes the hit's spill slot.
    refill = receives[:, None] & into_read[None, :] & (target[None, :] == hit_from[:, None])  # [slot j, slot j2]
    refill_from = tl.where(tl.max(refill.to(tl.int32), axis=1) > 0, tl.sum(tl.where(refill, j[None, :], 0), axis=1), -1)
    if not POOLED:  # the copy kernel's entries (pooled: nothing is copied)
        tl.store(SaveTo + pid * K + j, tl.where(saved & (into_read == 0), target, -1), mask=in_k)
        tl.store(HitFrom + pid * K + j, hit_from, mask=in_k)
        tl.store(RefillFrom + pid * K + j, refill_from, mask=in_k)
    else:
        # The reference's three rounds (leaving blocks of slots taking a hit out, hits in, the other leaving
        # blocks out), each as simultaneous swaps of a slot's page with a spill slot's: [slot, spill] masks.
        C = K + E
        slot_pages = tl.load(PoolMap + pid * C + j, mask=in_k, other=0)
        spill_pages = tl.load(PoolMap + pid * C + K + e, mask=in_e, other=0)
        for phase in tl.static_range(3):
            if phase == 0:
                swap = chosen & saved_first[:, None]
            elif phase == 1:
                swap = receives[:, None] & (hit_from[:, None] == e[None, :]) & in_e[None, :]
            else:
                swap = chosen & (saved & (saved_first == 0))[:, None]
            to_slot = tl.sum(tl.where(swap, spill_pages[None, :], 0), axis=1)
            to_spill = tl.sum(tl.where(swap, slot_pages[:, None], 0), axis=0)
            slot_pages = tl.where(tl.max(swap.to(tl.int32), axis=1) > 0, to_slot, slot_pages)
            spill_pages = tl.where(tl.max(swap.to(tl.int32), axis=0) > 0, to_spill, spill_pages)
        tl.store(PoolMap + pid * C + j, slot_pages, mask=in_k)
        tl.store(PoolMap + pid * C + K + e, spill_pages, mask=in_e)


@triton.jit
def _spill_copy_kernel(
    SaveTo, HitFrom, RefillFrom, SlotK, SlotV, s_lp, s_lt, s_lh, s_ld, SpillK, SpillV, s_pp, s_pt, s_ph, s_pd,
    H, K, E, BLOCK_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, TILE_TOKENS: tl.constexpr, TILE_DIM: tl.constexpr,
):
    pid = tl.program_id(0)
    save_to = tl.load(SaveTo + pid)
    hit_from = tl.load(HitFrom + pid)
    refill_from = tl.load(RefillFrom + pid)
    if (save_to >= 0) | (hit_from >= 0):  # a refill only ever follows a hit
        n = pid // K
        j = (pid % K).to(tl.int64)
        r = (n // H).to(tl.int64)
        h = (n % H).to(tl.int64)
        slot = (r * K + j) * s_lp + h * s_lh
        out = (r * E + tl.maximum(save_to, 0).to(tl.int64)) * s_pp + h * s_ph
        spilled = (r * E + tl.maximum(hit_from, 0).to(tl.int64)) * s_pp + h * s_ph
        back = (r * K + tl.maximum(refill_from, 0).to(tl.int64)) * s_lp + h * s_lh
        toks = tl.arange(0, TILE_TOKENS)
        dims = tl.arange(0, TILE_DIM)
        for t0 in range(0, BLOCK_TOKENS, TILE_TOKENS):
            for d0 in range(0, HEAD_DIM, TILE_DIM):
                tk = t0 + toks
                d = d0 + dims
                m = (tk[:, None] < BLOCK_TOKENS) & (d[None, :] < HEAD_DIM)
                # The per-slot conditions as tile masks (a scalar bool in a mask trips the interpreter).
                zero = tl.zeros([TILE_TOKENS, TILE_DIM], dtype=tl.int32)
                m_save = m & ((zero + save_to) >= 0)
                m_fetch = m & ((zero + hit_from) >= 0)
                m_refill = m & ((zero + refill_from) >= 0)
                at_slot = tk[:, None] * s_lt + d[None, :] * s_ld
                at_spill = tk[:, None] * s_pt + d[None, :] * s_pd
                # K then V. Every load before every store: slot j and spill slot hit_from are both read and
                # written here (the barrier orders them across the program's threads).
                a = tl.load(SlotK + slot + at_slot, mask=m_save)
                b = tl.load(SpillK + spilled + at_spill, mask=m_fetch)
                c = tl.load(SlotK + back + at_slot, mask=m_refill)
                tl.debug_barrier()
                tl.store(SpillK + out + at_spill, a, mask=m_save)
                tl.store(SlotK + slot + at_slot, b, mask=m_fetch)
                tl.store(SpillK + spilled + at_spill, c, mask=m_refill)
                a = tl.load(SlotV + slot + at_slot, mask=m_save)
                b = tl.load(SpillV + spilled + at_spill, mask=m_fetch)
                c = tl.load(SlotV + back + at_slot, mask=m_refill)
                tl.debug_barrier()
                tl.store(SpillV + out + at_spill, a, mask=m_save)
                tl.store(SlotV + slot + at_slot, b, mask=m_fetch)
                tl.store(SpillV + spilled + at_spill, c, mask=m_refill)


def spill_step(slots: LayerSlots, selection: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
               spill: SpillSlots, gather=None) -> None:
    """Same contract as `nosa.ops.block_ops.spill_step`, in two launches (one with spill.k None, where
    nothing is copied, or with pooled slots, where the plan kernel swaps the pages). `gather` is used only by the fallback to the reference (tables wider than
    MAX_DIFF_SLOTS selection slots or MAX_SPILL_SLOTS spill slots), default the gather kernel."""
    table, spill_table = slots.table, spill.table
    rows, heads, num_slots = table.shape
    num_spill = spill_table.shape[-1]
    if num_slots > MAX_DIFF_SLOTS or num_spill > MAX_SPILL_SLOTS or num_spill == 0:
        return block_ops.spill_step(slots, selection, positions, active, spill,
                                    gather=gather_blocks if gather is None else gather)
    if rows == 0:
        return
    pairs = rows * heads
    for name, t, numel, dtype in (("slots.table", table, pairs * num_slots, torch.int32),
                                  ("spill.table", spill_table, pairs * num_spill, torch.int32),
                                  ("spill.stamp", spill.stamp, pairs * num_spill, torch.int32),
                                  ("spill.hits", spill.hits, pairs, torch.int64)):
        _index_out("spill_step", name, t, numel, dtype)
    if selection.shape != table.shape:
        raise ValueError(f"spill_step: selection {tuple(selection.shape)} must have the table's shape {tuple(table.shape)}")
    positions = _index("spill_step", "positions", positions, rows, torch.int64)
    if active.dtype != torch.bool or active.numel() != rows or not active.is_contiguous():
        raise ValueError(f"spill_step: active must be a contiguous bool tensor of {rows} elements")
    sel = selection.to(torch.int32)
    if sel.stride(-1) != 1:
        sel = sel.contiguous()
    pooled = slots.pool_map is not None
    if pooled:
        _index_out("spill_step", "slots.pool_map", slots.pool_map, pairs * (num_slots + num_spill), torch.int32)
        block_ops.check_pooled_spill(spill)
    # Copy entries per selection slot: save_to, hit_from, refill_from (spill slot, spill slot, slot; -1 none).
    entries = torch.empty((3, pairs * num_slots), dtype=torch.int32, device=table.device)
    _spill_plan_kernel[(pairs,)](
        table, sel, sel.stride(0), sel.stride(1), spill_table, spill.stamp, positions, active.view(torch.uint8),
        spill.hits, entries[0], entries[1], entries[2], slots.pool_map if pooled else table, heads, num_slots, num_spill,
        BLOCK_K=triton.next_power_of_2(num_slots), BLOCK_E=triton.next_power_of_2(num_spill), POOLED=pooled,
    )
    if pooled or spill.k is None:  # pooled: the pages were swapped; one copy (offload off): the tables only
        return
    slot_k, slot_v, spill_k, spill_v = slots.k, slots.v, spill.k, spill.v  # [pages, bs, H, D]
    if slot_k.stride() != slot_v.stride() or spill_k.stride() != spill_v.stride():
        raise ValueError("spill_step: K and V must share strides on each side")
    if slot_k.shape[1:] != spill_k.shape[1:] or slot_k.dtype != spill_k.dtype:
        raise ValueError(f"spill_step: slot pages {tuple(slot_k.shape)} {slot_k.dtype} and spill pages "
                         f"{tuple(spill_k.shape)} {spill_k.dtype} must agree on [bs, H, D] and dtype")
    block_tokens, head_dim = slot_k.shape[1], slot_k.shape[3]
    tile_dim = triton.next_power_of_2(head_dim)
    # Three tiles live at once (a block out, one in, one refilled): about 4K elements each.
    tile_tokens = max(1, min(triton.next_power_of_2(block_tokens), 4096 // tile_dim))
    _spill_copy_kernel[(pairs * num_slots,)](
        entries[0], entries[1], entries[2], slot_k, slot_v, *slot_k.stride(), spill_k, spill_v, *spill_k.stride(),
        heads, num_slots, num_spill,
        BLOCK_TOKENS=block_tokens, HEAD_DIM=head_dim, TILE_TOKENS=tile_tokens, TILE_DIM=tile_dim,
    )
