"""Engine tests run their tiny models (tests.helpers.engine_model) on one thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: one thread avoids oversubscribing a shared 2-core CI machine, which made the
    # suite ~8x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
