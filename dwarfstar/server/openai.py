"""OpenAI Chat Completions and legacy Completions: JSON <-> engine (server.md §4.2, §4.3, §8.1, §8.2).

Contract: `parse_chat` / `parse_completion` turn a request body into
(encoder messages, GenParams, has_tools) or raise ApiError; `chat_response` /
`completion_response` build the non-streaming bodies from a Result;
`ChatStream` / `CompletionStream` turn worker events into SSE strings.
"""

from __future__ import annotations

import time

from dwarfstar.server import convo, fields
from dwarfstar.server.errors import ApiError, invalid_json
from dwarfstar.server.fields import GenParams
from dwarfstar.server.job import Result
from dwarfstar.server.stream import openai_error_event, sse

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
TASKS = ("action", "query", "authority", "domain", "title", "read_url")
COMPLETION_SYSTEM = "You are a helpful assistant"
FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def common_params(body: dict, n_ctx: int, default_tokens: int, keys: tuple[str, ...]) -> GenParams:
    """Fields shared by chat and completions (thinking controls, limits, sampling)."""
    params = GenParams(model=fields.get_str(body, "model", "deepseek-v4-flash"))
    params.max_tokens = fields.get_max_tokens(body, keys, default_tokens)
    params.stream = fields.get_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        params.include_usage = fields.get_bool(fields.require_object(options, "stream_options"),
                                               "include_usage", False)
    params.stop = fields.get_stop(body, "stop")
    controls = [body[k] for k in ("thinking", "think") if k in body]
    if "think" in body and body["think"] is not None and not isinstance(body["think"], bool):
        raise invalid_json("think")
    efforts = [fields.effort_of(body.get("reasoning_effort"), "reasoning_effort")]
    params.mode = fields.select_mode(params.model, controls, efforts, n_ctx)
    fields.sampling_fields(body, params, ("temperature", "top_p", "min_p", "top_k", "seed"))
    return params


def _tool_calls(value) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid_json("messages")
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or "name" not in function or "arguments" not in function:
            continue
        calls.append({"id": str(call.get("id") or ""), "type": "function",
                      "function": {"name": str(function["name"]),
                                   "arguments": convo.arguments_text(function["arguments"])}})
    return calls


def chat_message(raw) -> dict:
    """One OpenAI chat message -> one encoder message (prompt.md §12.1)."""
    if not isinstance(raw, dict):
        raise invalid_json("messages")
    role = raw.get("role", "user")
    role = "tool" if role == "function" else role
    if role not in ROLES:
        raise ApiError(400, f"unsupported role: {role}", "messages")
    content = raw.get("content")
    if role == "tool" and isinstance(content, list):
        message = {"role": role, "content": content}
    else:
        message = {"role": role, "content": fields.content_text(content)}
    if role == "developer" and not message["content"]:
        raise ApiError(400, "developer message must have content", "messages")
    if role == "assistant":
        if raw.get("reasoning_content") is not None:
            message["reasoning_content"] = fields.content_text(raw["reasoning_content"])
        calls = _tool_calls(raw.get("tool_calls"))
        if calls:
            message["tool_calls"] = calls
        if raw.get("prefix") is True:
            message["wo_eos"] = True
    if role == "tool":
        message["tool_call_id"] = str(raw.get("tool_call_id") or "")
    task = raw.get("task")
    if task is not None:
        if task not in TASKS:
            raise ApiError(400, f"unsupported task: {task}", "messages")
        message["task"] = task
    return message


def chat_tools(body: dict) -> list:
    """Function objects of `tools`, or [] when absent or disabled by tool_choice "none"."""
    if body.get("tool_choice") == "none":
        return []
    functions = []
    for tool in fields.get_objects(body, "tools"):
        function = tool.get("function") if tool.get("type", "function") == "function" else tool
        functions.append(function if isinstance(function, dict) else tool)
    return functions


def parse_chat(body: dict, n_ctx: int, default_tokens: int):
    """Chat request -> (messages, params, has_tools)."""
    raw_messages = fields.require_list(body, "messages", "missing messages")
    if not raw_messages:
        raise ApiError(400, "messages must not be empty", "messages")
    params = common_params(body, n_ctx, default_tokens, ("max_tokens", "max_completion_tokens"))
    messages = [chat_message(m) for m in raw_messages]
    functions = chat_tools(body)
    schema = convo.response_format_value(body.get("response_format"), "response_format", nested=True)
    convo.check_tool_results(messages, set(), "unknown tool_call_id {id}: no earlier assistant tool call has it")
    return convo.attach_tools(messages, functions, schema), params, bool(functions)


def parse_completion(body: dict, n_ctx: int, default_tokens: int):
    """Legacy completion -> (messages, params) per prompt.md §12.4."""
    if body.get("prompt") is None:
        raise ApiError(400, "missing prompt", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
    elif not isinstance(prompt, str):
        prompt = ""
    params = common_params(body, n_ctx, default_tokens, ("max_tokens",))
    messages = [{"role": "system", "content": COMPLETION_SYSTEM}, {"role": "user", "content": prompt}]
    return messages, params


def _tool_call_json(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def chat_response(number: int, model: str, result: Result) -> dict:
    message = {"role": "assistant", "content": result.content}
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = [_tool_call_json(c) for c in result.tool_calls]
    return {"id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message,
                                         "finish_reason": FINISH[result.finish]}],
            "usage": result.openai_usage()}


def completion_response(number: int, model: str, result: Result) -> dict:
    return {"id": f"cmpl-{number}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"text": result.raw_text, "index": 0,
                                         "finish_reason": FINISH[result.finish]}],
            "usage": result.openai_usage()}


class ChatStream:
    """Worker events -> chat.completion.chunk SSE strings (server.md §8.1)."""

    def __init__(self, model: str, include_usage: bool):
        self.model, self.include_usage = model, include_usage
        self.created = int(time.time())
        self.id = ""
        self.live_calls: set[int] = set()

    def _chunk(self, delta: dict, finish=None) -> str:
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def feed(self, event: tuple) -> list[str]:
        kind = event[0]
        if kind == "start":
            self.id = f"chatcmpl-{event[1]}"
            return [self._chunk({"role": "assistant"})]
        if kind == "reasoning":
            return [self._chunk({"reasoning_content": event[1]})]
        if kind == "text":
            return [self._chunk({"content": event[1]})]
        if kind == "tool_start":
            _, index, tool_id, name = event
            self.live_calls.add(index)
            call = {"index": index, "id": tool_id, "type": "function",
                    "function": {"name": name, "arguments": ""}}
            return [self._chunk({"tool_calls": [call]})]
        if kind == "tool_args":
            return [self._chunk({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})]
        if kind == "done":
            return self._finish(event[1])
        return []

    def fail(self, message: str) -> list[str]:
        return [openai_error_event(message)]

    def _finish(self, result: Result) -> list[str]:
        out = []
        late = [dict(_tool_call_json(c), index=i) for i, c in enumerate(result.tool_calls)
                if i not in self.live_calls]
        if late:
            out.append(self._chunk({"tool_calls": late}))
        out.append(self._chunk({}, FINISH[result.finish]))
        if self.include_usage:
            out.append(sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": result.openai_usage()}))
        out.append("data: [DONE]\n\n")
        return out


class CompletionStream:
    """Worker events -> text_completion SSE strings (server.md §8.2); raw text only."""

    def __init__(self, model: str, include_usage: bool):
        self.model, self.include_usage = model, include_usage
        self.created = int(time.time())
        self.id = ""

    def _chunk(self, text: str, finish=None) -> str:
        return sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                    "choices": [{"text": text, "index": 0, "finish_reason": finish}]})

    def feed(self, event: tuple) -> list[str]:
        kind = event[0]
        if kind == "start":
            self.id = f"cmpl-{event[1]}"
        elif kind == "text":
            return [self._chunk(event[1])]
        elif kind == "done":
            result = event[1]
            out = [self._chunk("", FINISH[result.finish])]
            if self.include_usage:
                out.append(sse({"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.model, "choices": [], "usage": result.openai_usage()}))
            return out + ["data: [DONE]\n\n"]
        return []

    def fail(self, message: str) -> list[str]:
        return [openai_error_event(message)]
