"""`NosaCache`: a transformers `Cache` that keeps NOSA's incremental decoding state, so that each step of
`model.generate` costs one token's work instead of re-running compression, pooling and selection over the
whole cache (what the plain `DynamicCache` path does, since it only stores keys and values).

Per layer and row it keeps (in a `decode_step.Workspace`, preallocated at a capacity that doubles when
outgrown, so no step concatenates): the keys and values; the eviction scores c (dma, nosa); the last
`compress_kernel` keys; the compressed keys of every complete window and, for the eviction-head modes, each
window's query-agnostic score and those scores max-pooled to blocks (spec 4.3-4.4; the max is exact, so the
pooled scores equal `pool_to_blocks` over all windows).

Two paths:
  - the decode step (`decode`), one new token for every row, the step `generate` runs after the prompt:
    the engine's decode ops over that state (`decode_step.DecodeStep`), graph-captured on CUDA, eager on
    the CPU; each step compresses at most the window the token completes and attends to the selected
    blocks only;
  - everything else (a prompt, a chunk of one, right padding): per group of rows of equal length,
    `ops.nosa_attention` over the row's keys, exactly as the full forward computes it, then the windows
    those tokens completed are compressed, scored and pooled into the state.

Rows are stored in their own coordinates (padding stripped: the row's first real token is slot 0), which is
what `SequenceSpans` defines for a padded batch.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache

from nosa import ops
from nosa.models.decode_step import DecodeStep, Workspace, capacity_for
from nosa.ops.reference import num_complete_windows


def _take(tensor: torch.Tensor, rows) -> torch.Tensor:
    """tensor[rows] along dim 0, a view when `rows` is a slice (every row: no copy)."""
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


class NosaCache(Cache):
    """Incremental NOSA state for `NosaForCausalLM` (the default cache of its `generate`). Works for every
    attn_mode; dense mode keeps keys and values only. Beam search reorders it; `crop` (assisted decoding)
    is not supported. capacity: tokens per row to allocate at first (generate passes its max_length), grown
    by doubling beyond it."""

    # NosaAttention looks for this flag and hands its step to `attend_layer` instead of calling `update`.
    keeps_nosa_state = True

    def __init__(self, config=None, *args, capacity: int | None = None, **kwargs):
        super().__init__(layers=[])
        self.config = config
        self.capacity_hint = capacity
        self.ws: Workspace | None = None
        self._pool: DecodeStep | None = None
        self._finalizer = None
        # Per layer (a layer's state advances when that layer runs): real tokens per row, complete windows
        # per row, and key slots seen (padding included, what get_seq_length reports).
        self._lengths: dict[int, list[int]] = {}
        self._windows: dict[int, list[int]] = {}
        self._slots: dict[int, int] = {}
        self._row_ends: list[int] | None = None  # the slot after each row's last real token (layer 0)
        self.decode_steps = 0  # steps that ran the decode step (tests and the benchmark read it)
        self.use_decode_step = True  # False: every step takes the general path (tests compare the two)

    # ------------------------------------------------------------------------------ Cache interface
    def __len__(self) -> int:
        return len(self._slots)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._slots.get(layer_idx, 0)

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
        self._set_workspace(None)
        self._lengths.clear()
        self._windows.clear()
        self._slots.clear()
        self._row_ends = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row r becomes row beam_idx[r]. In place, so the workspace (and its graphs) stay."""
        if self.ws is None:
            return
        index = beam_idx.to(self.ws.device)
        for tensor in self.ws.per_row_tensors():
            tensor.copy_(tensor.index_select(0, index))
        self._select_host_rows(beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._new_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.ws is not None:
            self._new_batch(torch.arange(self.ws.batch, device=self.ws.device).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("NosaCache cannot be cropped (assisted decoding); pass a DynamicCache instead")

    def _select_host_rows(self, rows: list[int]) -> None:
        for table in (self._lengths, self._windows):
            for l, values in table.items():
                table[l] = [values[r] for r in rows]
        if self._row_ends is not None:
            self._row_ends = [self._row_ends[r] for r in rows]

    def _new_batch(self, index: torch.Tensor) -> None:
        if self.ws is None:
            return
        old = self.ws
        index = index.to(old.device)
        ws = self._acquire(len(index), old.capacity, old.dtype, old.device)
        ws.copy_rows_from(old, index)
        self._set_workspace(ws)
        self._select_host_rows(index.tolist())

    # ------------------------------------------------------------------------------ workspace
    def bind(self, model) -> None:
        """Called by NosaModel.forward: the model's config and its pool of workspaces (`DecodeStep`)."""
        if self.config is None:
            self.config = model.config
        if self._pool is None:
            self._pool = model.decode_step

    def _acquire(self, batch, capacity, dtype, device) -> Workspace:
        if self.config is None:
            raise ValueError("NosaCache needs the model's config (NosaCache(model.config)) or a forward of the model")
        if self._pool is not None:
            return self._pool.acquire(self.config, batch, capacity, dtype, device)
        return Workspace(self.config, batch, capacity, dtype, device)

    def _set_workspace(self, ws: Workspace | None) -> None:
        if self._finalizer is not None:
            self._finalizer()  # the previous workspace goes back to the pool now
            self._finalizer = None
        self.ws = ws
        if ws is not None and self._pool is not None:
            # When the cache is dropped (generate's, once the call returns), its workspace and graphs go
            # back to the model's pool for the next call of the same batch and capacity.
            self._finalizer = weakref.finalize(self, self._pool.release, ws)

    def _ensure(self, batch: int, needed: int, dtype, device) -> Workspace:
        """The workspace, with room for `needed` tokens per row (grown by doubling, the state copied)."""
        ws = self.ws
        if ws is not None and (ws.batch != batch or ws.dtype != dtype or ws.device != torch.device(device)):
            raise ValueError(f"NosaCache holds {ws.batch} rows of {ws.dtype} on {ws.device}; this step has "
                             f"batch {batch} of {dtype} on {device}")
        if ws is not None and ws.capacity >= needed:
            return ws
        bs = self.config.sparse.block_size
        capacity = capacity_for(needed, self.capacity_hint, None if ws is None else ws.capacity, bs,
                                self.config.max_position_embeddings)
        grown = self._acquire(batch, capacity, dtype, device)
        if ws is not None:
            grown.copy_rows_from(ws)
        self._set_workspace(grown)
        return grown

    # ------------------------------------------------------------------------------ accounting
    def row_lengths(self, layer_idx: int) -> list[int]:
        """Real tokens cached per row for one layer (tests and accounting)."""
        return list(self._lengths.get(layer_idx, []))

    @property
    def capacity(self) -> int:
        """Tokens per row allocated now (0 before the first step)."""
        return 0 if self.ws is None else self.ws.capacity

    # ------------------------------------------------------------------------------ the decode step
    @torch.no_grad()
    def decode(self, model, input_ids, attention_mask, position_ids) -> torch.Tensor | None:
        """The decode step of `NosaForCausalLM.forward` (which binds the model first): logits [B, 1, V]
        when this forward is one new token for every row after all of them, with a mask (if any) of the
        cached rows plus one and position_ids (if any) the rows' positions; else None (the caller takes the
        general path, which also names whatever is wrong with the inputs)."""
        ws, layers = self.ws, model.config.num_hidden_layers
        if not self.use_decode_step or ws is None or input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return None
        batch = input_ids.shape[0]
        slots = self._slots.get(0, 0)
        if (batch != ws.batch or len(self._slots) != layers or any(s != slots for s in self._slots.values())
                or self._row_ends is None or any(e != slots for e in self._row_ends) or input_ids.device != ws.device
                or input_ids.dtype.is_floating_point or slots + 1 > model.config.max_position_embeddings
                or model.dtype != ws.dtype):
            return None
        lengths = self._lengths[0]
        if any(self._lengths[l] != lengths for l in range(layers)):
            return None
        # One host sync checks the inputs against the state: token ids in range, the mask equal to each
        # row's run of ones (its cached tokens and this one) and position_ids, if given, the rows' positions.
        vocab = model.config.vocab_size
        bad = ((input_ids < 0) | (input_ids >= vocab)).any()
        if attention_mask is not None:
            if attention_mask.shape != (batch, slots + 1):
                return None
            # (Every row may start after slot 0, so slots can exceed the capacity.)
            counting = ws.counting if slots < ws.counting.numel() else torch.arange(slots + 1, device=ws.device)
            expected = counting[None, : slots + 1] >= (slots - ws.positions)[:, None]
            bad = bad | (attention_mask.to(ws.device) != expected).any()
        elif any(n != slots for n in lengths):
            return None
        if position_ids is not None:
            if position_ids.shape not in ((batch, 1), (1, 1)):
                return None
            bad = bad | (position_ids.to(ws.device)[:, 0] != ws.positions).any()
        if bool(bad):
            return None
        needed = max(lengths) + 1
        if needed > ws.capacity:
            ws = self._ensure(batch, needed, ws.dtype, ws.device)
        logs = [layer.self_attn.selection_log for layer in model.model.layers]
        logs = None if all(log is None for log in logs) else logs
        logits = model.model.decode_step(model, ws, input_ids, lengths, logs=logs)
        kernel, stride = model.config.sparse.compress_kernel, model.config.sparse.compress_stride
        lengths = [n + 1 for n in lengths]
        windows = [num_complete_windows(n, kernel, stride) for n in lengths]
        for l in range(layers):
            self._lengths[l], self._windows[l], self._slots[l] = list(lengths), list(windows), slots + 1
        self._row_ends = [slots + 1] * batch
        self.decode_steps += 1
        return logits

    # ------------------------------------------------------------------------------ the general path
    @torch.no_grad()
    def attend_layer(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans) -> torch.Tensor:
        """One layer's attention for the new tokens, updating this layer's state.

        attn: the NosaAttention (its eviction head, sparse config, layer index, selection log); q: [B, Tq,
        Hq, D], k, v: [B, Tq, H, D] of the new key slots; spans over past + new slots -> [B, Tq, Hq, D]."""
        cfg, l = attn.sparse, attn.layer_idx
        batch, num_queries = q.shape[:2]
        lengths = self._lengths.setdefault(l, [0] * batch)
        windows = self._windows.setdefault(l, [0] * batch)
        if len(lengths) != batch:
            raise ValueError(f"NosaCache holds {len(lengths)} rows but this step has batch {batch}")
        first_new = self._slots.get(l, 0)  # padded slot of the first new token
        if spans.total != first_new + num_queries:
            raise ValueError(f"attention_mask covers {spans.total} slots but the cache holds {first_new} + {num_queries} new")
        # Row b's new real tokens are its slots in [max(start, first_new), end); the ones before must be cached.
        new_ranges = []
        for b, (start, end) in enumerate(zip(spans.starts, spans.ends)):
            lo, hi = max(start, first_new), end
            expected_cached = max(0, min(end, first_new) - start)
            if lengths[b] != expected_cached:
                raise ValueError(
                    f"row {b}: attention_mask says {expected_cached} earlier tokens, the cache holds {lengths[b]}"
                )
            new_ranges.append((lo - first_new, max(lo, hi) - first_new))
        c = attn.eviction_scores(v) if cfg.uses_eviction_head else None
        needed = max(n + (hi - lo) for n, (lo, hi) in zip(lengths, new_ranges))
        ws = self._ensure(batch, max(needed, 1), k.dtype, k.device)
        self._append(ws, l, k, v, c, lengths, new_ranges)
        out = None
        # Rows with the same (cached length, new queries) take one batched call.
        groups: dict[tuple[int, int, int], list[int]] = {}
        for b, (lo, hi) in enumerate(new_ranges):
            if hi > lo:
                groups.setdefault((lengths[b], lo, hi), []).append(b)
        for (length, lo, hi), rows in groups.items():
            # Every row in one group (no padding): views, not copies.
            sel = slice(None) if len(rows) == batch else torch.tensor(rows, device=q.device)
            queries = _take(q, sel)[:, lo:hi]
            keys = _take(ws.keys[l], sel)[:, :length]
            values = _take(ws.values[l], sel)[:, :length]
            eviction = None if ws.eviction is None else _take(ws.eviction[l], sel)[:, :length]
            result, selection = ops.nosa_attention(queries, keys, values, eviction, cfg, return_indices=True)
            if cfg.is_sparse:
                self._update_windows(ws, l, cfg, rows, sel, length, windows)
            if attn.selection_log is not None and selection is not None:
                attn.selection_log.append(selection)
            if isinstance(sel, slice) and lo == 0 and hi == num_queries:
                out = result
            else:
                out = torch.zeros_like(q) if out is None else out
                out[sel, lo:hi] = result
        self._slots[l] = first_new + num_queries
        if l == 0:
            self._row_ends = list(spans.ends)
        # The decode step reads the rows' positions from the device.
        ws.positions.copy_(torch.tensor(lengths, dtype=torch.long), non_blocking=False)
        return torch.zeros_like(q) if out is None else out

    @staticmethod
    def _append(ws: Workspace, l: int, k, v, c, lengths: list[int], new_ranges) -> None:
        """Write the new tokens at each row's length (and advance `lengths` in place)."""
        keys, values = ws.keys[l], ws.values[l]
        eviction = None if c is None else ws.eviction[l]
        ring = ws.ring[l] if ws.ring is not None else None
        kernel = ring.shape[1] if ring is not None else 0
        batch = k.shape[0]
        if len(set(new_ranges)) == 1 and len(set(lengths)) == 1:  # no padding: one copy per tensor
            spans = [(slice(None), lengths[0], new_ranges[0])]
        else:
            spans = [(b, lengths[b], new_ranges[b]) for b in range(batch)]
        for rows, at, (lo, hi) in spans:
            n = hi - lo
            if n <= 0:
                continue
            keys[rows, at : at + n] = k[rows, lo:hi]
            values[rows, at : at + n] = v[rows, lo:hi]
            if eviction is not None:
                eviction[rows, at : at + n] = c[rows, lo:hi].to(eviction.dtype)
            if ring is not None:
                # The ring keeps the last `kernel` keys (token s at s % kernel), what the decode step reads.
                recent = torch.arange(max(0, at + n - kernel), at + n, device=keys.device)
                ring[rows, recent % kernel] = keys[rows, recent]
            if isinstance(rows, slice):
                lengths[:] = [at + n] * batch
            else:
                lengths[rows] = at + n

    @staticmethod
    def _update_windows(ws: Workspace, l: int, cfg, rows: list[int], sel, length: int, windows: list[int]) -> None:
        """Compress (and score and pool) the windows that the rows' new tokens completed. The rows share
        `length` and so their window count."""
        kernel, stride, bs = cfg.compress_kernel, cfg.compress_stride, cfg.block_size
        have = windows[rows[0]]
        total = num_complete_windows(length, kernel, stride)
        if total <= have:
            return
        span = slice(stride * have, stride * (total - 1) + kernel)
        # The same op and token-order sums as the full forward's compression: identical rounding.
        ws.compressed[l][sel, have:total] = ops.compress_keys(_take(ws.keys[l], sel)[:, span], kernel, stride)
        if ws.eviction is not None:
            agnostic = ops.agnostic_chunk_scores(_take(ws.eviction[l], sel)[:, span], kernel, stride)  # [n, new, H]
            ws.agnostic[l][sel, have:total] = agnostic
            blocks = ws.agnostic_blocks[l]  # [B, H, NB]
            for i in range(have, total):
                # Window i covers tokens [stride*i, stride*i + kernel): it raises every block it overlaps.
                first, last = stride * i // bs, (stride * i + kernel - 1) // bs
                current = blocks[sel, :, first : last + 1]
                blocks[sel, :, first : last + 1] = torch.maximum(current, agnostic[:, i - have, :, None])
        for r in rows:
            windows[r] = total
