"""Reference (PyTorch) versions of the two data-movement ops of the NOSI decode step.

`diff_slot_tables` turns the newly selected blocks into slot assignments (resident blocks never move, each
miss takes a freed slot); `gather_blocks` copies KV blocks between the host store and the device slot cache
(host -> device for misses, device -> host for write-back). The Triton kernels in
`nosa.ops.kernels.gather` are tested equal to these; `resolve_block_op` picks one per call.
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


# None: follow `nosa.ops.use_backend`. Tests set "reference" or "triton" to pin these two ops alone (e.g.
# the Triton gather under the reference attention ops).
BACKEND: str | None = None


def resolve_block_op(name: str, *tensors):
    """The implementation of `name` ('diff_slot_tables' or 'gather_blocks') for these tensors.

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
