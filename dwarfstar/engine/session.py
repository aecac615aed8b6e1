"""One inference timeline: the token ids a decode state holds, and the logits after them.

Contract (docs/INTERFACES.md):
- `session.sync(tokens, progress=None) -> n_prefilled` makes the state hold exactly
  `tokens`. When the held tokens are a prefix of `tokens` only the suffix is prefilled;
  otherwise the state is reset and everything is prefilled (compressor frontiers cannot
  be rewound). Prefill runs in chunks of `prefill_chunk` tokens; `progress(done, total)`
  is called after each chunk with the number of tokens held and `len(tokens)`.
- `session.tokens` (a copy), `session.logits()` float32 [V] after the last token,
  `session.eval(token)` one decode step, `session.snapshot()` / `session.restore(blob)`
  (engine/kv.py format), `session.reset()`.
The Session is the only mutable inference state; it is not thread-safe.
"""

from __future__ import annotations

from typing import Callable

import torch

from dwarfstar.engine.kv import DecodeState
from dwarfstar.model.reference import ReferenceModel

Progress = Callable[[int, int], None]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Session:
    def __init__(self, model: ReferenceModel, ctx: int, prefill_chunk: int = 512):
        self.model = model
        self.ctx = ctx
        self.prefill_chunk = max(1, prefill_chunk)
        self.state = model.new_state(ctx)

    @property
    def tokens(self) -> list[int]:
        return list(self.state.tokens)

    def reset(self) -> None:
        self.state = self.model.new_state(self.ctx)

    def sync(self, tokens: list[int], progress: Progress | None = None) -> int:
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit the context of {self.ctx}")
        held = self.state.tokens
        if common_prefix(held, tokens) < len(held):
            self.reset()
        start = self.state.n_tokens
        for i in range(start, len(tokens), self.prefill_chunk):
            self.model.forward(self.state, tokens[i:i + self.prefill_chunk], all_logits=False)
            if progress is not None:
                progress(self.state.n_tokens, len(tokens))
        return len(tokens) - start

    def logits(self) -> torch.Tensor:
        if self.state.last_logits is None:
            raise RuntimeError("no logits yet: the session holds no tokens")
        return self.state.last_logits.to(torch.float32)

    def eval(self, token: int) -> None:
        if self.state.n_tokens >= self.ctx:
            raise ValueError(f"context of {self.ctx} tokens is full")
        self.model.forward(self.state, [int(token)], all_logits=False)

    def snapshot(self) -> bytes:
        return self.state.snapshot()

    def restore(self, blob: bytes) -> None:
        state = DecodeState.restore(self.model.config, blob)
        if state.dtype != self.model.dtype:
            raise ValueError(f"snapshot dtype {state.dtype} differs from the model's {self.model.dtype}")
        if state.ctx != self.ctx:
            state = _resized(self.model, state, self.ctx)
        self.state = state


def _resized(model: ReferenceModel, state: DecodeState, ctx: int) -> DecodeState:
    """Re-home a restored state in buffers sized for this session's context."""
    if state.n_tokens > ctx:
        raise ValueError(f"snapshot holds {state.n_tokens} tokens, more than the context of {ctx}")
    fresh = model.new_state(ctx)
    fresh.tokens, fresh.last_logits = state.tokens, state.last_logits
    for new, old in zip(fresh.layers, state.layers):
        new.raw.copy_(old.raw)
        for store in ("comp", "index"):
            if getattr(old, store) is not None:
                getattr(new, store).append(getattr(old, store).live())
        new.comp_frontier, new.index_frontier = old.comp_frontier, old.index_frontier
    return fresh
