"""Shared fixture for the CLI tests: the real tokenizer on the synthetic vocabulary
(dwarfstar.text.vocab), so text <-> id conversions in the CLI tests are genuine."""

import pytest

from dwarfstar.text import vocab
from dwarfstar.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.from_metadata(vocab.tiny_vocab_metadata(512))
