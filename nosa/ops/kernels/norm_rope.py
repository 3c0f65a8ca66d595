"""Triton kernels of the model's RMSNorm and rotary embedding (`nosa.ops.reference.rms_norm`,
`nosa.ops.reference.apply_rotary`): one launch each where the PyTorch arithmetic is ~7 (norm: cast, pow,
mean, add, rsqrt, mul, cast, weight mul) and ~6 (rotary: mul, the rotate-half slices, neg and cat, mul, add,
cast) small kernels, ~26 launches per layer of a decode step in all.

Both replay the reference's dtypes step by step: every intermediate the reference rounds to a dtype (the
norm's cast back to x's dtype before the weight; rotary's products and sum in the promoted dtype of x and
cos) is rounded to that dtype here too, the arithmetic itself in float32 (float64 where the promoted dtype
is float64), as PyTorch's elementwise kernels compute half-precision values in float32. Where they can differ
from the reference by rounding:
  - rms_norm: the order of the row's sum of squares (a tree over the row; the reference's order is its own),
    which can move the mean by an ulp of float32, and the result by an ulp of its dtype where that ulp
    crosses a rounding boundary; the mean is the sum times float32 1/N, as PyTorch's CUDA mean forms it
    (its CPU mean divides by N: another ulp); rsqrt is libdevice's on the GPU (the rsqrtf PyTorch's CUDA
    rsqrt calls), 1/sqrt under the interpreter. After that (products, casts) it is the reference's operation
    sequence. A row's sum depends on the hidden size only (not on the number of rows), so a
    token rounds the same in a prefill as in a one-token decode step.
  - apply_rotary: none on the GPU (products and the sum are rounded separately, fp fusion off, so no FMA
    merges them) nor under the interpreter.
The float32 -> bfloat16 rounding is done with integer arithmetic (round to nearest even, as c10::BFloat16
and the GPU's cvt.rn do): the interpreter's own cast truncates, and the CPU tests must check the GPU's
arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}

# Elements one program holds: a norm row is one program whatever its length up to this; rotary takes as many
# heads of a token as fit.
MAX_ROW = 1 << 16
ROTARY_TILE = 4096


def _warps(elements: int) -> int:
    # A function of the tile size only: the norm's reduction tree (and so its rounding) depends on the
    # layout, which must not change with the number of rows.
    return max(1, min(8, elements // 512))


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """v (float32 or float64) rounded to DTYPE, kept in v's dtype (exact in it); bfloat16 is kept in float32
    (the interpreter converts only float32 to bfloat16 by value)."""
    if DTYPE == tl.bfloat16:
        # From float64 through float32, as PyTorch converts a double to BFloat16.
        v32 = v.to(tl.float32)
        u = v32.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        r = ((u >> 16) << 16).to(tl.float32, bitcast=True)
        return tl.where(v32 != v32, v32, r)  # NaN stays NaN (the carry could make a NaN's payload inf)
    else:
        return v.to(DTYPE).to(v.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, s_row, eps, inv_n,
                     N: tl.constexpr, BLOCK: tl.constexpr, X_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                     COMPUTE: tl.constexpr):
    # s_row is the hidden size (or the row stride of a wider tensor): fixed for a model, it does not vary
    # with the prompt length, so it stays specialised (its alignment lets the loads vectorise).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * s_row + offs, mask=mask, other=0.0).to(tl.float32)  # x.float()
    # mean(x^2) as the CUDA reference forms it (sum times the float32 1/N), + eps, rsqrt: all float32.
    var = tl.sum(x * x, axis=0) * inv_n
    normed = _round_to(x * tl.math.rsqrt(var + eps), X_DTYPE)  # .to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = _round_to(normed.to(COMPUTE) * w.to(COMPUTE), OUT_DTYPE)  # weight * ..., promoted
    tl.store(out_ptr + row * N + offs, out.to(OUT_DTYPE), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton version of `nosa.ops.reference.rms_norm`: x [..., N], weight [N] -> [..., N] in
    promote_types(weight.dtype, x.dtype), contiguous. No autograd (the layer calls this only when no gradient
    is kept)."""
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"rms_norm: x must be [..., N] and weight [N] with N >= 1; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.dtype not in _TL_DTYPES or weight.dtype not in _TL_DTYPES:
        raise ValueError(f"rms_norm: x and weight must be float16, bfloat16, float32 or float64; got {x.dtype}, {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x and weight must be on one device, got {x.device}, {weight.device}")
    n = x.shape[-1]
    if n > MAX_ROW:
        raise ValueError(f"rms_norm: hidden size {n} is above the kernel's {MAX_ROW}")
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    compute = tl.float64 if out_dtype == torch.float64 else tl.float32
    # The kernel reads a row as N consecutive values a row stride apart, and the weight as a dense vector.
    rows = x.reshape(-1, n)
    if rows.stride(1) != 1 and n > 1:
        rows = rows.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, rows.stride(0), float(eps), 1.0 / n,
            N=n, BLOCK=block, X_DTYPE=_TL_DTYPES[x.dtype], OUT_DTYPE=_TL_DTYPES[out_dtype], COMPUTE=compute,
            num_warps=_warps(block))
    return out


# T and the batch strides (T * H * D) vary with the prompt length: unspecialised, a new length compiles nothing.
@triton.jit(do_not_specialize=["T", "sxb", "scb", "ssb", "sob"])
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, H, sxb, sxt, sxh, scb, sct, ssb, sst, sob, sot,
                   D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   X_DTYPE: tl.constexpr, PROMOTED: tl.constexpr, COMPUTE: tl.constexpr):
    token = tl.program_id(0)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    mask = (h < H)[:, None] & d_ok[None, :]
    first = d < HALF
    partner = tl.where(first, d + HALF, d - HALF)  # rotate_half: out[d] reads x[d + D/2] (negated) or x[d - D/2]
    row = x_ptr + b * sxb + t * sxt + h[:, None] * sxh
    x = tl.load(row + d[None, :], mask=mask, other=0.0).to(COMPUTE)
    xp = tl.load(row + partner[None, :], mask=mask, other=0.0).to(COMPUTE)
    rot = tl.where(first[None, :], -xp, xp)  # negation is exact: the reference's cat in x's dtype
    c = tl.load(cos_ptr + b * scb + t * sct + d, mask=d_ok, other=0.0).to(COMPUTE)
    s = tl.load(sin_ptr + b * ssb + t * sst + d, mask=d_ok, other=0.0).to(COMPUTE)
    # x * cos and rotate_half(x) * sin, each rounded to the promoted dtype, then their sum, then x's dtype.
    a = _round_to(x * c[None, :], PROMOTED)
    r = _round_to(rot * s[None, :], PROMOTED)
    out = _round_to(_round_to(a + r, PROMOTED), X_DTYPE)
    tl.store(out_ptr + b * sob + t * sot + h[:, None] * D + d[None, :], out.to(X_DTYPE), mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton version of `nosa.ops.reference.apply_rotary`: x [B, T, H, D], cos, sin [B, T, D] (or
    broadcastable to it with size-1 B or T, as the reference's cos[:, :, None] broadcasts) -> [B, T, H, D] in
    x's dtype, contiguous. No autograd."""
    if x.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        raise ValueError(f"apply_rotary: x must be [B, T, H, D] and cos, sin [B, T, D]; got x {tuple(x.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    B, T, H, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[2] != D or t.shape[0] not in (1, B) or t.shape[1] not in (1, T):
            raise ValueError(f"apply_rotary: {name} must be [B, T, D] = {(B, T, D)} (B, T may be 1) for x "
                             f"{tuple(x.shape)}; got {tuple(t.shape)}")
    if D % 2:
        raise ValueError(f"apply_rotary: head_dim must be even, got {D}")
    if cos.dtype != sin.dtype:
        raise ValueError(f"apply_rotary: cos and sin must have one dtype, got {cos.dtype}, {sin.dtype}")
    if x.dtype not in _TL_DTYPES or cos.dtype not in _TL_DTYPES:
        raise ValueError(f"apply_rotary: x, cos, sin must be float16, bfloat16, float32 or float64; got {x.dtype}, {cos.dtype}")
    devices = {t.device for t in (x, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"apply_rotary: x, cos, sin must be on one device, got {sorted(map(str, devices))}")
    promoted = torch.promote_types(x.dtype, cos.dtype)
    compute = tl.float64 if promoted == torch.float64 else tl.float32
    # The kernel indexes x by its strides with a unit head_dim stride, cos and sin by [B, T] strides (0 where
    # broadcast) with a unit last stride.
    if x.stride(3) != 1:
        x = x.contiguous()
    cos, sin = (t if t.stride(2) == 1 else t.contiguous() for t in (cos, sin))
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    if B * T * H:
        block_d = triton.next_power_of_2(D)
        block_h = min(triton.next_power_of_2(H), max(1, ROTARY_TILE // block_d))
        _rotary_kernel[(B * T, triton.cdiv(H, block_h))](
            x, cos, sin, out, T, H, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
            sin.stride(0), sin.stride(1), out.stride(0), out.stride(1),
            D=D, HALF=D // 2, BLOCK_H=block_h, BLOCK_D=block_d, X_DTYPE=_TL_DTYPES[x.dtype], PROMOTED=_TL_DTYPES[promoted],
            COMPUTE=compute,
            num_warps=_warps(block_h * block_d), enable_fp_fusion=False)
    return out
