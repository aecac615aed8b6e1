"""The generation loop shared by the CLI and the bench: session + sampling -> tokens.

Contract:
- `generate(session, pick, max_tokens, eos_id, stop)` yields up to `max_tokens` ids.
  Each step reads `session.logits()`, picks a token, stops *before* evaluating EOS
  (EOS is never yielded), evaluates the token, then yields it; so every yielded token
  is already part of `session.tokens` (as in ds4's REPL, which evaluates then records).
- `stop` is checked before each step; a SIGINT handler installed with `sigint_stops`
  sets it, so Ctrl+C ends generation between two decode steps and never inside one.
- `Picker` turns logits into a token: argmax when the temperature is 0 (cli.md §2.4),
  else `engine.sampling.sample` with one random stream per picker.
- `token_budget(n, ctx, n_prompt)` is ds4's per-answer limit: `min(n, ctx - pos - 1)`,
  and 0 when at most one slot is left.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import torch


class StopFlag:
    """A cross-thread "please stop" bit (a SIGINT handler or a server cancel sets it)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def sigint_stops(flag: StopFlag):
    """While active, SIGINT sets `flag` instead of raising KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def token_budget(n_tokens: int, ctx: int, n_prompt: int) -> int:
    room = ctx - n_prompt
    return 0 if room <= 1 else min(n_tokens, room - 1)


class Picker:
    """logits [V] -> token id: argmax at temperature 0 (lowest id among equal maxima),
    else `engine.sampling.sample` drawing from one ds4 xorshift stream seeded with
    `params.seed` (0 = a fresh OS seed), so a fixed seed replays the same answer."""

    def __init__(self, params) -> None:
        from dwarfstar.engine.sampling import Rng

        self.params = params
        self.rng = Rng(params.seed) if params.temperature > 0 else None

    def __call__(self, logits: torch.Tensor) -> int:
        if self.rng is None:
            return int(torch.argmax(logits))
        from dwarfstar.engine.sampling import sample

        return int(sample(logits, self.params, self.rng).token)


def live_logits(session) -> torch.Tensor:
    """The last logits where the session keeps them (on the GPU for a CUDA session: picking
    there reads back a token id, not the 129280-float row); valid until the next eval."""
    read = getattr(session, "device_logits", None)
    return read() if read is not None else session.logits()


def generate(
    session,
    pick: Callable[[torch.Tensor], int],
    max_tokens: int,
    eos_id: int,
    stop: StopFlag | None = None,
) -> Iterator[int]:
    """Yield generated ids (see the module docstring for the exact step order)."""
    for _ in range(max_tokens):
        if stop is not None and stop.is_set():
            return
        token = pick(live_logits(session))
        if token == eos_id:
            return
        session.eval(token)
        yield token
