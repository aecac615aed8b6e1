"""Server test fixtures: an in-process app on the fake engine (server_fake.FakeServer), and
the tiny generated GGUF the live tests start real servers on (one per test module)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The helpers beside the tests (server_fake, server_live, server_samples) import by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_fake import FakeServer  # noqa: E402

from dwarfstar.gguf.synth import synthesize  # noqa: E402


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(**overrides) -> FakeServer:
        server = FakeServer(tmp_path, **overrides)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("model") / "tiny.gguf", layers=1)
