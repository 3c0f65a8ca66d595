"""Pinned host memory of exactly the size asked for, for the host KV store.

`torch.empty(..., pin_memory=True)` goes through PyTorch's caching host allocator, which rounds every
allocation up to a power of two and keeps freed blocks cached for reuse. For a store of tens of GiB that
grows by reallocation that costs up to twice its size: each K or V side of a 121-row store of 64K tokens
(4 layers of the 8B shape, 32.5 GB in all) takes a 16 GiB block for its 15.1 GiB, and every smaller store a
growth left behind (about as much again, summed) stays pinned in the cache. A `PinnedBuffer` maps anonymous memory
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


# cudaHostRegisterPortable | cudaHostRegisterMapped: pinned for every CUDA context (an engine on cuda:1 while
# cuda:0 is current registers it too) and mapped into the device's address space, as cudaHostAlloc'd memory
# (torch's pinned tensors) is under unified addressing.
_REGISTER_FLAGS = 0x01 | 0x02


def _register(address: int, nbytes: int) -> int:
    return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, _REGISTER_FLAGS))


def _unregister(address: int) -> int:
    # Work still queued on the device may read the buffer (a gather) or write it (a tail block's write-back):
    # let it finish first, as the caching allocator's recorded events did for pin_memory=True tensors.
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        pass  # the CUDA context is already gone (interpreter exit): nothing can be in flight
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
        for advice in ("MADV_HUGEPAGE", "MADV_DONTFORK"):
            # Huge pages: faster pinning, fewer device page translations (4 KiB pages work too). Not
            # inherited by a fork (a data loader's workers, say): a child would otherwise get a copy of the
            # locked pages at fork time, tens of GiB.
            if hasattr(mmap, advice):
                try:
                    self._map.madvise(getattr(mmap, advice))
                except OSError:
                    pass
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.address = self._bytes.data_ptr()
        error = type(self).register(self.address, nbytes)
        if error != 0:
            raise MemoryError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory failed (cudaError {error}): "
                              "the machine cannot lock that much memory (check its free RAM)")
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
