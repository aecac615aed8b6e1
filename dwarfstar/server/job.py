"""Job and Result: what the HTTP side hands the worker and what comes back.

Contract: a `Job` is fully parsed, rendered and tokenized before it is queued
(so every 4xx happens on the connection side, server.md §1). The worker
fills in `number` (the server-wide counter behind `chatcmpl-<n>`) and sends
events through `emit`; the HTTP side reads them from `events` on its event
loop. Events are tuples:

  ("start", number, cached, written) prompt synced; generation begins
  ("keepalive",)                    prefill still running (SSE comment)
  ("reasoning", text) / ("text", text)
  ("tool_start", index, id, name) / ("tool_args", index, fragment) / ("tool_end", index)
  ("done", Result)                  terminal, success (finish stop/length/tool_calls)
  ("fail", status, message)         terminal, failure (server.md §7.2)

`cancelled` is set by the HTTP side when the client goes away; the worker
checks it before every token.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from dwarfstar.server.fields import GenParams


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # compact JSON object text for clients


@dataclass
class Result:
    finish: str
    content: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    raw_text: str = ""
    raw_dsml: str = ""
    thinking_closed: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def write_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def openai_usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens,
                                          "cache_write_tokens": self.write_tokens}}


@dataclass
class Job:
    api: str  # "chat" | "completion" | "anthropic" | "responses"
    params: GenParams
    prompt_text: str
    prompt_tokens: list[int]
    has_tools: bool = False
    # Parse DSML/think structure of the output (all but legacy completions).
    parse_output: bool = True
    id_prefix: str = "call_"
    raw_body: str = ""
    # Tool ids of this request's tool results that only the live turn explains.
    live_tool_ids: set[str] = field(default_factory=set)
    # Text to append to the live KV when only the live turn explains those ids (§9.4).
    live_tail: str = ""
    want_summary: bool = False
    replay_counts: dict = field(default_factory=dict)
    number: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the event loop the HTTP side will read events on."""
        self.loop = loop
        self.events = asyncio.Queue()

    def emit(self, *event) -> None:
        """Thread-safe: called by the worker thread."""
        if self.loop is None or self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            # The loop shut down under us: the client is gone.
            self.cancelled.set()
