"""A small fake engine (and the in-process server on it) for protocol-layer tests (STYLE.md allows one per API surface).

It implements exactly the Engine/Session interface the server uses
(docs/INTERFACES.md): `tokenizer` (the real Tokenizer on the tiny synthetic
vocabulary), `new_session()`, `session.sync/tokens/logits/eval`. Logits are
a deterministic function of the history, so sampling runs through the real
sampler; `sync` counts exactly the tokens it had to "prefill", which is what
the server's prefix-reuse tests assert on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from starlette.testclient import TestClient

from dwarfstar.server.app import create_app
from dwarfstar.server.convo import ToolMemory
from dwarfstar.server.options import ServerOptions
from dwarfstar.server.prepare import Preparer
from dwarfstar.server.trace import Trace
from dwarfstar.server.worker import Worker
from dwarfstar.text.tokenizer import Tokenizer
from dwarfstar.text.vocab import tiny_vocab_metadata

VOCAB = 512


class FakeSession:
    def __init__(self, engine: "FakeEngine"):
        self.engine = engine
        self.tokens: list[int] = []
        self.n_prefilled_total = 0

    def sync(self, tokens: list[int], progress=None) -> int:
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            common += 1
        n = len(tokens) - common
        self.tokens = list(tokens)
        self.n_prefilled_total += n
        if progress is not None and n:
            progress(n, n)
        return n

    def logits(self) -> torch.Tensor:
        # A peaked distribution over printable byte tokens chosen from the history,
        # so generations differ per prompt but are reproducible.
        logits = torch.full((VOCAB,), -1e9)
        seed = (sum(self.tokens) * 31 + len(self.tokens)) % 26
        logits[self.engine.letter_ids[seed]] = 5.0
        logits[self.engine.letter_ids[(seed + 1) % 26]] = 4.0
        return logits

    def eval(self, token: int) -> None:
        self.engine.n_evals += 1
        self.tokens.append(token)


class FakeEngine:
    def __init__(self):
        self.tokenizer = Tokenizer.from_metadata(tiny_vocab_metadata(VOCAB))
        self.letter_ids = [self.tokenizer.encode(c)[0] for c in "abcdefghijklmnopqrstuvwxyz"]
        self.n_evals = 0
        self.sessions: list[FakeSession] = []

    def new_session(self) -> FakeSession:
        session = FakeSession(self)
        self.sessions.append(session)
        return session


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
