"""The one dispatch mechanism of `nosa.ops`: Triton kernels on CUDA tensors, the PyTorch reference elsewhere.

Every dispatched op has a reference (`REFERENCES`: the model's ops in `nosa.ops.reference`, the decode
step's cache ops in `nosa.ops.block_ops`) and may have a kernel with the same contract, listed by
`nosa.ops.kernels.KERNELS` (read on first use, so importing `nosa.ops` needs no Triton) or added with
`register_kernel`. `use_backend("reference" | "triton" | "auto")` overrides the choice for every op, or
for the ops named in `only` (e.g. the Triton cache ops under the reference attention: the tests compare
paths that way).

'auto' takes the kernel when any tensor argument is on CUDA. A pinned host tensor counts as host: the
kernels read it through unified virtual addressing, and a device tensor beside it decides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import torch

from nosa.ops import block_ops, reference

BACKENDS = ("auto", "reference", "triton")

REFERENCES: dict[str, object] = {
    name: getattr(reference, name) for name in (
        "compress_keys", "agnostic_chunk_scores", "query_aware_chunk_scores", "pool_to_blocks",
        "query_aware_block_scores", "select_blocks", "select_for_queries", "sparse_attention", "nosa_attention",
        "decode_attention", "eviction_scores", "rms_norm", "apply_rotary",
    )
}
REFERENCES.update({name: getattr(block_ops, name) for name in block_ops.DISPATCHED})

_KERNELS: dict[str, object] = {}
_state = threading.local()
_loaded = False


def register_kernel(name: str, fn) -> None:
    if name not in REFERENCES:
        raise ValueError(f"no reference op named {name!r} to register a kernel for")
    _KERNELS[name] = fn


def _overrides() -> dict[str, str]:
    return getattr(_state, "overrides", {})


def current_backend(name: str | None = None) -> str:
    """The backend in force (for op `name`, when given: a per-op override wins)."""
    if name is not None and name in _overrides():
        return _overrides()[name]
    return getattr(_state, "backend", os.environ.get("NOSA_BACKEND", "auto"))


@contextlib.contextmanager
def use_backend(backend: str, only=None):
    """Force a backend inside a `with` block: 'reference', 'triton' (error if unavailable) or 'auto'; for
    every op, or for the op names in `only`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if only is None:
        previous = current_backend()
        _state.backend = backend
        try:
            yield
        finally:
            _state.backend = previous
        return
    unknown = sorted(set(only) - set(REFERENCES))
    if unknown:
        raise ValueError(f"use_backend(only=...): no ops named {unknown}")
    previous = _overrides()
    _state.overrides = {**previous, **{name: backend for name in only}}
    try:
        yield
    finally:
        _state.overrides = previous


def _on_cuda(args) -> bool:
    for a in args:
        if dataclasses.is_dataclass(a) and not isinstance(a, type):  # the cache ops' named tensor groups
            if _on_cuda([getattr(a, f.name) for f in dataclasses.fields(a)]):
                return True
        elif getattr(a, "is_cuda", False):
            return True
    return False


def resolve(name: str, *tensors):
    """The implementation of op `name` for these tensors under the current backend."""
    if name not in REFERENCES:
        raise ValueError(f"no op named {name!r}")
    backend = current_backend(name)
    if backend not in BACKENDS:
        raise ValueError(f"NOSA_BACKEND must be one of {BACKENDS}, got {backend!r}")
    _load_kernels()
    if backend == "triton":
        if name not in _KERNELS:
            raise RuntimeError(f"no Triton kernel is available for {name!r} (is triton installed?)")
        return _KERNELS[name]
    if backend == "auto" and name in _KERNELS and _on_cuda(tensors):
        return _KERNELS[name]
    return REFERENCES[name]


def _load_kernels() -> None:
    """Read the Triton kernels once. Missing Triton leaves the references."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    try:
        from nosa.ops.kernels import KERNELS
    except ImportError:
        return
    for name, fn in KERNELS.items():
        _KERNELS.setdefault(name, fn)


def dispatched(name: str):
    """A callable that runs op `name` on the implementation `resolve` picks for its arguments."""
    reference_fn = REFERENCES[name]

    def op(*args, **kwargs):
        return resolve(name, *args, *kwargs.values())(*args, **kwargs)

    op.__name__ = name
    op.__doc__ = reference_fn.__doc__
    return op


def dispatched_without_grad(name: str):
    """Op `name` dispatched as `dispatched` does when autograd records nothing, and the reference itself
    when it must (grad enabled and a tensor argument requires grad): the kernels of these ops have no
    backward, so training keeps the autograd reference while inference (the engine, generate, evaluation)
    takes the kernel on CUDA."""
    reference_fn, op = REFERENCES[name], dispatched(name)

    def inference_op(*args):
        if torch.is_grad_enabled() and any(getattr(a, "requires_grad", False) for a in args):
            return reference_fn(*args)
        return op(*args)

    inference_op.__name__ = name
    inference_op.__doc__ = reference_fn.__doc__
    return inference_op
