"""Configuration: the sparse-attention parameters (spec sec. 2) and the Llama-shaped model config.

`SparseAttentionConfig` is the frozen, validated view the ops consume; `NosaConfig` is the transformers
`PretrainedConfig` saved beside the weights. Every invalid combination raises `ValueError` naming the
field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import warnings
from dataclasses import dataclass

from transformers import PretrainedConfig

ATTN_MODES = ("dense", "infllmv2", "dma", "nosa")
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


_WARNED_GEOMETRIES: set = set()


def _warn_no_locality_bound(cfg: "SparseAttentionConfig") -> None:
    """Once per geometry and process: configs are rebuilt often (NosaConfig.sparse makes a new one)."""
    key = dataclasses.astuple(cfg)
    if key in _WARNED_GEOMETRIES:
        return
    _WARNED_GEOMETRIES.add(key)
    j = cfg.locality_counterexample
    warnings.warn(
        f"this {cfg.attn_mode} geometry has no locality bound (spec sec. 5): with block_size={cfg.block_size}, "
        f"window_blocks={cfg.window_blocks}, compress_kernel={cfg.compress_kernel}, compress_stride={cfg.compress_stride}, "
        f"the last compression window overlapping block {j} ends after block {j} has left the forced window, so its "
        f"agnostic score can still change and more than {cfg.query_aware_quota} blocks per step may be newly selected "
        f"(offloading then loads more). The bound needs, for every block j, that window to end at or before the first "
        f"token of block j + 1 + window_blocks; e.g. raise window_blocks or lower compress_kernel - compress_stride.",
        UserWarning, stacklevel=4)


@dataclass(frozen=True)
class SparseAttentionConfig:
    """The selection rule of one attention layer (spec sec. 2 and 4).

    Derived quantities:
      forced_blocks       = sink_blocks + window_blocks + 1 (the query's own block)
      query_aware_quota   = picks made by the query-aware score: `query_blocks` in nosa, every free slot
                            in infllmv2, none in dma
      uses_eviction_head  = dma and nosa carry the learned query-agnostic score and its attention bias
    """

    block_size: int = 64
    topk_blocks: int = 64
    sink_blocks: int = 1
    window_blocks: int = 16
    query_blocks: int = 16
    compress_kernel: int = 32
    compress_stride: int = 16
    attn_mode: str = "nosa"

    def __post_init__(self) -> None:
        if self.attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {self.attn_mode!r}")
        _require_int("block_size", self.block_size, 1)
        _require_int("topk_blocks", self.topk_blocks, 1)
        _require_int("sink_blocks", self.sink_blocks, 0)
        _require_int("window_blocks", self.window_blocks, 0)
        _require_int("query_blocks", self.query_blocks, 0)
        _require_int("compress_kernel", self.compress_kernel, 1)
        _require_int("compress_stride", self.compress_stride, 1)
        if self.compress_stride > self.compress_kernel:
            raise ValueError(
                f"compress_stride ({self.compress_stride}) must be <= compress_kernel ({self.compress_kernel}):"
                " a larger stride leaves tokens that no compressed key covers"
            )
        if self.attn_mode == "dense":
            return
        if self.topk_blocks < self.forced_blocks:
            raise ValueError(
                f"topk_blocks ({self.topk_blocks}) must be >= sink_blocks + window_blocks + 1 "
                f"= {self.forced_blocks}: the forced blocks must fit in the selection"
            )
        if self.attn_mode == "nosa" and self.query_blocks > self.topk_blocks - self.forced_blocks:
            raise ValueError(
                f"query_blocks ({self.query_blocks}) must be <= topk_blocks - sink_blocks - window_blocks - 1 "
                f"= {self.topk_blocks - self.forced_blocks} in attn_mode='nosa' (the agnostic fill cannot be negative)"
            )
        if self.attn_mode in ("nosa", "dma") and not self.has_locality_bound:
            _warn_no_locality_bound(self)

    @property
    def locality_counterexample(self) -> int | None:
        """The first block j whose last overlapping compression window ends after the first token of block
        j + 1 + window_blocks (see `has_locality_bound`), or None when no block does. The condition depends
        on j only through ((j + 1) * block_size) mod compress_stride, so one period of blocks decides it."""
        period = self.compress_stride // math.gcd(self.block_size, self.compress_stride)
        for j in range(period):
            end_of_block = (j + 1) * self.block_size  # first token after block j
            last_start = (end_of_block - 1) // self.compress_stride * self.compress_stride
            last_token = last_start + self.compress_kernel - 1
            if last_token > (j + 1 + self.window_blocks) * self.block_size:
                return j
        return None

    @property
    def has_locality_bound(self) -> bool:
        """Whether spec sec. 5's locality bound holds: while the query stays inside one block, at most
        `query_blocks` (nosa) or 0 (dma) blocks are newly selected per step, one more on the step that
        enters a new block.

        It needs the query-agnostic ranking to be fixed except when a block leaves the forced window, so
        the condition, exactly (spec sec. 5): for every block j, the last compression window overlapping j
        (it starts at the largest multiple of compress_stride below (j + 1) * block_size and ends
        compress_kernel - 1 tokens later) ends at or before the first token of block j + 1 + window_blocks,
        the step at which j leaves the window. When compress_stride divides block_size this reads
        compress_kernel - compress_stride <= window_blocks * block_size + 1. Only nosa and dma have the
        bound; infllmv2 (every free slot query-aware) and dense do not. A nosa/dma geometry without it is a
        valid model whose selection may move more per step (a warning says so when it is built)."""
        return self.attn_mode in ("nosa", "dma") and self.locality_counterexample is None

    @property
    def locality_quota(self) -> int | None:
        """The locality bound's blocks newly needed per (layer, sequence, KV head) and step while the query
        stays inside one block (one more on the step that enters a new block): query_blocks in nosa, 0 in
        dma, None in infllmv2 and dense, which have no bound. Only geometries with `has_locality_bound`
        are held to it."""
        return self.query_aware_quota if self.attn_mode in ("nosa", "dma") else None

    @property
    def forced_blocks(self) -> int:
        return self.sink_blocks + self.window_blocks + 1

    @property
    def query_aware_quota(self) -> int:
        if self.attn_mode == "infllmv2":
            return self.topk_blocks - self.forced_blocks
        if self.attn_mode == "dma":
            return 0
        if self.attn_mode == "nosa":
            return self.query_blocks
        raise ValueError("dense attention selects no blocks")

    @property
    def agnostic_quota(self) -> int:
        return self.topk_blocks - self.forced_blocks - self.query_aware_quota

    @property
    def uses_eviction_head(self) -> bool:
        return self.attn_mode in ("dma", "nosa")

    @property
    def is_sparse(self) -> bool:
        return self.attn_mode != "dense"

    @property
    def selection_tokens(self) -> int:
        """Tokens a query attends to at most: the device footprint of one (sequence, KV head)."""
        return self.topk_blocks * self.block_size


SPARSE_FIELDS = tuple(SparseAttentionConfig.__dataclass_fields__)

# Keyword arguments transformers itself passes to a config's __init__ (from a saved config.json, from
# from_pretrained, or from other versions of the library) besides NosaConfig's own fields. They are
# handed on to PretrainedConfig; anything else is a typo and refused.
TRANSFORMERS_CONFIG_KWARGS = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "name_or_path", "dtype", "torch_dtype",
    "num_labels", "id2label", "label2id", "problem_type", "output_attentions", "output_hidden_states", "return_dict",
    "attn_implementation", "experts_implementation", "per_layer_config", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    "decoder_start_token_id", "sep_token_id", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "torchscript", "pruned_heads", "use_bfloat16", "tf_legacy_loss", "rope_scaling",
    "rope_parameters", "layer_types",
})


def _transformers_kwargs() -> frozenset:
    """The names PretrainedConfig accepts in this transformers version, on top of the fixed list."""
    names = set(TRANSFORMERS_CONFIG_KWARGS)
    if dataclasses.is_dataclass(PretrainedConfig):  # transformers 5: the base config is a dataclass
        names.update(f.name for f in dataclasses.fields(PretrainedConfig))
    names.update(p for p in inspect.signature(PretrainedConfig.__init__).parameters if p not in ("self", "kwargs"))
    try:  # generation settings found in older config.json files; transformers drops them itself
        from transformers import GenerationConfig

        names.update(GenerationConfig._get_default_generation_params())
    except (ImportError, AttributeError):
        pass
    return frozenset(names)


def check_config_kwargs(kwargs: dict, own_fields) -> None:
    """Refuse keyword arguments that are neither NosaConfig fields nor ones transformers passes (names
    starting with '_' are transformers' private keys), suggesting the nearest field."""
    known = _transformers_kwargs()
    unknown = sorted(k for k in kwargs if k not in known and not k.startswith("_"))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(own_fields), n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise ValueError(f"unknown NosaConfig fields: {', '.join(hints)}; NosaConfig accepts: {sorted(own_fields)}")


class NosaConfig(PretrainedConfig):
    """A Llama-architecture causal LM with NOSA attention (or one of its baselines).

    Model shape fields follow transformers' LlamaConfig; sparse fields follow spec sec. 2.
    `rope_type` is 'default' or 'llama3' (then `rope_llama3_scaling` holds factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings). `eviction_init_std` is the std of the eviction head's `delta` weights at init (A starts at 0).
    """

    model_type = "nosa"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 264,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        max_position_embeddings: int = 65536,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_type: str = "default",
        rope_llama3_scaling: dict | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        eviction_init_std: float = 1e-3,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        block_size: int = 64,
        topk_blocks: int = 64,
        sink_blocks: int = 1,
        window_blocks: int = 16,
        query_blocks: int = 16,
        compress_kernel: int = 32,
        compress_stride: int = 16,
        attn_mode: str = "nosa",
        **kwargs,
    ):
        check_config_kwargs(kwargs, NOSA_CONFIG_FIELDS)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else (
            hidden_size // num_attention_heads if isinstance(num_attention_heads, int) and num_attention_heads > 0 else None
        )
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_type = rope_type
        self.rope_llama3_scaling = rope_llama3_scaling
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.eviction_init_std = eviction_init_std
        self.use_cache = use_cache
        self.block_size = block_size
        self.topk_blocks = topk_blocks
        self.sink_blocks = sink_blocks
        self.window_blocks = window_blocks
        self.query_blocks = query_blocks
        self.compress_kernel = compress_kernel
        self.compress_stride = compress_stride
        self.attn_mode = attn_mode
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _require_int(name, getattr(self, name), 1)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU, as in Llama), got {self.hidden_act!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.rope_type == "llama3":
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in (self.rope_llama3_scaling or {})]
            if missing:
                raise ValueError(f"rope_llama3_scaling must give {LLAMA3_ROPE_KEYS} when rope_type='llama3'; missing {missing}")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.eviction_init_std < 0:
            raise ValueError(f"eviction_init_std must be >= 0, got {self.eviction_init_std}")
        self.sparse  # validates the sparse fields

    @property
    def sparse(self) -> SparseAttentionConfig:
        return SparseAttentionConfig(**{name: getattr(self, name) for name in SPARSE_FIELDS})


NOSA_CONFIG_FIELDS = tuple(p for p in inspect.signature(NosaConfig.__init__).parameters if p not in ("self", "kwargs"))
