"""Decode attention over the device slots (the NOSI decode step), split along the keys (flash-decoding).

Same contract as `nosa.ops.reference.decode_attention`. One query token per sequence leaves only B x H
programs, too few to keep the GPU's memory system busy, so the slot axis is cut into `splits` chunks; each
program writes a partial (max, sum, output) for its chunk and a second small kernel merges them.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from nosa.ops.kernels.attention import LOG2E, _dot_precision, _next_pow2
from nosa.ops.occupancy import sm_count


# The key tile is fixed: BLOCK_S sets where the online softmax rescales, so it changes the result's rounding.
# Were it tuned, the paged (one-copy, offload off) and slot (offload on) kernels, tuned apart, could round
# differently and offload would change the tokens (seen in bf16 on the H200), and a process's timings would
# decide its numerics. Warps are not neutral either: they lay out the [ROWS, BLOCK_S] tile across threads, so
# they set the order of the softmax's row reductions (and which MMA instruction a dot uses). So the paged, slot
# and loading variants share one tuned config: PAGED and HOST are not in the autotune key, and the arguments
# a variant does not read are placeholders of the dtypes the others pass (Triton also keys on every tensor
# argument's dtype). Whichever variant a process calls first tunes the config for all of them.
PARTIAL_BLOCK_S = 64


def _partial_configs(interpret: bool | None = None):
    if interpret is None:
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # The interpreter (CPU tests) runs every config of an autotuner: give it one.
    if interpret:
        return [triton.Config({"BLOCK_S": PARTIAL_BLOCK_S}, num_warps=4, num_stages=2)]
    # Deep pipelines keep more bytes in flight per SM when each program's chunk is short.
    return [triton.Config({"BLOCK_S": PARTIAL_BLOCK_S}, num_warps=w, num_stages=st)
            for w in (2, 4, 8) for st in (2, 3, 4, 6)]


# Slot chunks are multiples of two key tiles, so every chunk is whole tiles.
CHUNK_ALIGN = 128


@triton.jit
def _slot_or_host(slot_ptrs, host_ptrs, from_slot, from_host):
    """A key or value tile: from the slots where they hold the block, else from its host page, which is then
    written into the slot (the gather's copy, done where the attention reads it)."""
    x = tl.load(slot_ptrs, mask=from_slot, other=0.0)
    x = tl.where(from_host, tl.load(host_ptrs, mask=from_host, other=0.0), x)
    tl.store(slot_ptrs, x, mask=from_host)
    return x


# restore_value: autotuning runs the kernel several times; each run must start from the caller's zeroed
# arrival counts (reset_to_zero would leave the last benchmark run's counts for the real call).
# PAGED and HOST are not in the key (see PARTIAL_BLOCK_S): every variant of a shape runs with one config.
@triton.autotune(configs=_partial_configs(), key=["S", "chunk", "G", "D", "FUSED_MERGE"],
                 restore_value=["Arrivals"])
@triton.jit
def _decode_partial_kernel(
    Q, K, V, Bias, Valid, Table, PartO, PartM, PartL, Arrivals, Out, HostK, HostV, SlotSrc,
    sqb, sqh, skb, sks, skh, svb, svs, svh, sbb, sbs, sbh, svlb, svls, svlh, stb, sth, sob, soh,
    shp, sht, shh, S, H, NSLOT, chunk, qk_scale,
    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, FUSED_MERGE: tl.constexpr, SPLIT_PAD: tl.constexpr,
    PAGED: tl.constexpr, BS: tl.constexpr, HOST: tl.constexpr,
):
    # HOST: the misses of this step are read from the host pages [P, H, BS, D] (shp, sht, shh: page, token,
    # head strides) named by SlotSrc [B, H, NSLOT] (-1: the slot already holds its block) and written into
    # their slots (PAGED: the pages the table names, the pooled device cache) as they are read, instead of by a gather launched before: the same values in
    # the same order, so the result is the gather-then-attend path's bit for bit, and the PCIe reads of some
    # programs run while others stream slots from HBM.
    # FUSED_MERGE: the last program of a (row, head) to finish (counted in Arrivals, zeroed by the caller)
    # merges the partials itself, instead of a second kernel launch.
    # PAGED: K, V are the store's pages [P, H, BS, D] (skb, svb: page strides; sks, svs: token strides) and
    # slot token s of row b, head h lives at page Table[b, h, s // BS], token s % BS: one indirect load per
    # key (cached: BS consecutive keys share a page), the rest of the loop unchanged.
    bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    g = tl.arange(0, ROWS)
    row_ok = g < G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    start = split * chunk
    stop = tl.minimum(start + chunk, S)
    for s0 in range(start, stop, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        in_range = s < stop
        ok = tl.load(Valid + b * svlb + s * svls + h * svlh, mask=in_range, other=0) != 0
        if PAGED:
            page = tl.load(Table + b * stb + h * sth + s // BS, mask=in_range, other=-1)
            ok = ok & (page >= 0)
            page = tl.maximum(page, 0).to(tl.int64)
            k_row = page * skb + (s % BS) * sks
            v_row = page * svb + (s % BS) * svs
        else:
            k_row = b * skb + s * sks
            v_row = b * svb + s * svs
        kv_mask = in_range[:, None] & d_ok[None, :]
        if HOST:
            src = tl.load(SlotSrc + bh * NSLOT + s // BS, mask=in_range, other=-1)
            from_host = (src >= 0)[:, None] & kv_mask
            from_slot = (src < 0)[:, None] & kv_mask
            h_row = tl.maximum(src, 0).to(tl.int64) * shp + (s % BS) * sht
            host_at = h_row[:, None] + h * shh + d[None, :]
            k = _slot_or_host(K + k_row[:, None] + h * skh + d[None, :], HostK + host_at, from_slot, from_host)
        else:
            k = tl.load(K + k_row[:, None] + h * skh + d[None, :], mask=kv_mask, other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(Bias + b * sbb + s * sbs + h * sbh, mask=in_range, other=0.0).to(tl.float32)
            logits += bias[None, :] * 1.4426950408889634
        logits = tl.where(ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(logits - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HOST:
            v = _slot_or_host(V + v_row[:, None] + h * svh + d[None, :], HostV + host_at, from_slot, from_host)
        else:
            v = tl.load(V + v_row[:, None] + h * svh + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    part = (bh * nsplit + split) * ROWS + g
    tl.store(PartM + part, m_i)
    tl.store(PartL + part, l_i)
    tl.store(PartO + part[:, None] * BLOCK_D + d[None, :], acc)
    if FUSED_MERGE:
        # acq_rel: this program's partial stores are visible before its arrival counts, and the last
        # arriving program sees every other program's partials.
        arrived = tl.atomic_add(Arrivals + bh, 1, sem="acq_rel")
        if arrived == nsplit - 1:
            _merge_partials(PartO, PartM, PartL, Out, b, h, bh, nsplit, sob, soh, G, ROWS, D, BLOCK_D, SPLIT_PAD)


@triton.jit
def _merge_partials(PartO, PartM, PartL, Out, b, h, bh, NSPLIT, sob, soh,
                    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    SPLIT_PAD: tl.constexpr):
    g = tl.arange(0, ROWS)
    sp = tl.arange(0, SPLIT_PAD)
    d = tl.arange(0, BLOCK_D)
    sp_ok = sp < NSPLIT
    idx = (bh * NSPLIT + sp[:, None]) * ROWS + g[None, :]  # [SPLIT_PAD, ROWS]
    # .cg: read at L2, never from a possibly stale L1 line of an earlier call's partials.
    m = tl.load(PartM + idx, mask=sp_ok[:, None], other=float("-inf"), cache_modifier=".cg")
    l = tl.load(PartL + idx, mask=sp_ok[:, None], other=0.0, cache_modifier=".cg")
    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_safe[None, :])  # [SPLIT_PAD, ROWS]
    l_all = tl.sum(l * w, 0)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for i in range(NSPLIT):
        o_i = tl.load(PartO + ((bh * NSPLIT + i) * ROWS + g)[:, None] * BLOCK_D + d[None, :], cache_modifier=".cg")
        w_i = tl.sum(tl.where(sp[:, None] == i, w, 0.0), 0)
        acc += o_i * w_i[:, None]
    out = acc / tl.where(l_all > 0, l_all, 1.0)[:, None]
    row_ok = g < G
    tl.store(Out + b * sob + (h * G + g)[:, None] * soh + d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _decode_merge_kernel(
    PartO, PartM, PartL, Out, sob, soh, H, NSPLIT,
    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_PAD: tl.constexpr,
):
    bh = tl.program_id(0)
    _merge_partials(PartO, PartM, PartL, Out, (bh // H).to(tl.int64), bh % H, bh, NSPLIT, sob, soh,
                    G, ROWS, D, BLOCK_D, SPLIT_PAD)


# Programs per SM the slot axis is split for. bench/results/kernels.json (H200, 32 rows x 2 KV heads x 4096
# slots, bf16, CUDA graphs): 8 splits (~4 programs per SM) 46.1 us, 16 (~8 per SM, the earlier default)
# 53.0 us, 32 splits 65.5 us: past a few programs per SM, each extra split costs its partial's round trip
# and merge more than the added parallelism gains.
PROGRAMS_PER_SM = 4


def _num_splits(batch_heads: int, num_slots: int, sm_count: int) -> int:
    # Enough programs for PROGRAMS_PER_SM per SM (memory-level parallelism: decode is a pure stream of K
    # and V), but never chunks shorter than two aligned tiles.
    want = max(1, (PROGRAMS_PER_SM * sm_count + batch_heads - 1) // batch_heads)
    most = max(1, num_slots // (2 * CHUNK_ALIGN))
    return max(1, min(want, most, 64))


# Merge in the last partial program (one launch) rather than in a second kernel; module-level so a
# benchmark can time both (`fused_merge=` per call overrides it).
FUSED_MERGE = True


def _check_host_loads(k_slots, v_slots, host_k, host_v, slot_src, paged, batch, num_slots, num_kv_heads, dtype):
    """Whether the call loads misses itself: False with none of host_k, host_v, slot_src; True once they fit
    the slots (the kernel writes into k_slots / v_slots, so they must be the caller's own tensors, not a
    converted copy)."""
    given = [x is not None for x in (host_k, host_v, slot_src)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("decode_attention: host_k, host_v and slot_src go together")
    if host_k.dim() != 4 or host_k.shape != host_v.shape or host_k.stride() != host_v.stride():
        raise ValueError(f"decode_attention: host_k, host_v must be pages [P, H, bs, D] with equal strides; got "
                         f"{tuple(host_k.shape)}, {tuple(host_v.shape)}")
    pages, heads, block, head_dim = host_k.shape
    if heads != num_kv_heads or head_dim != k_slots.shape[3] or num_slots % block or (paged and k_slots.shape[2] != block):
        raise ValueError(f"decode_attention: host pages {tuple(host_k.shape)} do not fit slots {tuple(k_slots.shape)}")
    if slot_src.shape != (batch, num_kv_heads, num_slots // block) or slot_src.dtype != torch.int32 or not slot_src.is_contiguous():
        raise ValueError(f"decode_attention: slot_src must be contiguous int32 [B, H, K] = "
                         f"[{batch}, {num_kv_heads}, {num_slots // block}]; got {tuple(slot_src.shape)} {slot_src.dtype}")
    for name, t in (("k_slots", k_slots), ("v_slots", v_slots), ("host_k", host_k), ("host_v", host_v)):
        if t.dtype != dtype or t.stride(-1) != 1:
            raise ValueError(f"decode_attention: with slot_src, {name} must be {dtype} with a contiguous last dim "
                             f"(the kernel writes the loaded blocks into the slots); got {t.dtype}, stride {t.stride()}")
    return True


def _check_block_table(q, pages, block_table):
    """(slots S, KV heads H, block size) of a paged call, or ValueError naming what does not fit."""
    if pages.dim() != 4 or block_table.dim() != 3:
        raise ValueError(f"paged decode attention takes pages [P, H, bs, D] and block_table [B, H, K]; got "
                         f"{tuple(pages.shape)}, {tuple(block_table.shape)}")
    heads, block, head_dim = pages.shape[1], pages.shape[2], pages.shape[3]
    if block_table.shape[:2] != (q.shape[0], heads) or head_dim != q.shape[2] or q.shape[1] % heads:
        raise ValueError(f"block_table {tuple(block_table.shape)} / pages {tuple(pages.shape)} do not fit q {tuple(q.shape)} "
                         f"(batch, KV heads, head_dim, GQA group)")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32 or int64, got {block_table.dtype}")
    return block_table.shape[2] * block, heads, block


def decode_attention(q, k_slots, v_slots, bias_slots, valid, block_table=None, splits: int | None = None,
                     fused_merge: bool | None = None, host_k=None, host_v=None, slot_src=None):
    """Triton version of `nosa.ops.reference.decode_attention`.

    q: [B, Hq, D]; k_slots, v_slots: [B, S, H, D]; bias_slots: [B, S, H] or None; valid: [B, S, H] bool
    -> [B, Hq, D] in q's dtype. Paged (block_table [B, H, K] given): k_slots, v_slots are the store's pages
    [P, H, bs, D], read in place through the table (S = K * bs). `splits`: chunks of the slot axis
    (default: sized for occupancy). `fused_merge`: merge the chunks in the last program of each (row,
    head) (default FUSED_MERGE) or in a second kernel. host_k, host_v, slot_src (slot path): load this
    step's misses inside the kernel (see the kernel's HOST), writing them into k_slots / v_slots (paged:
    into the pages the table names).
    """
    if q.dim() != 3 or k_slots.dim() != 4 or k_slots.shape != v_slots.shape:
        raise ValueError(f"q must be [B, Hq, D] and k_slots, v_slots [B, S, H, D]; got {tuple(q.shape)}, {tuple(k_slots.shape)}, {tuple(v_slots.shape)}")
    batch, num_q_heads, head_dim = q.shape
    paged = block_table is not None
    if paged:
        num_slots, num_kv_heads, block = _check_block_table(q, k_slots, block_table)
    else:
        _, num_slots, num_kv_heads, _ = k_slots.shape
        block = 1
        if k_slots.shape[0] != batch or k_slots.shape[3] != head_dim or num_q_heads % num_kv_heads:
            raise ValueError(f"k_slots {tuple(k_slots.shape)} does not fit q {tuple(q.shape)} (batch, head_dim, GQA group)")
    if valid.shape != (batch, num_slots, num_kv_heads):
        raise ValueError(f"valid must be [B, S, H] = [{batch}, {num_slots}, {num_kv_heads}]; got {tuple(valid.shape)}")
    if bias_slots is not None and bias_slots.shape != valid.shape:
        raise ValueError(f"bias_slots must be [B, S, H] = {tuple(valid.shape)}; got {tuple(bias_slots.shape)}")
    host = _check_host_loads(k_slots, v_slots, host_k, host_v, slot_src, paged, batch, num_slots, num_kv_heads, q.dtype)
    group = num_q_heads // num_kv_heads
    out_dtype = q.dtype
    rows = max(16, _next_pow2(group))
    block_d = max(16, _next_pow2(head_dim))
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if batch == 0:
        return out.to(out_dtype)
    compute = torch.promote_types(torch.promote_types(q.dtype, k_slots.dtype), v_slots.dtype)
    q, k_slots, v_slots = (x.to(compute) for x in (q, k_slots, v_slots))  # mixed dtypes: promoted, like the reference
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_slots = k_slots if k_slots.stride(-1) == 1 else k_slots.contiguous()
    v_slots = v_slots if v_slots.stride(-1) == 1 else v_slots.contiguous()
    valid_u8 = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    if splits is None:
        splits = _num_splits(batch * num_kv_heads, num_slots, sm_count(q.device, off_cuda=8))
    splits = max(1, min(int(splits), max(1, num_slots)))
    chunk = -(-max(1, num_slots) // splits)
    chunk = -(-chunk // CHUNK_ALIGN) * CHUNK_ALIGN
    splits = -(-max(1, num_slots) // chunk)
    part_o = torch.empty((batch * num_kv_heads * splits * rows, block_d), device=q.device, dtype=torch.float32)
    part_m = torch.empty((batch * num_kv_heads * splits * rows,), device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    bias_arg = bias_slots if bias_slots is not None else valid_u8
    bias_strides = bias_slots.stride() if bias_slots is not None else (0, 0, 0)
    precision = _dot_precision(q.dtype)
    fused = FUSED_MERGE if fused_merge is None else bool(fused_merge)
    # Zeroed every call (a 4-byte-per-(row, head) memset, one graph node) rather than cached and reset by
    # the kernel, so an interrupted call or a second stream can never leave a stale count.
    arrivals = torch.zeros(batch * num_kv_heads if fused else 1, device=q.device, dtype=torch.int32)
    split_pad = max(2, _next_pow2(splits))
    if paged:
        # Store pages [P, H, bs, D]: (page, token, head) strides in the slot path's (row, token, head) places.
        # int32, the slot path's placeholder dtype (one autotune key); the engine's tables are int32 already
        table = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
        table = table if table.stride(-1) == 1 else table.contiguous()
        k_strides = (k_slots.stride(0), k_slots.stride(2), k_slots.stride(1))
        v_strides = (v_slots.stride(0), v_slots.stride(2), v_slots.stride(1))
        table_strides = (table.stride(0), table.stride(1))
    else:
        table = arrivals  # never read; int32, as a block table is
        k_strides = (k_slots.stride(0), k_slots.stride(1), k_slots.stride(2))
        v_strides = (v_slots.stride(0), v_slots.stride(1), v_slots.stride(2))
        table_strides = (0, 0)
    if not host:
        # Never read, but of the loading variant's dtypes (see PARTIAL_BLOCK_S): uint8 placeholders made the two
        # tune apart, and the fused gather's fp32 logits differed from the gather path's (an H100, 2026-12-07).
        host_args, host_strides, num_blocks = (k_slots, v_slots, arrivals), (0, 0, 0), 1
    else:
        host_args = (host_k, host_v, slot_src)
        host_strides = (host_k.stride(0), host_k.stride(2), host_k.stride(1))  # page, token, head
        num_blocks, block = slot_src.shape[-1], host_k.shape[2]
    _decode_partial_kernel[(batch * num_kv_heads, splits)](
        q, k_slots, v_slots, bias_arg, valid_u8, table, part_o, part_m, part_l, arrivals, out, *host_args,
        q.stride(0), q.stride(1), *k_strides, *v_strides, *bias_strides, *valid_u8.stride(), *table_strides,
        out.stride(0), out.stride(1), *host_strides, num_slots, num_kv_heads, num_blocks, chunk,
        LOG2E / math.sqrt(head_dim),
        G=group, ROWS=rows, D=head_dim, BLOCK_D=block_d, HAS_BIAS=bias_slots is not None, PRECISION=precision,
        FUSED_MERGE=fused, SPLIT_PAD=split_pad, PAGED=paged, BS=block, HOST=host,
    )
    if not fused:
        _decode_merge_kernel[(batch * num_kv_heads,)](
            part_o, part_m, part_l, out, out.stride(0), out.stride(1), num_kv_heads, splits,
            G=group, ROWS=rows, D=head_dim, BLOCK_D=block_d, SPLIT_PAD=split_pad, num_warps=4,
        )
    return out.to(out_dtype)
