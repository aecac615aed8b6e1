"""Live tests: the real `ds4-server` process on a tiny generated GGUF (1 layer, random
weights), on a free port of 127.0.0.1, driven by the official `openai` and `anthropic`
clients.

Oracles: greedy decoding (chat mode, temperature 0) is deterministic, so a streamed
answer must equal the non-streamed answer to the same prompt, and concurrent clients
must each get exactly the answer their prompt gets alone. Tool-call round trips run on
a second server started with the test-only `--debug-forced-output` switch (random tiny
weights never write DSML by themselves): the forced text goes through the real
session, parser and replay; the continuation must prefill only what the KV lacked.
"""

from __future__ import annotations

import json
import threading

import anthropic
import httpx
import openai
import pytest
from server_live import LiveServer, claude, oai
from server_samples import ARGS, FORCED, TOOLS


MODEL = "deepseek-v4-flash"
GREEDY = {"temperature": 0, "reasoning_effort": "none", "max_tokens": 4}
# A continuation prefills EOS + the tool-result turn + the generation prefix: a few dozen
# tokens on the near-byte-level tiny vocabulary, against ~1100 for the whole prompt.
SUFFIX_MAX = 40


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory):
    server = LiveServer(tiny_model, tmp_path_factory.mktemp("live"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def forced(tiny_model, tmp_path_factory):
    server = LiveServer(tiny_model, tmp_path_factory.mktemp("forced"), "--debug-forced-output", FORCED, "-n", "200")
    yield server
    server.stop()


def ask(client, text: str, **extra):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **GREEDY, **extra)


def raw_text(message) -> str:
    """The generated text of a chat-mode answer. The final parser splits a stray
    `</think>` into reasoning even in chat mode, the streaming one does not
    (prompt.md §8 step 7, dwarfstar.text.dsml), so compare the text they both came from."""
    reasoning = getattr(message, "reasoning_content", None)
    return (reasoning + "</think>" if reasoning is not None else "") + message.content


def test_chat_stream_equals_nonstream(live):
    client = oai(live)
    whole = ask(client, "Tell me a story")
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 4
    chunks = list(ask(client, "Tell me a story", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == raw_text(whole.choices[0].message)
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions(live):
    client = oai(live)
    whole = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, temperature=0,
                                      extra_body={"reasoning_effort": "none"})
    streamed = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, temperature=0, stream=True,
                                         extra_body={"reasoning_effort": "none"})
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.id.startswith("cmpl-") and whole.usage.completion_tokens == 3


def test_responses(live):
    client = oai(live)
    whole = client.responses.create(model=MODEL, input="Hello", max_output_tokens=3, temperature=0,
                                    reasoning={"effort": "none"})
    assert whole.status == "incomplete" and whole.usage.output_tokens == 3
    # The SDK's stream helper only accepts response.completed; a length cut ends incomplete.
    events = list(client.responses.create(model=MODEL, input="Hello", max_output_tokens=3, temperature=0,
                                          reasoning={"effort": "none"}, stream=True))
    assert events[-1].type == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text


def test_messages(live):
    client = claude(live)
    kwargs = dict(model=MODEL, max_tokens=3, extra_body={"temperature": 0}, thinking={"type": "disabled"},
                  messages=[{"role": "user", "content": "Hi"}])
    whole = client.messages.create(**kwargs)
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 3
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [b.text for b in final.content if b.type == "text"] == [b.text for b in whole.content if b.type == "text"]


def test_bad_input_keeps_serving(live):
    client = oai(live)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[])
    assert err.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 5000}])
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(anthropic.BadRequestError):
        claude(live).messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_unknown", "content": "x"}]}])
    response = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and response.json()["error"]["message"] == "invalid JSON request"
    assert ask(client, "still there?").choices[0].message.content is not None


def test_concurrent_streams_and_a_killed_client(live):
    prompts = [f"Client number {i} says hello" for i in range(10)]
    client = oai(live)
    expected = [raw_text(ask(client, p).choices[0].message) for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        chunks = ask(oai(live), prompts[i], stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def killed() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "I will hang up"}], "stream": True,
                **dict(GREEDY, max_tokens=200)}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if '"content"' in line:
                    break

    threads = [threading.Thread(target=killed)] + [threading.Thread(target=run, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    assert [results.get(i) for i in range(10)] == expected
    # The next request after the disconnect is served normally.
    assert raw_text(ask(client, prompts[0]).choices[0].message) == expected[0]
    trace = live.trace.read_text()
    assert "failed: generation failed: client disconnected" in trace
    assert live.alive()


def test_chat_tool_round_trip(forced):
    client = oai(forced)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    call = message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS
    history = messages + [message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=1)
    held = first.usage.prompt_tokens + first.usage.completion_tokens
    details = second.usage.prompt_tokens_details
    assert details.cached_tokens == held
    assert details.cache_write_tokens == second.usage.prompt_tokens - held < SUFFIX_MAX


def test_chat_tool_stream(forced):
    chunks = list(oai(forced).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, stream=True))
    deltas = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call_")
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_messages_tool_round_trip(forced):
    client = claude(forced)
    tools = [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with client.messages.stream(model=MODEL, max_tokens=200, messages=messages, tools=tools) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    tool_use = first.content[-1]
    assert tool_use.type == "tool_use" and tool_use.input == ARGS
    history = messages + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id,
                                                        "content": "sunny"}]}]
    second = client.messages.create(model=MODEL, max_tokens=1, messages=history, tools=tools)
    held = first.usage.cache_read_input_tokens + first.usage.cache_creation_input_tokens + first.usage.output_tokens
    assert second.usage.cache_read_input_tokens == held
    assert second.usage.cache_creation_input_tokens < SUFFIX_MAX


def test_responses_tool_round_trip(forced):
    client = oai(forced)
    tools = [dict(TOOLS[0]["function"], type="function")]
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=tools,
                                    reasoning={"effort": "high", "summary": "auto"})
    call = first.output[-1]
    assert call.type == "function_call" and json.loads(call.arguments) == ARGS
    items = [{"role": "user", "content": "Weather in Paris?"}]
    items += [item.model_dump(exclude_none=True, exclude={"status", "id"}) for item in first.output]
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny"})
    second = client.responses.create(model=MODEL, input=items, tools=tools, max_output_tokens=1)
    held = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens == held
    assert second.usage.input_tokens - held < SUFFIX_MAX
