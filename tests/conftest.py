"""Shared test fixtures and the one tolerance table (STYLE.md: a reason per entry)."""

import os

import pytest
import torch

# Keep the default run deterministic and small on 2-core CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# name -> (atol, rtol, reason)
TOLERANCES = {
    # Bit-exact paths: dequantisation against gguf's numpy oracle, round trips.
    "exact": (0.0, 0.0, "same arithmetic on the same bits"),
}


@pytest.fixture
def single_thread():
    """One intra-op thread, restored after the test: tiny-model tests run many small ops and
    OpenMP wake-up costs made them ~10x slower on a busy 2-core machine (tests/engine and
    tests/model use it for every test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
