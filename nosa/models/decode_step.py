"""`DecodeStep`: the decode step of `model.generate` with a `NosaCache`, through the engine's decode ops, one
CUDA graph replay per token on the GPU.

A `Workspace` holds the NOSA state of every layer for a batch at a capacity (tokens per row, a multiple of
the block size), in the layout of the engine's one-copy path (`BlockCache` with `in_place`, offload off):
  keys, values        [B, cap, H, D] per layer; read as store pages [B * cap / bs, H, bs, D] (a view, no
                      copy) through page_table [B, cap / bs] (row b's block j is page b * cap / bs + j)
  eviction            [B, cap, H] per layer, c in its own dtype (float32; float64 for a float64 model)
  ring                [B, kernel, H, D] per layer, the last `kernel` keys (token s at s % kernel)
  compressed          [B, windows, H, D] per layer, the compressed key of every complete window
  agnostic            [B, windows, H] float32, each window's query-agnostic score
  agnostic_blocks     [B, H, cap / bs] float32, those scores max-pooled to blocks (-inf: no window yet)
  table               [B, H, K] int32 per layer, the slot table (K = topk_blocks; every block in dense mode)
  and the step's static buffers (tokens, positions, valid mask and bias, window staging, slot pages).
The prompt (several queries per row) goes through `NosaCache`'s eager path into these buffers; a step of one
new token for every row (what `generate` runs after the prompt) runs `_StepAttention` in every layer: the
ops `DecodeAttention` runs in the engine with offload off (stage_window, compress_keys,
agnostic_chunk_scores, commit_window, select_rows, plan_in_place, attention_inputs, decode_attention over
the pages in place). The step has static shapes, reads the row positions from a device buffer and never
syncs with the host, so on CUDA it is captured once per workspace and replayed; on the CPU it
runs eagerly (the same code, so the CPU tests exercise it).

Workspaces are pooled per model (`DecodeStep.acquire` / `release`): a cache that is dropped (generate's,
when the call returns) gives its workspace back, with its graphs, and the next `generate` at the same batch
and capacity reuses both, so a graph is captured once per (batch, capacity), not once per call. A graph
holds the addresses of the model's weights: a cache taking a pooled workspace first compares them with the
model's parameters now and drops the graphs if the model was moved or converted since (in-place loads keep
the addresses, and the graphs then read the new values).
"""

from __future__ import annotations

import threading

import torch

from nosa import ops
from nosa.layers import AttentionBackend
from nosa.ops.reference import num_complete_windows


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Workspace:
    """Every layer's NOSA state of `batch` rows at `capacity` tokens per row (see the module docstring)."""

    def __init__(self, config, batch: int, capacity: int, dtype: torch.dtype, device):
        cfg = config.sparse
        self.cfg = cfg
        device = torch.device(device)
        L, B, H, D = config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim
        bs = cfg.block_size
        if capacity % bs:
            raise ValueError(f"capacity {capacity} is not a multiple of block_size={bs}")
        self.key = (batch, capacity, dtype, device)
        self.batch, self.capacity, self.dtype, self.device = batch, capacity, dtype, device
        self.num_layers, self.num_kv_heads, self.head_dim = L, H, D
        self.num_blocks = NB = capacity // bs
        self.eviction_dtype = torch.promote_types(dtype, torch.float32)
        sparse, evicting = cfg.is_sparse, cfg.uses_eviction_head
        kernel = cfg.compress_kernel
        self.num_windows = NW = max(1, num_complete_windows(capacity, kernel, cfg.compress_stride)) if sparse else 0
        self.slots = K = cfg.topk_blocks if sparse else NB

        def each(make):
            return [make() for _ in range(L)]

        self.keys = each(lambda: torch.zeros((B, capacity, H, D), dtype=dtype, device=device))
        self.values = each(lambda: torch.zeros((B, capacity, H, D), dtype=dtype, device=device))
        self.eviction = each(lambda: torch.zeros((B, capacity, H), dtype=self.eviction_dtype, device=device)) if evicting else None
        self.ring = each(lambda: torch.zeros((B, kernel, H, D), dtype=dtype, device=device)) if sparse else None
        self.compressed = each(lambda: torch.zeros((B, NW, H, D), dtype=dtype, device=device)) if sparse else None
        self.agnostic = each(lambda: torch.zeros((B, NW, H), dtype=torch.float32, device=device)) if evicting else None
        self.agnostic_blocks = (each(lambda: torch.full((B, H, NB), float("-inf"), dtype=torch.float32, device=device))
                                if evicting else None)
        self.table = each(lambda: torch.full((B, H, K), -1, dtype=torch.int32, device=device))
        # Pages as the engine's store holds them, [P, H, bs, D]: views of keys / values.
        self.key_pages = [k.view(B * NB, bs, H, D).transpose(1, 2) for k in self.keys]
        self.value_pages = [v.view(B * NB, bs, H, D).transpose(1, 2) for v in self.values]
        self.page_table = (torch.arange(B, device=device, dtype=torch.int32)[:, None] * NB
                           + torch.arange(NB, device=device, dtype=torch.int32)[None]).contiguous()
        # Step buffers, shared by the layers (stream order separates their uses).
        self.slot_page = torch.full((B, H, K), -1, dtype=torch.int32, device=device)
        self.valid = torch.zeros((B, K * bs, H), dtype=torch.bool, device=device)
        self.bias = torch.zeros((B, K * bs, H), dtype=self.eviction_dtype, device=device) if evicting else None
        self.window_k = torch.zeros((B, kernel, H, D), dtype=dtype, device=device) if sparse else None
        self.window_c = torch.zeros((B, kernel, H), dtype=self.eviction_dtype, device=device) if evicting else None
        self.plan = ops.LoadPlan.allocate(B, H, K, device)
        self.tokens = torch.zeros((B, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)  # tokens cached per row
        self.active = torch.ones(B, dtype=torch.bool, device=device)
        self.counting = torch.arange(capacity + 1, device=device)
        # The CUDA graph of the step (graph, logits) once captured; the step runs eagerly once before (warm).
        self.graph: tuple | None = None
        self.warm = False
        self.pool = None
        # The addresses of the model's parameters the graphs were captured with, checked once per cache
        # that takes this workspace (a model moved or converted since then has other tensors).
        self.weights = None
        self.verified = False

    def per_row_tensors(self):
        """Every tensor whose dim 0 is the row (the state and the positions), for reordering rows in place."""
        for group in (self.keys, self.values, self.eviction, self.ring, self.compressed, self.agnostic,
                      self.agnostic_blocks, self.table):
            yield from group or ()
        yield self.positions

    def clear_state(self) -> None:
        """Forget the rows (a pooled workspace handed to a new cache): pooled agnostic scores back to -inf,
        slot tables empty and positions to 0. Keys, values and windows beyond a row's length are never
        read. The slot tables must be reset too: the plan diffs the new selection against them, so a
        table left from the previous call would put the same blocks in other slots, and the attention
        would sum them in another order (other bf16 logits for an identical call)."""
        for blocks in self.agnostic_blocks or ():
            blocks.fill_(float("-inf"))
        for table in self.table or ():
            table.fill_(-1)
        self.positions.zero_()
        self.verified = False

    def check_weights(self, model) -> None:
        """Drop the graphs if the model's parameters are no longer the tensors they were captured with."""
        weights = tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())
        if weights != self.weights:
            self.graph, self.warm, self.pool = None, False, None
            self.weights = weights
        self.verified = True

    def copy_rows_from(self, other: "Workspace", index: torch.Tensor | None = None) -> None:
        """This workspace's rows = `other`'s rows `index` (all when None), as far as both capacities reach."""
        take = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
        n, nw, nb = min(self.capacity, other.capacity), min(self.num_windows, other.num_windows), min(self.num_blocks, other.num_blocks)
        for l in range(self.num_layers):
            self.keys[l][:, :n] = take(other.keys[l][:, :n])
            self.values[l][:, :n] = take(other.values[l][:, :n])
            if self.eviction is not None:
                self.eviction[l][:, :n] = take(other.eviction[l][:, :n])
            if self.ring is not None:
                self.ring[l].copy_(take(other.ring[l]))
                self.compressed[l][:, :nw] = take(other.compressed[l][:, :nw])
            if self.agnostic is not None:
                self.agnostic[l][:, :nw] = take(other.agnostic[l][:, :nw])
                self.agnostic_blocks[l].fill_(float("-inf"))
                self.agnostic_blocks[l][:, :, :nb] = take(other.agnostic_blocks[l][:, :, :nb])
            # The slot tables name pages of this workspace's own numbering (row * num_blocks + block), which
            # changes with the capacity: they start empty, as in a new cache, and the next step's plan fills
            # them from its selection; so a grown or re-batched workspace is filled the same way every time.
            self.table[l].fill_(-1)
        self.positions.copy_(take(other.positions))


class _StepAttention(AttentionBackend):
    """One new token for every row of a workspace, per layer: the engine's one-copy decode ops (see the
    module docstring). logs: each layer's selection log (a list, or None), filled in eager steps only."""

    def __init__(self, ws: Workspace, logs=None, lengths: list[int] | None = None):
        self.ws, self.logs = ws, logs
        # With the rows' lengths (host ints; eager steps on the CPU only, where shapes may change from step
        # to step): the selection reads only the windows and blocks that exist, and a step that completes no
        # window skips the compression and the commit (which would write nothing). Same results; a graphed
        # or CUDA step always reads the whole capacity, so eager and replay run the same shapes there.
        self.limits = None
        self.longest = None if lengths is None else max(lengths) + 1
        if lengths is not None and ws.cfg.is_sparse:
            cfg, longest = ws.cfg, max(lengths) + 1
            kernel, stride = cfg.compress_kernel, cfg.compress_stride
            completes = any(n + 1 >= kernel and (n + 1 - kernel) % stride == 0 for n in lengths)
            windows = max(1, num_complete_windows(longest, kernel, stride))
            self.limits = (min(windows, ws.num_windows), min(-(-longest // cfg.block_size), ws.num_blocks), completes)
        table = ws.table[0]
        self.stage = ops.resolve("stage_window", table)
        self.commit = ops.resolve("commit_window", table)
        self.plan = ops.resolve("plan_in_place", table)
        self.inputs = ops.resolve("attention_inputs", table)

    def attend(self, layer_idx, q, k, v, eviction):
        ws, l = self.ws, layer_idx
        cfg, positions = ws.cfg, ws.positions
        evict = ws.eviction[l] if ws.eviction is not None else None
        selection = None  # dense mode: every visible block
        if cfg.is_sparse:
            kernel, stride = cfg.compress_kernel, cfg.compress_stride
            if self.limits is None or self.limits[2]:
                self.stage(k[:, 0], None if eviction is None else eviction[:, 0], positions, ws.ring[l], evict,
                           ws.window_k, ws.window_c)
            else:  # the CPU step that completes no window: only the key into the ring and c at its position
                rows = ws.counting[: ws.batch]
                ws.ring[l][rows, positions % kernel] = k[:, 0]
                if evict is not None:
                    evict[rows, positions] = eviction[:, 0].to(evict.dtype)
            blocks = None if ws.agnostic_blocks is None else ws.agnostic_blocks[l]
            if self.limits is None or self.limits[2]:
                compressed = ops.compress_keys(ws.window_k, kernel, stride)
                agnostic = None if evict is None else ops.agnostic_chunk_scores(ws.window_c, kernel, stride)
                self.commit(positions, compressed, agnostic, ws.compressed[l],
                            None if ws.agnostic is None else ws.agnostic[l], blocks, kernel, stride, cfg.block_size)
            keys, num_blocks = ws.compressed[l], ws.num_blocks
            if self.limits is not None:
                windows, num_blocks, _ = self.limits
                keys, blocks = keys[:, :windows], None if blocks is None else blocks[:, :, :num_blocks]
            selection = ops.select_rows(q[:, 0], keys, blocks, positions, num_blocks, cfg)
            if self.logs is not None and self.logs[l] is not None:
                self.logs[l].append(selection[:, None].clone())
        if self.longest is not None:
            return self._gathered(l, q, k, v, selection)
        slots = ops.LayerSlots(ws.table[l], None, None, ws.page_table)
        token = ops.StepTokens(positions, ws.active, k[:, 0], v[:, 0])
        pages = ops.HostPages(ws.key_pages[l], ws.value_pages[l])
        # Scratch page 0 (row 0's first block): the scratch page takes the token of a row without a page, and
        # every row here has one (all rows are active and the capacity is grown before a step needs it), so
        # nothing is ever written there; a free row, as in the engine, would need a page of its own.
        self.plan(slots, selection, token, pages, ws.plan, ws.slot_page, 0)
        self.inputs(ws.table[l], positions, evict, ws.valid, ws.bias, cfg.block_size)
        out = ops.decode_attention(q[:, 0], pages.k, pages.v, ws.bias, ws.valid, ws.slot_page)
        return out[:, None]


    def _gathered(self, l, q, k, v, selection):
        """The CPU step's attention (with lengths): the token written at its position, then
        `decode_attention` over the selected blocks' tokens gathered from the keys (dense mode: over every
        token so far), without the slot table's diff and the paged reads, which cost more than they save in
        eager PyTorch. The same attention: the selected tokens at positions <= the query's."""
        ws, positions, bs = self.ws, self.ws.positions, self.ws.cfg.block_size
        rows = ws.counting[: ws.batch]
        ws.keys[l][rows, positions] = k[:, 0]
        ws.values[l][rows, positions] = v[:, 0]
        evict = ws.eviction[l] if ws.eviction is not None else None  # c was written by stage_window
        if selection is None:
            n = self.longest
            valid = (ws.counting[None, :n] <= positions[:, None])[:, :, None].expand(-1, -1, ws.num_kv_heads)
            out = ops.decode_attention(q[:, 0], ws.keys[l][:, :n], ws.values[l][:, :n], None, valid)
            return out[:, None]
        picked = selection.transpose(1, 2).long()  # [B, K, H]
        tokens = (picked[:, :, None, :] * bs + ws.counting[:bs][None, None, :, None]).reshape(ws.batch, -1, picked.shape[-1])
        valid = (picked >= 0).repeat_interleave(bs, dim=1) & (tokens <= positions[:, None, None])
        tokens = tokens.clamp(0, ws.capacity - 1)
        heads = ws.counting[: ws.num_kv_heads]
        index = (rows[:, None, None], tokens, heads)
        bias = None if evict is None else torch.where(valid, evict[index], 0.0)
        out = ops.decode_attention(q[:, 0], ws.keys[l][index], ws.values[l][index], bias, valid)
        return out[:, None]


class DecodeStep:
    """A model's decode steps over `Workspace`s: the pool of workspaces (with their graphs) and the step.
    One per `NosaModel` (`model.model.decode_step`). use_graphs: capture on CUDA (False: always eager)."""

    KEEP_FREE = 4  # free workspaces kept for reuse (the least recently released beyond this are dropped)

    def __init__(self, use_graphs: bool = True):
        self.use_graphs = use_graphs
        # CPU steps take the lean path (`_StepAttention._gathered`, shapes cut to the rows' lengths); False:
        # the engine's ops as on CUDA (the tests run both).
        self.lean_cpu = True
        self._free: list[Workspace] = []
        self._lock = threading.Lock()
        self.captures = 0  # graphs captured (tests and the benchmark read it)
        self.replays = 0

    def __deepcopy__(self, memo):
        return DecodeStep(self.use_graphs)  # a copied model has other weights: nothing pooled carries over

    def __reduce__(self):
        return (DecodeStep, (self.use_graphs,))

    def acquire(self, config, batch: int, capacity: int, dtype, device) -> Workspace:
        key = (batch, capacity, dtype, torch.device(device))
        with self._lock:
            for i, ws in enumerate(self._free):
                if ws.key == key:
                    del self._free[i]
                    ws.clear_state()
                    return ws
        return Workspace(config, batch, capacity, dtype, device)

    def release(self, ws: Workspace) -> None:
        with self._lock:
            self._free.append(ws)
            del self._free[: max(0, len(self._free) - self.KEEP_FREE)]

    def clear(self) -> None:
        """Drop the pooled workspaces and their graphs (to free their memory)."""
        with self._lock:
            self._free.clear()

    @torch.no_grad()
    def eager(self, model, ws: Workspace, logs=None, lengths=None) -> torch.Tensor:
        """One step for every row (ws.tokens, at ws.positions), which it then advances: logits [B, 1, V] in
        the model's dtype. lengths: the rows' lengths (CPU steps; see `_StepAttention`)."""
        attention = _StepAttention(ws, logs, lengths)
        hidden = model.model.forward_with_attention(ws.tokens, ws.positions[:, None], attention)
        logits = model.lm_head(model.model.norm(hidden))
        ws.positions.add_(1)
        return logits

    @torch.no_grad()
    def __call__(self, model, ws: Workspace, tokens: torch.Tensor, lengths: list[int], logs=None) -> torch.Tensor:
        """tokens [B, 1] after the rows' `lengths` cached tokens -> logits [B, 1, V] (a fresh tensor).
        Graphed on CUDA unless logging selections."""
        ws.tokens.copy_(tokens)
        if ws.device.type != "cuda":
            return self.eager(model, ws, logs, lengths if self.lean_cpu else None)
        if logs is not None or not self.use_graphs:
            return self.eager(model, ws, logs)
        if not ws.verified:
            ws.check_weights(model)
        if ws.graph is not None:
            graph, logits = ws.graph
            graph.replay()
            self.replays += 1
            return logits.clone()
        if not ws.warm:
            # First step on this workspace: eager on the same buffers (Triton compilation and autotuning,
            # cuBLAS handles), so the capture records no first-call work.
            ws.warm = True
            return self.eager(model, ws)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(ws.device)
        # Capture records without executing; the replay right after performs this step.
        with torch.cuda.graph(graph, pool=ws.pool):
            logits = self.eager(model, ws)
        ws.pool = graph.pool()
        ws.graph = (graph, logits)
        self.captures += 1
        graph.replay()
        self.replays += 1
        return logits.clone()


def capacity_for(needed: int, hint: int | None, current: int | None, block_size: int, limit: int) -> int:
    """Tokens per row to allocate for `needed`: at least the hint (generate's max_length), doubling the
    current capacity (so growth is amortised O(1) per token), a multiple of the block size, at most the
    model's max_position_embeddings (rounded up) but never below `needed`."""
    want = max(needed, hint or 0, 2 * current if current else 0, 64)
    want = min(want, _round_up(limit, block_size))
    return _round_up(max(want, needed), block_size)
