"""NOSA: Native and Offloadable Sparse Attention, and NOSI, its offloading inference engine."""

from nosa.config import NosaConfig, SparseAttentionConfig
from nosa.models import NosaForCausalLM, NosaModel

__version__ = "0.1.0"


def __getattr__(name):
    # The engine pulls in more machinery; import it only when asked for.
    if name in ("LLM", "SamplingParams"):
        from nosa import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'nosa' has no attribute {name!r}")


__all__ = ["NosaConfig", "SparseAttentionConfig", "NosaForCausalLM", "NosaModel", "LLM", "SamplingParams"]
