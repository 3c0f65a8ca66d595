"""The split path of the query-aware block scores (compressed keys cut into chunks: per-chunk softmax
statistics, then a combine and the pooling of a range of blocks per program) against the reference, on
CPU under the interpreter, at odd shapes.

Same comparison rule as the fused kernel (test_kernels_selection.py): the -inf pattern equal, finite
scores within atol 1e-6 / rtol 1e-5 (float32 sums in another order), and the selection made from them
equal to the reference's exactly at these float32 shapes. Chunk sizes are forced, down to one key or one
block per chunk, so chunk edges fall inside and between the windows a block pools; rows of one call sit at
different positions (lengths not multiples of the block or the stride, one with no complete window), and
the mutation tests show that dropping or double counting one chunk's statistics fails the comparison.
"""

import dataclasses

import pytest
import torch

from nosa import ops
from nosa.config import SparseAttentionConfig
from nosa.ops import reference as ref
from nosa.ops.kernels import selection as ks


def _cfg(block, kernel, stride):
    return SparseAttentionConfig(block_size=block, topk_blocks=6, sink_blocks=1, window_blocks=1, query_blocks=2,
                                 compress_kernel=kernel, compress_stride=stride)


# group, KV heads, head_dim, (block, kernel, stride), capacity (tokens), query positions
SHAPES = {
    "g1_h2_d64": (1, 2, 64, (8, 4, 2), 203, [202, 3, 57, 130, 99]),
    "g4_h1_d128": (4, 1, 128, (16, 6, 3), 251, [250, 77, 5, 160]),
    "g16_h2_d128_spec": (16, 2, 128, (64, 32, 16), 709, [708, 30, 333, 517, 64, 95, 700, 401, 222]),  # 2 tiles
    "g16_h1_d64_decode": (16, 1, 64, (8, 5, 3), 187, [186]),  # one query per row, as at decode
}

# (chunks, chunk_windows, chunk_blocks): the default plan; odd sizes that put the key-chunk edges inside a
# block's windows and the block-chunk edges between blocks that share a window; key chunks long enough
# that some lie past every short row (at GQA 4 and 16 only: g1_h2_d64 and g16_h2_d128_spec run the same
# split code with chunk edges inside windows at (None, 13, 3), and this case added ~8 s each under the
# interpreter); two keys and one block per chunk (the decode shape only: the interpreter's cost grows with
# the programs).
CHUNKINGS = [(3, None, None), (None, 13, 3), (None, 40, 5)]
LONG_CHUNKS_ONLY_AT = ("g4_h1_d128", "g16_h1_d64_decode")
CASES = ([(name, c) for name in SHAPES for c in CHUNKINGS if c != (None, 40, 5) or name in LONG_CHUNKS_ONLY_AT]
         + [("g16_h1_d64_decode", (None, 2, 1))])


def _case(name, seed=0):
    group, heads, dim, (block, kernel, stride), capacity, positions = SHAPES[name]
    cfg = _cfg(block, kernel, stride)
    g = torch.Generator().manual_seed(seed)
    batch = 2  # two rows: the row stride is exercised; a third row only added interpreter time
    num_windows = ref.num_complete_windows(capacity, kernel, stride)
    num_blocks = -(-capacity // block)
    q = torch.randn(batch, len(positions), group * heads, dim, generator=g)
    # Compressed keys of a plausible spread (means of `kernel` keys), so the softmax has a real shape.
    ck = torch.randn(batch, num_windows, heads, dim, generator=g) * 1.5
    return cfg, q, ck, torch.tensor(positions), num_blocks


def _assert_matches_reference(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-6, rtol=1e-5)


def _passes(q, ck, positions, num_blocks, cfg, chunks, chunk_windows, chunk_blocks):
    qq, cc, pp = ks._prepare_scores(q, ck, positions)
    plan = ks.split_plan(q.shape[1], q.shape[2] // ck.shape[2], ck.shape[1], num_blocks, chunks, chunk_windows, chunk_blocks)
    return qq, cc, pp, plan


@pytest.mark.parametrize("name,chunking", CASES, ids=[f"{n}-{'-'.join(map(str, c))}" for n, c in CASES])
def test_split_scores_equal_reference(name, chunking):
    cfg, q, ck, positions, num_blocks = _case(name)
    chunks, chunk_windows, chunk_blocks = chunking
    qq, cc, pp, plan = _passes(q, ck, positions, num_blocks, cfg, chunks or 1, chunk_windows, chunk_blocks)
    assert chunk_windows is None or plan.stat_chunks > 1
    assert chunk_blocks is None or plan.pool_chunks > 1
    stat_m, stat_l = ks.split_chunk_stats(qq, cc, pp, cfg, plan)
    win = ks.split_window_scores(qq, cc, pp, cfg, plan, stat_m, stat_l)
    # The window scores, wherever a window is complete at its token: the reference's chunk scores.
    complete = torch.arange(ck.shape[1])[None, :] < ref.num_complete_windows(positions + 1, cfg.compress_kernel, cfg.compress_stride)[:, None]
    win_ref = ref.query_aware_chunk_scores(q, ck, positions, cfg.compress_kernel, cfg.compress_stride)
    mask = complete[None, :, None, :].expand_as(win_ref)
    torch.testing.assert_close(win[mask], win_ref[mask], atol=1e-6, rtol=1e-5)
    got = ks.pool_window_scores(win, pp, num_blocks, cfg, plan)
    want = ref.query_aware_block_scores(q, ck, positions, num_blocks, cfg)
    _assert_matches_reference(got, want)
    assert torch.equal(got, ks.query_aware_block_scores_split(q, ck, positions, num_blocks, cfg, chunks or 1, chunk_windows, chunk_blocks))
    # Pooling the reference's own window scores gives its block scores bit for bit (same max of the same
    # floats, ties between blocks that share a window included).
    assert torch.equal(ks.pool_window_scores(win_ref.contiguous(), pp, num_blocks, cfg, plan),
                       ref.pool_to_blocks(win_ref, positions, num_blocks, cfg))
    # The selection from these scores is the reference's (no near-ties at these float32 shapes).
    assert torch.equal(ks.select_blocks(got, None, positions, cfg), ref.select_blocks(want, None, positions, cfg))


@pytest.mark.parametrize("block_w", [16, 128])
def test_keys_per_step(block_w):
    """Passes 1 and 2 with other step sizes than the default 64 (key chunks of 40: edges inside a step)."""
    cfg, q, ck, positions, num_blocks = _case("g16_h1_d64_decode", seed=2)
    got = ks.query_aware_block_scores_split(q, ck, positions, num_blocks, cfg, 1, 40, None, block_w=block_w)
    _assert_matches_reference(got, ref.query_aware_block_scores(q, ck, positions, num_blocks, cfg))


@pytest.mark.parametrize("name", ["g4_h1_d128", "g16_h1_d64_decode"])
def test_dropping_or_double_counting_a_chunk_fails(name):
    """The comparison above can fail: corrupt one key chunk's statistics, or leave out one key chunk's
    window scores or one block chunk's pooling."""
    cfg, q, ck, positions, num_blocks = _case(name, seed=1)
    want = ref.query_aware_block_scores(q, ck, positions, num_blocks, cfg)
    qq, cc, pp, plan = _passes(q, ck, positions, num_blocks, cfg, 1, 11, 2)
    assert plan.stat_chunks >= 3 and plan.pool_chunks >= 3
    stat_m, stat_l = ks.split_chunk_stats(qq, cc, pp, cfg, plan)
    run = lambda m, l, p=plan: ks.pool_window_scores(ks.split_window_scores(qq, cc, pp, cfg, p, m, l), pp, num_blocks, cfg, p)  # noqa: E731
    good = run(stat_m, stat_l)  # kept alive: its memory is not handed to the outputs below
    _assert_matches_reference(good, want)
    dropped_m, dropped_l = stat_m.clone(), stat_l.clone()
    dropped_m[:, :, 1], dropped_l[:, :, 1] = float("-inf"), 0.0
    doubled_l = stat_l.clone()
    doubled_l[:, :, 1] *= 2  # chunk 1 counted twice
    for m, l in ((dropped_m, dropped_l), (stat_m, doubled_l)):
        with pytest.raises(AssertionError):
            _assert_matches_reference(run(m, l), want)
    # Pass 2 or pass 3 launched one chunk short: those windows / blocks are never written (NaN-filled here,
    # so the test does not depend on what the allocator hands out), which the comparison catches.
    for short in (dataclasses.replace(plan, stat_chunks=plan.stat_chunks - 1),
                  dataclasses.replace(plan, pool_chunks=plan.pool_chunks - 1)):
        win = ks.split_window_scores(qq, cc, pp, cfg, short, stat_m, stat_l)
        win[..., short.stat_chunks * short.chunk_windows:] = float("nan")
        out = ks.pool_window_scores(win, pp, num_blocks, cfg, short, out=torch.full_like(want, float("nan")))
        with pytest.raises(AssertionError):
            _assert_matches_reference(out, want)


def test_short_rows_keep_the_fused_kernel(monkeypatch):
    cfg, q, ck, positions, num_blocks = _case("g1_h2_d64")
    monkeypatch.setattr(ks, "_sm_count", lambda device: 132)
    assert ks.score_chunks(q.shape[1], 1, q.shape[0], ck.shape[2], ck.shape[1], q.device) == 1  # 100 keys < 2 x 128
    monkeypatch.setattr(ks, "query_aware_block_scores_split", lambda *a, **k: pytest.fail("split path taken"))
    _assert_matches_reference(ks.query_aware_block_scores(q, ck, positions, num_blocks, cfg),
                              ref.query_aware_block_scores(q, ck, positions, num_blocks, cfg))


def test_score_chunks_rule(monkeypatch):
    """The one rule: split only when the fused launch has < 4 programs per SM, no chunk under 128 keys."""
    monkeypatch.setattr(ks, "_sm_count", lambda device: 132)  # the H200
    windows = lambda tokens: ref.num_complete_windows(tokens, 32, 16)  # noqa: E731
    # Decode at the 8B shape (GQA 16, 2 KV heads): 64K tokens x batch 48 -> 96 programs -> 6 chunks (576).
    assert ks.score_chunks(1, 16, 48, 2, windows(65536), "cuda") == 6
    # 16K x batch 16: 32 programs; 17 chunks would reach 528 but 1,023 keys allow only 7 of >= 128.
    assert ks.score_chunks(1, 16, 16, 2, windows(16384), "cuda") == 7
    # Short rows (2K tokens: 127 keys) and a full launch (prefill: 48 queries already give 6 x 96 programs)
    # keep the fused kernel; so do packed sequences.
    assert ks.score_chunks(1, 16, 48, 2, windows(2048), "cuda") == 1
    assert ks.score_chunks(48, 16, 48, 2, windows(65536), "cuda") == 1
    assert ks.score_chunks(4096, 16, 1, 2, windows(65536), "cuda") == 1
    assert ks.score_chunks(1, 16, 1, 2, windows(65536), "cuda", packed=True) == 1
    # GQA 1: the fused kernel's 128-token tiles are one program per row at decode, like GQA 16.
    assert ks.score_chunks(1, 1, 48, 2, windows(65536), "cuda") == 6
    # The materialised window scores stay within SPLIT_MAX_SCORE_BYTES (16 MiB): 4 x 600 x 2 x 4,095 x 4 bytes is not.
    assert ks.score_chunks(600, 16, 4, 2, windows(65536), "cuda") == 1


@pytest.mark.parametrize("same_position", [True, False])
def test_select_rows_through_the_split_path_equals_reference(same_position, monkeypatch):
    """The engine's entry point with the rule forced to split (every launch is 'too small'): each row's
    selection equals the reference's for that row alone, rows at different positions included."""
    monkeypatch.setattr(ks, "SPLIT_PROGRAMS_PER_SM", 10_000)
    monkeypatch.setattr(ks, "SPLIT_MIN_WINDOWS", 5)
    calls = []
    split = ks.query_aware_block_scores_split
    monkeypatch.setattr(ks, "query_aware_block_scores_split", lambda *a, **k: calls.append(a[5]) or split(*a, **k))
    cfg = SparseAttentionConfig(block_size=8, topk_blocks=7, sink_blocks=1, window_blocks=1, query_blocks=3,
                                compress_kernel=6, compress_stride=3)
    g = torch.Generator().manual_seed(3)
    rows, capacity, h, hq, d = 3, 121, 2, 8, 64
    num_windows, num_blocks = ref.num_complete_windows(capacity, 6, 3), ops.num_blocks(capacity, 8)
    positions = torch.full((rows,), 97) if same_position else torch.tensor([120, 13, 70])
    compressed = torch.randn(rows, num_windows, h, d, generator=g)
    agnostic = torch.randn(rows, num_windows, h, generator=g)
    q = torch.randn(rows, hq, d, generator=g)
    pooled = torch.cat([ref.pool_to_blocks(agnostic[r:r + 1].transpose(1, 2)[:, None], positions[r:r + 1], num_blocks, cfg)[:, 0]
                        for r in range(rows)])
    with ops.use_backend("triton"):
        got = ops.select_rows(q, compressed, pooled, positions, num_blocks, cfg)
    assert calls and all(c > 1 for c in calls)
    for r in range(rows):
        want = ref.select_for_queries(q[r:r + 1, None], compressed[r:r + 1], agnostic[r:r + 1], positions[r:r + 1],
                                      num_blocks, cfg)[0, 0]
        assert torch.equal(got[r], want), f"row {r} at position {int(positions[r])}"


@pytest.mark.parametrize("group,want", [(16, 1), (32, 1), (8, 2), (4, 4), (3, 4), (1, 16)])
def test_decode_split_programs_hold_one_token_once_its_group_fills_16_rows(group, want):
    """One query (decode): as many tokens per program as make 16 rows, no more (at GQA 16 one token; two
    left half of every program's rows padding until 2026-12-07)."""
    assert ks.split_tile_tokens(group, 1) == min(want, ks.score_tile_tokens(group))
