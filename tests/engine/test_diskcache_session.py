"""Named session files (engine/diskcache_session.py) and what the server's cache makes of them.

Oracles: the KVC offsets of server.md §10.3 read with `struct`; the refusal reasons
of each damaged or foreign file; DiskCache (the server's lookup) as the reader of
a file the CLI wrote, including one whose text ends inside a character.
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from dwarfstar.engine import diskcache_session as files
from dwarfstar.engine.diskcache import DiskCache

from .diskcache_fakes import MODEL, FakeSession, opts

IDENT = files.Identity(MODEL, 4)


def write(tmp_path, name: str, text: bytes, n: int = 6):
    path = tmp_path / name
    files.save(path, FakeSession(range(n)), text, IDENT, ctx=4096, clock=lambda: 1234)
    return path


def test_save_writes_a_kvc_file_and_read_returns_its_parts(tmp_path):
    path = write(tmp_path, "s.kv", b"hello")
    raw = path.read_bytes()
    assert raw[:8] == b"KVC\x01\x04\x06\x00\x00"
    assert struct.unpack_from("<III", raw, 8) == (6, 0, 4096)
    assert struct.unpack_from("<QQ", raw, 24) == (1234, 1234) and raw[52:57] == b"hello"
    checkpoint = files.read(path, IDENT, ctx=4096)
    assert checkpoint.text == b"hello" and checkpoint.header.n_tokens == 6 and not checkpoint.is_visible_key
    session = FakeSession()
    session.restore(checkpoint.snapshot)
    assert session.tokens == list(range(6))
    assert list(tmp_path.iterdir()) == [path], "no temp file left behind"


@pytest.mark.parametrize("case,reason", [
    ("missing", "cannot read"), ("truncated", "truncated"), ("header", "header checksum"),
    ("payload", "payload checksum"), ("model", "another model"), ("ctx", "context of 6"),
])
def test_read_refuses_with_the_reason(tmp_path, case, reason):
    path = write(tmp_path, "s.kv", b"hello")
    raw = bytearray(path.read_bytes())
    ident, ctx = IDENT, 4096
    if case == "missing":
        path = tmp_path / "absent.kv"
    elif case == "truncated":
        path.write_bytes(raw[:-1])
    elif case == "header":
        raw[16] ^= 1
        path.write_bytes(raw)
    elif case == "payload":
        raw[-1] ^= 1
        path.write_bytes(raw)
    elif case == "model":
        ident = files.Identity("some other model", 4)
    else:
        ctx = 6
    with pytest.raises(files.SessionFileError, match=reason):
        files.read(path, ident, ctx)


def test_server_cache_never_matches_a_text_cut_inside_a_character(tmp_path):
    euro = "€".encode()
    cut, whole = b"abc" + euro[:2], b"abc"
    kv = tmp_path / "kv"
    kv.mkdir()
    for text, n in ((cut, 9), (whole, 7)):
        written = write(tmp_path, "s.kv", text, n)
        written.rename(kv / f"{hashlib.sha1(text).hexdigest()}.kv")
    cache = DiskCache(opts(tmp_path, min_tokens=1))
    session = FakeSession()
    # The cut text is a longer byte prefix of the prompt, but its suffix would start
    # with the character's last byte: only the whole-character file matches.
    hit = cache.load("abc€ and more", session)
    assert hit is not None and hit.text_len == 3 and session.tokens == list(range(7))
