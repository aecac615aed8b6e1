"""Server-sent events: formatting, the event pump, and the stop-sequence holdback.

Contract:
- `sse(obj)` / `sse_event(name, obj)` format one event (server.md §8).
- `pump(job, projector, first)` is the async body of a streaming response:
  starting with `first` (the event that made the caller send the headers: a
  prefill chunk or the start of generation), it drains the job's worker
  events, hands each to the API's projector (`feed(event) -> list[str]`) and
  yields SSE text; `: prefill` comments keep idle connections alive during a
  long prefill (§7.3). When
  the client goes away the generator is closed by the server; the `finally`
  marks the job cancelled, so the worker stops at its next token.
- `StopHoldback` cuts generated text at the earliest stop sequence and
  releases only text that cannot be the start of one (prompt.md §9.2).
"""

from __future__ import annotations

import json
import time

# Comment lines during prefill at most this often (server.md §7.3).
KEEPALIVE_S = 5.0


def sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def sse_event(name: str, obj) -> str:
    return f"event: {name}\n" + sse(obj)


def openai_error_event(message: str) -> str:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return sse_event("error", body)


def anthropic_error_event(message: str) -> str:
    return sse_event("error", {"type": "error", "error": {"type": "api_error", "message": message}})


async def pump(job, projector, first=None):
    """Yield SSE strings for `job` until its terminal event (see module docstring).
    The projector's `fail(message)` renders a failure after the headers were sent."""
    last_keepalive = time.monotonic()
    try:
        while True:
            if first is not None:
                event, first = first, None
            else:
                event = await job.events.get()
            kind = event[0]
            if kind == "keepalive":
                now = time.monotonic()
                if now - last_keepalive >= KEEPALIVE_S:
                    last_keepalive = now
                    yield ": prefill\n\n"
                continue
            if kind == "fail":
                for text in projector.fail(event[2]):
                    yield text
                return
            for text in projector.feed(event):
                yield text
            if kind == "done":
                return
    finally:
        job.cancelled.set()


async def collect(job):
    """Non-streaming: wait for the terminal event, skipping deltas."""
    while True:
        event = await job.events.get()
        if event[0] in ("done", "fail"):
            return event


class StopHoldback:
    """Stop sequences over the whole generated text (server.md §7.1).

    `push(piece) -> (released, hit)`: `released` is text now safe to show; `hit`
    is True when a stop sequence matched (the text is then cut at its start and
    everything before the cut has been released). `finish()` releases the rest.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.released = 0
        self.cut = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.cut:
            return "", True
        # Search only where a new match can end: old tail + new piece.
        start = max(0, len(self.text) - self.keep)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.cut = True
            return self._release(len(self.text)), True
        return self._release(max(self.released, len(self.text) - self.keep)), False

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.released:upto]
        self.released = max(self.released, upto)
        return out
