"""Conversion of dense transformers LlamaForCausalLM checkpoints into NosaForCausalLM: the config mapping and
the weight copy (`NosaForCausalLM.from_llama` puts them together; this module needs no model class)."""

from __future__ import annotations

import os


from nosa.config import NosaConfig


def nosa_config_from_llama(llama_config, **overrides) -> NosaConfig:
    """The NosaConfig with the Llama model's shape; `overrides` set any NosaConfig field."""
    if getattr(llama_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"only SwiGLU (hidden_act='silu') Llama models convert, got {llama_config.hidden_act!r}")
    rope = dict(getattr(llama_config, "rope_parameters", None) or {})
    legacy_scaling = getattr(llama_config, "rope_scaling", None)  # transformers 4.x field
    if legacy_scaling:
        rope.update(legacy_scaling)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", getattr(llama_config, "rope_theta", 10000.0))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"Llama rope_type {rope_type!r} is not supported; supported: 'default', 'llama3'")
    llama3 = None
    if rope_type == "llama3":
        llama3 = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    fields = dict(
        vocab_size=llama_config.vocab_size,
        hidden_size=llama_config.hidden_size,
        intermediate_size=llama_config.intermediate_size,
        num_hidden_layers=llama_config.num_hidden_layers,
        num_attention_heads=llama_config.num_attention_heads,
        num_key_value_heads=llama_config.num_key_value_heads or llama_config.num_attention_heads,
        head_dim=getattr(llama_config, "head_dim", None) or llama_config.hidden_size // llama_config.num_attention_heads,
        max_position_embeddings=llama_config.max_position_embeddings,
        rms_norm_eps=llama_config.rms_norm_eps,
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_llama3_scaling=llama3,
        attention_bias=bool(getattr(llama_config, "attention_bias", False)),
        mlp_bias=bool(getattr(llama_config, "mlp_bias", False)),
        initializer_range=getattr(llama_config, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(llama_config, "tie_word_embeddings", False)),
        pad_token_id=getattr(llama_config, "pad_token_id", None),
        bos_token_id=getattr(llama_config, "bos_token_id", None),
        eos_token_id=getattr(llama_config, "eos_token_id", None),
    )
    unknown = sorted(set(overrides) - set(NosaConfig().to_dict()) - set(fields))
    if unknown:
        raise ValueError(f"unknown NosaConfig fields in overrides: {unknown}")
    fields.update(overrides)
    return NosaConfig(**fields)


def load_llama(llama_model_or_path):
    """A transformers LlamaForCausalLM, or a path/name that `LlamaForCausalLM.from_pretrained` loads -> the model."""
    from transformers import LlamaForCausalLM

    if isinstance(llama_model_or_path, (str, os.PathLike)):
        return LlamaForCausalLM.from_pretrained(llama_model_or_path)
    if isinstance(llama_model_or_path, LlamaForCausalLM):
        return llama_model_or_path
    raise ValueError(
        f"from_llama takes a LlamaForCausalLM or a path to one, got {type(llama_model_or_path).__name__}"
    )


def copy_llama_weights(model, llama) -> None:
    """Load the Llama weights into a NOSA model of the converted config (everything but the eviction
    heads, which keep their init: A = 0, small random `delta`)."""
    config = model.config
    state = {k: v for k, v in llama.state_dict().items() if "rotary_emb" not in k}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if ".eviction." not in k and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Llama weights do not match the NOSA model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
