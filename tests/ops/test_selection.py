"""Selection (spec 4.5): structural properties and a brute-force comparison with a loop implementation
written here from the spec text, independent of nosa.ops.reference."""

import math

import pytest
import torch

from nosa.config import SparseAttentionConfig
from nosa.ops import reference as ref


def brute_force_selection(q, k, c, cfg: SparseAttentionConfig):
    """Selected block sets, one python set per (t, h), for a single sequence. q: [T, Hq, D]; k: [T, H, D]; c: [T, H] or None."""
    T, Hq, D = q.shape
    H = k.shape[1]
    G = Hq // H
    bs, kern, stride = cfg.block_size, cfg.compress_kernel, cfg.compress_stride
    windows = [(stride * i, stride * i + kern) for i in range(T) if stride * i + kern <= T]
    result = {}
    for t in range(T):
        complete = [i for i, (a, b) in enumerate(windows) if b - 1 <= t]
        own = t // bs
        for h in range(H):
            qa = {}
            for i in complete:
                qa[i] = 0.0
            for g in range(G):
                logits = {i: float(q[t, h * G + g] @ k[windows[i][0]:windows[i][1], h].mean(0)) / math.sqrt(D) for i in complete}
                if logits:
                    top = max(logits.values())
                    norm = sum(math.exp(x - top) for x in logits.values())
                    for i in complete:
                        qa[i] += math.exp(logits[i] - top) / norm
            ag = {i: float(c[windows[i][0]:windows[i][1], h].mean()) if c is not None else 0.0 for i in complete}

            def block_score(j, scores):
                overlapping = [i for i in complete if windows[i][0] < bs * (j + 1) and windows[i][1] > bs * j]
                return max((scores[i] for i in overlapping), default=-math.inf)

            visible = list(range(own + 1))
            forced = {j for j in visible if j < cfg.sink_blocks or j >= own - cfg.window_blocks}
            rest = [j for j in visible if j not in forced]
            by_query = sorted(rest, key=lambda j: (-block_score(j, qa), j))
            picks = set(by_query[: cfg.query_aware_quota])
            rest = [j for j in rest if j not in picks]
            by_agnostic = sorted(rest, key=lambda j: (-block_score(j, ag), j))
            fill = set(by_agnostic[: max(0, cfg.topk_blocks - len(forced) - len(picks))])
            result[t, h] = (forced, picks, forced | picks | fill)
    return result


def _select(q, k, c, cfg):
    T = q.shape[1]
    compressed = ref.compress_keys(k, cfg.compress_kernel, cfg.compress_stride)
    agnostic = None if c is None else ref.agnostic_chunk_scores(c, cfg.compress_kernel, cfg.compress_stride)
    return ref.select_for_queries(q, compressed, agnostic, torch.arange(T), -(-T // cfg.block_size), cfg)


GEOMETRIES = [
    dict(block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=2, query_blocks=2, compress_kernel=8, compress_stride=4),
    dict(block_size=4, topk_blocks=7, sink_blocks=2, window_blocks=1, query_blocks=1, compress_kernel=6, compress_stride=2),
    dict(block_size=8, topk_blocks=5, sink_blocks=0, window_blocks=0, query_blocks=3, compress_kernel=12, compress_stride=5),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("attn_mode", ["nosa", "dma", "infllmv2"])
def test_selection_matches_brute_force(geometry, attn_mode):
    cfg = SparseAttentionConfig(attn_mode=attn_mode, **geometry)
    T, Hq, H, D = 77, 4, 2, 8
    q, k = torch.randn(1, T, Hq, D), torch.randn(1, T, H, D)
    c = torch.randn(1, T, H) if cfg.uses_eviction_head else None
    got = _select(q, k, c, cfg)[0]
    expected = brute_force_selection(q[0], k[0], None if c is None else c[0], cfg)
    for (t, h), (_, _, selected) in expected.items():
        row = got[t, h]
        assert set(row[row >= 0].tolist()) == selected, (t, h)


def test_structural_properties():
    cfg = SparseAttentionConfig(**GEOMETRIES[0])
    T = 150
    q, k, c = torch.randn(2, T, 8, 16), torch.randn(2, T, 2, 16), torch.randn(2, T, 2)
    indices = _select(q, k, c, cfg)  # [B, T, H, K]
    assert indices.dtype == torch.int32 and indices.shape == (2, T, 2, cfg.topk_blocks)
    expected = brute_force_selection(q[0], k[0], c[0], cfg)
    for t in range(T):
        own = t // cfg.block_size
        for h in range(2):
            row = indices[0, t, h]
            chosen = row[row >= 0]
            assert torch.all(chosen[1:] > chosen[:-1]), "ascending, no duplicates"
            assert torch.all(row[len(chosen):] == -1), "unused slots are -1 at the end"
            chosen = set(chosen.tolist())
            assert max(chosen) <= own, "no future block"
            forced = {j for j in range(own + 1) if j < cfg.sink_blocks or j >= own - cfg.window_blocks}
            assert forced <= chosen
            assert len(chosen) == min(own + 1, cfg.topk_blocks)
            if own + 1 > cfg.topk_blocks:
                # exactly query_blocks picks made by the query-aware score
                assert len(expected[t, h][1]) == cfg.query_blocks


def test_ties_break_to_lower_block_and_are_deterministic():
    cfg = SparseAttentionConfig(attn_mode="dma", **GEOMETRIES[0])
    T = 120
    q, k = torch.randn(1, T, 4, 8), torch.randn(1, T, 2, 8)
    c = torch.zeros(1, T, 2)  # every agnostic score ties
    first = _select(q, k, c, cfg)
    assert torch.equal(first, _select(q, k, c, cfg))
    t = T - 1
    own = t // cfg.block_size
    forced = {0} | set(range(own - cfg.window_blocks, own + 1))
    fill = [j for j in range(own + 1) if j not in forced][: cfg.topk_blocks - len(forced)]
    assert set(first[0, t, 0].tolist()) == forced | set(fill)


def test_one_selection_per_gqa_group():
    # Query heads of one group share one selection: the output has one row per KV head, and permuting the
    # query heads inside a group (the summed score is symmetric) leaves it unchanged.
    cfg = SparseAttentionConfig(**GEOMETRIES[0])
    T, H, G = 100, 2, 4
    q, k, c = torch.randn(1, T, H * G, 8), torch.randn(1, T, H, 8), torch.randn(1, T, H)
    base = _select(q, k, c, cfg)
    assert base.shape[2] == H
    permuted = q.view(1, T, H, G, 8)[:, :, :, torch.randperm(G)].reshape(1, T, H * G, 8)
    assert torch.equal(base, _select(permuted, k, c, cfg))


def test_selection_sees_a_window_at_the_token_that_completes_it():
    # Window i = [4i, 4i+8) completes at t = 4i+7 and must count for that very query (no one-token lag).
    cfg = SparseAttentionConfig(**GEOMETRIES[0])
    positions = torch.arange(40)
    counts = ref.num_complete_windows(positions + 1, cfg.compress_kernel, cfg.compress_stride)
    assert counts[6] == 0 and counts[7] == 1 and counts[11] == 2


def test_block_window_ranges_for_the_paper_defaults():
    cfg = SparseAttentionConfig()
    index, valid = ref.block_window_ranges(6, cfg)
    for j in range(6):
        windows = index[j][valid[j]].tolist()
        assert windows == list(range(max(0, 4 * j - 1), 4 * j + 4))
