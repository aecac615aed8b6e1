"""Conversation helpers shared by the API mappers (prompt.md §3, §6.1, §6.3, §11, §12).

Contract: the mappers build *encoder messages* (plain dicts with the keys of
prompt.md §3) and then call, in this order: `attach_tools` (tools and response
format go on the first system message, inserting an empty one if needed),
`check_tool_results` (every tool result must answer a call the server can
account for) and `ToolMemory.attach` (exact DSML replay). Nothing here renders
text; `dwarfstar.text.chat.render` does that.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict

from dwarfstar.server.errors import ApiError, invalid_json

# Ceiling on remembered DSML bytes (prompt.md §11), besides the id count.
TOOL_MEMORY_MAX_BYTES = 512 * 1024 * 1024


def json_text(value) -> str:
    """Python's json.dumps as the official encoder writes values (prompt.md §6.2)."""
    return json.dumps(value, ensure_ascii=False)


def arguments_text(value) -> str:
    """Tool-call arguments sent by a client: a string as is, other JSON as its text."""
    return value if isinstance(value, str) else json_text(value)


def compact_arguments(text: str) -> str:
    """Arguments for API clients: compact JSON object text, `{}` when unparsable."""
    try:
        value = json.loads(text)
    except ValueError:
        return "{}"
    if not isinstance(value, dict):
        return "{}"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def response_format_value(fmt, param: str, nested: bool):
    """The schema a response format renders, or None for text/none (§6.3).
    `nested`: chat's {"json_schema": {"schema": S}}; else Responses' {"schema": S}."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid_json(param)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        holder = fmt.get("json_schema") if nested else fmt
        schema = holder.get("schema") if isinstance(holder, dict) else None
        return schema if schema is not None else {"type": "object"}
    raise ApiError(400, "unsupported response_format", param)


def attach_tools(messages: list[dict], functions: list, response_format=None) -> list[dict]:
    """Put tools / response format on messages[0] if it is a system message, else on a
    new empty system message in front (prompt.md §6.1 attachment rule)."""
    if not functions and response_format is None:
        return messages
    if not messages or messages[0].get("role") != "system":
        messages = [{"role": "system", "content": ""}] + messages
    head = dict(messages[0])
    if functions:
        head["tools"] = [{"type": "function", "function": f} for f in functions]
    if response_format is not None:
        head["response_format"] = response_format
    return [head] + messages[1:]


def call_ids(messages: list[dict]) -> set[str]:
    return {c["id"] for m in messages if m.get("role") == "assistant"
            for c in m.get("tool_calls") or [] if c.get("id")}


def mentioned_tool_ids(messages: list[dict]) -> set[str]:
    """Every tool id a request names: assistant call ids and tool results' ids (§10.5)."""
    results = {m["tool_call_id"] for m in messages if m.get("role") == "tool" and m.get("tool_call_id")}
    return call_ids(messages) | results


def check_tool_results(messages: list[dict], live_ids: set[str], template: str) -> bool:
    """Every tool result id must answer an earlier assistant call of the request or a
    call of the live turn; else 400 with `template` (formatted with the id).
    Returns True when some id is explained only by the live turn."""
    seen: set[str] = set()
    needs_live = False
    for message in messages:
        if message.get("role") == "assistant":
            seen.update(c["id"] for c in message.get("tool_calls") or [] if c.get("id"))
        elif message.get("role") == "tool":
            tool_id = message.get("tool_call_id") or ""
            if tool_id in seen:
                continue
            if tool_id and tool_id in live_ids:
                needs_live = True
                continue
            raise ApiError(400, template.format(id=tool_id), "messages")
    return needs_live


def new_tool_id(prefix: str, is_taken) -> str:
    """`call_`/`toolu_` + 32 hex of 16 random bytes; `is_taken(id)` forbids collisions."""
    while True:
        tool_id = prefix + secrets.token_hex(16)
        if not is_taken(tool_id):
            return tool_id


class ToolMemory:
    """Exact DSML replay (prompt.md §11): tool id -> the raw DSML block the model
    sampled; LRU bounded by id count and total bytes. Thread-safe: request parsing
    (attach) and the worker (remember) run on different threads."""

    def __init__(self, max_ids: int, enabled: bool = True):
        self.max_ids = max_ids
        self.enabled = enabled
        self._map: OrderedDict[str, str] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __contains__(self, tool_id: str) -> bool:
        with self._lock:
            return tool_id in self._map

    def __len__(self) -> int:
        return len(self._map)

    def items(self) -> list[tuple[str, str]]:
        """A copy of the (tool id, DSML block) pairs, least recently used first."""
        with self._lock:
            return list(self._map.items())

    def missing(self, ids: set[str]) -> set[str]:
        """The ids of `ids` that have no block here (none while disabled: nothing to find)."""
        if not self.enabled:
            return set()
        with self._lock:
            return {tool_id for tool_id in ids if tool_id not in self._map}

    def update(self, blocks: dict[str, str]) -> None:
        """Remember {tool id: DSML block} pairs read back from disk (ids sharing a block
        stay one group, as `remember` stores them)."""
        by_block: dict[str, list[str]] = {}
        for tool_id, dsml in blocks.items():
            by_block.setdefault(dsml, []).append(tool_id)
        for dsml, ids in by_block.items():
            self.remember(ids, dsml)

    def remember(self, ids: list[str], raw_dsml: str) -> None:
        if not self.enabled or not raw_dsml:
            return
        with self._lock:
            for tool_id in ids:
                self._drop(tool_id)
                self._map[tool_id] = raw_dsml
                self._bytes += len(raw_dsml.encode())
            while self._map and (len(self._map) > self.max_ids or self._bytes > TOOL_MEMORY_MAX_BYTES):
                self._drop(next(iter(self._map)))

    def _drop(self, tool_id: str) -> None:
        old = self._map.pop(tool_id, None)
        if old is not None:
            self._bytes -= len(old.encode())

    def attach(self, messages: list[dict]) -> dict:
        """Set `raw_dsml` on assistant messages whose call ids all map to one block.
        Returns counts {"mem": found, "canonical": messages, "missing_ids": n}."""
        counts = {"mem": 0, "canonical": 0, "missing_ids": 0}
        out = []
        for message in messages:
            calls = message.get("tool_calls") or []
            if message.get("role") != "assistant" or not calls or message.get("raw_dsml"):
                out.append(message)
                continue
            blocks = [self._lookup(c.get("id", "")) for c in calls]
            missing = sum(b is None for b in blocks)
            if self.enabled and missing == 0 and len(set(blocks)) == 1:
                message = dict(message, raw_dsml=blocks[0])
                counts["mem"] += len(calls)
            else:
                counts["canonical"] += 1
                counts["missing_ids"] += missing
            out.append(message)
        messages[:] = out
        return counts

    def _lookup(self, tool_id: str):
        with self._lock:
            block = self._map.get(tool_id)
            if block is not None:
                self._map.move_to_end(tool_id)
            return block
