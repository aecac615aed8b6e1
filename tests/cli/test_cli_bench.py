"""`ds4-bench` (cli.md §4, §10 item 5): frontier schedule, validation, CSV format,
snapshot/restore outside the timed regions, and a run on the tiny model.

Oracles: frontier lists and CSV rows written out by hand; for the timing structure a
fake clock shares one event log with a fake session, so the test sees which session
calls happen between which clock readings. The tiny-model run checks kvcache_bytes
against snapshots taken in-process at the same frontiers."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dwarfstar import cliprompt
from dwarfstar.bench import CSV_HEADER, BenchOptions, argmax_excluding, frontiers, main, parse_args, run_bench
from dwarfstar.flags import UsageError

from .fakes import FakeEngine

REPO = Path(__file__).resolve().parents[2]
TEXT = REPO / "bench" / "data" / "paradise_lost.txt"


def sched(start, end, incr=2048, mul=1.0):
    return frontiers(BenchOptions(prompt_file="x", ctx_start=start, ctx_max=end, step_incr=incr, step_mul=mul))


def test_frontier_schedule_linear_and_multiplicative():
    assert sched(2048, 32768) == list(range(2048, 32769, 2048))
    assert sched(1000, 7000, incr=3000) == [1000, 4000, 7000]
    assert sched(1000, 7000, incr=4000) == [1000, 5000, 7000], "capped so the last row is ctx-max"
    assert sched(10, 40, mul=1.5) == [10, 15, 23, 35, 40]
    assert sched(1, 4, mul=1.0001) == [1, 2, 3, 4], "at least one token per step"
    assert sched(64, 64) == [64]


def test_defaults_and_validation():
    opts = parse_args(["--prompt-file", "t.txt"])
    assert (opts.ctx_start, opts.ctx_max, opts.step_incr, opts.step_mul, opts.gen_tokens) == (2048, 32768, 2048, 1.0, 128)
    assert opts.ctx_alloc == 32768 + 128 + 1 and opts.system == "You are a helpful assistant."
    assert parse_args(["--chat-prompt-file", "t", "--tokens", "3", "-n", "5"]).gen_tokens == 5
    bad = {
        (): "ds4-bench: specify exactly one of --prompt-file or --chat-prompt-file",
        ("--prompt-file", "a", "--chat-prompt-file", "b"): "ds4-bench: specify exactly one of --prompt-file or --chat-prompt-file",
        ("--prompt-file", "a", "--ctx-start", "9", "--ctx-max", "8"): "ds4-bench: --ctx-start must be <= --ctx-max",
        ("--prompt-file", "a", "--step-mul", "0.5"): "ds4-bench: --step-mul must be >= 1",
        ("--prompt-file", "a", "--step-incr", "0"): "ds4-bench: invalid value for --step-incr: 0",
        ("--prompt-file", "a", "--ctx-start", "8", "--ctx-max", "100", "-n", "10", "--ctx-alloc", "110"):
            "ds4-bench: --ctx-alloc must be greater than ctx-max + gen-tokens",
        ("--prompt-file",): "ds4-bench: --prompt-file requires an argument",
        ("--prompt-file", "a", "--mtp", "x"): "ds4-bench: unknown option: --mtp",
        ("--prompt-file", "a", "--metal"): "ds4-bench: the metal backend is not supported by dwarfstar; use --cpu or --cuda",
    }
    for argv, message in bad.items():
        with pytest.raises(UsageError) as e:
            parse_args(list(argv))
        assert str(e.value) == message and e.value.exit_code == 2
    assert main(["--prompt-file", "a", "--ctx-start", "9", "--ctx-max", "8"]) == 2


def test_argmax_never_picks_eos():
    logits = torch.tensor([0.0, 9.0, 3.0, 5.0])
    assert argmax_excluding(logits, banned=1) == 3
    assert logits[1] == 9.0, "the caller's logits are not modified"


def test_snapshot_and_restore_are_outside_the_timed_regions(tok):
    events = []
    engine = FakeEngine(tok, lambda tokens: 1 if len(tokens) % 2 else 300, on_eval=lambda s: events.append("eval"))
    session = engine.new_session(ctx=100)
    for name in ("sync", "snapshot", "restore"):
        method = getattr(session, name)
        setattr(session, name, lambda *a, _m=method, _n=name, **k: (events.append(_n), _m(*a, **k))[1])
    times = iter([0.0, 0.5, 0.7, 1.7, 2.0, 2.25, 3.0, 5.0])

    def clock():
        events.append("clock")
        return next(times)

    out = io.StringIO()
    opts = BenchOptions(prompt_file="x", ctx_start=4, ctx_max=8, step_incr=4, gen_tokens=2, ctx_alloc=11)
    rows = run_bench(session, list(range(300, 320)), opts, tok.eos_id, out, clock=clock, log=io.StringIO())
    one = ["clock", "sync", "clock", "snapshot", "clock", "eval", "eval", "clock", "restore"]
    assert events == one + one
    # prefill 4 tokens in 0.5 s and 4 more in 0.25 s; 2 tokens in 1.0 s and in 2.0 s.
    kv4 = len(bytes(str(list(range(300, 304))), "ascii"))
    kv8 = len(bytes(str(list(range(300, 308))), "ascii"))
    assert rows == [f"4,4,8.00,2,2.00,{kv4}", f"8,4,16.00,2,1.00,{kv8}"]
    assert out.getvalue() == CSV_HEADER + "\n" + "\n".join(rows) + "\n"
    # Generation skipped EOS (id 1 is what the script proposes first) and the restore
    # put the session back at the frontier.
    assert session.tokens == list(range(300, 308))


def test_bench_on_the_tiny_model(tmp_path, one_thread):
    from dwarfstar.engine.engine import Engine, EngineOptions
    from dwarfstar.gguf.synth import synthesize

    model = synthesize(tmp_path / "tiny.gguf", preset="tiny")
    csv = tmp_path / "out.csv"
    # The head of the shipped text: the tiny vocabulary has few merges, so the whole
    # 457 KB would cost seconds of tokenizing for 40 tokens of context.
    text = tmp_path / "head.txt"
    text.write_text(TEXT.read_text()[:2000])
    env = dict(os.environ, PYTHONPATH=str(REPO), DS4_LOCK_FILE=str(tmp_path / "lock"), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "dwarfstar.bench", "-m", str(model), "--prompt-file", str(text), "--cpu",
            "--ctx-start", "8", "--ctx-max", "40", "--step-mul", "2", "--gen-tokens", "3", "--csv", str(csv)]
    proc = subprocess.run(argv, capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = csv.read_text().splitlines()
    assert lines[0] == CSV_HEADER
    rows = [line.split(",") for line in lines[1:]]
    assert [(int(r[0]), int(r[1]), int(r[3])) for r in rows] == [(8, 8, 3), (16, 8, 3), (32, 16, 3), (40, 8, 3)]
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)
    engine = Engine.load(model, EngineOptions(ctx=44))
    tokens = cliprompt.plain_bpe(engine.tokenizer, text.read_text())
    session = engine.new_session(ctx=44)
    for r in rows:
        session.sync(tokens[: int(r[0])])
        assert int(r[5]) == len(session.snapshot())
    assert b"ds4-bench: device cpu, commit" in proc.stderr


def test_shipped_text_is_the_whole_book_without_project_gutenbergs_header():
    """bench/data/README.md's claims: the poem's twelve books, title to end, LF-only ASCII, none
    of Project Gutenberg's introduction, long enough (>= 400 KB) for frontiers past 100K tokens."""
    text = TEXT.read_bytes().decode("ascii")
    assert text.startswith("Paradise Lost\n")
    assert text.endswith("Through Eden took their solitary way.\n\n[The End]\n")
    books = [line for line in text.splitlines() if line.startswith("Book ")]
    assert books == [f"Book {n}" for n in "I II III IV V VI VII VIII IX X XI XII".split()]
    assert "Gutenberg" not in text and "\r" not in text and "\x1a" not in text
    assert len(text) >= 400_000


def test_text_too_short_exits_1(tmp_path, monkeypatch, capsys):
    from dwarfstar.gguf.synth import synthesize

    model = synthesize(tmp_path / "tiny.gguf", preset="tiny")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    monkeypatch.setenv("DS4_LOCK_FILE", str(tmp_path / "lock"))
    argv = ["-m", str(model), "--prompt-file", str(short), "--cpu", "--ctx-start", "8", "--ctx-max", "64"]
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.err.endswith("need at least --ctx-max=64\n") and out.out == ""


def test_text_tokenization_plain_and_chat(tok, tmp_path):
    from dwarfstar.bench import bench_tokens

    path = tmp_path / "t.txt"
    path.write_text("some <think> text")
    plain = bench_tokens(tok, BenchOptions(prompt_file=str(path)))
    assert plain == cliprompt.plain_bpe(tok, "some <think> text") and tok.id_of("<think>") not in plain
    chat = bench_tokens(tok, BenchOptions(chat_prompt_file=str(path), system="Sys."))
    ids = lambda *names: [tok.id_of(n) for n in names]
    assert chat == (ids("<｜begin▁of▁sentence｜>") + cliprompt.plain_bpe(tok, "Sys.") + ids("<｜User｜>") + plain
                    + ids("<｜Assistant｜>", "</think>"))
