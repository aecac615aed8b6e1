"""Disk KV cache on the real `ds4-server` process (issue 7 acceptance; server.md §10, §12).

Oracles: a server without a disk cache that never stopped answers the same
conversation; greedy decoding and seeded sampling (temperature 1, fixed seed, so
the whole distribution matters, not only its argmax) must give identical text,
and `cached_tokens` must equal the tokens the first server held when it stopped
(P + its answer), i.e. only the new suffix is prefilled. The tiny model has no
logprobs endpoint, so identical sampled text stands in for identical logits.

Read-only directory: as root chmod does not stop writes, so there the cache
directory is replaced by a plain file while the server runs (every write then
fails with ENOTDIR: the same turn-off path); otherwise it is chmod 0500.
The "budget smaller than one snapshot" fault is covered by the unit tests
(tests/engine/test_diskcache_dir.py): a tiny-model snapshot is far below the
smallest budget the flag accepts (1 MiB).
"""

from __future__ import annotations

import os
import random
import shutil
import struct

import pytest
from server_live import LiveServer, oai

from dwarfstar.engine.diskcache import DiskCache, model_id, routed_quant_bits
from dwarfstar.engine.diskcache import CacheOptions
from dwarfstar.engine.engine import Engine, EngineOptions
from dwarfstar.gguf.synth import synthesize

MODEL = "deepseek-v4-flash"
BASE = "Tell me about the history of the city of Paris and its bridges."
DISK = ("--kv-cache-min-tokens", "16", "--kv-cache-cold-max-tokens", "0",
        "--kv-cache-continued-interval-tokens", "0")
SAMPLES = [{"temperature": 0}, {"temperature": 1, "top_p": 1, "seed": 1234}]


def chat(server, messages, sampling=None, n=4):
    return oai(server).chat.completions.create(model=MODEL, messages=messages, reasoning_effort="none",
                                               max_tokens=n, **(sampling or SAMPLES[0]))


def turn2(prompt: str, answer: str, user: str = "And the oldest one?"):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer},
            {"role": "user", "content": user}]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """A server without disk cache that never stops: P, then P + answer + turn 2
    (continued from the live KV: memory path).
    P is the first of a few prompts whose answer is whole UTF-8: random tiny weights
    often end on a partial character, which a client cannot send back unchanged."""
    server = LiveServer(tiny_model, tmp_path_factory.mktemp("ref"))
    try:
        for k in range(20):
            prompt = f"{BASE}({k})"
            first = chat(server, [{"role": "user", "content": prompt}])
            answer = first.choices[0].message.content
            if "\ufffd" not in answer:
                break
        else:
            pytest.fail("no prompt with a whole-UTF-8 answer")
        second = []
        for sampling in SAMPLES:
            # Serve P again first, so each turn 2 continues from the live P + answer
            # (a full re-tokenization of turn 2 may split the answer differently).
            assert chat(server, [{"role": "user", "content": prompt}]).choices[0].message.content == answer
            second.append(chat(server, turn2(prompt, answer), sampling))
        # Without any cache, turn 2 is prefilled from its own tokenization.
        chat(server, [{"role": "user", "content": "unrelated " * 4}])
        cold = chat(server, turn2(prompt, answer))
        yield prompt, answer, second, cold
    finally:
        server.stop()


@pytest.fixture(scope="module")
def snapshot_dir(tiny_model, tmp_path_factory, reference):
    """A cache directory holding the shutdown checkpoint of a server that served P."""
    tmp = tmp_path_factory.mktemp("first")
    server = LiveServer(tiny_model, tmp, "--kv-disk-dir", str(tmp / "kv"), *DISK)
    try:
        first = chat(server, [{"role": "user", "content": reference[0]}])
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert first.choices[0].message.content == reference[1]
    files = list((tmp / "kv").glob("*.kv"))
    assert len(files) == 1 and files[0].read_bytes()[5] == 4, "one shutdown checkpoint"
    held = first.usage.prompt_tokens + first.usage.completion_tokens
    assert struct.unpack_from("<I", files[0].read_bytes(), 8) == (held,)
    return tmp / "kv", held


def test_restart_loads_the_snapshot_and_prefills_only_the_suffix(tiny_model, tmp_path, reference, snapshot_dir):
    directory, held = snapshot_dir
    kv = tmp_path / "kv"
    shutil.copytree(directory, kv)
    server = LiveServer(tiny_model, tmp_path, "--kv-disk-dir", str(kv), *DISK)
    try:
        answers = []
        # The live session then holds turn 2 + its answer, longer than the next
        # request: a miss, so the second request needs the disk again.
        for sampling in SAMPLES:
            answers.append(chat(server, turn2(*reference[:2]), sampling))
    finally:
        server.stop()
    for got, want in zip(answers, reference[2]):
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
        assert got.usage.prompt_tokens_details.cached_tokens == held
    # The never-stopped server reused exactly as much from its live KV.
    assert reference[2][0].usage.prompt_tokens_details.cached_tokens == held
    assert "cache_source: disk-text" in server.trace.read_text()


def test_alternating_conversations_restore_from_disk(tiny_model, tmp_path, reference):
    server = LiveServer(tiny_model, tmp_path, "--kv-disk-dir", str(tmp_path / "kv"), *DISK)
    try:
        x1 = chat(server, [{"role": "user", "content": reference[0]}])
        for k in range(20):
            y_prompt = f"Describe the rivers of France in some detail please. ({k})"
            y1 = chat(server, [{"role": "user", "content": y_prompt}])
            if "\ufffd" not in y1.choices[0].message.content:
                break
        x2 = chat(server, turn2(reference[0], x1.choices[0].message.content))
        y2 = chat(server, [{"role": "user", "content": y_prompt},
                           {"role": "assistant", "content": y1.choices[0].message.content},
                           {"role": "user", "content": "Which is longest?"}])
    finally:
        server.stop()
    assert x2.usage.prompt_tokens_details.cached_tokens == x1.usage.prompt_tokens + x1.usage.completion_tokens
    assert y2.usage.prompt_tokens_details.cached_tokens == y1.usage.prompt_tokens + y1.usage.completion_tokens
    assert x2.choices[0].message.content == reference[2][0].choices[0].message.content
    trace = server.trace.read_text()
    assert trace.count("cache_source: disk-text") == 2
    assert "kv disk cache: stored" in server.output() and "(evict," in server.output()


def _other_model_file(tmp_path, text: str, target: os.PathLike) -> None:
    """A real checkpoint of a model with other dimensions, saved under `text`'s key."""
    path = synthesize(tmp_path / "other.gguf", layers=2)
    engine = Engine.load(path, EngineOptions(ctx=4096))
    session = engine.new_session()
    session.sync(engine.tokenizer.encode(text))
    cache = DiskCache(CacheOptions(directory=str(tmp_path / "other"), model_id=model_id(engine), ctx=4096,
                                   quant_bits=routed_quant_bits(engine), min_tokens=1))
    saved = cache.save(session, text, "evict")
    shutil.copy(saved, target)


def test_damaged_files_warn_and_the_answer_stays_correct(tiny_model, tmp_path, reference, snapshot_dir):
    directory, held = snapshot_dir
    good = next(directory.glob("*.kv"))
    blob = good.read_bytes()
    n_text = struct.unpack_from("<I", blob, 48)[0]
    text = blob[52:52 + n_text].decode()
    rng = random.Random(11)
    truncated = blob[:rng.randrange(1, len(blob))]
    header_flip, payload_flip = bytearray(blob), bytearray(blob)
    header_flip[8] ^= 0x02
    payload_flip[52 + n_text + rng.randrange(40, len(blob) - 52 - n_text)] ^= 0x20
    kv = tmp_path / "kv"
    server = LiveServer(tiny_model, tmp_path, "--kv-disk-dir", str(kv), *DISK)
    target = kv / good.name
    damaged = {"truncated": truncated, "header": bytes(header_flip), "payload": bytes(payload_flip)}
    try:
        for name, data in [*damaged.items(), ("other-model", None), ("intact", blob)]:
            # The live session holds the previous turn 2 + answer: always a miss.
            if data is None:
                _other_model_file(tmp_path, text, target)
            else:
                target.write_bytes(data)
            got = chat(server, turn2(*reference[:2]))
            want = reference[2][0] if name == "intact" else reference[3]
            assert got.choices[0].message.content == want.choices[0].message.content, name
            expected = held if name == "intact" else 0
            assert got.usage.prompt_tokens_details.cached_tokens == expected, name
        assert server.alive()
    finally:
        server.stop()
    log = server.output()
    assert log.count(f"{good.name}") >= 4
    assert "truncated" in log and "checksum" in log and "another model" in log


def test_unwritable_directory_turns_the_cache_off_and_serving_continues(tiny_model, tmp_path, reference):
    kv = tmp_path / "kv"
    server = LiveServer(tiny_model, tmp_path, "--kv-disk-dir", str(kv), *DISK)
    try:
        first = chat(server, [{"role": "user", "content": reference[0]}])
        if os.geteuid() == 0:
            shutil.rmtree(kv)
            kv.write_text("not a directory any more")
        else:
            kv.chmod(0o500)
        # The miss saves an evict checkpoint: the write fails, the cache turns off.
        other = chat(server, [{"role": "user", "content": "unrelated " * 4}])
        again = chat(server, turn2(reference[0], first.choices[0].message.content))
        assert server.alive()
    finally:
        server.stop()
        if kv.is_dir():
            kv.chmod(0o700)
    assert other.choices[0].finish_reason
    assert again.choices[0].message.content == reference[3].choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert "kv disk cache disabled" in server.output()
    assert server.proc.returncode == 0
