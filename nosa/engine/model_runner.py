"""Runs the model for the engine: packed chunked prefill of several sequences, and the batched decode step over the
block cache (spec sec. 6). The model's own modules run both (`NosaModel.forward_with_attention`); their
attention goes to the engine's backends (`engine/attention.py`), so this file only keeps the offloading
state: the static per-step buffers, the install of a prefilled prompt into the host store and its row,
and the statistics counters.

The decode step has static shapes: it always runs all R rows (a free row has no host pages, so its gathers
and write-backs are skipped) and reads capacity-sized state whose unused part the ops mask by position.
That is what lets `cuda_graph.py` capture it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from nosa import ops
from nosa.engine.attention import DecodeAttention, PrefillAttention
from nosa.engine.block_cache import BlockCache
from nosa.engine.host_store import HostStore
from nosa.engine.row_shards import RowsView, shard_bounds

# Micro-batches size their occupancy-split launches (decode attention's slot chunks, the scores' key chunks)
# for 1/N of the SMs each (`ops.launch_share`), so together they launch what one batch would; False: each
# sizes them for the whole GPU. Measured on an H200 (decode_64k_micro_batches_h200.json): no difference either
# way (1.00x and 0.99x of the unshared split), so off; `nosa bench decode` token `share`. Read by `set_micro_batches`.
SHARE_LAUNCHES = False


@dataclass
class PrefillState:
    """One prompt being prefilled: token_ids [T] on the device; keys, values [L, 1, T, H, D] and evictions
    [L, 1, T, H] f32 (or None) filled chunk by chunk; last_selection[l] the last token's selection [H, K]
    (sparse modes) once the last chunk ran; done: prompt tokens prefilled so far (advanced by the caller
    once a chunk succeeded)."""

    token_ids: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    evictions: torch.Tensor | None
    last_selection: list
    done: int = 0

    @property
    def length(self) -> int:
        return self.token_ids.shape[0]


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions [start, end) of `state`'s prompt, to run in one packed prefill forward."""

    state: PrefillState
    start: int
    end: int


class ModelRunner:
    def __init__(self, model, cache: BlockCache, store: HostStore):
        self.model = model
        self.cfg = model.config.sparse
        self.cache = cache
        self.store = store
        self.device = cache.device
        self.dtype = cache.dtype
        L = len(model.model.layers)
        R, H, K, bs, D = cache.rows, cache.num_kv_heads, cache.slots, cache.block_size, cache.head_dim
        # Static per-step buffers, so the step allocates nothing and a captured graph reads and writes fixed
        # addresses. The gather entries are shared by the layers (stream order separates their uses); the
        # counters are per layer: blocks loaded this step, and, read once at the end (no per-step sync),
        # blocks loaded host->device and selected at decode per (row, head) over active rows (each (row,
        # head) program of the plan kernel owns its counter, so no atomics).
        shared = ops.LoadPlan.allocate(R, H, K, self.device)
        self.step_loads = torch.zeros((L, R, H), dtype=torch.int32, device=self.device)
        self.loaded_rh = torch.zeros((L, R, H), dtype=torch.int64, device=self.device)
        self.selected_rh = torch.zeros((L, R, H), dtype=torch.int64, device=self.device)
        # Pooled device cache: the attention's page per slot is the cache's slot_page (shared by the layers).
        self.load_plans = [ops.LoadPlan(shared.src_page, shared.dst_page, shared.head, self.step_loads[l],
                                        self.loaded_rh[l], self.selected_rh[l], shared.slot_src,
                                        cache.slot_page if cache.pooled else None) for l in range(L)]
        # One copy (offload off): no slots; attention reads the store's pages through cache.slot_page.
        self.layer_slots = [ops.LayerSlots(cache.table[l], None if cache.in_place else cache.slot_k[l],
                                           None if cache.in_place else cache.slot_v[l], cache.page_table,
                                           None if cache.pool_map is None else cache.pool_map[l]) for l in range(L)]
        # Blocks served from the device cache beyond the selection, per (layer, row, head) (active rows).
        self.spill_hits_rh = torch.zeros((L, R, H), dtype=torch.int64, device=self.device)
        self.layer_spills = [cache.layer_spill(l, self.spill_hits_rh[l]) for l in range(L)]
        self._hosts_version, self._hosts = None, None
        self.install_loaded = torch.zeros(L, dtype=torch.int64, device=self.device)  # blocks loaded by prefill installs
        # Spec sec. 5's bound on the loads of one (row, KV head) per decode step: quota, one more on the step
        # that enters a new block (None: infllmv2 and dense have no bound). (row, head) steps above it are
        # counted per layer [L] (active rows; a violation is expected only where has_locality_bound fails).
        self.locality_quota = self.cfg.locality_quota
        self.over_bound = torch.zeros(L, dtype=torch.int64, device=self.device)
        self.valid = torch.zeros((R, K * bs, H), dtype=torch.bool, device=self.device)
        self.bias = torch.zeros((R, K * bs, H), dtype=torch.float32, device=self.device) if cache.eviction is not None else None
        self.window_k = self.window_c = None
        if self.cfg.is_sparse:
            kernel = self.cfg.compress_kernel
            self.window_k = torch.zeros((R, kernel, H, D), dtype=self.dtype, device=self.device)
            if cache.eviction is not None:
                self.window_c = torch.zeros((R, kernel, H), dtype=torch.float32, device=self.device)
        self.decode_attention = DecodeAttention(self)
        self.micro_batches, self.shards, self.shard_streams, self.shard_offset = 1, [], None, None
        self.launch_share = 1.0
        # When a list (tests), every decode step appends (positions [R], loads [L, R, H]); forces eager mode.
        self.load_log: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # When True (sparse modes), every decode step leaves each layer's selection [R, H, K] in
        # `step_selections` (the selection traces of `record_selections`); forces eager mode.
        self.record_selections = False
        self.step_selections = torch.full((L, R, H, K), -1, dtype=torch.int32, device=self.device) if self.cfg.is_sparse else None
        # A selection source's blocks for the step (`EngineCore.set_selection_source`; None: no source)
        # replace the scores' choice where replace_selection [R] is set. From the host: source_selection
        # [L, R, H, topk], filled before each step. On the device (`SelectionSource.on_device`): row r's
        # selection is source_table[source_base[r] + position of r] (source_table [N, L, H, topk], set when
        # the source changes; source_base [R] int64, written when the rows change), picked inside the step.
        # Static buffers, so a captured graph reads this step's values.
        self.source_selection = self.replace_selection = self.source_base = self.source_table = None
        # The step's inputs (tokens, positions [2, R] int64; active [R] bool): static, written from the host
        # lists by `stage_inputs` through pinned buffers without a sync, read by the eager step and the graphs.
        self.step_inputs = torch.zeros((2, R), dtype=torch.long, device=self.device)
        self.step_active = torch.zeros(R, dtype=torch.bool, device=self.device)
        self._pinned = None
        if self.device.type == "cuda":
            self._pinned = (torch.zeros((2, R), dtype=torch.long, pin_memory=True),
                            torch.zeros(R, dtype=torch.bool, pin_memory=True), torch.cuda.Event())

    def set_micro_batches(self, count: int) -> None:
        """Run the decode step as `count` micro-batches of contiguous rows (`row_shards.py`), each through the
        whole model: on CUDA each on its own stream, the second starting once the first's layer 0 reaches its
        attention, so one's loading attention runs beside the other's matmuls and selection; elsewhere one
        after the other (same values, which is what the CPU tests check). 1: the whole batch at once. Set
        before the first step: a captured graph keeps the split it was captured with. With SHARE_LAUNCHES each
        micro-batch sizes its occupancy-split launches for 1/count of the SMs."""
        bounds = shard_bounds(self.cache.rows, count)
        self.micro_batches = count
        self.launch_share = 1.0 / count if SHARE_LAUNCHES and count > 1 else 1.0
        self.shards = [] if count == 1 else [(start, stop, DecodeAttention(RowsView(self, start, stop))) for start, stop in bounds]
        cuda = self.device.type == "cuda" and count > 1
        self.shard_streams = [torch.cuda.Stream(self.device) for _ in self.shards] if cuda else None
        # Recorded by micro-batch i before its layer 0's attention; micro-batch i + 1 starts after it.
        self.shard_offset = [torch.cuda.Event() for _ in self.shards[:-1]] if cuda else None
        for i, (_, _, attention) in enumerate(self.shards):
            attention.attention_started = self.shard_offset[i] if cuda and i < count - 1 else None

    def stage_inputs(self, tokens: list[int], positions: list[int], active: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write a step's inputs (R each) into the static buffers; returns (tokens [R], positions [R] int64,
        active [R] bool) on the device. On CUDA the copies go through pinned buffers and do not wait for the
        device (the pinned buffers are rewritten only once the previous step's copies have run)."""
        if self._pinned is None:
            self.step_inputs.copy_(torch.tensor([tokens, positions], dtype=torch.long))
            self.step_active.copy_(torch.tensor(active, dtype=torch.bool))
        else:
            host_inputs, host_active, copied = self._pinned
            copied.synchronize()
            host_inputs.numpy()[:] = (tokens, positions)
            host_active.numpy()[:] = active
            self.step_inputs.copy_(host_inputs, non_blocking=True)
            self.step_active.copy_(host_active, non_blocking=True)
            copied.record()
        return self.step_inputs[0], self.step_inputs[1], self.step_active

    def use_selection_source(self, enabled: bool, on_device: bool = False) -> None:
        """Allocate (or drop) the static buffers a selection source fills before each decode step (on_device:
        the row offsets into the source's table, which `source_table` is set to before the first step)."""
        self.source_selection = self.replace_selection = self.source_base = self.source_table = None
        if not enabled:
            return
        L, R, H = self.step_loads.shape
        if on_device:
            self.source_base = torch.zeros(R, dtype=torch.long, device=self.device)
        else:
            self.source_selection = torch.full((L, R, H, self.cfg.topk_blocks), -1, dtype=torch.int32, device=self.device)
        self.replace_selection = torch.zeros(R, dtype=torch.bool, device=self.device)

    @property
    def layer_hosts(self) -> list[ops.HostPages]:
        """Each layer's host pages, as the cache ops take them (rebuilt when the store has grown)."""
        if self._hosts_version != self.store.version:
            self._hosts = [ops.HostPages(self.store.k[l], self.store.v[l]) for l in range(self.store.k.shape[0])]
            self._hosts_version = self.store.version
        return self._hosts

    @property
    def loaded(self) -> torch.Tensor:
        """Blocks loaded host->device at decode, per layer [L] (active rows)."""
        return self.loaded_rh.sum(dim=(1, 2))

    @property
    def spill_hits(self) -> torch.Tensor:
        """Blocks served from the spill slots (device cache beyond the selection) at decode, per layer [L]."""
        return self.spill_hits_rh.sum(dim=(1, 2))

    @property
    def selected(self) -> torch.Tensor:
        """Blocks selected at decode, per layer [L] (active rows)."""
        return self.selected_rh.sum(dim=(1, 2))

    # ------------------------------------------------------------------------------------------ prefill
    def begin_prefill(self, token_ids: list[int]) -> PrefillState:
        """The device workspace of one prompt's prefill (its K/V and eviction scores of every layer, kept
        until the install; the scheduler charges it against the prefill workspace)."""
        cfg, cache = self.cfg, self.cache
        length = len(token_ids)
        L, H, D = len(self.model.model.layers), cache.num_kv_heads, cache.head_dim
        keys = torch.empty((L, 1, length, H, D), dtype=self.dtype, device=self.device)
        evictions = torch.empty((L, 1, length, H), dtype=torch.float32, device=self.device) if cfg.uses_eviction_head else None
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return PrefillState(ids, keys, torch.empty_like(keys), evictions, [None] * L)

    @torch.no_grad()
    def prefill(self, chunks: list[PrefillChunk]) -> list[torch.Tensor | None]:
        """One packed forward over prompt chunks of several sequences (each [start, end) of its prompt, the
        earlier part already prefilled into its state): the chunks' tokens run as one row, so every
        projection and MLP matmul is shared, and each chunk's attention reads its own prompt's keys so far.
        Returns, per chunk, the logits [V] f32 of its prompt's last token if the chunk ends its prompt,
        else None. Running a chunk again rewrites the same workspace positions (how a failed packed
        forward is retried sequence by sequence)."""
        ids = torch.cat([c.state.token_ids[c.start:c.end] for c in chunks])[None]
        positions = torch.cat([torch.arange(c.start, c.end, device=self.device) for c in chunks])[None]
        hidden = self.model.model.forward_with_attention(ids, positions, PrefillAttention(self.cfg, chunks))
        ends, offset = [], 0
        for c in chunks:
            offset += c.end - c.start
            ends.append(offset - 1)  # the chunk's last token in the packed row
        last = [i for i, c in enumerate(chunks) if c.end == c.state.length]
        results: list[torch.Tensor | None] = [None] * len(chunks)
        if last:
            logits = self.model.logits_of(hidden[:, [ends[i] for i in last]])[0]
            for j, i in enumerate(last):
                results[i] = logits[j]
        return results

    def finish_prefill(self, row: int, pages: list[int], state: PrefillState) -> None:
        """Install a fully prefilled prompt into row `row` and its host pages (see `install`)."""
        self.install(row, pages, state.keys, state.values, state.evictions, state.last_selection)

    @torch.no_grad()
    def install(self, row: int, pages: list[int], keys, values, evictions, last_selection) -> None:
        """Give row `row` a prompt's cache: keys, values [L, 1, T, H, D] and evictions [L, 1, T, H] (or None)
        go to its host pages, the row's selection state is built from them, and the blocks of
        last_selection[l] ([H, K], the last prompt token's selection; None in dense mode) are loaded. The
        prefill's path, and the benchmark's for a synthetic prompt."""
        cfg, cache = self.cfg, self.cache
        length = keys.shape[2]
        cache.reset_row(row, pages)
        kernel, stride = cfg.compress_kernel, cfg.compress_stride
        position = torch.tensor([length - 1], device=self.device)
        for l in range(keys.shape[0]):
            self.store.write_tokens(l, pages, keys[l, 0], values[l, 0])
            if cfg.is_sparse:
                compressed = ops.compress_keys(keys[l], kernel, stride)[0]
                cache.compressed[l, row, : compressed.shape[0]] = compressed
                recent = torch.arange(max(0, length - kernel), length, device=self.device)
                cache.recent_keys[l, row, recent % kernel] = keys[l, 0, recent]
            if evictions is not None:
                cache.eviction[l, row, :length] = evictions[l, 0]
                agnostic = ops.agnostic_chunk_scores(evictions[l], kernel, stride)[0]
                cache.agnostic[l, row, : agnostic.shape[0]] = agnostic
                # Pooled to blocks at the last prompt token; decode raises it as windows complete.
                pooled = ops.pool_to_blocks(agnostic.transpose(0, 1)[None, None], position, cache.max_blocks, cfg)
                cache.agnostic_blocks[l, row] = pooled[0, 0]
            if cfg.is_sparse:
                selection = last_selection[l]
            else:
                selection = ops.all_visible(position, cache.slots, cache.num_kv_heads, cache.block_size)[0]
            rows = torch.tensor([row], device=self.device)
            loads = self._load(l, rows, selection[None])
            self.install_loaded[l] += loads.sum()

    def _load(self, l, rows, selection) -> torch.Tensor:
        """Prefill install: diff the selection [n, H, K] of `rows` against their (empty) slot tables and
        gather the misses in one launch (the decode step does this inside `plan_step`). At install the
        prompt's last token is cached, so every selected block is on the host. Returns blocks loaded per
        (row, head) [n, H]."""
        cache = self.cache
        n, H, K = selection.shape
        if cache.in_place:
            # One copy (offload off): the blocks are already on the device; only the slot table is set, as
            # below (so decode fills the slots as with offload on). Nothing is loaded. Dense mode's
            # selection (`all_visible`: ascending, -1 at the end) is what the diff of an empty table gives.
            selection = selection.to(torch.int32)
            if self.cfg.is_sparse:
                selection = ops.diff_slot_tables(cache.table[l, rows].reshape(n * H, K), selection.reshape(n * H, K))[0]
            cache.table[l, rows] = selection.view(n, H, K)
            return torch.zeros((n, H), dtype=torch.int64, device=self.device)
        table = cache.table[l, rows].reshape(n * H, K)
        flat = selection.reshape(n * H, K).to(torch.int32)
        new_table, miss_block, miss_slot = ops.diff_slot_tables(table, flat)
        cache.table[l, rows] = new_table.view(n, H, K)
        miss_block = miss_block.view(n, H, K)
        page_rows = cache.page_table[rows]  # [n, NB]
        src_page = torch.gather(page_rows, 1, miss_block.clamp(min=0).view(n, H * K).long()).view(n, H, K)
        src_page = torch.where(miss_block >= 0, src_page, -1)
        slot_page = ops.block_ops.slot_page_index(self.layer_slots[l], miss_slot.view(n, H, K).clamp(min=0), rows)
        dst_page = torch.where(miss_block >= 0, slot_page, -1)
        # Materialised: an expanded index is a stride-0 view (with one KV head, of a single element).
        head = torch.arange(H, device=self.device, dtype=torch.int32)[None, :, None].expand(n, H, K).contiguous()
        src_page, dst_page, head = src_page.reshape(-1).to(torch.int32), dst_page.reshape(-1).to(torch.int32), head.reshape(-1)
        ops.gather_blocks(self.store.k[l], self.store.v[l], cache.slot_pages(l, "k"), cache.slot_pages(l, "v"), src_page, dst_page, head)
        return (src_page.view(n, H, K) >= 0).sum(-1)

    # ------------------------------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One token for every row. tokens, positions: [R] int64 (position = tokens already cached);
        active: [R] bool (counted in statistics). Returns logits [R, V] float32. The model's layers run with
        `DecodeAttention`: per layer four cache-op launches (window staging and commit, the slot plan, the
        attention inputs) around the window means, the selection, one gather and the attention."""
        if self.shards:
            hidden = self._decode_micro_batches(tokens, positions, active)
        else:
            self.decode_attention.begin(positions, active)
            hidden = self.model.model.forward_with_attention(tokens[:, None], positions[:, None], self.decode_attention)
        if self.locality_quota is not None:
            bound = self.locality_quota + (positions % self.cfg.block_size == 0).to(torch.int32)  # [R]
            self.over_bound += ((self.step_loads > bound[None, :, None]) & active[None, :, None]).sum(dim=(1, 2))
        if self.load_log is not None:
            # A snapshot: on CPU `.cpu()` would return the live buffer, which the next step overwrites.
            self.load_log.append((positions.cpu().clone(), self.step_loads.cpu().clone()))
        return self.model.logits_of(hidden)[:, 0]

    def _decode_micro_batches(self, tokens, positions, active) -> torch.Tensor:
        """The decoder layers over each micro-batch's rows (`set_micro_batches`) -> hidden [R, 1, hidden]. On
        CUDA the micro-batches fork from the current stream and join it again, so eager steps and a graph
        captured around this see one step; the LM head then runs once on the joined batch."""
        streams, offsets = self.shard_streams, self.shard_offset
        main = torch.cuda.current_stream(self.device) if streams else None
        parts = []
        try:
            for i, (start, stop, attention) in enumerate(self.shards):
                with torch.cuda.stream(streams[i]) if streams else contextlib.nullcontext():
                    if streams:
                        streams[i].wait_stream(main)
                        if i > 0:
                            streams[i].wait_event(offsets[i - 1])
                    attention.begin(positions[start:stop], active[start:stop])
                    with ops.launch_share(self.launch_share):
                        parts.append(self.model.model.forward_with_attention(tokens[start:stop, None], positions[start:stop, None], attention))
        finally:
            if streams:
                # Joined even when a micro-batch raised, so what the engine does next on the current stream
                # (releasing the failed rows' tables) runs after the kernels already queued. Every part was
                # made on its stream, which runs no more work until the next step forks it after this join:
                # the caching allocator cannot hand their memory to anything that races the cat.
                for stream in streams:
                    main.wait_stream(stream)
        return torch.cat(parts)
