"""The eviction head (spec sec. 3): a query-independent importance score per token and KV head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class EvictionHead(nn.Module):
    """c[s, h] = A[h] * softplus(delta(v_s)[h]).

    `delta` reads the token's value vectors of all KV heads concatenated (after v_proj; RoPE never touches
    V); `A` is one scalar per KV head, 0 at init, so a converted dense checkpoint computes the same function
    until training moves A.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, init_std: float = 1e-3):
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.delta = nn.Linear(num_kv_heads * head_dim, num_kv_heads, bias=True)
        self.A = nn.Parameter(torch.zeros(num_kv_heads))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.delta.weight, std=self.init_std)
        nn.init.zeros_(self.delta.bias)
        with torch.no_grad():
            self.A.zero_()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v: [B, T, H, D] -> c: [B, T, H] in float32 (float64 for float64 inputs)."""
        dtype = torch.promote_types(v.dtype, torch.float32)
        flat = v.reshape(v.shape[0], v.shape[1], -1).to(dtype)
        weight, bias = self.delta.weight.to(dtype), self.delta.bias.to(dtype)
        # A product and a row sum per KV head, not F.linear: a matmul rounds a row differently with the number
        # of rows (and with the row's place among them), so equal value vectors (a repeated token in layer 0)
        # got scores an ulp apart and the tie between their blocks, which the lower index must decide (spec
        # sec. 4.5), broke by rounding, differently in a full forward than in the engine's one-token steps.
        # A row sum gives every row the same additions in the same order, whatever the batch.
        raw = torch.stack([(flat * weight[h]).sum(-1) for h in range(weight.shape[0])], dim=-1) + bias
        return self.A.to(dtype) * F.softplus(raw)
