"""Micro-batches of the decode step: a contiguous range of the runner's rows seen as a runner of its own.

Why: a decode layer is serial (selection, then loads, then attention, then the MLP), so with offload on the
PCIe transfers inside the loading attention wait for nothing but leave the SMs' other work waiting on them.
Two micro-batches of rows are independent all the way through the model, so run on two CUDA streams one's
loading attention can run beside the other's matmuls and selection (issue 10, item 2). The price is that
every weight is read once per micro-batch.

`RowsView(runner, start, stop)` exposes what `DecodeAttention` reads from a `ModelRunner` (and
`CacheRows` what it reads from its `BlockCache`), each per-row tensor sliced to rows [start, stop) along
its row dimension. Every per-row buffer is laid out row-major (a row's slots are pages r*K .. r*K+K-1, or
pooled r*C .. r*C+C-1, its gather entries (r, h, j) row-major), so a slice is a view whose row 0 is row `start`: the ops, which index
rows from 0, then read and write exactly that range, and two micro-batches touch disjoint memory. Shared
by both: the host store (pages are global ids), the model's weights, and the one-copy path's scratch page
(written by rows without pages, never read).
"""

from __future__ import annotations

from nosa import ops


def _rows(t, start: int, stop: int):
    return None if t is None else t[start:stop]


class CacheRows:
    """Rows [start, stop) of a `BlockCache`: the attributes and views `DecodeAttention` uses."""

    def __init__(self, cache, start: int, stop: int):
        self.cache, self.start, self.stop = cache, start, stop
        self.rows = stop - start
        self.in_place, self.block_size, self.max_blocks, self.slots = cache.in_place, cache.block_size, cache.max_blocks, cache.slots
        self.pooled = cache.pooled
        # Pages per row of the slot cache: K, or pooled K + E (the row's selection and spill slots).
        self.row_pages = cache.slots + cache.spill_blocks if cache.pooled else cache.slots
        # [L, R, ...] state: the layer dimension first, rows second.
        for name in ("compressed", "agnostic", "agnostic_blocks", "eviction", "recent_keys"):
            t = getattr(cache, name)
            setattr(self, name, None if t is None else t[:, start:stop])
        self.slot_page = _rows(cache.slot_page, start, stop)  # [R, H, K], shared by the layers

    def slot_pages(self, layer: int, side: str):
        """This range's slot pages of one layer [rows*K, H, bs, D] (pooled rows*C; `BlockCache.slot_pages`)."""
        n = self.row_pages
        return self.cache.slot_pages(layer, side)[self.start * n:self.stop * n]

    def row_view(self, layer: int, side: str):
        """[rows, K*bs, H, D]: what `decode_attention` reads (see `BlockCache.row_view`)."""
        return self.cache.row_view(layer, side)[self.start:self.stop]


class RowsView:
    """Rows [start, stop) of a `ModelRunner`, as `DecodeAttention` takes a runner. Static per-layer views are
    built once; the selection source's buffers, which the engine replaces when the source changes, and the
    host pages, rebuilt when the store grows, are sliced when read."""

    def __init__(self, runner, start: int, stop: int):
        if not 0 <= start < stop <= runner.cache.rows:
            raise ValueError(f"rows [{start}, {stop}) must be a non-empty range of the runner's {runner.cache.rows} rows")
        self.runner, self.start, self.stop = runner, start, stop
        self.cfg, self.store = runner.cfg, runner.store
        self.cache = CacheRows(runner.cache, start, stop)
        K, H, n = runner.cache.slots, runner.cache.num_kv_heads, self.cache.row_pages
        entries = slice(start * H * K, stop * H * K)  # gather entries (r, h, j), row-major
        self.layer_slots = [ops.LayerSlots(_rows(s.table, start, stop), _rows(s.k, start * n, stop * n),
                                           _rows(s.v, start * n, stop * n), _rows(s.page_table, start, stop),
                                           _rows(s.pool_map, start, stop))
                            for s in runner.layer_slots]
        self.load_plans = [ops.LoadPlan(p.src_page[entries], p.dst_page[entries], p.head[entries], _rows(p.loads, start, stop),
                                        _rows(p.loaded, start, stop), _rows(p.selected, start, stop),
                                        _rows(p.slot_src, start, stop), _rows(p.slot_page, start, stop))
                            for p in runner.load_plans]
        E = runner.cache.spill_blocks
        self.layer_spills = [None if s is None else ops.SpillSlots(
            _rows(s.table, start, stop), _rows(s.stamp, start, stop), _rows(s.k, start * E, stop * E),
            _rows(s.v, start * E, stop * E), _rows(s.hits, start, stop)) for s in runner.layer_spills]
        for name in ("valid", "bias", "window_k", "window_c"):
            setattr(self, name, _rows(getattr(runner, name), start, stop))
        self.step_selections = None if runner.step_selections is None else runner.step_selections[:, start:stop]

    @property
    def layer_hosts(self):
        return self.runner.layer_hosts

    @property
    def record_selections(self):
        return self.runner.record_selections

    @property
    def source_table(self):
        return self.runner.source_table  # global: indexed by each row's base + position

    @property
    def source_base(self):
        return _rows(self.runner.source_base, self.start, self.stop)

    @property
    def replace_selection(self):
        return _rows(self.runner.replace_selection, self.start, self.stop)

    @property
    def source_selection(self):
        s = self.runner.source_selection
        return None if s is None else s[:, self.start:self.stop]


def shard_bounds(rows: int, micro_batches: int) -> list[tuple[int, int]]:
    """`micro_batches` contiguous row ranges as equal as possible (the first ones one row longer)."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or not 1 <= micro_batches <= rows:
        raise ValueError(f"micro_batches must be an integer in [1, rows={rows}], got {micro_batches!r}")
    size, extra = divmod(rows, micro_batches)
    bounds, start = [], 0
    for i in range(micro_batches):
        stop = start + size + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds
