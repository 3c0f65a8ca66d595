"""Reference (PyTorch) versions of the bookkeeping and data-movement ops of the NOSI decode step.

`diff_slot_tables` turns the newly selected blocks into slot assignments (resident blocks never move, each
miss takes a freed slot); `gather_blocks` copies KV blocks between the host store and the device slot cache
(host -> device for misses, device -> host for write-back).

The decode step's per-layer bookkeeping is four ops, each one Triton launch on the device (it used to be
~80 small PyTorch kernels per layer, which cost more than the gather itself):
  `stage_window`      store the token's eviction score and key, copy the window ending at it out of the ring
  `commit_window`     write that window's compressed key / agnostic score when the window ends at this token
  `plan_step`         diff the selection against the slot table, list the host->device copies, append the
                      token to its tail block, write a full tail block back to the host, count loads
  `attention_inputs`  the valid mask and eviction bias of every slot token, for `decode_attention`
The Triton kernels in `nosa.ops.kernels.gather` are tested equal to these (same outputs, bit for bit);
`resolve_block_op` picks one per call.
"""

from __future__ import annotations

import torch


def diff_slot_tables(table: torch.Tensor, selected: torch.Tensor):
    """Diff the selection of each (row, KV head) against its slot table.

    table: [N, K] int32, the block held by each slot (-1 empty); selected: [N, K] int32, the newly selected
    blocks (-1 unused; each block at most once).
    Returns (new_table [N, K] int32, miss_block [N, K] int32, miss_slot [N, K] int32):
      - a slot whose block is still selected keeps it (resident blocks never move);
      - every other slot is free; the r-th missed block (in the order of `selected`) takes the r-th free slot
        (ascending slot index);
      - miss_block[n, i] / miss_slot[n, i] name the block selected[n, i] and its slot when it is a miss,
        -1 otherwise.
    """
    table = table.to(torch.int32)
    selected = selected.to(torch.int32)
    num_slots = table.shape[-1]
    equal = (table[:, :, None] == selected[:, None, :]) & (table[:, :, None] >= 0)  # [N, slot, i]
    keep = equal.any(dim=2)  # slot's block still selected
    hit = equal.any(dim=1)  # selected block already resident
    miss = (selected >= 0) & ~hit
    free = ~keep
    miss_rank = torch.cumsum(miss.to(torch.int32), dim=1) - 1
    free_rank = torch.cumsum(free.to(torch.int32), dim=1) - 1
    # match[n, i, j]: miss i goes to free slot j (ranks equal).
    match = miss[:, :, None] & free[:, None, :] & (miss_rank[:, :, None] == free_rank[:, None, :])
    slots = torch.arange(num_slots, device=table.device, dtype=torch.int32)
    miss_slot = torch.where(match, slots[None, None, :], 0).sum(dim=2, dtype=torch.int32)
    assigned = match.any(dim=1)  # [N, slot]
    assigned_block = torch.where(match, selected[:, :, None], 0).sum(dim=1, dtype=torch.int32)
    new_table = torch.where(keep, table, torch.where(assigned, assigned_block, -1)).to(torch.int32)
    minus_one = torch.full_like(selected, -1)
    return new_table, torch.where(miss, selected, minus_one), torch.where(miss, miss_slot, minus_one)


def gather_blocks(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    src_page: torch.Tensor,
    dst_page: torch.Tensor,
    head: torch.Tensor,
) -> None:
    """Copy whole KV blocks of one head each: dst[dst_page[m], head[m]] = src[src_page[m], head[m]].

    src_k, src_v: [P_src, H, bs, D] (any strides: the device slot cache is passed as a transposed view);
    dst_k, dst_v: [P_dst, H, bs, D]; src_page, dst_page, head: [M] int32/int64. Entries with a negative
    src_page or dst_page are skipped (the batch is padded to a fixed size so the step can be graph-captured).
    On CPU this is one indexed copy; the CPU-visible pages may be pinned or not.
    """
    take_idx = torch.nonzero((src_page >= 0) & (dst_page >= 0)).flatten()
    if take_idx.numel() == 0:
        return
    sp = src_page[take_idx].long().to(src_k.device)
    hd = head[take_idx].long()
    dp = dst_page[take_idx].long().to(dst_k.device)
    dst_k[dp, hd.to(dst_k.device)] = src_k[sp, hd.to(src_k.device)].to(dst_k.device)
    dst_v[dp, hd.to(dst_v.device)] = src_v[sp, hd.to(src_v.device)].to(dst_v.device)


def stage_window(k, c, positions, ring, eviction, window_k, window_c) -> None:
    """Store token t = positions[r]'s key in the ring and its eviction score, and copy out the compression
    window ending at t, tokens t-kernel+1 .. t in token order (what `compress_keys` averages).

    k: [R, H, D]; c: [R, H] or None; positions: [R] int64; ring: [R, kernel, H, D] (token s lives at
    s % kernel); eviction: [R, T, H] float32 or None; window_k: [R, kernel, H, D] and window_c:
    [R, kernel, H] float32 (or None), outputs. Before the first window completes the window reads ring
    slots and token 0 that are not (yet) its tokens; `commit_window` then writes nothing.
    """
    rows = torch.arange(ring.shape[0], device=ring.device)
    kernel = ring.shape[1]
    ring[rows, positions % kernel] = k
    tokens = positions[:, None] - kernel + 1 + torch.arange(kernel, device=ring.device)[None]  # [R, kernel]
    window_k.copy_(ring[rows[:, None], torch.remainder(tokens, kernel)])
    if eviction is not None:
        eviction[rows, positions] = c.to(eviction.dtype)
        window_c.copy_(eviction[rows[:, None], tokens.clamp(min=0)])


def commit_window(positions, compressed_new, agnostic_new, compressed, agnostic, agnostic_blocks,
                  kernel: int, stride: int, block_size: int) -> None:
    """Where a compression window ends at token positions[r], store its compressed key [R, 1, H, D] and
    agnostic score [R, 1, H] (or None) at that window's index of compressed [R, Nc, H, D] / agnostic
    [R, Nc, H], and raise the pooled agnostic score agnostic_blocks [R, H, NB] of every block the window
    overlaps to at least it; other rows are left as they are.

    Windows complete in order, so agnostic_blocks stays the max over each block's complete windows: what
    `pool_to_blocks` computes from scratch at this position, exactly (a max rounds nothing)."""
    rows = torch.arange(compressed.shape[0], device=compressed.device)
    done = (positions + 1 >= kernel) & (torch.remainder(positions + 1 - kernel, stride) == 0)
    window = torch.div(positions + 1 - kernel, stride, rounding_mode="floor").clamp(0, compressed.shape[1] - 1)
    compressed[rows, window] = torch.where(done[:, None, None], compressed_new[:, 0], compressed[rows, window])
    if agnostic is not None:
        agnostic[rows, window] = torch.where(done[:, None], agnostic_new[:, 0], agnostic[rows, window])
    if agnostic_blocks is not None:
        # Window w covers tokens [stride*w, stride*w + kernel): blocks stride*w // bs .. (stride*w + kernel - 1) // bs.
        blocks = torch.arange(agnostic_blocks.shape[-1], device=compressed.device)
        start = window * stride
        overlap = done[:, None] & (blocks[None] >= start[:, None] // block_size) & (blocks[None] <= (start[:, None] + kernel - 1) // block_size)
        raised = torch.maximum(agnostic_blocks, agnostic_new[:, 0, :, None])
        agnostic_blocks.copy_(torch.where(overlap[:, None, :], raised, agnostic_blocks))


def all_visible(positions, slots: int, heads: int, block_size: int) -> torch.Tensor:
    """Dense mode's selection: every block up to the query's own, [R, H, slots] int32 ascending, -1 padded."""
    blocks = torch.arange(slots, device=positions.device, dtype=torch.int32)
    own = torch.div(positions, block_size, rounding_mode="floor")
    chosen = torch.where(blocks[None] <= own[:, None], blocks[None], -1)
    return chosen[:, None].expand(-1, heads, -1).contiguous()


def plan_step(table, selection, page_table, positions, active, k, v, slot_k, slot_v, store_k, store_v,
              src_page, dst_page, loads, loaded, selected) -> None:
    """The decode step's slot bookkeeping for one layer, all rows.

    table: [R, H, K] int32 slot tables, updated in place (resident blocks never move, each miss takes a
    freed slot: `diff_slot_tables`); selection: [R, H, K] int32 (-1 padded), or None for dense mode (every
    visible block, `all_visible`); page_table: [R, NB] int32; positions: [R] int64; active: [R] bool;
    k, v: [R, H, D], the token's key and value; slot_k, slot_v: [R*K, bs, H, D], the layer's slot cache;
    store_k, store_v: [P, H, bs, D], the layer's host pages.
    Outputs: src_page, dst_page: [R*H*K] int32, entry (r, h, i) names the host page and the slot page
    (r*K + slot) of the i-th selected block of (r, h) when it must be loaded, -1 otherwise (the gather's
    input, head h); loads: [R, H] int32, blocks to load; loaded, selected: [R, H] int64 counters, += loads
    and the number of selected blocks where active.
    A new tail block (position at a block start) has nothing on the host yet: it gets a slot, no load. The
    token is appended to its (resident) tail block; a tail block that it fills is written back to its host
    page and stays resident.
    """
    R, H, K = table.shape
    bs = slot_k.shape[1]
    if selection is None:
        selection = all_visible(positions, K, H, bs)
    flat = selection.reshape(R * H, K).to(torch.int32)
    new_table, miss_block, miss_slot = diff_slot_tables(table.reshape(R * H, K), flat)
    table.copy_(new_table.view(R, H, K))
    miss_block, miss_slot = miss_block.view(R, H, K), miss_slot.view(R, H, K)
    rows = torch.arange(R, device=table.device)
    own = torch.div(positions, bs, rounding_mode="floor")
    offset = torch.remainder(positions, bs)
    fresh = (offset == 0)[:, None, None] & (miss_block == own[:, None, None])
    want = (miss_block >= 0) & ~fresh
    page = torch.gather(page_table, 1, miss_block.clamp(0, page_table.shape[1] - 1).view(R, H * K).long()).view(R, H, K)
    src = torch.where(want, page, -1)
    dst = torch.where(src >= 0, rows[:, None, None] * K + miss_slot, -1)
    src_page.copy_(src.reshape(-1))
    dst_page.copy_(dst.reshape(-1))
    count = (src >= 0).sum(-1)
    loads.copy_(count)
    loaded += count * active[:, None]
    selected += (selection >= 0).sum(-1) * active[:, None]
    # Append to the tail block (the block of the token's own position, always selected, so resident).
    own_slot = torch.argmax((table == own[:, None, None].to(torch.int32)).to(torch.int32), dim=-1)  # [R, H]
    heads = torch.arange(H, device=table.device)[None].expand(R, H)
    page_of_slot = rows[:, None] * K + own_slot
    at = offset[:, None].expand(R, H)
    slot_k[page_of_slot, at, heads] = k
    slot_v[page_of_slot, at, heads] = v
    own_page = page_table[rows, own.clamp(max=page_table.shape[1] - 1)]  # [R]
    full = ((offset == bs - 1) & (own_page >= 0))[:, None].expand(R, H)
    # Write-back as masked gather entries (no host sync, so a CUDA caller can still be graph-captured).
    src = torch.where(full, page_of_slot, -1).reshape(-1).to(torch.int32)
    dst = torch.where(full, own_page[:, None].expand(R, H), -1).reshape(-1).to(torch.int32)
    gather = resolve_block_op("gather_blocks", slot_k, store_k)
    gather(slot_k.transpose(1, 2), slot_v.transpose(1, 2), store_k, store_v, src, dst, heads.reshape(-1).to(torch.int32))


def attention_inputs(table, positions, eviction, valid, bias, block_size: int) -> None:
    """valid [R, K*bs, H] bool: slot token s of head h belongs to a selected block at a position <= the
    query's; bias [R, K*bs, H] float32 (or None): its eviction score c, 0 where not valid.
    table: [R, H, K]; positions: [R] int64; eviction: [R, T, H] float32 or None."""
    R, H, K = table.shape
    blocks = table.long()
    token = blocks[..., None] * block_size + torch.arange(block_size, device=table.device)  # [R, H, K, bs]
    ok = (blocks[..., None] >= 0) & (token <= positions[:, None, None, None])
    valid.copy_(ok.reshape(R, H, K * block_size).transpose(1, 2))
    if bias is not None:
        index = token.clamp(0, eviction.shape[1] - 1).reshape(R, H, K * block_size).transpose(1, 2)
        bias.copy_(torch.where(valid, torch.gather(eviction, 1, index), 0.0))


# None: follow `nosa.ops.use_backend`. Tests set "reference" or "triton" to pin these two ops alone (e.g.
# the Triton gather under the reference attention ops).
BACKEND: str | None = None


def resolve_block_op(name: str, *tensors):
    """The implementation of `name` (a public op of this module) for these tensors.

    'reference' forces this module, 'triton' the kernel, 'auto' the kernel when any tensor is on CUDA (a
    pinned host tensor counts as host: the kernel reads it through UVA).
    """
    from nosa import ops

    backend = BACKEND or ops.current_backend()
    on_cuda = any(getattr(t, "is_cuda", False) for t in tensors)
    if backend == "reference" or (backend == "auto" and not on_cuda):
        return globals()[name]
    from nosa.ops.kernels import gather as kernels

    if name == "diff_slot_tables" and tensors and tensors[0].shape[-1] > kernels.MAX_DIFF_SLOTS:
        # The kernel holds a K x K comparison in registers; very wide tables (dense mode at long context)
        # use the reference, which runs on the device as well.
        return diff_slot_tables
    return getattr(kernels, name)
