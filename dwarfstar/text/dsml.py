"""The model's output -> reasoning, visible text and tool calls (prompt.md §7-§10).

Contract:
- `DSMLParser(thinking)` is incremental: `feed(text)` and `finish()` return events
  (`ReasoningDelta`, `TextDelta`, `ToolCallStart`, `ToolCallArgs`, `ToolCallEnd`,
  `BlockEnd`, `BlockError`). It never raises. Any chunking of the same text gives the
  same events once adjacent deltas of one kind are joined. Text that might still turn
  into `</think>` or a tool-calls start tag is held back until decided; the "\\n\\n"
  that opens a block is never shown. Only the first block is parsed; text after it is
  dropped. A malformed or unterminated block gives `BlockError`, then its raw text and
  all later text as `TextDelta` (already streamed tool events cannot be retracted).
- `parse_completion(text, thinking)` reads a finished generation with the tolerant rules
  of prompt.md §8 (last `</think>` gate, start-tag priority, whole text as content on
  failure) and returns a `Completion`.
- `SyntaxTracker` answers, for greedy-syntax sampling (§9.3), whether the generation is
  inside DSML structure where the next token must be sampled greedily.
- `render_tool_calls` (canonical block, §10) is re-exported from `dsml_render`.

Known streaming/final differences, on output that is not well formed: the streaming
parser reads reasoning up to the first `</think>` and takes the earliest start tag of any
syntax, the final parser gates on the last `</think>` and prefers the full syntax; in
chat mode only the final parser splits reasoning at a stray `</think>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dwarfstar.shape import THINK_CLOSE, THINK_OPEN
from dwarfstar.text.dsml_block import (SYNTAXES, BlockEnd, BlockError, BlockWalker, ReasoningDelta, Tags, TextDelta,
                                       ToolCall, ToolCallArgs, ToolCallEnd, ToolCallStart, partial_suffix)
from dwarfstar.text.dsml_render import json_text, render_tool_calls  # noqa: F401 (re-exported)

__all__ = [
    "DSMLParser", "parse_completion", "Completion", "SyntaxTracker", "render_tool_calls", "compact_arguments",
    "ReasoningDelta", "TextDelta", "ToolCallStart", "ToolCallArgs", "ToolCallEnd", "BlockEnd", "BlockError", "ToolCall",
]

_STARTS = [(name, Tags(name).start) for name, _ in SYNTAXES]
_WS = " \t\r\n"


def _earliest_start(text: str) -> tuple[int, str] | None:
    found = [(text.find(tag), name) for name, tag in _STARTS if tag in text]
    return min(found) if found else None


def _held_start(text: str) -> int:
    """Where the text that could still begin a block (whitespace + partial start tag) begins."""
    keep = max(partial_suffix(text, tag) for _, tag in _STARTS)
    cut = len(text) - keep
    return len(text[:cut].rstrip(_WS))


class DSMLParser:
    """Streaming split of generated text; see the module docstring."""

    def __init__(self, thinking: bool):
        self.state = "REASONING" if thinking else "CONTENT"
        self._buf = ""
        self._at_start = True
        self._walker: BlockWalker | None = None
        self._block_head = ""

    def feed(self, text: str) -> list:
        if self.state == "DONE":
            return []
        if self.state == "RAW":
            return [TextDelta(text)] if text else []
        if self.state == "BLOCK":
            return self._walk(self._walker.feed(text))
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> list:
        if self.state == "RAW":
            self.state = "DONE"
            return []
        if self.state == "BLOCK":
            return self._walk(self._walker.finish())
        events = self._advance(final=True)
        if self._buf and self.state != "DONE":
            kind = ReasoningDelta if self.state == "REASONING" else TextDelta
            events.append(kind(self._buf))
        self._buf, self.state = "", "DONE"
        return events

    def _advance(self, final: bool) -> list:
        events: list = []
        if self.state == "REASONING":
            if self._at_start:
                if not final and THINK_OPEN.startswith(self._buf) and self._buf != THINK_OPEN:
                    return events
                self._at_start = False
                # A leading <think> written by the model is swallowed (prompt.md §9.2).
                if self._buf.startswith(THINK_OPEN):
                    self._buf = self._buf[len(THINK_OPEN):]
            end = self._buf.find(THINK_CLOSE)
            if end < 0:
                cut = len(self._buf) - partial_suffix(self._buf, THINK_CLOSE)
                self._emit(events, ReasoningDelta, cut)
                return events
            self._emit(events, ReasoningDelta, end)
            self._buf = self._buf[len(THINK_CLOSE):]
            self.state = "CONTENT"
        hit = _earliest_start(self._buf)
        if hit is None:
            self._emit(events, TextDelta, len(self._buf) if final else _held_start(self._buf))
            return events
        pos, syntax = hit
        # The two newlines before the start tag belong to the block (prompt.md §8 step 3).
        content_end = pos - 2 if self._buf[:pos].endswith("\n\n") else pos
        self._emit(events, TextDelta, content_end)
        tag = Tags(syntax).start
        self._block_head = self._buf[:pos - content_end] + tag
        rest = self._buf[pos - content_end + len(tag):]
        self._buf, self.state = "", "BLOCK"
        self._walker = BlockWalker(syntax)
        events += self._walk(self._walker.feed(rest))
        if final and self.state == "BLOCK":
            events += self._walk(self._walker.finish())
        return events

    def _emit(self, events: list, kind, n: int) -> None:
        if n > 0:
            events.append(kind(self._buf[:n]))
            self._buf = self._buf[n:]

    def _walk(self, events: list) -> list:
        out = []
        for e in events:
            if isinstance(e, BlockEnd):
                e = BlockEnd(self._block_head + e.raw_dsml)
                self.state = "DONE"
            out.append(e)
            if isinstance(e, BlockError):
                # From here on everything is plain text (the block could not be read).
                out.append(TextDelta(self._block_head + self._walker.raw + self._walker.held))
                self.state = "RAW"
        return out


@dataclass
class Completion:
    """A finished generation: `reasoning` is None when there was no `</think>`."""

    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    raw_dsml: str | None = None
    invalid_block: bool = False


def _split_reasoning(text: str) -> tuple[str | None, str]:
    end = text.find(THINK_CLOSE)
    if end < 0:
        return None, text
    start = len(THINK_OPEN) if text.startswith(THINK_OPEN) else 0
    return text[start:end], text[end + len(THINK_CLOSE):]


def _find_block(text: str, search_from: int) -> tuple[int, int, str] | None:
    """(block start incl. "\\n\\n", start tag end, syntax) by the priority of prompt.md §8 step 2."""
    for syntax, tag in _STARTS:
        for prefix in ("\n\n", ""):
            pos = text.find(prefix + tag, search_from)
            if pos >= 0:
                return pos, pos + len(prefix) + len(tag), syntax
    return None


def parse_completion(text: str, thinking: bool) -> Completion:
    """Reasoning, content and tool calls of a finished generation (EOS excluded)."""
    search_from = 0
    if thinking:
        last_close = text.rfind(THINK_CLOSE)
        search_from = last_close + len(THINK_CLOSE) if last_close >= 0 else len(text)
    found = _find_block(text, search_from) if search_from < len(text) else None
    if found is None:
        reasoning, content = _split_reasoning(text)
        return Completion(content, reasoning)
    start, body, syntax = found
    walker = BlockWalker(syntax)
    walker.feed(text[body:])
    walker.finish()
    if not walker.done:
        return Completion(text, None, invalid_block=True)
    reasoning, content = _split_reasoning(text[:start])
    return Completion(content, reasoning, walker.calls, text[start:body] + walker.raw)


def compact_arguments(arguments: str) -> str:
    """Arguments as API clients get them: compact JSON, `{}` when the text is not JSON."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return "{}"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class SyntaxTracker:
    """Greedy-syntax classifier over the generated text (prompt.md §9.3).

    `feed(text)` the generated text as it arrives (reasoning included: the start tag
    is searched everywhere, as ds4 does); `state` is OUTSIDE, STRUCTURAL, STRING_BODY,
    JSON_STRUCTURAL or JSON_STRING; `is_greedy` is True in the two structural states.
    Only the first block is tracked.
    """

    def __init__(self):
        self._search = ""
        self._walker: BlockWalker | None = None
        self._max_tag = max(len(tag) for _, tag in _STARTS)

    def feed(self, text: str) -> None:
        if self._walker is not None:
            self._walker.feed(text)
            return
        self._search += text
        hit = _earliest_start(self._search)
        if hit is None:
            self._search = self._search[-self._max_tag:]
            return
        pos, syntax = hit
        self._walker = BlockWalker(syntax)
        self._walker.feed(self._search[pos + len(Tags(syntax).start):])
        self._search = ""

    @property
    def state(self) -> str:
        w = self._walker
        if w is None or w.done or w.failed:
            return "OUTSIDE"
        if w.state != "VALUE":
            return "STRUCTURAL"
        if w.in_string_value:
            return "STRUCTURAL" if len(w.held) >= 2 else "STRING_BODY"
        return "JSON_STRING" if w.json_in_string else "JSON_STRUCTURAL"

    @property
    def is_greedy(self) -> bool:
        return self.state in ("STRUCTURAL", "JSON_STRUCTURAL")

