"""Server test fixtures: an in-process app on the fake engine, and the real
`ds4-server` process on a tiny generated GGUF (live tests)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeEngine  # noqa: E402

from dwarfstar.server.app import create_app  # noqa: E402
from dwarfstar.server.convo import ToolMemory  # noqa: E402
from dwarfstar.server.options import ServerOptions  # noqa: E402
from dwarfstar.server.prepare import Preparer  # noqa: E402
from dwarfstar.server.trace import Trace  # noqa: E402
from dwarfstar.server.worker import Worker  # noqa: E402


class FakeServer:
    """App + worker + fake engine in this process, driven by Starlette's TestClient."""

    def __init__(self, tmp_path: Path, **overrides):
        self.options = replace(ServerOptions(ctx=4096, tokens=300, trace=str(tmp_path / "trace.txt")), **overrides)
        self.engine = FakeEngine()
        self.memory = ToolMemory(self.options.tool_memory_max_ids, self.options.exact_dsml_replay)
        self.trace = Trace(self.options.trace)
        self.worker = Worker(self.engine, self.options, self.memory, self.trace)
        self.worker.start()
        app = create_app(self.options, Preparer(self.engine.tokenizer, self.options, self.memory, self.worker),
                         self.worker)
        self.client = TestClient(app, raise_server_exceptions=False)

    @property
    def session(self):
        return self.worker.session

    def close(self):
        self.worker.stop()
        self.trace.close()


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
