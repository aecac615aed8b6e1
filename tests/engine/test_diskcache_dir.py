"""The disk cache directory: save, lookup by longest byte prefix, consume rule, tool
maps, budget and eviction, stale temp files, two processes on one directory
(server.md §10.2, §10.4-§10.7). A fake session stands in for the engine; one
test restores a real tiny-model session and compares logits.

Oracles: file bytes read back with `struct`/`hashlib` independently of the codec;
the spec's selection and eviction rules worked out by hand for small cases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import struct

import torch

from dwarfstar.engine.diskcache import CacheOptions, DiskCache

from .diskcache_fakes import MODEL, FakeSession, opts

def sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def test_save_writes_the_spec_layout_and_load_restores(tmp_path):
    cache = DiskCache(opts(tmp_path), clock=lambda: 1000)
    text = "<sys>system prompt</sys>"
    path = cache.save(FakeSession(range(10)), text, "cold")
    assert path.name == sha(text) + ".kv"
    raw = path.read_bytes()
    assert raw[:6] == b"KVC\x01\x04\x01" and struct.unpack_from("<IIIxxxxQQ", raw, 8) == (10, 0, 4096, 1000, 1000)
    n_payload, n_text = struct.unpack_from("<QI", raw, 40)
    assert raw[52:52 + n_text] == text.encode() and len(raw) == 52 + n_text + n_payload
    assert oct(os.stat(tmp_path / "kv").st_mode & 0o777) == "0o700"

    later = DiskCache(opts(tmp_path), clock=lambda: 2000)
    session = FakeSession([99])
    hit = later.load(text + "<user>hi</user>", session)
    assert hit is not None and hit.text_len == len(text.encode()) and hit.n_tokens == 10
    assert session.tokens == list(range(10)) and hit.reason == "cold"
    # Hit count and last-used were rewritten in place.
    assert struct.unpack_from("<I", path.read_bytes(), 12) == (1,)
    assert struct.unpack_from("<Q", path.read_bytes(), 32) == (2000,)


def test_lookup_picks_the_longest_matching_prefix(tmp_path):
    cache = DiskCache(opts(tmp_path))
    prompt = "AAAA|BBBB|CCCC|DDDD"
    cache.save(FakeSession(range(5)), "AAAA|", "cold")
    cache.save(FakeSession(range(9)), "AAAA|BBBB|CCCC|", "continued")
    cache.save(FakeSession(range(7)), "AAAA|BBBB|", "continued")
    # Longer but not a prefix; and a prefix but longer than the prompt.
    cache.save(FakeSession(range(20)), "AAAA|BBBB|XXXX|DDDD", "evict")
    cache.save(FakeSession(range(30)), prompt + "|EEEE", "evict")
    session = FakeSession()
    hit = cache.load(prompt, session)
    assert hit.text_len == len("AAAA|BBBB|CCCC|") and session.tokens == list(range(9))
    assert cache.load("ZZZZ", FakeSession()) is None
    # The whole prompt itself is a valid (equal-length) prefix.
    cache.save(FakeSession(range(11)), prompt, "evict")
    assert cache.load(prompt, FakeSession()).n_tokens == 11


def test_filters_min_tokens_ctx_and_quant(tmp_path):
    cache = DiskCache(opts(tmp_path, min_tokens=4))
    assert cache.save(FakeSession(range(3)), "short", "cold") is None
    assert not list((tmp_path / "kv").glob("*.kv"))
    cache.save(FakeSession(range(6)), "two-bit", "cold")
    big_ctx = DiskCache(opts(tmp_path, ctx=8192, quant_bits=2))
    big_ctx.save(FakeSession(range(6)), "wide", "cold")
    assert cache.load("wide context", FakeSession()) is None
    # A 4-bit server reads a 2-bit file by default, not with reject_different_quant.
    mixed = DiskCache(opts(tmp_path, ctx=8192))
    assert mixed.load("wide context", FakeSession()) is not None
    strict = DiskCache(opts(tmp_path, ctx=8192, reject_different_quant=True))
    assert strict.load("wide context", FakeSession()) is None
    assert DiskCache(opts(tmp_path, min_tokens=7)).load("two-bit!", FakeSession()) is None


def test_consume_rule_deletes_long_checkpoints_after_loading(tmp_path):
    cache = DiskCache(opts(tmp_path, cold_max_tokens=8))
    long_path = cache.save(FakeSession(range(9)), "long prefix", "continued")
    short_path = cache.save(FakeSession(range(8)), "short", "cold")
    assert cache.load("long prefix + more", FakeSession()).n_tokens == 9
    assert not long_path.exists()
    assert cache.load("short + more", FakeSession()).n_tokens == 8
    assert short_path.exists()
    unlimited = DiskCache(opts(tmp_path, cold_max_tokens=0))
    keep = unlimited.save(FakeSession(range(50)), "kept", "evict")
    assert unlimited.load("kept!", FakeSession()) is not None and keep.exists()


def test_tool_map_written_only_for_blocks_in_the_text_and_refreshed_in_place(tmp_path):
    cache = DiskCache(opts(tmp_path))
    block = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    text = "prompt" + block
    session = FakeSession(range(12))
    path = cache.save(session, text, "evict", tool_map={"call_a": block, "call_b": block, "call_z": "absent"})
    assert path.read_bytes()[6] & 1
    hit = cache.load(text + " next", FakeSession())
    assert hit.tool_map == {"call_a": block, "call_b": block}
    assert cache.tool_blocks({"call_b", "call_q"}) == {"call_b": block}
    assert cache.tool_blocks(None) == {"call_a": block, "call_b": block}
    size = path.stat().st_size
    # Same key again: the payload is not rewritten (no snapshot), only the trailer.
    again = FakeSession(range(12))
    cache.save(again, text, "shutdown", tool_map={"call_c": block})
    assert again.n_snapshots == 0
    assert cache.tool_blocks({"call_a", "call_c"}) == {"call_c": block}
    # Two entries (8 + 6 + len(block) bytes each) became one.
    assert path.stat().st_size == size - (8 + len(b"call_a") + len(block.encode()))


def test_incompatible_same_key_file_is_replaced(tmp_path):
    small = DiskCache(opts(tmp_path, ctx=8192))
    small.save(FakeSession(range(5)), "key", "cold")
    cache = DiskCache(opts(tmp_path, ctx=4096))
    session = FakeSession(range(6))
    path = cache.save(session, "key", "evict")
    assert session.n_snapshots == 1
    assert struct.unpack_from("<II", path.read_bytes(), 8)[0] == 6


def test_budget_smaller_than_one_snapshot_skips_the_save(tmp_path, caplog):
    cache = DiskCache(opts(tmp_path, space_mb=1))
    with caplog.at_level(logging.INFO, logger="ds4.diskcache"):
        assert cache.save(FakeSession(range(5), pad=1 << 20), "big", "cold") is None
    assert "exceeds" in caplog.text and cache.enabled
    assert not list((tmp_path / "kv").iterdir()) or [p.name for p in (tmp_path / "kv").iterdir()] == [".lock"]
    assert cache.save(FakeSession(range(5)), "small", "cold") is not None


def test_eviction_removes_the_lowest_score_first_and_protects_the_new_file(tmp_path):
    now = [1_000_000]
    cache = DiskCache(opts(tmp_path, space_mb=1), clock=lambda: now[0])
    pad = 300_000
    a = cache.save(FakeSession(range(10), pad), "a", "cold")
    b = cache.save(FakeSession(range(40), pad), "b", "cold")
    c = cache.save(FakeSession(range(20), pad), "c", "cold")
    # a has the lowest tokens/size; give it hits so that it outranks c instead.
    for _ in range(4):
        cache.load("a!", FakeSession())
    now[0] += 10
    d = cache.save(FakeSession(range(5), pad), "d", "cold")
    # Budget 1 MiB holds three 300 kB files: c (20 tokens, no hits) goes, d stays
    # although it has the lowest score (just written).
    assert [p.exists() for p in (a, b, c, d)] == [True, True, False, True]


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    directory = tmp_path / "kv"
    directory.mkdir()
    proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    proc.start()
    proc.join()
    dead = directory / f"{'a' * 40}.kv.tmp.{proc.pid}.1"
    mine = directory / f"{'b' * 40}.kv.tmp.{os.getpid()}.1"
    dead.write_bytes(b"x")
    mine.write_bytes(b"x")
    DiskCache(opts(tmp_path))
    assert not dead.exists() and mine.exists()


def _hammer(directory: str, worker: int) -> None:
    cache = DiskCache(CacheOptions(directory=directory, model_id=MODEL, ctx=4096, min_tokens=4, space_mb=1))
    for i in range(30):
        cache.save(FakeSession(range(worker * 100 + i, worker * 100 + i + 8), pad=90_000), f"k{i % 12}", "cold")
        cache.load(f"k{(i * 7) % 12} tail", FakeSession())
    os._exit(0 if cache.enabled else 3)


def test_two_processes_share_a_directory_without_corruption(tmp_path, caplog):
    DiskCache(opts(tmp_path))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path / "kv"), w)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    files = sorted((tmp_path / "kv").glob("*.kv"))
    assert files and not list((tmp_path / "kv").glob("*.tmp.*"))
    assert sum(f.stat().st_size for f in files) <= 1 << 20
    cache = DiskCache(opts(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ds4.diskcache"):
        for f in files:
            key = f.read_bytes()[52:52 + struct.unpack_from("<I", f.read_bytes(), 48)[0]].decode()
            session = FakeSession()
            assert cache.load(key + " tail", session) is not None
            assert len(session.tokens) == 8 and session.tokens[0] // 100 in (1, 2)
    assert "skipping" not in caplog.text and "deleting" not in caplog.text


def test_real_session_round_trips_through_the_disk(tmp_path):
    from dwarfstar.engine.diskcache import model_id, routed_quant_bits
    from dwarfstar.engine.engine import Engine, EngineOptions
    from dwarfstar.gguf import synth

    config = dataclasses.replace(synth.TINY, compress_ratios=(0, 0, 4, 8), window_size=8, index_topk=2)
    path = synth.synthesize(tmp_path / "tiny.gguf", config=config, seed=5)
    engine = Engine.load(path, EngineOptions(ctx=64, prefill_chunk=5))
    tokens = torch.randint(0, config.vocab_size, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    live = engine.new_session()
    live.sync(tokens)
    cache = DiskCache(opts(tmp_path, model_id=model_id(engine), quant_bits=routed_quant_bits(engine), ctx=64))
    cache.save(live, "prefix text", "evict")
    fresh = engine.new_session()
    assert cache.load("prefix text and more", fresh) is not None
    assert fresh.tokens == tokens
    assert torch.equal(fresh.logits(), live.logits())
    live.eval(3)
    fresh.eval(3)
    assert torch.equal(fresh.logits(), live.logits())
    # Another model (other weights, same shapes) never restores it.
    other = Engine.load(synth.synthesize(tmp_path / "other.gguf", config=config, seed=6), EngineOptions(ctx=64))
    assert model_id(other) != model_id(engine)
