"""Shared request pieces and the forced generation used by the server tests.

FORCED is what the test-only `--debug-forced-output` switch makes the worker
generate: reasoning, visible text, then one DSML tool call whose `days` value is
written compactly (`[1,2]`), so only exact replay (not canonical rendering,
which writes `[1, 2]`) keeps the next prompt a token prefix of the live KV.
"""

from __future__ import annotations

import json

CHAT = "/v1/chat/completions"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "array"}}}}}]
DSML = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris &amp; Lyon</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">[1,2]</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
FORCED = "Let me look.</think>Sure." + DSML
ARGS = {"city": "Paris &amp; Lyon", "days": [1, 2]}
USER = [{"role": "user", "content": "weather?"}]


def events(response) -> list:
    """(event name or None, parsed data or the raw string) per SSE event."""
    out = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((name, data if data == "[DONE]" or data is None else json.loads(data)))
    return out
