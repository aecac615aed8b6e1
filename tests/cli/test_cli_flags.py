"""`ds4` flag parsing: defaults, ranges, exit codes, mutual exclusions (cli.md §1.2, §2.2, §10 items 1, 8).

The oracle is the spec's tables, written out here by hand."""

import pytest
from hypothesis import given, strategies as st

from dwarfstar import cli, flags
from dwarfstar.cli import CliOptions, main, parse_args
from dwarfstar.flags import HelpRequested, UsageError


def test_defaults_match_the_spec_table():
    opts = parse_args([])
    assert opts == CliOptions()
    assert (opts.model, opts.ctx, opts.n_tokens) == ("ds4flash.gguf", 32768, 50000)
    assert (opts.temperature, opts.top_p, opts.top_k, opts.min_p, opts.seed) == (1.0, 1.0, 0, 0.05, None)
    assert opts.system == "You are a helpful assistant"
    assert (opts.mode, opts.numerics, opts.logprobs_top_k) == ("high", "official", 20)


def test_values_and_later_flags_override_earlier():
    opts = parse_args([
        "-m", "a.gguf", "--model", "b.gguf", "-c", "4096", "-n", "7", "--temp", "0", "--top-p", "0.5",
        "--top-k", "40", "--min-p", "1", "--seed", str(2**64 - 1), "-sys", "", "--nothink", "--think-max",
        "--numerics", "exact", "--cpu", "-p", "-x", "--dump-logprobs", "out.json", "--logprobs-top-k", "500",
    ])
    assert opts.model == "b.gguf" and opts.ctx == 4096 and opts.n_tokens == 7
    assert (opts.temperature, opts.top_p, opts.top_k, opts.min_p) == (0.0, 0.5, 40, 1.0)
    assert opts.seed == 2**64 - 1 and opts.system == ""
    assert opts.mode == "max" and opts.numerics == "exact" and opts.backend == "cpu"
    # A value is the next element verbatim, even when it looks like a flag.
    assert opts.prompt == "-x"
    assert opts.logprobs_top_k == 128, "capped at 128"
    assert parse_args(["--think-max", "--think"]).mode == "high"
    assert parse_args(["--backend", "cuda", "--cpu"]).backend == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["--ctx"], "ds4: missing value for --ctx"),
    (["--ctx", "0"], "ds4: invalid value for --ctx: 0"),
    (["--ctx", "-5"], "ds4: invalid value for --ctx: -5"),
    (["--ctx", "12x"], "ds4: invalid value for --ctx: 12x"),
    (["-n", "2147483648"], "ds4: invalid value for -n: 2147483648"),
    (["--temp", "100.5"], "ds4: invalid value for --temp: 100.5"),
    (["--temp", "-0.1"], "ds4: invalid value for --temp: -0.1"),
    (["--temp", "nan"], "ds4: invalid value for --temp: nan"),
    (["--top-p", "1.01"], "ds4: invalid value for --top-p: 1.01"),
    (["--min-p", "inf"], "ds4: invalid value for --min-p: inf"),
    (["--top-k", "-1"], "ds4: invalid value for --top-k: -1"),
    (["--seed", "0"], "ds4: invalid value for --seed: 0"),
    (["--seed", str(2**64)], f"ds4: invalid value for --seed: {2**64}"),
    (["--numerics", "fast"], "ds4: invalid value for --numerics: fast"),
    (["--numerics"], "ds4: missing value for --numerics"),
    (["-p", "a", "--prompt-file", "f"], "ds4: specify only one prompt source"),
    (["--dump-tokens"], "ds4: --dump-tokens requires -p or --prompt-file"),
    (["--server"], "ds4: use ds4-server for the HTTP server"),
    (["--metal"], "ds4: the metal backend is not supported by dwarfstar; use --cpu or --cuda"),
    (["--backend", "metal"], "ds4: the metal backend is not supported by dwarfstar; use --cpu or --cuda"),
    (["--backend", "tpu"], "ds4: invalid backend: tpu\nds4: valid backends are: metal, cuda, cpu"),
    (["--bogus"], "ds4: unknown option: --bogus"),
    (["--ctx=5"], "ds4: unknown option: --ctx=5"),
])
def test_usage_errors_exit_2_with_ds4_wording(argv, message, capsys):
    with pytest.raises(UsageError) as e:
        parse_args(argv)
    assert str(e.value) == message and e.value.exit_code == 2
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message + "\n")
    assert ("usage: ds4" in err) == message.startswith("ds4: unknown option")


def test_help_goes_to_stdout_exit_0(capsys):
    with pytest.raises(HelpRequested):
        parse_args(["--temp", "0", "-h"])
    assert main(["--help"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("usage: ds4") and out.err == ""
    for flag in ("--top-k", "--numerics official|exact", "--dump-logprobs", "--think-max", "--cuda"):
        assert flag in out.out


def test_numerics_values():
    assert parse_args([]).numerics == "official"
    assert parse_args(["--numerics", "exact"]).numerics == "exact"
    assert parse_args(["--numerics", "exact", "--numerics", "official"]).numerics == "official"


def test_unreadable_prompt_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["--prompt-file", str(missing)]) == 2
    assert capsys.readouterr().err == f"ds4: failed to open prompt file: {missing}\n"


def test_missing_model_gives_one_message_and_exit_1(tmp_path, capsys):
    model = tmp_path / "absent.gguf"
    assert main(["-m", str(model), "-p", "hi"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"model file not found: {model}" in err
    assert "antirez/deepseek-v4-gguf" in err and "ds4flash.gguf" in err and "-m" in err


@given(st.integers(min_value=-10**20, max_value=10**20))
def test_int_flags_accept_exactly_1_to_int32_max(n):
    table = [flags.Flag(("-x",), "x", "int"), flags.Flag(("-z",), "z", "int0")]
    for opt, lo in (("-x", 1), ("-z", 0)):
        if lo <= n <= flags.INT_MAX:
            assert flags.parse("p", [opt, str(n)], table) == {opt[1]: n}
        else:
            with pytest.raises(UsageError, match=f"^p: invalid value for {opt}: "):
                flags.parse("p", [opt, str(n)], table)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_range_is_inclusive_and_finite(x):
    table = [flags.Flag(("--f",), "f", "float", lo=0.0, hi=1.0)]
    text = repr(x)
    if 0.0 <= x <= 1.0:
        assert flags.parse("p", ["--f", text], table)["f"] == x
    else:
        with pytest.raises(UsageError):
            flags.parse("p", ["--f", text], table)


def test_bench_style_missing_value():
    with pytest.raises(UsageError, match="^ds4-bench: --ctx-max requires an argument$"):
        flags.parse("ds4-bench", ["--ctx-max"], [flags.Flag(("--ctx-max",), "c", "int")], bench_style=True)


def test_usage_mentions_every_flag_of_the_table():
    for flag in cli.TABLE:
        if not flag.dest.startswith("_"):
            assert any(name in cli.USAGE for name in flag.names), flag.names


def test_no_warmup_reaches_the_engine_options(monkeypatch):
    """`--no-warmup` (ds4, ds4-server, ds4-bench; dwarfstar's own: ds4 has no such switch) turns
    off EngineOptions.warmup, the CUDA engine's kernel warm-up at load; on by default."""
    from dwarfstar import bench
    from dwarfstar.engine.engine import Engine
    from dwarfstar.server import main as server_main
    from dwarfstar.server.options import parse_args as server_args

    seen = []
    monkeypatch.setattr(Engine, "load", staticmethod(lambda path, options: seen.append(options.warmup)))
    for argv, want in (([], True), (["--no-warmup"], False)):
        cli.load(parse_args(["--cpu", *argv]))
        server_main.load_engine(server_args(argv))
        assert bench.parse_args(["--prompt-file", "x", *argv]).warmup is want
        assert seen[-2:] == [want, want]
