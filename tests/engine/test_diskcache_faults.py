"""Disk cache faults (issue 7 §3): truncated, bit-flipped, foreign and other-model
files are skipped with a warning and never loaded; a full disk or an unwritable
directory turns the cache off with a warning; nothing raises.

Read-only directories: when the tests run as root, chmod does not stop writes, so
the test then simulates the EACCES the kernel would give (monkeypatched temp-file
creation) and says so in its id; otherwise it uses a real chmod 0500.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import struct

import pytest

from dwarfstar.engine import diskcache
from dwarfstar.engine.diskcache import DiskCache

from .diskcache_fakes import FakeSession, opts

TEXT = "system prompt and tools"
PROMPT = TEXT + " user turn"
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def saved(tmp_path):
    cache = DiskCache(opts(tmp_path))
    path = cache.save(FakeSession(range(40)), TEXT, "cold", tool_map={})
    return cache, path


def _load_warns(cache, caplog, prompt=PROMPT):
    session = FakeSession([7, 7])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ds4.diskcache"):
        hit = cache.load(prompt, session)
    return hit, session, caplog.text


def test_truncated_files_are_skipped_at_every_offset(saved, caplog):
    cache, path = saved
    blob = path.read_bytes()
    offsets = sorted(set(random.Random(7).sample(range(len(blob)), 25)) | {0, 1, 51, 52, len(blob) - 1})
    for cut in offsets:
        path.write_bytes(blob[:cut])
        hit, session, text = _load_warns(cache, caplog)
        assert hit is None, cut
        assert session.tokens == [7, 7]
        assert path.name in text or not path.exists(), cut
    path.write_bytes(blob)
    assert cache.load(PROMPT, FakeSession()).n_tokens == 40


@pytest.mark.parametrize("offset", [0, 3, 4, 8, 9, 16, 20, 23, 24, 40, 45, 48, 52, 60])
def test_flipped_header_or_text_byte_is_detected(saved, caplog, offset):
    cache, path = saved
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x04
    path.write_bytes(bytes(blob))
    hit, session, text = _load_warns(cache, caplog)
    assert hit is None and session.tokens == [7, 7]
    assert path.name in text and ("checksum" in text or "magic" in text or "version" in text
                                  or "quant" in text or "truncated" in text), text


def test_flipped_payload_byte_is_detected_and_the_file_deleted(saved, caplog):
    cache, path = saved
    blob = bytearray(path.read_bytes())
    n_text = struct.unpack_from("<I", blob, 48)[0]
    n_payload = struct.unpack_from("<Q", blob, 40)[0]
    for where in (0, 9, 13, 17, n_payload // 2, n_payload - 1):
        flipped = bytearray(blob)
        flipped[52 + n_text + where] ^= 0x01
        path.write_bytes(bytes(flipped))
        hit, session, text = _load_warns(cache, caplog)
        assert hit is None and session.tokens == [7, 7]
        # Envelope fields are checked before the checksum; either way the file goes.
        assert f"deleting {path.name}: payload" in text and not path.exists()


def test_flipped_usage_fields_still_load(saved):
    cache, path = saved
    blob = bytearray(path.read_bytes())
    blob[13] ^= 0xFF
    blob[33] ^= 0x01
    path.write_bytes(bytes(blob))
    assert cache.load(PROMPT, FakeSession()).n_tokens == 40


def test_file_of_another_model_is_skipped_not_deleted(tmp_path, caplog):
    DiskCache(opts(tmp_path, model_id="other-dims")).save(FakeSession(range(40)), TEXT, "cold")
    cache = DiskCache(opts(tmp_path))
    hit, session, text = _load_warns(cache, caplog)
    assert hit is None and session.tokens == [7, 7] and "another model" in text
    assert len(list((tmp_path / "kv").glob("*.kv"))) == 1


def test_foreign_ds4_style_file_is_skipped(saved, caplog):
    cache, path = saved
    blob = bytearray(path.read_bytes())
    # ds4 writes 0 in the reserved word and its own payload after the text.
    blob[20:24] = b"\0\0\0\0"
    n_text = struct.unpack_from("<I", blob, 48)[0]
    blob[52 + n_text:52 + n_text + 4] = struct.pack("<I", 0x34565344)
    path.write_bytes(bytes(blob))
    hit, session, text = _load_warns(cache, caplog)
    assert hit is None and session.tokens == [7, 7] and "checksum" in text


def test_token_count_disagreeing_with_the_payload_deletes_the_file(tmp_path, caplog):
    cache = DiskCache(opts(tmp_path))

    class Shrinking(FakeSession):
        def restore(self, blob):
            super().restore(blob)
            self.state = self.state[:-1]

    path = cache.save(FakeSession(range(40)), TEXT, "cold")
    session = Shrinking([7, 7])
    with caplog.at_level(logging.WARNING, logger="ds4.diskcache"):
        assert cache.load(PROMPT, session) is None
    assert session.tokens == [] and not path.exists() and "header says 40" in caplog.text


def test_engine_refusing_the_snapshot_resets_the_session(saved, caplog):
    cache, path = saved

    class Refusing(FakeSession):
        def restore(self, blob):
            self.state = [1]
            raise ValueError("snapshot was taken with a different layer schedule")

    session = Refusing([7, 7])
    with caplog.at_level(logging.WARNING, logger="ds4.diskcache"):
        assert cache.load(PROMPT, session) is None
    assert session.tokens == [] and "different layer schedule" in caplog.text


def test_disk_full_turns_the_cache_off(tmp_path, monkeypatch, caplog):
    cache = DiskCache(opts(tmp_path))
    real = diskcache._write_all
    calls = []

    def full(fd, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(diskcache, "_write_all", full)
    with caplog.at_level(logging.WARNING, logger="ds4.diskcache"):
        assert cache.save(FakeSession(range(40)), TEXT, "cold") is None
    assert not cache.enabled and "disk full" in caplog.text
    assert [p.name for p in (tmp_path / "kv").iterdir()] == [".lock"]
    monkeypatch.setattr(diskcache, "_write_all", real)
    assert cache.save(FakeSession(range(40)), TEXT, "cold") is None
    assert cache.load(PROMPT, FakeSession()) is None and cache.tool_blocks({"x"}) == {}


@pytest.mark.parametrize("how", ["simulated-eacces-as-root" if IS_ROOT else "chmod-0500"])
def test_read_only_directory_turns_the_cache_off(tmp_path, monkeypatch, caplog, how):
    cache = DiskCache(opts(tmp_path))
    directory = tmp_path / "kv"
    if IS_ROOT:
        def denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        monkeypatch.setattr(diskcache, "_create_tmp", denied)
    else:
        directory.chmod(0o500)
    try:
        with caplog.at_level(logging.WARNING, logger="ds4.diskcache"):
            assert cache.save(FakeSession(range(40)), TEXT, "cold") is None
        assert not cache.enabled and "cannot write" in caplog.text
    finally:
        directory.chmod(0o700)


def test_unusable_directory_at_open_disables(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="ds4.diskcache"):
        cache = DiskCache(opts(tmp_path, directory=str(blocker / "kv")))
    assert not cache.enabled and "disabled" in caplog.text
    assert cache.save(FakeSession(range(40)), TEXT, "cold") is None
    assert cache.load(PROMPT, FakeSession()) is None


def test_garbage_files_with_cache_names_are_ignored(tmp_path, caplog):
    cache = DiskCache(opts(tmp_path))
    junk = tmp_path / "kv" / ("0" * 40 + ".kv")
    junk.write_bytes(os.urandom(200))
    (tmp_path / "kv" / "notes.txt").write_text("hello")
    cache.save(FakeSession(range(40)), TEXT, "cold")
    with caplog.at_level(logging.WARNING, logger="ds4.diskcache"):
        assert cache.load(PROMPT, FakeSession()).n_tokens == 40
        cache.load(PROMPT, FakeSession())
    # Warned about once, not on every scan.
    assert caplog.text.count(junk.name) == 1
