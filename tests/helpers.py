"""Small models and configs shared by the tests: one `tiny_model`, with two geometries.

"model" (the default): block 8, kernel/stride 8/4, for the model and ops tests. "engine" (`engine_model`):
block 4, topk 6, kernel/stride 4/2, so a few dozen decoded tokens cross many block and window boundaries.
Both randomise the eviction head (A = 0 at init would make every eviction score 0: no bias, every agnostic
score tied), so the bias and the agnostic ranking are exercised.
"""

from __future__ import annotations

import torch

from nosa import NosaConfig, NosaForCausalLM

# Tiny sparse geometry: many block and window boundaries within ~100 tokens.
TINY_SPARSE = dict(block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=2, query_blocks=2, compress_kernel=8, compress_stride=4)

PRESETS = {
    # config fields, std of the eviction head's A, std of its delta weights (None: keep the init)
    "model": (dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, **TINY_SPARSE), 1.0, 0.5),
    "engine": (dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, block_size=4, topk_blocks=6, sink_blocks=1,
                    window_blocks=1, query_blocks=2, compress_kernel=4, compress_stride=2, eviction_init_std=0.5,
                    initializer_range=0.2, eos_token_id=258), 2.0, None),
}


def tiny_config(attn_mode: str = "nosa", preset: str = "model", **overrides) -> NosaConfig:
    fields = dict(PRESETS[preset][0], attn_mode=attn_mode)
    fields.update(overrides)
    return NosaConfig(**fields)


def tiny_model(attn_mode: str = "nosa", randomize_eviction: bool = True, seed: int = 0, dtype=torch.float32,
               preset: str = "model", **overrides) -> NosaForCausalLM:
    """A random tiny model in eval mode; with randomize_eviction, A (and, in the model preset, delta) are
    non-trivial so agnostic scores matter."""
    torch.manual_seed(seed)
    model = NosaForCausalLM(tiny_config(attn_mode, preset, **overrides)).eval()
    _, a_std, delta_std = PRESETS[preset]
    if randomize_eviction:
        with torch.no_grad():
            for layer in model.model.layers:
                head = layer.self_attn.eviction
                if head is not None:
                    head.A.normal_(0.0, a_std)
                    if delta_std is not None:
                        head.delta.weight.normal_(0.0, delta_std)
    return model.to(dtype)


def engine_model(mode: str = "nosa", seed: int = 0, dtype=torch.float32, **overrides) -> NosaForCausalLM:
    """`tiny_model` in the engine geometry."""
    return tiny_model(mode, seed=seed, dtype=dtype, preset="engine", **overrides)


def reference_logits(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The model's full forward on prompt + generated[:-1]: logits [len(generated), V] predicting each
    generated token."""
    ids = torch.tensor(prompt + generated[:-1], device=model.device)[None]
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1 :].float().cpu()
