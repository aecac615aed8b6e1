"""`ds4-server` flags (cli.md §1.2, §3) and the missing-model message."""

from __future__ import annotations

import pytest

from dwarfstar.server.main import main
from dwarfstar.server.options import DEFAULT_TOKENS, FLAGS, HelpRequested, ServerOptions, UsageError, parse_args


def test_defaults():
    options = parse_args([])
    assert options == ServerOptions()
    assert (options.host, options.port, options.ctx, options.tokens) == ("127.0.0.1", 8000, 32768, DEFAULT_TOKENS)
    assert options.exact_dsml_replay and options.tool_memory_max_ids == 100000


def test_values_later_wins_and_kv_flags():
    options = parse_args(["-c", "100", "--ctx", "200", "-n", "7", "--port", "9", "--host", "localhost", "--cors",
                          "--kv-disk-dir", "kv", "--kv-disk-space-mb", "8192", "--kv-cache-cold-max-tokens", "0",
                          "--disable-exact-dsml-tool-replay", "--tool-memory-max-ids", "5", "--cpu"])
    assert (options.ctx, options.tokens, options.port, options.host) == (200, 7, 9, "127.0.0.1")
    assert options.cors and options.kv_disk_dir == "kv" and options.kv_disk_space_mb == 8192
    assert not options.exact_dsml_replay and options.tool_memory_max_ids == 5 and options.backend == "cpu"


@pytest.mark.parametrize("argv,message", [
    (["--ctx"], "ds4-server: missing value for --ctx"),
    (["--ctx", "0"], "ds4-server: invalid value for --ctx: 0"),
    (["--ctx", "12x"], "ds4-server: invalid value for --ctx: 12x"),
    (["--port", "70000"], "ds4-server: invalid value for --port: 70000"),
    (["--mtp-margin", "inf"], "ds4-server: invalid value for --mtp-margin: inf"),
    (["--backend", "tpu"], "ds4-server: invalid value for --backend: tpu"),
    (["--bogus"], "ds4-server: unknown option: --bogus"),
    (["--ctx=5"], "ds4-server: unknown option: --ctx=5"),
    (["--kv-cache-cold-max-tokens", "10"], "must be 0 or >="),
    (["--metal"], "metal backend is not supported"),
])
def test_usage_errors_exit_2(argv, message):
    with pytest.raises(UsageError) as err:
        parse_args(argv)
    assert message in str(err.value) and err.value.exit_code == 2


@pytest.mark.parametrize("argv", [["--ctx", "1_0"], ["--port", "8_000"], ["--mtp-margin", "1_0"],
                                  ["--ctx", str(2**31)]])
def test_numbers_parse_whole_as_ds4_reads_them(argv):
    # cli.md §1.2: the whole string must parse (ds4's strtol/strtod stop at "_"; ints are
    # int32); Python's int() and float() take underscores and any size.
    with pytest.raises(UsageError) as err:
        parse_args(argv)
    assert str(err.value) == f"ds4-server: invalid value for {argv[0]}: {argv[1]}" and err.value.exit_code == 2


def test_help_documents_every_flag_and_the_kv_defaults():
    with pytest.raises(HelpRequested) as help_text:
        parse_args(["-h"])
    text = str(help_text.value)
    for name in [name for flag in FLAGS for name in flag.names]:
        assert name in text, name
    kv = text[text.index("disk KV cache"):text.index("testing only:")]
    assert "not implemented" not in kv and "reserved" not in kv
    defaults = ServerOptions()
    for name, field in [(flag.names[0], flag.dest) for flag in FLAGS if flag.kind != "flag"]:
        if name.startswith("--kv-") and name != "--kv-disk-dir":
            # The help of each valued --kv flag runs to the next flag; it names the real default.
            entry = kv[kv.index(name):].split("\n  --", 1)[0]
            assert f"default {getattr(defaults, field)}" in entry, name


def test_missing_model_one_clear_message(tmp_path, capsys):
    code = main(["-m", str(tmp_path / "absent.gguf")])
    err = capsys.readouterr().err
    assert code == 1
    assert "model file not found" in err and "antirez/deepseek-v4-gguf" in err
    assert "Traceback" not in err


def test_bad_flag_exit_code(capsys):
    assert main(["--port", "x"]) == 2
    assert "invalid value for --port" in capsys.readouterr().err
