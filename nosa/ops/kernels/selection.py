"""Selection kernels (spec sec. 4.1-4.5): window means, query-aware chunk scores fused with the softmax, the
GQA sum and the pooling to blocks, and the selection composition.

Each public function has the contract of its namesake in `nosa.ops.reference`:
- `compress_keys` / `agnostic_chunk_scores`: one window mean kernel (float32 sums; the agnostic scores
  summed in ascending order of value, like the reference).
- `query_aware_chunk_scores`: per-window scores (the reference's intermediate), for tests and callers that
  want them; the pipeline uses `query_aware_block_scores`, which pools inside the kernel and never writes
  the [B, Tq, H, Nc] window scores. When that fused kernel would launch too few programs for the GPU
  (decode: one query per row), `score_chunks` sends the call to the split path instead: the compressed keys
  in chunks, per-chunk softmax statistics, then window scores from the combined statistics (small at
  decode), then a pooling pass.
- `select_blocks`: forced blocks, then `query_aware_quota` picks, then the agnostic fill, by repeated
  arg-max (ties to the lower block index, -inf candidate scores clamped to float32's lowest like the
  reference), written as ascending indices padded with -1.
- `select_for_queries`: the three steps for a group of queries; the agnostic pooling is read from a small
  prefix-max table ([B, H, NB, W]) because, for a given block, only the number of complete windows at the
  query's position changes the pooled value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nosa.config import SparseAttentionConfig
from nosa.ops import reference
from nosa.ops.kernels.attention import LOG2E, _dot_precision, _next_pow2
from nosa.ops.occupancy import sm_count

FLOAT32_LOWEST = -3.4028234663852886e38
# Rows (query tokens x padded GQA group) per program of the pooled score kernel. At 64K tokens (8B shape)
# 32 rows took 17.7 ms, 64 rows 8.9 ms, 128 rows 8.3 ms on the H200: each compressed key loaded serves more rows.
SCORE_ROWS = 128
# Composition by a counting threshold (32 rounds) instead of repeated arg-max (2 reductions per pick, 46
# picks at the spec defaults); both give identical indices (tests/ops/test_kernels_selection.py runs both).
# Module-level so a benchmark can time both. Off: on the H200 the whole selection took 0.96 / 2.05 / 4.34 /
# 14.31 ms with it against arg-max's 0.86 / 1.73 / 4.29 / 14.09 ms at 4K / 16K / 32K / 64K
# (bench/results/kernels.json), and under the CPU interpreter arg-max is cheaper too.
SELECT_BY_THRESHOLD = False


# ----------------------------------------------------------------------------------------------------------
# Window means (compressed keys, query-agnostic chunk scores)
# ----------------------------------------------------------------------------------------------------------
# Not specialised: lengths and the strides that follow them (see the note on attention._fwd_kernel).
@triton.jit(do_not_specialize=["sxb", "sob"])
def _window_mean_kernel(X, Out, sxb, sxt, sob, son, F, kernel, stride, inv_kernel,
                        KERNEL_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BY_VALUE: tl.constexpr):
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    f = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    r = tl.arange(0, KERNEL_PAD)
    rows = i * stride + r
    # [BLOCK_F, KERNEL_PAD]: the window along the minor dimension, the only one tl.sort sorts.
    mask = (f[:, None] < F) & (r[None, :] < kernel)
    x = tl.load(X + b * sxb + rows[None, :] * sxt + f[:, None], mask=mask, other=0.0).to(tl.float32)
    if BY_VALUE:
        # The padding zeros sort in too; they are as many in every window, so the sum stays a function of
        # the window's values.
        x = tl.sort(x, 1)
    tl.store(Out + b * sob + i * son + f, (tl.sum(x, 1) * inv_kernel).to(Out.dtype.element_ty), mask=f < F)


def window_mean(x: torch.Tensor, kernel: int, stride: int, out_dtype=None, by_value: bool = False) -> torch.Tensor:
    """x: [B, T, ...] -> [B, Nc, ...] mean over complete windows (float32 sums), in out_dtype or x's dtype;
    by_value: summed in ascending order of value (the reference's `window_mean`)."""
    batch, length = x.shape[:2]
    tail = tuple(x.shape[2:])
    num_windows = reference.num_complete_windows(length, kernel, stride)
    out = torch.empty((batch, num_windows) + tail, device=x.device, dtype=out_dtype or x.dtype)
    if num_windows == 0 or batch == 0:
        return out
    flat = x.reshape(batch, length, -1)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    features = flat.shape[2]
    out_flat = out.view(batch, num_windows, features)
    block_f = min(256, max(16, _next_pow2(features)))
    grid = (num_windows, batch, triton.cdiv(features, block_f))
    _window_mean_kernel[grid](
        flat, out_flat, flat.stride(0), flat.stride(1), out_flat.stride(0), out_flat.stride(1),
        features, kernel, stride, 1.0 / kernel, KERNEL_PAD=_next_pow2(kernel), BLOCK_F=block_f, BY_VALUE=by_value,
    )
    return out


def compress_keys(k: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """k: [B, T, H, D] -> compressed keys [B, Nc, H, D] in k's dtype."""
    return window_mean(k, kernel, stride)


def agnostic_chunk_scores(eviction: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """eviction: [B, T, H] -> window means [B, Nc, H] float32, summed by value (why: the reference's
    `agnostic_chunk_scores`)."""
    return window_mean(eviction, kernel, stride, out_dtype=torch.float32, by_value=True)


# ----------------------------------------------------------------------------------------------------------
# Query-aware chunk scores: softmax over complete windows, summed over the GQA group, pooled to blocks
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _softmax_stats(q, CK, ck_base, scn, nc, qk_scale, d, d_ok,
                   ROWS: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr):
    """Row max and sum of exp2 (base-2 logits) over the first nc compressed keys."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    for w0 in range(0, nc, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        ok = w < nc
        ck = tl.load(CK + ck_base + w[:, None] * scn + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(ck), input_precision=PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
    return m, l


@triton.jit
def _load_query_group(Q, b, t, h, sqb, sqt, sqh, G: tl.constexpr, ROWS: tl.constexpr, d, d_ok):
    g = tl.arange(0, ROWS)
    row_ok = g < G
    q = tl.load(Q + b * sqb + t * sqt + (h * G + g)[:, None] * sqh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return q, row_ok


@triton.jit
def _qa_rows(Q, Pos, b, h, tile, sqb, sqt, sqh, Tq, Nc, kernel, stride,
             G: tl.constexpr, G_PAD: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile's rows (token, query head) of TQ consecutive queries: their queries, which rows exist, and
    how many compressed keys are complete at each row's position (nc_row) and at the tile's latest (nc_max)."""
    ROWS: tl.constexpr = TQ * G_PAD
    r = tl.arange(0, ROWS)
    g = r % G_PAD
    t_row = tile * TQ + r // G_PAD
    row_ok = (g < G) & (t_row < Tq)
    pos_row = tl.load(Pos + t_row, mask=t_row < Tq, other=-1)
    nc_row = tl.where(pos_row + 1 >= kernel, (pos_row + 1 - kernel) // stride + 1, 0)
    nc_row = tl.minimum(nc_row, Nc).to(tl.int32)
    nc_max = tl.max(nc_row, 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * sqb + t_row[:, None] * sqt + (h * G + g)[:, None] * sqh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return q, row_ok, pos_row, nc_row, nc_max, d, d_ok


@triton.jit
def _qa_softmax_range(q, CK, ck_base, scn, w_lo, w_hi, nc_row, nc_max, qk_scale, d, d_ok,
                      ROWS: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr):
    """Online row max and sum of exp2 (base-2 logits) over compressed keys [w_lo, w_hi), BLOCK_W at a time
    (w_hi <= nc_max); keys at or past a row's nc_row are left out of that row."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    for w0 in range(w_lo, w_hi, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        ck = tl.load(CK + ck_base + w[:, None] * scn + d[None, :], mask=(w < w_hi)[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(ck), input_precision=PRECISION) * qk_scale
        s = tl.where((w[None, :] < nc_row[:, None]) & (w < w_hi)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    return m, l


@triton.jit
def _qa_pool_range(q, CK, ck_base, scn, Pos, Out, b, h, tile, sob, sot, soh, m, inv_l, pos_row, nc_row, nc_max,
                   Tq, Nc, j_lo, j_hi, block_size, kernel, stride, qk_scale, d, d_ok,
                   G_PAD: tl.constexpr, TQ: tl.constexpr, BLOCK_W: tl.constexpr, BJ: tl.constexpr,
                   BJ_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of blocks [j_lo, j_hi), normalised by m and inv_l: the softmax
    probabilities of the windows overlapping each block, summed over the GQA group, maxed over the windows.
    Every block is computed whole here, from the windows it overlaps (re-read where two blocks share one)."""
    pos_max = tl.max(pos_row, 0)
    own_max = (pos_max // block_size).to(tl.int32)
    jr = tl.arange(0, BJ_PAD)
    tok = tl.arange(0, TQ)
    t_tok = tile * TQ + tok
    pos_tok = tl.load(Pos + t_tok, mask=t_tok < Tq, other=-1)
    nc_tok = tl.where(pos_tok + 1 >= kernel, (pos_tok + 1 - kernel) // stride + 1, 0)
    nc_tok = tl.minimum(nc_tok, Nc).to(tl.int32)
    out_rows = Out + b * sob + t_tok[:, None] * sot + h * soh
    for j0 in range(j_lo, j_hi, BJ):
        jj = j0 + jr
        score = tl.full([TQ, BJ_PAD], float("-inf"), tl.float32)
        if (j0 <= own_max) & (nc_max > 0):
            x = block_size * j0 - kernel
            w_first = tl.where(x < 0, 0, x // stride + 1)
            w = w_first + tl.arange(0, BLOCK_W)
            ck = tl.load(CK + ck_base + w[:, None] * scn + d[None, :], mask=(w < nc_max)[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(ck), input_precision=PRECISION) * qk_scale
            p = tl.where(w[None, :] < nc_row[:, None], tl.exp2(s - m[:, None]), 0.0) * inv_l[:, None]
            psum = tl.sum(tl.reshape(p, [TQ, G_PAD, BLOCK_W]), 1)  # GQA sum: [TQ, BLOCK_W]
            psum = tl.where(w[None, :] < nc_tok[:, None], psum, float("-inf"))
            overlap = (stride * w[None, :] < block_size * (jj[:, None] + 1)) & \
                      (stride * w[None, :] + kernel > block_size * jj[:, None])  # [BJ_PAD, BLOCK_W]
            score = tl.max(tl.where(overlap[None, :, :], psum[:, None, :], float("-inf")), 2)
        tl.store(out_rows + jj[None, :], score, mask=(t_tok < Tq)[:, None] & ((jr < BJ) & (jj < j_hi))[None, :])


# Not specialised: lengths and the strides that follow them (see the note on attention._fwd_kernel).
@triton.jit(do_not_specialize=["spb", "sqb", "scb", "sob", "sot", "soh", "Tq", "Nc", "NB"])
def _qa_block_scores_kernel(
    Q, CK, Pos, spb, WinOff, Out, sqb, sqt, sqh, scb, scn, sch, sob, sot, soh,
    Tq, Nc, H, NB, block_size, kernel, stride, qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr, BJ: tl.constexpr, BJ_PAD: tl.constexpr, PRECISION: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
):
    # One program per (query tile, batch x KV head) walks all compressed keys twice: the softmax
    # statistics, then the pooling. Used when that already gives the GPU enough programs (`score_chunks`).
    # HAS_OFFSETS (packed sequences): positions count from each sequence's start and WinOff[t] is the
    # index of its sequence's first compressed key; the TQ tokens of a program share one sequence.
    # Rows are (token, query head) for TQ consecutive queries: every compressed key loaded serves TQ x G
    # rows, which is what makes this kernel cheap at long context (it is L2-bandwidth bound otherwise).
    ROWS: tl.constexpr = TQ * G_PAD
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    Pos += b * spb  # this sequence's positions (spb = 0: one set shared by the batch)
    q, row_ok, pos_row, nc_row, nc_max, d, d_ok = _qa_rows(Q, Pos, b, h, tile, sqb, sqt, sqh, Tq, Nc, kernel, stride,
                                                           G, G_PAD, TQ, D, BLOCK_D)
    ck_base = b * scb + h * sch
    if HAS_OFFSETS:
        ck_base += tl.load(WinOff + tile * TQ).to(tl.int64) * scn
    m, l = _qa_softmax_range(q, CK, ck_base, scn, 0, nc_max, nc_row, nc_max, qk_scale, d, d_ok, ROWS, BLOCK_W, PRECISION)
    inv_l = tl.where(row_ok & (l > 0), 1.0 / tl.where(l > 0, l, 1.0), 0.0)
    m = tl.where(m == float("-inf"), 0.0, m)
    _qa_pool_range(q, CK, ck_base, scn, Pos, Out, b, h, tile, sob, sot, soh, m, inv_l, pos_row, nc_row, nc_max,
                   Tq, Nc, 0, NB, block_size, kernel, stride, qk_scale, d, d_ok, G_PAD, TQ, BLOCK_W, BJ, BJ_PAD, PRECISION)


@triton.jit
def _qa_chunk_stats_kernel(
    Q, CK, Pos, spb, StatM, StatL, sqb, sqt, sqh, scb, scn, sch,
    Tq, Nc, H, kernel, stride, qk_scale, chunk_windows, num_chunks,
    G: tl.constexpr, G_PAD: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
):
    # Split path, pass 1: program (tile, batch x KV head, chunk c) writes the softmax statistics (row max,
    # sum of exp2 relative to it) of compressed keys [c * chunk_windows, (c+1) * chunk_windows); a chunk
    # past the tile's complete keys writes (-inf, 0). Stat layout: [tiles, B*H, num_chunks, ROWS].
    ROWS: tl.constexpr = TQ * G_PAD
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    c = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    Pos += b * spb
    q, row_ok, pos_row, nc_row, nc_max, d, d_ok = _qa_rows(Q, Pos, b, h, tile, sqb, sqt, sqh, Tq, Nc, kernel, stride,
                                                           G, G_PAD, TQ, D, BLOCK_D)
    w_lo = c * chunk_windows
    w_hi = tl.minimum(w_lo + chunk_windows, nc_max)
    m, l = _qa_softmax_range(q, CK, b * scb + h * sch, scn, w_lo, w_hi, nc_row, nc_max, qk_scale, d, d_ok,
                             ROWS, BLOCK_W, PRECISION)
    at = ((tile * (tl.num_programs(1)) + bh).to(tl.int64) * num_chunks + c) * ROWS + tl.arange(0, ROWS)
    tl.store(StatM + at, m)
    tl.store(StatL + at, l)


@triton.jit
def _qa_chunk_windows_kernel(
    Q, CK, Pos, spb, StatM, StatL, Win, sqb, sqt, sqh, scb, scn, sch, swb, swt, swh,
    Tq, Nc, H, kernel, stride, qk_scale, chunk_windows, num_chunks,
    G: tl.constexpr, G_PAD: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
):
    # Split path, pass 2: program (tile, batch x KV head, c) combines the statistics of all key chunks (in
    # chunk order: every program of a row computes the same normaliser from the same values) and writes the
    # window scores of its own key chunk (softmax probabilities summed over the GQA group) to Win
    # [B, Tq, H, Nc]; entries at or past a token's complete keys are 0 up to the tile's last complete key
    # and unwritten beyond it (the pooling never reads them). Each window is computed once, so two blocks
    # that share their best window get the same float and tie exactly, as in the reference. (Pass 1 storing
    # its logits for this pass instead of a second read of the keys was timed on an H200 and dropped: 0.173
    # ms at two tokens per program, against 0.194 for these two passes then and 0.140 with one token per
    # program, and the two kernels' dots round differently; bench/results/scoring_probe_h200.json.)
    ROWS: tl.constexpr = TQ * G_PAD
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    c = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    Pos += b * spb
    q, row_ok, pos_row, nc_row, nc_max, d, d_ok = _qa_rows(Q, Pos, b, h, tile, sqb, sqt, sqh, Tq, Nc, kernel, stride,
                                                           G, G_PAD, TQ, D, BLOCK_D)
    at = (tile * (tl.num_programs(1)) + bh).to(tl.int64) * num_chunks * ROWS + tl.arange(0, ROWS)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for i in range(0, num_chunks):
        m = tl.maximum(m, tl.load(StatM + at + i * ROWS))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([ROWS], tl.float32)
    for i in range(0, num_chunks):
        l += tl.load(StatL + at + i * ROWS) * tl.exp2(tl.load(StatM + at + i * ROWS) - m_safe)
    inv_l = tl.where(row_ok & (l > 0), 1.0 / tl.where(l > 0, l, 1.0), 0.0)
    t_tok = tile * TQ + tl.arange(0, TQ)
    win_rows = Win + b * swb + t_tok[:, None].to(tl.int64) * swt + h * swh
    ck_base = b * scb + h * sch
    w_lo = c * chunk_windows
    w_hi = tl.minimum(w_lo + chunk_windows, nc_max)
    for w0 in range(w_lo, w_hi, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        ck = tl.load(CK + ck_base + w[:, None] * scn + d[None, :], mask=(w < w_hi)[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(ck), input_precision=PRECISION) * qk_scale
        p = tl.where(w[None, :] < nc_row[:, None], tl.exp2(s - m_safe[:, None]), 0.0) * inv_l[:, None]
        psum = tl.sum(tl.reshape(p, [TQ, G_PAD, BLOCK_W]), 1)  # GQA sum: [TQ, BLOCK_W]
        tl.store(win_rows + w[None, :], psum, mask=(t_tok < Tq)[:, None] & (w < w_hi)[None, :])


@triton.jit
def _pool_window_scores_kernel(
    Win, Pos, spb, Out, swb, swt, swh, sob, sot, soh, Tq, H, Nc, NB, block_size, kernel, stride, width, chunk_blocks,
    BLOCKS: tl.constexpr, WIDTH_PAD: tl.constexpr,
):
    # Split path, pass 3: row (b, t, h), blocks [c * chunk_blocks, (c+1) * chunk_blocks): the max of the
    # window scores overlapping each block that are complete at the token's position (reference
    # `pool_to_blocks`, windows `block_window_ranges`), -inf where there is none.
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = (row // (Tq * H)).to(tl.int64)
    t = (row // H) % Tq
    h = row % H
    pos = tl.load(Pos + b * spb + t)
    nc = tl.where(pos + 1 >= kernel, (pos + 1 - kernel) // stride + 1, 0)
    nc = tl.minimum(nc, Nc).to(tl.int32)
    jr = tl.arange(0, BLOCKS)
    j = c * chunk_blocks + jr
    j_ok = (jr < chunk_blocks) & (j < NB)
    x = block_size * j - kernel
    first = tl.where(x < 0, 0, x // stride + 1)
    last = (block_size * (j + 1) - 1) // stride
    k = tl.arange(0, WIDTH_PAD)
    w = first[:, None] + k[None, :]
    ok = j_ok[:, None] & (k < width)[None, :] & (w <= last[:, None]) & (w < nc)
    scores = tl.load(Win + b * swb + t * swt + h * swh + w, mask=ok, other=float("-inf"))
    tl.store(Out + b * sob + t * sot + h * soh + j, tl.max(scores, 1), mask=j_ok)


@triton.jit
def _qa_chunk_scores_kernel(
    Q, CK, Pos, spb, Out, sqb, sqt, sqh, scb, scn, sch, sob, sot, soh,
    Nc, H, kernel, stride, qk_scale,
    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    pos = tl.load(Pos + b * spb + t)
    nc = tl.where(pos + 1 >= kernel, (pos + 1 - kernel) // stride + 1, 0)
    nc = tl.minimum(nc, Nc).to(tl.int32)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q, row_ok = _load_query_group(Q, b, t, h, sqb, sqt, sqh, G, ROWS, d, d_ok)
    ck_base = b * scb + h * sch
    m, l = _softmax_stats(q, CK, ck_base, scn, nc, qk_scale, d, d_ok, ROWS, BLOCK_W, PRECISION)
    inv_l = tl.where(row_ok & (l > 0), 1.0 / tl.where(l > 0, l, 1.0), 0.0)
    m = tl.where(m == float("-inf"), 0.0, m)
    out_base = Out + b * sob + t * sot + h * soh
    for w0 in range(0, Nc, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        ok = w < nc
        ck = tl.load(CK + ck_base + w[:, None] * scn + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(ck), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - m[:, None]) * inv_l[:, None]
        tl.store(out_base + w, tl.sum(tl.where(ok[None, :], p, 0.0), 0), mask=w < Nc)


def _score_meta(q, compressed_keys):
    group = q.shape[2] // compressed_keys.shape[2]
    head_dim = q.shape[3]
    return dict(G=group, ROWS=max(16, _next_pow2(group)), D=head_dim, BLOCK_D=max(16, _next_pow2(head_dim)),
                PRECISION=_dot_precision(q.dtype))


def _check_positions(positions, batch, num_queries):
    if positions.shape not in ((num_queries,), (batch, num_queries)):
        raise ValueError(f"positions must be [Tq] = [{num_queries}] or [B, Tq] = [{batch}, {num_queries}]; "
                         f"got {tuple(positions.shape)}")


def _check_scores(q, compressed_keys, positions):
    if q.dim() != 4 or compressed_keys.dim() != 4 or q.shape[3] != compressed_keys.shape[3] or q.shape[0] != compressed_keys.shape[0]:
        raise ValueError(f"q must be [B, Tq, Hq, D] and compressed_keys [B, Nc, H, D]; got {tuple(q.shape)}, {tuple(compressed_keys.shape)}")
    if q.shape[2] % compressed_keys.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({compressed_keys.shape[2]})")
    _check_positions(positions, q.shape[0], q.shape[1])


def _positions_arg(positions, device):
    """positions [Tq] or [B, Tq] -> (contiguous int64 on `device`, its batch stride: 0 when the batch shares
    one set, which every kernel reading positions takes as `Pos + b * stride + t`)."""
    positions = positions.to(device=device, dtype=torch.int64).contiguous()
    return positions, (positions.stride(0) if positions.dim() == 2 else 0)


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def query_aware_chunk_scores(q, compressed_keys, positions, kernel, stride):
    """q: [B, Tq, Hq, D]; compressed_keys: [B, Nc, H, D]; positions: [Tq] or [B, Tq] -> [B, Tq, H, Nc] float32."""
    _check_scores(q, compressed_keys, positions)
    batch, num_queries, _, head_dim = q.shape
    num_windows, num_kv_heads = compressed_keys.shape[1], compressed_keys.shape[2]
    out = torch.zeros((batch, num_queries, num_kv_heads, num_windows), device=q.device, dtype=torch.float32)
    if num_windows == 0 or num_queries == 0:
        return out
    q, ck = _last_dim_contiguous(q), _last_dim_contiguous(compressed_keys.to(q.dtype))
    positions, spb = _positions_arg(positions, q.device)
    _qa_chunk_scores_kernel[(num_queries, batch * num_kv_heads)](
        q, ck, positions, spb, out, q.stride(0), q.stride(1), q.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
        out.stride(0), out.stride(1), out.stride(2), num_windows, num_kv_heads, kernel, stride,
        LOG2E / math.sqrt(head_dim), BLOCK_W=64, **_score_meta(q, ck),
    )
    return out


# The pooling step builds a [TQ, BJ_PAD, BLOCK_W] tensor. Cap it at the size the 8B-shape configurations
# already use (GQA 1 at the spec defaults: 128 x 16 x 64); without a cap, blocks much smaller than the
# stride grow BJ past Triton's 2^20-element limit.
MAX_POOL_ELEMENTS = 1 << 17


def _pool_tiling(cfg: SparseAttentionConfig, tq: int):
    """(windows per pooling step, blocks per pooling step): the windows of BJ consecutive blocks fit
    BLOCK_W, and the pooling tensor of TQ tokens stays within MAX_POOL_ELEMENTS."""
    bs, kernel, stride = cfg.block_size, cfg.compress_kernel, cfg.compress_stride
    block_w = 64
    while (bs + kernel - 1) // stride + 2 > block_w:
        block_w *= 2
    bj = 1
    while ((bs * (bj + 1) + kernel - 1) // stride + 2 <= block_w
           and tq * _next_pow2(bj + 1) * block_w <= MAX_POOL_ELEMENTS):
        bj += 1
    return block_w, bj


def score_tile_tokens(group: int) -> int:
    """Query tokens per program of the pooled score kernel (packed sequences align to a multiple)."""
    return max(SCORE_ROWS // _next_pow2(group), 1)


# The split path (`query_aware_block_scores_split`): when the fused kernel would launch too few programs
# (decode: one query per row, so batch x KV heads programs, 96 at batch 48 of the 8B shape against the
# H200's 132 SMs), the compressed keys are cut into chunks: pass 1 writes each chunk's softmax statistics,
# pass 2 combines them and pools a range of blocks. `score_chunks` is the one rule choosing between them.
SPLIT_PROGRAMS_PER_SM = 4  # split until there are about this many programs per SM
SPLIT_MIN_WINDOWS = 128  # never cut the compressed keys into chunks smaller than this (2K tokens at stride 16)
SPLIT_MAX_SCORE_BYTES = 1 << 24  # the split path materialises the window scores: split only while they fit


def _sm_count(device: torch.device) -> int:
    """The SMs the split launch sizes itself for (`occupancy.sm_count`: a share of them inside
    `launch_share`); 1 off CUDA (the interpreter: tests force their chunks)."""
    return sm_count(device, off_cuda=1)


def split_tile_tokens(group: int, num_queries: int) -> int:
    """Query tokens per program on the split path: no more than the queries need (decode: 1, so a
    program's rows are its GQA group rather than 8 tokens of which 7 are padding), and at least 16 rows
    (tl.dot's minimum). Until 2026-12-07 at least 2 tokens: at GQA 16 half of each decode program's rows
    were padding. One token took the three passes from 0.194 to 0.140 ms at 121 rows x 64K tokens of the
    8B shape, with block scores equal bit for bit (H200, bench/results/scoring_probe_h200.json)."""
    g_pad = _next_pow2(group)
    return min(score_tile_tokens(group), max(1, _next_pow2(num_queries), 16 // g_pad))


def score_chunks(num_queries: int, group: int, batch: int, kv_heads: int, num_windows: int, device,
                 packed: bool = False) -> int:
    """How many chunks of compressed keys the query-aware block scores are split into (1: the fused
    single-pass kernel). Split only when the fused kernel's cdiv(Tq, TQ) x B x H programs are fewer than
    SPLIT_PROGRAMS_PER_SM per SM, into as many chunks as bring the split launch to that many programs,
    with no chunk under SPLIT_MIN_WINDOWS keys, and only while its window scores ([B, Tq, H, Nc] float32)
    take at most SPLIT_MAX_SCORE_BYTES. Packed sequences (prefill) never split: their launch is large and
    their keys start at per-tile offsets."""
    target = SPLIT_PROGRAMS_PER_SM * _sm_count(torch.device(device))
    if packed or triton.cdiv(num_queries, score_tile_tokens(group)) * batch * kv_heads >= target:
        return 1
    if 4 * batch * num_queries * kv_heads * num_windows > SPLIT_MAX_SCORE_BYTES:
        return 1
    programs = triton.cdiv(num_queries, split_tile_tokens(group, num_queries)) * batch * kv_heads
    return max(1, min(triton.cdiv(target, programs), num_windows // SPLIT_MIN_WINDOWS))


def _prepare_scores(q, compressed_keys, positions):
    q, ck = _last_dim_contiguous(q), _last_dim_contiguous(compressed_keys.to(q.dtype))
    return q, ck, _positions_arg(positions, q.device)[0]


def query_aware_block_scores(q, compressed_keys, positions, num_blocks, cfg: SparseAttentionConfig, window_offsets=None):
    """Pooled query-aware block scores.

    q: [B, Tq, Hq, D]; compressed_keys: [B, Nc, H, D]; positions: [Tq], or [B, Tq] (each sequence its own;
    not with window_offsets) -> [B, Tq, H, NB] float32 equal to
    `reference.pool_to_blocks(reference.query_aware_chunk_scores(...), positions, NB, cfg)`.
    window_offsets: [Tq] int or None. Packed sequences: query t belongs to the sequence whose compressed keys
    start at index window_offsets[t], positions count from that sequence's start, and every run of
    `score_tile_tokens(G)` queries starting at a multiple of it lies in one sequence.
    The fused kernel (`query_aware_block_scores_fused`) never materialises the window scores; a launch
    of too few programs for the GPU (decode) takes the split path instead, by `score_chunks`.
    """
    _check_scores(q, compressed_keys, positions)
    batch, num_queries, _, head_dim = q.shape
    num_windows, num_kv_heads = compressed_keys.shape[1], compressed_keys.shape[2]
    if num_queries and num_blocks:
        group = q.shape[2] // num_kv_heads
        chunks = score_chunks(num_queries, group, batch, num_kv_heads, num_windows, q.device, window_offsets is not None)
        if chunks > 1:
            return query_aware_block_scores_split(q, compressed_keys, positions, num_blocks, cfg, chunks)
    return query_aware_block_scores_fused(q, compressed_keys, positions, num_blocks, cfg, window_offsets)


def query_aware_block_scores_fused(q, compressed_keys, positions, num_blocks, cfg: SparseAttentionConfig, window_offsets=None):
    """`query_aware_block_scores` by the fused single-pass kernel, whatever the launch size."""
    _check_scores(q, compressed_keys, positions)
    batch, num_queries, _, head_dim = q.shape
    num_windows, num_kv_heads = compressed_keys.shape[1], compressed_keys.shape[2]
    out = torch.empty((batch, num_queries, num_kv_heads, num_blocks), device=q.device, dtype=torch.float32)
    if num_queries == 0 or num_blocks == 0:
        return out
    if window_offsets is not None and positions.dim() != 1:
        raise ValueError("packed sequences (window_offsets) take positions [Tq], not per-sequence positions")
    q, ck, positions = _prepare_scores(q, compressed_keys, positions)
    spb = _positions_arg(positions, q.device)[1]
    group = q.shape[2] // num_kv_heads
    g_pad = _next_pow2(group)
    tq = score_tile_tokens(group)
    block_w, bj = _pool_tiling(cfg, tq)
    rows = tq * g_pad
    if window_offsets is not None:
        window_offsets = window_offsets.to(device=q.device, dtype=torch.int32).contiguous()
    _qa_block_scores_kernel[(triton.cdiv(num_queries, tq), batch * num_kv_heads)](
        q, ck, positions, spb, window_offsets if window_offsets is not None else positions, out, q.stride(0), q.stride(1), q.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
        out.stride(0), out.stride(1), out.stride(2), num_queries, num_windows, num_kv_heads, num_blocks,
        cfg.block_size, cfg.compress_kernel, cfg.compress_stride, LOG2E / math.sqrt(head_dim),
        G=group, G_PAD=g_pad, TQ=tq, D=head_dim, BLOCK_D=max(16, _next_pow2(head_dim)),
        BLOCK_W=block_w, BJ=bj, BJ_PAD=_next_pow2(bj), PRECISION=_dot_precision(q.dtype),
        HAS_OFFSETS=window_offsets is not None, num_warps=4 if rows * block_w <= 4096 else 8,
    )
    return out


@dataclass(frozen=True)
class SplitPlan:
    """The split path's tiling: query tokens per program, compressed keys per step, the key chunks
    [c * chunk_windows, ...) of passes 1 and 2, and the block chunks [c * chunk_blocks, ...) of the pooling."""

    tile_tokens: int
    block_w: int
    chunk_windows: int
    stat_chunks: int
    chunk_blocks: int
    pool_chunks: int


POOL_CHUNK_BLOCKS = 64  # blocks per program of the split path's pooling (pass 3)


SPLIT_BLOCK_W = 64  # compressed keys per step of passes 1 and 2


def split_plan(num_queries, group, num_windows, num_blocks, chunks: int, chunk_windows: int | None = None,
               chunk_blocks: int | None = None, block_w: int | None = None) -> SplitPlan:
    """`chunks` key chunks rounded up to whole BLOCK_W steps; explicit chunk sizes (any positive size:
    tests put chunk edges everywhere) and keys per step (a power of 2 >= 16) override."""
    tq = split_tile_tokens(group, num_queries)
    block_w = block_w or SPLIT_BLOCK_W
    if block_w < 16 or block_w & (block_w - 1):
        raise ValueError(f"keys per step must be a power of 2 >= 16; got {block_w}")
    if chunk_windows is None:
        chunk_windows = triton.cdiv(triton.cdiv(max(num_windows, 1), chunks), block_w) * block_w
    if chunk_blocks is None:
        chunk_blocks = POOL_CHUNK_BLOCKS
    if chunk_windows < 1 or chunk_blocks < 1:
        raise ValueError(f"chunk sizes must be positive; got {chunk_windows} windows, {chunk_blocks} blocks")
    return SplitPlan(tq, block_w, chunk_windows, max(1, triton.cdiv(num_windows, chunk_windows)),
                     chunk_blocks, triton.cdiv(num_blocks, chunk_blocks))


def _split_meta(q, num_kv_heads, plan: SplitPlan):
    group = q.shape[2] // num_kv_heads
    head_dim = q.shape[3]
    rows = plan.tile_tokens * _next_pow2(group)
    return dict(G=group, G_PAD=_next_pow2(group), TQ=plan.tile_tokens, D=head_dim,
                BLOCK_D=max(16, _next_pow2(head_dim)), BLOCK_W=plan.block_w, PRECISION=_dot_precision(q.dtype),
                num_warps=4 if rows * plan.block_w <= 4096 else 8)


def split_chunk_stats(q, ck, positions, cfg: SparseAttentionConfig, plan: SplitPlan):
    """Pass 1 (inputs prepared by `_prepare_scores`): per-chunk (row max, sum of exp2 relative to it) as two
    float32 tensors [tiles, B*H, stat_chunks, ROWS]."""
    batch, num_queries = q.shape[:2]
    num_windows, num_kv_heads = ck.shape[1], ck.shape[2]
    meta = _split_meta(q, num_kv_heads, plan)
    tiles = triton.cdiv(num_queries, plan.tile_tokens)
    shape = (tiles, batch * num_kv_heads, plan.stat_chunks, plan.tile_tokens * meta["G_PAD"])
    stat_m = torch.empty(shape, device=q.device, dtype=torch.float32)
    stat_l = torch.empty(shape, device=q.device, dtype=torch.float32)
    _qa_chunk_stats_kernel[(tiles, batch * num_kv_heads, plan.stat_chunks)](
        q, ck, *_positions_arg(positions, q.device), stat_m, stat_l, q.stride(0), q.stride(1), q.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
        num_queries, num_windows, num_kv_heads, cfg.compress_kernel, cfg.compress_stride, LOG2E / math.sqrt(q.shape[3]),
        plan.chunk_windows, plan.stat_chunks, **meta,
    )
    return stat_m, stat_l


def split_window_scores(q, ck, positions, cfg: SparseAttentionConfig, plan: SplitPlan, stat_m, stat_l):
    """Pass 2: the statistics of all chunks combined, the window scores of every key chunk ->
    [B, Tq, H, Nc] float32, `reference.query_aware_chunk_scores` wherever a window is complete at the
    token (the pooling reads nothing else)."""
    batch, num_queries = q.shape[:2]
    num_windows, num_kv_heads = ck.shape[1], ck.shape[2]
    win = torch.empty((batch, num_queries, num_kv_heads, num_windows), device=q.device, dtype=torch.float32)
    tiles = triton.cdiv(num_queries, plan.tile_tokens)
    _qa_chunk_windows_kernel[(tiles, batch * num_kv_heads, plan.stat_chunks)](
        q, ck, *_positions_arg(positions, q.device), stat_m, stat_l, win, q.stride(0), q.stride(1), q.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
        win.stride(0), win.stride(1), win.stride(2), num_queries, num_windows, num_kv_heads, cfg.compress_kernel,
        cfg.compress_stride, LOG2E / math.sqrt(q.shape[3]), plan.chunk_windows, stat_m.shape[2],
        **_split_meta(q, num_kv_heads, plan),
    )
    return win


def pool_window_scores(win, positions, num_blocks, cfg: SparseAttentionConfig, plan: SplitPlan, out=None):
    """Pass 3: window scores [B, Tq, H, Nc] -> block scores [B, Tq, H, NB] float32 (`reference.pool_to_blocks`),
    into `out` when given (contiguous)."""
    batch, num_queries, num_kv_heads = win.shape[:3]
    if out is None:
        out = torch.empty((batch, num_queries, num_kv_heads, num_blocks), device=win.device, dtype=torch.float32)
    bs, kernel, stride = cfg.block_size, cfg.compress_kernel, cfg.compress_stride
    width = (bs + kernel - 2) // stride + 2  # windows per block, at most (as `reference.block_window_ranges`)
    _pool_window_scores_kernel[(batch * num_queries * num_kv_heads, plan.pool_chunks)](
        win, *_positions_arg(positions, win.device), out, win.stride(0), win.stride(1), win.stride(2), out.stride(0), out.stride(1), out.stride(2),
        num_queries, num_kv_heads, win.shape[3], num_blocks, bs, kernel, stride, width, plan.chunk_blocks,
        BLOCKS=_next_pow2(plan.chunk_blocks), WIDTH_PAD=_next_pow2(width),
    )
    return out


def query_aware_block_scores_split(q, compressed_keys, positions, num_blocks, cfg: SparseAttentionConfig, chunks: int,
                                   chunk_windows: int | None = None, chunk_blocks: int | None = None,
                                   block_w: int | None = None):
    """`query_aware_block_scores` (no packed sequences) by the split path: pass 1, per key chunk, the
    softmax statistics; pass 2, per key chunk, the window scores normalised by the combined statistics;
    pass 3 pools them to blocks. `chunks` key chunks (see `split_plan`).

    Against the reference: the row max is exact whatever the order; the softmax denominator is summed per
    chunk, then across chunks (another order than the fused kernel's or torch's), so window scores differ
    from them by float32 rounding and a near-tie between two windows may break the other way (the tests'
    rule: the same -inf pattern, finite scores within atol 1e-6 / rtol 1e-5, selections equal where the
    reference has no near-tie). Blocks that share their best window tie exactly, as in the reference: the
    pooling takes the max of stored window scores. The window scores are materialised ([B, Tq, H, Nc]
    float32, 1.5 MiB at 64K tokens x batch 48 x 2 KV heads): `score_chunks` splits only small launches."""
    _check_scores(q, compressed_keys, positions)
    batch, num_queries = q.shape[:2]
    num_windows, num_kv_heads = compressed_keys.shape[1], compressed_keys.shape[2]
    shape = (batch, num_queries, num_kv_heads, num_blocks)
    if num_queries == 0 or num_blocks == 0 or num_windows == 0:
        return torch.full(shape, float("-inf"), device=q.device, dtype=torch.float32)
    q, ck, positions = _prepare_scores(q, compressed_keys, positions)
    plan = split_plan(num_queries, q.shape[2] // num_kv_heads, num_windows, num_blocks, chunks, chunk_windows, chunk_blocks,
                      block_w)
    stat_m, stat_l = split_chunk_stats(q, ck, positions, cfg, plan)
    win = split_window_scores(q, ck, positions, cfg, plan, stat_m, stat_l)
    return pool_window_scores(win, positions, num_blocks, cfg, plan)


# ----------------------------------------------------------------------------------------------------------
# Selection composition
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _take_best(key, selected, blocks, count, NB_PAD: tl.constexpr):
    """Move the `count` largest keys (ties: lower block) into `selected`; -inf marks non-candidates."""
    for _ in range(count):
        best = tl.max(key, 0)
        pick = tl.min(tl.where(key == best, blocks, NB_PAD), 0)
        hit = blocks == pick
        selected = selected | hit
        key = tl.where(hit, float("-inf"), key)
    return selected


@triton.jit
def _take_best_threshold(key, selected, blocks, count):
    """Same result as `_take_best` in 32 counting rounds instead of 2 x `count` arg-max rounds: find the
    count-th largest key by building it bit by bit in an order-preserving integer encoding, take every key
    above it and the lowest-index keys equal to it."""
    key = tl.where(key == 0.0, 0.0, key)  # -0.0 and +0.0 compare equal as floats: give them one encoding
    bits = key.to(tl.int32, bitcast=True)
    # Signed-int order equal to float order (no NaN here): negative floats have their magnitude bits flipped.
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648  # 0 .. 2^32 - 1
    threshold = tl.zeros([], tl.int64)
    for bit in tl.static_range(31, -1, -1):
        trial = threshold | (1 << bit)
        if tl.sum((ordered >= trial).to(tl.int32), 0) >= count:
            threshold = trial
    above = ordered > threshold
    ties = ordered == threshold
    room = count - tl.sum(above.to(tl.int32), 0)
    take = above | (ties & (tl.cumsum(ties.to(tl.int32), 0) <= room))
    # (A block-shaped comparison: a scalar bool broadcast into a mask trips the interpreter.)
    return selected | (take & (blocks * 0 + count > 0))


# Not specialised: lengths and the strides that follow them (see the note on attention._fwd_kernel).
@triton.jit(do_not_specialize=["sqab", "sqat", "sqah", "sagb", "sagt", "sagh", "spb", "sph", "spn", "sob", "NB", "Nc",
                               "sposb"])
def _select_kernel(
    QA, AG, Prefix, First, Last, Pos, sposb, BlockOff, Out,
    sqab, sqat, sqah, sagb, sagt, sagh, spb, sph, spn, sob, sot, soh,
    H, NB, Nc, block_size, kernel, stride, sink, window, quota, topk,
    AG_MODE: tl.constexpr, NB_PAD: tl.constexpr, K_PAD: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    THRESHOLD: tl.constexpr,
):
    # HAS_OFFSETS (packed sequences): positions count from each sequence's start and the prefix table's
    # rows of query t's sequence start at BlockOff[t]; everything else is in the sequence's own blocks.
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    pos = tl.load(Pos + b * sposb + t)
    own = (pos // block_size).to(tl.int32)
    blocks = tl.arange(0, NB_PAD)
    exists = blocks < NB
    visible = exists & (blocks <= own)
    forced = visible & ((blocks < sink) | (blocks >= own - window))
    candidate = visible & (forced == 0)
    qa = tl.load(QA + b * sqab + t * sqat + h * sqah + blocks, mask=exists, other=float("-inf"))
    key = tl.where(candidate, tl.maximum(qa, -3.4028234663852886e38), float("-inf"))
    n_pick = tl.minimum(quota, tl.sum(candidate.to(tl.int32), 0))
    if THRESHOLD:
        selected = _take_best_threshold(key, forced, blocks, n_pick)
    else:
        selected = _take_best(key, forced, blocks, n_pick, NB_PAD)
    remaining = candidate & (selected == 0)
    free = topk - tl.sum(forced.to(tl.int32), 0) - n_pick
    n_fill = tl.minimum(free, tl.sum(remaining.to(tl.int32), 0))
    if AG_MODE == 0:
        # No eviction head: every agnostic score ties, so the lowest remaining blocks fill the slots.
        selected = selected | (remaining & (tl.cumsum(remaining.to(tl.int32), 0) <= n_fill))
    else:
        if AG_MODE == 1:
            ag = tl.load(AG + b * sagb + t * sagt + h * sagh + blocks, mask=exists, other=float("-inf"))
        else:
            nc = tl.where(pos + 1 >= kernel, (pos + 1 - kernel) // stride + 1, 0)
            nc = tl.minimum(nc, Nc).to(tl.int32)
            first = tl.load(First + blocks, mask=exists, other=0)
            last = tl.minimum(tl.load(Last + blocks, mask=exists, other=0), nc - 1)
            usable = exists & (last >= first)
            prefix_rows = blocks
            if HAS_OFFSETS:
                prefix_rows = blocks + tl.load(BlockOff + t)
            ag = tl.load(Prefix + b * spb + h * sph + prefix_rows * spn + (last - first), mask=usable, other=float("-inf"))
        key = tl.where(remaining, tl.maximum(ag, -3.4028234663852886e38), float("-inf"))
        if THRESHOLD:
            selected = _take_best_threshold(key, selected, blocks, n_fill)
        else:
            selected = _take_best(key, selected, blocks, n_fill, NB_PAD)
    sel = selected.to(tl.int32)
    rank = tl.cumsum(sel, 0) - 1
    out_base = Out + b * sob + t * sot + h * soh
    tl.store(out_base + rank, blocks, mask=selected)
    slots = tl.arange(0, K_PAD)
    tl.store(out_base + slots, tl.full([K_PAD], -1, tl.int32), mask=(slots >= tl.sum(sel, 0)) & (slots < topk))


def _launch_select(qa, ag_mode, ag, prefix, first, last, num_windows, positions, cfg, block_offsets=None):
    batch, num_queries, num_kv_heads, num_blocks = qa.shape
    if block_offsets is not None and positions.dim() != 1:
        raise ValueError("packed sequences (block_offsets) take positions [Tq], not per-sequence positions")
    out = torch.empty((batch, num_queries, num_kv_heads, cfg.topk_blocks), device=qa.device, dtype=torch.int32)
    if num_queries == 0:
        return out
    if qa.stride(-1) != 1:
        qa = qa.contiguous()
    ag_strides = (0, 0, 0)
    if ag_mode == 1:
        ag = ag.expand(batch, num_queries, num_kv_heads, num_blocks)
        if ag.stride(-1) != 1:
            ag = ag.contiguous()
        ag_strides = ag.stride()[:3]
    prefix_strides = prefix.stride()[:3] if ag_mode == 2 else (0, 0, 0)
    dummy = qa
    positions, sposb = _positions_arg(positions, qa.device)
    if block_offsets is not None:
        block_offsets = block_offsets.to(device=qa.device, dtype=torch.int32).contiguous()
    _select_kernel[(num_queries, batch * num_kv_heads)](
        qa, ag if ag_mode == 1 else dummy, prefix if ag_mode == 2 else dummy,
        first if ag_mode == 2 else positions, last if ag_mode == 2 else positions, positions, sposb,
        block_offsets if block_offsets is not None else positions, out,
        qa.stride(0), qa.stride(1), qa.stride(2), *ag_strides, *prefix_strides,
        out.stride(0), out.stride(1), out.stride(2),
        num_kv_heads, num_blocks, num_windows, cfg.block_size, cfg.compress_kernel, cfg.compress_stride,
        cfg.sink_blocks, cfg.window_blocks, cfg.query_aware_quota, cfg.topk_blocks,
        AG_MODE=ag_mode, NB_PAD=max(16, _next_pow2(num_blocks)), K_PAD=max(16, _next_pow2(cfg.topk_blocks)),
        HAS_OFFSETS=block_offsets is not None, THRESHOLD=SELECT_BY_THRESHOLD,
        num_warps=4 if num_blocks <= 1024 else 8,
    )
    return out


def select_blocks(query_block_scores, agnostic_block_scores, positions, cfg: SparseAttentionConfig):
    """query_block_scores: [B, Tq, H, NB]; agnostic_block_scores: [B, Tq|1, H, NB] or None; positions: [Tq] or
    [B, Tq] -> [B, Tq, H, K] int32 ascending, -1 unused (same rule as the reference)."""
    if query_block_scores.dim() != 4:
        raise ValueError(f"query_block_scores must be [B, Tq, H, NB]; got {tuple(query_block_scores.shape)}")
    _check_positions(positions, query_block_scores.shape[0], query_block_scores.shape[1])
    qa = query_block_scores.float()
    if agnostic_block_scores is None:
        return _launch_select(qa, 0, None, None, None, None, 0, positions, cfg)
    return _launch_select(qa, 1, agnostic_block_scores.float(), None, None, None, 0, positions, cfg)


def agnostic_prefix_table(agnostic_scores: torch.Tensor, num_blocks: int, cfg: SparseAttentionConfig):
    """Prefix maxima of the window scores overlapping each block.

    agnostic_scores: [B, Nc, H] float32 -> (prefix [B, H, NB, W] float32, first [NB] int32, last [NB] int32):
    the agnostic block score at a position with nc complete windows is prefix[..., min(last, nc-1) - first]
    (-inf when that is < first). A few kB per layer, so plain PyTorch.
    """
    batch, num_windows, num_kv_heads = agnostic_scores.shape
    index, valid = reference.block_window_ranges(num_blocks, cfg, agnostic_scores.device)
    first = index[:, 0].to(torch.int32).contiguous()
    last = (index[:, 0] + valid.sum(1) - 1).to(torch.int32).contiguous()
    if num_windows == 0:
        prefix = torch.full((batch, num_kv_heads, num_blocks, index.shape[1]), float("-inf"), device=agnostic_scores.device)
        return prefix, first, last
    values = agnostic_scores.float()[:, index.clamp(max=num_windows - 1)]  # [B, NB, W, H]
    usable = valid & (index < num_windows)
    values = values.masked_fill(~usable[None, :, :, None], float("-inf"))
    prefix = values.cummax(dim=2).values.permute(0, 3, 1, 2).contiguous()
    return prefix, first, last


@torch.no_grad()
def select_for_queries(q, compressed_keys, agnostic_scores, positions, num_blocks, cfg: SparseAttentionConfig):
    """q: [B, Tq, Hq, D]; compressed_keys: [B, Nc, H, D]; agnostic_scores: [B, Nc, H] or None; positions:
    [Tq] or [B, Tq]; num_blocks: NB -> block indices [B, Tq, H, K] int32 (the reference's `select_for_queries`)."""
    qa = query_aware_block_scores(q, compressed_keys, positions, num_blocks, cfg)
    if agnostic_scores is None:
        return _launch_select(qa, 0, None, None, None, None, 0, positions, cfg)
    prefix, first, last = agnostic_prefix_table(agnostic_scores, num_blocks, cfg)
    return _launch_select(qa, 2, None, prefix, first, last, agnostic_scores.shape[1], positions, cfg)


def agnostic_prefix_table_packed(agnostic_scores, seq_block_offsets, seq_window_offsets, seq_lengths, num_blocks,
                                 cfg: SparseAttentionConfig):
    """`agnostic_prefix_table` for packed sequences, each in its own block coordinates.

    agnostic_scores: [1, Nc, H] float32 over the packed (block-aligned) tokens; per sequence s (int64 [S]):
    its first block, first compressed key and length; num_blocks: blocks of the longest sequence ->
    (prefix [1, H, total blocks, W], first [num_blocks], last [num_blocks]); sequence s's local block j is
    row seq_block_offsets[s] + j, built from its own windows only (as if the sequence were alone).
    """
    _, num_windows, num_kv_heads = agnostic_scores.shape
    device = agnostic_scores.device
    index, valid = reference.block_window_ranges(num_blocks, cfg, device)
    first = index[:, 0].to(torch.int32).contiguous()
    last = (index[:, 0] + valid.sum(1) - 1).to(torch.int32).contiguous()
    seq_blocks = -(-seq_lengths // cfg.block_size)
    total_blocks = int((seq_block_offsets + seq_blocks).max()) if seq_lengths.numel() else 0
    width = index.shape[1]
    prefix = torch.full((1, num_kv_heads, total_blocks, width), float("-inf"), device=device)
    if num_windows == 0 or total_blocks == 0:
        return prefix, first, last
    # Every (sequence, local block) row: its global row, its windows (global indices) and which exist.
    seq = torch.repeat_interleave(torch.arange(seq_lengths.numel(), device=device), seq_blocks)
    local = torch.arange(seq.numel(), device=device) - torch.repeat_interleave(torch.cumsum(seq_blocks, 0) - seq_blocks, seq_blocks)
    own_windows = reference.num_complete_windows(seq_lengths, cfg.compress_kernel, cfg.compress_stride)[seq]
    usable = valid[local] & (index[local] < own_windows[:, None])
    windows = (seq_window_offsets[seq][:, None] + index[local]).clamp(max=num_windows - 1)
    values = agnostic_scores[0].float()[windows]  # [rows, W, H]
    values = values.masked_fill(~usable[:, :, None], float("-inf")).cummax(dim=1).values
    prefix[0, :, seq_block_offsets[seq] + local] = values.permute(2, 0, 1)
    return prefix, first, last
