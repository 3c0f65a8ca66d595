"""The engine's one selection entry point: the blocks every cached row selects for its newest query.

`select_rows` is `reference.select_for_queries` for one query per row, each row at its own position,
with the query-agnostic scores already pooled to blocks (the engine keeps them pooled as windows complete,
`block_ops.commit_window`, instead of re-pooling every window at each step). Tested equal to
`select_for_queries` (tests/ops/test_select_rows.py).
"""

from __future__ import annotations

import torch

from nosa.config import SparseAttentionConfig
from nosa.ops.dispatch import dispatched

_query_aware_block_scores = dispatched("query_aware_block_scores")
_select_blocks = dispatched("select_blocks")


@torch.no_grad()
def select_rows(q: torch.Tensor, compressed_keys: torch.Tensor, agnostic_blocks: torch.Tensor | None,
                positions: torch.Tensor, num_blocks: int, cfg: SparseAttentionConfig) -> torch.Tensor:
    """q: [R, Hq, D], one query per row; compressed_keys: [R, Nc, H, D]; agnostic_blocks: [R, H, NB] the
    agnostic scores pooled to blocks at each row's position (-inf for a block with no complete window), or
    None (no eviction head); positions: [R] int64, each row's query position -> [R, H, K] int32.

    One call for every row, each at its own position ([R, 1] positions: the selection ops take one set
    per sequence), so the work is one query per row whatever the rows' lengths, and nothing depends on
    the positions' values on the host: the decode step can be graph-captured once.
    """
    agnostic = agnostic_blocks[:, None] if agnostic_blocks is not None else None  # [R, 1, H, NB]
    return _select(q[:, None], compressed_keys, agnostic, positions[:, None], num_blocks, cfg)[:, 0]


def _select(q, compressed_keys, agnostic, positions, num_blocks, cfg) -> torch.Tensor:
    """`select_for_queries` with the agnostic pooling already done: [B, Tq, H, K] int32. On CUDA the fused
    score kernel pools inside and never writes the per-window scores."""
    query_scores = _query_aware_block_scores(q, compressed_keys, positions, num_blocks, cfg)
    return _select_blocks(query_scores, agnostic, positions, cfg)
