"""SSE event sequences, tool-call projection, stop sequences and failures (server.md §7, §8),
in-process on the fake engine with a forced generation (the `--debug-forced-output`
test switch), so the expected output is known exactly."""

from __future__ import annotations

import json

from server_samples import ARGS, CHAT, DSML, FORCED, TOOLS, USER, events


def test_chat_stream_order_and_tool_deltas(make_server):
    server = make_server(debug_forced_output=FORCED)
    body = {"messages": USER, "tools": TOOLS, "stream": True, "stream_options": {"include_usage": True}}
    seq = events(server.client.post(CHAT, json=body))
    kinds = []
    for _, data in seq:
        if data == "[DONE]":
            kinds.append("done")
        elif not data["choices"]:
            kinds.append("usage")
        else:
            delta, finish = data["choices"][0]["delta"], data["choices"][0]["finish_reason"]
            kinds.append(f"finish:{finish}" if finish else next(iter(delta), "empty"))
    order = ["role", "reasoning_content", "content", "tool_calls", "finish:tool_calls", "usage", "done"]
    squeezed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert squeezed == order, kinds
    reasoning = "".join(d["choices"][0]["delta"].get("reasoning_content", "") for _, d in seq[:-1] if d["choices"])
    content = "".join(d["choices"][0]["delta"].get("content") or "" for _, d in seq[:-1] if d["choices"])
    assert reasoning == "Let me look." and content == "Sure."
    calls = [c for _, d in seq[:-1] if d["choices"] for c in d["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and len(calls[0]["id"]) == 5 + 32
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    streamed = "".join(c["function"]["arguments"] for c in calls)
    # The fragments concatenate to the arguments; `&amp;` reaches the client unchanged.
    assert json.loads(streamed) == ARGS
    usage = seq[-2][1]["usage"]
    assert usage["completion_tokens"] == len(server.engine.tokenizer.encode(FORCED))


def test_chat_nonstream_tool_call(make_server):
    server = make_server(debug_forced_output=FORCED)
    reply = server.client.post(CHAT, json={"messages": USER, "tools": TOOLS}).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Sure." and message["reasoning_content"] == "Let me look."
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"] == json.dumps(ARGS, separators=(",", ":"))
    assert server.memory._map[call["id"]] == DSML


def test_anthropic_stream_order(make_server):
    server = make_server(debug_forced_output=FORCED)
    body = {"messages": USER, "max_tokens": 200, "stream": True,
            "tools": [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]}
    seq = events(server.client.post("/v1/messages", json=body))
    names = [name for name, _ in seq]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    starts = [d["content_block"]["type"] for n, d in seq if n == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    indices = [d["index"] for n, d in seq if n == "content_block_start"]
    assert indices == [0, 1, 2]
    deltas = [d["delta"] for n, d in seq if n == "content_block_delta"]
    assert {"type": "signature_delta", "signature": seq[0][1]["message"]["id"]} in deltas
    partial = "".join(d["partial_json"] for d in deltas if d["type"] == "input_json_delta")
    assert json.loads(partial) == ARGS
    tool_block = [d["content_block"] for n, d in seq if n == "content_block_start"][2]
    assert tool_block["id"].startswith("toolu_")
    assert seq[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_responses_stream_sequence(make_server):
    server = make_server(debug_forced_output=FORCED)
    body = {"input": "weather?", "tools": [dict(TOOLS[0]["function"], type="function")], "stream": True,
            "reasoning": {"effort": "high", "summary": "auto"}}
    seq = [d for _, d in events(server.client.post("/v1/responses", json=body))]
    assert [d["sequence_number"] for d in seq] == list(range(len(seq)))
    types = [d["type"] for d in seq]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.index("response.reasoning_summary_text.delta") < types.index("response.output_text.delta")
    assert types.index("response.output_text.done") < types.index("response.function_call_arguments.delta")
    final = seq[-1]["response"]
    kinds = [item["type"] for item in final["output"]]
    assert kinds == ["reasoning", "message", "function_call"]
    call = final["output"][2]
    assert json.loads(call["arguments"]) == ARGS and call["call_id"].startswith("call_")


def test_completion_stream_is_raw_text(make_server):
    server = make_server(debug_forced_output="a</think>b")
    seq = events(server.client.post("/v1/completions", json={"prompt": "x", "stream": True}))
    text = "".join(d["choices"][0]["text"] for _, d in seq[:-1])
    assert text == "a</think>b" and seq[-2][1]["choices"][0]["finish_reason"] == "stop"
    assert seq[-1][1] == "[DONE]"


def test_stop_sequence_cut_stream_and_final_agree(make_server):
    server = make_server(debug_forced_output="hello world STOP more text")
    body = {"messages": USER, "stop": ["STOP", "zzz"], "reasoning_effort": "none"}
    reply = server.client.post(CHAT, json=body).json()
    assert reply["choices"][0]["message"]["content"] == "hello world "
    assert reply["choices"][0]["finish_reason"] == "stop"
    seq = events(server.client.post(CHAT, json=dict(body, stream=True)))
    streamed = "".join(d["choices"][0]["delta"].get("content", "") for _, d in seq[:-1])
    assert streamed == "hello world "


def test_unterminated_tool_call_fails(make_server):
    server = make_server(debug_forced_output="x</think>" + DSML[:60], tokens=400)
    failed = server.client.post(CHAT, json={"messages": USER, "tools": TOOLS})
    assert failed.status_code == 500
    assert failed.json()["error"] == {"message": "generation failed: unterminated tool call", "type": "server_error",
                                      "param": None, "code": None}
    seq = events(server.client.post(CHAT, json={"messages": USER, "tools": TOOLS, "stream": True}))
    assert seq[-1][0] == "error" and all(d != "[DONE]" for _, d in seq)
    failed = server.client.post("/v1/messages", json={"messages": USER, "max_tokens": 400, "tools": [
        {"name": "get_weather", "input_schema": {"type": "object"}}]})
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "api_error"


def test_max_tokens_zero_is_empty_length(server):
    reply = server.client.post(CHAT, json={"messages": USER, "max_tokens": 0}).json()
    assert reply["choices"][0]["message"]["content"] == "" and reply["choices"][0]["finish_reason"] == "length"
    message = server.client.post("/v1/messages", json={"messages": USER, "max_tokens": 0}).json()
    assert message["content"] == [{"type": "text", "text": ""}] and message["stop_reason"] == "max_tokens"
