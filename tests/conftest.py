"""Shared test setup: the Triton interpreter on machines without a GPU, and the `gpu` marker."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: kernels then run on the CPU through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
