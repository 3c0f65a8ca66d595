"""Semantics pinned by equalities: dense == transformers' Llama; sparse with everything selected == dense."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nosa import NosaForCausalLM


def _llama(**extra):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, **extra,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "tie_word_embeddings": True}])
def test_dense_mode_equals_transformers_llama(extra):
    llama = _llama(**extra)
    model = NosaForCausalLM.from_llama(llama, attn_mode="dense").eval()
    ids = torch.randint(0, 101, (2, 150))
    with torch.no_grad():
        expected = llama(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_converts_exactly():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    llama = _llama(rope_parameters=rope)
    model = NosaForCausalLM.from_llama(llama, attn_mode="dense").eval()
    ids = torch.randint(0, 101, (1, 300))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_mode", ["nosa", "dma", "infllmv2"])
def test_sparse_with_all_blocks_and_zero_A_equals_dense(attn_mode):
    llama = _llama()
    ids = torch.randint(0, 101, (2, 203))  # 203 tokens = 12.7 blocks of 16 < topk_blocks
    geometry = dict(block_size=16, topk_blocks=16, sink_blocks=1, window_blocks=2, query_blocks=3,
                    compress_kernel=16, compress_stride=8)
    dense = NosaForCausalLM.from_llama(llama, attn_mode="dense").eval()
    sparse = NosaForCausalLM.from_llama(llama, attn_mode=attn_mode, **geometry).eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_sparse_selection_really_changes_the_function():
    # The converse guard: with fewer slots than blocks the output must differ from dense.
    llama = _llama()
    ids = torch.randint(0, 101, (1, 203))
    sparse = NosaForCausalLM.from_llama(llama, attn_mode="nosa", block_size=8, topk_blocks=6, window_blocks=2,
                                        query_blocks=2, compress_kernel=8, compress_stride=4).eval()
    with torch.no_grad():
        assert (sparse(ids).logits - llama(ids).logits).abs().max() > 1e-3


def test_from_llama_initialises_eviction_head_as_spec_says():
    model = NosaForCausalLM.from_llama(_llama(), attn_mode="nosa", block_size=16, topk_blocks=40, query_blocks=3)
    for layer in model.model.layers:
        head = layer.self_attn.eviction
        assert torch.equal(head.A, torch.zeros_like(head.A))
        assert 0 < head.delta.weight.std() < 0.01


def test_from_llama_rejects_unknown_override():
    with pytest.raises(ValueError, match="unknown NosaConfig fields"):
        NosaForCausalLM.from_llama(_llama(), block_sise=16)


@pytest.mark.parametrize("heads,head_dim", [(1, 16), (2, 8), (4, 64)])
def test_equal_value_vectors_get_equal_eviction_scores_whatever_the_batch(heads, head_dim):
    # A repeated token has equal value vectors in layer 0; its scores must be equal bit for bit, computed in a
    # full forward (any row of any length) or alone (the engine's decode step), so score ties stay ties.
    from nosa.layers.eviction import EvictionHead

    head = EvictionHead(heads, head_dim, init_std=0.5)
    with torch.no_grad():
        head.A.normal_(0.0, 2.0)
        head.delta.bias.normal_()
    value = torch.randn(heads, head_dim)
    alone = head(value[None, None])[0, 0]
    for length in (2, 7, 10, 33):
        batch = torch.randn(2, length, heads, head_dim)
        batch[:, length // 2] = value
        batch[1, -1] = value
        scores = head(batch)
        assert torch.equal(scores[0, length // 2], alone) and torch.equal(scores[1, -1], alone), length
    torch.testing.assert_close(alone, head.A * torch.nn.functional.softplus(head.delta(value.reshape(-1))))
