"""KVC file codec and the pure save/evict policy helpers (server.md §10.3, §10.6, §10.7).

Oracles: the byte offsets of server.md §10.3 read with `struct` directly (not through
the codec), and hand-computed schedule/score numbers from the spec's formulas.
"""

from __future__ import annotations

import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.engine import diskcache_format as fmt
from dwarfstar.engine.diskcache_policy import (ContinuedSchedule, cold_boundary, cold_due, eviction_score,
                                               save_stops, store_len)


def _header(**kw) -> fmt.Header:
    base = dict(quant_bits=2, reason="evict", flags=fmt.FLAG_THINKING_VISIBLE, n_tokens=700, ctx=4096,
                now=1_700_000_000, text=b"hello text", payload=b"P" * 33)
    base.update(kw)
    return fmt.build_header(**base)


def test_header_bytes_sit_at_the_spec_offsets():
    h = _header()
    raw = h.pack()
    assert len(raw) == 52
    assert raw[0:3] == b"KVC" and raw[3] == 1 and raw[4] == 2 and raw[5] == 3 and raw[6] == 4 and raw[7] == 0
    assert struct.unpack_from("<IIII", raw, 8) == (700, 0, 4096, h.crc)
    assert struct.unpack_from("<QQQI", raw, 24) == (1_700_000_000, 1_700_000_000, 33, 10)
    parsed = fmt.parse_header(raw, 52 + 10 + 33)
    assert parsed == h
    assert parsed.reason_name == "evict" and parsed.body_len == 95


def test_header_rejections_name_the_reason():
    raw = bytearray(_header().pack())
    cases = {
        "bad magic": (0, ord("X")),
        "unsupported version": (3, 2),
        "quant bits 3": (4, 3),
    }
    for expect, (offset, value) in cases.items():
        bad = bytearray(raw)
        bad[offset] = value
        why: list[str] = []
        assert fmt.parse_header(bytes(bad), 10_000, why) is None
        assert why and expect.split()[0] in why[0]
    why = []
    assert fmt.parse_header(bytes(raw), 52 + 10 + 32, why) is None and "truncated" in why[0]
    why = []
    zero = bytearray(raw)
    zero[8:12] = b"\0\0\0\0"
    assert fmt.parse_header(bytes(zero), 10_000, why) is None and "zero" in why[0]
    # An unknown save reason is read as 0.
    odd = bytearray(raw)
    odd[5] = 9
    assert fmt.parse_header(bytes(odd), 10_000).reason == 0


def test_head_crc_covers_immutable_header_bytes_and_the_text():
    text, payload = b"cache text", b"payload bytes" * 3
    h = _header(text=text, payload=payload)
    raw = h.pack()
    # Independent recomputation: the header minus byte 6, [12,16), [20,24) and [32,40).
    covered = raw[0:6] + raw[7:12] + raw[16:20] + raw[24:32] + raw[40:52]
    assert h.crc == zlib.crc32(covered + text)
    assert fmt.check_head(h, raw, text)
    for offset in [i for i in range(52) if not (i == 6 or 12 <= i < 16 or 20 <= i < 24 or 32 <= i < 40)]:
        bad = bytearray(raw)
        bad[offset] ^= 0x10
        assert not fmt.check_head(h, bytes(bad), text), offset
    for offset in (6, 12, 33):
        changed = bytearray(raw)
        changed[offset] ^= 0x01
        assert fmt.check_head(h, bytes(changed), text)
    assert not fmt.check_head(h, raw, b"cache texT")


def test_payload_envelope_round_trip_crc_and_rejects():
    blob = fmt.encode_payload("model-A", b"\x00snapshot")
    assert blob[:4] == b"DWKP" and struct.unpack_from("<I", blob, 4) == (1,)
    assert struct.unpack_from("<I", blob, 8) == (zlib.crc32(blob[12:]),)
    assert struct.unpack_from("<I", blob, 12) == (7,) and blob[16:23] == b"model-A"
    assert fmt.decode_payload(blob) == ("model-A", b"\x00snapshot")
    assert fmt.payload_model_id(blob[:30]) == "model-A"
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x40
        assert fmt.decode_payload(bytes(flipped)) is None, i
    why: list[str] = []
    assert fmt.decode_payload(b"DWSTATE\0........", why) is None and why


def test_tool_map_round_trip_and_reader_limits():
    entries = {"call_" + "a" * 32: "\n\n<｜DSML｜tool_calls>\nX\n</｜DSML｜tool_calls>", "toolu_1": "ü" * 5}
    raw = fmt.encode_tool_map(entries)
    assert raw[:4] == b"KTM\x01" and struct.unpack_from("<I", raw, 4) == (2,)
    n_id, n_dsml = struct.unpack_from("<II", raw, 8)
    assert n_id == 37 and n_dsml == len(entries["call_" + "a" * 32].encode())
    assert fmt.decode_tool_map(raw, 100) == entries
    # Truncation stops quietly with the complete entries read so far.
    assert fmt.decode_tool_map(raw[:-1], 100) == {"call_" + "a" * 32: entries["call_" + "a" * 32]}
    # count > 4 x max ids: nothing.
    assert fmt.decode_tool_map(raw, 0) == {}
    too_long = fmt.encode_tool_map({"x" * 257: "d"})
    assert fmt.decode_tool_map(too_long, 10) == {}
    assert fmt.decode_tool_map(b"KTM\x02" + raw[4:], 10) == {}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 1 << 40))
def test_readers_never_raise(data, size):
    fmt.parse_header(data, size)
    fmt.decode_tool_map(data, 4)
    fmt.decode_payload(data)


def test_store_len_trims_and_aligns():
    assert store_len(5000, 32, 2048, 512) == 4096
    assert store_len(4128, 32, 2048, 512) == 4096
    assert store_len(4127, 32, 2048, 512) == 2048
    # The aligned length would fall below min: the full length is stored.
    assert store_len(600, 32, 2048, 512) == 600
    assert store_len(600, 32, 0, 512) == 568
    assert store_len(600, 0, 0, 512) == 600


def test_cold_boundary_prefers_the_last_user_before_the_first_assistant():
    user, assistant = 7, 8
    tokens = [1] * 600 + [user] + [2] * 50 + [user] + [3] * 10 + [assistant] + [user] + [4] * 5
    assert cold_boundary(tokens, user, assistant, 512, 32, 2048) == 651
    # The anchor is below min: fall back to the trimmed length (no alignment possible -> full).
    assert cold_boundary(tokens, user, assistant, 700, 32, 2048) == len(tokens)
    short_anchor = [1] * 600 + [user] + [2] * 100 + [assistant]
    assert cold_boundary(short_anchor, user, assistant, 605, 32, 0) == 702 - 32
    no_user = [5] * 5000
    assert cold_boundary(no_user, user, assistant, 512, 32, 2048) == 4096


def test_cold_due_window():
    assert cold_due(0, 512, 512, 30000) and cold_due(0, 30000, 512, 30000)
    assert not cold_due(0, 511, 512, 30000) and not cold_due(0, 30001, 512, 30000)
    assert not cold_due(5, 1000, 512, 30000) and not cold_due(0, 1000, 512, 0)


def test_continued_schedule_steps_and_marks():
    s = ContinuedSchedule(10000, 2048, 512)
    assert s.step == 10240
    assert s.frontiers(0, 25000) == [10240, 20480]
    assert s.due(10240) and not s.due(10241)
    s.mark(10240)
    assert not s.due(10240) and s.frontiers(0, 25000) == [20480]
    s.reset(20480)
    assert s.frontiers(0, 25000) == []
    assert ContinuedSchedule(0, 2048, 512).frontiers(0, 10 ** 6) == []
    assert ContinuedSchedule(300, 0, 512).frontiers(0, 1300) == [600, 900, 1200]


def test_save_stops_suppress_a_continued_frontier_at_the_cold_boundary():
    s = ContinuedSchedule(1000, 1024, 512)
    assert save_stops(0, 3000, 1024, s) == [(1024, "cold"), (2048, "continued")]
    assert save_stops(0, 3000, 700, s) == [(700, "cold"), (1024, "continued"), (2048, "continued")]
    assert save_stops(1024, 3000, 700, s) == [(2048, "continued")]
    assert save_stops(0, 3000, None, ContinuedSchedule(0, 0, 512)) == []


def test_eviction_score_follows_the_half_life_formula():
    h = _header(n_tokens=1000, now=100_000)
    h.hits = 4
    # One half-life later: effective hits 2 -> (2 + 1) * tokens / size.
    assert abs(eviction_score(h, 500, 100_000 + 21600) - 3 * 1000 / 500) < 1e-9
    # Seven half-lives: 4 / 128 = 0.031 stays; ten: 0.0039 < 0.01 counts as 0.
    assert abs(eviction_score(h, 500, 100_000 + 7 * 21600) - (1 + 4 / 128) * 2) < 1e-9
    assert eviction_score(h, 500, 100_000 + 10 * 21600) == 2.0
    h.created = h.last_used = 0
    assert eviction_score(h, 500, 5) == 2.0
