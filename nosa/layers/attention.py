"""The NOSA attention layer: Llama projections + RoPE, the eviction head, and the sparse attention op; and
the `AttentionBackend` hook through which an inference engine that owns the KV cache runs the layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from nosa import ops
from nosa.config import NosaConfig
from nosa.layers.eviction import EvictionHead
from nosa.layers.llama import apply_rotary


@dataclass(frozen=True)
class SequenceSpans:
    """Where each row's real tokens lie among the Tk key positions of a padded batch: [start_b, end_b).

    Block boundaries, windows and positions are counted from each row's own start, so a left-padded batch
    computes exactly what each sequence computes alone.
    """

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    total: int

    @classmethod
    def full(cls, batch: int, total: int) -> "SequenceSpans":
        return cls((0,) * batch, (total,) * batch, total)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> "SequenceSpans":
        """attention_mask: [B, Tk] of 0/1 with one contiguous run of ones per row (left or right padding)."""
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [batch, keys], got shape {tuple(attention_mask.shape)}")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = attention_mask.to(torch.int64)
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            rows = torch.nonzero(lengths == 0).flatten().tolist()
            raise ValueError(f"attention_mask rows {rows} have no tokens")
        starts = torch.argmax(mask, dim=1)
        ends = starts + lengths
        positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
        expected = (positions >= starts[:, None]) & (positions < ends[:, None])
        if not bool((expected == mask.bool()).all()):
            raise ValueError(
                "attention_mask must be one contiguous run of ones per row (left or right padding); "
                "holes inside a sequence are not supported"
            )
        return cls(tuple(starts.tolist()), tuple(ends.tolist()), mask.shape[1])

    @property
    def is_full(self) -> bool:
        return all(s == 0 for s in self.starts) and all(e == self.total for e in self.ends)

    def position_ids(self, num_queries: int, device) -> torch.Tensor:
        """Logical positions of the last `num_queries` key slots of each row: [B, Tq] (0 on padding)."""
        absolute = torch.arange(self.total - num_queries, self.total, device=device)[None, :]
        starts = torch.tensor(self.starts, device=device)[:, None]
        return (absolute - starts).clamp(min=0)


class AttentionBackend:
    """Where the attention of the model's layers happens when an engine owns the KV cache (the way serving
    engines plug paged attention into a model). Passed as the `cache` argument of the layers: each
    `NosaAttention` projects q, k, v and the eviction score c of its new tokens as always, and hands them
    to `attend` instead of reading a transformers cache; embedding, norms, residuals, MLP and lm_head stay
    the model's own. Subclasses keep whatever state they need (the offloading engine: its block cache)."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               eviction: torch.Tensor | None) -> torch.Tensor:
        """q: [B, Tq, Hq, D], k, v: [B, Tq, H, D] (post-RoPE), eviction: [B, Tq, H] float32 or None, all
        of the new tokens -> the attention output [B, Tq, Hq, D] in q's dtype."""
        raise NotImplementedError


class NosaAttention(nn.Module):
    def __init__(self, config: NosaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.sparse = config.sparse
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.eviction = (
            EvictionHead(self.num_kv_heads, self.head_dim, config.eviction_init_std)
            if self.sparse.uses_eviction_head
            else None
        )
        # When a list, every forward appends the selected blocks [B, Tq, H, K] (per row for padded
        # batches): how eval and the tests observe selection without a second code path.
        self.selection_log: list | None = None

    def project_qkv(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """hidden: [B, T, hidden] -> q [B, T, Hq, D], k, v [B, T, H, D] with RoPE applied to q and k."""
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def eviction_scores(self, v: torch.Tensor) -> torch.Tensor | None:
        """v: [B, T, H, D] -> c [B, T, H] float32, or None without an eviction head."""
        return None if self.eviction is None else self.eviction(v)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: SequenceSpans, cache=None) -> torch.Tensor:
        """hidden: [B, Tq, hidden]; cos, sin: [B, Tq, D]; spans over the Tk = past + Tq key slots. cache: a
        transformers cache, None, or an `AttentionBackend` (then spans is unused)."""
        q, k, v = self.project_qkv(hidden, cos, sin)
        if isinstance(cache, AttentionBackend):
            out = cache.attend(self.layer_idx, q, k, v, self.eviction_scores(v))
            return self.o_proj(out.reshape(out.shape[0], out.shape[1], -1))
        if getattr(cache, "keeps_nosa_state", False):
            # NosaCache (nosa/models/cache.py, generate's default) keeps compressed keys and pooled scores as
            # windows complete, so a decode step costs one token's work; it runs this layer from that state.
            out = cache.attend_layer(self, q, k, v, spans)
            return self.o_proj(out.reshape(out.shape[0], out.shape[1], -1))
        if cache is not None:
            # transformers' caches store [B, H, T, D]; ours is [B, T, H, D].
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)
        # c depends on v alone, so it is recomputed from the cached values rather than cached itself.
        eviction = self.eviction_scores(v)
        out = self.attend(q, k, v, eviction, spans)
        return self.o_proj(out.reshape(out.shape[0], out.shape[1], -1))

    def attend(self, q, k, v, eviction, spans: SequenceSpans) -> torch.Tensor:
        """q: [B, Tq, Hq, D] (the last Tq key slots); k, v: [B, Tk, H, D]; eviction: [B, Tk, H] or None."""
        record = self.selection_log is not None and self.sparse.is_sparse
        if spans.is_full:
            if not record:
                return ops.nosa_attention(q, k, v, eviction, self.sparse)
            out, indices = ops.nosa_attention(q, k, v, eviction, self.sparse, return_indices=True)
            self.selection_log.append(indices)
            return out
        num_queries, num_keys = q.shape[1], k.shape[1]
        first_query_slot = num_keys - num_queries
        out = torch.zeros_like(q)
        for row, (start, end) in enumerate(zip(spans.starts, spans.ends)):
            query_start = max(start, first_query_slot)
            if end <= query_start:
                continue  # this row has no real token among the queries (right padding)
            row_eviction = None if eviction is None else eviction[row : row + 1, start:end]
            result = ops.nosa_attention(
                q[row : row + 1, query_start - first_query_slot : end - first_query_slot],
                k[row : row + 1, start:end],
                v[row : row + 1, start:end],
                row_eviction,
                self.sparse,
                return_indices=record,
            )
            if record:
                result, indices = result
                self.selection_log.append(indices)
            out[row : row + 1, query_start - first_query_slot : end - first_query_slot] = result
        return out
