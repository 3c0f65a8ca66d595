"""Runs the model for the engine: chunked prefill of one sequence, and the batched decode step over the
block cache (spec sec. 6). Attention semantics come only from the layer (`project_qkv`,
`eviction_scores`) and `nosa.ops` (`nosa_attention`, `select_for_queries`, `compress_keys`,
`agnostic_chunk_scores`, `decode_attention`); this file only keeps state so nothing is recomputed.

The decode step has static shapes: it always runs all R rows (a free row has no host pages, so its gathers
and write-backs are skipped) and reads capacity-sized state whose unused part the ops mask by position.
That is what lets `cuda_graph.py` capture it.
"""

from __future__ import annotations

import torch

from nosa import ops
from nosa.engine.block_cache import BlockCache
from nosa.engine.block_ops import all_visible, resolve_block_op
from nosa.engine.host_store import HostStore


class ModelRunner:
    def __init__(self, model, cache: BlockCache, store: HostStore, prefill_chunk: int):
        self.model = model
        self.cfg = model.config.sparse
        self.cache = cache
        self.store = store
        self.prefill_chunk = prefill_chunk
        self.device = cache.slot_k.device
        self.dtype = cache.slot_k.dtype
        L = len(model.model.layers)
        R, H, K, bs, D = cache.rows, cache.num_kv_heads, cache.slots, cache.block_size, cache.slot_k.shape[-1]
        # Device counters (read once at the end, no per-step sync): blocks loaded host->device and blocks
        # selected at decode, per (layer, row, head) over active rows (each (row, head) program of the plan
        # kernel owns its counter, so no atomics); and blocks loaded by prefill installs, per layer.
        self.loaded_rh = torch.zeros((L, R, H), dtype=torch.int64, device=self.device)
        self.selected_rh = torch.zeros((L, R, H), dtype=torch.int64, device=self.device)
        self.install_loaded = torch.zeros(L, dtype=torch.int64, device=self.device)
        # Static per-step buffers, shared by the layers (stream order separates their uses), so the step
        # allocates nothing and a captured graph reads and writes fixed addresses.
        self.step_loads = torch.zeros((L, R, H), dtype=torch.int32, device=self.device)  # blocks loaded this step
        self.src_page = torch.full((R * H * K,), -1, dtype=torch.int32, device=self.device)
        self.dst_page = torch.full((R * H * K,), -1, dtype=torch.int32, device=self.device)
        self.gather_head = torch.arange(H, dtype=torch.int32, device=self.device)[None, :, None].expand(R, H, K).reshape(-1).contiguous()
        self.valid = torch.zeros((R, K * bs, H), dtype=torch.bool, device=self.device)
        self.bias = torch.zeros((R, K * bs, H), dtype=torch.float32, device=self.device) if cache.eviction is not None else None
        self.window_k = self.window_c = None
        if self.cfg.is_sparse:
            kernel = self.cfg.compress_kernel
            self.window_k = torch.zeros((R, kernel, H, D), dtype=self.dtype, device=self.device)
            if cache.eviction is not None:
                self.window_c = torch.zeros((R, kernel, H), dtype=torch.float32, device=self.device)
        # When a list (tests), every decode step appends (positions [R], loads [L, R, H]); forces eager mode.
        self.load_log: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # When True (sparse modes), every decode step leaves each layer's selection [R, H, K] in
        # `step_selections` (the selection traces of `record_selections`); forces eager mode.
        self.record_selections = False
        self.step_selections = torch.full((L, R, H, K), -1, dtype=torch.int32, device=self.device) if self.cfg.is_sparse else None

    @property
    def loaded(self) -> torch.Tensor:
        """Blocks loaded host->device at decode, per layer [L] (active rows)."""
        return self.loaded_rh.sum(dim=(1, 2))

    @property
    def selected(self) -> torch.Tensor:
        """Blocks selected at decode, per layer [L] (active rows)."""
        return self.selected_rh.sum(dim=(1, 2))

    # ------------------------------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, row: int, token_ids: list[int], pages: list[int]) -> torch.Tensor:
        """Run the prompt of one sequence in chunks of `prefill_chunk` queries, fill its host pages and its
        row state, and load the blocks its last token selected. Returns the last token's logits [V] f32."""
        model, cfg, cache = self.model.model, self.cfg, self.cache
        length = len(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)[None]
        L, H, D = len(model.layers), cache.num_kv_heads, cache.slot_k.shape[-1]
        keys = torch.empty((L, 1, length, H, D), dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        evictions = torch.empty((L, 1, length, H), dtype=torch.float32, device=self.device) if cfg.uses_eviction_head else None
        last_selection = [None] * L
        for start in range(0, length, self.prefill_chunk):
            end = min(length, start + self.prefill_chunk)
            hidden = model.embed_tokens(ids[:, start:end])
            cos, sin = model.rotary_emb(torch.arange(start, end, device=self.device)[None], hidden.dtype)
            for l, layer in enumerate(model.layers):
                attn = layer.self_attn
                q, k, v = attn.project_qkv(layer.input_layernorm(hidden), cos, sin)
                keys[l, :, start:end], values[l, :, start:end] = k, v
                c = None
                if evictions is not None:
                    evictions[l, :, start:end] = attn.eviction_scores(v)
                    c = evictions[l, :, :end]
                # Queries are this chunk, keys everything so far: scores are chunk x end, never T x T.
                out, indices = ops.nosa_attention(q, keys[l, :, :end], values[l, :, :end], c, cfg, return_indices=True)
                if end == length and indices is not None:
                    last_selection[l] = indices[0, -1]  # [H, K]
                hidden = hidden + attn.o_proj(out.reshape(1, end - start, -1))
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.model.lm_head(model.norm(hidden[:, -1:]))[0, 0].float()
        self._install(row, length, pages, keys, values, evictions, last_selection)
        return logits

    def _install(self, row, length, pages, keys, values, evictions, last_selection) -> None:
        cfg, cache = self.cfg, self.cache
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
                selection = all_visible(position, cache.slots, cache.num_kv_heads, cache.block_size)[0]
            rows = torch.tensor([row], device=self.device)
            loads = self._load(l, rows, selection[None], position)
            self.install_loaded[l] += loads.sum()

    # ------------------------------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor, uniform: bool) -> torch.Tensor:
        """One token for every row. tokens, positions: [R] int64 (position = tokens already cached);
        active: [R] bool (counted in statistics); uniform: every row at positions[0] (one selection call
        instead of the R x R diagonal one). Returns logits [R, V] float32.

        Per layer the bookkeeping is four `block_ops` launches (window staging and commit, the slot plan,
        the attention inputs) around the window means, the selection, one gather and the attention."""
        model, cache, cfg = self.model.model, self.cache, self.cfg
        hidden = model.embed_tokens(tokens[:, None])
        cos, sin = model.rotary_emb(positions[:, None], hidden.dtype)
        stage = resolve_block_op("stage_window", cache.slot_k)
        commit = resolve_block_op("commit_window", cache.slot_k)
        plan = resolve_block_op("plan_step", cache.slot_k)
        gather = resolve_block_op("gather_blocks", cache.slot_k, self.store.k)
        inputs = resolve_block_op("attention_inputs", cache.slot_k)
        for l, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = attn.project_qkv(layer.input_layernorm(hidden), cos, sin)
            c = attn.eviction_scores(v)
            eviction = cache.eviction[l] if cache.eviction is not None else None
            selection = None  # dense mode: the plan selects every visible block
            if cfg.is_sparse:
                # Windows complete at decode are compressed now, so this very token can select them (no
                # one-token lag); the means go through `ops` like prefill's, so they round identically.
                stage(k[:, 0], None if c is None else c[:, 0], positions, cache.recent_keys[l], eviction,
                      self.window_k, self.window_c)
                compressed = ops.compress_keys(self.window_k, cfg.compress_kernel, cfg.compress_stride)
                agnostic = None
                if eviction is not None:
                    agnostic = ops.agnostic_chunk_scores(self.window_c, cfg.compress_kernel, cfg.compress_stride)
                commit(positions, compressed, agnostic, cache.compressed[l],
                       cache.agnostic[l] if cache.agnostic is not None else None,
                       cache.agnostic_blocks[l] if cache.agnostic_blocks is not None else None,
                       cfg.compress_kernel, cfg.compress_stride, cache.block_size)
                selection = self._select(l, q, positions, uniform)
                if self.record_selections:
                    self.step_selections[l].copy_(selection)
            plan(cache.table[l], selection, cache.page_table, positions, active, k[:, 0], v[:, 0],
                 cache.slot_k[l], cache.slot_v[l], self.store.k[l], self.store.v[l],
                 self.src_page, self.dst_page, self.step_loads[l], self.loaded_rh[l], self.selected_rh[l])
            # One launch for every miss of the batch (Triton reading pinned host memory on CUDA). It cannot
            # overlap this layer's compute: what it loads is known only once this layer's query has selected,
            # and the attention right after reads it.
            gather(self.store.k[l], self.store.v[l], cache.slot_pages(l, "k"), cache.slot_pages(l, "v"),
                   self.src_page, self.dst_page, self.gather_head)
            inputs(cache.table[l], positions, eviction, self.valid, self.bias, cache.block_size)
            out = ops.decode_attention(q[:, 0], cache.row_view(l, "k"), cache.row_view(l, "v"), self.bias, self.valid)
            hidden = hidden + attn.o_proj(out.reshape(out.shape[0], 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if self.load_log is not None:
            # A snapshot: on CPU `.cpu()` would return the live buffer, which the next step overwrites.
            self.load_log.append((positions.cpu().clone(), self.step_loads.cpu().clone()))
        return self.model.lm_head(model.norm(hidden))[:, 0].float()

    def _select(self, l, q, positions, uniform: bool) -> torch.Tensor:
        """Selection of every row (the single rule, `ops.select_blocks`). q: [R, 1, Hq, D] -> [R, H, K].
        The agnostic block scores come pooled from the cache (`agnostic_blocks`, maintained as windows
        complete) instead of being re-pooled from every window each step; the query-aware ones are pooled
        from the compressed keys as `select_for_queries` does. Rows at different positions are handled as R
        queries against every row's state, keeping the diagonal: exact, and R x the selection work (small
        next to attention at long context)."""
        cache = self.cache
        agnostic = cache.agnostic_blocks[l][:, None] if cache.agnostic_blocks is not None else None  # [R, 1, H, NB]
        if uniform:
            return self._select_rows(q, cache.compressed[l], agnostic, positions[:1])[:, 0]
        rows = q.shape[0]
        queries = q[:, 0][None].expand(rows, rows, q.shape[2], q.shape[3]).contiguous()
        every = self._select_rows(queries, cache.compressed[l], agnostic, positions)
        diagonal = torch.arange(rows, device=self.device)
        return every[diagonal, diagonal]

    def _select_rows(self, q, compressed, agnostic_blocks, positions) -> torch.Tensor:
        """`select_for_queries` with the agnostic pooling already done: [B, Tq, H, K] int32."""
        cfg, num_blocks = self.cfg, self.cache.max_blocks
        # On CUDA the fused score kernel pools inside and never writes the per-window scores.
        query_scores = ops.query_aware_block_scores(q, compressed, positions, num_blocks, cfg)
        return ops.select_blocks(query_scores, agnostic_blocks, positions, cfg)

    def _load(self, l, rows, selection, positions) -> torch.Tensor:
        """Prefill install: diff the selection [n, H, K] of `rows` against their (empty) slot tables and
        gather the misses in one launch (the decode step does this inside `plan_step`). At install the
        prompt's last token is cached, so every selected block is on the host. Returns blocks loaded per
        (row, head) [n, H]."""
        cache = self.cache
        n, H, K = selection.shape
        table = cache.table[l, rows].reshape(n * H, K)
        flat = selection.reshape(n * H, K).to(torch.int32)
        diff = resolve_block_op("diff_slot_tables", table, flat)
        new_table, miss_block, miss_slot = diff(table, flat)
        cache.table[l, rows] = new_table.view(n, H, K)
        miss_block = miss_block.view(n, H, K)
        page_rows = cache.page_table[rows]  # [n, NB]
        src_page = torch.gather(page_rows, 1, miss_block.clamp(min=0).view(n, H * K).long()).view(n, H, K)
        src_page = torch.where(miss_block >= 0, src_page, -1)
        dst_page = torch.where(miss_block >= 0, rows[:, None, None] * K + miss_slot.view(n, H, K), -1)
        head = torch.arange(H, device=self.device, dtype=torch.int32)[None, :, None].expand(n, H, K)
        src_page, dst_page, head = src_page.reshape(-1), dst_page.reshape(-1).to(torch.int32), head.reshape(-1)
        store = self.store
        gather = resolve_block_op("gather_blocks", cache.slot_k, store.k)
        gather(store.k[l], store.v[l], cache.slot_pages(l, "k"), cache.slot_pages(l, "v"), src_page, dst_page, head)
        return (src_page.view(n, H, K) >= 0).sum(-1)
