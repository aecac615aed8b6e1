"""The server's disk KV checkpoints: when the worker saves and loads (server.md §10.4-§10.6, §12).

Contract: `Checkpoints.open(engine, options, memory)` returns None unless
`--kv-disk-dir` is set. Every method runs on the worker thread (it touches the
session). The worker calls:
- `on_miss(session, bindings, prompt_text)` when no live path matched (§9.2
  steps 8-9): saves the live session as `evict`, resets the continued schedule
  and tries the disk; returns the effective prompt of a disk hit, else None.
- `prefill(session, effective, source, progress)` instead of `session.sync`:
  pauses at the cold boundary and at continued frontiers to save (§10.6);
  returns the tokens prefilled, like `sync`.
- `before_token(session, in_tool_call)` before each sampled token (continued).
- `shutdown(session, bindings)` once, after the queue is drained (§12).
One method runs on the connection thread that parses a request (the cache and
the tool memory lock themselves):
- `restore_tools(ids)`: the tool ids a request names that RAM does not know are
  looked up in the tool maps of all cache files and remembered (§10.5).
Cache text is the exact bytes of the token prefix (no checkpoint when they are
not valid UTF-8), or for evict/shutdown a binding's
visible transcript when it sits exactly at the live frontier (flag bit1/bit2).
Tool-id maps (§10.5): the map of a loaded checkpoint is remembered when it is
loaded, and each request's unknown tool ids are looked up in every file, so
exact DSML replay survives a restart and finds files another process wrote
after this one started. The directory is scanned only when a request names an
id RAM does not hold.
Failures never stop serving: the cache turns itself off (engine/diskcache.py).
"""

from __future__ import annotations

import logging

from dwarfstar.engine import diskcache_format as fmt
from dwarfstar.engine.diskcache import CacheOptions, DiskCache, model_id, routed_quant_bits
from dwarfstar.engine.diskcache_policy import ContinuedSchedule, cold_boundary, cold_due, save_stops
from dwarfstar.shape import ASSISTANT, USER

log = logging.getLogger("ds4-server")


class Checkpoints:
    def __init__(self, cache: DiskCache, tokenizer, memory, options):
        self.cache = cache
        self.tokenizer = tokenizer
        self.memory = memory
        o = cache.options
        self.schedule = ContinuedSchedule(o.continued_interval_tokens, o.boundary_align_tokens, o.min_tokens)
        self.user_id = tokenizer.id_of(USER)
        self.assistant_id = tokenizer.id_of(ASSISTANT)
        self.persist_tools = options.exact_dsml_replay

    @classmethod
    def open(cls, engine, options, memory) -> "Checkpoints | None":
        if not options.kv_disk_dir:
            return None
        cache = DiskCache(CacheOptions(
            directory=options.kv_disk_dir, model_id=model_id(engine), ctx=options.ctx,
            quant_bits=routed_quant_bits(engine), space_mb=options.kv_disk_space_mb,
            min_tokens=options.kv_cache_min_tokens, cold_max_tokens=options.kv_cache_cold_max_tokens,
            continued_interval_tokens=options.kv_cache_continued_interval_tokens,
            boundary_trim_tokens=options.kv_cache_boundary_trim_tokens,
            boundary_align_tokens=options.kv_cache_boundary_align_tokens,
            reject_different_quant=options.kv_cache_reject_different_quant,
            tool_max_ids=options.tool_memory_max_ids))
        return cls(cache, engine.tokenizer, memory, options)

    @property
    def min_tokens(self) -> int:
        return self.cache.options.min_tokens

    # ---- load ----------------------------------------------------------------------------
    def on_miss(self, session, bindings: dict, prompt_text: str) -> list[int] | None:
        if len(session.tokens) >= self.min_tokens:
            self._save_live(session, bindings, "evict")
        self.schedule.reset()
        hit = self.cache.load(prompt_text, session)
        if hit is None:
            return None
        self.schedule.reset(hit.n_tokens)
        if self.persist_tools:
            self.memory.update(hit.tool_map)
        suffix = prompt_text.encode()[hit.text_len:].decode()
        return session.tokens + self.tokenizer.encode(suffix)

    # ---- save ----------------------------------------------------------------------------
    def prefill(self, session, effective: list[int], source: str, progress) -> int:
        held = session.tokens
        start = len(held) if effective[:len(held)] == held else 0
        o = self.cache.options
        cold = None
        if source == "none" and cold_due(start, len(effective), o.min_tokens, o.cold_max_tokens):
            cold = cold_boundary(effective, self.user_id, self.assistant_id, o.min_tokens,
                                 o.boundary_trim_tokens, o.boundary_align_tokens)
        if self.cache.enabled:
            for stop, reason in save_stops(start, len(effective), cold, self.schedule):
                session.sync(effective[:stop], progress=progress)
                self._save_tokens(session, reason)
        session.sync(effective, progress=progress)
        return len(effective) - start

    def before_token(self, session, in_tool_call: bool) -> None:
        n = len(session.tokens)
        if not in_tool_call and self.cache.enabled and self.schedule.due(n):
            self._save_tokens(session, "continued")

    def shutdown(self, session, bindings: dict) -> None:
        if len(session.tokens) >= self.min_tokens:
            self._save_live(session, bindings, "shutdown")
        self.cache.close()

    def _token_text(self, tokens: list[int]) -> str | None:
        return exact_text(self.tokenizer, tokens)

    def _save_tokens(self, session, reason: str) -> None:
        self.schedule.mark(len(session.tokens))
        text = self._token_text(session.tokens)
        if text is None:
            log.info("kv disk cache: %s checkpoint skipped: the prefix ends inside a UTF-8 character", reason)
            return
        self.cache.save(session, text, reason, tool_map=self._tools())

    def _save_live(self, session, bindings: dict, reason: str) -> None:
        frontier = len(session.tokens)
        text, flags = self._token_text(session.tokens), 0
        for key, flag in (("responses", fmt.FLAG_RESPONSES_VISIBLE), ("thinking", fmt.FLAG_THINKING_VISIBLE)):
            binding = bindings.get(key)
            if binding is not None and binding.frontier == frontier and binding.visible:
                text, flags = binding.visible, flag
                break
        if text is None:
            log.info("kv disk cache: %s checkpoint skipped: the live tokens are not valid UTF-8", reason)
            return
        self.cache.save(session, text, reason, flags=flags, tool_map=self._tools())

    # ---- tool maps -----------------------------------------------------------------------
    def _tools(self) -> dict[str, str]:
        return dict(self.memory.items()) if self.persist_tools else {}

    def restore_tools(self, ids: set[str]) -> int:
        """Remember the disk's blocks for the ids of `ids` RAM lacks; returns how many
        were found. Connection thread (§10.5)."""
        if not self.persist_tools or not self.cache.enabled:
            return 0
        unknown = self.memory.missing(ids)
        if not unknown:
            return 0
        found = self.cache.tool_blocks(unknown)
        self.memory.update(found)
        return len(found)


def exact_text(tokenizer, tokens: list[int]) -> str | None:
    """The exact text of `tokens`, or None when their bytes are not valid UTF-8 (a
    turn cut inside a character): a lossy decode would put U+FFFD where the KV holds
    other bytes, so a file named after it, or a text-prefix match against it, would
    claim text the KV does not hold."""
    try:
        return b"".join(tokenizer.token_bytes(t) for t in tokens).decode("utf-8")
    except UnicodeDecodeError:
        return None
