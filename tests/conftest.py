"""Fixtures and settings shared by every test file: threads, dynamo caches, hypothesis profiles."""

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

# Test tensors are tiny: one intra-op thread is fastest, and a second one spin-waits
# against the other pytest worker on the 2-core CI machine (300-step Adam loops on
# small layers measured 25-50x slower with two threads under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Every test starts on one thread, whatever the previous one left behind."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's caches are cleared before and after the test.

    Compiled code objects count against dynamo's per-code recompile limit for the whole
    process otherwise. Use with ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``.
    """
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
