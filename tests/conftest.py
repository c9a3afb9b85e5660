"""Shared test setup: the fixtures folder on the import path, the end-to-end tier marked slow, a
small thread count (CI machines have 2 cores) and a fixed seed per test.

The suite mirrors the package (tests/teachers, tests/methods/dd1, tests/pipeline, ...); shared
helpers live in tests/fixtures/; tests/e2e holds the end-to-end pipeline and server tests, which
`make test-fast` leaves out (`-m "not slow"`) and `make test` runs.
"""

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "fixtures"))


def pytest_collection_modifyitems(config, items):
    e2e = TESTS / "e2e"
    for item in items:
        if e2e in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
