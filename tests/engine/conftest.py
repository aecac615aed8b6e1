"""Tiny-model tests: every test here runs on one intra-op thread (tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield
