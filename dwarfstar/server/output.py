"""Generated text -> API events and the final message (prompt.md §8, §9; server.md §7).

Contract: `make_projection(job, memory, trace)` returns an object with
`feed(text)` (text already cleared of stop sequences, in generation order),
`structural() -> bool` (the next token is DSML syntax: sample it greedily,
prompt.md §9.3), `tool_calls_closed() -> bool` and `finish(reason) -> Result`
(raises GenerationError for an unterminated tool call). Deltas go out through
`job.emit` as `dwarfstar.text.dsml.DSMLParser` decides them (reasoning, text,
live tool-call start/argument fragments/end); each call gets an unguessable id
when its invoke tag completes, and the final parsed call inherits it. The
final Result comes from `parse_completion` over the same raw text; its DSML
block is remembered for exact replay (prompt.md §11).
Legacy completions get `RawProjection`: raw text, no parsing.
"""

from __future__ import annotations

from dwarfstar.server.convo import compact_arguments, new_tool_id
from dwarfstar.server.job import Job, Result, ToolCall
from dwarfstar.text.dsml import (BlockEnd, BlockError, DSMLParser, ReasoningDelta, SyntaxTracker, TextDelta,
                                 ToolCallArgs, ToolCallEnd, ToolCallStart, parse_completion)


class GenerationError(Exception):
    """A generation that must end as finish `error` (server.md §7.2)."""


class RawProjection:
    """Legacy completions: the raw text is the answer (server.md §4.3)."""

    def __init__(self, job: Job):
        self.job = job
        self.raw = ""

    def feed(self, text: str) -> None:
        if text:
            self.raw += text
            self.job.emit("text", text)

    def structural(self) -> bool:
        return False

    def tool_calls_closed(self) -> bool:
        return False

    def finish(self, reason: str) -> Result:
        return Result(finish=reason, content=self.raw, raw_text=self.raw)


class ChatProjection:
    """Chat-kind output through `dwarfstar.text.dsml` (streaming parser, greedy-syntax
    tracker, final parser); this class only mints tool ids and forwards events."""

    def __init__(self, job: Job, memory, trace):
        self.job, self.memory, self.trace = job, memory, trace
        self.thinking = job.params.mode != "chat"
        self.parser = DSMLParser(self.thinking)
        self.tracker = SyntaxTracker()
        self.raw = ""
        self.ids: list[str] = []
        self.closed = False

    def feed(self, text: str) -> None:
        if text:
            self.raw += text
            self.tracker.feed(text)
            self._forward(self.parser.feed(text))

    def _forward(self, events: list) -> None:
        emit = self.job.emit
        for event in events:
            if isinstance(event, ReasoningDelta):
                emit("reasoning", event.text)
            elif isinstance(event, TextDelta):
                emit("text", event.text)
            elif isinstance(event, ToolCallStart):
                self.ids.append(self._new_id())
                self.trace.event(f"tool call {event.index} started: {event.name}")
                emit("tool_start", event.index, self.ids[event.index], event.name)
            elif isinstance(event, ToolCallArgs):
                emit("tool_args", event.index, event.text)
            elif isinstance(event, ToolCallEnd):
                emit("tool_end", event.index)
            elif isinstance(event, BlockEnd):
                self.closed = True
                self.trace.event(f"closed tool-call block after {len(self.ids)} call(s)")
            elif isinstance(event, BlockError):
                self.trace.event(f"invalid tool call block: {event.message}")

    def _new_id(self) -> str:
        return new_tool_id(self.job.id_prefix, lambda i: i in self.ids or i in self.memory)

    def structural(self) -> bool:
        """prompt.md §9.3: greedy inside DSML syntax, only when the request has tools."""
        return self.job.has_tools and self.tracker.is_greedy

    def tool_calls_closed(self) -> bool:
        return self.job.has_tools and self.closed

    def finish(self, reason: str) -> Result:
        # Arguments may already be streamed: an open block is a failure (§9.1).
        if self.job.has_tools and self.parser.state == "BLOCK":
            raise GenerationError("unterminated tool call")
        self._forward(self.parser.finish())
        done = parse_completion(self.raw, self.thinking)
        if done.invalid_block:
            self.trace.event(f"invalid tool call returned as assistant text finish={reason}")
        result = Result(finish=reason, content=done.content, reasoning=done.reasoning, raw_text=self.raw,
                        thinking_closed=done.reasoning is not None)
        while len(self.ids) < len(done.tool_calls):
            self.ids.append(self._new_id())
        result.tool_calls = [ToolCall(tool_id, call.name, compact_arguments(call.arguments))
                             for tool_id, call in zip(self.ids, done.tool_calls)]
        if result.tool_calls:
            result.finish = "tool_calls"
            result.raw_dsml = done.raw_dsml or ""
            self.memory.remember([c.id for c in result.tool_calls], result.raw_dsml)
        return result


def make_projection(job: Job, memory, trace):
    return ChatProjection(job, memory, trace) if job.parse_output else RawProjection(job)
