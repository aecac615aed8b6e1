"""Thinking on and off through the official `openai` and `anthropic` clients against the
real `ds4-server` process (server.md §4, §5, §6, §8; prompt.md §8 step 7, §12).

Two servers on the tiny generated GGUF, each with the test-only `--debug-forced-output`
switch so the generation is known: THOUGHT (reasoning, `</think>`, answer) for thinking
mode and ANSWER (plain text) for chat mode. Oracles: the response fields each API
defines for reasoning and text, and, from `--trace`, the rendered prompt (thinking mode
ends the prompt with `<think>`, chat mode with `</think>`, prompt.md §4) and the sampling
settings the worker used (thinking mode ignores the client's knobs: temperature 1,
top_p 1, min_p 0.05, top_k 0, server.md §6).
"""

from __future__ import annotations

import pytest
from server_live import LiveServer, claude, oai


MODEL = "deepseek-v4-flash"
REASONING, ANSWER = "step one", "The answer."
THOUGHT = REASONING + "</think>" + ANSWER
# Client knobs that thinking mode must ignore (and chat mode must keep).
KNOBS = {"temperature": 0.25, "top_p": 0.5}
THINKING_SAMPLING = {"temperature": "1.000", "top_p": "1.000", "min_p": "0.050", "top_k": "0"}
USER = [{"role": "user", "content": "What is it?"}]
# The rendered prompt of USER up to the mode tag (prompt.md §4, §12); no Think Max prefix.
RENDERED = "<｜begin▁of▁sentence｜><｜User｜>What is it?<｜Assistant｜>"


@pytest.fixture(scope="module")
def thinker(tiny_model, tmp_path_factory):
    server = LiveServer(tiny_model, tmp_path_factory.mktemp("thinker"), "--debug-forced-output", THOUGHT, "-n", "64")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(tiny_model, tmp_path_factory):
    server = LiveServer(tiny_model, tmp_path_factory.mktemp("plain"), "--debug-forced-output", ANSWER, "-n", "64")
    yield server
    server.stop()


def last_request(server) -> dict:
    """The newest complete trace block: its header fields and rendered prompt (server.md §11).
    Requests run one at a time and the block ends before the answer is sent."""
    block = server.trace.read_text().split("\n===== request ")[-1]
    assert "===== end request" in block
    header = block.split("\n\n", 1)[0].splitlines()[1:]
    fields = dict(line.split(": ", 1) for line in header)
    fields["prompt"] = block.split("\n--- rendered prompt ---\n", 1)[1].split("\n\n--- generated text ---\n", 1)[0]
    return fields


def assert_thinking(server, sampling=THINKING_SAMPLING) -> None:
    request = last_request(server)
    assert request["think_mode"] == "high"
    assert request["prompt"] == RENDERED + "<think>"
    assert {k: request[k] for k in sampling} == sampling


def assert_chat(server) -> None:
    request = last_request(server)
    assert request["think_mode"] == "none"
    assert request["prompt"] == RENDERED + "</think>"


# OpenAI chat completions: thinking on by default, also with `thinking`/`reasoning_effort`.

@pytest.mark.parametrize("extra", [
    {},
    {"reasoning_effort": "high"},
    {"extra_body": {"thinking": {"type": "enabled"}}},
    # An explicit control beats the deepseek-chat alias (§5).
    {"model": "deepseek-chat", "extra_body": {"think": True}},
    # Think Max needs a 393216-token context; on this 4096-token server it is plain thinking.
    {"reasoning_effort": "max"},
    {"model": "deepseek-reasoner"},
])
def test_chat_thinking_reasoning_content(thinker, extra):
    kwargs = dict({"model": MODEL, "messages": USER, **KNOBS}, **extra)
    message = oai(thinker).chat.completions.create(**kwargs).choices[0].message
    assert message.reasoning_content == REASONING and message.content == ANSWER
    assert_thinking(thinker)


def test_chat_thinking_stream_deltas(thinker):
    chunks = list(oai(thinker).chat.completions.create(model=MODEL, messages=USER, stream=True, **KNOBS))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    kinds = ["reasoning" if getattr(d, "reasoning_content", None) else "content" if d.content else None
             for d in deltas]
    kinds = [k for k in kinds if k]
    assert kinds == sorted(kinds, key=["reasoning", "content"].index) and set(kinds) == {"reasoning", "content"}
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert_thinking(thinker)


@pytest.mark.parametrize("extra", [
    {"model": "deepseek-chat"},
    {"extra_body": {"thinking": {"type": "disabled"}}},
    {"extra_body": {"think": False}},
    {"reasoning_effort": "none"},
    # reasoning_effort is not an explicit control: the deepseek-chat alias still applies (§5).
    {"model": "deepseek-chat", "reasoning_effort": "high"},
])
def test_chat_thinking_off_is_all_text(plain, extra):
    kwargs = dict({"model": MODEL, "messages": USER, **KNOBS}, **extra)
    reply = oai(plain).chat.completions.create(**kwargs)
    message = reply.choices[0].message
    assert message.content == ANSWER and getattr(message, "reasoning_content", None) is None
    assert reply.model == kwargs["model"]
    assert_chat(plain)
    # Chat mode keeps the client's sampling knobs.
    request = last_request(plain)
    assert (request["temperature"], request["top_p"]) == ("0.250", "0.500")


def test_chat_thinking_off_stream(plain):
    chunks = list(oai(plain).chat.completions.create(model="deepseek-chat", messages=USER, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(getattr(d, "reasoning_content", None) for d in deltas)
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert_chat(plain)


# Anthropic messages: a thinking block (signature = message id), text apart.

@pytest.mark.parametrize("thinking", [None, {"type": "enabled", "budget_tokens": 1024}])
def test_messages_thinking_block(thinker, thinking):
    extra = {"thinking": thinking} if thinking else {}
    message = claude(thinker).messages.create(model=MODEL, max_tokens=64, messages=USER,
                                              extra_body={"temperature": 0.25, "top_k": 3}, **extra)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == REASONING and message.content[0].signature == message.id
    assert message.content[1].text == ANSWER and message.stop_reason == "end_turn"
    assert_thinking(thinker)


def test_messages_thinking_stream(thinker):
    with claude(thinker).messages.stream(model=MODEL, max_tokens=64, messages=USER,
                                          extra_body={"temperature": 0.25}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == REASONING
    assert "".join(d.text for d in deltas if d.type == "text_delta") == ANSWER
    assert [d.signature for d in deltas if d.type == "signature_delta"] == [final.id]
    assert [d.type for d in deltas].index("text_delta") > [d.type for d in deltas].index("signature_delta")
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == REASONING and final.content[1].text == ANSWER
    assert_thinking(thinker)


@pytest.mark.parametrize("stream, extra", [
    (False, {"thinking": {"type": "disabled"}}),
    (True, {"thinking": {"type": "disabled"}}),
    (False, {"model": "deepseek-chat"}),
    (False, {"extra_body": {"output_config": {"effort": "none"}}}),
])
def test_messages_thinking_off(plain, stream, extra):
    kwargs = dict({"model": MODEL, "max_tokens": 64, "messages": USER}, **extra)
    kwargs["extra_body"] = dict(kwargs.get("extra_body", {}), temperature=0.25)
    if stream:
        with claude(plain).messages.stream(**kwargs) as events:
            blocks = [e.content_block.type for e in events if e.type == "content_block_start"]
            message = events.get_final_message()
        assert blocks == ["text"]
    else:
        message = claude(plain).messages.create(**kwargs)
    assert [(b.type, b.text) for b in message.content] == [("text", ANSWER)]
    assert_chat(plain)
    assert last_request(plain)["temperature"] == "0.250"


# Responses: a reasoning item (when summaries are asked for), the message apart.

def test_responses_reasoning_item(thinker):
    response = oai(thinker).responses.create(model=MODEL, input="What is it?", temperature=0.25,
                                             reasoning={"effort": "medium", "summary": "auto"})
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and [s.text for s in reasoning.summary] == [REASONING]
    assert message.type == "message" and response.output_text == ANSWER
    assert response.status == "completed"
    assert_thinking(thinker)


def test_responses_reasoning_stream(thinker):
    events = list(oai(thinker).responses.create(model=MODEL, input="What is it?", stream=True, temperature=0.25,
                                                reasoning={"effort": "high", "summary": "detailed"}))
    types = [e.type for e in events]
    summary = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert summary == REASONING and text == ANSWER
    assert types.index("response.reasoning_summary_text.delta") < types.index("response.output_text.delta")
    final = events[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == ["reasoning", "message"]
    assert final.response.output_text == ANSWER
    assert_thinking(thinker)


def test_responses_thinking_without_summary_hides_reasoning(thinker):
    # Thinking is on by default; without a summary request the reasoning is not exposed.
    response = oai(thinker).responses.create(model=MODEL, input="What is it?")
    assert [item.type for item in response.output] == ["message"] and response.output_text == ANSWER
    assert_thinking(thinker)


@pytest.mark.parametrize("extra", [{"reasoning": {"effort": "none", "summary": "auto"}}, {"model": "deepseek-chat"}])
@pytest.mark.parametrize("stream", [False, True])
def test_responses_thinking_off(plain, extra, stream):
    kwargs = dict({"model": MODEL, "input": "What is it?", "temperature": 0.25}, **extra)
    if stream:
        events = list(oai(plain).responses.create(stream=True, **kwargs))
        assert not any("reasoning" in e.type for e in events)
        response = events[-1].response
    else:
        response = oai(plain).responses.create(**kwargs)
    assert [item.type for item in response.output] == ["message"] and response.output_text == ANSWER
    assert response.status == "completed"
    assert_chat(plain)
    assert last_request(plain)["temperature"] == "0.250"
