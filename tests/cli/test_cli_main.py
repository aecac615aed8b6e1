"""`ds4` main() in-process: one-shot stopping rules, the instance lock, load failures,
`--numerics` reaching the engine, `--inspect` (cli.md §1.3, §2.4, §10 items 1, 8).

Oracles: the fake engine's scripted answers (exact expected text); for `--numerics`,
the tiny model's logits from engines built directly with each numerics setting."""

import json
import signal

import pytest
from dwarfstar import cli, lock

from .fakes import FakeEngine, answer_script


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own lock file per test; put back pytest's SIGINT handler (one-shot resets it)."""
    monkeypatch.setenv("DS4_LOCK_FILE", str(tmp_path / "ds4.lock"))
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"not used by the fake engine")
    return str(path)


def run_fake(tok, model_file, answer, *args):
    engine = FakeEngine(tok, answer_script(tok, [answer]))
    return cli.main(["-m", model_file, *args], load_engine=lambda opts: engine), engine


def test_oneshot_stops_at_eos_without_printing_it(tok, model_file, capsys):
    answer = tok.encode("the cat") + [tok.eos_id] + tok.encode(" after")
    rc, engine = run_fake(tok, model_file, answer, "-p", "hi", "--nothink", "--temp", "0")
    assert rc == 0
    assert capsys.readouterr().out == "the cat\n"
    assert engine.sessions[0].n_evals == len(tok.encode("the cat"))


def test_oneshot_budget_is_min_of_n_and_context_room(tok, model_file, capsys):
    answer = tok.encode("a b c d e f g h")
    rc, _ = run_fake(tok, model_file, answer, "-p", "hi", "--nothink", "--temp", "0", "-n", "3")
    assert rc == 0 and capsys.readouterr().out == tok.decode(answer[:3]) + "\n"
    # -sys "" -p hi --nothink is BOS USER h i ASSISTANT </think> = 6 tokens; ctx 9 leaves 2.
    rc, _ = run_fake(tok, model_file, answer, "-p", "hi", "-sys", "", "--nothink", "--temp", "0", "--ctx", "9")
    assert rc == 0 and capsys.readouterr().out == tok.decode(answer[:2]) + "\n"


def test_prompt_over_context_exits_1(tok, model_file, capsys):
    rc, _ = run_fake(tok, model_file, [], "-p", "a long prompt for a tiny context", "--ctx", "8")
    assert rc == 1
    assert capsys.readouterr().err.endswith("ds4: prompt processing failed: prompt exceeds context\n")


def test_think_max_warning_on_small_context(tok, model_file, capsys):
    rc, engine = run_fake(tok, model_file, [], "-p", "hi", "-sys", "", "--think-max", "--ctx", "4096")
    assert rc == 0
    err = capsys.readouterr().err
    assert "ds4: warning: --think-max needs --ctx >= 393216; ctx=4096 uses normal thinking instead\n" in err
    held = engine.sessions[0].tokens
    assert held[1] == tok.id_of("<｜User｜>"), "no Think Max prefix below the threshold"
    assert held[-1] == tok.id_of("<think>"), "thinking (high) instead"


def test_lock_held_exits_2(tok, model_file, capsys):
    held = lock.acquire("test")
    try:
        rc, _ = run_fake(tok, model_file, [], "-p", "hi")
    finally:
        held.close()
    assert rc == 2
    import os
    assert capsys.readouterr().err == (
        f"ds4: another ds4 process is already running (pid {os.getpid()}); refusing to start\n")


def test_bad_gguf_is_one_line_exit_1(model_file, capsys):
    assert cli.main(["-m", model_file, "-p", "hi", "--cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ds4: failed to load {model_file}: ") and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dwarfstar.gguf.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("main") / "tiny.gguf", preset="tiny")


def test_numerics_reaches_the_engine(tiny, tmp_path, one_thread):
    from dwarfstar import cliprompt
    from dwarfstar.engine.engine import Engine, EngineOptions

    out = tmp_path / "lp.json"
    args = ["-m", str(tiny), "--cpu", "--ctx", "64", "-p", "hi", "-n", "1", "--logprobs-top-k", "1",
            "--dump-logprobs", str(out)]
    logits = {}
    for numerics in ("official", "exact"):
        assert cli.main(args + ["--numerics", numerics]) == 0
        logits[numerics] = json.loads(out.read_text())["steps"][0]["top_logprobs"][0]["logit"]
    direct = {}
    for numerics in ("official", "exact"):
        engine = Engine.load(tiny, EngineOptions(ctx=64, numerics=numerics))
        session = engine.new_session()
        ids = cliprompt.oneshot_tokens(engine.tokenizer, "hi", "You are a helpful assistant", "high")
        session.sync(ids)
        direct[numerics] = session.logits().max().item()
    # 1e-5: same float32 forward on both sides, printed with 9 significant digits.
    assert logits["official"] == pytest.approx(direct["official"], abs=1e-5)
    assert logits["exact"] == pytest.approx(direct["exact"], abs=1e-5)
    assert abs(direct["official"] - direct["exact"]) > 1e-4, "the rounding simulations change the logits"


def test_inspect_prints_the_config(tiny, capsys):
    assert cli.main(["-m", str(tiny), "--cpu", "--inspect"]) == 0
    out = capsys.readouterr().out
    assert f"model: {tiny}\n" in out and "n_layers: 4\n" in out and "vocab_size: 1024\n" in out
