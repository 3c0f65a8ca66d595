"""`ops.select_rows`, the engine's selection entry point (agnostic scores pooled incrementally, rows at
different positions), equals `reference.select_for_queries` run on each row alone, on CPU at odd shapes,
with the reference ops and with the Triton kernels (interpreter)."""

import pytest
import torch

from nosa import ops
from nosa.config import SparseAttentionConfig
from nosa.ops import reference

GEOMETRIES = [
    # block, topk, sink, window, query, kernel, stride, q heads, kv heads, head_dim
    (5, 5, 1, 1, 2, 6, 3, 3, 1, 12),
    (4, 7, 2, 0, 3, 4, 4, 6, 3, 8),
    (3, 4, 0, 2, 1, 5, 2, 2, 2, 6),
]


def state(geometry, mode, positions, seed):
    bs, topk, sink, window, query, kernel, stride, hq, h, d = geometry
    cfg = SparseAttentionConfig(block_size=bs, topk_blocks=topk, sink_blocks=sink, window_blocks=window,
                                query_blocks=min(query, topk - sink - window - 1), compress_kernel=kernel,
                                compress_stride=stride, attn_mode=mode)
    g = torch.Generator().manual_seed(seed)
    rows, capacity = positions.shape[0], 41  # state sized for the longest sequence, as the engine's
    num_windows = reference.num_complete_windows(capacity, kernel, stride)
    num_blocks = ops.num_blocks(capacity, bs)
    compressed = torch.randn(rows, num_windows, h, d, generator=g)
    agnostic = torch.randn(rows, num_windows, h, generator=g) if cfg.uses_eviction_head else None
    # Ties: a few equal scores, so the tie rule (lower block first) is exercised too.
    if agnostic is not None:
        agnostic[:, ::3] = 0.25
    q = torch.randn(rows, hq, d, generator=g)
    pooled = None
    if agnostic is not None:
        # What the engine keeps: each row's agnostic scores pooled to blocks at its own position.
        pooled = torch.cat([reference.pool_to_blocks(agnostic[r : r + 1].transpose(1, 2)[:, None], positions[r : r + 1], num_blocks, cfg)[:, 0]
                            for r in range(rows)])
    return cfg, q, compressed, agnostic, pooled, num_blocks


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["nosa", "infllmv2", "dma"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("same_position", [False, True])
def test_select_rows_equals_select_for_queries_row_by_row(backend, mode, geometry, same_position):
    if backend == "triton":
        pytest.importorskip("triton")
    positions = torch.full((3,), 29) if same_position else torch.tensor([40, 6, 17])
    cfg, q, compressed, agnostic, pooled, num_blocks = state(geometry, mode, positions, seed=len(mode) + geometry[0])
    with ops.use_backend(backend):
        got = ops.select_rows(q, compressed, pooled, positions, num_blocks, cfg)
    assert got.shape == (3, geometry[8], cfg.topk_blocks) and got.dtype == torch.int32
    for r in range(3):
        want = reference.select_for_queries(q[r : r + 1, None], compressed[r : r + 1],
                                            None if agnostic is None else agnostic[r : r + 1],
                                            positions[r : r + 1], num_blocks, cfg)[0, 0]
        assert torch.equal(got[r], want), f"row {r} at position {int(positions[r])}"
