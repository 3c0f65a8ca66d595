"""Block-sparse attention with a per-key additive bias: Triton forward and backward (spec sec. 4.6).

Same contract as `nosa.ops.reference.sparse_attention`. Work is organised in *query tiles*: `tile_tokens`
consecutive queries of one (sequence, KV head), whose rows are (token, query head of the group), i.e.
tile_tokens x G rows, padded so the matrix unit sees at least 16 rows. A tile walks the *union* of its
tokens' selected blocks; each union entry carries a bit per token saying who selected it, so every row
attends exactly to its own blocks (a block some row did not select is masked for that row).

- forward (`_fwd_kernel`): one program per (query tile, sequence x KV head), online softmax in base 2,
  returns o and the natural log-sum-exp.
- backward: dq per query tile (`_bwd_dq_kernel`, same walk); dk, dv and the bias gradient per *key block*
  (`_bwd_dkv_kernel`) over the inverted selection (the query tokens that selected this block, taken
  `tile_tokens` at a time, so unlike the forward no row is computed for a token that did not select the
  block), split into segments of at most `DKV_SEGMENT` tokens so the sink block (selected by every
  query) does not serialise on one SM; segments add into float32 buffers atomically.

List entries pack (block << 16) | token_bits, so a tile holds at most 16 tokens and a sequence at most
32767 blocks.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_TILE_TOKENS = 16
MAX_BLOCKS = 1 << 15
# Query tokens per dk/dv program: long inverted lists (sink and window blocks) are split so their work
# spreads over many SMs; each split costs one atomic add of a [block, D] tile. 512 tokens = 128 tiles of 4
# (128 and 512 tiles measured alike on the H200, 32 tiles 13% slower).
DKV_SEGMENT = 512


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would silently go through TF32 on the GPU; the reference is exact float32.
    return "ieee" if dtype == torch.float32 else "tf32"


def default_tile_tokens(group: int) -> int:
    """Query tokens per tile: about 64 rows (tokens x padded group). Measured on the H200 at 32K tokens,
    G = 16: 4 tokens per tile beat 1 and 2 although the union of 4 tokens' blocks is 1.5x one token's
    (docs/kernels.md), because each K/V block loaded serves 4x more rows."""
    return max(1, min(MAX_TILE_TOKENS, 64 // _next_pow2(group)))


# ----------------------------------------------------------------------------------------------------------
# Tile lists (host-side glue in PyTorch, all on the device)
# ----------------------------------------------------------------------------------------------------------
def build_tile_lists(block_indices: torch.Tensor, tile_tokens: int):
    """Union of the selected blocks of each query tile, with a bit per token of the tile.

    block_indices: [B, Tq, H, K] int32 (ascending, -1 unused) ->
      lists [B, H, n_tiles, L] int32, entry = (block << 16) | bits (ascending block, -1 unused),
      counts [B, H, n_tiles] int32; n_tiles = ceil(Tq / tile_tokens), L = min(tile_tokens * K, ...).
    """
    batch, num_queries, num_kv_heads, topk = block_indices.shape
    n_tiles = -(-num_queries // tile_tokens)
    idx = block_indices.to(torch.int32)
    pad = n_tiles * tile_tokens - num_queries
    if pad:
        idx = torch.cat([idx, idx.new_full((batch, pad, num_kv_heads, topk), -1)], dim=1)
    # [B, H, n_tiles, tile_tokens, K]
    idx = idx.permute(0, 2, 1, 3).reshape(batch, num_kv_heads, n_tiles, tile_tokens, topk)
    if tile_tokens == 1:
        idx = idx[..., 0, :]
        valid = idx >= 0
        lists = torch.where(valid, (idx << 16) | 1, -1).contiguous()
        return lists, valid.sum(-1, dtype=torch.int32)
    token = torch.arange(tile_tokens, device=idx.device, dtype=torch.int32)[:, None].expand(tile_tokens, topk)
    big = torch.iinfo(torch.int32).max
    code = torch.where(idx >= 0, idx * 32 + token, big).reshape(batch, num_kv_heads, n_tiles, tile_tokens * topk)
    code = code.sort(dim=-1).values
    valid = code != big
    blk = torch.where(valid, code >> 5, -1)
    prev = torch.cat([torch.full_like(blk[..., :1], -2), blk[..., :-1]], dim=-1)
    new_run = valid & (blk != prev)
    run_id = torch.cumsum(new_run.to(torch.int32), dim=-1) - 1
    width = code.shape[-1]
    bits = torch.where(valid, torch.ones_like(code) << (code & 31), 0)
    out_bits = torch.zeros_like(code).scatter_add_(-1, run_id.clamp(min=0).long(), bits)
    counts = new_run.sum(-1, dtype=torch.int32)
    slot = torch.where(new_run, run_id, width).long()
    out_blk = torch.full(code.shape[:-1] + (width + 1,), -1, dtype=torch.int32, device=code.device)
    out_blk.scatter_(-1, slot, blk)
    out_blk = out_blk[..., :width]
    lists = torch.where(out_blk >= 0, (out_blk << 16) | out_bits, -1)
    max_len = max(1, int(counts.max()))  # host sync: trims the lists to the longest union
    return lists[..., :max_len].contiguous(), counts


def invert_selection(block_indices: torch.Tensor, num_blocks: int, segment: int = DKV_SEGMENT):
    """For every (sequence, KV head, key block): the query tokens that selected it, cut into segments.

    block_indices: [B, Tq, H, K] int32 (-1 unused). Returns (tokens [N] int32, sorted by key then token;
    seg_key [S] int32 = (b * H + h) * num_blocks + block; seg_start, seg_end [S] int32 into tokens), each
    segment at most `segment` tokens.
    """
    batch, num_queries, num_kv_heads, _ = block_indices.shape
    device = block_indices.device
    valid = block_indices >= 0
    bh = (torch.arange(batch, device=device).view(batch, 1, 1, 1) * num_kv_heads
          + torch.arange(num_kv_heads, device=device).view(1, 1, num_kv_heads, 1))
    # int32 keys (B * H * NB < 2^31 here): the radix sort makes half the passes of an int64 one.
    key = (bh * num_blocks + block_indices.long()).masked_select(valid)
    if batch * num_kv_heads * num_blocks < 2**31 - 1:
        key = key.to(torch.int32)
    token = torch.arange(num_queries, device=device, dtype=torch.int32).view(1, num_queries, 1, 1)
    tokens = token.expand_as(block_indices).masked_select(valid)
    # Stable: the flattened order is (b, t, h, k), so each key's tokens stay ascending.
    order = torch.argsort(key, stable=True)
    tokens, key = tokens[order].contiguous(), key[order]
    # Counts per key from the sorted keys (bincount would use atomics; this stays deterministic).
    all_keys = torch.arange(batch * num_kv_heads * num_blocks + 1, device=device, dtype=key.dtype)
    per_key = torch.diff(torch.searchsorted(key, all_keys))
    ends = torch.cumsum(per_key, 0)
    starts = ends - per_key
    nseg = torch.div(per_key + segment - 1, segment, rounding_mode="floor")
    total = int(nseg.sum())  # host sync: the dk/dv grid size
    seg_key = torch.repeat_interleave(torch.arange(per_key.numel(), device=device), nseg, output_size=total)
    first_seg = torch.cumsum(nseg, 0) - nseg
    within = torch.arange(total, device=device) - first_seg[seg_key]
    seg_start = starts[seg_key] + within * segment
    seg_end = torch.minimum(seg_start + segment, ends[seg_key])
    return tokens, seg_key.to(torch.int32), seg_start.to(torch.int32), seg_end.to(torch.int32)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_rows(tile, h, Tq, G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Rows of a query tile: (token index, query head, token-in-tile, row valid)."""
    r = tl.arange(0, ROWS)
    ti = r // G_PAD
    g = r % G_PAD
    t = tile * (ROWS // G_PAD) + ti
    valid = (g < G) & (t < Tq)
    return t, h * G + g, ti, valid


@triton.jit
def _load_kv_block(X, XDesc, b32, b, blk, keys, h, d, sxb, sxt, sxh, mask, block_size,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_DESC: tl.constexpr):
    """Keys (or values) of block `blk` of head h of sequence b: [BLOCK_N, BLOCK_D]. Rows past the sequence
    and columns past the head dim are zeros either way; with a descriptor, rows of the next block when
    block_size < BLOCK_N are real keys, which every caller masks (key_ok) as the pointer path does."""
    if USE_DESC:
        x = tl.reshape(XDesc.load([b32, blk * block_size, h, 0]), [BLOCK_N, BLOCK_D])
    else:
        x = tl.load(X + b * sxb + keys[:, None] * sxt + h * sxh + d[None, :], mask=mask, other=0.0)
    return x


# Lengths and the strides that follow them are not specialised: Triton otherwise compiles a kernel again for
# every new pattern of its integer arguments' divisibility by 16 (and == 1), and serving's prefill chunks
# have every length, so each new prompt length could cost compiles of seconds. These arguments only bound
# loops and masks or index rows; the innermost (contiguous) strides, never passed, keep theirs. sLn is the
# tile lists' length (the longest list of the launch, data-dependent). Bias: its pointer's 16-byte alignment
# follows the prompt length (a slice of the eviction workspace) and its loads are strided by sbt anyway.
@triton.jit(do_not_specialize=["Bias", "sbb", "slb", "sLb", "sLh", "sLn", "scb", "sch", "Tq", "Tk"])
def _fwd_kernel(
    Q, K, V, Bias, Lists, Counts, Pos, O, Lse, KDesc, VDesc,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sbb, sbt, sbh, sob, sot, soh, slb, slt, slh,
    sLb, sLh, sLn, scb, sch,
    Tq, Tk, H, block_size, qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    USE_DESC: tl.constexpr,
):
    # USE_DESC: K and V blocks come through tensor descriptors (KDesc, VDesc: `kv_descriptors`; bulk
    # copies on Hopper) instead of per-thread pointer loads; same values, so the same result. (Triton 3.6's
    # automatic warp specialisation of this walk fails to compile on Hopper: kernel_probe_h200.json.)
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t, head, ti, row_ok = _tile_rows(tile, h, Tq, G, G_PAD, ROWS)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    pos = tl.load(Pos + t, mask=row_ok, other=-1)
    q = tl.load(Q + b * sqb + t[:, None] * sqt + head[:, None] * sqh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    count = tl.load(Counts + b * scb + h * sch + tile)
    list_base = Lists + b * sLb + h * sLh + tile * sLn
    for e in range(count):
        entry = tl.load(list_base + e)
        blk = entry >> 16
        row_in = ((entry >> ti) & 1) != 0
        keys = blk * block_size + n
        key_ok = (n < block_size) & (keys < Tk)
        k = _load_kv_block(K, KDesc, bh // H, b, blk, keys, h, d, skb, skt, skh, key_ok[:, None] & d_ok[None, :],
                           block_size, BLOCK_N, BLOCK_D, USE_DESC)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(Bias + b * sbb + keys * sbt + h * sbh, mask=key_ok, other=0.0).to(tl.float32)
            s += bias[None, :] * 1.4426950408889634
        allowed = row_in[:, None] & key_ok[None, :] & (keys[None, :] <= pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_block(V, VDesc, bh // H, b, blk, keys, h, d, svb, svt, svh, key_ok[:, None] & d_ok[None, :],
                           block_size, BLOCK_N, BLOCK_D, USE_DESC)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(O + b * sob + t[:, None] * sot + head[:, None] * soh + d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(Lse + b * slb + t * slt + head * slh, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Bias, Lists, Counts, Pos, DO, Lse, Delta, DQ, O, KDesc, VDesc,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sbb, sbt, sbh, sob, sot, soh, slb, slt, slh,
    sLb, sLh, sLn, scb, sch, s_ob, s_ot, s_oh,
    Tq, Tk, H, block_size, qk_scale, sm_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    FUSED_DELTA: tl.constexpr, USE_DESC: tl.constexpr,
):
    # DQ shares q's strides (sq*), DO has so*, O s_o*; Lse and Delta share sl*. FUSED_DELTA: this kernel
    # computes delta = rowsum(dO * O) from its own tiles and writes it for the dk/dv kernel, instead of a
    # separate PyTorch pass (which reads both in float32 copies).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t, head, ti, row_ok = _tile_rows(tile, h, Tq, G, G_PAD, ROWS)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    pos = tl.load(Pos + t, mask=row_ok, other=-1)
    qmask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + t[:, None] * sqt + head[:, None] * sqh + d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sob + t[:, None] * sot + head[:, None] * soh + d[None, :], mask=qmask, other=0.0)
    lse = tl.load(Lse + b * slb + t * slt + head * slh, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    if FUSED_DELTA:
        o = tl.load(O + b * s_ob + t[:, None] * s_ot + head[:, None] * s_oh + d[None, :], mask=qmask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(Delta + b * slb + t * slt + head * slh, delta, mask=row_ok)
    else:
        delta = tl.load(Delta + b * slb + t * slt + head * slh, mask=row_ok, other=0.0)
    dq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    count = tl.load(Counts + b * scb + h * sch + tile)
    list_base = Lists + b * sLb + h * sLh + tile * sLn
    for e in range(count):
        entry = tl.load(list_base + e)
        blk = entry >> 16
        row_in = ((entry >> ti) & 1) != 0
        keys = blk * block_size + n
        key_ok = (n < block_size) & (keys < Tk)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = _load_kv_block(K, KDesc, bh // H, b, blk, keys, h, d, skb, skt, skh, kv_mask, block_size, BLOCK_N, BLOCK_D, USE_DESC)
        v = _load_kv_block(V, VDesc, bh // H, b, blk, keys, h, d, svb, svt, svh, kv_mask, block_size, BLOCK_N, BLOCK_D, USE_DESC)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(Bias + b * sbb + keys * sbt + h * sbh, mask=key_ok, other=0.0).to(tl.float32)
            s += bias[None, :] * 1.4426950408889634
        allowed = row_in[:, None] & key_ok[None, :] & (keys[None, :] <= pos[:, None])
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + b * sqb + t[:, None] * sqt + head[:, None] * sqh + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)


def _dkv_configs():
    """(tokens per step as a multiple of the 64-row tile, warps, stages) tried by the dk/dv autotuner.
    The inverted walk wastes no rows, so unlike the forward a taller step costs no extra work; pipelining
    its gathered Q/dO loads was never measured for this walk (the 4 warps / 1 stage default was tuned on
    the earlier tile-union dk/dv kernel)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"STEP": 1}, num_warps=4, num_stages=1)]  # the interpreter runs every config
    return [triton.Config({"STEP": step}, num_warps=w, num_stages=st)
            for step, w, st in ((1, 4, 1), (1, 4, 2), (1, 4, 3), (2, 8, 1), (2, 8, 2), (2, 4, 2))]


@triton.jit
def _bwd_dkv_body(
    Q, K, V, Bias, Tokens, SegKey, SegStart, SegEnd, Pos, DO, Lse, Delta, DK, DV, DBias,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sbb, sbt, sbh, sob, sot, soh, slb, slt, slh,
    sdkb, sdkt, sdkh, sdbb, sdbt, sdbh,
    Tq, Tk, H, num_blocks, block_size, qk_scale, sm_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    # DK and DV are float32 with the same strides (sdk*); DBias float32 (sdb*). DETERMINISTIC: they are
    # instead per-segment partial buffers [segments, BLOCK_N, BLOCK_D] / [segments, BLOCK_N].
    seg = tl.program_id(0)
    key_id = tl.load(SegKey + seg)
    start = tl.load(SegStart + seg)
    end = tl.load(SegEnd + seg)
    blk = key_id % num_blocks
    bh = key_id // num_blocks
    b = (bh // H).to(tl.int64)
    h = bh % H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    n = tl.arange(0, BLOCK_N)
    keys = blk * block_size + n
    key_ok = (n < block_size) & (keys < Tk)
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + keys[:, None] * skt + h * skh + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + keys[:, None] * svt + h * svh + d[None, :], mask=kv_mask, other=0.0)
    if HAS_BIAS:
        bias2 = tl.load(Bias + b * sbb + keys * sbt + h * sbh, mask=key_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    r = tl.arange(0, ROWS)
    g = r % G_PAD
    head = h * G + g
    for e in range(start, end, ROWS // G_PAD):
        # Rows: (token, query head) for the next ROWS // G_PAD tokens that selected this block.
        idx = e + r // G_PAD
        in_seg = idx < end
        t = tl.load(Tokens + idx, mask=in_seg, other=0)
        row_ok = in_seg & (g < G)
        pos = tl.load(Pos + t, mask=row_ok, other=-1)
        qmask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + t[:, None] * sqt + head[:, None] * sqh + d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + b * sob + t[:, None] * sot + head[:, None] * soh + d[None, :], mask=qmask, other=0.0)
        lse = tl.load(Lse + b * slb + t * slt + head * slh, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        delta = tl.load(Delta + b * slb + t * slt + head * slh, mask=row_ok, other=0.0)
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [keys, rows]
        if HAS_BIAS:
            s += bias2[:, None]
        allowed = key_ok[:, None] & row_ok[None, :] & (keys[:, None] <= pos[None, :])
        p = tl.where(allowed, tl.exp2(s - lse2[None, :]), 0.0)
        dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
        if HAS_BIAS:
            dbias += tl.sum(ds, 1)
    if DETERMINISTIC:
        # This segment's partial sums go to its own slot; `_dkv_reduce_kernel` adds the slots of each key
        # block in segment order, so the result does not depend on which program finished first.
        part = seg.to(tl.int64) * (BLOCK_N * BLOCK_D) + n[:, None] * BLOCK_D + d[None, :]
        tl.store(DK + part, dk * sm_scale)
        tl.store(DV + part, dv)
        if HAS_BIAS:
            tl.store(DBias + seg.to(tl.int64) * BLOCK_N + n, dbias)
    else:
        out_off = b * sdkb + keys[:, None] * sdkt + h * sdkh + d[None, :]
        tl.atomic_add(DK + out_off, dk * sm_scale, mask=kv_mask)
        tl.atomic_add(DV + out_off, dv, mask=kv_mask)
        if HAS_BIAS:
            tl.atomic_add(DBias + b * sdbb + keys * sdbt + h * sdbh, dbias, mask=key_ok)


@triton.jit
def _bwd_dkv_kernel(
    Q, K, V, Bias, Tokens, SegKey, SegStart, SegEnd, Pos, DO, Lse, Delta, DK, DV, DBias,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sbb, sbt, sbh, sob, sot, soh, slb, slt, slh,
    sdkb, sdkt, sdkh, sdbb, sdbt, sdbh,
    Tq, Tk, H, num_blocks, block_size, qk_scale, sm_scale, size_class,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    DETERMINISTIC: tl.constexpr, STEP: tl.constexpr,
):
    # STEP multiplies the rows per step (ROWS is the base 64-row tile). size_class only keys the autotuner.
    _bwd_dkv_body(
        Q, K, V, Bias, Tokens, SegKey, SegStart, SegEnd, Pos, DO, Lse, Delta, DK, DV, DBias,
        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sbb, sbt, sbh, sob, sot, soh, slb, slt, slh,
        sdkb, sdkt, sdkh, sdbb, sdbt, sdbh, Tq, Tk, H, num_blocks, block_size, qk_scale, sm_scale,
        G, G_PAD, ROWS * STEP, BLOCK_N, D, BLOCK_D, HAS_BIAS, PRECISION, DETERMINISTIC,
    )


# Atomic runs add into DK/DV/DBias, so every benchmark run of the tuner starts from zeros.
_bwd_dkv_tuned = triton.autotune(
    configs=_dkv_configs(), key=["G_PAD", "D", "HAS_BIAS", "DETERMINISTIC", "size_class"],
    reset_to_zero=["DK", "DV", "DBias"],
)(_bwd_dkv_kernel)


@triton.jit
def _dkv_reduce_kernel(
    PartK, PartV, PartB, KeySegStart, KeySegEnd, DK, DV, DBias,
    sdkb, sdkt, sdkh, sdbb, sdbt, sdbh, Tk, H, num_blocks, block_size,
    BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Deterministic dk/dv/dbias: per key block, the sum of its segments' partials in segment order."""
    key_id = tl.program_id(0)
    blk = key_id % num_blocks
    bh = key_id // num_blocks
    b = (bh // H).to(tl.int64)
    h = bh % H
    first = tl.load(KeySegStart + key_id).to(tl.int64)
    last = tl.load(KeySegEnd + key_id).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    keys = blk * block_size + n
    key_ok = (n < block_size) & (keys < Tk)
    tile = n[:, None] * BLOCK_D + d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    for seg in range(first, last):
        dk += tl.load(PartK + seg * (BLOCK_N * BLOCK_D) + tile)
        dv += tl.load(PartV + seg * (BLOCK_N * BLOCK_D) + tile)
        if HAS_BIAS:
            dbias += tl.load(PartB + seg * BLOCK_N + n)
    out_off = b * sdkb + keys[:, None] * sdkt + h * sdkh + d[None, :]
    mask = key_ok[:, None] & (d[None, :] < D)
    tl.store(DK + out_off, dk, mask=mask)
    tl.store(DV + out_off, dv, mask=mask)
    if HAS_BIAS:
        tl.store(DBias + b * sdbb + keys * sdbt + h * sdbh, dbias, mask=key_ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, bias, block_indices, positions, block_size):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, num_queries, num_q_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k and v must be [B, Tk, H, {head_dim}] with B={batch}; got {tuple(k.shape)}, {tuple(v.shape)}")
    num_kv_heads = k.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if block_indices.shape[:3] != (batch, num_queries, num_kv_heads):
        raise ValueError(f"block_indices must be [B, Tq, H, K] = [{batch}, {num_queries}, {num_kv_heads}, K]; got {tuple(block_indices.shape)}")
    if positions.shape != (num_queries,):
        raise ValueError(f"positions must be [Tq] = [{num_queries}]; got {tuple(positions.shape)}")
    if bias is not None and bias.shape != (batch, k.shape[1], num_kv_heads):
        raise ValueError(f"bias must be [B, Tk, H] = [{batch}, {k.shape[1]}, {num_kv_heads}]; got {tuple(bias.shape)}")
    if -(-k.shape[1] // block_size) >= MAX_BLOCKS:
        raise ValueError(f"at most {MAX_BLOCKS - 1} key blocks are supported; got {-(-k.shape[1] // block_size)}")


def effective_tile_tokens(group: int, tile_tokens: int) -> int:
    """Tokens per tile once the rows are padded to the matrix unit's minimum of 16."""
    g_pad = _next_pow2(group)
    return max(16, tile_tokens * g_pad) // g_pad


def _meta(q, k, block_size, tile_tokens):
    group = q.shape[2] // k.shape[2]
    g_pad = _next_pow2(group)
    rows = effective_tile_tokens(group, tile_tokens) * g_pad
    head_dim = q.shape[3]
    return dict(
        G=group, G_PAD=g_pad, ROWS=rows, BLOCK_N=max(16, _next_pow2(block_size)),
        D=head_dim, BLOCK_D=max(16, _next_pow2(head_dim)), PRECISION=_dot_precision(q.dtype),
    ), rows // g_pad


# Measured on the H200 at 32K tokens, 8B shape (64-row tiles, head_dim 128; docs/kernels.md), pointer loads of
# K/V: fwd is best at 4 warps / 3 stages (10.4 ms vs 21-25 ms at 8 warps), dq at 4 / 2, dkv at 4 / 1 (more stages were slower).
_STAGES = {"fwd": 3, "dq": 2, "dkv": 1}
# With K/V through tensor descriptors (the Hopper default): the forward at 2 stages took 10.35 / 21.80 ms
# against 3 stages' 11.05 / 23.49 ms at 32K / 64K, 4 stages 18.4 / 39.9 ms; dq kept 2 (3: 14.8 / 31.5 ms
# against 9.7 / 22.2). H200, bench/results/kernel_probe_h200.json (5 repetitions; not measured on an H100).
_STAGES_DESC = {"fwd": 2, "dq": 2}


# Process-wide, not thread-local: autograd runs CUDA backward passes on its own thread.
_tuning_values: dict = {}


@contextlib.contextmanager
def tuning(**overrides):
    """Override launch choices inside a `with` block, so one benchmark run can time variants side by side:
    `{fwd,dq,dkv}_warps`, `{fwd,dq,dkv}_stages`, `dkv_tokens` (query tokens per dk/dv step, default the
    tile's), `dkv_segment` (tokens per dk/dv program), `fused_delta` (False: delta = rowsum(dO o) by
    PyTorch before the dq kernel, the first version), `dkv_autotune` (False: the fixed 4 warps / 1 stage
    launch of the first version; any dkv_tokens/warps/stages pins the launch too), `descriptors` (True: the
    forward and dq kernels load K/V blocks through tensor descriptors where `kv_descriptors` allows; False:
    pointer loads; unset: `descriptors_by_default`).
    Unknown names are an error."""
    known = ({f"{k}_{w}" for k in ("fwd", "dq", "dkv") for w in ("warps", "stages")}
             | {"dkv_tokens", "dkv_segment", "fused_delta", "dkv_autotune", "descriptors"})
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown tuning knobs {sorted(unknown)}; known: {sorted(known)}")
    previous = dict(_tuning_values)
    _tuning_values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        yield
    finally:
        _tuning_values.clear()
        _tuning_values.update(previous)


def _tuned(name: str, default):
    return _tuning_values.get(name, default)


def _launch_opts(kernel: str, rows: int, head_dim: int, descriptors: bool = False) -> dict:
    """num_warps / num_stages of one kernel ('fwd', 'dq', 'dkv') for a tile of `rows` rows, loading K/V
    through tensor descriptors or not."""
    warps = 4 if rows * head_dim <= 64 * 128 else 8
    stages = (_STAGES_DESC if descriptors else _STAGES)[kernel]
    return dict(num_warps=_tuned(f"{kernel}_warps", warps), num_stages=_tuned(f"{kernel}_stages", stages))


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def kv_descriptors(k, v, block_n: int, block_d: int):
    """Tensor descriptors over k and v [B, Tk, H, D] whose loads are one key block of one head
    ([1, block_n, 1, block_d], zeros past the sequence and the head dim), or None where a descriptor cannot
    describe them: the bulk-copy unit needs a 16-byte aligned base, 16-byte multiples for every stride but
    the last, and a contiguous last dimension. Used where `descriptors_by_default` says so, or as
    `tuning(descriptors=...)` forces."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton before tensor descriptors
        return None
    for x in (k, v):
        size = x.element_size()
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any((st * size) % 16 for st in x.stride()[:-1]):
            return None
    block = [1, block_n, 1, block_d]
    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), block) for x in (k, v))


def descriptors_by_default(device, dtype=torch.bfloat16) -> bool:
    """Whether the forward and dq kernels load K/V through tensor descriptors when `tuning` does not say:
    for 16-bit K/V on CUDA devices of compute capability 9 or more (Hopper's bulk-copy unit). There the H100
    run of 2026-12-07 (bench/results/kernels_h100.json, bf16) timed them 6-9% faster than the pointer loads
    over the whole forward+backward at 16K-128K (equal at 4K), with the same forward output and the bf16
    rule kept by every gradient (tests/ops/test_kernels_gpu.py). Elsewhere (older GPUs, the CPU
    interpreter, float32 K/V as mixed dtypes under autocast give) nothing was timed or tested on a GPU, so
    the pointer loads stay."""
    device = torch.device(device)
    return dtype in (torch.bfloat16, torch.float16) and device.type == "cuda" and _capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device) -> tuple[int, int]:
    # Cached per device: asked twice per layer per forward+backward.
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def _descriptor_args(k, v, meta) -> tuple:
    """(KDesc, VDesc, USE_DESC) for the forward and dq launches."""
    wanted = _tuned("descriptors", None)
    if wanted is None:
        wanted = descriptors_by_default(k.device, k.dtype)
    descs = kv_descriptors(k, v, meta["BLOCK_N"], meta["BLOCK_D"]) if wanted else None
    return (None, None, False) if descs is None else (*descs, True)


def sparse_attention_forward(q, k, v, bias, lists, counts, positions, block_size, tile_tokens):
    """o [B, Tq, Hq, D] (q's dtype) and lse [B, Tq, Hq] float32 from prepared tile lists."""
    batch, num_queries, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    meta, tile_tokens = _meta(q, k, block_size, tile_tokens)
    o = torch.empty_like(q)
    lse = torch.empty((batch, num_queries, num_q_heads), device=q.device, dtype=torch.float32)
    bias_arg = bias if bias is not None else q
    bias_strides = bias.stride() if bias is not None else (0, 0, 0)
    grid = (lists.shape[2], batch * num_kv_heads)
    k_desc, v_desc, use_desc = _descriptor_args(k, v, meta)
    _fwd_kernel[grid](
        q, k, v, bias_arg, lists, counts, positions, o, lse, k_desc, v_desc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *bias_strides,
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        lists.stride(0), lists.stride(1), lists.stride(2), counts.stride(0), counts.stride(1),
        num_queries, k.shape[1], num_kv_heads, block_size, LOG2E / math.sqrt(head_dim),
        HAS_BIAS=bias is not None, USE_DESC=use_desc, **meta, **_launch_opts("fwd", meta["ROWS"], head_dim, use_desc),
    )
    return o, lse


def _strides(q, k, v, bias, do, lse):
    bias_strides = bias.stride() if bias is not None else (0, 0, 0)
    return (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *bias_strides,
        do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
    )


def backward_dq(do, q, k, v, bias, lse, delta, lists, counts, positions, block_size, tile_tokens, o=None):
    """dq [B, Tq, Hq, D] (q's dtype); delta = rowsum(do * o) [B, Tq, Hq] float32 (lse's strides).
    With `o` given, delta is an output: the kernel computes it and writes it there."""
    batch, num_queries, _, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    meta, _ = _meta(q, k, block_size, tile_tokens)
    dq = torch.empty_like(q)
    scale = 1.0 / math.sqrt(head_dim)
    o_arg = o if o is not None else q
    k_desc, v_desc, use_desc = _descriptor_args(k, v, meta)
    _bwd_dq_kernel[(lists.shape[2], batch * num_kv_heads)](
        q, k, v, bias if bias is not None else q, lists, counts, positions, do, lse, delta, dq, o_arg, k_desc, v_desc,
        *_strides(q, k, v, bias, do, lse), lists.stride(0), lists.stride(1), lists.stride(2),
        counts.stride(0), counts.stride(1), o_arg.stride(0), o_arg.stride(1), o_arg.stride(2),
        num_queries, num_keys, num_kv_heads, block_size, LOG2E * scale, scale,
        HAS_BIAS=bias is not None, FUSED_DELTA=o is not None, USE_DESC=use_desc, **meta,
        **_launch_opts("dq", meta["ROWS"], head_dim, use_desc),
    )
    return dq


def backward_dkv(do, q, k, v, bias, lse, delta, inverted, positions, block_size, tile_tokens, deterministic=True):
    """(dk, dv [B, Tk, H, D], dbias [B, Tk, H]) float32 from the inverted selection (`invert_selection`).

    deterministic=False: segments add into the outputs with float32 atomics (no scratch; the summation
    order, hence the last bits, vary run to run). deterministic=True (the default; no slower where measured,
    see `sparse_attention`): each segment writes its partial sums to its own slot (4 * segments * BLOCK_N *
    (2 * BLOCK_D + 1) bytes of scratch, about 1.2 GB at 64K tokens of the 8B shape) and `_dkv_reduce_kernel`
    adds them per key block in segment order: bit-reproducible.
    """
    batch, num_queries, _, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    meta, _ = _meta(q, k, block_size, _tuned("dkv_tokens", tile_tokens))
    tokens, seg_key, seg_start, seg_end = inverted
    num_blocks = -(-num_keys // block_size)
    dk = torch.zeros((batch, num_keys, num_kv_heads, head_dim), device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    dbias = torch.zeros((batch, num_keys, num_kv_heads), device=q.device, dtype=torch.float32)
    if not seg_key.numel():
        return dk, dv, dbias
    scale = 1.0 / math.sqrt(head_dim)
    if deterministic:
        nseg, block_n, block_d = seg_key.numel(), meta["BLOCK_N"], meta["BLOCK_D"]
        targets = (torch.empty((nseg, block_n, block_d), device=q.device, dtype=torch.float32),
                   torch.empty((nseg, block_n, block_d), device=q.device, dtype=torch.float32),
                   torch.empty((nseg, block_n), device=q.device, dtype=torch.float32))
    else:
        targets = (dk, dv, dbias)
    args = (
        q, k, v, bias if bias is not None else q, tokens, seg_key, seg_start, seg_end, positions,
        do, lse, delta, *targets,
        *_strides(q, k, v, bias, do, lse), dk.stride(0), dk.stride(1), dk.stride(2),
        dbias.stride(0), dbias.stride(1), dbias.stride(2),
        num_queries, num_keys, num_kv_heads, num_blocks, block_size, LOG2E * scale, scale,
        int(seg_key.numel()).bit_length(),
    )
    grid = (seg_key.numel(),)
    fixed = {name: _tuned(f"dkv_{name}", None) for name in ("tokens", "warps", "stages")}
    if any(value is not None for value in fixed.values()) or not _tuned("dkv_autotune", True):
        # A benchmark pinned the launch: run the plain kernel with the tile's rows (or dkv_tokens).
        _bwd_dkv_kernel[grid](*args, HAS_BIAS=bias is not None, DETERMINISTIC=deterministic, STEP=1, **meta,
                              **_launch_opts("dkv", meta["ROWS"], head_dim))
    else:
        tuned_before = len(_bwd_dkv_tuned.cache)
        _bwd_dkv_tuned[grid](*args, HAS_BIAS=bias is not None, DETERMINISTIC=deterministic, **meta)
        if len(_bwd_dkv_tuned.cache) != tuned_before:
            # This call ran the tuner's benchmark launches: whatever a Triton version leaves in the atomic
            # outputs afterwards, start again from zeros with the chosen (now cached) config.
            for target in targets:
                target.zero_()
            _bwd_dkv_tuned[grid](*args, HAS_BIAS=bias is not None, DETERMINISTIC=deterministic, **meta)
    if deterministic:
        # Segments are sorted by key, so each key's segments are one contiguous run.
        key_ids = torch.arange(batch * num_kv_heads * num_blocks, device=q.device, dtype=torch.int32)
        first = torch.searchsorted(seg_key, key_ids).to(torch.int32)
        last = torch.searchsorted(seg_key, key_ids, right=True).to(torch.int32)
        _dkv_reduce_kernel[(key_ids.numel(),)](
            *targets, first, last, dk, dv, dbias,
            dk.stride(0), dk.stride(1), dk.stride(2), dbias.stride(0), dbias.stride(1), dbias.stride(2),
            num_keys, num_kv_heads, num_blocks, block_size,
            BLOCK_N=meta["BLOCK_N"], D=head_dim, BLOCK_D=meta["BLOCK_D"], HAS_BIAS=bias is not None, num_warps=4,
        )
    return dk, dv, dbias


def sparse_attention_backward(do, q, k, v, bias, o, lse, lists, counts, block_indices, positions, block_size, tile_tokens,
                              deterministic=True):
    """(dq, dk, dv, dbias) for the forward above, in the inputs' dtypes. dbias is None without a bias.
    deterministic: dk, dv and dbias without atomics (bit-reproducible; see `backward_dkv`)."""
    do = _last_dim_contiguous(do)
    if _tuned("fused_delta", True):
        # Written by the dq kernel. Rows of a padded tile beyond Tq are never read.
        delta = torch.empty(lse.shape, device=lse.device, dtype=torch.float32)
        dq = backward_dq(do, q, k, v, bias, lse, delta, lists, counts, positions, block_size, tile_tokens, o=o)
    else:
        delta = (do.float() * o.float()).sum(-1)  # [B, Tq, Hq] contiguous, like lse
        dq = backward_dq(do, q, k, v, bias, lse, delta, lists, counts, positions, block_size, tile_tokens)
    inverted = invert_selection(block_indices, -(-k.shape[1] // block_size), _tuned("dkv_segment", DKV_SEGMENT))
    dk, dv, dbias = backward_dkv(do, q, k, v, bias, lse, delta, inverted, positions, block_size, tile_tokens, deterministic)
    return dq, dk.to(k.dtype), dv.to(v.dtype), (dbias.to(bias.dtype) if bias is not None else None)


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, block_indices, positions, block_size, tile_tokens, deterministic):
        # Mixed input dtypes (under autocast RoPE can leave q, k in float32 while v is bf16) run in the
        # promoted dtype, as the reference computes in float32; o comes back in q's dtype like the reference.
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        compute = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = (_last_dim_contiguous(x.to(compute)) for x in (q, k, v))
        lists, counts = build_tile_lists(block_indices, _meta(q, k, block_size, tile_tokens)[1])
        positions = positions.to(device=q.device, dtype=torch.int64).contiguous()
        o, lse = sparse_attention_forward(q, k, v, bias, lists, counts, positions, block_size, tile_tokens)
        ctx.save_for_backward(q, k, v, bias, o, lse, lists, counts, block_indices, positions)
        ctx.block_size = block_size
        ctx.tile_tokens = tile_tokens
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return o.to(ctx.dtypes[0]), lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, bias, o, lse, lists, counts, block_indices, positions = ctx.saved_tensors
        dq, dk, dv, dbias = sparse_attention_backward(
            do.to(q.dtype), q, k, v, bias, o, lse, lists, counts, block_indices, positions, ctx.block_size, ctx.tile_tokens,
            ctx.deterministic,
        )
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), dbias, None, None, None, None, None


def sparse_attention(q, k, v, bias, block_indices, positions, block_size, return_lse=False, tile_tokens=None,
                     deterministic=None):
    """Triton version of `nosa.ops.reference.sparse_attention` (same shapes and semantics).

    q: [B, Tq, Hq, D]; k, v: [B, Tk, H, D]; bias: [B, Tk, H] or None; block_indices: [B, Tq, H, K] int32;
    positions: [Tq] -> o [B, Tq, Hq, D] (and lse [B, Tq, Hq] float32 with return_lse). Differentiable in
    q, k, v and bias. `tile_tokens` (queries sharing one program) defaults to `default_tile_tokens(G)`.
    `deterministic`: True (and None, the default) sums dk, dv and dbias in a fixed order, so gradients are
    bit-identical run to run, and was no slower than the atomic path in the one run that timed both
    (bench/results/kernels.json at 7a6541b: 0.95-0.99x its forward+backward at 4K-64K, the dk/dv kernel
    0.89x at 32K; 10 repetitions, to be re-measured on the current kernels), at the cost of a transient
    scratch buffer during the backward (`backward_dkv`: ~1.2 GB at 64K tokens of the 8B shape). False adds
    segments with float32 atomics (no scratch; the last bits vary run to run), which torch's deterministic
    mode refuses when a gradient is needed (a warning with warn_only=True).
    """
    _check_inputs(q, k, v, bias, block_indices, positions, block_size)
    group = q.shape[2] // k.shape[2]
    if tile_tokens is None:
        tile_tokens = default_tile_tokens(group)
    if not 1 <= tile_tokens <= MAX_TILE_TOKENS:
        raise ValueError(f"tile_tokens must be in 1..{MAX_TILE_TOKENS}, got {tile_tokens}")
    if deterministic is None:
        deterministic = True
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, bias))
    if not deterministic and needs_grad and torch.are_deterministic_algorithms_enabled():
        # As torch does for its own nondeterministic ops: an error, or a warning in warn_only mode.
        message = ("sparse_attention(deterministic=False) sums gradients with atomics, which "
                   "torch.use_deterministic_algorithms(True) forbids; pass deterministic=True or None")
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, stacklevel=2)
        else:
            raise RuntimeError(message)
    if q.shape[0] == 0 or q.shape[1] == 0:
        o = q * 0  # keeps the autograd graph for empty batches
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        return (o, lse) if return_lse else o
    o, lse = SparseAttentionFunction.apply(q, k, v, bias, block_indices, positions, block_size, tile_tokens,
                                           bool(deterministic))
    return (o, lse) if return_lse else o
