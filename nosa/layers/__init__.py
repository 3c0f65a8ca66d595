from nosa.layers.attention import NosaAttention, SequenceSpans
from nosa.layers.eviction import EvictionHead
from nosa.layers.llama import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary

__all__ = ["NosaAttention", "SequenceSpans", "EvictionHead", "RMSNorm", "RotaryEmbedding", "SwiGLU", "apply_rotary"]
