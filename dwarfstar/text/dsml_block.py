"""Incremental walker over the inside of one DSML tool-call block (prompt.md §7.1, §8 step 4).

Contract:
- `BlockWalker(syntax)` is fed the text that follows a tool-calls start tag, in chunks
  of any size; `feed` returns the events it can decide, `finish()` those left when no
  more text comes. The events (and `calls`, `raw`, `state`) never depend on how the
  text was chunked, except that consecutive argument deltas may be split differently.
- It never raises. Malformed input moves it to FAILED (`error` says why); text after
  the closing tag is not consumed (`done`).
- Arguments are produced twice: as streaming deltas (the compact OpenAI fragments of
  server.md §8.1: `{`, `"key":`, string values JSON-escaped inside quotes, other values
  raw, `}`) and, at the end of each invoke, as the official parser's text
  `{"k": v, ...}` (string values as JSON strings, other values minified, empty -> null).
- No entity decoding anywhere: `&amp;` stays five characters (prompt.md §8).
- Nested-parameter recovery: a parameter without a `string` attribute whose value starts
  with another parameter tag takes a run of leaf parameters as a JSON object value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# (name, opening prefix) of the three accepted syntaxes, in parse priority order.
SYNTAXES = (("full", "<｜DSML｜"), ("short", "<DSML｜"), ("plain", "<"))
_WS = " \t\r\n"


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    name: str
    arguments: str


@dataclass(frozen=True)
class BlockEnd:
    raw_dsml: str


@dataclass(frozen=True)
class BlockError:
    message: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str


class Tags:
    """The tag strings of one syntax."""

    def __init__(self, syntax: str):
        opening = dict(SYNTAXES)[syntax]
        closing = "</" + opening[1:]
        self.start = opening + "tool_calls>"
        self.end = closing + "tool_calls>"
        self.invoke = opening + "invoke"
        self.invoke_end = closing + "invoke>"
        self.param = opening + "parameter"
        self.param_end = closing + "parameter>"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _attr(tag_text: str, key: str) -> str | None:
    # A substring search, as ds4 does: the first `key="` wins, value up to the next quote.
    m = re.search(r'(?:^|\s)' + key + r'="([^"]*)"', tag_text)
    return m.group(1) if m else None


def _json_step(ch: str, in_string: bool, escaped: bool) -> tuple[bool, bool]:
    """(in_string, escaped) of raw JSON text after `ch`; escaped implies in_string."""
    if escaped:
        return True, False
    if in_string:
        return ch != '"', ch == "\\"
    return ch == '"', False


def minify_json_text(raw: str) -> str:
    """Whitespace outside JSON strings removed; the text is not validated. Empty -> null."""
    out, in_string, escaped = [], False, False
    for ch in raw:
        if not in_string and ch in _WS:
            continue
        in_string, escaped = _json_step(ch, in_string, escaped)
        out.append(ch)
    return "".join(out) or "null"


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class BlockWalker:
    """State machine: STRUCT -> INVOKE -> VALUE -> INVOKE ... -> DONE, or FAILED."""

    def __init__(self, syntax: str):
        self.tags = Tags(syntax)
        self.state = "STRUCT"
        self.buf = ""
        self.raw = ""
        self.error = ""
        self.calls: list[ToolCall] = []
        self.json_in_string = False
        self._escaped = False
        self._is_string = False
        self._events: list = []

    @property
    def done(self) -> bool:
        return self.state == "DONE"

    @property
    def failed(self) -> bool:
        return self.state == "FAILED"

    @property
    def held(self) -> str:
        """Text fed but not yet decided (e.g. a partial closing tag)."""
        return self.buf

    @property
    def in_string_value(self) -> bool:
        """Inside a parameter value that is written raw as a string (string="true" or absent)."""
        return self.state == "VALUE" and self._is_string

    def feed(self, text: str) -> list:
        if self.state in ("DONE", "FAILED"):
            return []
        self.buf += text
        while self.state not in ("DONE", "FAILED") and self._step(final=False):
            pass
        return self._take()

    def finish(self) -> list:
        while self.state not in ("DONE", "FAILED") and self._step(final=True):
            pass
        if self.state not in ("DONE", "FAILED"):
            self._fail("unterminated tool call")
        return self._take()

    def _take(self) -> list:
        events, self._events = self._events, []
        return events

    def _consume(self, n: int) -> str:
        part, self.buf = self.buf[:n], self.buf[n:]
        self.raw += part
        return part

    def _fail(self, message: str) -> bool:
        self.state, self.error = "FAILED", message
        self._events.append(BlockError(message))
        return False

    def _skip_ws(self) -> None:
        self._consume(len(self.buf) - len(self.buf.lstrip(_WS)))

    def _expect(self, final: bool, *tags: str) -> str | None | bool:
        """The tag `buf` starts with; None to wait for more text; False if none can match."""
        self._skip_ws()
        for tag in tags:
            if self.buf.startswith(tag):
                return tag
        if not final and (not self.buf or any(tag.startswith(self.buf) for tag in tags)):
            return None
        return False

    def _tag_text(self, final: bool, tag: str) -> str | None | bool:
        """Attribute text of the open tag `tag ... >` at the head of buf (consumed)."""
        close = self.buf.find(">", len(tag))
        if close < 0:
            return False if final else None
        return self._consume(close + 1)[len(tag):-1]

    def _step(self, final: bool) -> bool:
        """One decision; False when more text is needed (or the walk ended)."""
        return getattr(self, "_step_" + self.state.lower())(final)

    def _step_struct(self, final: bool) -> bool:
        t = self.tags
        tag = self._expect(final, t.end, t.invoke)
        if tag is None:
            return False
        if tag is False:
            return self._fail("expected an invoke tag or the end of the tool calls")
        if tag == t.end:
            self._consume(len(tag))
            self.state = "DONE"
            self._events.append(BlockEnd(self.raw))
            return False
        attrs = self._tag_text(final, tag)
        if attrs is None:
            return False
        name = _attr(attrs, "name") if attrs is not False else None
        if name is None:
            return self._fail("invoke tag without a name")
        self._name, self._pairs, self._nested = name, [], None
        self._events += [ToolCallStart(len(self.calls), name), ToolCallArgs(len(self.calls), "{")]
        self.state = "INVOKE"
        return True

    def _args(self, text: str) -> None:
        self._events.append(ToolCallArgs(len(self.calls), text))

    def _step_invoke(self, final: bool) -> bool:
        t = self.tags
        nested = self._nested is not None
        tags = (t.param, t.param_end, t.invoke_end) if nested else (t.invoke_end, t.param)
        tag = self._expect(final, *tags)
        if tag is None:
            return False
        if nested and tag != t.param:
            # End of the leaf run: the nested object closes; its own closing tag is optional.
            key, pairs = self._nested
            self._nested = None
            self._pairs.append((key, "{" + ", ".join(pairs) + "}"))
            self._args("}")
            if tag == t.param_end:
                self._consume(len(tag))
            return True
        if tag is False:
            return self._fail("expected a parameter tag or the end of the invoke")
        if tag == t.invoke_end:
            self._consume(len(tag))
            arguments = "{" + ", ".join(f"{_quote(k)}: {v}" for k, v in self._pairs) + "}"
            self._args("}")
            self._events.append(ToolCallEnd(len(self.calls), self._name, arguments))
            self.calls.append(ToolCall(self._name, arguments))
            self.state = "STRUCT"
            return True
        return self._open_param(final, tag)

    def _open_param(self, final: bool, tag: str) -> bool:
        attrs = self._tag_text(final, tag)
        if attrs is None:
            return False
        key = _attr(attrs, "name") if attrs is not False else None
        if key is None:
            return self._fail("parameter tag without a name")
        pairs = self._nested[1] if self._nested is not None else self._pairs
        self._args(("," if pairs else "") + _quote(key) + ":")
        self._key, self._string, self._value = key, _attr(attrs, "string"), ""
        self.state = "VALUE_START"
        return True

    def _step_value_start(self, final: bool) -> bool:
        if self._string is None and self._nested is None:
            head = self.buf.lstrip(_WS)
            if not final and (not head or (self.tags.param.startswith(head) and head != self.tags.param)):
                return False
            if head.startswith(self.tags.param):
                self._skip_ws()
                self._nested = (self._key, [])
                self._args("{")
                self.state = "INVOKE"
                return True
        self.json_in_string = self._escaped = False
        self._is_string = self._string in (None, "true")
        if self._is_string:
            self._args('"')
        self.state = "VALUE"
        return True

    def _step_value(self, final: bool) -> bool:
        end = self.buf.find(self.tags.param_end)
        if end < 0:
            if final:
                return self._fail("parameter value without a closing tag")
            keep = partial_suffix(self.buf, self.tags.param_end)
            self._value_delta(self._consume(len(self.buf) - keep))
            return False
        self._value_delta(self._consume(end))
        self._consume(len(self.tags.param_end))
        if self._is_string:
            self._args('"')
            value = _quote(self._value)
        else:
            value = minify_json_text(self._value)
            if not self._value.strip(_WS):
                self._args("null")
        target = self._nested[1] if self._nested is not None else None
        if target is not None:
            target.append(f"{_quote(self._key)}: {value}")
        else:
            self._pairs.append((self._key, value))
        self.state = "INVOKE"
        return True

    def _value_delta(self, text: str) -> None:
        if not text:
            return
        started = bool(self._value.strip(_WS))
        self._value += text
        if self._is_string:
            self._args(_quote(text)[1:-1])
            return
        # Raw JSON goes out unchanged except leading whitespace (it would be emitted before
        # we know the value is empty, which must become `null`).
        out = text if started else text.lstrip(_WS)
        for ch in out:
            self.json_in_string, self._escaped = _json_step(ch, self.json_in_string, self._escaped)
        if out:
            self._args(out)
