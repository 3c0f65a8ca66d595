"""The device side of NOSI: per-row block cache, slot tables and incremental selection state.

A row is one running sequence. For every layer the device holds (spec sec. 6):
  slot_k, slot_v [L, R*K, bs, H, D]  K slots of bs tokens per (row, KV head); slot j of head h holds the
                                     block named by table[l, r, h, j]; viewed per row as [R, K*bs, H, D],
                                     the layout `decode_attention` takes
  table          [L, R, H, K] int32  block id per slot, -1 empty
  page_table     [R, NB]     int32  host page of each block of the row (-1: none; gathers skip it)
  compressed     [L, R, Nc, H, D]    compressed keys of the complete windows (sparse modes)
  agnostic       [L, R, Nc, H] f32   window means of the eviction score (dma, nosa)
  agnostic_blocks [L, R, H, NB] f32  those pooled to blocks (max over the block's complete windows, -inf
                                     without one), kept up to date as windows complete, so selection
                                     never re-pools the whole history (dma, nosa)
  eviction       [L, R, T, H] f32    per-token eviction score c (the attention bias; dma, nosa)
  recent_keys    [L, R, kernel, H, D] ring of the last `compress_kernel` keys, so a window completing at
                                     decode is compressed without touching the host store
  spill_k, spill_v [L, R*E, bs, H, D] the device cache beyond the selection (sparse modes, E =
                                     device_cache_blocks - topk_blocks > 0): blocks that left the selection,
  spill_table, spill_stamp [L, R, H, E] their block ids (-1 empty) and the position each left the selection
                                     (least recently selected is replaced first; `ops.spill_step`)
Pooled (offload on with spill slots, `POOL_DEVICE_CACHE`): slot_k / slot_v are [L, R*C, bs, H, D], the C =
K + E pages of each row that its selection and spill slots share, spill_k / spill_v are None, and
  pool_map       [L, R, H, C] int32  the page (r*C + entry) of selection slot j (entry j) and of spill slot e
                                     (entry K + e); a block moving between the two swaps entries, no K/V copy
  slot_page      [R, H, K]   int32  the page of each selection slot of the layer being run, written by
                                     `plan_step`, read by decode attention (shared by the layers)
K = topk_blocks in the sparse modes; in dense mode every block is selected, so K = NB.
Only slot_k/slot_v scale with the selection; the small state scales with T / stride (compressed keys) and
T x H floats (eviction scores), as the spec allows.

One copy (`in_place`, offload off): the store itself is on the device, so slot_k / slot_v / spill_k /
spill_v are not allocated (None; the spill tables are, see `spill_count`) and decode attention reads the
store's pages in place through
  slot_page      [R, H, K]   int32  store page of each slot's block of the layer being run (-1 none);
                                     shared by the layers, rewritten by each layer's `ops.plan_in_place`
The slot table keeps its meaning (same blocks in the same slots as with offload on, so the results are
equal bit for bit); the device then holds the KV once.
"""

from __future__ import annotations

import torch

from nosa import ops
from nosa.config import SparseAttentionConfig

# A device cache beyond the selection as one pool of pages per row with a page map (blocks move between the
# selection and spill slots by swapping map entries), instead of separate slot and spill pages between
# which `spill_step` copies each moving block's K/V (0.35 ms of a 4.9 ms step on an H100 at 64K, 121 rows,
# bench/results/decode_64k_step_h100_profile.txt). Same values in the same slots: the tokens are equal
# (tests/engine/test_pooled_cache.py, CPU with the Triton kernels under the interpreter). Off by default
# until its GPU tests (tests/engine/test_gpu.py) have run and `nosa bench decode` has timed it against the
# copies (config tokens poolcache / copycache): neither has happened yet (2026-12-08: no GPU was lent after
# it was written). Read when a cache is built.
POOL_DEVICE_CACHE = False


class BlockCache:
    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, cfg: SparseAttentionConfig, max_model_len: int,
                 device_cache_blocks: int | None = None, in_place: bool = False):
        self.cfg = cfg
        self.in_place = in_place
        self.rows = rows
        self.num_kv_heads = num_kv_heads
        self.block_size = cfg.block_size
        self.max_blocks = ops.num_blocks(max_model_len, cfg.block_size)
        self.slots = self.slot_count(cfg, max_model_len)
        self.num_windows = self.window_count(cfg, max_model_len)
        L, R, H, D, K, bs = num_layers, rows, num_kv_heads, head_dim, self.slots, cfg.block_size
        self.device, self.dtype, self.head_dim = device, dtype, head_dim
        self.spill_blocks = E = self.spill_count(cfg, device_cache_blocks)
        self.pooled = self.is_pooled(cfg, device_cache_blocks, in_place)
        self.slot_k = self.slot_v = self.slot_page = self.pool_map = None
        if in_place or self.pooled:
            self.slot_page = torch.full((R, H, K), -1, dtype=torch.int32, device=device)
        if not in_place:
            pages = R * (K + E) if self.pooled else R * K
            self.slot_k = torch.zeros((L, pages, bs, H, D), dtype=dtype, device=device)
            self.slot_v = torch.zeros_like(self.slot_k)
        if self.pooled:
            self.pool_map = torch.arange(K + E, dtype=torch.int32, device=device).repeat(L, R, H, 1)
        self.table = torch.full((L, R, H, K), -1, dtype=torch.int32, device=device)
        self.page_table = torch.full((R, self.max_blocks), -1, dtype=torch.int32, device=device)
        self.compressed = self.agnostic = self.agnostic_blocks = self.eviction = self.recent_keys = None
        self.spill_k = self.spill_v = self.spill_table = self.spill_stamp = None
        if self.spill_blocks:
            if not in_place and not self.pooled:
                self.spill_k = torch.zeros((L, R * E, bs, H, D), dtype=dtype, device=device)
                self.spill_v = torch.zeros_like(self.spill_k)
            self.spill_table = torch.full((L, R, H, E), -1, dtype=torch.int32, device=device)
            self.spill_stamp = torch.full((L, R, H, E), -1, dtype=torch.int32, device=device)
        if cfg.is_sparse:
            self.compressed = torch.zeros((L, R, self.num_windows, H, D), dtype=dtype, device=device)
            self.recent_keys = torch.zeros((L, R, cfg.compress_kernel, H, D), dtype=dtype, device=device)
        if cfg.uses_eviction_head:
            self.agnostic = torch.zeros((L, R, self.num_windows, H), dtype=torch.float32, device=device)
            self.agnostic_blocks = torch.full((L, R, H, self.max_blocks), float("-inf"), dtype=torch.float32, device=device)
            self.eviction = torch.zeros((L, R, max_model_len, H), dtype=torch.float32, device=device)

    @staticmethod
    def slot_count(cfg: SparseAttentionConfig, max_model_len: int) -> int:
        return cfg.topk_blocks if cfg.is_sparse else ops.num_blocks(max_model_len, cfg.block_size)

    @staticmethod
    def spill_count(cfg: SparseAttentionConfig, device_cache_blocks: int | None) -> int:
        """Spill slots per (layer, row, KV head): device_cache_blocks (the blocks the device holds per
        (layer, sequence, KV head), None: topk_blocks) minus the topk_blocks selection slots. In place
        (offload off) only their tables exist: the bookkeeping runs so the slot tables, and the results,
        equal offload on's bit for bit, and nothing is copied."""
        if device_cache_blocks is None:
            return 0
        if not cfg.is_sparse:
            raise ValueError("device_cache_blocks applies to the sparse attn_modes; dense mode holds every block")
        if isinstance(device_cache_blocks, bool) or not isinstance(device_cache_blocks, int) or device_cache_blocks < cfg.topk_blocks:
            raise ValueError(f"device_cache_blocks must be an integer >= topk_blocks={cfg.topk_blocks} (the selection "
                             f"itself is always resident) or 'auto' (given to LLM), got {device_cache_blocks!r}")
        return device_cache_blocks - cfg.topk_blocks

    @staticmethod
    def is_pooled(cfg: SparseAttentionConfig, device_cache_blocks: int | None, in_place: bool) -> bool:
        """Whether the slot and spill pages form one pool with a page map (`POOL_DEVICE_CACHE`, offload on,
        spill slots)."""
        return POOL_DEVICE_CACHE and not in_place and BlockCache.spill_count(cfg, device_cache_blocks) > 0

    @staticmethod
    def window_count(cfg: SparseAttentionConfig, max_model_len: int) -> int:
        """Compressed-window capacity of a row: the windows complete in max_model_len tokens (at least one
        slot, so the buffers are never empty)."""
        return max(1, ops.reference.num_complete_windows(max_model_len, cfg.compress_kernel, cfg.compress_stride))

    @staticmethod
    def row_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  cfg: SparseAttentionConfig, max_model_len: int, device_cache_blocks: int | None = None,
                  in_place: bool = False) -> dict:
        """Device bytes of one row, by part (what `BlockCache` allocates per row; in place: no KV slots,
        the store's pages, charged by the budget, are the one copy)."""
        elem = torch.empty((), dtype=dtype).element_size()
        L, H, D, bs = num_layers, num_kv_heads, head_dim, cfg.block_size
        slots = BlockCache.slot_count(cfg, max_model_len)
        windows = BlockCache.window_count(cfg, max_model_len)
        spill = BlockCache.spill_count(cfg, device_cache_blocks)
        pooled = BlockCache.is_pooled(cfg, device_cache_blocks, in_place)
        parts = {
            "kv_slots": 0 if in_place else 2 * L * slots * bs * H * D * elem,
            # + the attention's page per slot (one copy, pooled) and the pool's page map
            "tables": 4 * ((L + (in_place or pooled)) * H * slots + ops.num_blocks(max_model_len, bs)
                           + (L * H * (slots + spill) if pooled else 0)),
            "compressed_keys": L * (windows + cfg.compress_kernel) * H * D * elem if cfg.is_sparse else 0,
            "eviction_state": 4 * L * H * (windows + max_model_len + ops.num_blocks(max_model_len, bs)) if cfg.uses_eviction_head else 0,
            "spill_slots": (0 if in_place else 2 * L * spill * bs * H * D * elem) + 8 * L * H * spill,
        }
        parts["total"] = sum(parts.values())
        return parts

    def allocated_bytes(self) -> dict:
        """Bytes actually allocated, by part, for all rows (the tests check these)."""
        def size(*ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        parts = {
            "kv_slots": size(self.slot_k, self.slot_v),
            "tables": size(self.table, self.page_table, self.slot_page, self.pool_map),
            "compressed_keys": size(self.compressed, self.recent_keys),
            "eviction_state": size(self.agnostic, self.agnostic_blocks, self.eviction),
            "spill_slots": size(self.spill_k, self.spill_v, self.spill_table, self.spill_stamp),
        }
        if self.pooled:  # the pool's spill pages, counted where the separate spill pages would be
            spill_pages = 2 * self.slot_k.shape[0] * self.rows * self.spill_blocks * self.slot_k[0, 0].numel() * self.slot_k.element_size()
            parts["kv_slots"] -= spill_pages
            parts["spill_slots"] += spill_pages
        parts["total"] = sum(parts.values())
        return parts

    def layer_spill(self, layer: int, hits: torch.Tensor):
        """The spill slots of one layer as `ops.spill_step` takes them (None without spill slots)."""
        if not self.spill_blocks:
            return None
        # One copy: nothing to copy; pooled: the spill slots' pages are the pool's (moved by the page map).
        k, v = (None, None) if self.spill_k is None else (self.spill_k[layer], self.spill_v[layer])
        return ops.SpillSlots(self.spill_table[layer], self.spill_stamp[layer], k, v, hits)

    def slot_pages(self, layer: int, side: str) -> torch.Tensor:
        """The slot cache of one layer as pages [R*K, H, bs, D] (pooled: [R*C, H, bs, D]; a view), the layout
        of host pages."""
        self._needs_slots()
        return (self.slot_k if side == "k" else self.slot_v)[layer].transpose(1, 2)

    def row_view(self, layer: int, side: str) -> torch.Tensor:
        """[R, K*bs, H, D] view: what `decode_attention` reads (not pooled: that reads `slot_pages` through
        `slot_page`)."""
        self._needs_slots()
        if self.pooled:
            raise RuntimeError("a pooled cache's slots are read through slot_page, not as rows")
        t = (self.slot_k if side == "k" else self.slot_v)[layer]
        return t.view(self.rows, self.slots * self.block_size, t.shape[-2], t.shape[-1])

    def _needs_slots(self) -> None:
        if self.in_place:
            raise RuntimeError("this cache reads the store in place (offload off): it has no slot pages")

    def reset_row(self, row: int, pages: list[int]) -> None:
        """Give row `row` to a new sequence whose block b lives in host page pages[b]."""
        self.table[:, row] = -1
        self.page_table[row] = -1
        if self.spill_table is not None:
            self.spill_table[:, row] = -1
        if self.pool_map is not None:  # any permutation would do; the identity lets the install index directly
            self.pool_map[:, row] = torch.arange(self.pool_map.shape[-1], dtype=torch.int32, device=self.device)
        if pages:
            self.page_table[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32, device=self.page_table.device)

    def release_row(self, row: int) -> None:
        """A finished row: no host page, so the (padded) decode step never reads or writes the store for it."""
        self.page_table[row] = -1
        self.table[:, row] = -1
        if self.spill_table is not None:
            self.spill_table[:, row] = -1
