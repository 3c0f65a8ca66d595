"""The readable PyTorch definition of every NOSA op (spec sec. 4). Kernels are tested against these.

Layout conventions (design.md): sequence before heads, `[B, T, H, D]`. Within one call every sequence of
the batch has the same length; the queries are the last `Tq` tokens of a sequence of `Tk` tokens and
carry logical positions `positions` (`[Tq]`, int64). Variable lengths are handled one level up (the
attention layer and the engine), so the rules here read as the spec does. The selection ops (chunk
scores, pooling, `select_blocks`) also take `[B, Tq]` positions, each sequence its own: the engine's
decode step, whose rows are sequences at different lengths, selects them all in one call that way.

Shapes used below: B batch, Tq queries, Tk keys, Hq query heads, H (= Hkv) KV heads, G = Hq // H the
GQA group, D head dim, Nc complete compressed windows, NB key blocks, K = topk_blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nosa.config import SparseAttentionConfig
from nosa.ops.block_ops import gather_blocks
from nosa.ops.util import ceil_div

# Chunking budget: score tensors of one query chunk hold at most this many float32 elements, so memory
# grows as O(T) per chunk instead of O(T^2) at long context.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs; float64 stays float64 (finite-difference checks need it)."""
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Compression (spec 4.1 and 4.3)
# ----------------------------------------------------------------------------------------------------------
def window_mean(x: torch.Tensor, kernel: int, stride: int, by_value: bool = False) -> torch.Tensor:
    """Mean of x over the complete windows [stride*i, stride*i + kernel) along dim 1.

    x: [B, T, ...] -> [B, Nc, ...] with Nc = (T - kernel) // stride + 1 (0 when T < kernel).
    Computed in float32, returned in x's dtype. Used for compressed keys (x = k, [B, T, H, D]) and for the
    query-agnostic chunk scores (x = eviction scores c, [B, T, H]). by_value: sum each window's values in
    ascending order instead of token order, so the mean is a function of the window's values alone.
    """
    num_windows = num_complete_windows(x.shape[1], kernel, stride)
    if num_windows == 0:
        return x.new_zeros((x.shape[0], 0) + tuple(x.shape[2:]))
    windows = x[:, : (num_windows - 1) * stride + kernel].to(compute_dtype(x)).unfold(1, kernel, stride)
    if by_value:
        windows = windows.sort(dim=-1).values
    # Summed one add at a time in a fixed order, rather than by a reduction whose order depends on the
    # tensor's layout: a window compressed alone (the engine, at decode) and the same window compressed
    # with all others (the full forward) then round identically, so score ties break identically.
    total = windows[..., 0].clone()
    for offset in range(1, kernel):
        total += windows[..., offset]
    return (total / kernel).to(x.dtype)


def eviction_scores(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The eviction head (spec sec. 3): v [B, T, H, D], weight [H, H * D], bias [H], A [H] ->
    c = A * softplus(v_flat @ weight.T + bias) [B, T, H] in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    flat = v.reshape(v.shape[0], v.shape[1], -1).to(dtype)
    weight, bias = weight.to(dtype), bias.to(dtype)
    # A product and a row sum per KV head, not F.linear: a matmul rounds a row differently with the number
    # of rows (and with the row's place among them), so equal value vectors (a repeated token in layer 0)
    # got scores an ulp apart and the tie between their blocks, which the lower index must decide (spec
    # sec. 4.5), broke by rounding, differently in a full forward than in the engine's one-token steps.
    # A row sum gives every row the same additions in the same order, whatever the batch.
    raw = torch.stack([(flat * weight[h]).sum(-1) for h in range(weight.shape[0])], dim=-1) + bias
    return A.to(dtype) * F.softplus(raw)


def compress_keys(k: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Compressed keys ck[i] = mean of k over window i. k: [B, T, H, D] (post-RoPE) -> [B, Nc, H, D]."""
    return window_mean(k, kernel, stride)


def agnostic_chunk_scores(eviction: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """E[i, h] = mean of the eviction score c over window i. eviction: [B, T, H] -> [B, Nc, H] float32.

    Summed by value (ascending), not in token order. c has no RoPE (spec sec. 3): a token's c depends on its
    value vector only, so in layer 0 equal tokens have equal c and two windows holding the same tokens in
    another order tie exactly, a tie the lower block index must decide (spec sec. 4.5). A token-order sum
    rounds such windows apart by an ulp, in a direction that depends on c's last bit, and c's last bit
    differs between a batched and a one-token matmul: the engine and the full forward then broke the same
    tie differently (tests/test_properties.py, seed 188). A sorted sum keeps equal windows equal.
    """
    return window_mean(eviction.float(), kernel, stride, by_value=True)


def batched_positions(positions: torch.Tensor, batch: int) -> torch.Tensor:
    """positions [Tq] (every sequence's) or [B, Tq] (each sequence its own) -> a [1, Tq] or [B, Tq] view
    that broadcasts against the batch."""
    if positions.dim() == 1:
        return positions[None]
    if positions.dim() == 2 and positions.shape[0] == batch:
        return positions
    raise ValueError(f"positions must be [Tq] or [B, Tq] with B = {batch}; got {tuple(positions.shape)}")


def num_complete_windows(length, kernel: int, stride: int):
    """How many windows lie entirely inside the first `length` tokens (int, or an int64 tensor)."""
    if isinstance(length, torch.Tensor):
        return torch.where(length >= kernel, torch.div(length - kernel, stride, rounding_mode="floor") + 1, 0)
    return (length - kernel) // stride + 1 if length >= kernel else 0


# ----------------------------------------------------------------------------------------------------------
# Chunk scores (spec 4.2) and pooling to blocks (spec 4.4)
# ----------------------------------------------------------------------------------------------------------
def query_aware_chunk_scores(
    q: torch.Tensor, compressed_keys: torch.Tensor, positions: torch.Tensor, kernel: int, stride: int
) -> torch.Tensor:
    """Query-aware score of every compressed window, summed over the GQA group.

    q: [B, Tq, Hq, D]; compressed_keys: [B, Nc, H, D]; positions: [Tq] or [B, Tq] -> [B, Tq, H, Nc] float32
    (float64 for float64 inputs).
    For each query head, a softmax of q.ck/sqrt(D) over the windows complete at the query's position
    (window i is complete at t when stride*i + kernel - 1 <= t); windows not yet complete score 0.
    """
    batch, num_queries, num_q_heads, head_dim = q.shape
    num_kv_heads = compressed_keys.shape[2]
    group = num_q_heads // num_kv_heads
    num_windows = compressed_keys.shape[1]
    # float32 for half inputs, float64 kept: float64 tests compare a one-token step with a full forward,
    # whose products round differently by shape; in float32 that flips near-tied block scores.
    dtype = compute_dtype(q)
    qg = q.to(dtype).view(batch, num_queries, num_kv_heads, group, head_dim)
    logits = torch.einsum("bthgd,bnhd->bthgn", qg, compressed_keys.to(dtype)) / math.sqrt(head_dim)
    complete = torch.arange(num_windows, device=q.device) < num_complete_windows(
        batched_positions(positions, batch) + 1, kernel, stride
    )[..., None]  # [1|B, Tq, Nc]
    logits = logits.masked_fill(~complete[:, :, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)  # a query with no complete window: all 0
    return probs.sum(dim=3)


def block_window_ranges(num_blocks: int, cfg: SparseAttentionConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows overlapping each block: (window index [NB, W], valid [NB, W]).

    Window i covers [stride*i, stride*i + kernel); block j covers [bs*j, bs*(j+1)). They overlap when
    stride*i < bs*(j+1) and stride*i + kernel > bs*j (for 64/32/16: windows 4j-1 .. 4j+3, clipped at 0).
    """
    bs, kernel, stride = cfg.block_size, cfg.compress_kernel, cfg.compress_stride
    blocks = torch.arange(num_blocks, device=device)
    first = torch.clamp(torch.div(bs * blocks - kernel, stride, rounding_mode="floor") + 1, min=0)
    last = torch.div(bs * (blocks + 1) - 1, stride, rounding_mode="floor")
    width = (bs + kernel - 2) // stride + 2  # an upper bound on last - first + 1
    index = first[:, None] + torch.arange(width, device=device)[None, :]
    return index, index <= last[:, None]


def pool_to_blocks(
    chunk_scores: torch.Tensor, positions: torch.Tensor, num_blocks: int, cfg: SparseAttentionConfig
) -> torch.Tensor:
    """Block score = max over the windows overlapping the block that are complete at the query's position.

    chunk_scores: [B, Tq, H, Nc] (per query) or [B, 1, H, Nc] (query-agnostic, shared by every query);
    positions: [Tq] or [B, Tq] -> [B, Tq, H, NB] float32 (float64 for float64 scores), -inf for a block with no complete
    window.
    """
    index, valid = block_window_ranges(num_blocks, cfg, chunk_scores.device)
    num_windows = chunk_scores.shape[-1]
    positions = batched_positions(positions, chunk_scores.shape[0])  # [1|B, Tq]
    complete_count = num_complete_windows(positions + 1, cfg.compress_kernel, cfg.compress_stride)
    usable = valid & (index < complete_count[..., None, None]) & (index < num_windows)  # [1|B, Tq, NB, W]
    if num_windows == 0:
        shape = (chunk_scores.shape[0], positions.shape[1], chunk_scores.shape[2], num_blocks)
        return torch.full(shape, float("-inf"), dtype=compute_dtype(chunk_scores), device=chunk_scores.device)
    gathered = chunk_scores.to(compute_dtype(chunk_scores))[..., index.clamp(max=num_windows - 1)]  # [B, Tq|1, H, NB, W]
    gathered = gathered.masked_fill(~usable[:, :, None], float("-inf"))
    return gathered.amax(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Selection (spec 4.5): the one definition training, prefill and decode all use
# ----------------------------------------------------------------------------------------------------------
def _best_candidates(scores: torch.Tensor, candidate: torch.Tensor, count) -> torch.Tensor:
    """Mask of the `count` best candidates by score; ties (and -inf scores) go to the lower block index."""
    dtype = compute_dtype(scores)
    lowest = torch.finfo(dtype).min
    key = torch.where(candidate, scores.to(dtype).clamp(min=lowest), torch.full_like(scores, float("-inf"), dtype=dtype))
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    if isinstance(count, torch.Tensor):
        count = count.unsqueeze(-1)
    return candidate & (rank < count)


def forced_blocks(blocks: torch.Tensor, own_block: torch.Tensor, cfg: SparseAttentionConfig) -> torch.Tensor:
    """Whether `blocks` are forced into the selection of a query whose own block is `own_block` (tensors that
    broadcast): the sinks, the own block and the `window_blocks` before it, among the visible blocks."""
    return (blocks <= own_block) & ((blocks < cfg.sink_blocks) | (blocks >= own_block - cfg.window_blocks))


def select_blocks(
    query_block_scores: torch.Tensor,
    agnostic_block_scores: torch.Tensor | None,
    positions: torch.Tensor,
    cfg: SparseAttentionConfig,
) -> torch.Tensor:
    """Selected key blocks of each (query, KV head).

    query_block_scores: [B, Tq, H, NB]; agnostic_block_scores: [B, Tq, H, NB] or None (no eviction head:
    all agnostic scores tie); positions: [Tq] or [B, Tq] -> block indices [B, Tq, H, K] int32, ascending, -1 unused.

    Order: forced blocks (sinks, the query's own block, the window_blocks before it); then the
    `query_aware_quota` best remaining visible blocks by query-aware score; then the remaining slots by
    agnostic score. Visible blocks are those <= the query's own block.
    """
    num_blocks = query_block_scores.shape[-1]
    device = query_block_scores.device
    blocks = torch.arange(num_blocks, device=device)
    own_block = torch.div(batched_positions(positions, query_block_scores.shape[0]), cfg.block_size, rounding_mode="floor")
    visible = blocks <= own_block[..., None]  # [1|B, Tq, NB]
    forced = forced_blocks(blocks, own_block[..., None], cfg)
    candidate = (visible & ~forced)[:, :, None, :].expand_as(query_block_scores)
    picks = _best_candidates(query_block_scores, candidate, cfg.query_aware_quota)
    if agnostic_block_scores is None:
        agnostic_block_scores = torch.zeros_like(query_block_scores, dtype=torch.float32)
    free_slots = cfg.topk_blocks - forced.sum(-1)[:, :, None] - picks.sum(-1)
    fill = _best_candidates(agnostic_block_scores.expand_as(query_block_scores), candidate & ~picks, free_slots)
    selected = forced[:, :, None, :] | picks | fill
    return selection_mask_to_indices(selected, cfg.topk_blocks)


def selection_mask_to_indices(selected: torch.Tensor, topk: int) -> torch.Tensor:
    """[..., NB] bool -> [..., topk] int32 ascending block indices, -1 padded."""
    num_blocks = selected.shape[-1]
    blocks = torch.arange(num_blocks, device=selected.device)
    keyed = torch.where(selected, blocks, num_blocks + blocks)
    ordered = keyed.sort(dim=-1).values
    if num_blocks < topk:
        ordered = F.pad(ordered, (0, topk - num_blocks), value=2 * num_blocks)
    ordered = ordered[..., :topk]
    return torch.where(ordered < num_blocks, ordered, -1).to(torch.int32)


def block_indices_to_mask(block_indices: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[..., K] int32 (-1 unused) -> [..., NB] bool."""
    mask = torch.zeros(block_indices.shape[:-1] + (num_blocks + 1,), dtype=torch.bool, device=block_indices.device)
    slot = torch.where(block_indices >= 0, block_indices.long(), num_blocks)
    mask.scatter_(-1, slot, True)
    return mask[..., :num_blocks]


def query_aware_block_scores(
    q: torch.Tensor, compressed_keys: torch.Tensor, positions: torch.Tensor, num_blocks: int, cfg: SparseAttentionConfig
) -> torch.Tensor:
    """Query-aware chunk scores pooled to blocks. q: [B, Tq, Hq, D]; compressed_keys: [B, Nc, H, D];
    positions: [Tq] -> [B, Tq, H, NB] float32, float64 for float64 inputs (-inf for a block with no complete
    window); positions may also be [B, Tq]."""
    chunks = query_aware_chunk_scores(q, compressed_keys, positions, cfg.compress_kernel, cfg.compress_stride)
    return pool_to_blocks(chunks, positions, num_blocks, cfg)


@torch.no_grad()
def select_for_queries(
    q: torch.Tensor,
    compressed_keys: torch.Tensor,
    agnostic_scores: torch.Tensor | None,
    positions: torch.Tensor,
    num_blocks: int,
    cfg: SparseAttentionConfig,
) -> torch.Tensor:
    """Scores, pooling and selection for a group of queries. No gradient flows through selection.

    q: [B, Tq, Hq, D]; compressed_keys: [B, Nc, H, D]; agnostic_scores: [B, Nc, H] (window means of the
    eviction score) or None; positions: [Tq] or [B, Tq]; num_blocks: blocks that exist -> [B, Tq, H, K] int32.
    """
    qa_blocks = query_aware_block_scores(q, compressed_keys, positions, num_blocks, cfg)
    ag_blocks = None
    if agnostic_scores is not None:
        ag_blocks = pool_to_blocks(agnostic_scores.float().transpose(1, 2).unsqueeze(1), positions, num_blocks, cfg)
    return select_blocks(qa_blocks, ag_blocks, positions, cfg)


# ----------------------------------------------------------------------------------------------------------
# Attention (spec 4.6)
# ----------------------------------------------------------------------------------------------------------
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    block_indices: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    return_lse: bool = False,
):
    """Block-sparse attention with an additive per-key bias applied after the 1/sqrt(D) scale.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, H, D] (key s sits at position s); bias: [B, Tk, H] or None;
    block_indices: [B, Tq, H, K] int32 (-1 unused); positions: [Tq].
    Query t attends to key s when s's block is selected for (t, h) and s <= positions[t]:
        o_t = sum_s softmax_s(q_t.k_s / sqrt(D) + bias[s, h]) v_s
    Returns o [B, Tq, Hq, D] in q's dtype (float32 math, float64 for float64 inputs), and with return_lse
    the natural log-sum-exp [B, Tq, Hq].
    """
    batch, num_queries, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    key_positions = torch.arange(num_keys, device=q.device)
    num_blocks = ceil_div(num_keys, block_size)
    block_mask = block_indices_to_mask(block_indices, num_blocks)  # [B, Tq, H, NB]
    allowed = block_mask[..., key_positions // block_size] & (key_positions[None, :] <= positions[:, None])[None, :, None, :]
    dtype = compute_dtype(q)
    qg = q.to(dtype).view(batch, num_queries, num_kv_heads, group, head_dim)
    logits = torch.einsum("bthgd,bshd->bhgts", qg, k.to(dtype)) / math.sqrt(head_dim)
    if bias is not None:
        logits = logits + bias.to(dtype).permute(0, 2, 1)[:, :, None, None, :]
    logits = logits.masked_fill(~allowed.permute(0, 2, 1, 3)[:, :, None], float("-inf"))
    # Every query attends at least to itself, so no row is all -inf and softmax is well defined.
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgts,bshd->bthgd", probs, v.to(dtype)).reshape(batch, num_queries, num_q_heads, head_dim)
    out = out.to(q.dtype)
    if return_lse:
        lse = torch.logsumexp(logits, dim=-1)  # [B, H, G, Tq]
        return out, lse.permute(0, 3, 1, 2).reshape(batch, num_queries, num_q_heads)
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Dense causal attention (attn_mode='dense'). q: [B, Tq, Hq, D]; k, v: [B, Tk, H, D] -> [B, Tq, Hq, D]."""
    num_q_heads, num_kv_heads = q.shape[2], k.shape[2]
    group = num_q_heads // num_kv_heads
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(group, dim=1)
    num_queries, num_keys = q.shape[1], k.shape[1]
    if num_queries == num_keys and bool((positions == torch.arange(num_keys, device=q.device)).all()):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:
        mask = torch.arange(num_keys, device=q.device)[None, :] <= positions[:, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


def query_chunk_size(num_queries: int, num_keys: int, num_q_heads: int, batch: int, max_elements: int) -> int:
    return max(1, min(num_queries, max_elements // max(1, num_keys * num_q_heads * batch)))


def nosa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eviction: torch.Tensor | None,
    cfg: SparseAttentionConfig,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    return_indices: bool = False,
):
    """Attention of the last Tq tokens of sequences of Tk tokens, in any attn_mode.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, H, D] (post-RoPE keys); eviction: [B, Tk, H] the per-token
    query-agnostic score c (dma and nosa; its gradient flows through the bias) -> [B, Tq, Hq, D].
    Queries are processed in chunks and, under autograd, recomputed in the backward pass, so memory stays
    O(chunk x Tk). With return_indices, also returns the selected blocks [B, Tq, H, K] int32 (None in
    dense mode).
    """
    num_queries, num_keys = q.shape[1], k.shape[1]
    if num_queries > num_keys:
        raise ValueError(f"more queries ({num_queries}) than keys ({num_keys}): queries are the last tokens")
    positions = torch.arange(num_keys - num_queries, num_keys, device=q.device)
    if not cfg.is_sparse:
        out = causal_attention(q, k, v, positions)
        return (out, None) if return_indices else out
    bias = eviction if cfg.uses_eviction_head else None
    compressed = compress_keys(k.detach(), cfg.compress_kernel, cfg.compress_stride)
    agnostic = None
    if cfg.uses_eviction_head:
        agnostic = agnostic_chunk_scores(eviction.detach(), cfg.compress_kernel, cfg.compress_stride)
    num_blocks = ceil_div(num_keys, cfg.block_size)
    chunk = query_chunk_size(num_queries, num_keys, q.shape[2], q.shape[0], max_chunk_elements)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias)
    )
    outputs, selections = [], []
    for start in range(0, num_queries, chunk):
        q_chunk = q[:, start : start + chunk]
        pos_chunk = positions[start : start + chunk]
        indices = select_for_queries(q_chunk, compressed, agnostic, pos_chunk, num_blocks, cfg)
        if return_indices:
            selections.append(indices)
        # Keys after the chunk's last query are never attended: slicing them off saves work.
        key_end = int(pos_chunk[-1]) + 1
        args = (q_chunk, k[:, :key_end], v[:, :key_end], None if bias is None else bias[:, :key_end], indices, pos_chunk, cfg.block_size)
        if needs_grad:
            outputs.append(checkpoint(sparse_attention, *args, use_reentrant=False))
        else:
            outputs.append(sparse_attention(*args))
    out = torch.cat(outputs, dim=1)
    return (out, torch.cat(selections, dim=1)) if return_indices else out


def paged_slots(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The slots a block table names, gathered from a paged store: pages [P, H, bs, D] (the store's layout),
    block_table [B, H, K] int (page of slot j of head h, -1: none, read as page 0) -> [B, K*bs, H, D], the
    layout `decode_attention` reads (slot j's tokens at j*bs .. j*bs + bs - 1)."""
    batch, heads, slots = block_table.shape
    block = pages.shape[2]
    index = block_table.clamp(min=0).long()
    blocks = pages[index, torch.arange(heads, device=pages.device)[None, :, None]]  # [B, H, K, bs, D]
    # Contiguous, like the slot cache's rows: einsum's reduction order follows the strides, and the paged
    # path must round exactly as the slot path does.
    return blocks.permute(0, 2, 3, 1, 4).contiguous().view(batch, slots * block, heads, pages.shape[-1])


def paged_valid(valid: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """valid [B, S, H] with the tokens of slots whose page is -1 (block_table [B, H, K]) masked out."""
    has_page = (block_table >= 0).repeat_interleave(block_size, dim=2).transpose(1, 2)  # [B, K*bs, H]
    return valid & has_page


def decode_attention(
    q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, bias_slots: torch.Tensor | None, valid: torch.Tensor,
    block_table: torch.Tensor | None = None, host_k: torch.Tensor | None = None, host_v: torch.Tensor | None = None,
    slot_src: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over the device block cache (the NOSI decode step).

    q: [B, Hq, D]; k_slots, v_slots: [B, S, H, D] with S = slots x block_size (slot j of KV head h holds
    the block named by that head's slot table); bias_slots: [B, S, H] float32 or None; valid: [B, S, H]
    bool, the slot tokens this query attends to (selected blocks, positions <= the query's).
    -> [B, Hq, D] in q's dtype. Same formula as `sparse_attention`: softmax(q.k/sqrt(D) + bias) v.
    Paged (block_table given, the one-copy path with offload off): k_slots, v_slots are the store's pages
    [P, H, bs, D] and block_table [B, H, K] int32 names the page of each slot (-1: none, not attended), so
    the blocks are read in place; the result is the slot path's over the same values, bit for bit.
    Loading: host_k, host_v [P, H, bs, D] and slot_src [B, H, K] int32 name the host page each slot loads
    this step (-1: none); those blocks are copied into k_slots / v_slots (in place; paged: into the page the
    table names, the pooled device cache) first, so the call is a gather of the step's misses followed by
    the attention.
    """
    if slot_src is not None:
        # The gather's own copy: into the slots seen as pages [B*K, H, bs, D] (view: raises rather than copy),
        # or, paged, into the page block_table names for the slot.
        batch, _, slots = slot_src.shape
        _, heads, block, dim = host_k.shape
        b, h, j = (slot_src >= 0).nonzero(as_tuple=True)
        if block_table is not None:
            pages, dst = (k_slots, v_slots), block_table[b, h, j]
        else:
            pages = [t.view(batch * slots, block, heads, dim).transpose(1, 2) for t in (k_slots, v_slots)]
            dst = b * slots + j
        gather_blocks(host_k, host_v, *pages, slot_src[b, h, j], dst, h)
    if block_table is not None:
        block = k_slots.shape[2]
        valid = paged_valid(valid, block_table, block)
        k_slots, v_slots = paged_slots(k_slots, block_table), paged_slots(v_slots, block_table)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_slots.shape[2]
    group = num_q_heads // num_kv_heads
    dtype = compute_dtype(q)
    qg = q.to(dtype).view(batch, num_kv_heads, group, head_dim)
    logits = torch.einsum("bhgd,bshd->bhgs", qg, k_slots.to(dtype)) / math.sqrt(head_dim)
    if bias_slots is not None:
        logits = logits + bias_slots.to(dtype).permute(0, 2, 1)[:, :, None, :]
    logits = logits.masked_fill(~valid.permute(0, 2, 1)[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
    out = torch.einsum("bhgs,bshd->bhgd", probs, v_slots.to(dtype))
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# The Llama blocks' norm and rotary embedding (nosa.layers.llama), here so that they dispatch: on CUDA one
# Triton launch each (`nosa.ops.kernels.norm_rope`) instead of ~7 and ~6 small PyTorch kernels.
# ----------------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., N], weight [N] -> [..., N] in promote_types(weight, x). Same
    arithmetic as transformers' LlamaRMSNorm (float32 variance, cast back to x's dtype before the weight)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, D]. The result keeps x's dtype: under bf16 autocast the
    projections are bf16 while cos/sin follow the float32 residual stream, and a silent promotion would
    hand the attention kernels float32 q and k beside a bf16 v."""
    return (x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]).to(x.dtype)
