"""Shared fixture for the CLI tests: the real tokenizer on the synthetic vocabulary
(dwarfstar.text.vocab), so text <-> id conversions in the CLI tests are genuine."""

import pytest
import torch

from dwarfstar.text import vocab
from dwarfstar.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.from_metadata(vocab.tiny_vocab_metadata(512))


@pytest.fixture
def one_thread():
    """One torch thread for in-process tiny-model work: CI's two cores are shared with
    ds4 child processes and other tests, and an oversubscribed pool is ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
