"""Shared test setup: small thread count (CI machines have 2 cores) and a fixed seed per test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
