"""The KVC checkpoint file: header, cache text, payload, tool-id map (server.md §10.3).

Contract: pure byte codecs, no file system policy (that is engine/diskcache.py).
Readers never raise on bad bytes: they return None (or stop quietly, for the
tool map) and give the reason through `why`, so a corrupt, truncated or foreign
file is skipped, never loaded.

Outer layout (little-endian; ds4's, kept byte for byte):

    0   "KVC" | 3 version 1 | 4 routed-expert quant bits (2|4) | 5 save reason
    6   flags (bit0 tool map appended, bit1 Responses-visible key, bit2 thinking-visible key)
    7   reserved 0
    8   u32 token count (!= 0) | 12 u32 hit count | 16 u32 ctx
    20  u32 CRC32 (dwarfstar; ds4 writes 0 here, see below)
    24  u64 created | 32 u64 last used (Unix seconds)
    40  u64 payload bytes P | 48 u32 cache text bytes T
    52  cache text (T bytes; its SHA-1 names the file) | 52+T payload (P bytes)
    52+T+P  optional tool map: "KTM" | 1 | u32 n | n × (u32 id len, u32 DSML len, id, DSML)

dwarfstar's use of the reserved u32 at offset 20: CRC32 (zlib) of the header
bytes that never change after the file is written, [0,6) + [7,12) + [16,20) +
[24,32) + [40,52), followed by the cache text. Excluded are the fields rewritten
in place (flags byte 6, hit count, last used) and the tool-map trailer, which is
replaced in place and read tolerantly. Every directory scan checks it (it costs
52 + T bytes per file), so a flipped header or text byte is reported as soon as
the file is seen. A ds4-written file has 0 there and fails the check: that is
how foreign files are rejected (server.md §10.3.1 [UNCERTAIN] decided: the C
payload is not read by this engine).

Payload (P bytes) = dwarfstar session payload, version 1:

    0 "DWKP" | 4 u32 version 1 | 8 u32 CRC32 of bytes [12, P) | 12 u32 model id bytes M
    16 model id (UTF-8) | 16+M engine snapshot

The payload CRC is checked when the file is loaded. The model id names the
weights the KV was computed with (diskcache.model_id): a checkpoint of another
model is never restored. The engine snapshot is `session.snapshot()`
(engine/kv.py), identical for every backend.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"KVC"
VERSION = 1
HEADER = struct.Struct("<3sBBBBBIIIIQQQI")
HEADER_SIZE = HEADER.size  # 52
assert HEADER_SIZE == 52

REASONS = {"unknown": 0, "cold": 1, "continued": 2, "evict": 3, "shutdown": 4,
           "agent-system": 5, "agent-session": 6}
REASON_NAMES = {v: k for k, v in REASONS.items()}

FLAG_TOOL_MAP = 1
FLAG_RESPONSES_VISIBLE = 2
FLAG_THINKING_VISIBLE = 4

TOOL_MAGIC = b"KTM"
TOOL_VERSION = 1
TOOL_ID_MAX = 256
TOOL_DSML_MAX = 512 << 20

PAYLOAD_MAGIC = b"DWKP"
PAYLOAD_VERSION = 1
MODEL_ID_MAX = 4096

# Byte ranges of the header the CRC covers (see the module docstring).
_CRC_RANGES = ((0, 6), (7, 12), (16, 20), (24, 32), (40, 52))
_OFF_FLAGS, _OFF_HITS, _OFF_LAST_USED = 6, 12, 32


@dataclass
class Header:
    quant_bits: int
    reason: int
    flags: int
    n_tokens: int
    hits: int
    ctx: int
    crc: int
    created: int
    last_used: int
    payload_len: int
    text_len: int

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.quant_bits, self.reason, self.flags, 0, self.n_tokens,
                           self.hits, self.ctx, self.crc, self.created, self.last_used,
                           self.payload_len, self.text_len)

    @property
    def body_len(self) -> int:
        """Header + text + payload: where the tool map starts."""
        return HEADER_SIZE + self.text_len + self.payload_len

    @property
    def reason_name(self) -> str:
        return REASON_NAMES.get(self.reason, "unknown")


def parse_header(raw: bytes, file_size: int, why: list[str] | None = None) -> Header | None:
    """The header of a file of `file_size` bytes, or None (reason appended to `why`)."""
    why = why if why is not None else []
    if len(raw) < HEADER_SIZE:
        why.append(f"shorter than the {HEADER_SIZE}-byte header")
        return None
    (magic, version, quant, reason, flags, _, n_tokens, hits, ctx, crc, created, last_used,
     payload_len, text_len) = HEADER.unpack_from(raw)
    if magic != MAGIC:
        why.append("bad magic (not a KVC file)")
    elif version != VERSION:
        why.append(f"unsupported version {version}")
    elif quant not in (2, 4):
        why.append(f"routed-expert quant bits {quant} (must be 2 or 4)")
    elif n_tokens == 0:
        why.append("zero cached tokens")
    elif file_size < HEADER_SIZE + text_len + payload_len:
        why.append(f"truncated: {file_size} bytes, header promises {HEADER_SIZE + text_len + payload_len}")
    else:
        reason = reason if reason in REASON_NAMES else 0
        return Header(quant, reason, flags, n_tokens, hits, ctx, crc, created, last_used, payload_len, text_len)
    return None


def head_crc(header_bytes: bytes, text: bytes) -> int:
    """CRC32 of the immutable header ranges followed by the cache text."""
    crc = 0
    for lo, hi in _CRC_RANGES:
        crc = zlib.crc32(header_bytes[lo:hi], crc)
    return zlib.crc32(text, crc)


def build_header(*, quant_bits: int, reason: str, flags: int, n_tokens: int, ctx: int, now: int,
                 text: bytes, payload: bytes) -> Header:
    """A complete header for a new file, CRC filled in."""
    header = Header(quant_bits, REASONS[reason], flags, n_tokens, 0, ctx, 0, now, now, len(payload), len(text))
    header.crc = head_crc(header.pack(), text)
    return header


def check_head(header: Header, header_bytes: bytes, text: bytes) -> bool:
    return head_crc(header_bytes, text) == header.crc


def usage_fields(hits: int, last_used: int) -> list[tuple[int, bytes]]:
    """(offset, bytes) writes that update the mutable usage fields in place."""
    return [(_OFF_HITS, struct.pack("<I", hits)), (_OFF_LAST_USED, struct.pack("<Q", last_used))]


def flags_field(flags: int) -> tuple[int, bytes]:
    return _OFF_FLAGS, bytes([flags])


def encode_payload(model_id: str, snapshot: bytes) -> bytes:
    mid = model_id.encode()
    body = struct.pack("<I", len(mid)) + mid
    crc = zlib.crc32(snapshot, zlib.crc32(body))
    return PAYLOAD_MAGIC + struct.pack("<II", PAYLOAD_VERSION, crc) + body + snapshot


def payload_model_id(head: bytes) -> str | None:
    """The model id from the first bytes of a payload (no CRC check), or None."""
    if len(head) < 16 or head[:4] != PAYLOAD_MAGIC:
        return None
    (n,) = struct.unpack_from("<I", head, 12)
    if n > MODEL_ID_MAX or 16 + n > len(head):
        return None
    return head[16:16 + n].decode(errors="replace")


def decode_payload(payload: bytes, why: list[str] | None = None) -> tuple[str, bytes] | None:
    """(model id, engine snapshot) of a payload whose CRC checks out, or None."""
    why = why if why is not None else []
    if len(payload) < 16 or payload[:4] != PAYLOAD_MAGIC:
        why.append("payload is not a dwarfstar session payload")
        return None
    version, crc, n = struct.unpack_from("<III", payload, 4)
    if version != PAYLOAD_VERSION or n > MODEL_ID_MAX or 16 + n > len(payload):
        why.append(f"payload version {version} or model id length {n} invalid")
        return None
    if zlib.crc32(payload[12:]) != crc:
        why.append("payload checksum mismatch")
        return None
    try:
        return payload[16:16 + n].decode(), payload[16 + n:]
    except UnicodeDecodeError:
        why.append("model id is not UTF-8")
        return None


def encode_tool_map(entries: dict[str, str]) -> bytes:
    out = [TOOL_MAGIC, bytes([TOOL_VERSION]), struct.pack("<I", len(entries))]
    for tool_id, dsml in entries.items():
        a, b = tool_id.encode(), dsml.encode()
        out += [struct.pack("<II", len(a), len(b)), a, b]
    return b"".join(out)


def decode_tool_map(raw: bytes, max_ids: int) -> dict[str, str]:
    """Entries of a tool-map section; a short or invalid section stops quietly
    with what was read so far (server.md §10.3.2 reader limits)."""
    out: dict[str, str] = {}
    if len(raw) < 8 or raw[:3] != TOOL_MAGIC or raw[3] != TOOL_VERSION:
        return out
    (count,) = struct.unpack_from("<I", raw, 4)
    if count > 4 * max_ids:
        return out
    pos = 8
    for _ in range(count):
        if pos + 8 > len(raw):
            break
        n_id, n_dsml = struct.unpack_from("<II", raw, pos)
        if not (1 <= n_id <= TOOL_ID_MAX and 1 <= n_dsml <= TOOL_DSML_MAX) or pos + 8 + n_id + n_dsml > len(raw):
            break
        try:
            tool_id = raw[pos + 8:pos + 8 + n_id].decode()
            dsml = raw[pos + 8 + n_id:pos + 8 + n_id + n_dsml].decode()
        except UnicodeDecodeError:
            break
        out[tool_id] = dsml
        pos += 8 + n_id + n_dsml
    return out
