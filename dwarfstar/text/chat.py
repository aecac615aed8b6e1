"""Conversation -> prompt text, byte for byte as DeepSeek's official V4 encoder (prompt.md §3-§6).

Contract:
- `render(messages, tools=None, mode="chat"|"thinking"|"max", ...)` returns the whole
  prompt text, starting with BOS and, for a conversation ending in a user/developer
  turn, ending with the generation prefix `<｜Assistant｜></think>` (chat) or
  `<｜Assistant｜><think>` (thinking, max). Feed it to `Tokenizer.encode` as is.
- Messages are dicts in the official encoder's vocabulary (prompt.md §3): role, content,
  reasoning_content, tool_calls, tool_call_id, tools, response_format, task, wo_eos and
  the server's raw_dsml. The caller's dicts are never modified.
- Bad input raises `ChatError` (a ValueError; the server answers 400) with one message
  naming the message index and the problem. Orderings the official encoder accepts are
  rendered exactly as it renders them, quirks included (prompt.md §5.5).
- Deliberate differences from the encoder, all on input it mishandles: null content
  renders as "" (the encoder writes "None" or crashes); valid JSON arguments that are
  not an object render like invalid JSON (the encoder crashes); tools on assistant,
  tool or latest_reminder messages are refused.

Pipeline (prompt.md §5.1): attach request tools -> merge tool results and consecutive
user messages into user turns -> sort tool results by call order -> drop earlier
reasoning (thinking mode, no tools defined) -> render each message and its transition.
"""

from __future__ import annotations

import copy
import enum

from dwarfstar.shape import ASSISTANT, BOS, EOS, LATEST_REMINDER, THINK_CLOSE, THINK_OPEN, USER
from dwarfstar.text.dsml_render import call_name_and_arguments, json_text, render_tool_calls

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
TASK_TOKENS = {
    "action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
    "domain": "<｜domain｜>", "title": "<｜title｜>", "read_url": "<｜read_url｜>",
}
# ds4's DS4_THINK_MAX_MIN_CONTEXT ("384K" in the model card): below it, max renders as high.
THINK_MAX_MIN_CONTEXT = 393216

THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
    "root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
TOOLS_HEAD = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools "
    'by writing a "<｜DSML｜tool_calls>" block like the following:\n\n'
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    "...\n</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    "...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_FOOT = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
RESPONSE_FORMAT_HEAD = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


class ChatError(ValueError):
    """The conversation cannot be rendered; the message says which message and why."""


class ChatMode(str, enum.Enum):
    CHAT = "chat"
    THINKING = "thinking"
    MAX = "max"


def resolve_mode(mode: str | ChatMode, ctx: int | None = None) -> ChatMode:
    """The mode actually rendered: Think Max needs a context of THINK_MAX_MIN_CONTEXT tokens."""
    try:
        mode = ChatMode(mode)
    except ValueError:
        raise ChatError(f"unknown chat mode {mode!r}; expected chat, thinking or max") from None
    if mode is ChatMode.MAX and ctx is not None and ctx < THINK_MAX_MIN_CONTEXT:
        return ChatMode.THINKING
    return mode


def render(messages: list[dict], tools: list[dict] | None = None, mode: str | ChatMode = "chat", *,
           response_format: object = None, ctx: int | None = None) -> str:
    """The prompt text of `messages`; request-level `tools`/`response_format` go on the
    first message if it is a system message, else on a new empty system message (§6.1)."""
    mode = resolve_mode(mode, ctx)
    thinking = mode is not ChatMode.CHAT
    msgs = [_checked(i, m) for i, m in enumerate(messages)]
    msgs = _attach(msgs, tools, response_format)
    turns = _sort_tool_results(_merge_user_turns(msgs))
    drop = thinking and not any(m.get("tools") for m in turns)
    if drop:
        turns = _drop_earlier_reasoning(turns)
    last_user = _last_user_index(turns)
    out = [BOS]
    for i, m in enumerate(turns):
        if i == 0 and mode is ChatMode.MAX:
            out.append(THINK_MAX_PREFIX)
        out.append(_render_message(i, turns, thinking, drop, last_user))
        out.append(_transition(i, turns, thinking, drop, last_user))
    return "".join(out)


def _checked(i: int, m: object) -> dict:
    """A deep copy of message `i` after the checks the official encoder makes (or crashes on)."""
    if not isinstance(m, dict):
        raise ChatError(f"messages[{i}] is not an object")
    role = m.get("role")
    if role not in ROLES:
        raise ChatError(f"messages[{i}]: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    content = m.get("content")
    if not (content is None or isinstance(content, str) or (role == "tool" and isinstance(content, list))):
        raise ChatError(f"messages[{i}] ({role}): content must be a string")
    if role == "developer" and not content:
        raise ChatError(f"messages[{i}]: a developer message needs non-empty content")
    task = m.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise ChatError(f"messages[{i}]: unknown task {task!r}; expected one of {', '.join(TASK_TOKENS)}")
    if m.get("tools") and role not in ("system", "developer", "user"):
        raise ChatError(f"messages[{i}] ({role}): tools belong on a system or developer message")
    if role == "assistant":
        for j, call in enumerate(m.get("tool_calls") or []):
            try:
                call_name_and_arguments(call)
            except (ValueError, AttributeError, TypeError):
                raise ChatError(f"messages[{i}].tool_calls[{j}]: needs function.name and function.arguments") from None
    return copy.deepcopy(m)


def _attach(msgs: list[dict], tools: list[dict] | None, response_format: object) -> list[dict]:
    if not tools and response_format is None:
        return msgs
    if not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": ""}] + msgs
    head = msgs[0]
    if tools:
        if head.get("tools"):
            raise ChatError("tools given both on the request and on the first system message")
        head["tools"] = tools
    if response_format is not None:
        head["response_format"] = response_format
    return msgs


def _merge_user_turns(msgs: list[dict]) -> list[dict]:
    """Tool results and user texts become blocks of user turns (prompt.md §5.1 step 1)."""
    merged: list[dict] = []
    for m in msgs:
        prev = merged[-1] if merged else None
        is_open_turn = prev is not None and prev["role"] == "user" and "blocks" in prev
        if m["role"] == "tool":
            block = {"type": "tool_result", "id": m.get("tool_call_id") or "", "content": m.get("content")}
            if is_open_turn:
                prev["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        elif m["role"] == "user":
            block = {"type": "text", "text": m.get("content") or ""}
            if is_open_turn and prev.get("task") is None:
                prev["blocks"].append(block)
            else:
                turn = {"role": "user", "blocks": [block]}
                # Other keys of the user message (a stray `tools`) are dropped, as the encoder does.
                turn.update({k: m[k] for k in ("task", "wo_eos") if k in m})
                merged.append(turn)
        else:
            merged.append(m)
    return merged


def _call_id(call: dict) -> str:
    return call.get("id") or (call.get("function") or {}).get("id") or ""


def _sort_tool_results(turns: list[dict]) -> list[dict]:
    """Tool results of a turn in the call order of the latest assistant tool calls (§5.1 step 2)."""
    order: dict[str, int] = {}
    for m in turns:
        if m["role"] == "assistant" and m.get("tool_calls"):
            order = {}
            for pos, call in enumerate(m["tool_calls"]):
                if _call_id(call):
                    order[_call_id(call)] = pos
        elif m["role"] == "user" and order:
            results = [b for b in m["blocks"] if b["type"] == "tool_result"]
            if len(results) > 1:
                # Stable sort; an unknown id counts as position 0.
                ranked = iter(sorted(results, key=lambda b: order.get(b["id"], 0)))
                m["blocks"] = [next(ranked) if b["type"] == "tool_result" else b for b in m["blocks"]]
    return turns


def _last_user_index(turns: list[dict]) -> int:
    return max((i for i, m in enumerate(turns) if m["role"] in ("user", "developer")), default=-1)


def _drop_earlier_reasoning(turns: list[dict]) -> list[dict]:
    """Before the last user turn: assistants lose reasoning, developer messages go (§5.1 step 3)."""
    last = _last_user_index(turns)
    kept = []
    for i, m in enumerate(turns):
        if i >= last or m["role"] in ("user", "system", "latest_reminder"):
            kept.append(m)
        elif m["role"] == "assistant":
            kept.append({k: v for k, v in m.items() if k != "reasoning_content"})
    return kept


def _system_extras(m: dict) -> str:
    text = ""
    if m.get("tools"):
        schemas = "\n".join(json_text(t["function"] if "function" in t else t) for t in m["tools"])
        text += "\n\n" + TOOLS_HEAD + schemas + TOOLS_FOOT
    if m.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT_HEAD + json_text(m["response_format"])
    return text


def _tool_result_text(content: object) -> str:
    if isinstance(content, list):
        parts = [b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]" for b in content]
        content = "\n\n".join(parts)
    return "<tool_result>" + (content or "") + "</tool_result>"


def _user_text(m: dict) -> str:
    parts = []
    for b in m["blocks"]:
        if b["type"] == "text":
            parts.append(b["text"])
        else:
            parts.append(_tool_result_text(b["content"]))
    return USER + "\n\n".join(parts)


def _assistant_text(i: int, turns: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    m = turns[i]
    think = ""
    after_task = i > 0 and turns[i - 1].get("task") is not None
    if thinking and not after_task and (not drop or i > last_user):
        think = (m.get("reasoning_content") or "") + THINK_CLOSE
    dsml = ""
    if m.get("tool_calls"):
        dsml = m.get("raw_dsml") or render_tool_calls(m["tool_calls"])
    return think + (m.get("content") or "") + dsml + ("" if m.get("wo_eos") else EOS)


def _render_message(i: int, turns: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    m = turns[i]
    role = m["role"]
    if role == "system":
        return (m.get("content") or "") + _system_extras(m)
    if role == "developer":
        return USER + m["content"] + _system_extras(m)
    if role == "user":
        return _user_text(m)
    if role == "latest_reminder":
        return LATEST_REMINDER + (m.get("content") or "")
    return _assistant_text(i, turns, thinking, drop, last_user)


def _transition(i: int, turns: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    """What follows message i when the model speaks next (§5.2 Transition, §5.4 tasks)."""
    if i + 1 < len(turns) and turns[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    m = turns[i]
    task = m.get("task")
    if task == "action":
        return ASSISTANT + (THINK_OPEN if thinking else THINK_CLOSE) + TASK_TOKENS[task]
    if task is not None:
        return TASK_TOKENS[task]
    if m["role"] in ("user", "developer"):
        return ASSISTANT + (THINK_OPEN if thinking and (not drop or i >= last_user) else THINK_CLOSE)
    return ""
