"""Chat rendering against DeepSeek's official encoder output.

Golden data: the four official fixtures (../shared/spec/encoding-fixtures) and the
worked examples and edge cases quoted in prompt.md §2, §5.5 and §15, all produced by
the official encoder. Comparisons are byte-exact.
"""

import json
from pathlib import Path

import pytest

from dwarfstar.text.chat import (THINK_MAX_MIN_CONTEXT, THINK_MAX_PREFIX, TOOLS_FOOT, TOOLS_HEAD, ChatError,
                                 ChatMode, render, resolve_mode)

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "spec" / "encoding-fixtures"
BOS, EOS, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city"]}}}
WEATHER_LINE = ('{"name": "get_weather", "description": "Current weather for a city", "parameters": {"type": '
                '"object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}')


def _fixture(n: int):
    if not FIXTURES.is_dir():
        pytest.skip(f"official encoder fixtures not found at {FIXTURES} (../shared beside the checkout)")
    data = json.loads((FIXTURES / f"test_input_{n}.json").read_text(encoding="utf-8"))
    expected = (FIXTURES / f"test_output_{n}.txt").read_bytes().decode("utf-8")
    return data, expected


@pytest.mark.parametrize("n, mode", [(2, "thinking"), (3, "thinking"), (4, "chat")])
def test_official_fixture(n, mode):
    messages, expected = _fixture(n)
    assert render(messages, mode=mode) == expected


def test_official_fixture_1_tools_on_system_and_on_request():
    data, expected = _fixture(1)
    assert render(data["messages"], tools=data["tools"], mode="thinking") == expected
    messages = json.loads(json.dumps(data["messages"]))
    messages[0]["tools"] = data["tools"]
    assert render(messages, mode="thinking") == expected


def test_protocol_text_lengths():
    assert [len(s.encode()) for s in (TOOLS_HEAD, TOOLS_FOOT, THINK_MAX_PREFIX)] == [890, 99, 476]


def test_italian_single_turn_is_21_tokens(real_tokenizer):
    text = render([{"role": "user", "content": "Rispondi in italiano con una frase: chi era Ada Lovelace?"}])
    assert text == BOS + U + "Rispondi in italiano con una frase: chi era Ada Lovelace?" + A + "</think>"
    ids = real_tokenizer.encode(text)
    assert len(ids) == 21
    assert ids[:2] == [0, 128803] and ids[-2:] == [128804, 128822]
    pieces = [real_tokenizer.token_text(i) for i in ids[2:-2]]
    assert pieces == ["R", "is", "pond", "i", " in", " italiano", " con", " una", " frase", ":", " chi", " era",
                      " Ada", " Lov", "el", "ace", "?"]


def test_example_15_2_thinking_drops_earlier_reasoning():
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "reasoning_content": "Simple arithmetic.", "content": "4."},
                {"role": "user", "content": "And times 3?"}]
    expected = (BOS + "You are a concise assistant." + U + "What is 2+2?" + A + "</think>4." + EOS + U
                + "And times 3?" + A + "<think>")
    assert render(messages, mode="thinking") == expected
    assert render(messages, mode="max") == BOS + THINK_MAX_PREFIX + expected[len(BOS):]
    sqrt = [{"role": "user", "content": "Prove that sqrt(2) is irrational."}]
    assert render(sqrt, mode="max", ctx=THINK_MAX_MIN_CONTEXT) == (
        BOS + THINK_MAX_PREFIX + U + "Prove that sqrt(2) is irrational." + A + "<think>")


def test_think_max_needs_large_context():
    sqrt = [{"role": "user", "content": "hi"}]
    assert render(sqrt, mode="max", ctx=THINK_MAX_MIN_CONTEXT - 1) == render(sqrt, mode="thinking")
    assert resolve_mode("max", 65536) is ChatMode.THINKING and resolve_mode("max") is ChatMode.MAX
    assert render(sqrt, mode="max", ctx=THINK_MAX_MIN_CONTEXT).startswith(BOS + THINK_MAX_PREFIX)
    assert render([], mode="max") == BOS


def test_example_15_3_tool_round_trip():
    head = BOS + "\n\n" + TOOLS_HEAD + WEATHER_LINE + TOOLS_FOOT
    user = {"role": "user", "content": "Weather in Rome for 2 days?"}
    first = render([user], tools=[WEATHER], mode="thinking")
    assert first == head + U + "Weather in Rome for 2 days?" + A + "<think>"
    sample = ('The user wants a forecast; call get_weather.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke '
              'name="get_weather">\n<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    call = {"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome","days":2}'}}
    second = [user, {"role": "assistant", "reasoning_content": "The user wants a forecast; call get_weather.",
                     "content": "", "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_x", "content": '{"temp_c":[21,23],"sky":"clear"}'}]
    tail = EOS + U + '<tool_result>{"temp_c":[21,23],"sky":"clear"}</tool_result>' + A + "<think>"
    rendered = render(second, tools=[WEATHER], mode="thinking")
    # (a) reasoning kept because tools are defined; (b) request 1 + sample is a byte prefix of request 2.
    assert rendered == first + sample + tail
    # (d) without tools the reasoning is dropped and the turn renders chat-style.
    assert A + "</think>\n\n<｜DSML｜tool_calls>" in render(second, mode="thinking")
    # (c) reordered keys give a different canonical block.
    reordered = json.loads(json.dumps(second))
    reordered[1]["tool_calls"][0]["function"]["arguments"] = '{"days":2,"city":"Rome"}'
    text = render(reordered, tools=[WEATHER], mode="thinking")
    assert text.index('name="days"') < text.index('name="city"')


def test_example_15_4_parallel_calls_sorted_results():
    calls = [{"id": "call_A", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
             {"id": "call_B", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city":"Oslo","days":[1,2]}'}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rome and Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_B", "content": "Oslo: 3C"},
                {"role": "tool", "tool_call_id": "call_A", "content": "Rome: 21C"},
                {"role": "user", "content": "Which is warmer?"}]
    tail = ('<｜User｜>Rome and Oslo?<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
            '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="days" string="false">[1, 2]</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
            '</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>Rome: 21C</tool_result>\n\n'
            '<tool_result>Oslo: 3C</tool_result>\n\nWhich is warmer?<｜Assistant｜></think>')
    expected = BOS + "Be brief.\n\n" + TOOLS_HEAD + WEATHER_LINE + TOOLS_FOOT + tail
    assert render(messages, tools=[WEATHER], mode="chat") == expected


def _u(text, **kw):
    return {"role": "user", "content": text, **kw}


def _a(content, reasoning=None, **kw):
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, **kw}


@pytest.mark.parametrize("messages, mode, expected", [
    # §5.5: assistant after assistant gets no role token.
    ([_u("u"), _a("a1", "r1"), _a("a2", "r2")], "thinking",
     BOS + U + "u" + A + "<think>r1</think>a1" + EOS + "r2</think>a2" + EOS),
    # §5.5: a system message between user and assistant suppresses the transition.
    ([_u("u"), {"role": "system", "content": "S"}, _a("a", "r")], "thinking", BOS + U + "uSr</think>a" + EOS),
    ([_u("u"), {"role": "system", "content": "S"}], "thinking", BOS + U + "uS"),
    ([_u("u"), {"role": "latest_reminder", "content": "R"}], "thinking",
     BOS + U + "u" + A + "<think><｜latest_reminder｜>R"),
    ([_u("")], "chat", BOS + U + A + "</think>"),
    ([], "thinking", BOS),
    # Consecutive users join with a blank line; a tool result after a user joins that turn.
    ([_u("a"), _u("b"), {"role": "tool", "tool_call_id": "x", "content": "</tool_result>"}], "chat",
     BOS + U + "a\n\nb\n\n<tool_result></tool_result></tool_result>" + A + "</think>"),
    # Tool results without a preceding user start their own turn; list content per §5.2.
    ([{"role": "tool", "content": [{"type": "text", "text": "t1"}, {"type": "image"}, {"type": "text", "text": "t2"}]}],
     "chat", BOS + U + "<tool_result>t1\n\n[Unsupported image]\n\nt2</tool_result>" + A + "</think>"),
    # Task tokens (§5.4).
    ([_u("prompt", task="query")], "chat", BOS + U + "prompt<｜query｜>"),
    ([_u("p", task="action")], "thinking", BOS + U + "p" + A + "<think><｜action｜>"),
    ([_u("p", task="action"), _a("Search", "ignored")], "thinking",
     BOS + U + "p" + A + "<think><｜action｜>Search" + EOS),
    ([_u("u"), _a("a", task="title")], "chat", BOS + U + "u" + A + "</think>a" + EOS + "<｜title｜>"),
    # A user with a task is not merged with the following user.
    ([_u("p", task="query"), _u("q")], "chat", BOS + U + "p" + U + "q" + A + "</think>"),
    # Trailing assistant prefill, with and without EOS.
    ([_u("u"), _a("part", wo_eos=True)], "chat", BOS + U + "u" + A + "</think>part"),
    # Developer is a user turn and is removed before the last user turn when dropping.
    ([{"role": "developer", "content": "D"}, _u("u"), _a("a", "r"), _u("v")], "thinking",
     BOS + U + "u" + A + "</think>a" + EOS + U + "v" + A + "<think>"),
    ([{"role": "developer", "content": "D"}, _u("u")], "chat", BOS + U + "D" + U + "u" + A + "</think>"),
    # Several system messages are concatenated in place.
    ([{"role": "system", "content": "A."}, {"role": "system", "content": "B."}, _u("u")], "chat",
     BOS + "A.B." + U + "u" + A + "</think>"),
])
def test_rules_and_edge_cases(messages, mode, expected):
    assert render(messages, mode=mode) == expected


def test_unknown_call_id_sorts_first_and_text_keeps_its_slot():
    calls = [{"id": "c1", "function": {"name": "f", "arguments": "{}"}},
             {"id": "c2", "function": {"name": "f", "arguments": "{}"}}]
    messages = [_u("go"), _a("", tool_calls=calls), {"role": "tool", "tool_call_id": "c2", "content": "two"},
                _u("mid"), {"role": "tool", "tool_call_id": "zz", "content": "unknown"},
                {"role": "tool", "tool_call_id": "c1", "content": "one"}]
    text = render(messages)
    # Results [two(pos 1), unknown(0), one(0)] sort stably to [unknown, one, two]; "mid" keeps slot 2.
    assert text.endswith(U + "<tool_result>unknown</tool_result>\n\nmid\n\n<tool_result>one</tool_result>\n\n"
                         "<tool_result>two</tool_result>" + A + "</think>")
    # Empty invoke renders an empty line between its tags.
    assert '<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>' in text


def test_response_format_and_raw_dsml():
    text = render([_u("u")], tools=[WEATHER], response_format={"type": "object"})
    assert text.startswith(BOS + "\n\n" + TOOLS_HEAD + WEATHER_LINE + TOOLS_FOOT
                           + "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                           + '{"type": "object"}' + U)
    raw = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    calls = [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]
    assert render([_u("u"), _a("x", tool_calls=calls, raw_dsml=raw)]).endswith("x" + raw + EOS)


def test_inputs_are_not_modified():
    messages = [{"role": "user", "content": "u"}, {"role": "tool", "tool_call_id": "a", "content": "r"}]
    before = json.dumps(messages)
    render(messages, tools=[WEATHER], mode="thinking")
    assert json.dumps(messages) == before


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"content": "x"}], "unknown role"),
    (["hello"], "not an object"),
    ([{"role": "developer", "content": ""}], "developer"),
    ([{"role": "user", "content": "x", "task": "poem"}], "unknown task"),
    ([{"role": "user", "content": 3}], "content"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}], "tool_calls[0]"),
    ([{"role": "assistant", "content": "", "tools": [WEATHER]}], "tools"),
])
def test_bad_input_raises_chat_error(messages, needle):
    with pytest.raises(ChatError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        render(messages)
    assert issubclass(ChatError, ValueError)


def test_bad_mode():
    with pytest.raises(ChatError, match="mode"):
        render([], mode="turbo")
