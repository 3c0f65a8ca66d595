"""Engine tests run their tiny models (tests.helpers.engine_model) on one thread (tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
