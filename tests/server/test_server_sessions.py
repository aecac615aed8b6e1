"""Live-session prefix reuse and exact DSML replay (server.md §9, prompt.md §11, §13).

Oracle: the fake session counts what it really prefills. A continuation that reuses
the whole live state must report cached == previous prompt + previous completion
(everything the KV held) and prefill only the rest."""

from __future__ import annotations

from server_samples import CHAT, DSML, FORCED, TOOLS, USER

from dwarfstar.server.convo import ToolMemory

ANTHROPIC_TOOLS = [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]


def _reuse(first_usage: dict, second_usage: dict, prefill_key: str, cached_key: str, prompt_key: str) -> None:
    held = first_usage[prompt_key] + first_usage["completion_tokens" if "completion_tokens" in first_usage
                                                 else "output_tokens"]
    assert second_usage[cached_key] == held
    assert second_usage[prefill_key] == second_usage[prompt_key] - held


def test_chat_tool_round_trip_prefills_only_the_suffix(make_server):
    server = make_server(debug_forced_output=FORCED)
    first = server.client.post(CHAT, json={"messages": USER, "tools": TOOLS}).json()
    message = first["choices"][0]["message"]
    history = USER + [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny"}]
    before = server.session.n_prefilled_total
    second = server.client.post(CHAT, json={"messages": history, "tools": TOOLS})
    usage = second.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == first["usage"]["prompt_tokens"] + \
        first["usage"]["completion_tokens"]
    prefilled = usage["prompt_tokens_details"]["cache_write_tokens"]
    assert prefilled == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert server.session.n_prefilled_total - before == prefilled
    assert int(second.headers["x-ds4-prefilled-tokens"]) == prefilled
    # The rendered prompt holds the sampled bytes, `[1,2]` (canonical would be `[1, 2]`).
    assert DSML in server.engine.tokenizer.decode(server.session.tokens)
    trace = open(server.options.trace).read()
    assert "cache_source: memory-token" in trace and "tool_replay: mem=1" in trace


def test_without_exact_replay_the_prefix_is_lost(make_server):
    server = make_server(debug_forced_output=FORCED, exact_dsml_replay=False)
    first = server.client.post(CHAT, json={"messages": USER, "tools": TOOLS}).json()
    message = first["choices"][0]["message"]
    history = USER + [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny"}]
    usage = server.client.post(CHAT, json={"messages": history, "tools": TOOLS}).json()["usage"]
    held = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] < held


def test_thinking_visible_continuation_keeps_eos(make_server):
    server = make_server(debug_forced_output="hidden reasoning</think>the answer")
    first = server.client.post(CHAT, json={"messages": USER}).json()
    assert first["choices"][0]["message"]["content"] == "the answer"
    held = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    history = USER + [{"role": "assistant", "content": "the answer"}, {"role": "user", "content": "and?"}]
    usage = server.client.post(CHAT, json={"messages": history, "max_tokens": 0}).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == held
    # The reasoning stays in the KV; the EOS the next prompt renders follows the answer.
    assert server.session.tokens[held] == server.engine.tokenizer.eos_id
    assert "cache_source: thinking-visible" in open(server.options.trace).read()


def test_anthropic_tool_result_continues_from_live_turn(make_server):
    server = make_server(debug_forced_output=FORCED)
    first = server.client.post("/v1/messages", json={"messages": USER, "max_tokens": 300,
                                                     "tools": ANTHROPIC_TOOLS}).json()
    tool_use = first["content"][-1]
    assert tool_use["type"] == "tool_use" and tool_use["input"] == {"city": "Paris &amp; Lyon", "days": [1, 2]}
    # Full replay: the assistant turn is sent back as the client received it.
    history = USER + [{"role": "assistant", "content": first["content"]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"],
                                                    "content": "sunny"}]}]
    second = server.client.post("/v1/messages", json={"messages": history, "max_tokens": 300,
                                                      "tools": ANTHROPIC_TOOLS}).json()
    held = first["usage"]["cache_read_input_tokens"] + first["usage"]["cache_creation_input_tokens"] + \
        first["usage"]["output_tokens"]
    assert second["usage"]["cache_read_input_tokens"] == held
    # Tool result only (history not replayed): the live binding explains the id.
    tool_use = second["content"][-1]
    tail = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"], "content": "rain"}]}]
    third = server.client.post("/v1/messages", json={"messages": tail, "max_tokens": 0})
    assert third.status_code == 200, third.text
    held = second["usage"]["cache_read_input_tokens"] + second["usage"]["cache_creation_input_tokens"] + \
        second["usage"]["output_tokens"]
    assert third.json()["usage"]["cache_read_input_tokens"] == held
    assert "cache_source: anthropic-tool-output" in open(server.options.trace).read()


def test_responses_round_trip_reuses_prefix(make_server):
    server = make_server(debug_forced_output=FORCED)
    tools = [dict(TOOLS[0]["function"], type="function")]
    first = server.client.post("/v1/responses", json={"input": "weather?", "tools": tools,
                                                      "reasoning": {"summary": "auto"}}).json()
    call = first["output"][-1]
    items = [{"role": "user", "content": "weather?"}] + [
        {k: v for k, v in item.items() if k not in ("status", "id")} for item in first["output"]]
    items.append({"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"})
    second = server.client.post("/v1/responses", json={"input": items, "tools": tools}).json()
    held = first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert second["usage"]["input_tokens_details"]["cached_tokens"] == held


def test_tool_memory_is_bounded_lru():
    memory = ToolMemory(max_ids=2)
    memory.remember(["a"], "A")
    memory.remember(["b"], "B")
    assert memory.attach([{"role": "assistant", "tool_calls": [{"id": "a"}]}])["mem"] == 1  # a is now recent
    memory.remember(["c"], "C")
    assert "a" in memory and "c" in memory and "b" not in memory
    mixed = [{"role": "assistant", "content": "", "tool_calls": [{"id": "a"}, {"id": "c"}]}]
    counts = memory.attach(mixed)
    # Ids from two different blocks cannot be replayed exactly: canonical rendering.
    assert counts == {"mem": 0, "canonical": 1, "missing_ids": 0} and "raw_dsml" not in mixed[0]
