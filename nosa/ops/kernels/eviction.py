"""Triton kernel of the eviction head's scores (`nosa.ops.reference.eviction_scores`, spec sec. 3):
c[n, h] = A[h] * softplus(sum_j v[n, j] * weight[h, j] + bias[h]) over a token's value vectors of all KV
heads concatenated (j < H * D). One program per token row computes every head's score: one launch where the
PyTorch arithmetic is ~12 small kernels per layer (a cast, a product and a row sum per head, a stack, the
bias, softplus, A), which in a decode step of the 8B shape cost more in launch gaps than in work.

A row's result depends on that row alone (a fixed reduction over its H * D values), as the reference's row
sum does: a token's score rounds the same in a prefill of many rows as in a one-token decode step, which the
tie between equal scores (the lower block wins, spec sec. 4.5) needs. Against the reference it differs by
rounding only (the reduction order of the row sum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# softplus(x) = x above this, as torch.nn.functional.softplus's default threshold (beta 1).
SOFTPLUS_THRESHOLD = 20.0


@triton.jit
def _eviction_scores_kernel(v_ptr, w_ptr, b_ptr, a_ptr, out_ptr, s_row, s_w,
                            HD: tl.constexpr, H: tl.constexpr, BLOCK: tl.constexpr, THRESHOLD: tl.constexpr,
                            F64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HD
    dtype = tl.float64 if F64 else tl.float32
    x = tl.load(v_ptr + row * s_row + offs, mask=mask, other=0.0).to(dtype)
    for h in tl.static_range(H):
        w = tl.load(w_ptr + h * s_w + offs, mask=mask, other=0.0).to(dtype)
        raw = tl.sum(x * w, axis=0) + tl.load(b_ptr + h).to(dtype)
        # softplus in float64 (one scalar per head: free): on the GPU float32 exp and log lower to approximate
        # instructions, whose error near log(1) would dominate small scores. log1p(exp(r)) without losing
        # small values: log(u) * y / (u - 1) with u = 1 + y (Goldberg's identity); y itself where u rounds to 1.
        r = raw.to(tl.float64)
        y = tl.exp(tl.minimum(r, THRESHOLD))
        u = 1.0 + y
        exact = u == 1.0
        soft = tl.where(exact, y, tl.log(u) * (y / tl.where(exact, 1.0, u - 1.0)))
        soft = tl.where(r > THRESHOLD, r, soft)
        tl.store(out_ptr + row * H + h, (tl.load(a_ptr + h).to(tl.float64) * soft).to(dtype))


def eviction_scores(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """v [B, T, H, D], weight [H, H * D], bias [H], A [H] -> c [B, T, H] float32 (float64 for float64 v).
    No autograd (the layer calls this only when no gradient is kept)."""
    if v.dim() != 4:
        raise ValueError(f"eviction_scores: v must be [B, T, H, D], got shape {tuple(v.shape)}")
    B, T, H, D = v.shape
    if tuple(weight.shape) != (H, H * D) or tuple(bias.shape) != (H,) or tuple(A.shape) != (H,):
        raise ValueError(f"eviction_scores: for v {tuple(v.shape)} weight must be {(H, H * D)}, bias and A {(H,)}; "
                         f"got {tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(A.shape)}")
    devices = {t.device for t in (v, weight, bias, A)}
    if len(devices) != 1:
        raise ValueError(f"eviction_scores: every tensor must be on one device, got {sorted(map(str, devices))}")
    dtype = torch.promote_types(v.dtype, torch.float32)
    # The kernel reads a row as H * D consecutive values and the parameters as dense vectors.
    flat = v.reshape(B * T, H * D)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    bias, A = bias.contiguous(), A.contiguous()
    out = torch.empty(B, T, H, dtype=dtype, device=v.device)
    if B * T:
        _eviction_scores_kernel[(B * T,)](flat, weight, bias, A, out, flat.stride(0), weight.stride(0),
                                          HD=H * D, H=H, BLOCK=triton.next_power_of_2(H * D),
                                          THRESHOLD=SOFTPLUS_THRESHOLD, F64=dtype == torch.float64)
    return out
