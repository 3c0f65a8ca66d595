"""Shared test setup: the Triton interpreter on machines without a GPU, and the `gpu` marker."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: kernels then run on the CPU through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves
    pass
else:
    # `ci` (default): derandomized, so a run is repeatable and cannot flake; `nightly`
    # (NOSA_HYPOTHESIS_PROFILE=nightly): fresh random cases every run. No deadlines: model cases vary.
    settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("nightly", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    profile = os.environ.get("NOSA_HYPOTHESIS_PROFILE", "ci")
    if profile not in ("ci", "nightly"):
        raise ValueError(f"NOSA_HYPOTHESIS_PROFILE must be 'ci' or 'nightly', got {profile!r}")
    settings.load_profile(profile)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
