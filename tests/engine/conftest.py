"""Tiny-model tests run many small ops: one intra-op thread avoids OpenMP wake-up costs
that made them ~10x slower on a busy 2-core machine. Restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
