"""One-shot prompt building (cli.md §2.3, §10 item 2) and the answer printer (§2.4).

Oracle: the token layout of the spec written as explicit id lists; text pieces are
encoded with the tokenizer only where the spec says plain BPE, and plain BPE itself is
checked against an independent split of the text (BPE of the pieces around a special
string, which the pre-tokenizer separates anyway)."""

import io

import pytest

from dwarfstar import cliprompt, shape
from dwarfstar.printer import GREY, RESET, AnswerPrinter, PrefillProgress


def ids(tok, *names):
    return [tok.id_of(n) for n in names]


def test_template_layout_in_each_mode(tok):
    bpe = lambda s: cliprompt.plain_bpe(tok, s)
    sys_ids, user_ids = bpe("Be brief."), bpe("hello there")
    got = {m: cliprompt.oneshot_tokens(tok, "hello there", "Be brief.", m) for m in cliprompt.MODES}
    assert got["none"] == ids(tok, shape.BOS) + sys_ids + ids(tok, shape.USER) + user_ids + ids(
        tok, shape.ASSISTANT, shape.THINK_CLOSE)
    assert got["high"] == got["none"][:-1] + ids(tok, shape.THINK_OPEN)
    prefix = bpe(cliprompt.THINK_MAX_PREFIX)
    assert got["max"] == got["high"][:1] + prefix + got["high"][1:]
    assert tok.decode(prefix) == cliprompt.THINK_MAX_PREFIX


def test_empty_system_is_omitted_test_vector_layout(tok):
    # `--nothink -sys ""` is the test-vector setting: BOS USER text ASSISTANT </think>.
    got = cliprompt.oneshot_tokens(tok, "Ada?", "", "none")
    assert got == ids(tok, shape.BOS, shape.USER) + cliprompt.plain_bpe(tok, "Ada?") + ids(
        tok, shape.ASSISTANT, shape.THINK_CLOSE)


def test_rendered_prompt_is_tokenized_as_is(tok):
    rendered = f"{shape.BOS}{shape.USER}hi{shape.ASSISTANT}{shape.THINK_CLOSE}"
    got = cliprompt.oneshot_tokens(tok, rendered, "ignored system", "max")
    assert got == ids(tok, shape.BOS, shape.USER) + tok.encode("hi") + ids(tok, shape.ASSISTANT, shape.THINK_CLOSE)


def test_special_strings_in_user_text_stay_plain_text(tok):
    text = f"say {shape.THINK_OPEN} now"
    plain = cliprompt.plain_bpe(tok, text)
    assert tok.id_of(shape.THINK_OPEN) not in plain
    assert tok.decode(plain) == text
    # The pre-tokenizer cuts before "<think" and after ">", so BPE of the pieces is the oracle.
    assert plain == tok.encode("say ") + tok.encode("<think") + tok.encode("> now")
    turn = cliprompt.turn_tokens(tok, text, "none")
    assert turn[1:-2] == plain
    # Text without any added string takes the fast path and must agree with the full one.
    assert cliprompt.plain_bpe(tok, "plain words") == tok.encode("plain words")


@pytest.mark.parametrize("mode, ctx, effective, warns", [
    ("max", 393216, "max", False), ("max", 393215, "high", True), ("high", 10, "high", False),
    ("none", 10**6, "none", False),
])
def test_think_max_gating(mode, ctx, effective, warns):
    assert cliprompt.effective_mode(mode, ctx) == effective
    warning = cliprompt.think_max_warning(mode, ctx)
    if warns:
        assert warning == f"ds4: warning: --think-max needs --ctx >= 393216; ctx={ctx} uses normal thinking instead"
    else:
        assert warning is None


def printed(pieces, is_thinking=True, use_color=True):
    out = io.StringIO()
    p = AnswerPrinter(out, is_thinking, use_color)
    for piece in pieces:
        p.write(piece)
    p.finish()
    return out.getvalue()


def test_reasoning_is_grey_tags_hidden_newline_inserted():
    assert printed(["hmm", "</think>", "Answer."]) == f"{GREY}hmm{RESET}\nAnswer.\n"
    assert printed(["hmm\n", "</think>", "A"]) == f"{GREY}hmm\n{RESET}A\n"
    assert printed(["hmm", "</think>", "A"], use_color=False) == "hmm\nA\n"


def test_tags_split_across_tokens_are_held_back():
    pieces = ["think", "ing</th", "ink>ok <", "b> <t", "x"]
    assert printed(pieces, use_color=False) == "thinking\nok <b> <tx\n"
    # A partial tag at the very end is printed as text.
    assert printed(["a</thi"], use_color=False) == "a</thi\n"
    # A reopened <think> turns grey again.
    assert printed(["</think>x<think>y"]) == f"x{GREY}y{RESET}\n"


def test_nothink_prints_raw_and_always_ends_with_newline():
    assert printed(["a</think>", "b"], is_thinking=False) == "a</think>b\n"
    assert printed(["line\n"], is_thinking=False) == "line\n"
    assert printed([], is_thinking=False) == ""


def test_prefill_progress_lines_count_only_new_tokens():
    err = io.StringIO()
    p = PrefillProgress(8, base=4, err=err, is_tty=False)
    for done in (8, 12, 12):
        p(done, 12)
    assert err.getvalue() == ("processing 8 input tokens: 4/8 (50.0%)\n"
                              "processing 8 input tokens: 8/8 (100.0%)\n")
