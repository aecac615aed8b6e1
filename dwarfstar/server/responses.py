"""OpenAI Responses: JSON <-> engine (server.md §4.5, §8.4; prompt.md §12.3).

Contract: `parse_responses(body, n_ctx, default_tokens, live_ids)` -> (encoder
messages, GenParams, has_tools, want_summary, live-only ids) or ApiError;
`Output` holds the ids of one response and builds its items, the
non-streaming body and the streaming events (`ResponseStream`).
Namespaced tools are flattened to `namespace + name`; calls are reported
under that wire name (the separate `namespace` field is not reported yet).
"""

from __future__ import annotations

import secrets
import time

from dwarfstar.server import convo, fields
from dwarfstar.server.errors import ApiError, invalid_json
from dwarfstar.server.fields import GenParams
from dwarfstar.server.job import Result
from dwarfstar.server.openai import ROLES
from dwarfstar.server.stream import openai_error_event, sse

TEXT_TYPES = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
CALL_NAMES = {"function_call": None, "custom_tool_call": None, "local_shell_call": "local_shell",
              "web_search_call": "web_search_call", "tool_search_call": "tool_search",
              "image_generation_call": "image_generation_call"}
OUTPUT_TYPES = ("function_call_output", "custom_tool_call_output", "local_shell_call_output",
                "web_search_call_output", "tool_search_output", "tool_search_call_output",
                "image_generation_call_output")
MISSING_ID = ("Responses continuation state is not available for call_id {id}; "
              "retry by replaying the full input history")


def _text(value) -> str:
    """Strict content parsing: string, null, or an array of text parts; else 400."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid_json("input")
    parts = []
    for part in value:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type") in TEXT_TYPES and isinstance(part.get("text"), (str, type(None))):
            parts.append(part.get("text") or "")
        else:
            raise invalid_json("input")
    return "".join(parts)


def _call(item: dict, kind: str) -> dict:
    name = CALL_NAMES[kind] or str(item.get("name") or "")
    if kind == "function_call" and isinstance(item.get("namespace"), str):
        name = item["namespace"] + name
    args = next((item[k] for k in ("arguments", "input", "action") if item.get(k) is not None), "{}")
    return {"id": str(item.get("call_id") or item.get("id") or ""), "type": "function",
            "function": {"name": name, "arguments": convo.arguments_text(args)}}


def _output_message(item: dict) -> dict:
    output = item.get("output", item.get("result"))
    if isinstance(output, list):
        content = [{"type": "text", "text": _text([p])} for p in output]
    elif isinstance(output, str):
        content = output
    elif output is None and "tools" in item:
        content = convo.json_text(item["tools"])
    else:
        content = convo.json_text(output) if output is not None else ""
    return {"role": "tool", "tool_call_id": str(item.get("call_id") or item.get("id") or ""), "content": content}


def input_messages(value) -> tuple[list[dict], list]:
    """`input` -> (encoder messages, extra tools from tool_search_output items)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], []
    if not isinstance(value, list):
        raise invalid_json("input")
    messages: list[dict] = []
    extra_tools: list = []
    pending: list[str] = []

    def flush():
        if pending:
            messages.append({"role": "assistant", "content": "", "reasoning_content": "\n".join(pending)})
            pending.clear()

    for item in value:
        if not isinstance(item, dict):
            raise invalid_json("input")
        if item.get("status") not in (None, "completed"):
            raise invalid_json("input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            if role not in ROLES or role in ("tool", "latest_reminder"):
                raise ApiError(400, f"unsupported role: {role}", "input")
            message = {"role": role, "content": _text(item.get("content"))}
            if role == "assistant" and pending:
                message["reasoning_content"] = "\n".join(pending)
                pending.clear()
            elif role != "assistant":
                flush()
            if role == "developer" and not message["content"]:
                raise ApiError(400, "developer message must have content", "input")
            messages.append(message)
        elif kind == "reasoning":
            texts = [_text(item.get("summary")), _text(item.get("content"))]
            pending.extend(t for t in texts if t)
        elif kind in CALL_NAMES:
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            last = messages[-1]
            last.setdefault("tool_calls", []).append(_call(item, kind))
            if pending and "reasoning_content" not in last:
                last["reasoning_content"] = "\n".join(pending)
                pending.clear()
        elif kind in OUTPUT_TYPES:
            flush()
            messages.append(_output_message(item))
            if kind == "tool_search_output" and item.get("tools") is not None:
                if not isinstance(item["tools"], list):
                    raise invalid_json("input")
                extra_tools.extend(item["tools"])
        elif kind not in ("compaction", "context_compaction"):
            raise invalid_json("input")
    flush()
    return messages, extra_tools


def functions_of(tools: list) -> list:
    """Responses tool objects -> function objects (prompt.md §6.1)."""
    out = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise invalid_json("tools")
        kind = tool.get("type")
        if kind == "function":
            out.append({k: v for k, v in tool.items() if k != "type"})
        elif kind == "namespace":
            for inner in tool.get("tools") or []:
                if isinstance(inner, dict) and inner.get("type", "function") == "function":
                    params = inner.get("parameters", inner.get("input_schema", {"type": "object", "properties": {}}))
                    out.append({"name": str(tool.get("name", "")) + str(inner.get("name", "")),
                                "description": inner.get("description", ""), "parameters": params})
        elif kind == "tool_search":
            out.append({"name": "tool_search", "description": tool.get("description", "Search available tools."),
                        "parameters": tool.get("parameters", {"type": "object", "properties": {}})})
        else:
            out.append(tool)
    return out


def _check_unsupported(body: dict) -> None:
    for key in ("previous_response_id", "conversation"):
        if body.get(key) is not None:
            raise ApiError(400, f"{key} is not supported; replay full input instead", key)
    choice = body.get("tool_choice")
    if isinstance(choice, str) and choice not in ("auto", "none"):
        raise ApiError(400, f"tool_choice={choice} not supported", "tool_choice")
    if isinstance(choice, dict):
        raise ApiError(400, "forced tool_choice not supported", "tool_choice")


def parse_responses(body: dict, n_ctx: int, default_tokens: int, live_ids: set[str]):
    """Responses request -> (messages, params, has_tools, want_summary, live_only_ids)."""
    if body.get("input") is None:
        raise ApiError(400, "missing input", "input")
    _check_unsupported(body)
    params = GenParams(model=fields.get_str(body, "model", "deepseek-v4-flash"))
    params.max_tokens = fields.get_max_tokens(body, ("max_output_tokens", "max_tokens"), default_tokens)
    params.stream = fields.get_bool(body, "stream", False)
    reasoning = body.get("reasoning")
    reasoning = fields.require_object(reasoning, "reasoning") if reasoning is not None else {}
    effort = fields.effort_of(reasoning.get("effort"), "reasoning")
    controls = [{"type": "enabled"}] if effort is not None else []
    params.mode = fields.select_mode(params.model, controls, [effort], n_ctx)
    want_summary = reasoning.get("summary") in ("auto", "concise", "detailed")
    fields.sampling_fields(body, params, ("temperature", "top_p"))
    messages, extra_tools = input_messages(body["input"])
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid_json("tools")
    functions = [] if body.get("tool_choice") == "none" else functions_of((tools or []) + extra_tools)
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    schema = convo.response_format_value(fmt, "text", nested=False)
    convo.check_tool_results(messages, live_ids, MISSING_ID)
    live_only = {m["tool_call_id"] for m in messages if m["role"] == "tool"} - convo.call_ids(messages)
    return convo.attach_tools(messages, functions, schema), params, bool(functions), want_summary, live_only


def _rid(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class Output:
    """The ids and items of one response; shared by both response styles."""

    def __init__(self, model: str, want_summary: bool, mode: str = "thinking"):
        self.model, self.want_summary, self.mode = model, want_summary, mode
        self.id, self.rs_id, self.msg_id = _rid("resp_"), _rid("rs_"), _rid("msg_")
        self.created = int(time.time())
        self.fc_ids: list[str] = []

    def envelope(self, status: str, output: list, result: Result | None) -> dict:
        body = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output}
        if result is not None:
            body["usage"] = {"input_tokens": result.prompt_tokens,
                             "input_tokens_details": {"cached_tokens": result.cached_tokens,
                                                      "cache_write_tokens": result.write_tokens},
                             "output_tokens": result.completion_tokens,
                             "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": result.prompt_tokens + result.completion_tokens}
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_tokens"}
        return body

    def reasoning_item(self, text: str, closed: bool) -> dict:
        summary = [{"type": "summary_text", "text": text}] if text else []
        return {"id": self.rs_id, "type": "reasoning", "status": "completed" if closed else "incomplete",
                "summary": summary}

    def message_item(self, text: str, status: str) -> dict:
        return {"id": self.msg_id, "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    def call_items(self, result: Result, status: str) -> list[dict]:
        # fc_ ids are minted once, so streamed items and the terminal body agree.
        while len(self.fc_ids) < len(result.tool_calls):
            self.fc_ids.append(_rid("fc_"))
        return [{"id": fc_id, "type": "function_call", "status": status, "name": c.name,
                 "call_id": c.id, "arguments": c.arguments} for fc_id, c in zip(self.fc_ids, result.tool_calls)]

    def items(self, result: Result, streamed_reasoning: bool = False) -> list[dict]:
        status = "incomplete" if result.finish == "length" else "completed"
        items = []
        if self.want_summary and (result.reasoning or streamed_reasoning):
            items.append(self.reasoning_item(result.reasoning or "", result.thinking_closed))
        if result.content:
            items.append(self.message_item(result.content, status))
        return items + self.call_items(result, status)

    def response(self, result: Result) -> dict:
        status = "incomplete" if result.finish == "length" else "completed"
        return self.envelope(status, self.items(result), result)


class ResponseStream:
    """Worker events -> Responses SSE (server.md §8.4)."""

    def __init__(self, output: Output):
        self.out = output
        self.seq = 0
        self.index = 0
        self.rs_index = self.msg_index = None
        self.reasoning = ""
        self.text = ""
        self.created = False

    def _ev(self, kind: str, **fields_) -> str:
        event = {"type": kind, "sequence_number": self.seq, **fields_}
        self.seq += 1
        return sse(event)

    def feed(self, event: tuple) -> list[str]:
        kind, out = event[0], self.out
        if kind == "start":
            self.created = True
            return [self._ev("response.created", response=out.envelope("in_progress", [], None))]
        if kind == "reasoning" and out.want_summary:
            events = []
            if self.rs_index is None:
                self.rs_index, self.index = self.index, self.index + 1
                item = {"id": out.rs_id, "type": "reasoning", "status": "in_progress", "summary": []}
                events.append(self._ev("response.output_item.added", output_index=self.rs_index, item=item))
                events.append(self._ev("response.reasoning_summary_part.added", item_id=out.rs_id,
                                       output_index=self.rs_index, summary_index=0,
                                       part={"type": "summary_text", "text": ""}))
            self.reasoning += event[1]
            return events + [self._ev("response.reasoning_summary_text.delta", item_id=out.rs_id,
                                      output_index=self.rs_index, summary_index=0, delta=event[1])]
        if kind == "text":
            events = []
            if self.msg_index is None:
                self.msg_index, self.index = self.index, self.index + 1
                item = {"id": out.msg_id, "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
                events.append(self._ev("response.output_item.added", output_index=self.msg_index, item=item))
                events.append(self._ev("response.content_part.added", item_id=out.msg_id,
                                       output_index=self.msg_index, content_index=0,
                                       part={"type": "output_text", "text": "", "annotations": []}))
            self.text += event[1]
            return events + [self._ev("response.output_text.delta", item_id=out.msg_id,
                                      output_index=self.msg_index, content_index=0, delta=event[1])]
        if kind == "done":
            return self._finish(event[1])
        return []

    def _finish(self, result: Result) -> list[str]:
        out, events = self.out, []
        status = "incomplete" if result.finish == "length" else "completed"
        if self.rs_index is not None:
            part = {"type": "summary_text", "text": self.reasoning}
            events.append(self._ev("response.reasoning_summary_text.done", item_id=out.rs_id,
                                   output_index=self.rs_index, summary_index=0, text=self.reasoning))
            events.append(self._ev("response.reasoning_summary_part.done", item_id=out.rs_id,
                                   output_index=self.rs_index, summary_index=0, part=part))
            events.append(self._ev("response.output_item.done", output_index=self.rs_index,
                                   item=out.reasoning_item(self.reasoning, result.thinking_closed)))
        # A malformed tool block comes back as text: send the unsent tail (§8.4 step 4).
        closed = result.thinking_closed or self.out.mode == "chat"
        if closed and result.content.startswith(self.text) and len(result.content) > len(self.text):
            events += self.feed(("text", result.content[len(self.text):]))
        if self.msg_index is not None:
            part = {"type": "output_text", "text": result.content, "annotations": []}
            events.append(self._ev("response.output_text.done", item_id=out.msg_id, output_index=self.msg_index,
                                   content_index=0, text=result.content))
            events.append(self._ev("response.content_part.done", item_id=out.msg_id, output_index=self.msg_index,
                                   content_index=0, part=part))
            events.append(self._ev("response.output_item.done", output_index=self.msg_index,
                                   item=out.message_item(result.content, status)))
        for item in out.call_items(result, status):
            events += self._call_events(item)
        terminal = "response.incomplete" if status == "incomplete" else "response.completed"
        body = out.envelope(status, out.items(result, bool(self.reasoning)), result)
        return events + [self._ev(terminal, response=body)]

    def _call_events(self, item: dict) -> list[str]:
        index, self.index = self.index, self.index + 1
        added = dict(item, status="in_progress", arguments="")
        return [self._ev("response.output_item.added", output_index=index, item=added),
                self._ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                         delta=item["arguments"]),
                self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                         name=item["name"], arguments=item["arguments"]),
                self._ev("response.output_item.done", output_index=index, item=item)]

    def fail(self, message: str) -> list[str]:
        if not self.created:
            return [openai_error_event(message)]
        body = self.out.envelope("failed", [], None)
        body["error"] = {"code": "server_error", "message": message}
        return [self._ev("response.failed", response=body)]
