"""The host KV store: the full K/V history of every sequence, paged by block (spec sec. 6).

Layout per side: [L, P, H, bs, D]; one page is one block of one sequence for all KV heads of a layer, so
one (block, head) is bs x D contiguous elements, the unit the gather kernel reads. With a CUDA device the
store is pinned host memory (the gather kernel reads it in place); with offload off it lives on the device
itself, and the engine is the on-GPU baseline with the same code path.
"""

from __future__ import annotations

import torch


class HostStore:
    def __init__(self, num_layers: int, num_pages: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, offload: bool):
        self.num_pages = num_pages
        self.block_size = block_size
        shape = (num_layers, num_pages, num_kv_heads, block_size, head_dim)
        if offload:
            # Pinned memory is what makes the zero-copy gather possible (pageable memory runs ~3x slower).
            pin = device.type == "cuda"
            self.k = torch.empty(shape, dtype=dtype, pin_memory=pin)
            self.v = torch.empty(shape, dtype=dtype, pin_memory=pin)
        else:
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))

    @staticmethod
    def page_bytes(num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one page (one block of one sequence, K and V, all layers)."""
        return 2 * num_layers * num_kv_heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"host store has {len(self._free)} free pages, {count} requested")
        return [self._free.pop() for _ in range(count)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def write_tokens(self, layer: int, pages: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the first T tokens of a sequence. k, v: [T, H, D] (any device) -> pages[0 : ceil(T / bs)]."""
        length = k.shape[0]
        num_blocks = -(-length // self.block_size)
        pad = num_blocks * self.block_size - length
        index = torch.tensor(pages[:num_blocks], dtype=torch.long, device=self.k.device)
        for side, data in ((self.k, k), (self.v, v)):
            data = torch.nn.functional.pad(data, (0, 0, 0, 0, 0, pad))
            blocks = data.view(num_blocks, self.block_size, data.shape[1], data.shape[2]).transpose(1, 2)
            side[layer].index_copy_(0, index, blocks.to(side.device, side.dtype))
