"""Canonical DSML rendering of tool calls for assistant history (prompt.md §7, §10).

Contract:
- `json_text(value)` is the JSON text of a value exactly as the official encoder writes
  it: `json.dumps(value, ensure_ascii=False)` (separators ", " and ": ", non-ASCII raw).
- `render_tool_calls(calls)` is the official block, starting with "\\n\\n":
  one invoke per call, one parameter line per key of the JSON `arguments` object,
  string values raw with string="true", other values as `json_text` with string="false".
  Nothing is escaped (the official format has none). Arguments that are not a JSON
  object become one string parameter named `arguments` holding the raw text.
- A call is either `{"name", "arguments"}` or the OpenAI form `{"function": {...}}`;
  `arguments` is JSON text (a non-string value is first turned into its JSON text).
"""

from __future__ import annotations

import json
from typing import Any

from dwarfstar.shape import DSML

BLOCK_NAME = "tool_calls"


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def call_name_and_arguments(call: dict) -> tuple[str, str]:
    """(name, arguments JSON text) of a call in either accepted form."""
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name, arguments = fn.get("name"), fn.get("arguments", "{}")
    if not isinstance(name, str):
        raise ValueError(f"tool call without a string name: {call!r}")
    if not isinstance(arguments, str):
        arguments = json_text(arguments)
    return name, arguments


def _parameter_lines(arguments: str) -> list[str]:
    try:
        values = json.loads(arguments)
    except ValueError:
        values = None
    # The official encoder crashes on valid non-object JSON; we treat it as invalid JSON.
    if not isinstance(values, dict):
        values = {"arguments": arguments}
    lines = []
    for key, value in values.items():
        is_str = isinstance(value, str)
        text = value if is_str else json_text(value)
        flag = "true" if is_str else "false"
        lines.append(f'<{DSML}parameter name="{key}" string="{flag}">{text}</{DSML}parameter>')
    return lines


def render_invoke(name: str, arguments: str) -> str:
    params = "\n".join(_parameter_lines(arguments))
    return f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>'


def render_tool_calls(calls: list[dict]) -> str:
    """The canonical block for `calls` (non-empty), leading "\\n\\n" included."""
    invokes = [render_invoke(*call_name_and_arguments(c)) for c in calls]
    body = "\n".join(invokes)
    return f"\n\n<{DSML}{BLOCK_NAME}>\n{body}\n</{DSML}{BLOCK_NAME}>"
