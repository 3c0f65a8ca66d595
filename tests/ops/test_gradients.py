"""Gradients: finite-difference check of the sparse attention, and gradients reaching the eviction head."""

import pytest
import torch

from nosa.config import SparseAttentionConfig
from nosa.ops import reference as ref
from tests.helpers import tiny_model


def test_sparse_attention_gradcheck_float64():
    cfg = SparseAttentionConfig(block_size=4, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                                compress_kernel=4, compress_stride=2)
    T, Hq, H, D = 23, 4, 2, 4
    q = torch.randn(1, T, Hq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, T, H, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, T, H, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, T, H, dtype=torch.float64, requires_grad=True)
    positions = torch.arange(T)
    indices = ref.select_for_queries(q, ref.compress_keys(k, 4, 2), ref.agnostic_chunk_scores(bias, 4, 2), positions, 6, cfg)
    assert int((indices[0, -1, 0] >= 0).sum()) == 4  # the last query sees 6 blocks and attends to 4

    def attention(q, k, v, bias):
        return ref.sparse_attention(q, k, v, bias, indices, positions, cfg.block_size)

    assert torch.autograd.gradcheck(attention, (q, k, v, bias), eps=1e-6, atol=1e-5)


def test_nosa_attention_chunked_backward_equals_unchunked():
    cfg = SparseAttentionConfig(block_size=4, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                                compress_kernel=4, compress_stride=2)
    inputs = [torch.randn(2, 37, 4, 8), torch.randn(2, 37, 2, 8), torch.randn(2, 37, 2, 8), torch.randn(2, 37, 2)]
    grads = []
    for max_elements in (1 << 20, 700):  # one chunk, then chunks of a few queries with recomputation
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = ref.nosa_attention(*leaves, cfg, max_chunk_elements=max_elements)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn_mode", ["dma", "nosa"])
def test_gradients_reach_eviction_head(attn_mode):
    model = tiny_model(attn_mode).train()
    ids = torch.randint(0, 97, (2, 90))
    loss = model(ids, labels=ids).loss
    loss.backward()
    for layer in model.model.layers:
        head = layer.self_attn.eviction
        for name, param in (("A", head.A), ("delta.weight", head.delta.weight)):
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().max() > 0, name


def test_eviction_head_at_init_gets_gradient_through_A_only():
    # A = 0 at init: c = 0 so delta receives no gradient yet, but A does (the bias is A * softplus(delta v)).
    model = tiny_model("nosa", randomize_eviction=False).train()
    ids = torch.randint(0, 97, (1, 90))
    model(ids, labels=ids).loss.backward()
    head = model.model.layers[0].self_attn.eviction
    assert head.A.grad.abs().max() > 0
    assert head.delta.weight.grad.abs().max() == 0


def test_selection_takes_no_gradient():
    # Selection runs under no_grad and returns integer indices: no gradient can flow through it.
    cfg = SparseAttentionConfig(block_size=4, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                                compress_kernel=4, compress_stride=2)
    q = torch.randn(1, 20, 2, 4, requires_grad=True)
    k = torch.randn(1, 20, 1, 4, requires_grad=True)
    indices = ref.select_for_queries(q, ref.compress_keys(k, 4, 2), None, torch.arange(20), 5, cfg)
    assert not indices.requires_grad and indices.dtype == torch.int32
