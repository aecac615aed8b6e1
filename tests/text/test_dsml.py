"""DSML: canonical rendering, tolerant parsing, streaming events, greedy-syntax tracking.

Oracles: the official encoder fixtures (rendered assistant turns must parse back to the
messages they came from), the canonical renderer (render -> parse -> render is the
identity), and the whole-text parse (any chunking must give the same events).
"""

import json
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.text.chat import render
from dwarfstar.text.dsml import (BlockEnd, BlockError, DSMLParser, ReasoningDelta, SyntaxTracker, TextDelta,
                                 ToolCallArgs, ToolCallEnd, ToolCallStart, compact_arguments, parse_completion,
                                 render_tool_calls)

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "spec" / "encoding-fixtures"
EOS, A = "<｜end▁of▁sentence｜>", "<｜Assistant｜>"
D = "｜DSML｜"


def _stream(text, thinking, cuts=()):
    parser, events, last = DSMLParser(thinking), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        events += parser.feed(text[last:cut])
        last = cut
    return events + parser.finish()


def _coalesce(events):
    out = []
    for e in events:
        if out and type(e) is type(out[-1]) and isinstance(e, (ReasoningDelta, TextDelta)):
            out[-1] = type(e)(out[-1].text + e.text)
        elif out and isinstance(e, ToolCallArgs) and isinstance(out[-1], ToolCallArgs) and e.index == out[-1].index:
            out[-1] = ToolCallArgs(e.index, out[-1].text + e.text)
        else:
            out.append(e)
    return [e for e in out if not (isinstance(e, (ReasoningDelta, TextDelta, ToolCallArgs)) and e.text == "")]


def _fixture_turns(n, mode):
    if not FIXTURES.is_dir():
        pytest.skip(f"official encoder fixtures not found at {FIXTURES}")
    data = json.loads((FIXTURES / f"test_input_{n}.json").read_text(encoding="utf-8"))
    messages = data["messages"] if n == 1 else data
    text = render(messages, tools=data["tools"] if n == 1 else None, mode=mode)
    opener = A + ("<think>" if mode == "thinking" else "</think>")
    return [part.split(EOS)[0] for part in text.split(opener)[1:]]


def test_fixture_1_turns_parse_like_the_official_test():
    turns = _fixture_turns(1, "thinking")
    first = parse_completion(turns[0], thinking=True)
    assert first.reasoning == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    assert first.content == "" and len(first.tool_calls) == 1
    assert first.tool_calls[0].name == "get_weather"
    assert json.loads(first.tool_calls[0].arguments) == {"location": "Beijing", "unit": "celsius"}
    last = parse_completion(turns[-1], thinking=True)
    assert last.reasoning == "Got the weather data. Let me format a nice response." and "22°C" in last.content


def test_fixture_2_last_turn():
    last = parse_completion(_fixture_turns(2, "thinking")[-1], thinking=True)
    assert last.reasoning == "The user asks about the capital of France. It is Paris."
    assert last.content == "The capital of France is Paris." and last.tool_calls == []


@pytest.mark.parametrize("opening", ["<｜DSML｜", "<DSML｜", "<"])
def test_three_syntaxes(opening):
    close = "</" + opening[1:]
    text = (f'hi\n\n{opening}tool_calls>\n{opening}invoke name="f">\n{opening}parameter name="a" string="true">x & y'
            f'{close}parameter>\n{opening}parameter name="n" string="false">[1, 2]{close}parameter>\n{close}invoke>\n'
            f"{close}tool_calls>ignored")
    done = parse_completion(text, thinking=False)
    assert done.content == "hi" and done.reasoning is None
    assert [(c.name, c.arguments) for c in done.tool_calls] == [("f", '{"a": "x & y", "n": [1,2]}')]
    assert done.raw_dsml == text[2:-len("ignored")]


def test_nested_parameter_recovery():
    text = (f'review done\n\n<{D}tool_calls>\n<{D}invoke name="edit">\n<{D}parameter name="path">src/tetris.c'
            f'</{D}parameter>\n<{D}parameter name="edits">\n<{D}parameter name="oldText" string="true">old &lt;text&gt;'
            f'</{D}parameter>\n<{D}parameter name="newText" string="true">new text</{D}parameter>\n</{D}invoke>\n'
            f"</{D}tool_calls>")
    done = parse_completion(text, thinking=False)
    assert done.content == "review done" and len(done.tool_calls) == 1
    args = json.loads(done.tool_calls[0].arguments)
    # No entity decoding: &lt; stays four characters.
    assert args == {"path": "src/tetris.c", "edits": {"oldText": "old &lt;text&gt;", "newText": "new text"}}
    streamed = _coalesce(_stream(text, thinking=False))
    assert json.loads(next(e.text for e in streamed if isinstance(e, ToolCallArgs))) == args


def test_malformed_block_is_text():
    text = f'ok</think>\n\n<{D}tool_calls>\n<{D}invoke>\n</{D}invoke>\n</{D}tool_calls>'
    done = parse_completion(text, thinking=True)
    assert done.content == text and done.reasoning is None and done.tool_calls == [] and done.invalid_block
    events = _coalesce(_stream(text, thinking=True))
    assert isinstance(events[1], BlockError)
    assert [e.text for e in events if isinstance(e, TextDelta)] == [text[len("ok</think>"):]]
    unterminated = parse_completion(f"x\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">", thinking=False)
    assert unterminated.invalid_block and unterminated.content.startswith("x\n\n")


def test_dsml_inside_reasoning_is_not_executed():
    block = render_tool_calls([{"name": "f", "arguments": "{}"}])
    done = parse_completion("thinking about" + block + " more</think>answer", thinking=True)
    assert done.tool_calls == [] and done.content == "answer" and done.reasoning.startswith("thinking about\n\n<")
    unclosed = parse_completion("still thinking" + block, thinking=True)
    assert unclosed.tool_calls == [] and unclosed.reasoning is None


def test_content_whitespace_and_reasoning_split():
    done = parse_completion("<think>r</think>  text \n" + render_tool_calls([{"name": "f", "arguments": "{}"}]),
                            thinking=True)
    assert (done.reasoning, done.content) == ("r", "  text \n")
    assert parse_completion("cut short", thinking=True).content == "cut short"
    assert parse_completion("<think>cut", thinking=True).content == "<think>cut"


def test_canonical_block_values():
    block = render_tool_calls([{"function": {"name": "f", "arguments": '{"a": 1.0, "b": 1e16, "c": 12345678901234567890, '
                                             '"d": "x<y&z\\"", "e": null, "f": {"k": [true]}, "a": 2, "g": "é"}'}},
                               {"name": "g", "arguments": "not json"}, {"name": "h", "arguments": "[1]"}])
    assert block == (
        f'\n\n<{D}tool_calls>\n<{D}invoke name="f">\n'
        f'<{D}parameter name="a" string="false">2</{D}parameter>\n'
        f'<{D}parameter name="b" string="false">1e+16</{D}parameter>\n'
        f'<{D}parameter name="c" string="false">12345678901234567890</{D}parameter>\n'
        f'<{D}parameter name="d" string="true">x<y&z"</{D}parameter>\n'
        f'<{D}parameter name="e" string="false">null</{D}parameter>\n'
        f'<{D}parameter name="f" string="false">{{"k": [true]}}</{D}parameter>\n'
        f'<{D}parameter name="g" string="true">é</{D}parameter>\n</{D}invoke>\n'
        f'<{D}invoke name="g">\n<{D}parameter name="arguments" string="true">not json</{D}parameter>\n</{D}invoke>\n'
        f'<{D}invoke name="h">\n<{D}parameter name="arguments" string="true">[1]</{D}parameter>\n</{D}invoke>\n'
        f"</{D}tool_calls>")


def test_compact_arguments():
    assert compact_arguments('{"a": [1, 2], "b": "é"}') == '{"a":[1,2],"b":"é"}'
    assert compact_arguments('{"a": hello<}') == "{}"


def test_syntax_tracker_states():
    prefix = f'<think>r</think>\n\n<{D}tool_calls>\n<{D}invoke name="f">\n'
    cases = [
        ("hello", "OUTSIDE"),
        (f"x<{D}tool_", "OUTSIDE"),
        (prefix[:-5], "STRUCTURAL"),
        (prefix + f'<{D}parameter name="a" string="true">some te', "STRING_BODY"),
        (prefix + f'<{D}parameter name="a" string="true">some </', "STRUCTURAL"),
        (prefix + f'<{D}parameter name="a" string="true">a<b', "STRING_BODY"),
        (prefix + f'<{D}parameter name="n" string="false">[1, ', "JSON_STRUCTURAL"),
        (prefix + f'<{D}parameter name="n" string="false">["a\\"b', "JSON_STRING"),
        (prefix + f'<{D}parameter name="n" string="false">["a"', "JSON_STRUCTURAL"),
        (prefix + f'<{D}parameter name="n" string="false">1</{D}parameter>\n', "STRUCTURAL"),
        (prefix + f"</{D}invoke>\n</{D}tool_calls>more", "OUTSIDE"),
    ]
    for text, state in cases:
        tracker = SyntaxTracker()
        for ch in text:
            tracker.feed(ch)
        assert tracker.state == state, text
        assert tracker.is_greedy == (state in ("STRUCTURAL", "JSON_STRUCTURAL"))


# Generated model outputs: fragments of every kind, well formed or not.
_NAME = st.text(string.ascii_letters + "_-.0123456789", min_size=1, max_size=8)
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=6), lambda v: st.lists(v, max_size=3) | st.dictionaries(_NAME, v, max_size=3),
                     max_leaves=6)
_SAFE_TEXT = st.text(max_size=10).filter(lambda s: D not in s and "DSML" not in s and "tool_calls>" not in s
                                         and "</think>" not in s and "parameter>" not in s)
_CALLS = st.lists(st.tuples(_NAME, st.dictionaries(_NAME, _JSON | _SAFE_TEXT, max_size=4)), min_size=1, max_size=3)
_FRAGMENTS = st.sampled_from([
    "<think>", "</think>", "\n\n", " ", "\n", f"<{D}tool_calls>", f"</{D}tool_calls>", f'<{D}invoke name="f">',
    f"</{D}invoke>", f'<{D}parameter name="p" string="true">', f'<{D}parameter name="q" string="false">',
    f'<{D}parameter name="r">', f"</{D}parameter>", "<tool_calls>", "</tool_calls>", "<invoke name='x'>",
    "<DSML｜tool_calls>", '"', "\\", "{", "[1, 2]", "<", "</", "｜", "&amp;", "é", "😀",
])
_GARBAGE = st.lists(st.one_of(_FRAGMENTS, _FRAGMENTS, st.text(max_size=4)), max_size=30).map("".join)


def _well_formed(draw_tuple):
    reasoning, content, calls = draw_tuple
    block = render_tool_calls([{"name": n, "arguments": json.dumps(a)} for n, a in calls])
    return reasoning, content, calls, reasoning + "</think>" + content + block


_OUTPUTS = st.tuples(_SAFE_TEXT, _SAFE_TEXT, _CALLS).map(_well_formed)


@st.composite
def _mutated(draw):
    """A well-formed output with one slice cut out and/or one fragment spliced in."""
    text = draw(_OUTPUTS)[3]
    a = draw(st.integers(0, len(text)))
    b = draw(st.integers(a, min(len(text), a + 30)))
    return text[:a] + draw(st.one_of(st.just(""), _FRAGMENTS)) + text[b:]


@settings(max_examples=150, deadline=None)
@given(_OUTPUTS)
def test_render_parse_render_is_stable(output):
    reasoning, content, calls, text = output
    done = parse_completion(text, thinking=True)
    assert (done.reasoning, done.content) == (reasoning, content)
    assert [c.name for c in done.tool_calls] == [n for n, _ in calls]
    assert [json.loads(c.arguments) for c in done.tool_calls] == [a for _, a in calls]
    again = render_tool_calls([{"name": c.name, "arguments": c.arguments} for c in done.tool_calls])
    assert again == done.raw_dsml == text[len(reasoning) + len("</think>") + len(content):]


@settings(max_examples=150, deadline=None)
@given(_OUTPUTS, st.lists(st.integers(0, 400), max_size=12))
def test_stream_agrees_with_final_parse(output, cuts):
    reasoning, content, calls, text = output
    events = _coalesce(_stream(text, thinking=True, cuts=cuts))
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == reasoning
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == content
    starts = [e.name for e in events if isinstance(e, ToolCallStart)]
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    args = [json.loads(e.text) for e in events if isinstance(e, ToolCallArgs)]
    assert starts == [e.name for e in ends] == [n for n, _ in calls]
    assert args == [json.loads(e.arguments) for e in ends] == [a for _, a in calls]
    assert isinstance(events[-1], BlockEnd) and events[-1].raw_dsml == parse_completion(text, True).raw_dsml


@settings(max_examples=300, deadline=None)
@given(st.one_of(_GARBAGE, _mutated()), st.lists(st.integers(0, 400), max_size=10), st.booleans())
def test_any_chunking_gives_the_same_events(text, cuts, thinking):
    whole = _coalesce(_stream(text, thinking))
    assert _coalesce(_stream(text, thinking, cuts)) == whole
    assert _coalesce(_stream(text, thinking, range(len(text)))) == whole
    parse_completion(text, thinking)
    tracker, chunked = SyntaxTracker(), SyntaxTracker()
    tracker.feed(text)
    last = 0
    for cut in sorted(set(cuts)) + [len(text)]:
        chunked.feed(text[last:cut])
        last = cut
    assert chunked.state == tracker.state
