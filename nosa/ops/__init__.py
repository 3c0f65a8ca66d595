"""NOSA ops with backend dispatch: Triton kernels on CUDA tensors, the PyTorch reference elsewhere.

Every public op here has the signature of its namesake in `nosa.ops.reference`. A Triton implementation is
registered with `register_kernel(name, fn)`; `use_backend("reference" | "triton" | "auto")` overrides
the choice (tests compare both paths).
"""

from __future__ import annotations

import contextlib
import os
import threading

from nosa.ops import reference

BACKENDS = ("auto", "reference", "triton")
_KERNELS: dict[str, object] = {}
_state = threading.local()


def register_kernel(name: str, fn) -> None:
    if not hasattr(reference, name):
        raise ValueError(f"no reference op named {name!r} to register a kernel for")
    _KERNELS[name] = fn


def current_backend() -> str:
    return getattr(_state, "backend", os.environ.get("NOSA_BACKEND", "auto"))


@contextlib.contextmanager
def use_backend(backend: str):
    """Force a backend inside a `with` block: 'reference', 'triton' (error if unavailable) or 'auto'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    previous = current_backend()
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = previous


def _on_cuda(args) -> bool:
    return any(getattr(a, "is_cuda", False) for a in args)


def resolve(name: str, *tensors):
    """The implementation of op `name` for these tensors under the current backend."""
    backend = current_backend()
    if backend not in BACKENDS:
        raise ValueError(f"NOSA_BACKEND must be one of {BACKENDS}, got {backend!r}")
    _load_kernels()
    if backend == "triton":
        if name not in _KERNELS:
            raise RuntimeError(f"no Triton kernel is available for {name!r} (is triton installed?)")
        return _KERNELS[name]
    if backend == "auto" and name in _KERNELS and _on_cuda(tensors):
        return _KERNELS[name]
    return getattr(reference, name)


_loaded = False


def _load_kernels() -> None:
    """Import the Triton kernel modules once; each registers itself. Missing Triton leaves the reference."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    try:
        from nosa.ops import kernels  # noqa: F401  (registers its kernels on import)
    except ImportError:
        return


def _dispatched(name: str):
    def op(*args, **kwargs):
        return resolve(name, *args, *kwargs.values())(*args, **kwargs)

    op.__name__ = name
    op.__doc__ = getattr(reference, name).__doc__
    return op


compress_keys = _dispatched("compress_keys")
agnostic_chunk_scores = _dispatched("agnostic_chunk_scores")
query_aware_chunk_scores = _dispatched("query_aware_chunk_scores")
pool_to_blocks = _dispatched("pool_to_blocks")
query_aware_block_scores = _dispatched("query_aware_block_scores")
select_blocks = _dispatched("select_blocks")
select_for_queries = _dispatched("select_for_queries")
sparse_attention = _dispatched("sparse_attention")
nosa_attention = _dispatched("nosa_attention")
decode_attention = _dispatched("decode_attention")

__all__ = [
    "BACKENDS", "register_kernel", "use_backend", "current_backend", "resolve", "reference",
    "compress_keys", "agnostic_chunk_scores", "query_aware_chunk_scores", "pool_to_blocks", "query_aware_block_scores", "select_blocks",
    "select_for_queries", "sparse_attention", "nosa_attention", "decode_attention",
]
