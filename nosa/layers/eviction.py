"""The eviction head (spec sec. 3): a query-independent importance score per token and KV head."""

from __future__ import annotations

import torch
import torch.nn as nn

from nosa import ops


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
        """v: [B, T, H, D] -> c: [B, T, H] in float32 (float64 for float64 inputs). The arithmetic is
        `nosa.ops.reference.eviction_scores`; without a gradient to keep (inference: the engine, generate,
        evaluation) it is dispatched, so on CUDA one Triton launch replaces ~12 small ones per layer; the
        kernel's result for a row does not depend on the other rows either, so prefill and decode steps
        still round a token's score alike."""
        return ops.eviction_scores(v, self.delta.weight, self.delta.bias, self.A)
