"""Model shapes the serving benchmarks build with random weights, saved beside the byte tokenizer so the
engine, `model.generate` and `nosa serve` all load the same directory."""

from __future__ import annotations

import torch

from nosa import NosaConfig, NosaForCausalLM
from nosa.tokenizer import ByteTokenizer

SHAPES = {
    # The demo's model (nosa/demo.py): the one whose transformers `generate` ran at 7.2 tokens/s on an H200.
    "demo": dict(vocab_size=264, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=8192, block_size=16, topk_blocks=8, sink_blocks=1,
                 window_blocks=2, query_blocks=2, compress_kernel=16, compress_stride=8),
    # A ~0.2B-parameter shape with the paper's sparse geometry (64-token blocks, 16 of them attended).
    "small": dict(vocab_size=264, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, max_position_embeddings=16384, block_size=64, topk_blocks=16, sink_blocks=1,
                  window_blocks=4, query_blocks=4, compress_kernel=32, compress_stride=16),
    # For CPU dry runs and tests.
    "tiny": dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, block_size=8, topk_blocks=6, sink_blocks=1,
                 window_blocks=2, query_blocks=2, compress_kernel=8, compress_stride=4),
}


def build_model(shape: str, attn_mode: str = "nosa", seed: int = 0) -> NosaForCausalLM:
    """Random weights of a named shape; the eviction heads get non-zero A so the agnostic scores matter."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    tokenizer = ByteTokenizer()
    torch.manual_seed(seed)
    config = NosaConfig(attn_mode=attn_mode, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    model = NosaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.self_attn.eviction is not None:
                layer.self_attn.eviction.A.normal_(0.0, 1.0)
    return model


def save_model(model: NosaForCausalLM, directory: str) -> str:
    model.save_pretrained(directory)
    ByteTokenizer().save_pretrained(directory)
    return directory
