"""Session checkpoints on disk, keyed by the SHA-1 of the rendered prefix (server.md §10).

Contract:
- `DiskCache(CacheOptions)` opens DIR (mkdir -p, mode 0700), removes stale temp
  files of dead processes, runs one eviction pass and logs its settings. Any
  OSError while opening, writing or deleting turns the cache off
  (`cache.enabled` False) with one warning; the caller keeps serving.
- `cache.load(prompt_text, session) -> Hit | None` restores the longest
  checkpoint whose cache text is a byte prefix of `prompt_text` ending on a
  character boundary of it (§10.4; a text cut inside a character, which a
  `ds4 /save` file of a turn cut there may carry, would leave a suffix that is
  not text, so it is never a match). A file
  that fails validation (header and text checksum, SHA-1 of the text, payload
  checksum, model id) is
  skipped with a warning and the next candidate is tried; a corrupt one
  (truncated, CRC, token count) is deleted. If `session.restore` fails the
  session is reset and None is returned (the caller cold-prefills).
- `cache.save(session, text, reason, flags=0, tool_map=None) -> Path | None`
  writes the session exactly as it is (the cache never rewinds it) under the
  SHA-1 of `text`, atomically: `<sha>.kv.tmp.<pid>.<thread>`, fsync, rename,
  fsync of the directory. Then eviction (§10.7) with the new file protected.
- `cache.tool_blocks(ids) -> {id: dsml}` scans the tool maps of all files (§10.5);
  `ids=None` returns every entry.
- When to save (cold boundary, continued frontiers) and the eviction score are
  pure functions in engine/diskcache_policy.py.
Every directory operation holds an exclusive `flock` on DIR/.lock (and a
thread lock), so two server processes sharing DIR never see half-written or
half-deleted files; temp names carry the pid, so writers never collide.
The session is duck-typed: `.tokens`, `.snapshot()`, `.restore(bytes)`, `.reset()`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dwarfstar.engine import diskcache_format as fmt
from dwarfstar.engine.diskcache_policy import eviction_score

log = logging.getLogger("ds4.diskcache")

LOCK_NAME = ".lock"
_NAME = re.compile(r"^[0-9a-fA-F]{40}\.kv$")
_TMP = re.compile(r"^[0-9a-fA-F]{40}\.kv\.tmp\.(\d+)\.\d+$")


@dataclass(frozen=True)
class CacheOptions:
    directory: str
    model_id: str
    ctx: int
    quant_bits: int = 4
    space_mb: int = 4096
    min_tokens: int = 512
    cold_max_tokens: int = 30000
    continued_interval_tokens: int = 10000
    boundary_trim_tokens: int = 32
    boundary_align_tokens: int = 2048
    reject_different_quant: bool = False
    tool_max_ids: int = 100000

    @property
    def budget_bytes(self) -> int:
        return self.space_mb << 20


@dataclass
class Entry:
    """One listed file: its path, the SHA-1 in its name, its header and size."""

    path: Path
    sha: str
    header: fmt.Header
    size: int


@dataclass
class Hit:
    path: Path
    text_len: int       # bytes of prompt_text covered by the checkpoint
    n_tokens: int
    flags: int
    reason: str
    tool_map: dict[str, str]


def text_sha(text: bytes) -> str:
    return hashlib.sha1(text).hexdigest()


class DiskCache:
    def __init__(self, options: CacheOptions, clock=time.time):
        self.options = options
        self.clock = clock
        self.enabled = True
        self.directory = Path(options.directory)
        self._mutex = threading.Lock()
        self._warned: set = set()
        self._lock_fd: int | None = None
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            self._disable(f"cannot open {self.directory}: {err}")
            return
        with self._locked():
            self._remove_stale_tmp()
            self._evict(None)
        o = options
        log.info("kv disk cache: dir=%s budget=%d MiB min=%d cold_max=%d continued=%d trim=%d align=%d "
                 "reject_quant=%d", self.directory, o.space_mb, o.min_tokens, o.cold_max_tokens,
                 o.continued_interval_tokens, o.boundary_trim_tokens, o.boundary_align_tokens,
                 int(o.reject_different_quant))

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- locking and failure -------------------------------------------------------------
    @contextmanager
    def _locked(self):
        with self._mutex:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _disable(self, message: str) -> None:
        if self.enabled:
            log.warning("kv disk cache disabled: %s; serving continues without it", message)
        self.enabled = False

    def _warn(self, path: Path, message: str) -> None:
        try:
            st = path.stat()
            key = (path.name, st.st_size, st.st_mtime_ns, message)
        except OSError:
            key = (path.name, message)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("kv disk cache: skipping %s: %s", path.name, message)

    def _delete(self, path: Path, why: str) -> None:
        log.warning("kv disk cache: deleting %s: %s", path.name, why)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            self._disable(f"cannot delete {path.name}: {err}")

    # ---- listing -------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Listed files (§10.2, §10.3): well-formed names whose header and cache text
        pass the checksum and whose text hashes to the name. Others are skipped
        with one warning per file state."""
        out = []
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as err:
            self._disable(f"cannot list {self.directory}: {err}")
            return out
        for name in names:
            if _NAME.match(name):
                entry = self._entry(self.directory / name)
                if entry is not None:
                    out.append(entry)
        return out

    def _entry(self, path: Path) -> Entry | None:
        try:
            with open(path, "rb") as f:
                raw = f.read(fmt.HEADER_SIZE)
                size = os.fstat(f.fileno()).st_size
                why: list[str] = []
                header = fmt.parse_header(raw, size, why)
                if header is None:
                    self._warn(path, why[0])
                    return None
                text = f.read(header.text_len)
        except OSError as err:
            self._warn(path, f"unreadable: {err}")
            return None
        if not fmt.check_head(header, raw, text):
            self._warn(path, "header checksum mismatch (corrupt, or not written by dwarfstar)")
            return None
        sha = path.name[:40].lower()
        if text_sha(text) != sha:
            self._warn(path, "cache text does not hash to the file name")
            return None
        return Entry(path, sha, header, size)

    # ---- lookup and load (§10.4) ---------------------------------------------------------
    def load(self, prompt_text: str, session) -> Hit | None:
        if not self.enabled:
            return None
        prompt = prompt_text.encode()
        with self._locked():
            for entry in self._candidates(prompt):
                if text_sha(prompt[:entry.header.text_len]) != entry.sha:
                    continue
                hit = self._load_entry(entry, prompt, session)
                if hit is not None or not self.enabled:
                    return hit
        return None

    def _candidates(self, prompt: bytes) -> list[Entry]:
        o = self.options
        found = [e for e in self.entries() if e.header.text_len <= len(prompt)
                 and _is_boundary(prompt, e.header.text_len)
                 and e.header.n_tokens >= o.min_tokens and e.header.ctx <= o.ctx
                 and not (o.reject_different_quant and e.header.quant_bits != o.quant_bits)]
        return sorted(found, key=lambda e: (-e.header.text_len, -e.header.n_tokens))

    def _read_checked(self, entry: Entry, expect_text: bytes) -> tuple[bytes, bytes] | None:
        """(engine snapshot, trailer) of a fully validated file, else None (warned;
        corrupt files deleted)."""
        h = entry.header
        try:
            with open(entry.path, "rb") as f:
                blob = f.read()
        except OSError as err:
            self._warn(entry.path, f"unreadable: {err}")
            return None
        text = blob[fmt.HEADER_SIZE:fmt.HEADER_SIZE + h.text_len]
        # The file may have changed since the scan: check the head again.
        if len(blob) < h.body_len or text != expect_text or not fmt.check_head(h, blob[:fmt.HEADER_SIZE], text):
            self._delete(entry.path, "changed or truncated since the directory scan")
            return None
        why: list[str] = []
        decoded = fmt.decode_payload(blob[fmt.HEADER_SIZE + h.text_len:h.body_len], why)
        if decoded is None:
            self._delete(entry.path, why[0])
            return None
        model_id, snapshot = decoded
        if model_id != self.options.model_id:
            self._warn(entry.path, f"written by another model ({model_id[:16]}...)")
            return None
        return snapshot, blob[h.body_len:]

    def _load_entry(self, entry: Entry, prompt: bytes, session) -> Hit | None:
        h = entry.header
        checked = self._read_checked(entry, prompt[:h.text_len])
        if checked is None:
            return None
        snapshot, trailer = checked
        try:
            session.restore(snapshot)
        except Exception as err:  # a snapshot the engine refuses: cold prefill instead
            log.warning("kv disk cache: restoring %s failed: %s", entry.path.name, err)
            session.reset()
            return None
        if len(session.tokens) != h.n_tokens:
            session.reset()
            self._delete(entry.path, f"holds {len(session.tokens)} tokens, header says {h.n_tokens}")
            return None
        tools = fmt.decode_tool_map(trailer, self.options.tool_max_ids) if h.flags & fmt.FLAG_TOOL_MAP else {}
        self._consume(entry)
        log.info("kv disk cache: loaded %s (%s, %d tokens, %d text bytes)", entry.path.name,
                 h.reason_name, h.n_tokens, h.text_len)
        return Hit(entry.path, h.text_len, h.n_tokens, h.flags, h.reason_name, tools)

    def _consume(self, entry: Entry) -> None:
        """Consume rule [QUIRK]: a long checkpoint is deleted once loaded (the live
        session will write newer ones); a short one gets a hit and a fresh stamp."""
        cold_max = self.options.cold_max_tokens
        if cold_max > 0 and entry.header.n_tokens > cold_max:
            try:
                entry.path.unlink(missing_ok=True)
            except OSError as err:
                self._disable(f"cannot delete {entry.path.name}: {err}")
            return
        self._patch(entry.path, fmt.usage_fields(entry.header.hits + 1, int(self.clock())))

    def _patch(self, path: Path, writes: list[tuple[int, bytes]]) -> None:
        try:
            with open(path, "r+b") as f:
                for offset, data in writes:
                    f.seek(offset)
                    f.write(data)
        except OSError as err:
            self._disable(f"cannot update {path.name}: {err}")

    # ---- tool maps (§10.5) ---------------------------------------------------------------
    def tool_blocks(self, ids: set[str] | None) -> dict[str, str]:
        """Tool-map entries of every listed file for `ids` (None: all of them)."""
        found: dict[str, str] = {}
        if not self.enabled or ids is not None and not ids:
            return found
        with self._locked():
            for entry in self.entries():
                if not entry.header.flags & fmt.FLAG_TOOL_MAP:
                    continue
                try:
                    with open(entry.path, "rb") as f:
                        f.seek(entry.header.body_len)
                        trailer = f.read()
                except OSError as err:
                    self._warn(entry.path, f"unreadable: {err}")
                    continue
                tools = fmt.decode_tool_map(trailer, self.options.tool_max_ids)
                found.update({k: v for k, v in tools.items() if ids is None or k in ids})
        return found

    # ---- save (§10.6) --------------------------------------------------------------------
    def save(self, session, text: str, reason: str, flags: int = 0,
             tool_map: dict[str, str] | None = None) -> Path | None:
        tokens = session.tokens
        if not self.enabled or len(tokens) < self.options.min_tokens:
            return None
        raw = text.encode()
        path = self.directory / f"{text_sha(raw)}.kv"
        tools = {k: v for k, v in (tool_map or {}).items() if v and v in text}
        trailer = fmt.encode_tool_map(tools) if tools else b""
        flags = (flags | fmt.FLAG_TOOL_MAP) if tools else flags & ~fmt.FLAG_TOOL_MAP
        with self._locked():
            if self._refresh_existing(path, raw, trailer, flags):
                return path
            payload = fmt.encode_payload(self.options.model_id, session.snapshot())
            o = self.options
            header = fmt.build_header(quant_bits=o.quant_bits, reason=reason, flags=flags,
                                      n_tokens=len(tokens), ctx=o.ctx, now=int(self.clock()),
                                      text=raw, payload=payload)
            size = fmt.HEADER_SIZE + len(raw) + len(payload) + len(trailer)
            if math.ceil(size * 1.01) > o.budget_bytes:
                log.info("kv disk cache: %s checkpoint of %d tokens (%d bytes) exceeds the %d MiB budget; "
                         "not saved", reason, len(tokens), size, o.space_mb)
                return None
            if not self._write_atomic(path, [header.pack(), raw, payload, trailer]):
                return None
            log.info("kv disk cache: stored %s (%s, %d tokens, %d bytes)", path.name, reason, len(tokens), size)
            self._evict(path)
        return path if path.exists() else None

    def _refresh_existing(self, path: Path, raw: bytes, trailer: bytes, flags: int) -> bool:
        """Same-sha file that is compatible: replace only its tool map and stamp it.
        An incompatible one is deleted (the caller then writes a new file)."""
        if not path.exists():
            return False
        entry = self._entry(path)
        compatible = entry is not None and self._compatible(entry, raw)
        if not compatible:
            self._delete(path, "incompatible checkpoint with the same key is replaced")
            return False
        h = entry.header
        writes = fmt.usage_fields(h.hits, int(self.clock()))
        try:
            with open(path, "r+b") as f:
                if trailer:
                    f.truncate(h.body_len)
                    f.seek(h.body_len)
                    f.write(trailer)
                    writes.append(fmt.flags_field(h.flags | fmt.FLAG_TOOL_MAP))
                for offset, data in writes:
                    f.seek(offset)
                    f.write(data)
        except OSError as err:
            self._disable(f"cannot update {path.name}: {err}")
        return True

    def _compatible(self, entry: Entry, raw: bytes) -> bool:
        h, o = entry.header, self.options
        if h.ctx > o.ctx or (o.reject_different_quant and h.quant_bits != o.quant_bits):
            return False
        try:
            with open(entry.path, "rb") as f:
                f.seek(fmt.HEADER_SIZE)
                text = f.read(h.text_len)
                head = f.read(min(h.payload_len, 16 + fmt.MODEL_ID_MAX))
        except OSError:
            return False
        return text == raw and fmt.payload_model_id(head) == o.model_id

    def _write_atomic(self, path: Path, chunks: list[bytes]) -> bool:
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
        try:
            fd = _create_tmp(tmp)
            try:
                for chunk in chunks:
                    _write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(self.directory)
            return True
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            what = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
            self._disable(f"{what} in {self.directory}: {err}")
            return False

    def _remove_stale_tmp(self) -> None:
        for name in os.listdir(self.directory):
            m = _TMP.match(name)
            if m and not _pid_alive(int(m.group(1))):
                (self.directory / name).unlink(missing_ok=True)

    # ---- eviction (§10.7) ----------------------------------------------------------------
    def evict(self) -> None:
        if self.enabled:
            with self._locked():
                self._evict(None)

    def _evict(self, protect: Path | None) -> None:
        entries = self.entries()
        total = sum(e.size for e in entries)
        now = self.clock()
        budget = self.options.budget_bytes
        while entries and total > budget:
            others = [e for e in entries if e.path != protect] or entries
            victim = min(others, key=lambda e: (eviction_score(e.header, e.size, now),
                                                e.header.last_used or e.header.created))
            log.info("kv disk cache: evicting %s (%d tokens, %d bytes) for space", victim.path.name,
                     victim.header.n_tokens, victim.size)
            try:
                victim.path.unlink(missing_ok=True)
            except OSError as err:
                self._disable(f"cannot delete {victim.path.name}: {err}")
                return
            entries.remove(victim)
            total -= victim.size


def _is_boundary(text: bytes, n: int) -> bool:
    """Whether `text[:n]` ends between two characters of the UTF-8 `text`."""
    return n >= len(text) or text[n] & 0xC0 != 0x80


def _create_tmp(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def model_id(engine) -> str:
    """SHA-1 over what makes a KV state valid: the model config, the numerics and
    dtype, the tensor directory and 64 bytes from each end of every tensor (so two
    synthetic models with equal shapes but other weights differ). Backend-free."""
    h = hashlib.sha1()
    meta = engine.config.to_metadata()
    h.update(repr(sorted(meta.items())).encode())
    h.update(f"{engine.options.numerics}/{engine.options.dtype}".encode())
    for name, info in engine.gguf.tensors.items():
        h.update(f"{name}:{tuple(info.ne)}:{int(info.ggml_type)}".encode())
        raw = engine.gguf.raw(name)
        h.update(bytes(raw[:64]))
        h.update(bytes(raw[-64:]))
    return h.hexdigest()


def routed_quant_bits(engine) -> int:
    """2 for 2-bit routed experts (Q2_K, IQ2_*), else 4 (the KVC header field)."""
    for name, info in engine.gguf.tensors.items():
        if "_exps" in name:
            return 2 if info.ggml_type.name.startswith(("Q2", "IQ2")) else 4
    return 4
