from nosa.layers.attention import AttentionBackend, NosaAttention, SequenceSpans
from nosa.layers.eviction import EvictionHead
from nosa.layers.llama import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary

__all__ = ["AttentionBackend", "NosaAttention", "SequenceSpans", "EvictionHead", "RMSNorm", "RotaryEmbedding", "SwiGLU", "apply_rotary"]
