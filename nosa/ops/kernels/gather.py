"""Triton kernels of the NOSI decode step's data movement (spec sec. 6), beside their references in
`nosa.engine.block_ops`:

- `gather_blocks`: one launch copies every missed (block, KV head) of a layer for the whole batch. The
  source may be a pinned host tensor: the kernel reads it directly through unified virtual addressing, so
  there is no staging copy and no per-block memcpy call. The same kernel writes full tail blocks back to
  the host store (device -> host).
- `diff_slot_tables`: the slot-table diff on the device, one program per (row, KV head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The diff holds a K x K comparison per program; wider tables fall back to the (on-device) reference.
MAX_DIFF_SLOTS = 128


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
    """Same contract as `nosa.engine.block_ops.gather_blocks` (shapes [P, H, bs, D], any strides; entries
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
def _diff_kernel(table_ptr, sel_ptr, out_table_ptr, miss_block_ptr, miss_slot_ptr, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    inside = offs < K
    table = tl.load(table_ptr + row * K + offs, mask=inside, other=-1)
    sel = tl.load(sel_ptr + row * K + offs, mask=inside, other=-1)
    equal = (table[:, None] == sel[None, :]) & (table[:, None] >= 0)  # [slot j, selected i]
    keep = tl.max(equal.to(tl.int32), axis=1) > 0
    hit = tl.max(equal.to(tl.int32), axis=0) > 0
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
    tl.store(out_table_ptr + row * K + offs, new_table, mask=inside)
    tl.store(miss_block_ptr + row * K + offs, tl.where(miss, sel, -1), mask=inside)
    tl.store(miss_slot_ptr + row * K + offs, tl.where(miss, slot_of_miss, -1), mask=inside)


def diff_slot_tables(table: torch.Tensor, selected: torch.Tensor):
    """Same contract as `nosa.engine.block_ops.diff_slot_tables`: table, selected [N, K] int32 ->
    (new_table, miss_block, miss_slot), each [N, K] int32."""
    num_rows, num_slots = table.shape
    if num_slots > MAX_DIFF_SLOTS:
        raise ValueError(f"diff_slot_tables kernel handles at most {MAX_DIFF_SLOTS} slots, got {num_slots}")
    table = table.to(torch.int32).contiguous()
    selected = selected.to(torch.int32).contiguous()
    new_table = torch.empty_like(table)
    miss_block = torch.empty_like(table)
    miss_slot = torch.empty_like(table)
    if num_rows:
        _diff_kernel[(num_rows,)](table, selected, new_table, miss_block, miss_slot, num_slots,
                                  BLOCK_K=triton.next_power_of_2(num_slots))
    return new_table, miss_block, miss_slot
