"""Tiny models for the engine tests: block_size 4, topk 6, kernel/stride 4/2, so a few dozen tokens cross
many block and window boundaries."""

import pytest
import torch

from nosa import NosaConfig, NosaForCausalLM


def tiny_model(mode: str = "nosa", seed: int = 0, dtype=torch.float32, **overrides) -> NosaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, block_size=4, topk_blocks=6, sink_blocks=1,
                  window_blocks=1, query_blocks=2, compress_kernel=4, compress_stride=2, attn_mode=mode,
                  eviction_init_std=0.5, initializer_range=0.2, eos_token_id=258)
    fields.update(overrides)
    model = NosaForCausalLM(NosaConfig(**fields)).eval()
    with torch.no_grad():
        # A = 0 at init would make every eviction score 0 (no bias, all agnostic scores tied): give it
        # values so the bias and the agnostic ranking are exercised.
        for layer in model.model.layers:
            if layer.self_attn.eviction is not None:
                layer.self_attn.eviction.A.normal_(0.0, 2.0)
    return model.to(dtype)


def reference_logits(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The model's full forward on prompt + generated[:-1]: logits [len(generated), V] predicting each
    generated token."""
    ids = torch.tensor(prompt + generated[:-1], device=model.device)[None]
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1 :].float().cpu()


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: one thread avoids oversubscribing a shared 2-core CI machine, which made the
    # suite ~8x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
