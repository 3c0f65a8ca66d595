"""Shared test setup: the Triton interpreter on machines without a GPU, the `gpu` and `slow` markers (slow
tests run with --run-slow), hypothesis profiles, and the `one_thread` fixture."""

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


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (each has a cheaper variant that always runs)")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow (a cheaper variant runs without it)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread. Its models are tiny: more threads only oversubscribe a shared 2-core
    CI machine, which made those tests ~8x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
