"""`ds4`: one-shot and interactive chat, token and logprob dumps (cli.md §1-§2, §6).

Contract:
- `main(argv)` returns the process exit code: 0 success, 1 engine/model failure,
  2 usage errors (cli.md §1.2) and a held instance lock (§1.3). Errors are one line on
  stderr, never a traceback.
- `parse_args(argv) -> CliOptions` (frozen) or `UsageError`/`HelpRequested`. Flags
  follow ds4 except where the issue decides otherwise: `--top-k` exists (default 0),
  `--numerics official|exact` is dwarfstar's own, `--metal` is refused as unsupported.
- Modes: `--dump-tokens` reads only the vocabulary; `--dump-logprobs FILE` writes the
  greedy continuation's top logprobs (dumps.py); `-p`/`--prompt-file` is one-shot;
  no prompt starts the REPL (repl.py). A missing model file gets one message saying
  where the published weights are.
- Session files (dwarfstar only): `--load-session FILE` continues a saved session (a
  one-shot prompt becomes the next user turn of its transcript and only that turn is
  prefilled; the REPL starts from it); `--save-session FILE` writes the session after
  the one-shot answer or when the REPL ends. A file that cannot be loaded or written
  is one error line and exit 1. Format and transcript rules: repl.py.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dwarfstar import cliprompt, flags, lock, shape
from dwarfstar.dumps import LogprobWriter, format_token_dump
from dwarfstar.flags import Flag, HelpRequested, UsageError
from dwarfstar.generate import Picker, generate, token_budget
from dwarfstar.printer import AnswerPrinter, PrefillProgress

PROG = "ds4"
DEFAULT_MODEL = "ds4flash.gguf"
LOGPROBS_TOP_K_MAX = 128
HF_REPO = "antirez/deepseek-v4-gguf"


@dataclass(frozen=True)
class CliOptions:
    model: str = DEFAULT_MODEL
    ctx: int = 32768
    n_tokens: int = 50000
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.05
    seed: int | None = None
    system: str = "You are a helpful assistant"
    mode: str = "high"
    numerics: str = "official"
    backend: str | None = None
    threads: int | None = None
    warmup: bool = True
    prompt: str | None = None
    prompt_file: str | None = None
    dump_tokens: bool = False
    dump_logprobs: str | None = None
    logprobs_top_k: int = 20
    inspect: bool = False
    load_session: str | None = None
    save_session: str | None = None


TABLE = [
    Flag(("-m", "--model"), "model", "str"),
    Flag(("-c", "--ctx"), "ctx", "int"),
    Flag(("-n", "--tokens"), "n_tokens", "int"),
    Flag(("--temp",), "temperature", "float", lo=0.0, hi=100.0),
    Flag(("--top-p",), "top_p", "float", lo=0.0, hi=1.0),
    Flag(("--top-k",), "top_k", "int0"),
    Flag(("--min-p",), "min_p", "float", lo=0.0, hi=1.0),
    Flag(("--seed",), "seed", "u64"),
    Flag(("-sys", "--system"), "system", "str"),
    Flag(("--think",), "mode", const="high"),
    Flag(("--think-max",), "mode", const="max"),
    Flag(("--nothink",), "mode", const="none"),
    Flag(("--numerics",), "numerics", "choice", choices=("official", "exact")),
    Flag(("--cpu",), "backend", const="cpu"),
    Flag(("--cuda",), "backend", const="cuda"),
    Flag(("--metal",), "backend", const="metal"),
    Flag(("--backend",), "backend", "str"),
    Flag(("-t", "--threads"), "threads", "int"),
    Flag(("--no-warmup",), "warmup", const=False),
    Flag(("-p", "--prompt"), "prompt", "str"),
    Flag(("--prompt-file",), "prompt_file", "str"),
    Flag(("--dump-tokens",), "dump_tokens"),
    Flag(("--dump-logprobs",), "dump_logprobs", "str"),
    Flag(("--logprobs-top-k",), "logprobs_top_k", "int"),
    Flag(("--inspect",), "inspect"),
    Flag(("--load-session",), "load_session", "str"),
    Flag(("--save-session",), "save_session", "str"),
    # Accepted only to answer with ds4's own pointers (cli.md §2.1).
    Flag(("--server",), "_server"),
    Flag(("--metal-graph-generate",), "_removed"),
]

USAGE = f"""usage: {PROG} [options]

Chat with a DeepSeek V4 Flash GGUF: one-shot with -p/--prompt-file, interactive otherwise.

model and engine:
  -m, --model FILE        GGUF model (default {DEFAULT_MODEL})
  -c, --ctx N             context tokens of the session (default 32768)
  --cpu | --cuda | --backend cpu|cuda
                          backend (default: cuda when a GPU is visible, else cpu;
                          --metal is refused: dwarfstar has no Metal backend)
  --numerics official|exact
                          official: FP8/FP4 rounding as the official model (default);
                          exact: no rounding simulation (comparisons with transformers)
  -t, --threads N         CPU threads for torch
  --no-warmup             cuda: skip the kernel warm-up at load (a throwaway prefill and
                          decode step; without it the first prompt runs slower)
prompt and generation:
  -p, --prompt TEXT       one-shot prompt (a prompt starting with BOS is a rendered chat)
  --prompt-file FILE      one-shot prompt read from FILE
  -sys, --system TEXT     system prompt (default "You are a helpful assistant"; "" for none)
  -n, --tokens N          max generated tokens per answer (default 50000)
  --think | --think-max | --nothink
                          thinking mode (default --think; Think Max needs --ctx >= 393216)
  --temp F                temperature in [0, 100], 0 = greedy (default 1)
  --top-p F               nucleus in [0, 1] (default 1)
  --top-k N               keep the N most likely tokens, 0 = off (default 0)
  --min-p F               keep p >= F * p_max, in [0, 1] (default 0.05)
  --seed N                sampling seed, > 0 (default: random)
session files (a disk KV cache checkpoint, the format ds4-server --kv-disk-dir uses):
  --load-session FILE     continue the session saved in FILE: the REPL starts from it, a
                          -p/--prompt-file prompt is its next user turn (only that is prefilled)
  --save-session FILE     save the session (KV cache and transcript) to FILE after the
                          one-shot answer, or when the REPL ends
diagnostics:
  --dump-tokens           print the ids of the -p/--prompt-file text as written and exit
  --dump-logprobs FILE    write the greedy continuation's top logprobs as JSON
  --logprobs-top-k N      alternatives per step in --dump-logprobs (default 20, max 128)
  --inspect               load the model and print its configuration
  -h, --help              show this help

interactive commands: /help /think /think-max /nothink /ctx N /read FILE /save FILE /load FILE /quit
"""


def parse_args(argv: list[str]) -> CliOptions:
    values = flags.parse(PROG, argv, TABLE)
    if "_server" in values:
        raise UsageError(f"{PROG}: use ds4-server for the HTTP server")
    if "_removed" in values:
        raise UsageError(f"{PROG}: --metal-graph-generate was removed")
    backend = values.get("backend")
    if backend == "metal":
        raise UsageError(f"{PROG}: the metal backend is not supported by dwarfstar; use --cpu or --cuda")
    if backend not in (None, "cpu", "cuda"):
        raise UsageError(f"{PROG}: invalid backend: {backend}\n{PROG}: valid backends are: metal, cuda, cpu")
    if values.get("prompt") is not None and values.get("prompt_file") is not None:
        raise UsageError(f"{PROG}: specify only one prompt source")
    opts = CliOptions(**values)
    has_prompt = opts.prompt is not None or opts.prompt_file is not None
    if opts.dump_tokens and not has_prompt:
        raise UsageError(f"{PROG}: --dump-tokens requires -p or --prompt-file")
    if opts.dump_logprobs is not None and not has_prompt:
        raise UsageError(f"{PROG}: --dump-logprobs requires -p or --prompt-file")
    is_diagnostic = opts.dump_tokens or opts.dump_logprobs is not None or opts.inspect
    if is_diagnostic and (opts.load_session or opts.save_session):
        raise UsageError(f"{PROG}: --load-session/--save-session apply to chat, not to --dump-* or --inspect")
    return dataclasses.replace(opts, logprobs_top_k=min(opts.logprobs_top_k, LOGPROBS_TOP_K_MAX))


def read_prompt(opts: CliOptions) -> str | None:
    """The one-shot prompt text (a file is read whole, no trimming); None for the REPL."""
    if opts.prompt_file is None:
        return opts.prompt
    try:
        return Path(opts.prompt_file).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        raise UsageError(f"{PROG}: failed to open prompt file: {opts.prompt_file}") from None


def missing_model_message(path: str) -> str:
    return (
        f"{PROG}: model file not found: {path}\n"
        f"{PROG}: download a published DeepSeek V4 Flash GGUF from the Hugging Face repository "
        f"{HF_REPO} (e.g. the q2 file, about 81 GB),\n"
        f"{PROG}: save it as {DEFAULT_MODEL} in the working directory or pass its path with -m FILE"
    )


def sampling_params(opts: CliOptions):
    from dwarfstar.engine.sampling import SamplingParams

    return SamplingParams(
        temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, min_p=opts.min_p, seed=opts.seed or 0
    )


def main(argv: list[str] | None = None, load_engine=None) -> int:
    """Entry point of `ds4`; `load_engine(opts)` is replaceable for tests."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(argv)
        prompt = read_prompt(opts)
        if opts.dump_tokens:
            return dump_tokens(opts, prompt)
        if not Path(opts.model).is_file():
            print(missing_model_message(opts.model), file=sys.stderr)
            return 1
        held = lock.acquire(PROG)
    except HelpRequested:
        sys.stdout.write(USAGE)
        return 0
    except UsageError as e:
        print(e, file=sys.stderr)
        if str(e).startswith(f"{PROG}: unknown option"):
            sys.stderr.write(USAGE)
        return e.exit_code
    except lock.LockHeld as e:
        print(e, file=sys.stderr)
        return e.exit_code
    try:
        return run(opts, prompt, load_engine or load)
    finally:
        held.close()


def run(opts: CliOptions, prompt: str | None, load_engine) -> int:
    try:
        engine = load_engine(opts)
    except Exception as e:  # any load failure is one line for the user, exit 1
        print(f"{PROG}: failed to load {opts.model}: {e}", file=sys.stderr)
        return 1
    if opts.inspect:
        return inspect(engine, opts)
    warning = cliprompt.think_max_warning(opts.mode, opts.ctx)
    if warning:
        print(warning, file=sys.stderr)
    if prompt is None:
        return interactive(engine, opts)
    mode = cliprompt.effective_mode(opts.mode, opts.ctx)
    ids = cliprompt.oneshot_tokens(engine.tokenizer, prompt, opts.system, mode)
    if opts.dump_logprobs is not None:
        return dump_logprobs(engine, opts, ids)
    session = None
    if opts.load_session:
        loaded = load_session(engine, opts)
        if loaded is None:
            return 1
        session, transcript = loaded
        if not cliprompt.is_rendered(prompt):
            ids = transcript + cliprompt.turn_tokens(engine.tokenizer, prompt, mode)
    # Reasoning formatting follows the prompt's last token, so a rendered chat ending
    # in `</think>` prints raw text whatever the mode flags say.
    is_thinking = bool(ids) and ids[-1] == engine.tokenizer.id_of(shape.THINK_OPEN)
    return oneshot(engine, opts, ids, is_thinking, session)


def interactive(engine, opts: CliOptions) -> int:
    from dwarfstar.repl import Chat, run_repl

    chat = Chat(engine, opts, sampling_params(opts))
    if opts.load_session and not chat.load(opts.load_session):
        return 1
    code = run_repl(chat)
    if opts.save_session and not chat.save(opts.save_session):
        return code or 1
    return code


def load_session(engine, opts: CliOptions):
    """(session, transcript) of --load-session, or None (message printed)."""
    from dwarfstar.engine.diskcache_session import SessionFileError
    from dwarfstar.repl import SessionFiles

    files = SessionFiles(engine)
    try:
        checkpoint = files.read(opts.load_session, opts.ctx)
        return files.restore(checkpoint, opts.load_session, opts.ctx)
    except SessionFileError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return None


def save_session(engine, opts: CliOptions, session) -> int:
    from dwarfstar.repl import SessionFiles

    try:
        size = SessionFiles(engine).save(session, opts.save_session, opts.ctx)
    except OSError as e:
        print(f"{PROG}: failed to save the session to {opts.save_session}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{PROG}: session saved to {opts.save_session} ({len(session.tokens)} tokens, {size} bytes)",
          file=sys.stderr)
    return 0


def load(opts: CliOptions):
    """Open the engine for `opts` (the default `load_engine`)."""
    import torch

    from dwarfstar.engine.engine import Engine, EngineOptions

    backend = opts.backend or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_backend = "reference" if backend == "cpu" else backend
    options = EngineOptions(backend=engine_backend, ctx=opts.ctx, numerics=opts.numerics, threads=opts.threads or 0,
                            warmup=opts.warmup)
    return with_progress(f"loading {opts.model}", lambda: Engine.load(opts.model, options))


def with_progress(desc: str, fn):
    """Run `fn()` while a tqdm bar shows elapsed time on a TTY stderr (loading has no
    progress hook, so the bar counts seconds); returns fn's result or raises its error."""
    if not sys.stderr.isatty():
        return fn()
    import threading

    from tqdm import tqdm

    result: dict = {}

    def work():
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    with tqdm(desc=desc, file=sys.stderr, unit="s", leave=False, bar_format="{desc}: {elapsed}") as bar:
        while worker.is_alive():
            worker.join(timeout=0.25)
            bar.refresh()
    if "error" in result:
        raise result["error"]
    return result["value"]


def dump_tokens(opts: CliOptions, prompt: str) -> int:
    """--dump-tokens: only the vocabulary is read; the text is tokenized exactly as written."""
    from dwarfstar.gguf.reader import GGUFFile
    from dwarfstar.text.tokenizer import Tokenizer

    if not Path(opts.model).is_file():
        print(missing_model_message(opts.model), file=sys.stderr)
        return 1
    try:
        metadata = GGUFFile(opts.model).metadata
        tokenizer = Tokenizer.from_metadata(metadata)
    except Exception as e:
        print(f"{PROG}: failed to read the vocabulary of {opts.model}: {e}", file=sys.stderr)
        return 1
    ids = tokenizer.encode(prompt)
    sys.stdout.write(format_token_dump(ids, list(metadata["tokenizer.ggml.tokens"])))
    return 0


def inspect(engine, opts: CliOptions) -> int:
    print(f"model: {opts.model}")
    for field in dataclasses.fields(engine.config):
        print(f"{field.name}: {getattr(engine.config, field.name)}")
    return 0


def _prefill(engine, opts: CliOptions, ids: list[int], session=None):
    """`session` (a new one if None) holding `ids`, with progress on stderr for the
    tokens it lacked; None (message printed) if too long or the engine fails."""
    if len(ids) >= opts.ctx:
        print(f"{PROG}: prompt processing failed: prompt exceeds context", file=sys.stderr)
        return None
    if session is None:
        session = engine.new_session(ctx=opts.ctx)
    held = session.tokens
    cached = len(held) if ids[:len(held)] == held else 0
    progress = PrefillProgress(len(ids) - cached, base=cached)
    try:
        session.sync(ids, progress=progress)
    except Exception as e:  # engine errors are one line for the user
        print(f"{PROG}: prompt processing failed: {e}", file=sys.stderr)
        return None
    finally:
        progress.close()
    return session


def oneshot(engine, opts: CliOptions, ids: list[int], is_thinking: bool, session=None) -> int:
    """Generate one answer to stdout, flushed per token (cli.md §2.4); `session` is a
    loaded one whose tokens may be a prefix of `ids`."""
    # One-shot Ctrl+C ends the process like ds4's default signal handling: no traceback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    held = session.tokens if session is not None else []
    n_new = len(ids) - (len(held) if ids[:len(held)] == held else 0)
    t0 = time.perf_counter()
    session = _prefill(engine, opts, ids, session)
    if session is None:
        return 1
    t1 = time.perf_counter()
    tok = engine.tokenizer
    printer = AnswerPrinter(sys.stdout, is_thinking=is_thinking, use_color=sys.stdout.isatty())
    decoder = tok.stream_decoder()
    budget = token_budget(opts.n_tokens, opts.ctx, len(ids))
    n_gen, rc = 0, 0
    try:
        for token in generate(session, Picker(sampling_params(opts)), budget, tok.eos_id):
            printer.write(decoder.push(token))
            n_gen += 1
    except Exception as e:
        print(f"{PROG}: decode failed: {e}", file=sys.stderr)
        rc = 1
    printer.write(decoder.flush())
    printer.finish()
    if rc:
        return rc
    t2 = time.perf_counter()
    prefill_tps = n_new / (t1 - t0) if t1 > t0 else 0.0
    gen_tps = n_gen / (t2 - t1) if t2 > t1 else 0.0
    print(f"{PROG}: prefill: {prefill_tps:.2f} t/s, generation: {gen_tps:.2f} t/s", file=sys.stderr)
    return save_session(engine, opts, session) if opts.save_session else 0


def dump_logprobs(engine, opts: CliOptions, ids: list[int]) -> int:
    """Greedy continuation with top-k alternatives as JSON; prints no text (cli.md §2.6)."""
    session = _prefill(engine, opts, ids)
    if session is None:
        return 1
    tok = engine.tokenizer
    try:
        out = open(opts.dump_logprobs, "wb")
    except OSError:
        print(f"{PROG}: failed to open --dump-logprobs file: {opts.dump_logprobs}", file=sys.stderr)
        return 1
    with out:
        writer = LogprobWriter(out, tok.token_bytes, len(ids), opts.ctx, opts.logprobs_top_k)
        for _ in range(token_budget(opts.n_tokens, opts.ctx, len(ids))):
            logits = session.logits()
            token = int(logits.argmax())
            writer.step(token, logits)
            # Unlike generation, the EOS step is written; then the dump stops.
            if token == tok.eos_id:
                break
            session.eval(token)
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
