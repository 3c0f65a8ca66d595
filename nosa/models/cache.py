"""`NosaCache`: a transformers `Cache` that keeps NOSA's incremental decoding state, so that each step of
`model.generate` costs one token's work instead of re-running compression, pooling and selection over the
whole cache (what the plain `DynamicCache` path does, since it only stores keys and values).

Per layer and row it keeps: the keys and values; the eviction scores c (dma, nosa); the compressed keys of
every complete window and, for the eviction-head modes, each window's query-agnostic score and the
agnostic block scores pooled from them (spec 4.3-4.4). When a token completes a window, that one window is
compressed, scored and max-pooled into the blocks it overlaps (the max is exact, so the pooled scores equal
`pool_to_blocks` over all windows). A decode query then scores the compressed keys (the query-aware part,
which is O(windows) by definition), goes through `ops.select_rows` (the engine's entry point to the one
selection rule), and attends
only to its selected blocks with `ops.decode_attention`, the engine's decode op. Prompts (several queries)
go through `ops.nosa_attention` over the row's keys, exactly as the full forward does.

Rows are stored in their own coordinates (padding stripped: the row's first real token is slot 0), which is
what `SequenceSpans` defines for a padded batch. Rows of equal length are processed together.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from nosa import ops
from nosa.ops.reference import num_complete_windows


def _grown(buffer: torch.Tensor | None, needed: int, shape_tail: tuple, dtype, device, fill=0.0) -> torch.Tensor:
    """`buffer` ([B, capacity, ...]) with room for `needed` entries along dim 1; doubles, so appends stay
    amortised O(1)."""
    batch = shape_tail[0]
    if buffer is not None and buffer.shape[1] >= needed:
        return buffer
    capacity = max(needed, 16 if buffer is None else 2 * buffer.shape[1])
    grown = torch.full((batch, capacity) + tuple(shape_tail[1:]), fill, dtype=dtype, device=device)
    if buffer is not None:
        grown[:, : buffer.shape[1]] = buffer
    return grown


def _take(tensor: torch.Tensor, rows) -> torch.Tensor:
    """tensor[rows] along dim 0, a view when `rows` is a slice (every row: no copy)."""
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


class _LayerState:
    def __init__(self):
        self.keys = self.values = self.eviction = None  # [B, cap, H, D], [B, cap, H, D], [B, cap, H] (c's dtype)
        self.compressed = self.agnostic = None  # [B, capW, H, D], [B, capW, H] f32
        self.agnostic_blocks = None  # [B, capNB, H] f32, -inf where no complete window overlaps yet
        self.lengths: list[int] = []  # real tokens per row
        self.windows: list[int] = []  # complete windows stored per row
        self.slots = 0  # key slots seen (padding included): what get_seq_length reports

    def select_rows(self, index: torch.Tensor) -> None:
        for name in ("keys", "values", "eviction", "compressed", "agnostic", "agnostic_blocks"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        rows = index.tolist()
        self.lengths = [self.lengths[r] for r in rows]
        self.windows = [self.windows[r] for r in rows]


class NosaCache(Cache):
    """Incremental NOSA state for `NosaForCausalLM` (the default cache of its `generate`). Works for every
    attn_mode; dense mode keeps keys and values only. Beam search reorders it; `crop` (assisted decoding)
    is not supported."""

    # NosaAttention looks for this flag and hands its step to `attend_layer` instead of calling `update`.
    keeps_nosa_state = True

    def __init__(self, config=None, *args, **kwargs):
        super().__init__(layers=[])
        self.config = config
        self._states: dict[int, _LayerState] = {}
        self._arange: torch.Tensor | None = None

    def _counting(self, n: int, device) -> torch.Tensor:
        """arange(>= n) on `device`, kept: slicing it gives positions and offsets without a host->device
        copy each step (a copy would make the CPU wait for the GPU and stop it queueing work ahead)."""
        if self._arange is None or self._arange.numel() < n or self._arange.device != torch.device(device):
            self._arange = torch.arange(max(n, 2 * (0 if self._arange is None else self._arange.numel()), 1024), device=device)
        return self._arange[:n]

    # ------------------------------------------------------------------------------ Cache interface
    def __len__(self) -> int:
        return len(self._states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        state = self._states.get(layer_idx)
        return 0 if state is None else state.slots

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        raise NotImplementedError(
            "NosaCache is driven by NosaAttention (attend_layer), not by update(); use DynamicCache for other models"
        )

    def reset(self) -> None:
        self._states.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for state in self._states.values():
            state.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for state in self._states.values():
            state.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for state in self._states.values():
            batch = len(state.lengths)
            device = state.keys.device if state.keys is not None else "cpu"
            state.select_rows(torch.arange(batch, device=device).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("NosaCache cannot be cropped (assisted decoding); pass a DynamicCache instead")

    # ------------------------------------------------------------------------------ attention
    def row_lengths(self, layer_idx: int) -> list[int]:
        """Real tokens cached per row for one layer (tests and accounting)."""
        state = self._states.get(layer_idx)
        return [] if state is None else list(state.lengths)

    @torch.no_grad()
    def attend_layer(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans) -> torch.Tensor:
        """One layer's attention for the new tokens, updating this layer's state.

        attn: the NosaAttention (its eviction head, sparse config, layer index, selection log); q: [B, Tq,
        Hq, D], k, v: [B, Tq, H, D] of the new key slots; spans over past + new slots -> [B, Tq, Hq, D]."""
        cfg = attn.sparse
        batch, num_queries = q.shape[:2]
        state = self._states.setdefault(attn.layer_idx, _LayerState())
        if not state.lengths:
            state.lengths, state.windows = [0] * batch, [0] * batch
        if len(state.lengths) != batch:
            raise ValueError(f"NosaCache holds {len(state.lengths)} rows but this step has batch {batch}")
        first_new = state.slots  # padded slot of the first new token
        if spans.total != first_new + num_queries:
            raise ValueError(f"attention_mask covers {spans.total} slots but the cache holds {first_new} + {num_queries} new")
        c = attn.eviction_scores(v) if cfg.uses_eviction_head else None
        # Row b's new real tokens are its slots in [max(start, first_new), end); the ones before must be cached.
        new_ranges = []
        for b, (start, end) in enumerate(zip(spans.starts, spans.ends)):
            lo, hi = max(start, first_new), end
            expected_cached = max(0, min(end, first_new) - start)
            if state.lengths[b] != expected_cached:
                raise ValueError(
                    f"row {b}: attention_mask says {expected_cached} earlier tokens, the cache holds {state.lengths[b]}"
                )
            new_ranges.append((lo - first_new, max(lo, hi) - first_new))
        self._append(state, k, v, c, new_ranges)
        out = None
        # Rows with the same (cached length, new queries) take one batched call.
        groups: dict[tuple[int, int, int], list[int]] = {}
        for b, (lo, hi) in enumerate(new_ranges):
            if hi > lo:
                groups.setdefault((state.lengths[b], lo, hi), []).append(b)
        for (length, lo, hi), rows in groups.items():
            # Every row in one group (no padding): views, not copies.
            sel = slice(None) if len(rows) == batch else torch.tensor(rows, device=q.device)
            queries = _take(q, sel)[:, lo:hi]
            if hi - lo == 1 and cfg.is_sparse:
                result, selection = self._decode(state, cfg, rows, sel, queries, length)
            else:
                result, selection = self._prefill(state, cfg, rows, sel, queries, length)
            if attn.selection_log is not None and selection is not None:
                attn.selection_log.append(selection)
            if isinstance(sel, slice) and lo == 0 and hi == num_queries:
                out = result
            else:
                out = torch.zeros_like(q) if out is None else out
                out[sel, lo:hi] = result
        state.slots += num_queries
        return torch.zeros_like(q) if out is None else out

    def _append(self, state: _LayerState, k, v, c, new_ranges) -> None:
        batch, _, heads, dim = k.shape
        device, dtype = k.device, k.dtype
        needed = max(length + (hi - lo) for length, (lo, hi) in zip(state.lengths, new_ranges))
        state.keys = _grown(state.keys, needed, (batch, heads, dim), dtype, device)
        state.values = _grown(state.values, needed, (batch, heads, dim), dtype, device)
        if c is not None:
            # c's own dtype (float32, float64 for a float64 model): the attention bias is then bit-equal to
            # the full forward's.
            state.eviction = _grown(state.eviction, needed, (batch, heads), c.dtype, device)
        if len(set(new_ranges)) == 1 and len(set(state.lengths)) == 1:  # no padding: one copy per tensor
            (lo, hi), at = new_ranges[0], state.lengths[0]
            if hi > lo:
                state.keys[:, at : at + hi - lo] = k[:, lo:hi]
                state.values[:, at : at + hi - lo] = v[:, lo:hi]
                if c is not None:
                    state.eviction[:, at : at + hi - lo] = c[:, lo:hi]
                state.lengths = [at + hi - lo] * batch
            return
        for b, (lo, hi) in enumerate(new_ranges):
            if hi <= lo:
                continue
            at = state.lengths[b]
            state.keys[b, at : at + hi - lo] = k[b, lo:hi]
            state.values[b, at : at + hi - lo] = v[b, lo:hi]
            if c is not None:
                state.eviction[b, at : at + hi - lo] = c[b, lo:hi]
            state.lengths[b] = at + hi - lo

    def _update_windows(self, state: _LayerState, cfg, rows: list[int], sel, length: int) -> None:
        """Compress (and score and pool) the windows that the rows' new tokens completed. The rows share
        `length` and so their window count."""
        kernel, stride, bs = cfg.compress_kernel, cfg.compress_stride, cfg.block_size
        have = state.windows[rows[0]]
        total = num_complete_windows(length, kernel, stride)
        if total <= have:
            return
        batch, heads, dim = len(state.lengths), state.keys.shape[2], state.keys.shape[3]
        device = state.keys.device
        span = slice(stride * have, stride * (total - 1) + kernel)
        # The same op and token-order sums as the full forward's compression: identical rounding.
        compressed = ops.compress_keys(_take(state.keys, sel)[:, span], kernel, stride)  # [n, new, H, D]
        state.compressed = _grown(state.compressed, total, (batch, heads, dim), state.keys.dtype, device)
        state.compressed[sel, have:total] = compressed
        if state.eviction is not None:
            agnostic = ops.agnostic_chunk_scores(_take(state.eviction, sel)[:, span], kernel, stride)  # [n, new, H]
            state.agnostic = _grown(state.agnostic, total, (batch, heads), torch.float32, device)
            state.agnostic[sel, have:total] = agnostic
            num_blocks = -(-length // bs)
            state.agnostic_blocks = _grown(state.agnostic_blocks, num_blocks, (batch, heads), torch.float32, device, float("-inf"))
            for i in range(have, total):
                # Window i covers tokens [stride*i, stride*i + kernel): it raises every block it overlaps.
                first, last = stride * i // bs, (stride * i + kernel - 1) // bs
                block_rows = state.agnostic_blocks[sel, first : last + 1]
                state.agnostic_blocks[sel, first : last + 1] = torch.maximum(block_rows, agnostic[:, i - have, None])
        for r in rows:
            state.windows[r] = total

    def _prefill(self, state: _LayerState, cfg, rows: list[int], sel, queries: torch.Tensor, length: int):
        """Several queries (a prompt or a chunk of one), or dense mode: the full forward's op over the rows'
        keys, then the window state brought up to date."""
        keys = _take(state.keys, sel)[:, :length]
        values = _take(state.values, sel)[:, :length]
        eviction = None if state.eviction is None else _take(state.eviction, sel)[:, :length]
        out, selection = ops.nosa_attention(queries, keys, values, eviction, cfg, return_indices=True)
        if cfg.is_sparse:
            self._update_windows(state, cfg, rows, sel, length)
        return out, selection

    def _decode(self, state: _LayerState, cfg, rows: list[int], sel, queries: torch.Tensor, length: int):
        """One query per row at position length - 1: select from the kept state, attend to the selection."""
        self._update_windows(state, cfg, rows, sel, length)
        bs = cfg.block_size
        num_blocks = -(-length // bs)
        windows = state.windows[rows[0]]
        device = queries.device
        counting = self._counting(max(length, bs, state.keys.shape[2], len(rows)), device)
        position = counting[length - 1 : length]
        if windows > 0:
            compressed = _take(state.compressed, sel)[:, :windows]
        else:
            compressed = queries.new_zeros((len(rows), 0, state.keys.shape[2], state.keys.shape[3]))
        agnostic = None
        if state.eviction is not None:
            if state.agnostic_blocks is None or state.agnostic_blocks.shape[1] < num_blocks:
                heads = state.keys.shape[2]
                state.agnostic_blocks = _grown(state.agnostic_blocks, num_blocks, (len(state.lengths), heads),
                                               torch.float32, device, float("-inf"))
            agnostic = _take(state.agnostic_blocks, sel)[:, :num_blocks].transpose(1, 2)  # [n, H, NB]
        # The engine's selection entry point (one rule with training and prefill); the group's rows share
        # their position, hence uniform.
        positions = position.expand(len(rows))
        selection = ops.select_rows(queries[:, 0], compressed, agnostic, positions, num_blocks, cfg, uniform=True)[:, None]  # [n, 1, H, K]
        # The selected blocks' token slots, per KV head: [n, K * bs, H].
        picked = selection[:, 0].transpose(1, 2).long()  # [n, K, H]
        offsets = counting[:bs]
        tokens = (picked[:, :, None, :] * bs + offsets[None, None, :, None]).reshape(len(rows), -1, picked.shape[-1])
        valid = (picked[:, :, None, :] >= 0).expand(-1, -1, bs, -1).reshape(tokens.shape) & (tokens <= length - 1)
        tokens = tokens.clamp(0, length - 1)
        heads = counting[: tokens.shape[-1]]
        if isinstance(sel, slice):
            row_index = counting[: len(rows)][:, None, None]
        else:
            row_index = sel[:, None, None]
        k_slots = state.keys[row_index, tokens, heads]  # [n, S, H, D]
        v_slots = state.values[row_index, tokens, heads]
        bias = None if state.eviction is None else state.eviction[row_index, tokens, heads]
        out = ops.decode_attention(queries[:, 0], k_slots, v_slots, bias, valid)
        return out[:, None], selection
