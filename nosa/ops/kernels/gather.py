"""Triton kernels of the NOSI decode step's data movement (spec sec. 6), beside their references in
`nosa.ops.block_ops`:

- `gather_blocks`: one launch copies every missed (block, KV head) of a layer for the whole batch. The
  source may be a pinned host tensor: the kernel reads it directly through unified virtual addressing, so
  there is no staging copy and no per-block memcpy call. The same kernel writes full tail blocks back to
  the host store (device -> host).
- `diff_slot_tables`: the slot-table diff on the device, one program per (row, KV head).
- `stage_window`, `commit_window`, `plan_step`, `attention_inputs`: the decode step's per-layer bookkeeping
  (contracts in `nosa.ops.block_ops`), one launch each. Unfused, this bookkeeping was ~80 small PyTorch
  kernels per layer (index builds, gathers, wheres, index_puts), more time per step than the PCIe gather.
  They move no data the PyTorch version did not, and compute nothing in floating point (the window means
  stay in `nosa.ops.compress_keys` / `agnostic_chunk_scores`, so decode rounds exactly like prefill and
  the full forward); the outputs are equal bit for bit.

The kernels index their integer inputs as dense arrays (`ptr + i`), so every wrapper makes its index
inputs contiguous int32/int64 and checks its in-place index outputs (`_index`, `_index_out`): a stride-0
view such as `arange(1).expand(n)` would otherwise be read past its one element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nosa.ops import block_ops
from nosa.ops.block_ops import HostPages, LayerSlots, LoadPlan, StepTokens

# The diff holds a K x K comparison per program; wider tables fall back to the (on-device) reference.
MAX_DIFF_SLOTS = 128


def _index(op: str, name: str, t: torch.Tensor, numel: int, dtype=torch.int32) -> torch.Tensor:
    """An index input as the kernels read it: dense, `dtype`, `numel` elements (copied only if it is not)."""
    if t.numel() != numel:
        raise ValueError(f"{op}: {name} must have {numel} elements, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    return t if (t.dtype == dtype and t.is_contiguous()) else t.to(dtype).contiguous()


def _index_out(op: str, name: str, t: torch.Tensor, numel: int, dtype=torch.int32) -> None:
    """An index tensor the kernel writes in place: it must already be dense `dtype` of `numel` elements."""
    if t.numel() != numel or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be a contiguous {dtype} tensor of {numel} elements (written in place), got "
            f"shape {tuple(t.shape)}, {t.dtype}, strides {t.stride()}"
        )


@triton.jit
def _gather_blocks_kernel(
    src_k, src_v, dst_k, dst_v, src_page_ptr, dst_page_ptr, head_ptr,
    s_page, s_head, s_tok, s_dim,
    d_page, d_head, d_tok, d_dim,
    BLOCK_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, TILE_TOKENS: tl.constexpr, TILE_DIM: tl.constexpr,
):
    entry = tl.program_id(0)
    src_page = tl.load(src_page_ptr + entry).to(tl.int64)
    dst_page = tl.load(dst_page_ptr + entry).to(tl.int64)
    if (src_page >= 0) & (dst_page >= 0):
        head = tl.load(head_ptr + entry).to(tl.int64)
        src_base = src_page * s_page + head * s_head
        dst_base = dst_page * d_page + head * d_head
        toks = tl.arange(0, TILE_TOKENS)
        dims = tl.arange(0, TILE_DIM)
        for t0 in range(0, BLOCK_TOKENS, TILE_TOKENS):
            for d0 in range(0, HEAD_DIM, TILE_DIM):
                t = t0 + toks
                d = d0 + dims
                mask = (t[:, None] < BLOCK_TOKENS) & (d[None, :] < HEAD_DIM)
                src_off = src_base + t[:, None] * s_tok + d[None, :] * s_dim
                dst_off = dst_base + t[:, None] * d_tok + d[None, :] * d_dim
                tl.store(dst_k + dst_off, tl.load(src_k + src_off, mask=mask), mask=mask)
                tl.store(dst_v + dst_off, tl.load(src_v + src_off, mask=mask), mask=mask)


def gather_blocks(src_k, src_v, dst_k, dst_v, src_page, dst_page, head) -> None:
    """Same contract as `nosa.ops.block_ops.gather_blocks` (shapes [P, H, bs, D], any strides; entries
    with a negative page skipped), in one launch of M programs."""
    if src_k.shape[1:] != dst_k.shape[1:] or src_k.dtype != dst_k.dtype:
        raise ValueError(
            f"gather_blocks: source {tuple(src_k.shape)} {src_k.dtype} and destination {tuple(dst_k.shape)} "
            f"{dst_k.dtype} must agree on [H, bs, D] and dtype"
        )
    if src_k.stride() != src_v.stride() or dst_k.stride() != dst_v.stride():
        raise ValueError("gather_blocks: K and V must share strides on each side")
    num_entries = src_page.numel()
    if num_entries == 0:
        return
    src_page = _index("gather_blocks", "src_page", src_page, num_entries)
    dst_page = _index("gather_blocks", "dst_page", dst_page, num_entries)
    head = _index("gather_blocks", "head", head, num_entries)
    block_tokens, head_dim = src_k.shape[2], src_k.shape[3]
    tile_dim = triton.next_power_of_2(head_dim)
    # About 8K elements per tile keeps registers bounded while each load covers whole cache lines.
    tile_tokens = max(1, min(triton.next_power_of_2(block_tokens), 8192 // tile_dim))
    _gather_blocks_kernel[(num_entries,)](
        src_k, src_v, dst_k, dst_v, src_page, dst_page, head,
        *src_k.stride(), *dst_k.stride(),
        BLOCK_TOKENS=block_tokens, HEAD_DIM=head_dim, TILE_TOKENS=tile_tokens, TILE_DIM=tile_dim,
    )


@triton.jit
def _resident(table, sel):
    """Which blocks stay: table [slots], sel [selected] -> (keep: slot j's block is still selected, hit:
    selected block i is already in a slot). Shared by the diff and the spill step (`kernels.spill`)."""
    equal = (table[:, None] == sel[None, :]) & (table[:, None] >= 0)  # [slot j, selected i]
    keep = tl.max(equal.to(tl.int32), axis=1) > 0
    hit = tl.max(equal.to(tl.int32), axis=0) > 0
    return keep, hit


@triton.jit
def _diff_row(table, sel, offs, inside):
    """The slot-table diff of one (row, head): resident blocks stay in their slots, the r-th miss takes the
    r-th freed slot. table, sel: [BLOCK_K] -> (miss mask, slot of each miss, new table)."""
    keep, hit = _resident(table, sel)
    miss = (sel >= 0) & (hit == 0)
    free = (keep == 0) & inside
    miss_rank = tl.cumsum(miss.to(tl.int32), axis=0) - 1
    free_rank = tl.cumsum(free.to(tl.int32), axis=0) - 1
    # match[j, i]: miss i takes free slot j.
    match = free[:, None] & miss[None, :] & (free_rank[:, None] == miss_rank[None, :])
    slot_of_miss = tl.sum(tl.where(match, offs[:, None], 0), axis=0)
    assigned = tl.max(match.to(tl.int32), axis=1) > 0
    assigned_block = tl.sum(tl.where(match, sel[None, :], 0), axis=1)
    new_table = tl.where(keep, table, tl.where(assigned, assigned_block, -1))
    return miss, slot_of_miss, new_table


@triton.jit
def _diff_kernel(table_ptr, sel_ptr, out_table_ptr, miss_block_ptr, miss_slot_ptr, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    inside = offs < K
    table = tl.load(table_ptr + row * K + offs, mask=inside, other=-1)
    sel = tl.load(sel_ptr + row * K + offs, mask=inside, other=-1)
    miss, slot_of_miss, new_table = _diff_row(table, sel, offs, inside)
    tl.store(out_table_ptr + row * K + offs, new_table, mask=inside)
    tl.store(miss_block_ptr + row * K + offs, tl.where(miss, sel, -1), mask=inside)
    tl.store(miss_slot_ptr + row * K + offs, tl.where(miss, slot_of_miss, -1), mask=inside)


def diff_slot_tables(table: torch.Tensor, selected: torch.Tensor):
    """Same contract as `nosa.ops.block_ops.diff_slot_tables`: table, selected [N, K] int32 ->
    (new_table, miss_block, miss_slot), each [N, K] int32. Tables wider than MAX_DIFF_SLOTS (dense mode at
    long context) take the reference, which runs on the device as well."""
    num_rows, num_slots = table.shape
    if num_slots > MAX_DIFF_SLOTS:
        return block_ops.diff_slot_tables(table, selected)
    if selected.shape != table.shape:
        raise ValueError(f"diff_slot_tables: selected {tuple(selected.shape)} must have the table's shape {tuple(table.shape)}")
    table = _index("diff_slot_tables", "table", table, num_rows * num_slots)
    selected = _index("diff_slot_tables", "selected", selected, num_rows * num_slots)
    new_table = torch.empty_like(table)
    miss_block = torch.empty_like(table)
    miss_slot = torch.empty_like(table)
    if num_rows:
        _diff_kernel[(num_rows,)](table, selected, new_table, miss_block, miss_slot, num_slots,
                                  BLOCK_K=triton.next_power_of_2(num_slots))
    return new_table, miss_block, miss_slot


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------------------------------------
# Decode-step bookkeeping
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _stage_window_kernel(
    K_new, s_kn_r, s_kn_h, C_new, s_cn_r, s_cn_h, Pos,
    Ring, s_rg_r, s_rg_t, s_rg_h, Evict, s_ev_r, s_ev_t, s_ev_h,
    WinK, s_wk_r, s_wk_t, s_wk_h, WinC, s_wc_r, s_wc_t, s_wc_h,
    H, D, KERNEL, HAS_EVICTION: tl.constexpr, KERNEL_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    pos = tl.load(Pos + r).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    k = tl.load(K_new + r * s_kn_r + h * s_kn_h + d, mask=d_ok, other=0.0)
    slot = pos % KERNEL
    tl.store(Ring + r * s_rg_r + slot * s_rg_t + h * s_rg_h + d, k, mask=d_ok)
    i = tl.arange(0, KERNEL_PAD)
    i_ok = i < KERNEL
    tok = pos - KERNEL + 1 + i
    ring_slot = ((tok % KERNEL) + KERNEL) % KERNEL  # non-negative whatever the sign convention of %
    tile_ok = i_ok[:, None] & d_ok[None, :]
    keys = tl.load(Ring + r * s_rg_r + ring_slot[:, None] * s_rg_t + h * s_rg_h + d[None, :], mask=tile_ok, other=0.0)
    # The slot this program just stored is taken from registers: no read-after-write across threads.
    keys = tl.where((ring_slot == slot)[:, None], k[None, :], keys)
    tl.store(WinK + r * s_wk_r + i[:, None] * s_wk_t + h * s_wk_h + d[None, :], keys, mask=tile_ok)
    if HAS_EVICTION:
        c = tl.load(C_new + r * s_cn_r + h * s_cn_h).to(tl.float32)
        tl.store(Evict + r * s_ev_r + pos * s_ev_t + h * s_ev_h, c)
        tc = tl.maximum(tok, 0)
        scores = tl.load(Evict + r * s_ev_r + tc * s_ev_t + h * s_ev_h, mask=i_ok, other=0.0)
        scores = tl.where(tc == pos, c, scores)
        tl.store(WinC + r * s_wc_r + i * s_wc_t + h * s_wc_h, scores, mask=i_ok)


def stage_window(k, c, positions, ring, eviction, window_k, window_c) -> None:
    """Same contract as `nosa.ops.block_ops.stage_window`, one program per (row, KV head)."""
    rows, kernel, heads, head_dim = ring.shape
    if rows == 0:
        return
    positions = _index("stage_window", "positions", positions, rows, torch.int64)
    k = _last_dim_contiguous(k)
    for name, t in (("ring", ring), ("window_k", window_k)):
        if t.stride(-1) != 1:
            raise ValueError(f"stage_window: {name} must have a contiguous last dimension")
    has_eviction = eviction is not None
    if has_eviction:
        c = c.reshape(rows, heads)
        cn, ev, wc = c, eviction, window_c
    else:
        cn = ev = wc = k  # unused (HAS_EVICTION is False); any tensor with 3 strides
    _stage_window_kernel[(rows * heads,)](
        k, k.stride(0), k.stride(1), cn, cn.stride(0), cn.stride(1), positions,
        ring, ring.stride(0), ring.stride(1), ring.stride(2), ev, ev.stride(0), ev.stride(1), ev.stride(2),
        window_k, window_k.stride(0), window_k.stride(1), window_k.stride(2), wc, wc.stride(0), wc.stride(1), wc.stride(2),
        heads, head_dim, kernel, HAS_EVICTION=has_eviction, KERNEL_PAD=triton.next_power_of_2(kernel),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _commit_window_kernel(
    Pos, CompNew, s_cn_r, s_cn_h, Comp, s_c_r, s_c_w, s_c_h, AgNew, s_an_r, s_an_h, Ag, s_a_r, s_a_w, s_a_h,
    AgBlk, s_ab_r, s_ab_h, H, D, KERNEL, STRIDE, NUM_WINDOWS, NB, BLOCK_TOKENS,
    HAS_AGNOSTIC: tl.constexpr, BLOCK_D: tl.constexpr, SPAN: tl.constexpr,
):
    pid = tl.program_id(0)
    r = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    end = tl.load(Pos + r).to(tl.int64) + 1 - KERNEL
    if (end >= 0) & (end % STRIDE == 0):
        window = tl.minimum(end // STRIDE, NUM_WINDOWS - 1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        key = tl.load(CompNew + r * s_cn_r + h * s_cn_h + d, mask=d_ok)
        tl.store(Comp + r * s_c_r + window * s_c_w + h * s_c_h + d, key, mask=d_ok)
        if HAS_AGNOSTIC:
            score = tl.load(AgNew + r * s_an_r + h * s_an_h)
            tl.store(Ag + r * s_a_r + window * s_a_w + h * s_a_h, score)
            # The blocks the window overlaps keep the max over their complete windows.
            start = window * STRIDE
            blocks = start // BLOCK_TOKENS + tl.arange(0, SPAN)
            hit = (blocks <= (start + KERNEL - 1) // BLOCK_TOKENS) & (blocks < NB)
            ptr = AgBlk + r * s_ab_r + h * s_ab_h + blocks
            tl.store(ptr, tl.maximum(tl.load(ptr, mask=hit, other=0.0), score), mask=hit)


def commit_window(positions, compressed_new, agnostic_new, compressed, agnostic, agnostic_blocks,
                  kernel: int, stride: int, block_size: int) -> None:
    """Same contract as `nosa.ops.block_ops.commit_window`, one program per (row, KV head)."""
    rows, num_windows, heads, head_dim = compressed.shape
    if rows == 0:
        return
    positions = _index("commit_window", "positions", positions, rows, torch.int64)
    cn = _last_dim_contiguous(compressed_new[:, 0])
    if compressed.stride(-1) != 1:
        raise ValueError("commit_window: compressed must have a contiguous last dimension")
    has_agnostic = agnostic is not None
    if has_agnostic and (agnostic_blocks is None or agnostic_blocks.stride(-1) != 1):
        raise ValueError("commit_window: agnostic scores need agnostic_blocks [R, H, NB] with a contiguous last dimension")
    an, ag, ab = (agnostic_new[:, 0], agnostic, agnostic_blocks) if has_agnostic else (cn, compressed, cn)
    _commit_window_kernel[(rows * heads,)](
        positions, cn, cn.stride(0), cn.stride(1), compressed, compressed.stride(0), compressed.stride(1), compressed.stride(2),
        an, an.stride(0), an.stride(1), ag, ag.stride(0), ag.stride(1), ag.stride(2), ab, ab.stride(0), ab.stride(1),
        heads, head_dim, kernel, stride, num_windows, ab.shape[-1], block_size,
        HAS_AGNOSTIC=has_agnostic, BLOCK_D=triton.next_power_of_2(head_dim),
        SPAN=triton.next_power_of_2((kernel - 1) // block_size + 2),
    )


@triton.jit
def _plan_diff(Table, Sel, s_sel_r, s_sel_h, pid, r, h, own, offs, inside, K, DENSE: tl.constexpr):
    """The slot-table diff both planning kernels share, for (row r, head h) = program pid -> (selected
    blocks, miss mask, slot of each miss, new table, number selected).

    Dense mode selects blocks 0..own, ascending. Under the diff's rule (the r-th miss takes the r-th free
    slot) block j then always sits in slot j: install fills an empty table in order, and each new block takes
    the first free slot, its own index. So the diff reduces to comparing slot j with j, for any number of
    slots (the general path holds a K x K comparison in registers)."""
    table = tl.load(Table + pid * K + offs, mask=inside, other=-1)
    if DENSE:
        chosen = inside & (offs <= own)
        sel = tl.where(chosen, offs, -1)
        miss = chosen & (table != offs)
        slot_of_miss = offs
        new_table = sel
        num_selected = tl.sum(chosen.to(tl.int32), axis=0)
    else:
        sel = tl.load(Sel + r * s_sel_r + h * s_sel_h + offs, mask=inside, other=-1)
        miss, slot_of_miss, new_table = _diff_row(table, sel, offs, inside)
        num_selected = tl.sum((sel >= 0).to(tl.int32), axis=0)
    return sel, miss, slot_of_miss, new_table, num_selected


@triton.jit
def _plan_step_kernel(
    Table, Sel, s_sel_r, s_sel_h, Pages, Pos, Active, Src, Dst, Loads, Loaded, Selected, SlotSrc,
    K_new, s_kn_r, s_kn_h, V_new, s_vn_r, s_vn_h,
    SlotK, SlotV, s_sp, s_st, s_sh, s_sd, StoreK, StoreV, s_gp, s_gh, s_gt, s_gd,
    H, K, NB, PoolMap, SlotPage, C,
    DENSE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, TILE_TOKENS: tl.constexpr, POOLED: tl.constexpr,
):
    # POOLED: slot j of (r, h) lives in page r*C + PoolMap[r, h, j] (`LayerSlots.pool_map`), else r*K + j;
    # the pages of the K slots go to SlotPage [R, H, K] for the attention.
    pid = tl.program_id(0)
    r = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    pos = tl.load(Pos + r).to(tl.int64)
    own = pos // BLOCK_TOKENS
    offset = pos % BLOCK_TOKENS
    offs = tl.arange(0, BLOCK_K)
    inside = offs < K
    sel, miss, slot_of_miss, new_table, num_selected = _plan_diff(Table, Sel, s_sel_r, s_sel_h, pid, r, h, own, offs,
                                                                  inside, K, DENSE)
    # A new tail block (the token starts it) has nothing on the host yet: a slot, no load.
    fresh = (offset == 0) & (sel == own)
    want = miss & (fresh == 0)
    page = tl.load(Pages + r * NB + tl.minimum(tl.maximum(sel, 0), NB - 1), mask=want, other=-1)
    src = tl.where(want, page, -1)
    if POOLED:
        slot_pages = r * C + tl.load(PoolMap + pid * C + offs, mask=inside, other=0).to(tl.int64)
        tl.store(SlotPage + pid * K + offs, slot_pages.to(tl.int32), mask=inside)
        miss_page = r * C + tl.load(PoolMap + pid * C + slot_of_miss, mask=inside & (src >= 0), other=0).to(tl.int64)
    else:
        miss_page = r * K + slot_of_miss
    dst = tl.where(src >= 0, miss_page, -1)
    tl.store(Src + pid * K + offs, src, mask=inside)
    tl.store(Dst + pid * K + offs, dst.to(tl.int32), mask=inside)
    # The same loads by destination slot (at most one per slot). Dense: entry i is slot i already (and K, every
    # block of the context, is too wide for a [K, K] matrix); else [slot j, entry i]: entry i loads into slot j.
    if DENSE:
        by_slot = src
    else:
        into = (src[None, :] >= 0) & (slot_of_miss[None, :] == offs[:, None])
        by_slot = tl.max(tl.where(into, src[None, :], -1), axis=1)
    tl.store(SlotSrc + pid * K + offs, by_slot.to(tl.int32), mask=inside)
    loads = tl.sum((src >= 0).to(tl.int32), axis=0)
    tl.store(Loads + pid, loads)
    tl.store(Table + pid * K + offs, new_table, mask=inside)
    if tl.load(Active + r) != 0:
        # One program per (row, head) owns these counters: no atomics needed.
        tl.store(Loaded + pid, tl.load(Loaded + pid) + loads.to(tl.int64))
        tl.store(Selected + pid, tl.load(Selected + pid) + num_selected.to(tl.int64))
    # Append the token to its tail block (always selected, so resident after the diff).
    own_slot = tl.min(tl.where(new_table == own, offs, BLOCK_K), axis=0)
    own_slot = tl.where(own_slot == BLOCK_K, 0, own_slot).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    k = tl.load(K_new + r * s_kn_r + h * s_kn_h + d, mask=d_ok, other=0.0)
    v = tl.load(V_new + r * s_vn_r + h * s_vn_h + d, mask=d_ok, other=0.0)
    if POOLED:
        own_page = r * C + tl.load(PoolMap + pid * C + own_slot).to(tl.int64)
    else:
        own_page = r * K + own_slot
    base = own_page * s_sp + h * s_sh
    tl.store(SlotK + base + offset * s_st + d * s_sd, k, mask=d_ok)
    tl.store(SlotV + base + offset * s_st + d * s_sd, v, mask=d_ok)
    # A tail block this token fills goes back to its host page (and stays resident).
    host_page = tl.load(Pages + r * NB + tl.minimum(own, NB - 1)).to(tl.int64)
    if (offset == BLOCK_TOKENS - 1) & (host_page >= 0):
        toks = tl.arange(0, TILE_TOKENS)
        for t0 in range(0, BLOCK_TOKENS, TILE_TOKENS):
            t = t0 + toks
            m = (t[:, None] < BLOCK_TOKENS) & d_ok[None, :]
            newest = (t == offset)[:, None]  # this token's row from registers, not from the store above
            src_off = base + t[:, None] * s_st + d[None, :] * s_sd
            dst_off = host_page * s_gp + h * s_gh + t[:, None] * s_gt + d[None, :] * s_gd
            tl.store(StoreK + dst_off, tl.where(newest, k[None, :], tl.load(SlotK + src_off, mask=m)), mask=m)
            tl.store(StoreV + dst_off, tl.where(newest, v[None, :], tl.load(SlotV + src_off, mask=m)), mask=m)


def plan_step(slots: LayerSlots, selection, token: StepTokens, host: HostPages, plan: LoadPlan) -> None:
    """Same contract as `nosa.ops.block_ops.plan_step`, one program per (row, KV head)."""
    table, page_table = slots.table, slots.page_table
    rows, heads, num_slots = table.shape
    if selection is not None and num_slots > MAX_DIFF_SLOTS:
        return block_ops.plan_step(slots, selection, token, host, plan, gather=gather_blocks)
    if rows == 0:
        return
    entries = rows * heads * num_slots
    for name, t, numel, dtype in (("slots.table", table, entries, torch.int32),
                                  ("slots.page_table", page_table, page_table.numel(), torch.int32),
                                  ("plan.src_page", plan.src_page, entries, torch.int32),
                                  ("plan.dst_page", plan.dst_page, entries, torch.int32),
                                  ("plan.loads", plan.loads, rows * heads, torch.int32),
                                  ("plan.loaded", plan.loaded, rows * heads, torch.int64),
                                  ("plan.selected", plan.selected, rows * heads, torch.int64),
                                  ("plan.slot_src", plan.slot_src, entries, torch.int32)):
        _index_out("plan_step", name, t, numel, dtype)
    positions = _index("plan_step", "token.positions", token.positions, rows, torch.int64)
    if token.active.dtype != torch.bool or token.active.numel() != rows or not token.active.is_contiguous():
        raise ValueError(f"plan_step: token.active must be a contiguous bool tensor of {rows} elements")
    slot_k, slot_v, store_k, store_v = slots.k, slots.v, host.k, host.v
    if slot_k.stride() != slot_v.stride() or store_k.stride() != store_v.stride():
        raise ValueError("plan_step: K and V must share strides on each side")
    block_tokens, head_dim = slot_k.shape[1], slot_k.shape[3]
    k, v = _last_dim_contiguous(token.k), _last_dim_contiguous(token.v)
    dense = selection is None
    sel = table if dense else _last_dim_contiguous(selection.to(torch.int32))
    block_d = triton.next_power_of_2(head_dim)
    pooled = slots.pool_map is not None
    if pooled:
        pool_map, slot_page = slots.pool_map, plan.slot_page
        _index_out("plan_step", "slots.pool_map", pool_map, rows * heads * pool_map.shape[-1], torch.int32)
        if slot_page is None:
            raise ValueError("plan_step: pooled slots (slots.pool_map) need plan.slot_page [R, H, K] for the pages")
        _index_out("plan_step", "plan.slot_page", slot_page, entries, torch.int32)
        if slot_k.shape[0] != rows * pool_map.shape[-1]:
            raise ValueError(f"plan_step: pooled slots hold {slot_k.shape[0]} pages, expected rows x pool_map's "
                             f"{pool_map.shape[-1]} = {rows * pool_map.shape[-1]}")
    else:
        pool_map = slot_page = table  # never read (POOLED is False); int32, as they are
    _plan_step_kernel[(rows * heads,)](
        table, sel, sel.stride(0), sel.stride(1), page_table, positions, token.active.view(torch.uint8),
        plan.src_page, plan.dst_page, plan.loads, plan.loaded, plan.selected, plan.slot_src,
        k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        slot_k, slot_v, slot_k.stride(0), slot_k.stride(1), slot_k.stride(2), slot_k.stride(3),
        store_k, store_v, store_k.stride(0), store_k.stride(1), store_k.stride(2), store_k.stride(3),
        heads, num_slots, page_table.shape[1], pool_map, slot_page, pool_map.shape[-1],
        DENSE=dense, BLOCK_K=triton.next_power_of_2(num_slots), BLOCK_TOKENS=block_tokens, HEAD_DIM=head_dim,
        BLOCK_D=block_d, TILE_TOKENS=max(1, min(triton.next_power_of_2(block_tokens), 8192 // block_d)),
        POOLED=pooled,
    )


@triton.jit
def _plan_in_place_kernel(
    Table, Sel, s_sel_r, s_sel_h, Pages, Pos, Active, SlotPage, Loads, Selected,
    K_new, s_kn_r, s_kn_h, V_new, s_vn_r, s_vn_h, StoreK, StoreV, s_gp, s_gh, s_gt, s_gd,
    H, K, NB, scratch,
    DENSE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # `_plan_diff`, as `_plan_step_kernel` runs it (so both give the same slot table), then the store page
    # of each slot instead of a copy list, and the token into its block's page.
    pid = tl.program_id(0)
    r = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    pos = tl.load(Pos + r).to(tl.int64)
    own = pos // BLOCK_TOKENS
    offset = pos % BLOCK_TOKENS
    offs = tl.arange(0, BLOCK_K)
    inside = offs < K
    _, _, _, new_table, num_selected = _plan_diff(Table, Sel, s_sel_r, s_sel_h, pid, r, h, own, offs, inside, K, DENSE)
    tl.store(Table + pid * K + offs, new_table, mask=inside)
    page = tl.load(Pages + r * NB + tl.minimum(tl.maximum(new_table, 0), NB - 1), mask=inside & (new_table >= 0), other=-1)
    tl.store(SlotPage + pid * K + offs, tl.where(new_table >= 0, page, -1), mask=inside)
    tl.store(Loads + pid, 0)
    if tl.load(Active + r) != 0:
        tl.store(Selected + pid, tl.load(Selected + pid) + num_selected.to(tl.int64))
    own_page = tl.load(Pages + r * NB + tl.minimum(own, NB - 1)).to(tl.int64)
    own_page = tl.where(own_page >= 0, own_page, scratch)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    k = tl.load(K_new + r * s_kn_r + h * s_kn_h + d, mask=d_ok, other=0.0)
    v = tl.load(V_new + r * s_vn_r + h * s_vn_h + d, mask=d_ok, other=0.0)
    dst = own_page * s_gp + h * s_gh + offset * s_gt + d * s_gd
    tl.store(StoreK + dst, k.to(StoreK.dtype.element_ty), mask=d_ok)
    tl.store(StoreV + dst, v.to(StoreV.dtype.element_ty), mask=d_ok)


def plan_in_place(slots: LayerSlots, selection, token: StepTokens, host: HostPages, plan: LoadPlan,
                  slot_page: torch.Tensor, scratch_page: int, diff=None) -> None:
    """Same contract as `nosa.ops.block_ops.plan_in_place` (`diff` is not used: the kernel diffs), one
    program per (row, KV head)."""
    table, page_table = slots.table, slots.page_table
    rows, heads, num_slots = table.shape
    if selection is not None and num_slots > MAX_DIFF_SLOTS:
        return block_ops.plan_in_place(slots, selection, token, host, plan, slot_page, scratch_page, diff_slot_tables)
    if rows == 0:
        return
    entries = rows * heads * num_slots
    for name, t, numel, dtype in (("slots.table", table, entries, torch.int32),
                                  ("slots.page_table", page_table, page_table.numel(), torch.int32),
                                  ("slot_page", slot_page, entries, torch.int32),
                                  ("plan.loads", plan.loads, rows * heads, torch.int32),
                                  ("plan.selected", plan.selected, rows * heads, torch.int64)):
        _index_out("plan_in_place", name, t, numel, dtype)
    positions = _index("plan_in_place", "token.positions", token.positions, rows, torch.int64)
    if token.active.dtype != torch.bool or token.active.numel() != rows or not token.active.is_contiguous():
        raise ValueError(f"plan_in_place: token.active must be a contiguous bool tensor of {rows} elements")
    store_k, store_v = host.k, host.v
    if store_k.stride() != store_v.stride():
        raise ValueError("plan_in_place: K and V must share strides")
    k, v = _last_dim_contiguous(token.k), _last_dim_contiguous(token.v)
    dense = selection is None
    sel = table if dense else _last_dim_contiguous(selection.to(torch.int32))
    head_dim = store_k.shape[3]
    _plan_in_place_kernel[(rows * heads,)](
        table, sel, sel.stride(0), sel.stride(1), page_table, positions, token.active.view(torch.uint8),
        slot_page, plan.loads, plan.selected,
        k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        store_k, store_v, store_k.stride(0), store_k.stride(1), store_k.stride(2), store_k.stride(3),
        heads, num_slots, page_table.shape[1], int(scratch_page),
        DENSE=dense, BLOCK_K=triton.next_power_of_2(num_slots), BLOCK_TOKENS=store_k.shape[2], HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _attention_inputs_kernel(
    Table, Pos, Evict, s_ev_r, s_ev_t, s_ev_h, Valid, Bias, s_o_r, s_o_s, s_o_h,
    H, K, T, BLOCK_TOKENS: tl.constexpr, HAS_BIAS: tl.constexpr, TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    r = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * TILE + tl.arange(0, TILE)
    ok = s < K * BLOCK_TOKENS
    block = tl.load(Table + pid * K + s // BLOCK_TOKENS, mask=ok, other=-1).to(tl.int64)
    token = block * BLOCK_TOKENS + s % BLOCK_TOKENS
    valid = (block >= 0) & (token <= tl.load(Pos + r).to(tl.int64))
    out = r * s_o_r + s * s_o_s + h * s_o_h
    tl.store(Valid + out, valid.to(tl.uint8), mask=ok)
    if HAS_BIAS:
        index = tl.minimum(tl.maximum(token, 0), T - 1)
        bias = tl.load(Evict + r * s_ev_r + index * s_ev_t + h * s_ev_h, mask=ok & valid, other=0.0)
        tl.store(Bias + out, bias, mask=ok)


def attention_inputs(table, positions, eviction, valid, bias, block_size: int) -> None:
    """Same contract as `nosa.ops.block_ops.attention_inputs`, programs over (row, KV head) x slot tokens."""
    rows, heads, slots = table.shape
    if rows == 0:
        return
    table = _index("attention_inputs", "table", table, rows * heads * slots)
    positions = _index("attention_inputs", "positions", positions, rows, torch.int64)
    if valid.stride() != (bias.stride() if bias is not None else valid.stride()):
        raise ValueError("attention_inputs: valid and bias must share strides")
    has_bias = bias is not None
    ev = eviction if has_bias else valid.view(torch.uint8)  # unused without bias
    tile = 1024
    grid = (rows * heads, triton.cdiv(slots * block_size, tile))
    _attention_inputs_kernel[grid](
        table, positions, ev, ev.stride(0), ev.stride(1), ev.stride(2), valid.view(torch.uint8),
        bias if has_bias else valid.view(torch.uint8), valid.stride(0), valid.stride(1), valid.stride(2),
        heads, slots, ev.shape[1], BLOCK_TOKENS=block_size, HAS_BIAS=has_bias, TILE=tile,
    )
