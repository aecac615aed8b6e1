"""The engine worker: one thread, one FIFO queue, the live session (server.md §1, §7, §9).

Contract: `Worker.submit(job)` queues a fully prepared Job; the worker thread
runs jobs strictly one at a time: it picks the effective prompt (prefix
reuse, §9.2), syncs the session, generates token by token and reports
through `job.emit` (events in job.py). All session state is touched only on
this thread. A job whose client left (`job.cancelled`) stops at the next
token; the tokens it already generated stay in the live KV.

Prefix reuse, in order: a remembered *visible* transcript (the live KV holds
reasoning that the next rendered prompt omits; §9.3), the live tool turn
(Anthropic/Responses tool results whose calls the client did not replay;
§9.4), an exact token prefix, a decoded-text prefix, else a full rebuild.
Text matches are byte-exact: live tokens whose bytes are not valid UTF-8 (a
turn cut inside a character) never match by text, and such a turn leaves no
visible transcript, because the answer the client got has U+FFFD where the KV
holds the partial character's bytes.
`usage` reports what the engine really did: cached = effective length minus
the tokens `session.sync` prefilled.

With `--kv-disk-dir` (server.md §10, server/kvdisk.py) a miss first saves the
live session (evict) and then tries a disk checkpoint ("disk-text"); prefill
pauses to save cold and continued checkpoints; the drained worker saves a
shutdown checkpoint before its thread ends.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

from dwarfstar.engine.sampling import Rng, SamplingParams, sample
from dwarfstar.generate import live_logits
from dwarfstar.server.job import Job, Result
from dwarfstar.server.kvdisk import Checkpoints, exact_text
from dwarfstar.server.output import GenerationError, make_projection
from dwarfstar.server.stream import StopHoldback
from dwarfstar.shape import THINK_CLOSE, THINK_OPEN

log = logging.getLogger("ds4-server")


@dataclass
class Binding:
    """What a finished turn leaves for the next request (§9.3): the live frontier,
    the turn as the next request will render it (EOS-less; "" when unknown) and
    the tool ids of its calls."""

    frontier: int
    visible: str = ""
    ids: set[str] = field(default_factory=set)


class Worker:
    def __init__(self, engine, options, memory, trace):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.options = options
        self.memory = memory
        self.trace = trace
        self.session = engine.new_session()
        self.disk = Checkpoints.open(engine, options, memory)
        self.queue: queue.Queue = queue.Queue()
        self.counter = 0
        # Written only on the worker thread; read (atomic reference) by request parsing.
        self.bindings: dict[str, Binding] = {}
        self.forced = self.tokenizer.encode(options.debug_forced_output) if options.debug_forced_output else None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ds4-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Shutdown (server.md §12): the running generation ends at its next token,
        queued jobs are drained with the same answer."""
        self.stopping.set()
        self.queue.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def live_tool_ids(self, api: str) -> set[str]:
        binding = self.bindings.get(api)
        return set(binding.ids) if binding is not None else set()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            try:
                self.execute(job)
            except GenerationError as err:
                status = 503 if self.stopping.is_set() else 500
                self._fail(job, "server shutting down" if status == 503 else f"generation failed: {err}", status)
            except Exception as err:  # a server fault: answer 500, keep serving
                log.exception("request %d failed", job.number)
                self._fail(job, f"generation failed: {err}")
        if self.disk is not None:
            try:
                self.disk.shutdown(self.session, self.bindings)
            except Exception:  # never block shutdown on the cache
                log.exception("shutdown checkpoint failed")

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        # The KV keeps what was generated; bindings no longer describe it.
        self.bindings = {}
        self.trace.failed(job, message)
        job.emit("fail", status, message)

    def execute(self, job: Job) -> None:
        self.counter += 1
        job.number = self.counter
        started = time.monotonic()
        self.trace.begin(job)
        effective, source = self._plan(job)
        if effective is None:
            job.emit("fail", 409, _conflict_message(job.api))
            return
        if len(effective) >= self.options.ctx:
            job.emit("fail", 500, "prompt exceeds context")
            return
        n_live = len(self.session.tokens)
        def keepalive(*_):
            job.emit("keepalive")

        try:
            if self.disk is not None:
                prefilled = self.disk.prefill(self.session, effective, source, keepalive)
            else:
                prefilled = self.session.sync(effective, progress=keepalive)
        except Exception as err:  # answered with the engine's own error text (server.md §3.2, §7.3)
            log.exception("request %d: prefill failed", job.number)
            self.trace.event(f"prefill failed: {err}")
            self._fail(job, str(err))
            return
        cached = len(effective) - prefilled
        self.trace.cache(n_live, job, effective, source, cached, prefilled)
        job.emit("start", job.number, cached, prefilled)
        result = self._generate(job)
        result.prompt_tokens, result.cached_tokens = len(effective), cached
        self._remember(job, result, source)
        self.trace.end(job, result, time.monotonic() - started)
        job.emit("done", result)

    def _plan(self, job: Job) -> tuple[list[int] | None, str]:
        """The effective prompt and its cache source (§9.2)."""
        live = list(self.session.tokens)
        for key in (job.api, "thinking"):
            binding = self.bindings.get(key)
            if binding is None or binding.frontier != len(live) or not binding.visible:
                continue
            if len(binding.visible) < len(job.prompt_text) and job.prompt_text.startswith(binding.visible):
                suffix = job.prompt_text[len(binding.visible):]
                return live + self.tokenizer.encode(suffix), f"{key}-visible"
        if job.live_tool_ids:
            binding = self.bindings.get(job.api)
            if binding is None or binding.ids != job.live_tool_ids or binding.frontier != len(live):
                return None, "conflict"
            return live + self.tokenizer.encode(job.live_tail), f"{job.api}-tool-output"
        prompt = job.prompt_tokens
        if live and prompt[:len(live)] == live:
            return prompt, "memory-token"
        if live:
            text = exact_text(self.tokenizer, live)
            if text is not None and len(text) < len(job.prompt_text) and job.prompt_text.startswith(text):
                return live + self.tokenizer.encode(job.prompt_text[len(text):]), "memory-text"
        if self.disk is not None:
            loaded = self.disk.on_miss(self.session, self.bindings, job.prompt_text)
            if loaded is not None:
                return loaded, "disk-text"
        return prompt, "none"

    def _sampling(self, job: Job) -> tuple[SamplingParams, SamplingParams, Rng]:
        """(request sampling, greedy, rng); seed <= 0 means a fresh random seed (§6)."""
        p = job.params
        seed = p.seed if p.seed > 0 else secrets.randbits(63) + 1
        chosen = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, seed=seed)
        greedy = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        return chosen, greedy, Rng(seed)

    def _pick(self, job: Job, step: int, structural: bool, sampling) -> int:
        if self.forced is not None:
            return self.forced[step] if step < len(self.forced) else self.tokenizer.eos_id
        chosen, greedy, generator = sampling
        params = greedy if structural else chosen
        return int(sample(live_logits(self.session), params, generator).token)

    def _generate(self, job: Job) -> Result:
        """The token loop of §7.1; returns the parsed Result or raises GenerationError."""
        budget = max(0, min(job.params.max_tokens, self.options.ctx - len(self.session.tokens)))
        projection = make_projection(job, self.memory, self.trace)
        holdback = StopHoldback(job.params.stop)
        decoder = self.tokenizer.stream_decoder()
        sampling = self._sampling(job)
        eos = self.tokenizer.eos_id
        finish, n_generated = "length", 0
        while n_generated < budget:
            if job.cancelled.is_set():
                raise GenerationError("client disconnected")
            if self.stopping.is_set():
                raise GenerationError("shutdown requested")
            structural = projection.structural()
            if self.disk is not None:
                self.disk.before_token(self.session, structural)
            token = self._pick(job, n_generated, structural, sampling)
            if token == eos:
                finish = "stop"
                break
            self.session.eval(token)
            n_generated += 1
            piece = decoder.push(token)
            self.trace.generated(piece)
            released, hit = holdback.push(piece)
            projection.feed(released)
            if hit:
                finish = "stop"
                break
            if projection.tool_calls_closed():
                finish = "tool_calls"
                break
        if not holdback.cut:
            tail, _ = holdback.push(decoder.flush())
            projection.feed(tail + holdback.finish())
        result = projection.finish(finish)
        result.completion_tokens = n_generated
        return result

    def _remember(self, job: Job, result: Result, source: str) -> None:
        """Update live bindings after a finished turn (§9.3)."""
        live = self.session.tokens
        frontier = len(live)
        self.bindings = {}
        if result.finish not in ("stop", "tool_calls"):
            return
        ids = {c.id for c in result.tool_calls}
        generated = live[frontier - result.completion_tokens:] if result.completion_tokens else []
        is_exact = exact_text(self.tokenizer, generated) is not None
        if job.api == "anthropic" and ids:
            self.bindings["anthropic"] = Binding(frontier, ids=ids)
        if job.api == "responses":
            visible = visible_key(job, result, keep_reasoning=job.want_summary) if is_exact else ""
            self.bindings["responses"] = Binding(frontier, visible, ids)
        if job.api in ("chat", "anthropic") and job.params.mode != "chat" and not job.has_tools \
                and result.thinking_closed and not ids and is_exact:
            self.bindings["thinking"] = Binding(frontier, visible_key(job, result, False))


def visible_key(job: Job, result: Result, keep_reasoning: bool) -> str:
    """The finished turn as the next request renders it, without the final EOS (§9.3,
    prompt.md §13): the KV stops before EOS, so the next suffix starts with it."""
    dsml = result.raw_dsml
    if job.params.mode == "chat":
        return job.prompt_text + result.content + dsml
    if job.has_tools:
        reasoning = (result.reasoning or "") if keep_reasoning else ""
        return job.prompt_text + reasoning + THINK_CLOSE + result.content + dsml
    assert job.prompt_text.endswith(THINK_OPEN)
    return job.prompt_text[:-len(THINK_OPEN)] + THINK_CLOSE + result.content + dsml


def _conflict_message(api: str) -> str:
    if api == "anthropic":
        return "Anthropic continuation state is not available; retry by replaying the full messages history"
    return "Responses continuation state is not available; retry by replaying the full input history"

