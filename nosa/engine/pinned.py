"""Pinned host memory of exactly the size asked for, for the host KV store.

`torch.empty(..., pin_memory=True)` goes through PyTorch's caching host allocator, which rounds every
allocation up to a power of two and keeps freed blocks cached for reuse. For a store of tens of GiB that
grows by reallocation that is ruinous: 121 rows of 64K tokens (4 layers of the 8B shape, 34.7 GB) pin a
64 GiB block, and each smaller store left behind by a growth stays pinned in the cache, so the machine's
RAM, not the budget, capped the benchmarks' offloaded batch at 48. A `PinnedBuffer` maps anonymous memory
of the exact byte count (asking the kernel for transparent huge pages, which make pinning faster and the
device's page translations fewer), registers it with `cudaHostRegister` (so the gather kernel reads it in
place over unified addressing, as it reads any pinned tensor) and unregisters it when the buffer is
collected; the mapping itself goes once the last tensor viewing it does.
"""

from __future__ import annotations

import math
import mmap
import weakref

import torch


def _register(address: int, nbytes: int) -> int:
    return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0))


def _unregister(address: int) -> int:
    return int(torch.cuda.cudart().cudaHostUnregister(address))


class PinnedBuffer:
    """`nbytes` of page-locked host memory; `tensor(shape, dtype)` views it. Registration lasts as long as
    this object: whoever keeps using the memory for transfers keeps the buffer (the host store does)."""

    # Module-level hooks so tests on machines without CUDA can check the registration's lifetime.
    register = staticmethod(_register)
    unregister = staticmethod(_unregister)

    def __init__(self, nbytes: int):
        if nbytes <= 0:
            raise ValueError(f"PinnedBuffer: nbytes must be positive, got {nbytes}")
        self.nbytes = nbytes
        try:
            self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError) as err:
            raise MemoryError(f"could not map {nbytes / 2**30:.2f} GiB of host memory: {err}") from err
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # transparent huge pages disabled: 4 KiB pages work, pinning is just slower
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.address = self._bytes.data_ptr()
        error = type(self).register(self.address, nbytes)
        if error != 0:
            raise MemoryError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory failed (cudaError {error}): "
                              "the machine cannot lock that much memory (check `ulimit -l` and the free RAM)")
        # Unregister before the mapping can go: weakref callbacks run before the object's attributes
        # (and so the map) are released.
        self._finalizer = weakref.finalize(self, type(self).unregister, self.address)

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor of `shape` and `dtype` over the whole buffer (its bytes must match exactly)."""
        elem = torch.empty((), dtype=dtype).element_size()
        if math.prod(shape) * elem != self.nbytes:
            raise ValueError(f"PinnedBuffer.tensor: {tuple(shape)} of {dtype} is not {self.nbytes} bytes")
        return self._bytes.view(dtype).view(shape)

    @property
    def registered(self) -> bool:
        return self._finalizer.alive
