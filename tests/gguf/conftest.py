"""Fixtures for the GGUF tests; the builders live in gguf_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_helpers import tiny_model


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """One valid tiny synthetic model, shared read-only by the tests of a session."""
    return tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
