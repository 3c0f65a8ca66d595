"""How many SMs a launch that splits its work for occupancy sizes itself for (decode attention's slot
chunks, the split path's key chunks): the device's count, or a share of it while the caller runs beside
other work on another stream (`launch_share`; the decode step's micro-batches, `ModelRunner`).

Why a share: each of those launches aims at a few programs per SM. Two micro-batches on two streams that
each size their launches for the whole GPU queue twice the programs a single batch would, and the loading
attention's programs hold their SMs while they wait on PCIe, so the other stream's matmuls wait for SMs.
Sized for 1/N of the SMs each, N micro-batches together launch what one batch would.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch

_state = threading.local()


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device, off_cuda: int) -> int:
    """The SMs of a CUDA `device`; `off_cuda` elsewhere (the interpreter: a caller's fixed stand-in)."""
    if device.type != "cuda":
        return off_cuda
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device, off_cuda: int) -> int:
    """`device_sm_count` times the current `launch_share`, at least 1."""
    return max(1, int(device_sm_count(device, off_cuda) * current_share()))


def current_share() -> float:
    """The share of the SMs launches on this thread size themselves for (1.0 outside `launch_share`)."""
    return getattr(_state, "share", 1.0)


@contextlib.contextmanager
def launch_share(fraction: float):
    """Within the block, occupancy-sized launches of this thread aim at `fraction` (0 < fraction <= 1) of
    the SMs. The launch sizes are chosen when the launch is issued, so a CUDA graph captured inside keeps them."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"launch_share takes a fraction in (0, 1], got {fraction!r}")
    before = current_share()
    _state.share = float(fraction)
    try:
        yield
    finally:
        _state.share = before
