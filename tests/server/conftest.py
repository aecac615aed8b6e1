"""Server test fixtures: an in-process app on the fake engine (server_fake.FakeServer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The helpers beside the tests (server_fake, server_live, server_samples) import by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_fake import FakeServer  # noqa: E402


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
