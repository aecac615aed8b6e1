"""Request body -> Job: parse, map, render, tokenize, check the context (connection side).

Contract: `read_json(raw)` parses a body the way server.md §3.3 asks (strict
UTF-8, Python's json for key order and int/float, nesting <= 256, no lone
surrogates) or raises the 400 `invalid JSON request`. `Preparer.build(api,
body, raw)` returns a Job ready for the worker queue, or raises ApiError;
every 4xx of a generation request is decided here, before queueing.
With the disk cache on, the tool ids the request names that the RAM tool
memory lacks are looked up in the cache files' tool maps first (server.md
§10.5), so exact DSML replay also finds blocks saved by another process.
"""

from __future__ import annotations

import itertools
import json
import re

from dwarfstar.server import anthropic, convo, openai, responses
from dwarfstar.server.errors import ApiError, context_exceeded, invalid_json
from dwarfstar.server.job import Job
from dwarfstar.shape import BOS, EOS
from dwarfstar.text.chat import ChatError, render

MAX_NESTING = 256
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
PROMPT_PARAM = {"chat": "messages", "completion": "prompt", "anthropic": None, "responses": "input"}


def _depth(text: str) -> int:
    """Deepest array/object nesting, with strings (and their brackets) removed."""
    steps = (1 if b in "[{" else -1 for b in _BRACKETS.findall(_STRING.sub("", text)))
    return max(itertools.accumulate(steps, initial=0))


def read_json(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_json() from None
    if _depth(text) > MAX_NESTING:
        raise invalid_json()
    try:
        body = json.loads(text)
        # Unpaired surrogate escapes cannot become UTF-8 again: reject them (§3.3).
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError):
        raise invalid_json() from None
    if not isinstance(body, dict):
        raise invalid_json()
    return body


class Preparer:
    def __init__(self, tokenizer, options, memory, worker):
        self.tokenizer = tokenizer
        self.options = options
        self.memory = memory
        self.worker = worker

    def build(self, api: str, body: dict, raw: bytes) -> Job:
        ctx, n = self.options.ctx, self.options.tokens
        live_only: set[str] = set()
        has_tools, want_summary = False, False
        if api == "chat":
            messages, params, has_tools = openai.parse_chat(body, ctx, n)
        elif api == "completion":
            messages, params = openai.parse_completion(body, ctx, n)
        elif api == "anthropic":
            live = self.worker.live_tool_ids("anthropic")
            messages, params, has_tools, live_only = anthropic.parse_messages(body, ctx, n, live)
        else:
            live = self.worker.live_tool_ids("responses")
            messages, params, has_tools, want_summary, live_only = responses.parse_responses(body, ctx, n, live)
        if self.worker.disk is not None:
            self.worker.disk.restore_tools(convo.mentioned_tool_ids(messages))
        counts = self.memory.attach(messages)
        prompt_text = self._render(messages, params.mode, api)
        tokens = self.tokenizer.encode(prompt_text)
        if len(tokens) >= ctx:
            raise context_exceeded(len(tokens), ctx, PROMPT_PARAM[api])
        job = Job(api=api, params=params, prompt_text=prompt_text, prompt_tokens=tokens, has_tools=has_tools,
                  parse_output=api != "completion", id_prefix="toolu_" if api == "anthropic" else "call_",
                  raw_body=raw.decode("utf-8", "replace"), replay_counts=counts, want_summary=want_summary)
        if live_only:
            job.live_tool_ids = live_only
            job.live_tail = self._live_tail(messages, params.mode, api)
        return job

    def _render(self, messages: list[dict], mode: str, api: str) -> str:
        try:
            return render(messages, mode=mode, ctx=self.options.ctx)
        except ChatError as err:
            raise ApiError(400, str(err), PROMPT_PARAM[api]) from None

    def _live_tail(self, messages: list[dict], mode: str, api: str) -> str:
        """EOS + the trailing tool-result turn and its transition (prompt.md §13),
        rendered by the same renderer: the turn starts after the last assistant."""
        start = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1) + 1
        tail = [m for m in messages[start:] if m["role"] in ("user", "tool")]
        text = self._render(tail, mode, api)
        return EOS + text[len(BOS):]
