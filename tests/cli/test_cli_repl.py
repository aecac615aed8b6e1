"""REPL transcript evolution (cli.md §2.7, §10 item 4) on a scripted fake session.

The oracle is the transcript layout of the spec, assembled by hand from token ids;
the fake session reports how many tokens each sync had to prefill, which is how
"only the suffix is prefilled" and "the session was invalidated" are observed.
Ctrl+C is a real SIGINT sent to this process from inside the fake engine."""

import io
import os
import signal

import pytest

from dwarfstar import cliprompt, shape
from dwarfstar.cli import CliOptions
from dwarfstar.engine.sampling import SamplingParams
from dwarfstar.repl import HELP, Chat, handle_line

from .fakes import FakeEngine, answer_script


def make_chat(tok, answers, **opts):
    engine = FakeEngine(tok, answer_script(tok, answers))
    opts.setdefault("system", "Be nice.")
    chat = Chat(engine, CliOptions(**opts), SamplingParams(temperature=0), out=io.StringIO(), err=io.StringIO())
    return engine, chat


def turn_ids(tok, text, tag):
    return [tok.id_of(shape.USER)] + cliprompt.plain_bpe(tok, text) + [tok.id_of(shape.ASSISTANT), tok.id_of(tag)]


def sigint():
    os.kill(os.getpid(), signal.SIGINT)


def test_three_turns_keep_reasoning_append_eos_and_prefill_only_suffixes(tok):
    bpe = lambda s: cliprompt.plain_bpe(tok, s)
    close = tok.id_of(shape.THINK_CLOSE)
    answers = [bpe("hmm") + [close] + bpe(" the cat"), bpe("ok") + [close] + bpe("yes"), bpe("so") + [close]]
    engine, chat = make_chat(tok, answers)
    expected = [tok.bos_id] + bpe("Be nice.")
    syncs = []
    for i, text in enumerate(["hello", "and then", "bye"]):
        before = len(expected)
        expected += turn_ids(tok, text, shape.THINK_OPEN)
        # Turn 1 prefills everything; later turns only the unevaluated EOS + the new turn.
        syncs.append(len(expected) if i == 0 else len(expected) - before + 1)
        expected += answers[i] + [tok.eos_id]
        assert handle_line(chat, f"  {text}  ") is None
    assert chat.transcript == expected
    assert len(engine.sessions) == 1 and engine.sessions[0].syncs == syncs
    # The session holds everything but the last EOS, which the next turn evaluates.
    assert engine.sessions[0].tokens == expected[:-1]
    assert chat.out.getvalue() == "hmm\n the cat\nok\nyes\nso\n"
    assert chat.err.getvalue().count("ds4: prefill: ") == 3


def test_mode_change_affects_only_later_turns(tok):
    engine, chat = make_chat(tok, [[]], mode="none", system="")
    handle_line(chat, "a")
    assert handle_line(chat, "/think") is None
    handle_line(chat, "b")
    expected = [tok.bos_id] + turn_ids(tok, "a", shape.THINK_CLOSE) + [tok.eos_id]
    expected += turn_ids(tok, "b", shape.THINK_OPEN) + [tok.eos_id]
    assert chat.transcript == expected
    assert chat.out.getvalue() == "Thinking mode: high.\n"
    assert len(engine.sessions) == 1, "switching between none and high keeps the session"


@pytest.mark.parametrize("has_progress", [True, False])
def test_ctrl_c_before_first_token_rolls_back_and_invalidates(tok, has_progress):
    engine, chat = make_chat(tok, [[305, 306]])
    handle_line(chat, "one")
    after_one = list(chat.transcript)

    def interrupt_once(session):
        engine.on_prefill = None
        if not has_progress:
            # A sync without progress reports cannot be cut short; the stop flag is
            # then seen before the first token instead.
            session.report = False
        sigint()

    engine.on_prefill = interrupt_once
    handle_line(chat, "two")
    assert chat.transcript == after_one and chat.session is None
    handle_line(chat, "three")
    # Full re-prefill on a new session: everything but the answer [305, 306] and its EOS.
    assert len(engine.sessions) == 2 and engine.sessions[1].syncs == [len(chat.transcript) - 3]
    assert chat.transcript == after_one + turn_ids(tok, "three", shape.THINK_OPEN) + [305, 306, tok.eos_id]


def test_ctrl_c_after_some_tokens_keeps_partial_answer(tok):
    engine, chat = make_chat(tok, [[305, 306, 307, 308, 309], [310]])

    def interrupt_at_second(session):
        if session.n_evals == 2:
            sigint()

    engine.on_eval = interrupt_at_second
    handle_line(chat, "one")
    assert chat.transcript[-3:] == [305, 306, tok.eos_id]
    engine.on_eval = None
    handle_line(chat, "two")
    assert chat.transcript[-2:] == [310, tok.eos_id]
    assert len(engine.sessions) == 1 and engine.sessions[0].syncs[-1] == 1 + len(turn_ids(tok, "two", shape.THINK_OPEN))


def test_ctx_command_recreates_session_and_reprefills(tok):
    engine, chat = make_chat(tok, [[305]])
    handle_line(chat, "one")
    assert handle_line(chat, "/ctx 4096") is None
    assert chat.session is None and chat.ctx == 4096
    handle_line(chat, "two")
    assert [s.ctx for s in engine.sessions] == [32768, 4096]
    assert engine.sessions[1].syncs == [len(chat.transcript) - 2]
    assert handle_line(chat, "/ctx") is None
    assert chat.err.getvalue().endswith("ds4: /ctx needs a positive integer\n")
    assert handle_line(chat, "/ctx 0") == 2
    assert chat.err.getvalue().endswith("ds4: invalid value for /ctx: 0\n")


def test_think_max_prefix_insert_and_remove_invalidate(tok):
    prefix = cliprompt.max_prefix_tokens(tok)
    engine, chat = make_chat(tok, [[305]], ctx=393216, system="")
    handle_line(chat, "one")
    plain = list(chat.transcript)
    handle_line(chat, "/think-max")
    assert chat.transcript == plain[:1] + prefix + plain[1:] and chat.session is None
    handle_line(chat, "two")
    assert engine.sessions[1].syncs == [len(chat.transcript) - 2]
    handle_line(chat, "/nothink")
    assert chat.transcript[1 : 1 + len(prefix)] != prefix and chat.session is None
    # Earlier turns keep their <think> tags; only the prefix went away.
    assert chat.transcript.count(tok.id_of(shape.THINK_OPEN)) == 2
    assert chat.out.getvalue().splitlines()[1::2] == ["Thinking mode: max.", "Thinking mode: none."]


def test_think_max_below_threshold_warns_and_keeps_session(tok):
    engine, chat = make_chat(tok, [[305]], ctx=1000)
    handle_line(chat, "one")
    handle_line(chat, "/think-max")
    assert chat.out.getvalue().endswith("Thinking mode: high (ctx below 393216).\n")
    assert "ds4: warning: /think-max needs --ctx >= 393216; ctx=1000 uses normal thinking instead" in chat.err.getvalue()
    header = [tok.bos_id] + cliprompt.plain_bpe(tok, "Be nice.")
    assert chat.session is not None and chat.transcript[: len(header) + 1] == header + [tok.id_of(shape.USER)]


def test_prompt_over_context_is_rolled_back(tok):
    engine, chat = make_chat(tok, [[305]], ctx=12, system="")
    handle_line(chat, "a long message that does not fit in twelve tokens")
    assert chat.transcript == [tok.bos_id]
    assert "ds4: prompt processing failed: prompt exceeds context" in chat.err.getvalue()
    handle_line(chat, "hi")
    assert chat.transcript[-2:] == [305, tok.eos_id]


def test_answer_budget_is_min_of_n_and_room(tok):
    engine, chat = make_chat(tok, [[305, 306, 307, 308]], n_tokens=2)
    handle_line(chat, "x")
    assert chat.transcript[-3:] == [305, 306, tok.eos_id]
    # Room: ctx - pos - 1 with pos = the transcript length before generation.
    engine, chat = make_chat(tok, [[305, 306, 307, 308]], ctx=9, system="")
    handle_line(chat, "x")
    n_prompt = 1 + len(turn_ids(tok, "x", shape.THINK_OPEN))
    assert chat.transcript == chat.transcript[:n_prompt] + [305, 306, 307, 308][: 9 - n_prompt - 1] + [tok.eos_id]


def test_other_commands(tok, tmp_path):
    engine, chat = make_chat(tok, [[305]], system="")
    handle_line(chat, "/help")
    assert chat.out.getvalue() == HELP
    handle_line(chat, "/wat")
    assert chat.err.getvalue() == "ds4: unknown command: /wat\nds4: type /help for commands\n"
    (tmp_path / "q.txt").write_text(" from a file\n")
    handle_line(chat, f"/read {tmp_path / 'q.txt'}")
    assert chat.transcript[1:-2] == turn_ids(tok, " from a file\n", shape.THINK_OPEN)
    handle_line(chat, f"/read {tmp_path / 'none.txt'}")
    assert chat.err.getvalue().endswith(f"ds4: failed to open prompt file: {tmp_path / 'none.txt'}\n")
    assert handle_line(chat, "   ") is None
    assert handle_line(chat, "/exit") == 0 and handle_line(chat, "/quit") == 0


def test_engine_error_during_decode_keeps_the_repl_usable(tok):
    engine, chat = make_chat(tok, [[305, 306, 307], [310]])

    def fail_on_second(session):
        if session.n_evals == 2:
            raise RuntimeError("device lost")

    engine.on_eval = fail_on_second
    handle_line(chat, "one")
    assert "ds4: decode failed: device lost\n" in chat.err.getvalue()
    # The failed token was appended by the fake before raising, but never yielded.
    assert chat.transcript[-2:] == [305, tok.eos_id]
    engine.on_eval = None
    handle_line(chat, "two")
    assert chat.transcript[-2:] == [310, tok.eos_id]
