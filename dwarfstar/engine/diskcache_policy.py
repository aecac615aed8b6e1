"""When the disk cache saves, and which file it evicts: pure functions (server.md §10.6, §10.7).

- `cold_boundary(tokens, ...)`: where a cold checkpoint of a first prompt ends: the
  last User token before the first Assistant token (the shared system and tools
  prefix of agent prompts) if that is >= min, else `store_len`: the length minus
  `trim`, aligned down to `align`, if still >= min, else the full length. Trim and
  align exist because BPE may retokenize the last few tokens once text is appended.
- `ContinuedSchedule`: continued checkpoints at multiples of
  step = ceil(interval / align) · align, >= min and beyond the last saved frontier.
- `save_stops(start, end, cold, schedule)`: where a prefill of (start, end] pauses
  to save; a continued frontier that coincides with the cold boundary is dropped.
- `eviction_score`: (hits · 2^(-age / 6 h) + 1) · tokens / bytes; lowest goes first.
"""

from __future__ import annotations

import math

HALF_LIFE_S = 21600


def store_len(n: int, trim: int, align: int, min_tokens: int) -> int:
    """`n - trim` aligned down to `align`, if that is still >= min; else n (§10.6)."""
    k = n - trim
    if align > 0:
        k = k // align * align
    return k if k >= min_tokens else n


def cold_boundary(tokens: list[int], user_id: int, assistant_id: int, min_tokens: int,
                  trim: int, align: int) -> int:
    """Where a cold checkpoint ends: the last User token before the first Assistant
    token (the shared system/tools prefix of agent prompts) if that is >= min,
    else the trimmed, aligned length."""
    first_assistant = tokens.index(assistant_id) if assistant_id in tokens else len(tokens)
    users = [i for i in range(first_assistant) if tokens[i] == user_id]
    if users and users[-1] >= min_tokens:
        return users[-1]
    return store_len(len(tokens), trim, align, min_tokens)


def cold_due(cached: int, n_prompt: int, min_tokens: int, cold_max: int) -> bool:
    return cached == 0 and cold_max > 0 and min_tokens <= n_prompt <= cold_max


class ContinuedSchedule:
    """Continued-save frontiers: multiples of `step` = ceil(interval/align)·align
    that are >= min and beyond the last continued or cold save."""

    def __init__(self, interval: int, align: int, min_tokens: int):
        self.step = (math.ceil(interval / align) * align if align > 0 else interval) if interval > 0 else 0
        self.min_tokens = min_tokens
        self.last = 0

    def reset(self, at: int = 0) -> None:
        self.last = at

    def mark(self, n: int) -> None:
        self.last = max(self.last, n)

    def due(self, n: int) -> bool:
        return self.step > 0 and n % self.step == 0 and n >= self.min_tokens and n > self.last

    def frontiers(self, start: int, end: int) -> list[int]:
        """Due frontiers in (start, end]."""
        if self.step == 0:
            return []
        first = (max(start, self.last) // self.step + 1) * self.step
        return [n for n in range(first, end + 1, self.step) if self.due(n)]


def save_stops(start: int, end: int, cold: int | None, schedule: ContinuedSchedule) -> list[tuple[int, str]]:
    """Positions in (start, end] where prefill must pause to save, with the reason;
    a continued frontier that coincides with the cold boundary is suppressed."""
    stops = {n: "continued" for n in schedule.frontiers(start, end)}
    if cold is not None and start < cold <= end:
        stops[cold] = "cold"
    return sorted(stops.items())


def eviction_score(header, size: int, now: float) -> float:
    """`header`: a diskcache_format.Header (hits, last_used, created, n_tokens)."""
    stamp = header.last_used or header.created
    hits = 0.0
    if stamp:
        hits = header.hits * 2.0 ** (-(now - stamp) / HALF_LIFE_S)
        hits = hits if hits >= 0.01 else 0.0
    return (hits + 1.0) * header.n_tokens / max(size, 1)
