"""The selection ops with positions [B, Tq] (each sequence its own), which the engine's decode step uses to
select every row in one call: equal to calling each sequence alone with its [Tq] positions, in the
reference and in the Triton kernels (interpreter on the CPU), fused and split score paths alike."""

import pytest
import torch

from nosa import ops
from nosa.config import SparseAttentionConfig
from nosa.ops import reference as ref

CFG = SparseAttentionConfig(block_size=8, topk_blocks=7, sink_blocks=1, window_blocks=1, query_blocks=3,
                            compress_kernel=6, compress_stride=3)
CAPACITY = 75  # tokens of state per sequence (the longest sequence's), as the engine sizes it


def inputs(positions, hq=4, h=2, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    batch, num_queries = positions.shape
    num_windows = ref.num_complete_windows(CAPACITY, CFG.compress_kernel, CFG.compress_stride)
    q = torch.randn(batch, num_queries, hq, d, generator=g, dtype=dtype)
    compressed = torch.randn(batch, num_windows, h, d, generator=g, dtype=dtype)
    agnostic = torch.randn(batch, num_windows, h, generator=g, dtype=dtype)
    return q, compressed, agnostic, ops.num_blocks(CAPACITY, CFG.block_size)


# Rows at different positions, two queries each (prefill-like) and one (decode-like); position 2 has no
# complete window yet and 74 is the last token of the capacity.
POSITIONS = [torch.tensor([[70, 74], [2, 9], [40, 41]]), torch.tensor([[74], [5], [33], [18]])]


def per_sequence(fn, positions, *tensors):
    """fn run on each sequence alone with its own [Tq] positions, concatenated over the batch."""
    return torch.cat([fn(*(t[b : b + 1] for t in tensors), positions[b]) for b in range(positions.shape[0])])


@pytest.mark.parametrize("positions", POSITIONS, ids=["two_queries", "decode"])
def test_reference_ops_with_per_sequence_positions_equal_each_sequence_alone(positions):
    q, compressed, agnostic, nb = inputs(positions, dtype=torch.float64)
    kernel, stride = CFG.compress_kernel, CFG.compress_stride
    # The scores' products round by the batch's shape (einsum), so they agree to float64 rounding; what
    # follows them (masks, pooling, selection) is compared exactly.
    chunk = lambda q, ck, pos: ref.query_aware_chunk_scores(q, ck, pos, kernel, stride)  # noqa: E731
    torch.testing.assert_close(chunk(q, compressed, positions), per_sequence(chunk, positions, q, compressed),
                               atol=1e-14, rtol=1e-12)
    scores = ref.query_aware_block_scores(q, compressed, positions, nb, CFG)
    alone = per_sequence(lambda q, ck, pos: ref.query_aware_block_scores(q, ck, pos, nb, CFG), positions, q, compressed)
    assert torch.equal(scores.isinf(), alone.isinf())
    torch.testing.assert_close(scores, alone, atol=1e-14, rtol=1e-12)
    pooled = ref.pool_to_blocks(agnostic.transpose(1, 2).unsqueeze(1), positions, nb, CFG)  # shared by the queries
    assert torch.equal(pooled, per_sequence(lambda a, pos: ref.pool_to_blocks(a.transpose(1, 2).unsqueeze(1), pos, nb, CFG),
                                            positions, agnostic))
    got = ref.select_blocks(scores, pooled, positions, CFG)
    assert torch.equal(got, per_sequence(lambda s, p, pos: ref.select_blocks(s, p, pos, CFG), positions, scores, pooled))
    want = per_sequence(lambda q, ck, a, pos: ref.select_for_queries(q, ck, a, pos, nb, CFG), positions, q, compressed, agnostic)
    assert torch.equal(ref.select_for_queries(q, compressed, agnostic, positions, nb, CFG), want)
    assert torch.equal(got, want)


@pytest.mark.parametrize("positions", POSITIONS, ids=["two_queries", "decode"])
def test_triton_selection_with_per_sequence_positions_equals_each_sequence_alone(positions, monkeypatch):
    pytest.importorskip("triton")
    from nosa.ops.kernels import selection as ks

    q, compressed, agnostic, nb = inputs(positions, seed=1)
    kernel, stride = CFG.compress_kernel, CFG.compress_stride
    chunk = lambda q, ck, pos: ks.query_aware_chunk_scores(q, ck, pos, kernel, stride)  # noqa: E731
    assert torch.equal(chunk(q, compressed, positions), per_sequence(chunk, positions, q, compressed))
    fused = lambda q, ck, pos: ks.query_aware_block_scores_fused(q, ck, pos, nb, CFG)  # noqa: E731
    scores = fused(q, compressed, positions)
    assert torch.equal(scores, per_sequence(fused, positions, q, compressed))
    # The split path (what decode takes on a GPU), chunk edges at 7 windows so every row spans several.
    split = lambda q, ck, pos: ks.query_aware_block_scores_split(q, ck, pos, nb, CFG, 3, chunk_windows=7)  # noqa: E731
    assert torch.equal(split(q, compressed, positions), per_sequence(split, positions, q, compressed))
    torch.testing.assert_close(split(q, compressed, positions), ref.query_aware_block_scores(q, compressed, positions, nb, CFG),
                               atol=1e-6, rtol=1e-5)
    pooled = ref.pool_to_blocks(agnostic.transpose(1, 2).unsqueeze(1), positions, nb, CFG)
    select = lambda s, p, pos: ks.select_blocks(s, p, pos, CFG)  # noqa: E731
    assert torch.equal(select(scores, pooled, positions), per_sequence(select, positions, scores, pooled))
    # select_for_queries reads the agnostic pooling from its prefix table at each sequence's positions.
    full = lambda q, ck, a, pos: ks.select_for_queries(q, ck, a, pos, nb, CFG)  # noqa: E731
    got = full(q, compressed, agnostic, positions)
    assert torch.equal(got, per_sequence(full, positions, q, compressed, agnostic))
    assert torch.equal(got, ref.select_for_queries(q, compressed, agnostic, positions, nb, CFG))


def test_positions_of_the_wrong_shape_are_refused_by_name():
    positions = torch.tensor([[3, 4], [5, 6]])
    q, compressed, agnostic, nb = inputs(positions)
    with pytest.raises(ValueError, match=r"positions must be \[Tq\] or \[B, Tq\] with B = 2"):
        ref.query_aware_block_scores(q, compressed, torch.tensor([[3, 4]] * 3), nb, CFG)
    pytest.importorskip("triton")
    from nosa.ops.kernels import selection as ks

    with pytest.raises(ValueError, match=r"positions must be \[Tq\] = \[2\] or \[B, Tq\] = \[2, 2\]"):
        ks.query_aware_block_scores(q, compressed, torch.tensor([3, 4, 5]), nb, CFG)
    with pytest.raises(ValueError, match=r"positions must be \[Tq\] = \[2\] or \[B, Tq\] = \[2, 2\]"):
        ks.select_blocks(torch.zeros(2, 2, 2, nb), None, torch.tensor([[3, 4]] * 3), CFG)
    with pytest.raises(ValueError, match="packed sequences"):
        ks.query_aware_block_scores_fused(q[:1], compressed[:1], positions[:1], nb, CFG, window_offsets=torch.zeros(2))


def test_triton_selection_reads_non_contiguous_per_sequence_positions():
    """Positions [B, Tq] that are a view (a column broadcast, a strided slice) give what their contiguous copy
    gives, through the split passes called directly too (they read the positions they are handed)."""
    pytest.importorskip("triton")
    from nosa.ops.kernels import selection as ks

    dense = torch.tensor([[70, 0, 74, 0], [2, 0, 9, 0], [40, 0, 41, 0]])
    views = [dense[:, ::2], torch.tensor([[74], [5], [33]]).expand(3, 2)]
    for positions in views:
        assert not positions.is_contiguous()
        q, compressed, agnostic, nb = inputs(positions, seed=2)
        copy = positions.contiguous()
        split = lambda pos: ks.query_aware_block_scores_split(q, compressed, pos, nb, CFG, 3, chunk_windows=7)  # noqa: E731
        assert torch.equal(split(positions), split(copy))
        plan = ks.split_plan(positions.shape[1], q.shape[2] // compressed.shape[2], compressed.shape[1], nb, 3, chunk_windows=7)
        stats = ks.split_chunk_stats(q, compressed, positions, CFG, plan)
        assert all(torch.equal(a, b) for a, b in zip(stats, ks.split_chunk_stats(q, compressed, copy, CFG, plan)))
        win = ks.split_window_scores(q, compressed, positions, CFG, plan, *stats)
        want = ks.split_window_scores(q, compressed, copy, CFG, plan, *stats)
        complete = torch.arange(compressed.shape[1]) < ref.num_complete_windows(copy + 1, CFG.compress_kernel,
                                                                                CFG.compress_stride)[..., None, None]
        assert torch.equal(win[complete.expand_as(win)], want[complete.expand_as(want)])  # the rest is unwritten
        scores = split(copy)
        assert torch.equal(ks.select_blocks(scores, None, positions, CFG), ks.select_blocks(scores, None, copy, CFG))
        assert torch.equal(ks.select_for_queries(q, compressed, agnostic, positions, nb, CFG),
                           ks.select_for_queries(q, compressed, agnostic, copy, nb, CFG))
