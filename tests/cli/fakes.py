"""Fakes for the CLI tests: a scripted session/engine (token ids only).

The fake session implements the Session interface of docs/INTERFACES.md: `sync` records
how many tokens it had to prefill (common-prefix reuse as the real engine does),
`logits()` is one-hot on the token a test-provided script chooses, and
`snapshot()/restore()` copy the token list.
"""

from __future__ import annotations

import torch

from dwarfstar import shape


class FakeSession:
    def __init__(self, engine, ctx: int):
        self.engine = engine
        self.ctx = ctx
        self.tokens: list[int] = []
        self.syncs: list[int] = []
        self.n_evals = 0
        self.report = True

    def sync(self, tokens, progress=None):
        tokens = list(tokens)
        keep = len(self.tokens) if tokens[: len(self.tokens)] == self.tokens else 0
        if keep == 0:
            self.tokens = []
        for pos in range(keep, len(tokens)):
            self.tokens.append(tokens[pos])
            if progress is not None and self.report and (pos + 1 - keep) % 4 == 0:
                progress(pos + 1, len(tokens))
            if self.engine.on_prefill:
                self.engine.on_prefill(self)
        if progress is not None and self.report:
            progress(len(tokens), len(tokens))
        self.syncs.append(len(tokens) - keep)
        return len(tokens) - keep

    def logits(self):
        out = torch.full((self.engine.vocab_size,), -10.0)
        out[self.engine.script(self.tokens)] = 10.0
        return out

    def eval(self, token):
        assert len(self.tokens) < self.ctx, "fake session: context exceeded"
        self.tokens.append(token)
        self.n_evals += 1
        if self.engine.on_eval:
            self.engine.on_eval(self)

    def snapshot(self) -> bytes:
        return bytes(str(self.tokens), "ascii")

    def restore(self, blob: bytes) -> None:
        self.tokens = eval(blob.decode("ascii"))  # our own repr of a list of ints


class FakeEngine:
    """`script(tokens) -> next id`; `on_eval`/`on_prefill(session)` hooks for tests."""

    def __init__(self, tokenizer, script, on_eval=None, on_prefill=None):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.script = script
        self.on_eval = on_eval
        self.on_prefill = on_prefill
        self.sessions: list[FakeSession] = []
        self.config = None

    def new_session(self, ctx: int):
        session = FakeSession(self, ctx)
        self.sessions.append(session)
        return session


def answer_script(tokenizer, answers: list[list[int]]):
    """Next token = the k-th token of this turn's answer (k counted after the last
    ASSISTANT + think tag), EOS after it; turn i (0-based, by USER count) uses answers[i]."""
    user = tokenizer.id_of(shape.USER)
    assistant = tokenizer.id_of(shape.ASSISTANT)

    def script(tokens):
        turn = tokens.count(user) - 1
        start = len(tokens) - 1 - tokens[::-1].index(assistant) + 2
        answer = answers[min(turn, len(answers) - 1)]
        k = len(tokens) - start
        return answer[k] if k < len(answer) else tokenizer.eos_id

    return script
