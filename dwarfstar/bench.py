"""`ds4-bench`: prefill and decode throughput at increasing context frontiers (cli.md §4).

Contract:
- The text is tokenized once into S (plain BPE for `--prompt-file`; a non-thinking chat
  turn for `--chat-prompt-file`). For each frontier f (ctx-start, next(f), ..., ctx-max):
  the session is synced to S[:f] (timed; only the tokens beyond the previous frontier
  are evaluated), snapshotted (untimed), `gen-tokens` greedy tokens are generated with
  EOS excluded (timed), and the snapshot is restored (untimed) so the next prefill
  continues from the exact frontier state. One CSV row per frontier, flushed.
- `next_frontier` is ds4's schedule: +step-incr when step-mul is 1, else
  ceil(cur * step-mul) (at least cur + 1), capped at ctx-max.
- CSV header `ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes`,
  rows `%d,%d,%.2f,%d,%.2f,%d` to `--csv FILE` or stdout; kvcache_bytes is the size of
  the in-memory snapshot. Progress, device and commit go to stderr.
- Exit codes: 0, 1 (model/engine failure, text too short), 2 (usage).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from dwarfstar import cliprompt, flags, lock
from dwarfstar.flags import Flag, HelpRequested, UsageError

PROG = "ds4-bench"
CSV_HEADER = "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes"


@dataclass(frozen=True)
class BenchOptions:
    prompt_file: str | None = None
    chat_prompt_file: str | None = None
    system: str = "You are a helpful assistant."
    model: str = "ds4flash.gguf"
    ctx_start: int = 2048
    ctx_max: int = 32768
    ctx_alloc: int | None = None
    step_incr: int = 2048
    step_mul: float = 1.0
    gen_tokens: int = 128
    csv: str | None = None
    threads: int | None = None
    backend: str | None = None
    quality: bool = False
    warm_weights: bool = False
    dummy_weights: str | None = None
    warmup: bool = True


TABLE = [
    Flag(("--prompt-file",), "prompt_file", "str"),
    Flag(("--chat-prompt-file",), "chat_prompt_file", "str"),
    Flag(("-sys", "--system"), "system", "str"),
    Flag(("-m", "--model"), "model", "str"),
    Flag(("--ctx-start",), "ctx_start", "int"),
    Flag(("--ctx-max",), "ctx_max", "int"),
    Flag(("--ctx-alloc",), "ctx_alloc", "int"),
    Flag(("--step-incr",), "step_incr", "int"),
    Flag(("--step-mul",), "step_mul", "float", lo=0.0),
    Flag(("--gen-tokens", "--tokens", "-n"), "gen_tokens", "int"),
    Flag(("--csv",), "csv", "str"),
    Flag(("-t", "--threads"), "threads", "int"),
    Flag(("--cpu",), "backend", const="cpu"),
    Flag(("--cuda",), "backend", const="cuda"),
    Flag(("--metal",), "backend", const="metal"),
    Flag(("--backend",), "backend", "str"),
    # Accepted for ds4 compatibility; the reference engine has no such switches.
    Flag(("--quality",), "quality"),
    Flag(("--warm-weights",), "warm_weights"),
    Flag(("--dummy-weights",), "dummy_weights", "str"),
    Flag(("--no-warmup",), "warmup", const=False),
]

USAGE = f"""usage: {PROG} (--prompt-file FILE | --chat-prompt-file FILE) [options]

Prefill and generation throughput at increasing context frontiers; CSV output.

  --prompt-file FILE       raw text, plain BPE (no BOS, special strings stay text)
  --chat-prompt-file FILE  FILE as one non-thinking chat user turn
  -sys, --system TEXT      system text for --chat-prompt-file (default "You are a helpful assistant.")
  -m, --model FILE         GGUF model (default ds4flash.gguf)
  --ctx-start N            first frontier (default 2048)
  --ctx-max N              last frontier (default 32768)
  --ctx-alloc N            allocated context (default ctx-max + gen-tokens + 1)
  --step-incr N            linear step when --step-mul is 1 (default 2048)
  --step-mul F             multiplicative step, >= 1 (default 1)
  -n, --tokens, --gen-tokens N
                           greedy tokens generated at each frontier (default 128)
  --csv FILE               CSV destination (default stdout)
  -t, --threads N          CPU threads for torch
  --cpu | --cuda | --backend cpu|cuda   (--metal is not supported)
  --quality, --warm-weights  accepted, no effect
  --dummy-weights q2|q4[:LAYERS]
                           no model file: random Flash-shaped weights made on the GPU
                           (cuda backend; speed only, the text is meaningless to them)
  --no-warmup              cuda: skip the kernel warm-up at load (the first frontier's
                           prefill then includes loading the kernels)
  -h, --help               show this help

The text shipped for this is bench/data/paradise_lost.txt, a public-domain book (see
bench/data/README.md).
"""


def parse_args(argv: list[str]) -> BenchOptions:
    opts = BenchOptions(**flags.parse(PROG, argv, TABLE, bench_style=True))
    if opts.backend == "metal":
        raise UsageError(f"{PROG}: the metal backend is not supported by dwarfstar; use --cpu or --cuda")
    if opts.backend not in (None, "cpu", "cuda"):
        raise UsageError(
            f"{PROG}: invalid value for --backend: {opts.backend}\n{PROG}: valid backends are: metal, cuda, cpu"
        )
    if (opts.prompt_file is None) == (opts.chat_prompt_file is None):
        raise UsageError(f"{PROG}: specify exactly one of --prompt-file or --chat-prompt-file")
    if opts.dummy_weights is not None:
        _dummy_spec(opts.dummy_weights)
        if opts.backend not in (None, "cuda"):
            raise UsageError(f"{PROG}: --dummy-weights needs the cuda backend")
    if opts.ctx_start > opts.ctx_max:
        raise UsageError(f"{PROG}: --ctx-start must be <= --ctx-max")
    if opts.step_mul < 1:
        raise UsageError(f"{PROG}: --step-mul must be >= 1")
    if opts.ctx_alloc is None:
        return BenchOptions(**{**opts.__dict__, "ctx_alloc": opts.ctx_max + opts.gen_tokens + 1})
    if opts.ctx_alloc <= opts.ctx_max + opts.gen_tokens:
        raise UsageError(f"{PROG}: --ctx-alloc must be greater than ctx-max + gen-tokens")
    return opts


def _dummy_spec(text: str) -> tuple[str, int | None]:
    experts, _, layers = text.partition(":")
    if experts not in ("q2", "q4") or (layers and (not layers.isdigit() or int(layers) == 0)):
        raise UsageError(f"{PROG}: invalid value for --dummy-weights: {text} (q2|q4[:LAYERS])")
    return experts, int(layers) if layers else None


def next_frontier(cur: int, ctx_max: int, step_incr: int, step_mul: float) -> int:
    if cur >= ctx_max:
        return ctx_max
    nxt = cur + step_incr if step_mul == 1 else max(math.ceil(cur * step_mul), cur + 1)
    return min(nxt, ctx_max)


def frontiers(opts: BenchOptions) -> list[int]:
    out = [opts.ctx_start]
    while out[-1] < opts.ctx_max:
        out.append(next_frontier(out[-1], opts.ctx_max, opts.step_incr, opts.step_mul))
    return out


def csv_row(ctx: int, n_prefill: int, prefill_s: float, n_gen: int, gen_s: float, kv_bytes: int) -> str:
    prefill_tps = n_prefill / prefill_s if prefill_s > 0 else 0.0
    gen_tps = n_gen / gen_s if gen_s > 0 else 0.0
    return f"{ctx},{n_prefill},{prefill_tps:.2f},{n_gen},{gen_tps:.2f},{kv_bytes}"


def argmax_excluding(logits, banned: int) -> int:
    logits = logits.clone()
    logits[banned] = -math.inf
    return int(logits.argmax())


def _device_sync() -> None:
    """Wait for queued GPU work so the clock measures it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_bench(session, tokens: list[int], opts: BenchOptions, eos_id: int, out: TextIO,
              clock: Callable[[], float] = time.perf_counter, log: TextIO = sys.stderr) -> list[str]:
    """Walk the frontiers (module contract); returns the CSV rows written after the header."""
    from dwarfstar.generate import live_logits

    out.write(CSV_HEADER + "\n")
    out.flush()
    rows, previous = [], 0
    for frontier in frontiers(opts):
        t0 = clock()
        session.sync(tokens[:frontier])
        _device_sync()
        t1 = clock()
        blob = session.snapshot()
        if frontier + opts.gen_tokens >= opts.ctx_alloc:
            raise RuntimeError(f"generation would exceed allocated context at frontier {frontier}")
        t2 = clock()
        for _ in range(opts.gen_tokens):
            session.eval(argmax_excluding(live_logits(session), eos_id))
        _device_sync()
        t3 = clock()
        session.restore(blob)
        row = csv_row(frontier, frontier - previous, t1 - t0, opts.gen_tokens, t3 - t2, len(blob))
        out.write(row + "\n")
        out.flush()
        log.write(f"{PROG}: ctx {frontier}: prefill {frontier - previous} tokens in {t1 - t0:.3f} s, "
                  f"generation {opts.gen_tokens} tokens in {t3 - t2:.3f} s\n")
        rows.append(row)
        previous = frontier
    return rows


def bench_tokens(tokenizer, opts: BenchOptions) -> list[int]:
    path = opts.prompt_file or opts.chat_prompt_file
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    if opts.prompt_file is not None:
        return cliprompt.plain_bpe(tokenizer, text)
    header = [tokenizer.bos_id] + (cliprompt.plain_bpe(tokenizer, opts.system) if opts.system else [])
    return header + cliprompt.turn_tokens(tokenizer, text, "none")


def _describe_run(opts: BenchOptions) -> str:
    import torch

    device = torch.cuda.get_device_name() if opts.backend != "cpu" and torch.cuda.is_available() else "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    dummy = f", dummy weights {opts.dummy_weights}" if opts.dummy_weights else ""
    return f"{PROG}: device {device}, commit {commit}, ctx_alloc {opts.ctx_alloc}{dummy}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(argv)
        for path in (opts.prompt_file or opts.chat_prompt_file,):
            if not Path(path).is_file():
                raise UsageError(f"{PROG}: failed to open {path}", exit_code=1)
        if opts.dummy_weights is None and not Path(opts.model).is_file():
            from dwarfstar.cli import missing_model_message

            raise UsageError(missing_model_message(opts.model).replace("ds4:", f"{PROG}:"), exit_code=1)
        held = lock.acquire(PROG)
    except HelpRequested:
        sys.stdout.write(USAGE)
        return 0
    except (UsageError, lock.LockHeld) as e:
        print(e, file=sys.stderr)
        if str(e).startswith(f"{PROG}: unknown option"):
            sys.stderr.write(USAGE)
        return e.exit_code
    try:
        return _run(opts)
    finally:
        held.close()


def _run(opts: BenchOptions) -> int:
    from dwarfstar.cli import CliOptions, load

    try:
        if opts.dummy_weights is not None:
            from dwarfstar.engine.engine import Engine, EngineOptions

            experts, layers = _dummy_spec(opts.dummy_weights)
            engine = Engine.load(None, EngineOptions(backend="cuda", ctx=opts.ctx_alloc, dummy_weights=True,
                                                     dummy_experts=experts, dummy_layers=layers,
                                                     warmup=opts.warmup))
        else:
            engine = load(CliOptions(model=opts.model, ctx=opts.ctx_alloc, backend=opts.backend,
                                     threads=opts.threads, warmup=opts.warmup))
    except Exception as e:
        print(f"{PROG}: failed to load {opts.model}: {e}", file=sys.stderr)
        return 1
    tokens = bench_tokens(engine.tokenizer, opts)
    if len(tokens) < opts.ctx_max:
        print(f"{PROG}: prompt has {len(tokens)} tokens, need at least --ctx-max={opts.ctx_max}", file=sys.stderr)
        return 1
    print(_describe_run(opts), file=sys.stderr)
    session = engine.new_session(ctx=opts.ctx_alloc)
    out = open(opts.csv, "w") if opts.csv else sys.stdout
    try:
        run_bench(session, tokens, opts, engine.tokenizer.eos_id, out)
    except Exception as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
