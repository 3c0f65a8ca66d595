"""Reference (PyTorch) versions of the block-cache ops of the NOSI decode step (spec sec. 6), beside their
Triton kernels in `nosa.ops.kernels.gather` and dispatched like every op (`nosa.ops.<name>`).

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
With a device cache beyond the selection, `spill_step` runs before `plan_step` (its kernel: two launches,
`nosa.ops.kernels.spill`). The Triton kernels in `nosa.ops.kernels.gather` / `.spill` are tested equal to
these (same outputs, bit for bit).
`plan_step`'s tensors travel in four named groups (`LayerSlots`, `StepTokens`, `HostPages`, `LoadPlan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DISPATCHED = ("diff_slot_tables", "gather_blocks", "stage_window", "commit_window", "plan_step", "plan_in_place",
              "attention_inputs", "spill_step")


@dataclass(frozen=True)
class LayerSlots:
    """One layer's device slot cache of every row. table: [R, H, K] int32 (block per slot, -1 empty);
    k, v: [R*K, bs, H, D] (slot page r*K + j of row r); page_table: [R, NB] int32 host page per block.

    Pooled (pool_map given, a device cache beyond the selection with offload on): k, v are the row's C = K + E
    pages [R*C, bs, H, D] shared by its selection slots and spill slots, and pool_map [R, H, C] int32 (a
    permutation of 0..C-1 per (row, head)) names the page of each: selection slot j of (r, h) lives in page
    r*C + pool_map[r, h, j], spill slot e in page r*C + pool_map[r, h, K + e], head h. A block that moves
    between the selection and the spill slots then moves by a swap of two entries, not a copy of its K/V
    (`spill_step`), and attention reads the selection through the pages (`LoadPlan.slot_page`)."""

    table: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    page_table: torch.Tensor
    pool_map: torch.Tensor | None = None


def slot_page_index(slots: LayerSlots, slot: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The page of k / v that selection slot `slot` [n, H, m] (values in 0..K-1) of each (row, head) lives in:
    r*K + slot, or pooled r*C + pool_map[r, h, slot], for the rows `rows` [n] (None: every row, n = R). int64,
    `slot`'s shape."""
    R, H, K = slots.table.shape
    rows = torch.arange(R, device=slot.device) if rows is None else rows
    if slots.pool_map is None:
        return rows[:, None, None] * K + slot.long()
    C = slots.pool_map.shape[-1]
    return rows[:, None, None] * C + torch.gather(slots.pool_map[rows], 2, slot.long()).long()


@dataclass(frozen=True)
class HostPages:
    """One layer's host store: k, v [P, H, bs, D] (pinned host memory, or the device with offload off)."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True)
class StepTokens:
    """The decode step's token of every row at one layer. positions: [R] int64 (tokens already cached);
    active: [R] bool (counted in statistics); k, v: [R, H, D], the token's key and value."""

    positions: torch.Tensor
    active: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True)
class LoadPlan:
    """What `plan_step` decides, in static buffers. src_page, dst_page: [R*H*K] int32, the gather's
    entries; head: [R*H*K] int32, the KV head of each entry (fixed); loads: [R, H] int32, blocks to load
    this step; loaded, selected: [R, H] int64 running counters over active rows; slot_src: [R, H, K] int32,
    the same loads by destination: the host page slot j of (r, h) is loaded from this step, -1 where it
    loads nothing (what `decode_attention` takes to load the misses itself instead of a gather); slot_page
    (pooled slots only, else None): [R, H, K] int32, the page of each selection slot (`slot_page_index`),
    the block table `decode_attention` reads the pooled pages through."""

    src_page: torch.Tensor
    dst_page: torch.Tensor
    head: torch.Tensor
    loads: torch.Tensor
    loaded: torch.Tensor
    selected: torch.Tensor
    slot_src: torch.Tensor
    slot_page: torch.Tensor | None = None

    @classmethod
    def allocate(cls, rows: int, heads: int, slots: int, device, pooled: bool = False) -> "LoadPlan":
        entries = rows * heads * slots
        head = torch.arange(heads, dtype=torch.int32, device=device)[None, :, None].expand(rows, heads, slots)
        return cls(torch.full((entries,), -1, dtype=torch.int32, device=device),
                   torch.full((entries,), -1, dtype=torch.int32, device=device),
                   head.reshape(-1).contiguous(),  # contiguous: an expanded view has stride 0 at one head
                   torch.zeros((rows, heads), dtype=torch.int32, device=device),
                   torch.zeros((rows, heads), dtype=torch.int64, device=device),
                   torch.zeros((rows, heads), dtype=torch.int64, device=device),
                   torch.full((rows, heads, slots), -1, dtype=torch.int32, device=device),
                   torch.zeros((rows, heads, slots), dtype=torch.int32, device=device) if pooled else None)


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


def plan_step(slots: LayerSlots, selection, token: StepTokens, host: HostPages, plan: LoadPlan, gather=None) -> None:
    """The decode step's slot bookkeeping for one layer, all rows.

    slots.table is updated in place (resident blocks never move, each miss takes a freed slot:
    `diff_slot_tables`); selection: [R, H, K] int32 (-1 padded), or None for dense mode (every visible
    block, `all_visible`).
    Outputs in `plan`: entry (r, h, i) of src_page / dst_page names the host page and the slot page
    (`slot_page_index`: r*K + slot, pooled r*C + pool_map[r, h, slot]) of the i-th selected block of (r, h)
    when it must be loaded, -1 otherwise (the gather's input, head h); pooled, slot_page; loads: blocks to load per (row, head); loaded, selected += loads and the number of
    selected blocks where token.active.
    A new tail block (position at a block start) has nothing on the host yet: it gets a slot, no load. The
    token is appended to its (resident) tail block; a tail block that it fills is written back to its host
    page and stays resident. gather: the `gather_blocks` implementation of that write-back (default this
    module's; the kernel wrapper, falling back here for very wide tables, passes its own so a CUDA step
    stays free of host syncs).
    """
    table, page_table, positions, active = slots.table, slots.page_table, token.positions, token.active
    R, H, K = table.shape
    bs = slots.k.shape[1]
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
    dst = torch.where(src >= 0, slot_page_index(slots, miss_slot.clamp(min=0)), -1)
    plan.src_page.copy_(src.reshape(-1))
    plan.dst_page.copy_(dst.reshape(-1))
    # By destination slot: each slot receives at most one load, so the largest of its entries (-1 for none).
    by_slot = torch.full_like(plan.slot_src, -1)
    plan.slot_src.copy_(by_slot.scatter_reduce_(2, miss_slot.clamp(min=0).long(), src.to(by_slot.dtype), reduce="amax"))
    count = (src >= 0).sum(-1)
    plan.loads.copy_(count)
    plan.loaded.add_(count * active[:, None])
    plan.selected.add_((selection >= 0).sum(-1) * active[:, None])
    # Append to the tail block (the block of the token's own position, always selected, so resident).
    own_slot = torch.argmax((table == own[:, None, None].to(torch.int32)).to(torch.int32), dim=-1)  # [R, H]
    heads = torch.arange(H, device=table.device)[None].expand(R, H)
    page_of_slot = slot_page_index(slots, own_slot[:, :, None])[:, :, 0]
    if slots.pool_map is not None:
        plan.slot_page.copy_(slot_page_index(slots, torch.arange(K, device=table.device).expand(R, H, K)))
    at = offset[:, None].expand(R, H)
    slots.k[page_of_slot, at, heads] = token.k
    slots.v[page_of_slot, at, heads] = token.v
    own_page = page_table[rows, own.clamp(max=page_table.shape[1] - 1)]  # [R]
    full = ((offset == bs - 1) & (own_page >= 0))[:, None].expand(R, H)
    # Write-back as masked gather entries (no host sync, so a CUDA caller can still be graph-captured).
    src = torch.where(full, page_of_slot, -1).reshape(-1).to(torch.int32)
    dst = torch.where(full, own_page[:, None].expand(R, H), -1).reshape(-1).to(torch.int32)
    gather = gather_blocks if gather is None else gather
    gather(slots.k.transpose(1, 2), slots.v.transpose(1, 2), host.k, host.v, src, dst, heads.reshape(-1).to(torch.int32).contiguous())


def slot_table(table: torch.Tensor, selection: torch.Tensor | None, positions: torch.Tensor, block_size: int,
               diff=None) -> torch.Tensor:
    """The slot table after a selection, as `plan_step` leaves it: table [N, H, K] int32 and selection
    [N, H, K] (None: dense mode). Dense mode needs no diff: every visible block is selected, a new block is
    always the first free slot, so slot j holds block j (`all_visible`), and the K x K diff of a dense
    table (K = every block of the context) is never built. diff: the `diff_slot_tables` implementation
    (default this module's; a CUDA caller passes the kernel, one launch)."""
    N, H, K = table.shape
    if selection is None:
        return all_visible(positions, K, H, block_size)
    diff = diff_slot_tables if diff is None else diff
    new_table, _, _ = diff(table.reshape(N * H, K).contiguous(), selection.reshape(N * H, K).to(torch.int32).contiguous())
    return new_table.view(N, H, K)


def plan_in_place(slots: LayerSlots, selection, token: StepTokens, host: HostPages, plan: LoadPlan,
                  slot_page: torch.Tensor, scratch_page: int, diff=None) -> None:
    """`plan_step` of the one-copy path (offload off): the store is on the device, so nothing is copied.

    slots.table is updated as `plan_step` updates it (the same slots, so attention reads the blocks in the
    same order and the result equals offload on bit for bit); slot_page [R, H, K] int32 gets the store page
    of each slot's block (-1: none), what `decode_attention` reads through; the token is written straight
    into its block's page (rows without a page write into `scratch_page`, a store page no table names, so
    the padded step needs no mask and no host sync). loads are 0 (nothing moves); selected is counted as
    in `plan_step`. slots.k / slots.v are not used (None). No host sync (graph-capturable); diff: as in
    `slot_table` (the Triton kernel, one launch, diffs itself)."""
    table, page_table, positions, active = slots.table, slots.page_table, token.positions, token.active
    R, H, K = table.shape
    bs = host.k.shape[2]
    new_table = slot_table(table, selection, positions, bs, diff)
    table.copy_(new_table)
    rows = torch.arange(R, device=table.device)
    page = torch.gather(page_table, 1, new_table.clamp(0, page_table.shape[1] - 1).view(R, H * K).long()).view(R, H, K)
    slot_page.copy_(torch.where(new_table >= 0, page, -1))
    plan.loads.zero_()
    plan.selected.add_(((new_table if selection is None else selection) >= 0).sum(-1) * active[:, None])
    own = torch.div(positions, bs, rounding_mode="floor")
    own_page = page_table[rows, own.clamp(max=page_table.shape[1] - 1)].long()  # [R]
    own_page = torch.where(own_page >= 0, own_page, scratch_page)[:, None].expand(R, H)
    heads = torch.arange(H, device=table.device)[None].expand(R, H)
    at = torch.remainder(positions, bs)[:, None].expand(R, H)
    host.k[own_page, heads, at] = token.k.to(host.k.dtype)
    host.v[own_page, heads, at] = token.v.to(host.v.dtype)


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


@dataclass(frozen=True)
class SpillSlots:
    """One layer's device cache beyond the selection: E slots per (row, KV head) for blocks that left the
    selection, so a block that comes back within E evictions is copied on the device instead of loaded
    from the host. table: [R, H, E] int32 block per spill slot (-1 empty); stamp: [R, H, E] int32, the
    position at which that block left the selection (its last-selected step + 1); k, v: [R*E, bs, H, D]
    (spill page r*E + e of row r), or None with the one-copy path (offload off: the tables are kept, so
    the slot tables equal offload on's, and nothing is copied); hits: [R, H] int64, blocks served from here
    at decode (active rows)."""

    table: torch.Tensor
    stamp: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    hits: torch.Tensor


def check_pooled_spill(spill: SpillSlots) -> None:
    """Pooled slots keep the spill slots' pages in the pool: separate spill pages would be ignored."""
    if spill.k is not None or spill.v is not None:
        raise ValueError("spill_step: with pooled slots (slots.pool_map) the spill slots live in the pool; "
                         "spill.k and spill.v must be None")


def spill_step(slots: LayerSlots, selection: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
               spill: SpillSlots, gather=None) -> None:
    """Run before `plan_step` (sparse modes, E > 0): serve the selection's misses that the spill slots hold
    and keep the blocks that leave the selection there.

    selection: [R, H, K] int32 (-1 padded); slots.table [R, H, K] as `plan_step` takes it. Per (row, head):
    - a selected block neither resident nor spilled is left to `plan_step` (a host load);
    - a spilled one ("hit") is copied spill -> slot into a slot `plan_step` would free (empty slots first,
      then those of leaving blocks, in slot order) and its spill slot is emptied;
    - every block that leaves the selection this step is copied slot -> spill: into the spill slots this
      step empties or that are empty, then over the least recently selected blocks (smallest stamp, lower
      slot first). A leaving block whose slot receives a hit cannot take a spill slot emptied by a hit (that
      would be a swap, which needs a staging copy): it takes an empty or the oldest other spill slot.
      Leaving blocks that find no spill slot are dropped (they all left at this same step).
    A block is never in a selection slot and a spill slot at once. Copies, in order: leaving blocks whose
    slot receives a hit (slot -> spill, never into a spill slot read this step), hits (spill -> slot), the
    other leaving blocks (slot -> spill; their slots are not written before `plan_step`'s gather). Pooled
    slots (`LayerSlots.pool_map`; spill.k, spill.v None) make the same moves by swapping page entries: no
    K/V is copied. PyTorch ops on the tensors' device, no host sync (graph-capturable); gather: the
    `gather_blocks` for the copies.
    The Triton version (`nosa.ops.kernels.spill`, dispatched as `ops.spill_step` on CUDA) is two launches.
    """
    table, st_table = slots.table, spill.table
    R, H, K = table.shape
    E = st_table.shape[-1]
    N, dev = R * H, table.device
    big = torch.iinfo(torch.int32).max
    # Copies: the tables are written in place below, after these were last read.
    t = table.reshape(N, K).clone()
    s = selection.reshape(N, K).to(torch.int32)
    st = st_table.reshape(N, E).clone()
    e_index = torch.arange(E, device=dev, dtype=torch.int32)
    j_index = torch.arange(K, device=dev, dtype=torch.int32)

    def ranked(order: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        return torch.gather(order, 1, rank.clamp(0, order.shape[1] - 1).long()).to(torch.int32)

    def rank_of(mask: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(mask.to(torch.int32), 1) - 1

    equal = (t[:, :, None] == s[:, None, :]) & (t[:, :, None] >= 0)  # [N, slot, i]
    keep, resident = equal.any(2), equal.any(1)
    miss = (s >= 0) & ~resident
    match = miss[:, :, None] & (s[:, :, None] == st[:, None, :]) & (st[:, None, :] >= 0)  # [N, i, e]
    hit, read = match.any(2), match.any(1)  # [N, i], [N, e]
    src_e = torch.where(match, e_index, 0).sum(2, dtype=torch.int32)  # [N, i]
    free = ~keep
    # Hits take free slots, empty ones first: there are at least as many free slots as misses.
    free_order = torch.argsort(torch.where(free, torch.where(t < 0, j_index, K + j_index), 2 * K + j_index), dim=1, stable=True)
    dst_j = ranked(free_order, rank_of(hit))  # [N, i]
    place = hit[:, :, None] & (dst_j[:, :, None] == j_index)  # [N, i, slot]
    receives = place.any(1)
    leaving = (t >= 0) & free
    first, later = leaving & receives, leaving & ~receives
    # Spill slots not read this step: empty first, then the least recently selected.
    other_order = torch.argsort(torch.where(read, big, torch.where(st >= 0, spill.stamp.reshape(N, E), -1)), dim=1, stable=True)
    others = (~read).sum(1, keepdim=True, dtype=torch.int32)
    read_order = torch.argsort(torch.where(read, e_index, big), dim=1, stable=True)
    reads = read.sum(1, keepdim=True, dtype=torch.int32)
    rank_first = rank_of(first)
    saved_first = first & (rank_first < others)
    used = saved_first.sum(1, keepdim=True, dtype=torch.int32)
    rank_later = rank_of(later)
    into_read = rank_later < reads
    rank_other = used + rank_later - reads
    saved_later = later & (into_read | (rank_other < others))
    target = torch.where(first, ranked(other_order, rank_first),
                         torch.where(into_read, ranked(read_order, rank_later), ranked(other_order, rank_other)))
    row = torch.div(torch.arange(N, device=dev), H, rounding_mode="floor")[:, None]
    head = (torch.arange(N, device=dev, dtype=torch.int32) % H)[:, None].expand(N, K).reshape(-1).contiguous()
    gather = gather_blocks if gather is None else gather

    def entries(mask, src, dst):
        return torch.where(mask, src, -1).reshape(-1).to(torch.int32), torch.where(mask, dst, -1).reshape(-1).to(torch.int32)

    if slots.pool_map is not None:
        check_pooled_spill(spill)
        # Pooled: the same three rounds of moves as swaps of page entries. Each round's moves are disjoint
        # (slots on one side, spill slots on the other), and a moved block's old place is never read again
        # (it is emptied, loaded into or moved into), so a swap does what the copy did for every live block.
        # Column K + E takes the rounds' masked-out entries (never read).
        pages = torch.cat([slots.pool_map.view(N, K + E), torch.zeros((N, 1), dtype=torch.int32, device=dev)], 1)
        j_all = j_index.expand(N, K)

        def swap(mask, slot, spill_slot):
            a = torch.where(mask, slot, K + E).long()
            b = torch.where(mask, K + spill_slot, K + E).long()
            at_a, at_b = torch.gather(pages, 1, a), torch.gather(pages, 1, b)
            pages.scatter_(1, a, at_b)
            pages.scatter_(1, b, at_a)

        swap(saved_first, j_all, target)
        swap(hit, dst_j, src_e)
        swap(saved_later, j_all, target)
        slots.pool_map.view(N, K + E).copy_(pages[:, :K + E])
    elif spill.k is not None:  # None: one copy (offload off), the blocks are read in place
        slot_k, slot_v, spill_k, spill_v = (x.transpose(1, 2) for x in (slots.k, slots.v, spill.k, spill.v))  # [pages, H, bs, D]
        gather(slot_k, slot_v, spill_k, spill_v, *entries(saved_first, row * K + j_index, row * E + target), head)
        gather(spill_k, spill_v, slot_k, slot_v, *entries(hit, row * E + src_e, row * K + dst_j), head)
        gather(slot_k, slot_v, spill_k, spill_v, *entries(saved_later, row * K + j_index, row * E + target), head)
    placed_block = torch.where(place, s[:, :, None], 0).sum(1, dtype=torch.int32)  # [N, slot]
    table.copy_(torch.where(receives, placed_block, t).view(R, H, K))
    inserted = (saved_first | saved_later)[:, :, None] & (target[:, :, None] == e_index)  # [N, slot, e]
    into = inserted.any(1)
    new_st = torch.where(read, -1, st)
    new_st = torch.where(into, torch.where(inserted, t[:, :, None], 0).sum(1, dtype=torch.int32), new_st)
    st_table.copy_(new_st.view(R, H, E))
    spill.stamp.copy_(torch.where(into.view(R, H, E), positions.to(torch.int32)[:, None, None], spill.stamp))
    spill.hits.add_(hit.sum(1).view(R, H) * active[:, None])
