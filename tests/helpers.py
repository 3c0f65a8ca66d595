"""Small models and configs shared by the tests."""

from __future__ import annotations

import torch

from nosa import NosaConfig, NosaForCausalLM

# Tiny sparse geometry: many block and window boundaries within ~100 tokens.
TINY_SPARSE = dict(block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=2, query_blocks=2, compress_kernel=8, compress_stride=4)


def tiny_config(attn_mode: str = "nosa", **overrides) -> NosaConfig:
    fields = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_mode=attn_mode, **TINY_SPARSE,
    )
    fields.update(overrides)
    return NosaConfig(**fields)


def tiny_model(attn_mode: str = "nosa", randomize_eviction: bool = True, seed: int = 0, **overrides) -> NosaForCausalLM:
    """A random tiny model; with randomize_eviction, A and delta are non-trivial so agnostic scores matter."""
    torch.manual_seed(seed)
    model = NosaForCausalLM(tiny_config(attn_mode, **overrides)).eval()
    if randomize_eviction:
        with torch.no_grad():
            for layer in model.model.layers:
                head = layer.self_attn.eviction
                if head is not None:
                    head.A.normal_(0.0, 1.0)
                    head.delta.weight.normal_(0.0, 0.5)
    return model


def cli_error(argv: list[str], capsys) -> str:
    """Run `nosa ARGV` in-process and check it failed the way a user error must: exit code 2, no
    traceback, the message alone on stderr. Returns that message."""
    from nosa.cli import main

    capsys.readouterr()  # drop what earlier calls printed
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err and err.strip(), err
    return err
