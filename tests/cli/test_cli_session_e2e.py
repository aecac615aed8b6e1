"""Session files across `ds4` processes on a generated tiny model (CPU; issue 7 item 4).

Process A never stops: turn 1, `/save s1.kv`, turn 2, `/save a2.kv`. Process B is a new
process that continues s1.kv with `--load-session` + a one-shot turn 2 and
`--save-session b2.kv`; process C does the same interactively with `/load`.
Oracles: A's state after turn 2 — its snapshot bytes (tokens, logits, KV) and its
printed answer — must be what B and C end with, and B and C must report a prefill
of exactly EOS + the turn-2 tokens (counted here with the tokenizer). Greedy
decoding, one torch thread per process, so the computation is deterministic.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dwarfstar import cliprompt
from dwarfstar.engine import diskcache_format as fmt
from dwarfstar.gguf.synth import synthesize
from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.text.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--ctx", "512", "--temp", "0", "-n", "6", "--nothink", "-sys", "Be brief."]
TURN2 = "and what next?"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("cli_session") / "tiny.gguf", preset="tiny")


def ds4(tmp_path, *args, stdin: str = ""):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DS4_LOCK_FILE"] = str(tmp_path / "ds4.lock")
    env["HOME"] = str(tmp_path)
    env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "dwarfstar.cli", *args]
    proc = subprocess.run(argv, input=stdin.encode(), capture_output=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode(), proc.stderr.decode()


def answers(stdout: str) -> list[str]:
    """What the REPL printed after each prompt, for the lines that printed something
    (/save, /load and /quit write only to stderr)."""
    return [chunk for chunk in stdout.split("ds4> ")[1:] if chunk]


def snapshot(path: Path) -> bytes:
    blob = path.read_bytes()
    header = fmt.parse_header(blob[:fmt.HEADER_SIZE], len(blob))
    _, snap = fmt.decode_payload(blob[fmt.HEADER_SIZE + header.text_len:header.body_len])
    return snap


def test_a_saved_session_continues_in_a_new_process_exactly(tmp_path, model):
    tok = Tokenizer.from_metadata(GGUFFile(model).metadata)
    n_suffix = 1 + len(cliprompt.turn_tokens(tok, TURN2, "none"))
    out_a, err_a = ds4(tmp_path, "-m", str(model), *ARGS,
                       stdin=f"hello there\n/save s1.kv\n{TURN2}\n/save a2.kv\n/quit\n")
    assert "ds4: session saved to s1.kv" in err_a and "ds4: session saved to a2.kv" in err_a
    answer_a = answers(out_a)[1]

    out_b, err_b = ds4(tmp_path, "-m", str(model), *ARGS, "--load-session", "s1.kv", "-p", TURN2,
                       "--save-session", "b2.kv")
    out_c, err_c = ds4(tmp_path, "-m", str(model), *ARGS, stdin=f"/load s1.kv\n{TURN2}\n/save c2.kv\n/quit\n")
    for err in (err_b, err_c):
        assert f"processing {n_suffix} input tokens: {n_suffix}/{n_suffix} (100.0%)" in err
        assert "processing" not in err.replace(f"processing {n_suffix} input", ""), "only the suffix is prefilled"
    assert out_b == answer_a and answers(out_c) == [answer_a]
    want = snapshot(tmp_path / "a2.kv")
    assert snapshot(tmp_path / "b2.kv") == want and snapshot(tmp_path / "c2.kv") == want
