"""Triton selection kernels against the reference, on CPU under the interpreter.

How selection is compared: the composition kernel (`select_blocks`) must equal the reference exactly on
the same scores, including deliberate ties and -inf scores. The score kernels are compared with a
tolerance (their float32 sums run in another order). The fused pipeline is compared exactly at these
float32 shapes, where no two block scores tie within rounding; at bf16 on the GPU a differing row must be
explained by a near-tie (test_kernels_gpu.py).
"""

import pytest
import torch

from nosa.config import SparseAttentionConfig
from nosa.ops import reference as ref
from nosa.ops.kernels import pipeline as kp
from nosa.ops.kernels import selection as ks


def _cfg(mode="nosa", **kw):
    base = dict(block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=1, query_blocks=2,
                compress_kernel=4, compress_stride=2, attn_mode=mode)
    base.update(kw)
    return SparseAttentionConfig(**base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_window_means(dtype):
    k = torch.randn(2, 37, 3, 64).to(dtype)
    ev = torch.randn(2, 37, 3)
    torch.testing.assert_close(ks.compress_keys(k, 8, 4), ref.compress_keys(k, 8, 4), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ks.agnostic_chunk_scores(ev, 5, 3), ref.agnostic_chunk_scores(ev, 5, 3), atol=1e-6, rtol=1e-6)
    assert ks.compress_keys(k[:, :7], 8, 4).shape == (2, 0, 3, 64)



@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_agnostic_window_means_depend_on_the_values_only(kernel):
    # Like the reference: windows holding the same values in another order score the same, bit for bit.
    windows = torch.randn(2, 20, 3, kernel) * torch.logspace(-3, 3, kernel)
    shuffled = windows[..., torch.randperm(kernel)]
    as_tokens = lambda w: w.permute(0, 1, 3, 2).reshape(2, 20 * kernel, 3)  # noqa: E731  window i = tokens [k*i, k*i + k)
    means = ks.agnostic_chunk_scores(as_tokens(windows), kernel, kernel)
    assert torch.equal(means, ks.agnostic_chunk_scores(as_tokens(shuffled), kernel, kernel))
    torch.testing.assert_close(means, ref.agnostic_chunk_scores(as_tokens(windows), kernel, kernel), atol=1e-6, rtol=1e-6)

@pytest.mark.parametrize("hq,h,d,kernel,stride,block", [(4, 4, 64, 4, 2, 8), (12, 4, 128, 6, 3, 8), (16, 1, 64, 8, 4, 16),
                                                      (2, 2, 64, 16, 8, 1)])  # blocks far smaller than the stride
def test_query_aware_scores_and_pooling(hq, h, d, kernel, stride, block):
    cfg = _cfg(block_size=block, compress_kernel=kernel, compress_stride=stride)
    tk, tq = 61, 30
    q = torch.randn(1, tq, hq, d)
    k = torch.randn(1, tk, h, d)
    positions = torch.arange(tk - tq, tk)
    ck = ref.compress_keys(k, kernel, stride)
    chunk = ks.query_aware_chunk_scores(q, ck, positions, kernel, stride)
    chunk_ref = ref.query_aware_chunk_scores(q, ck, positions, kernel, stride)
    torch.testing.assert_close(chunk, chunk_ref, atol=1e-6, rtol=1e-5)
    num_blocks = -(-tk // block)
    pooled = ks.query_aware_block_scores(q, ck, positions, num_blocks, cfg)
    pooled_ref = ref.query_aware_block_scores(q, ck, positions, num_blocks, cfg)
    assert torch.equal(torch.isinf(pooled), torch.isinf(pooled_ref))
    finite = torch.isfinite(pooled_ref)
    torch.testing.assert_close(pooled[finite], pooled_ref[finite], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("threshold", [True, False], ids=["threshold", "argmax"])
@pytest.mark.parametrize("mode", ["nosa", "infllmv2", "dma"])
@pytest.mark.parametrize("agnostic", ["none", "per_query", "shared"])
def test_select_blocks_exact_with_ties(mode, agnostic, threshold, monkeypatch):
    monkeypatch.setattr(ks, "SELECT_BY_THRESHOLD", threshold)
    cfg = _cfg(mode, topk_blocks=7, window_blocks=2)
    batch, tq, h, nb = 2, 30, 2, 12
    positions = torch.arange(96 - tq, 96)
    # Scores on a coarse grid force many exact ties, negative ones and -0.0 (equal to +0.0); some -inf
    # scores (blocks with no complete window).
    qa = torch.randint(-2, 3, (batch, tq, h, nb)).float()
    qa[..., 3] = -0.0
    qa[..., 5] = float("-inf")
    ag = None
    if agnostic == "per_query":
        ag = torch.randint(0, 3, (batch, tq, h, nb)).float()
    elif agnostic == "shared":
        ag = torch.randint(0, 3, (batch, 1, h, nb)).float()
        ag[..., 2] = float("-inf")
    got = ks.select_blocks(qa, ag, positions, cfg)
    want = ref.select_blocks(qa, ag, positions, cfg)
    assert got.dtype == torch.int32
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["nosa", "infllmv2", "dma"])
def test_select_for_queries_and_pipeline_exact(mode):
    cfg = _cfg(mode)
    tk, tq, hq, h, d = 70, 45, 8, 2, 64
    q, k = torch.randn(1, tq, hq, d), torch.randn(1, tk, h, d)
    ev = torch.randn(1, tk, h)
    positions = torch.arange(tk - tq, tk)
    num_blocks = -(-tk // cfg.block_size)
    ck = ref.compress_keys(k, cfg.compress_kernel, cfg.compress_stride)
    ag = ref.agnostic_chunk_scores(ev, cfg.compress_kernel, cfg.compress_stride) if cfg.uses_eviction_head else None
    got = ks.select_for_queries(q, ck, ag, positions, num_blocks, cfg)
    assert torch.equal(got, ref.select_for_queries(q, ck, ag, positions, num_blocks, cfg))
    # The pipeline, chunked over queries by a tiny scratch budget, selects the same blocks.
    indices = kp.select_all(q, k, ev if cfg.uses_eviction_head else None, positions, cfg, max_chunk_elements=20 * h * num_blocks)
    assert torch.equal(indices, got)


def test_select_blocks_dense_when_few_blocks():
    """A query that sees at most topk blocks selects all of them."""
    cfg = _cfg(topk_blocks=6)
    positions = torch.arange(40)
    qa = torch.randn(1, 40, 1, 5)
    got = ks.select_blocks(qa, torch.randn(1, 1, 1, 5), positions, cfg)
    own = positions // 8
    for t in range(40):
        assert got[0, t, 0].tolist() == list(range(int(own[t]) + 1)) + [-1] * (6 - int(own[t]) - 1)
