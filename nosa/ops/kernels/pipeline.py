"""The whole NOSA attention of a layer on Triton kernels: selection (no gradient), then sparse attention.

Same contract as `nosa.ops.reference.nosa_attention`. The selection scratch (pooled block scores,
[B, chunk, H, NB] float32) is bounded by `max_chunk_elements`; the attention itself needs no query chunking
because it never materialises scores (memory O(T x K) for the indices).
"""

from __future__ import annotations

import math

import torch

from nosa.config import SparseAttentionConfig
from nosa.ops import reference
from nosa.ops.kernels.attention import sparse_attention
from nosa.ops.kernels.selection import (
    _launch_select, agnostic_chunk_scores, agnostic_prefix_table, agnostic_prefix_table_packed, compress_keys,
    query_aware_block_scores, score_tile_tokens,
)


@torch.no_grad()
def select_all(q, k, eviction, positions, cfg: SparseAttentionConfig, max_chunk_elements: int = reference.DEFAULT_CHUNK_ELEMENTS):
    """Selected blocks of every query: q [B, Tq, Hq, D]; k [B, Tk, H, D]; eviction [B, Tk, H] or None;
    positions [Tq] -> [B, Tq, H, K] int32."""
    batch, num_queries = q.shape[:2]
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    num_blocks = -(-num_keys // cfg.block_size)
    compressed = compress_keys(k.detach(), cfg.compress_kernel, cfg.compress_stride)
    prefix = first = last = None
    num_windows = compressed.shape[1]
    if cfg.uses_eviction_head:
        agnostic = agnostic_chunk_scores(eviction.detach(), cfg.compress_kernel, cfg.compress_stride)
        prefix, first, last = agnostic_prefix_table(agnostic, num_blocks, cfg)
    indices = torch.empty((batch, num_queries, num_kv_heads, cfg.topk_blocks), device=q.device, dtype=torch.int32)
    chunk = max(1, min(num_queries, max_chunk_elements // max(1, batch * num_kv_heads * num_blocks)))
    for start in range(0, num_queries, chunk):
        pos = positions[start : start + chunk]
        qa = query_aware_block_scores(q[:, start : start + chunk].detach(), compressed, pos, num_blocks, cfg)
        mode = 2 if prefix is not None else 0
        indices[:, start : start + chunk] = _launch_select(qa, mode, None, prefix, first, last, num_windows, pos, cfg)
    return indices


def nosa_attention(q, k, v, eviction, cfg: SparseAttentionConfig, max_chunk_elements: int = reference.DEFAULT_CHUNK_ELEMENTS,
                   return_indices: bool = False, tile_tokens: int | None = None, deterministic: bool | None = None):
    """q: [B, Tq, Hq, D]; k, v: [B, Tk, H, D]; eviction: [B, Tk, H] (dma, nosa) or None -> [B, Tq, Hq, D]
    (and the selected blocks [B, Tq, H, K] int32 with return_indices; None in dense mode).
    Differentiable in q, k, v and eviction (through the attention bias only). `tile_tokens`: queries per
    attention program (default by GQA group, see `attention.default_tile_tokens`). `deterministic`:
    fixed-order, bit-reproducible gradients (True or None, the default; False: atomics, see
    `attention.sparse_attention`)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    num_queries, num_keys = q.shape[1], k.shape[1]
    if num_queries > num_keys:
        raise ValueError(f"more queries ({num_queries}) than keys ({num_keys}): queries are the last tokens")
    positions = torch.arange(num_keys - num_queries, num_keys, device=q.device)
    if not cfg.is_sparse:
        # Dense mode is plain causal attention: torch's fused SDPA kernels are the fast path there.
        out = reference.causal_attention(q, k, v, positions)
        return (out, None) if return_indices else out
    if cfg.uses_eviction_head and eviction is None:
        raise ValueError(f"attn_mode={cfg.attn_mode!r} needs the eviction scores [B, Tk, H]; got None")
    if eviction is not None and eviction.shape != (k.shape[0], num_keys, k.shape[2]):
        raise ValueError(f"eviction must be [B, Tk, H] = [{k.shape[0]}, {num_keys}, {k.shape[2]}]; got {tuple(eviction.shape)}")
    indices = select_all(q, k, eviction if cfg.uses_eviction_head else None, positions, cfg, max_chunk_elements)
    bias = eviction if cfg.uses_eviction_head else None
    out = sparse_attention(q, k, v, bias, indices, positions, cfg.block_size, tile_tokens=tile_tokens,
                           deterministic=deterministic)
    return (out, indices) if return_indices else out


def _packed_layout(cu_seqlens, total: int, align: int, device):
    """Where each packed token goes when every sequence starts at a multiple of `align` tokens.

    -> (lengths [S], starts [S] (padded layout), destination [N] of each input token, local position [P]
    of each padded token (-1 for padding), sequence [P] of each padded token, padded length P). All int64
    on `device`."""
    cu = torch.as_tensor(cu_seqlens).to(device=device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    padded = -(-lengths // align) * align
    starts = torch.cumsum(padded, 0) - padded
    padded_total = int(padded.sum()) if padded.numel() else 0
    seq_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=total)
    local = torch.arange(total, device=device) - cu[:-1][seq_of_token]
    destination = starts[seq_of_token] + local
    local_positions = torch.full((padded_total,), -1, device=device, dtype=torch.int64)
    local_positions[destination] = local
    seq_of_padded = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), padded, output_size=padded_total)
    return lengths, starts, destination, local_positions, seq_of_padded, padded_total


def _pad_to(x, destination, padded_total):
    """x [1, N, ...] -> [1, P, ...] with x's tokens at `destination` and zeros elsewhere (differentiable)."""
    out = x.new_zeros((1, padded_total) + tuple(x.shape[2:]))
    return out.index_copy(1, destination, x)


@torch.no_grad()
def select_packed(q, k, eviction, local_positions, seq_of_padded, starts, lengths, cfg: SparseAttentionConfig,
                  align: int, max_chunk_elements: int = reference.DEFAULT_CHUNK_ELEMENTS):
    """Selected blocks, in each sequence's own block numbering, of packed block-aligned sequences.

    q [1, P, Hq, D], k [1, P, H, D], eviction [1, P, H] or None in the padded layout of `_packed_layout`
    -> [1, P, H, K] int32 (-1 rows for padding tokens). One launch set for all sequences: the window means
    run over the whole padded buffer (a window a sequence uses never leaves it), and the score and
    composition kernels read each query's sequence through per-token offsets."""
    num_kv_heads = k.shape[2]
    padded_total = q.shape[1]
    max_len = int(lengths.max()) if lengths.numel() else 0
    num_blocks = -(-max_len // cfg.block_size)
    compressed = compress_keys(k.detach(), cfg.compress_kernel, cfg.compress_stride)
    num_windows = compressed.shape[1]
    window_offsets = (starts // cfg.compress_stride)[seq_of_padded].to(torch.int32)
    block_offsets = (starts // cfg.block_size)[seq_of_padded].to(torch.int32)
    prefix = first = last = None
    if cfg.uses_eviction_head:
        agnostic = agnostic_chunk_scores(eviction.detach(), cfg.compress_kernel, cfg.compress_stride)
        prefix, first, last = agnostic_prefix_table_packed(
            agnostic, starts // cfg.block_size, starts // cfg.compress_stride, lengths, num_blocks, cfg)
    indices = torch.empty((1, padded_total, num_kv_heads, cfg.topk_blocks), device=q.device, dtype=torch.int32)
    # Chunks start at multiples of `align`, so no score program straddles two sequences.
    chunk = max(align, (max_chunk_elements // max(1, num_kv_heads * num_blocks)) // align * align)
    for start in range(0, padded_total, chunk):
        sl = slice(start, start + chunk)
        pos = local_positions[sl]
        qa = query_aware_block_scores(q[:, sl].detach(), compressed, pos, num_blocks, cfg, window_offsets=window_offsets[sl])
        mode = 2 if prefix is not None else 0
        indices[:, sl] = _launch_select(qa, mode, None, prefix, first, last, num_windows, pos, cfg,
                                        block_offsets=block_offsets[sl])
    indices.masked_fill_((local_positions < 0).view(1, -1, 1, 1), -1)
    return indices


def packing_alignment(cfg: SparseAttentionConfig, group: int) -> int:
    """Tokens every packed sequence is aligned to: whole blocks, whole window strides, whole score tiles."""
    return math.lcm(cfg.block_size, cfg.compress_stride, score_tile_tokens(group))


def nosa_attention_varlen(q, k, v, eviction, cu_seqlens, cfg: SparseAttentionConfig,
                          max_chunk_elements: int = reference.DEFAULT_CHUNK_ELEMENTS, return_indices: bool = False,
                          tile_tokens: int | None = None, deterministic: bool | None = None):
    """NOSA attention over packed sequences of different lengths (every token of each sequence is a query).

    q: [1, N, Hq, D]; k, v: [1, N, H, D]; eviction: [1, N, H] or None; cu_seqlens: [S + 1] int (0, ...,
    N), sequence s = tokens cu_seqlens[s]:cu_seqlens[s+1] -> [1, N, Hq, D] (and, with return_indices, a
    list of per-sequence block indices [1, T_s, H, K]). Blocks, windows and positions count from each
    sequence's start, so the result equals running each sequence alone.

    One launch set for the whole pack: the sequences are laid out with each start rounded up to
    `packing_alignment` tokens (at most that many - 1 padding tokens per sequence, zeros that no query
    attends to), selection runs with per-token sequence offsets, and the attention runs on the padded
    layout with block indices shifted to it (causality then never crosses a sequence boundary, because a
    query only selects blocks of its own sequence and padding keys come after its last real token).
    """
    if q.dim() != 4 or q.shape[0] != 1 or k.shape[:2] != q.shape[:2] or v.shape != k.shape:
        raise ValueError(f"packed inputs must be q [1, N, Hq, D] and k, v [1, N, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bounds = [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[1] or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must rise from 0 to N={q.shape[1]}; got {bounds}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if cfg.uses_eviction_head and (eviction is None or eviction.shape != k.shape[:3]):
        raise ValueError(f"attn_mode={cfg.attn_mode!r} needs eviction [1, N, H] = {tuple(k.shape[:3])}; got "
                         f"{None if eviction is None else tuple(eviction.shape)}")
    if not cfg.is_sparse:
        outputs = [reference.causal_attention(q[:, a:b], k[:, a:b], v[:, a:b], torch.arange(b - a, device=q.device))
                   for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        out = torch.cat(outputs, dim=1) if outputs else q.new_zeros(q.shape)
        return (out, [None] * len(outputs)) if return_indices else out
    total = q.shape[1]
    if total == 0:
        out = q * 0
        return (out, []) if return_indices else out
    align = packing_alignment(cfg, q.shape[2] // k.shape[2])
    lengths, starts, destination, local_positions, seq_of_padded, padded_total = _packed_layout(bounds, total, align, q.device)
    qp, kp_, vp = (_pad_to(x, destination, padded_total) for x in (q, k, v))
    bias = _pad_to(eviction, destination, padded_total) if cfg.uses_eviction_head else None
    indices = select_packed(qp, kp_, bias, local_positions, seq_of_padded, starts, lengths, cfg, align, max_chunk_elements)
    # Attention in the padded layout: local block j of the sequence starting at starts[s] is block
    # starts[s] / block_size + j there.
    offsets = (starts // cfg.block_size)[seq_of_padded].to(torch.int32)
    shifted = torch.where(indices >= 0, indices + offsets.view(1, -1, 1, 1), -1)
    positions = torch.arange(padded_total, device=q.device)
    out = sparse_attention(qp, kp_, vp, bias, shifted, positions, cfg.block_size, tile_tokens=tile_tokens,
                           deterministic=deterministic).index_select(1, destination)
    if not return_indices:
        return out
    selections = [indices[:, int(st):int(st) + int(n)] for st, n in zip(starts.tolist(), lengths.tolist()) if n > 0]
    return out, selections
