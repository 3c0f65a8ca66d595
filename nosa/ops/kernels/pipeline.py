"""The whole NOSA attention of a layer on Triton kernels: selection (no gradient), then sparse attention.

Same contract as `nosa.ops.reference.nosa_attention`. The selection scratch (pooled block scores,
[B, chunk, H, NB] float32) is bounded by `max_chunk_elements`; the attention itself needs no query chunking
because it never materialises scores (memory O(T x K) for the indices).
"""

from __future__ import annotations

import torch

from nosa.config import SparseAttentionConfig
from nosa.ops import reference
from nosa.ops.kernels.attention import sparse_attention
from nosa.ops.kernels.selection import (
    _launch_select, agnostic_chunk_scores, agnostic_prefix_table, compress_keys, query_aware_block_scores,
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
    bit-reproducible gradients (see `attention.sparse_attention`; None follows torch's deterministic mode)."""
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


def nosa_attention_varlen(q, k, v, eviction, cu_seqlens, cfg: SparseAttentionConfig,
                          max_chunk_elements: int = reference.DEFAULT_CHUNK_ELEMENTS, return_indices: bool = False):
    """NOSA attention over packed sequences of different lengths (every token of each sequence is a query).

    q: [1, N, Hq, D]; k, v: [1, N, H, D]; eviction: [1, N, H] or None; cu_seqlens: [S + 1] int (0, ...,
    N), sequence s = tokens cu_seqlens[s]:cu_seqlens[s+1] -> [1, N, Hq, D] (and, with return_indices, a
    list of per-sequence block indices [1, T_s, H, K]). Blocks, windows and positions count from each
    sequence's start, so the result equals running each sequence alone; the kernels are launched once
    per sequence (block indices are relative to a sequence, so tiles never mix sequences).
    """
    if q.dim() != 4 or q.shape[0] != 1 or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"packed inputs must be q [1, N, Hq, D] and k, v [1, N, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    bounds = [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[1] or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must rise from 0 to N={q.shape[1]}; got {bounds}")
    outputs, selections = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        ev = None if eviction is None else eviction[:, start:end]
        result = nosa_attention(q[:, start:end], k[:, start:end], v[:, start:end], ev, cfg,
                                max_chunk_elements=max_chunk_elements, return_indices=return_indices)
        if return_indices:
            result, indices = result
            selections.append(indices)
        outputs.append(result)
    out = torch.cat(outputs, dim=1) if outputs else q.new_zeros(q.shape)
    return (out, selections) if return_indices else out
