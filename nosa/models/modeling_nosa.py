"""NosaForCausalLM: a Llama-architecture causal LM whose attention is NOSA (or one of its baselines).

Parameter names follow transformers' LlamaForCausalLM, plus `self_attn.eviction.{delta,A}` in the
dma/nosa modes, so dense Llama checkpoints load into it directly (see `from_llama`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from nosa.config import NosaConfig
from nosa.models.convert import copy_llama_weights, load_llama, nosa_config_from_llama
from nosa.layers import AttentionBackend, EvictionHead, NosaAttention, RMSNorm, RotaryEmbedding, SequenceSpans, SwiGLU
from nosa.models.cache import NosaCache
from nosa.models.decode_step import DecodeStep

# transformers renamed the cache argument and output field from `past_key_values` to `cache` during 5.x;
# accept and return whichever this installed version uses.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class NosaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NosaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = NosaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, hidden, cos, sin, spans, cache=None):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, spans, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class NosaPreTrainedModel(PreTrainedModel):
    config_class = NosaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NosaDecoderLayer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained; a local directory's files are checked first so a missing or
        damaged one is named with what to do (nosa.models.loading)."""
        from nosa.models.loading import checked_from_pretrained

        parent = super()
        return checked_from_pretrained(pretrained_model_name_or_path,
                                       lambda: parent.from_pretrained(pretrained_model_name_or_path, *args, **kwargs))

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, EvictionHead):
            init.normal_(module.delta.weight, mean=0.0, std=self.config.eviction_init_std)
            init.zeros_(module.delta.bias)
            init.zeros_(module.A)
        elif isinstance(module, nn.Linear):
            if getattr(module, "_is_eviction_delta", False):
                return  # initialised with its EvictionHead
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class NosaModel(NosaPreTrainedModel):
    def __init__(self, config: NosaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NosaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_type, config.rope_llama3_scaling)
        for layer in self.layers:
            if layer.self_attn.eviction is not None:
                layer.self_attn.eviction.delta._is_eviction_delta = True
        # NosaCache's decode step: its pooled workspaces and CUDA graphs (nosa/models/decode_step.py).
        self.decode_step = DecodeStep()
        self.post_init()

    def check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past_length: int) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
                raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be 2-D [batch, tokens], got shape {tuple(input_ids.shape)}")
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={self.config.vocab_size}); got values in "
                    f"[{int(input_ids.min())}, {int(input_ids.max())}]"
                )
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if length == 0:
            raise ValueError("the input holds no tokens")
        total = past_length + length
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {total} tokens exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
                raise ValueError(
                    f"attention_mask must be [batch={batch}, past + new tokens={total}], got shape {tuple(attention_mask.shape)}"
                )
            if attention_mask.shape[1] != total:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens but past + new tokens = {total}"
                )
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != length
                                         or position_ids.shape[0] not in (1, batch)):
            raise ValueError(
                f"position_ids must be [batch={batch} (or 1), new tokens={length}], got shape {tuple(position_ids.shape)}"
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> BaseModelOutputWithPast:
        if getattr(cache, "keeps_nosa_state", False):
            cache.bind(self)
        past_length = cache.get_seq_length() if cache is not None else 0
        self.check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_length)
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, num_queries = hidden.shape[:2]
        total = past_length + num_queries
        if attention_mask is None:
            spans = SequenceSpans.full(batch, total)
        else:
            spans = SequenceSpans.from_attention_mask(attention_mask)
        if position_ids is None:
            position_ids = spans.position_ids(num_queries, hidden.device)
        cos, sin = self.rotary_emb(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, spans, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), **{_CACHE_FIELD: cache})

    def forward_with_attention(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        """The decoder layers with their attention in `attention` (an engine's): input_ids, position_ids
        [B, T] -> the last layer's hidden states [B, T, hidden], before the final norm. No input checks and
        no host syncs (the engine validates requests up front and graph-captures its decode step)."""
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, None, attention)
        return hidden


class NosaForCausalLM(NosaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NosaConfig):
        super().__init__(config)
        self.model = NosaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() decodes with a NosaCache (incremental NOSA state, one token's work per step) unless the
        caller passed a cache or asked for a cache_implementation; transformers would build a DynamicCache,
        whose every step re-runs compression and selection over the whole cache."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation in (None, "dynamic"):
            for key in ("cache", "past_key_values"):
                cache = model_kwargs.get(key)
                if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and cache.get_seq_length() == 0:
                    # Sized for the whole call (prompt + max_new_tokens): one workspace, one graph.
                    model_kwargs[key] = NosaCache(self.config, capacity=generation_config.max_length)
        return result

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] (the last `logits_to_keep` positions when > 0) and, with labels [B, T],
        the mean next-token cross-entropy over labels != -100."""
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if getattr(cache, "keeps_nosa_state", False) and use_cache and labels is None and inputs_embeds is None:
            # One new token for every row after a prompt (generate's decode step): NosaCache runs the whole
            # step from its state, graph-captured on CUDA; None when this forward is anything else.
            cache.bind(self.model)
            logits = cache.decode(self, input_ids, attention_mask, position_ids)
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: cache})
        outputs = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head of `NosaModel.forward_with_attention`'s hidden states -> float32 logits."""
        return self.lm_head(self.model.norm(hidden)).float()

    @classmethod
    def from_llama(cls, llama_model_or_path, **overrides) -> "NosaForCausalLM":
        """A NosaForCausalLM holding the Llama weights (copied), with A = 0 and a small random `delta`.

        `llama_model_or_path`: a transformers LlamaForCausalLM, or a path/name that
        `LlamaForCausalLM.from_pretrained` loads. With A = 0 the converted model computes the dense model's
        function in attn_mode='dense', and in the sparse modes whenever a query sees <= topk_blocks blocks.
        """
        llama = load_llama(llama_model_or_path)
        parameter = next(llama.parameters())
        model = cls(nosa_config_from_llama(llama.config, **overrides)).to(parameter.dtype)
        copy_llama_weights(model, llama)
        return model.to(parameter.device)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from logits[:, t]; -100 labels are ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)
