"""One session in a named KVC file: what `ds4 /save FILE` writes and `/load FILE` reads.

Contract:
- The file is a disk-cache checkpoint (engine/diskcache_format.py, server.md §10.3)
  byte for byte: header, cache text, DWKP payload wrapping `session.snapshot()`, no
  tool map. Renamed to `<sha1 of the text>.kv` it is a file `ds4-server
  --kv-disk-dir` can load, and any server checkpoint can be loaded here.
- `save(path, session, text, identity, ctx)` writes the session exactly as it is,
  atomically (`<path>.tmp.<pid>`, fsync, rename); `text` is the cache text the
  caller chose (the exact bytes of the tokens). Returns the file size. OSError
  propagates.
- `read(path, identity, ctx) -> Checkpoint` validates everything that does not need
  the engine (header, header+text CRC, payload CRC, model id, token count < ctx)
  and raises `SessionFileError` with one clear sentence otherwise; nothing is
  touched, so a refused file leaves the caller's session as it was.
- `identity(engine)`: the model id (diskcache.model_id: config, numerics, weights)
  and routed-expert quant bits a file is written with and checked against.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from dwarfstar.engine import diskcache_format as fmt
from dwarfstar.engine.diskcache import model_id, routed_quant_bits

# ds4-agent's reason code for a saved conversation (server.md §10.3 byte 5).
REASON = "agent-session"


class SessionFileError(Exception):
    """A session file that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Identity:
    model_id: str
    quant_bits: int


@dataclass(frozen=True)
class Checkpoint:
    header: fmt.Header
    text: bytes
    snapshot: bytes

    @property
    def is_visible_key(self) -> bool:
        """The text is a client-visible transcript (server evict/shutdown files with
        hidden reasoning, §10.6), not the bytes of the KV's tokens."""
        return bool(self.header.flags & (fmt.FLAG_RESPONSES_VISIBLE | fmt.FLAG_THINKING_VISIBLE))


def identity(engine) -> Identity:
    return Identity(model_id(engine), routed_quant_bits(engine))


def save(path: str | os.PathLike, session, text: bytes, ident: Identity, ctx: int, clock=time.time) -> int:
    payload = fmt.encode_payload(ident.model_id, session.snapshot())
    header = fmt.build_header(quant_bits=ident.quant_bits, reason=REASON, flags=0, n_tokens=len(session.tokens),
                              ctx=ctx, now=int(clock()), text=text, payload=payload)
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in (header.pack(), text, payload):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return fmt.HEADER_SIZE + len(text) + len(payload)


def read(path: str | os.PathLike, ident: Identity, ctx: int) -> Checkpoint:
    try:
        blob = Path(path).read_bytes()
    except OSError as err:
        raise SessionFileError(f"cannot read {path}: {err.strerror or err}") from None
    why: list[str] = []
    header = fmt.parse_header(blob[:fmt.HEADER_SIZE], len(blob), why)
    if header is None:
        raise SessionFileError(f"{path} is not a usable session file: {why[0]}")
    text = blob[fmt.HEADER_SIZE:fmt.HEADER_SIZE + header.text_len]
    if not fmt.check_head(header, blob[:fmt.HEADER_SIZE], text):
        raise SessionFileError(f"{path} is corrupt: header checksum mismatch (or not written by dwarfstar)")
    decoded = fmt.decode_payload(blob[fmt.HEADER_SIZE + header.text_len:header.body_len], why)
    if decoded is None:
        raise SessionFileError(f"{path} is corrupt: {why[0]}")
    file_model, snapshot = decoded
    if file_model != ident.model_id:
        raise SessionFileError(f"{path} was written for another model (other weights, dimensions or numerics)")
    if header.n_tokens >= ctx:
        raise SessionFileError(f"{path} holds {header.n_tokens} tokens; the context of {ctx} needs to be larger")
    return Checkpoint(header, text, snapshot)
