"""The host KV store: the full K/V history of every sequence, paged by block (spec sec. 6).

Layout per side: [L, P, H, bs, D]; one page is one block of one sequence for all KV heads of a layer, so
one (block, head) is bs x D contiguous elements, the unit the gather kernel reads. With a CUDA device the
store is pinned host memory (the gather kernel reads it in place); with offload off it lives on the device
itself, and the engine is the on-GPU baseline with the same code path.

`num_pages` is a cap (the host memory budget), not an allocation: with offload on the store grows as
requests are admitted (geometrically, page indices kept), each growth checked against the host memory the
machine has available, so a budget larger than the machine fails with a message when the pages are
actually needed instead of an allocation error at start. `version` counts the reallocations: whoever holds
views of `k` / `v` (the runner, captured CUDA graphs) rebuilds them when it changes. With offload off the
store is device memory that the device budget already charged, allocated whole (and zeroed) at start: it
is the only copy of the KV, which decode attention reads in place (`ops.plan_in_place`), plus one scratch
page (`scratch_page`, never given out) that the padded decode step's rows without pages write into.
"""

from __future__ import annotations

import math

import torch

from nosa import ops
from nosa.engine.pinned import PinnedBuffer


class HostMemoryError(RuntimeError):
    """The host store cannot grow to the pages the admitted requests need: the machine lacks the memory."""


def available_host_memory() -> int | None:
    """Bytes of host memory available to a new allocation (Linux MemAvailable, else psutil), or None when
    the machine does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


class HostStore:
    def __init__(self, num_layers: int, num_pages: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, offload: bool):
        self.num_pages = num_pages  # the cap
        self.block_size = block_size
        self.offload = offload
        self.device = device
        self.dtype = dtype
        self._page_shape = (num_kv_heads, block_size, head_dim)
        self.num_layers = num_layers
        self.version = 0
        self._in_use = 0
        # Pinned memory is what makes the zero-copy gather possible (pageable memory runs ~3x slower).
        self._pin = offload and device.type == "cuda"
        # One page to start with (a real, pinned allocation), the rest as requests are admitted.
        # _buffers: what keeps the pinned store registered (empty when the store is not pinned).
        self.k, self.v, self._buffers = self._empty(min(num_pages, 1) if offload else num_pages + 1)
        self.scratch_page = None if offload else num_pages
        self._free = list(range((self.allocated_pages if offload else num_pages) - 1, -1, -1))

    def _empty(self, pages: int) -> tuple[torch.Tensor, torch.Tensor, tuple[PinnedBuffer, ...]]:
        shape = (self.num_layers, pages) + self._page_shape
        if not self.offload:
            # Zeroed: attention reads a tail page's unwritten tokens (masked, weight 0), and 0 x NaN of
            # uninitialised memory would not be 0. The slot path's pages only ever held written tokens.
            return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device), ())
        if not self._pin:
            return torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype), ()
        # Exact-size pinned buffers, not pin_memory=True (nosa.engine.pinned says why).
        nbytes = math.prod(shape) * torch.empty((), dtype=self.dtype).element_size()
        try:
            buffers = (PinnedBuffer(nbytes), PinnedBuffer(nbytes))
        except MemoryError as err:  # a HostMemoryError, so admission keeps the request waiting as for RAM
            raise HostMemoryError(f"the host KV store cannot pin {2 * nbytes / 2**30:.2f} GiB for {pages} pages: {err}") from err
        return buffers[0].tensor(shape, self.dtype), buffers[1].tensor(shape, self.dtype), buffers

    @staticmethod
    def page_bytes(num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one page (one block of one sequence, K and V, all layers)."""
        return 2 * num_layers * num_kv_heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def bytes_per_page(self) -> int:
        return self.page_bytes(self.num_layers, self._page_shape[0], self._page_shape[1], self._page_shape[2], self.dtype)

    @property
    def pinned(self) -> bool:
        """Whether the store is page-locked host memory that the gather kernel reads in place."""
        return bool(self._buffers) and all(b.registered for b in self._buffers)

    @property
    def allocated_pages(self) -> int:
        return self.k.shape[1]

    @property
    def free_pages(self) -> int:
        """Pages that can still be given out, up to the cap (allocated or not yet)."""
        return self.num_pages - self._in_use

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def capacity_bytes(self) -> int:
        """Bytes of the store at its cap (what the host memory budget allows)."""
        return self.num_pages * self.bytes_per_page

    def _grow(self, needed: int, exact: bool = False) -> None:
        """Reallocate to at least `needed` pages (doubling unless `exact`, within the cap and the machine's
        memory)."""
        old = self.allocated_pages
        target = min(self.num_pages, needed if exact else max(needed, 2 * old))
        available = available_host_memory()
        if available is not None and target * self.bytes_per_page > available:
            # Doubling does not fit (the new store must fit whole beside the old one, see below): take
            # exactly what the admitted requests need.
            target = needed
        new_bytes = target * self.bytes_per_page
        if available is not None and new_bytes > available:
            # The old store stays alive while it is copied, so the whole new one must fit beside it.
            raise HostMemoryError(
                f"the host KV store must grow to {needed} pages ({new_bytes / 2**30:.2f} GiB, K and V of "
                f"{self.num_layers} layers) for the admitted requests, but the machine has "
                f"{available / 2**30:.2f} GiB of host memory available; lower host_memory_budget (now "
                f"{self.capacity_bytes / 2**30:.2f} GiB), max_num_seqs or max_model_len"
            )
        k, v, buffers = self._empty(target)
        if self._pin:
            # Work already queued may still read the old store (a gather) or write it (a full tail block's
            # write-back): let it land before the copy, and before the old buffers unregister.
            torch.cuda.synchronize(self.device)
        if old:
            k[:, :old].copy_(self.k)
            v[:, :old].copy_(self.v)
        self.k, self.v, self._buffers = k, v, buffers  # the old store's buffers unregister as they go
        self._free = list(range(target - 1, old - 1, -1)) + self._free
        self.version += 1

    def reserve(self, pages: int) -> None:
        """Allocate room for `pages` pages in all (at most the cap) in one reallocation, where a caller knows
        what it will admit (a benchmark installing its whole batch): growth by doubling would copy the store
        log2(n) times and hold two stores at once each time."""
        pages = min(pages, self.num_pages)
        if self.offload and pages > self.allocated_pages:
            self._grow(pages, exact=True)

    def allocate(self, count: int) -> list[int]:
        if count > self.free_pages:
            raise RuntimeError(f"host store has {self.free_pages} free pages, {count} requested")
        if count > len(self._free):
            self._grow(self._in_use + count)
        self._in_use += count
        return [self._free.pop() for _ in range(count)]

    def release(self, pages: list[int]) -> None:
        self._in_use -= len(pages)
        self._free.extend(reversed(pages))

    def write_tokens(self, layer: int, pages: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the first T tokens of a sequence. k, v: [T, H, D] (any device) -> pages[0 : ceil(T / bs)]."""
        length = k.shape[0]
        num_blocks = ops.num_blocks(length, self.block_size)
        pad = num_blocks * self.block_size - length
        index = torch.tensor(pages[:num_blocks], dtype=torch.long, device=self.k.device)
        for side, data in ((self.k, k), (self.v, v)):
            data = torch.nn.functional.pad(data, (0, 0, 0, 0, 0, pad))
            blocks = data.view(num_blocks, self.block_size, data.shape[1], data.shape[2]).transpose(1, 2)
            side[layer].index_copy_(0, index, blocks.to(side.device, side.dtype))
