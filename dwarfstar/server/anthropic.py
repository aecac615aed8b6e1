"""Anthropic Messages: JSON <-> engine (server.md §4.4, §8.3; prompt.md §12.2).

Contract: `parse_messages(body, n_ctx, default_tokens, live_ids)` -> (encoder
messages, GenParams, has_tools, ids needing the live turn) or ApiError;
`message_response` builds the non-streaming body; `MessageStream` turns
worker events into Anthropic SSE events.
"""

from __future__ import annotations

import json

from dwarfstar.server import convo, fields
from dwarfstar.server.errors import ApiError, invalid_json
from dwarfstar.server.fields import GenParams
from dwarfstar.server.job import Result
from dwarfstar.server.stream import anthropic_error_event, sse_event

STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
MISSING_ID = ("Anthropic continuation state is not available for tool_use_id {id}; "
              "retry by replaying the full messages history")


def system_text(value) -> str:
    """`system`: string or blocks, joined with newlines; billing headers dropped."""
    if value is None:
        return ""
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, list):
        parts = [p if isinstance(p, str) else (p.get("text") if isinstance(p, dict) else None) for p in value]
        parts = [p for p in parts if isinstance(p, str)]
    else:
        raise invalid_json("system")
    text = ""
    for part in parts:
        if not part or part.startswith("x-anthropic-"):
            continue
        if text and not text.endswith("\n"):
            text += "\n"
        text += part
    return text


def _assistant(content) -> dict:
    message = {"role": "assistant", "content": fields.content_text(content) if not isinstance(content, list) else ""}
    if not isinstance(content, list):
        return message
    text, reasoning, calls = [], [], []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            arguments = convo.json_text(block["input"]) if "input" in block else "{}"
            calls.append({"id": str(block.get("id") or ""), "type": "function",
                          "function": {"name": str(block.get("name") or ""), "arguments": arguments}})
    message["content"] = "".join(text)
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _user(content) -> list[dict]:
    """A user message -> a run of user/tool encoder messages, in block order."""
    if not isinstance(content, list):
        return [{"role": "user", "content": fields.content_text(content)}]
    out: list[dict] = []
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            result = block.get("content")
            result = result if isinstance(result, list) else fields.content_text(result)
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""), "content": result})
            continue
        text = block if isinstance(block, str) else (block.get("text") if isinstance(block, dict) else None)
        if not isinstance(text, str):
            continue
        if out and out[-1]["role"] == "user":
            out[-1]["content"] += text
        else:
            out.append({"role": "user", "content": text})
    return out or [{"role": "user", "content": ""}]


def _functions(body: dict) -> list:
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "none":
        return []
    functions = []
    for tool in fields.get_objects(body, "tools"):
        if "input_schema" in tool or "name" in tool and "type" not in tool:
            function = {"name": tool.get("name", "")}
            if "description" in tool:
                function["description"] = tool["description"]
            function["parameters"] = tool.get("input_schema", {"type": "object", "properties": {}})
            functions.append(function)
        else:
            functions.append(tool)
    return functions


def parse_messages(body: dict, n_ctx: int, default_tokens: int, live_ids: set[str]):
    """Anthropic request -> (messages, params, has_tools, live_only_ids)."""
    raw_messages = fields.require_list(body, "messages", "missing messages")
    if not raw_messages:
        raise ApiError(400, "messages must not be empty", "messages")
    params = GenParams(model=fields.get_str(body, "model", "deepseek-v4-flash"))
    params.max_tokens = fields.get_max_tokens(body, ("max_tokens",), default_tokens)
    params.stream = fields.get_bool(body, "stream", False)
    params.stop = fields.get_stop(body, "stop_sequences")
    controls = [body["thinking"]] if "thinking" in body else []
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    efforts = [fields.effort_of(effort, "output_config"),
               fields.effort_of(body.get("reasoning_effort"), "reasoning_effort")]
    params.mode = fields.select_mode(params.model, controls, efforts, n_ctx)
    fields.sampling_fields(body, params, ("temperature", "top_p", "top_k"))
    messages: list[dict] = []
    system = system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for raw in raw_messages:
        if not isinstance(raw, dict):
            raise invalid_json("messages")
        role = raw.get("role", "user")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"unsupported role: {role}", "messages")
        content = raw.get("content")
        messages.extend(_user(content) if role == "user" else [_assistant(content)])
    live_only = _live_only(messages, live_ids)
    functions = _functions(body)
    return convo.attach_tools(messages, functions), params, bool(functions), live_only


def _live_only(messages: list[dict], live_ids: set[str]) -> set[str]:
    """Validate tool_result ids (§4.4); return the ids only the live turn explains."""
    convo.check_tool_results(messages, live_ids, MISSING_ID)
    replayed = convo.call_ids(messages)
    return {m["tool_call_id"] for m in messages if m["role"] == "tool"} - replayed


def usage(result: Result) -> dict:
    return {"input_tokens": result.prompt_tokens - result.cached_tokens - result.write_tokens,
            "output_tokens": result.completion_tokens,
            "cache_read_input_tokens": result.cached_tokens,
            "cache_creation_input_tokens": result.write_tokens}


def message_response(number: int, model: str, result: Result) -> dict:
    msg_id = f"chatcmpl-{number}"
    content = []
    if result.reasoning:
        content.append({"type": "thinking", "thinking": result.reasoning, "signature": msg_id})
    if result.content:
        content.append({"type": "text", "text": result.content})
    for call in result.tool_calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name,
                        "input": _input(call.arguments)})
    if all(block["type"] == "thinking" for block in content):
        content.append({"type": "text", "text": ""})
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": STOP_REASON[result.finish], "stop_sequence": None, "usage": usage(result)}


def _input(arguments: str) -> dict:
    return json.loads(arguments)


class MessageStream:
    """Worker events -> Anthropic SSE (server.md §8.3); one open block at a time."""

    def __init__(self, model: str):
        self.model = model
        self.id = ""
        self.index = -1
        self.open: str | None = None
        self.sent = {"thinking": False, "text": False, "tool_use": False}
        self.live_calls: set[int] = set()

    def _start(self, block: dict) -> str:
        self.index += 1
        self.open = block["type"]
        self.sent[block["type"]] = True
        return sse_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                 "content_block": block})

    def _delta(self, delta: dict) -> str:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def _close(self) -> list[str]:
        out = []
        if self.open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": self.id}))
        if self.open is not None:
            out.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.open = None
        return out

    def feed(self, event: tuple) -> list[str]:
        kind = event[0]
        if kind == "start":
            self.id = f"chatcmpl-{event[1]}"
            return [self._message_start(event[2], event[3])]
        if kind == "reasoning":
            out = [] if self.open == "thinking" else self._close() + [
                self._start({"type": "thinking", "thinking": "", "signature": ""})]
            return out + [self._delta({"type": "thinking_delta", "thinking": event[1]})]
        if kind == "text":
            out = [] if self.open == "text" else self._close() + [self._start({"type": "text", "text": ""})]
            return out + [self._delta({"type": "text_delta", "text": event[1]})]
        if kind == "tool_start":
            self.live_calls.add(event[1])
            return self._close() + [self._start({"type": "tool_use", "id": event[2], "name": event[3], "input": {}})]
        if kind == "tool_args":
            return [self._delta({"type": "input_json_delta", "partial_json": event[2]})]
        if kind == "tool_end":
            return self._close()
        if kind == "done":
            return self._finish(event[1])
        return []

    def fail(self, message: str) -> list[str]:
        return [anthropic_error_event(message)]

    def _message_start(self, cached: int, written: int) -> str:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0,
                             "cache_read_input_tokens": cached, "cache_creation_input_tokens": written}}
        return sse_event("message_start", {"type": "message_start", "message": message})

    def _finish(self, result: Result) -> list[str]:
        out = self._close()
        for i, call in enumerate(result.tool_calls):
            if i in self.live_calls:
                continue
            out.append(self._start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}))
            out.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
            out += self._close()
        if self.sent["thinking"] and not self.sent["text"] and not self.sent["tool_use"]:
            out.append(self._start({"type": "text", "text": ""}))
            out += self._close()
        delta = {"type": "message_delta", "delta": {"stop_reason": STOP_REASON[result.finish], "stop_sequence": None},
                 "usage": {"output_tokens": result.completion_tokens}}
        out.append(sse_event("message_delta", delta))
        out.append(sse_event("message_stop", {"type": "message_stop"}))
        return out
