"""The engine's attention backends: what the model's own `NosaAttention` layers call (through
`nosa.layers.AttentionBackend`) when the engine runs them, so only the offloading-specific part lives here.

`PrefillAttention`: chunks of several prompts in one packed forward; each chunk's queries attend to every key
of its prompt so far (`ops.nosa_attention`), keys and eviction scores are kept for the install into the host
store and the row.
`DecodeAttention`: one new token for every row over the block cache (spec sec. 6). Per layer:
  1. `stage_window`: c is stored, the key goes into the ring, the window ending at the token is copied out;
     `compress_keys` / `agnostic_chunk_scores` average it (the same op as prefill, so it rounds the same),
     `commit_window` stores it where a window completes, so this very token can select it;
  2. `ops.select_rows`: the selection of every row, from the cached compressed keys and pooled scores
     (replaced, for the rows it names, by a selection source's blocks: `engine/selection_source.py`);
  3. `spill_step` (with a device cache beyond the selection; two Triton launches on CUDA, one where the
     cache is pooled and blocks move by page-map swaps) then `plan_step`: the slot-table diff, the
     host->device copies to make, the token appended to its block;
  4. `gather_blocks`: one launch for every miss of the batch (Triton reading pinned host memory on CUDA);
  5. `attention_inputs` and `decode_attention` over the row's slots (pooled: through each slot's page; with
     FUSE_GATHER, step 4 happens inside it: the attention reads each miss from its host page and writes it
     into the slot).
With offload off the store is on the device and holds the only copy (`BlockCache.in_place`): step 3 is
`plan_in_place` (the same slot table, the store page of each slot, the token written into its page), step
4 is skipped, and `decode_attention` reads the pages in place through that block table.
Every tensor it touches is a static buffer of the runner or the cache, and nothing syncs with the host,
so `cuda_graph.py` can capture the whole step.
"""

from __future__ import annotations

import torch

from nosa import ops
from nosa.layers import AttentionBackend

# Offload on: load the step's misses inside decode attention (`decode_attention(..., slot_src=...)`) instead
# of a gather launched before it, so the PCIe reads overlap the attention's HBM reads. Same values, same
# order: the tokens are the gather path's bit for bit (tests/engine; on an H100 too, fp32 and bf16, with and
# without the device cache, 2026-12-07). On by default since it was faster wherever measured (H100, 64K,
# budget-set batch: 1.19x the tokens/s with traces, 1.08x with the random weights' selections,
# bench/results/decode_64k_budget_batch_h100*.json). Read when a step begins, so a captured graph keeps its choice.
FUSE_GATHER = True


class PrefillAttention(AttentionBackend):
    """Attention of one packed prefill forward: the chunks of several prompts side by side as one row of N
    tokens (`PrefillChunk`s, in order), so the projections and the MLP run once for all of them. Chunk i's
    queries attend to every key of its own prompt so far (`ops.nosa_attention` with Tq < Tk, so no T x T
    score matrix exists); its keys, values and eviction scores go into its prompt's workspace
    (`PrefillState`), and the chunk that ends the prompt leaves the last token's selection [H, K] per layer
    in `state.last_selection` (sparse modes), which the install loads."""

    def __init__(self, cfg, chunks):
        self.cfg, self.chunks = cfg, chunks

    def attend(self, layer_idx, q, k, v, eviction):
        l, out, offset = layer_idx, torch.empty_like(q), 0
        for chunk in self.chunks:
            state, start, end = chunk.state, chunk.start, chunk.end
            packed = slice(offset, offset + end - start)
            offset = packed.stop
            state.keys[l, :, start:end], state.values[l, :, start:end] = k[:, packed], v[:, packed]
            c = None
            if state.evictions is not None:
                state.evictions[l, :, start:end] = eviction[:, packed]
                c = state.evictions[l, :, :end]
            result, indices = ops.nosa_attention(q[:, packed], state.keys[l, :, :end], state.values[l, :, :end], c,
                                                 self.cfg, return_indices=True)
            out[:, packed] = result
            if end == state.length and indices is not None:
                state.last_selection[l] = indices[0, -1]
        return out


class DecodeAttention(AttentionBackend):
    """The decode step's attention over the runner's block cache; `begin` sets the step's rows."""

    def __init__(self, runner):
        self.runner = runner
        self.positions = self.active = None
        # A CUDA event recorded on the current stream before layer 0's attention (micro-batches: the next one
        # starts there, `ModelRunner.set_micro_batches`), or None.
        self.attention_started = None

    def begin(self, positions: torch.Tensor, active: torch.Tensor) -> None:
        """positions: [R] int64 (tokens already cached); active: [R] bool. The implementations are
        resolved once per step, not per layer."""
        runner = self.runner
        self.positions, self.active = positions, active
        slots, host = runner.layer_slots[0], runner.layer_hosts[0]
        # Resolved on the slot table, a device tensor in both paths (the one-copy path has no slots).
        self.stage = ops.resolve("stage_window", slots.table)
        self.commit = ops.resolve("commit_window", slots.table)
        self.in_place = runner.cache.in_place
        self.plan = ops.resolve("plan_in_place" if self.in_place else "plan_step", slots.table)
        self.gather = ops.resolve("gather_blocks", slots.table, host.k)
        self.inputs = ops.resolve("attention_inputs", slots.table)
        self.spill = ops.resolve("spill_step", slots.table)
        # On CUDA only the kernel loads misses inside the attention: the reference's loading path finds them
        # with a nonzero (a host sync), which a CUDA graph cannot capture, so with reference attention on
        # CUDA (tests, debugging) the gather loads them, as with FUSE_GATHER off; same values either way.
        kernel_attends = (slots.table.device.type != "cuda"
                          or ops.resolve("decode_attention", slots.table) is not ops.reference.decode_attention)
        self.fuse_gather = FUSE_GATHER and not self.in_place and kernel_attends
        # A device-side selection source: every layer's selection of each row at its position, one gather
        # per step ([R, L, H, K]; rows that do not replay read a clamped, unused entry).
        self.source_rows = None
        if runner.source_table is not None:
            index = (runner.source_base + positions).clamp_(0, runner.source_table.shape[0] - 1)
            self.source_rows = runner.source_table[index]

    def attend(self, layer_idx, q, k, v, eviction):
        runner, l, positions = self.runner, layer_idx, self.positions
        cache, cfg = runner.cache, runner.cfg
        state = cache.eviction[l] if cache.eviction is not None else None
        selection = None  # dense mode: the plan selects every visible block
        if cfg.is_sparse:
            self.stage(k[:, 0], None if eviction is None else eviction[:, 0], positions, cache.recent_keys[l], state,
                       runner.window_k, runner.window_c)
            compressed = ops.compress_keys(runner.window_k, cfg.compress_kernel, cfg.compress_stride)
            agnostic = None
            if state is not None:
                agnostic = ops.agnostic_chunk_scores(runner.window_c, cfg.compress_kernel, cfg.compress_stride)
            self.commit(positions, compressed, agnostic, cache.compressed[l],
                        cache.agnostic[l] if cache.agnostic is not None else None,
                        cache.agnostic_blocks[l] if cache.agnostic_blocks is not None else None,
                        cfg.compress_kernel, cfg.compress_stride, cache.block_size)
            agnostic_blocks = cache.agnostic_blocks[l] if cache.agnostic_blocks is not None else None
            selection = ops.select_rows(q[:, 0], cache.compressed[l], agnostic_blocks, positions, cache.max_blocks, cfg)
            chosen = None
            if self.source_rows is not None:
                chosen = self.source_rows[:, l]
            elif runner.source_selection is not None:
                chosen = runner.source_selection[l]
            if chosen is not None:
                # A selection source (trace replay) overrides the scores' choice after they were computed,
                # so the step still pays for the selection; everything below runs as usual.
                selection = torch.where(runner.replace_selection[:, None, None], chosen, selection)
            if runner.record_selections:
                runner.step_selections[l].copy_(selection)
        slots, host, plan = runner.layer_slots[l], runner.layer_hosts[l], runner.load_plans[l]
        spill = runner.layer_spills[l]
        if spill is not None:
            # The device cache beyond the selection: spilled misses come back by a device copy, blocks
            # leaving the selection are kept; what is still missing, `plan` loads from the host.
            self.spill(slots, selection, positions, self.active, spill, gather=self.gather)
        token = ops.StepTokens(positions, self.active, k[:, 0], v[:, 0])
        if self.in_place:
            # One copy (offload off): the store is on the device; attention reads the selected pages in
            # place through cache.slot_page, and the token went straight into its page.
            self.plan(slots, selection, token, host, plan, cache.slot_page, runner.store.scratch_page)
            self.inputs(slots.table, positions, state, runner.valid, runner.bias, cache.block_size)
            self._mark_start(l)
            out = ops.decode_attention(q[:, 0], host.k, host.v, runner.bias, runner.valid, cache.slot_page)
            return out[:, None]
        self.plan(slots, selection, token, host, plan)
        loads = {}
        if self.fuse_gather:
            # The attention loads the misses itself (plan.slot_src), overlapping PCIe with its HBM reads.
            loads = {"host_k": host.k, "host_v": host.v, "slot_src": plan.slot_src}
        else:
            # One launch for every miss of the batch, before the attention that reads them: what it loads is
            # known only once this layer's query has selected.
            self.gather(host.k, host.v, cache.slot_pages(l, "k"), cache.slot_pages(l, "v"), plan.src_page, plan.dst_page, plan.head)
        self.inputs(slots.table, positions, state, runner.valid, runner.bias, cache.block_size)
        self._mark_start(l)
        # Pooled: the selection slots' pages are scattered over the row's pool, read (and loaded) through the
        # page of each slot that `plan` wrote; otherwise the slots are rows.
        view = cache.slot_pages if cache.pooled else cache.row_view
        out = ops.decode_attention(q[:, 0], view(l, "k"), view(l, "v"), runner.bias, runner.valid, plan.slot_page, **loads)
        return out[:, None]

    def _mark_start(self, layer_idx: int) -> None:
        if layer_idx == 0 and self.attention_started is not None:
            self.attention_started.record()
