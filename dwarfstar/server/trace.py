"""`--trace FILE`: a readable record of every request the worker runs (server.md §11).

Contract: `Trace(path)` truncates the file; `Trace(None)` is a no-op with the
same methods. Only the worker thread writes, one block per job, flushed after
every write so a crash leaves a readable file: header and sampling settings,
the cache decision (including the tokens actually prefilled), the raw request
JSON, the rendered prompt, the generated text as it comes, tool-parser events,
and the parsed message.
"""

from __future__ import annotations

import json
import time


class Trace:
    def __init__(self, path: str | None):
        self.file = open(path, "w", encoding="utf-8", errors="replace") if path else None

    def _write(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text)
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def begin(self, job) -> None:
        if self.file is None:
            return
        p = job.params
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        think = {"chat": "none", "thinking": "high", "max": "max"}[p.mode]
        self._write(
            f"\n===== request {job.number} {stamp} =====\n"
            f"kind: {job.api}\nmodel: {p.model}\nstream: {int(p.stream)}\ntools: {int(job.has_tools)}\n"
            f"think_mode: {think}\nprompt_tokens: {len(job.prompt_tokens)}\nmax_tokens: {p.max_tokens}\n"
            f"temperature: {p.temperature:.3f}\ntop_k: {p.top_k}\ntop_p: {p.top_p:.3f}\nmin_p: {p.min_p:.3f}\n"
            f"seed: {p.seed}\nstream_include_usage: {int(p.include_usage)}\n")

    def cache(self, live_before: int, job, effective: list[int], source: str, cached: int, prefilled: int) -> None:
        if self.file is None:
            return
        counts = job.replay_counts or {}
        common = 0
        for a, b in zip(effective, job.prompt_tokens):
            if a != b:
                break
            common += 1
        self._write(
            f"\n--- cache decision ---\nlive_tokens_before: {live_before}\nprompt_tokens: {len(job.prompt_tokens)}\n"
            f"effective_prompt_tokens: {len(effective)}\nlive_prompt_common: {min(common, live_before)}\n"
            f"tool_replay: mem={counts.get('mem', 0)} disk=0 canonical={counts.get('canonical', 0)} "
            f"missing_ids={counts.get('missing_ids', 0)}\n"
            f"cache_source: {source}\ncached_tokens: {cached}\nprefilled_tokens: {prefilled}\n"
            f"\n--- raw request json ---\n{job.raw_body}\n"
            f"\n--- rendered prompt ---\n{job.prompt_text}\n\n--- generated text ---\n")

    def generated(self, piece: str) -> None:
        self._write(piece)

    def event(self, text: str) -> None:
        self._write(f"\n\n--- trace: {text} ---\n\n")

    def end(self, job, result, elapsed: float) -> None:
        if self.file is None:
            return
        lines = [f"\n\n--- parsed message ---\nfinish: {result.finish}\n"
                 f"generated_tokens: {result.completion_tokens}\nelapsed_sec: {elapsed:.3f}\n"]
        if result.reasoning:
            lines.append(f"\nreasoning:\n{result.reasoning}\n")
        if result.content:
            lines.append(f"\ncontent:\n{result.content}\n")
        for i, call in enumerate(result.tool_calls):
            args = json.dumps(json.loads(call.arguments), ensure_ascii=False, indent=2)
            lines.append(f"\ntool_call[{i}]:\nid: {call.id}\nname: {call.name}\narguments:\n{args}\n")
        lines.append(f"\n===== end request {job.number} =====\n")
        self._write("".join(lines))

    def failed(self, job, message: str) -> None:
        self._write(f"\n\n--- trace: failed: {message} ---\n\n===== end request {job.number} =====\n")
