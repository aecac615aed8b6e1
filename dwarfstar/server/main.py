"""`ds4-server` entry point (cli.md §3 startup sequence).

Contract: `main(argv=None) -> int` (also the console script). Bad flags exit 2,
a model that cannot be opened exits 1 with one line saying why (and, for a
missing file, where the published weights are), never a traceback. The
server listens until SIGINT/SIGTERM, then drains the worker and exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import uvicorn

from dwarfstar.server.app import create_app
from dwarfstar.server.convo import ToolMemory
from dwarfstar.server.options import PROG, HelpRequested, ServerOptions, UsageError, parse_args
from dwarfstar.server.prepare import Preparer
from dwarfstar.server.trace import Trace
from dwarfstar.server.worker import Worker

WEIGHTS_HINT = ("download ONE of the published DeepSeek V4 Flash GGUF files from "
                "https://huggingface.co/antirez/deepseek-v4-gguf (the q2 file is about 81 GB and needs a 141 GB GPU "
                "or that much RAM; `huggingface-cli download antirez/deepseek-v4-gguf FILE --local-dir .` fetches one "
                "file, without FILE it fetches them all), save it as ds4flash.gguf or pass it with -m FILE; "
                "or generate a tiny test model with `ds4-gguf synth --preset tiny tiny.gguf`")


class StartupError(Exception):
    """A startup failure: print the message, exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class _Server(uvicorn.Server):
    """uvicorn re-raises a caught SIGINT/SIGTERM after its own shutdown, which kills
    the process before the worker drains and writes the shutdown checkpoint
    (server.md §12, exit 0): forget the caught signals instead."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def _backend(options: ServerOptions) -> str:
    """Flag name -> EngineOptions backend. The reference path is the default until the
    CUDA engine lands; `--cuda` asks for it explicitly (the engine refuses if absent)."""
    return "cuda" if options.backend == "cuda" else "reference"


def check_model(options: ServerOptions) -> None:
    if not os.path.isfile(options.model):
        raise StartupError(f"{PROG}: model file not found: {options.model}\n{PROG}: {WEIGHTS_HINT}")


def load_engine(options: ServerOptions):
    """Open the model or raise StartupError with one clear line."""
    from dwarfstar.engine.engine import Engine, EngineOptions

    try:
        return Engine.load(options.model, EngineOptions(backend=_backend(options), ctx=options.ctx,
                                                        warmup=options.warmup))
    except Exception as err:  # any load failure is one line to the user, not a traceback
        raise StartupError(f"{PROG}: cannot open {options.model}: {err}") from None


def _lock():
    """The instance lock (cli.md §1.3), when the shared lock module is present."""
    try:
        from dwarfstar.lock import LockHeld, acquire
    except ImportError:
        return None
    try:
        return acquire(PROG)
    except LockHeld as err:
        raise StartupError(str(err), LockHeld.exit_code) from None


def serve(options: ServerOptions) -> int:
    if options.chdir:
        try:
            os.chdir(options.chdir)
        except OSError as err:
            raise StartupError(f"{PROG}: cannot chdir to {options.chdir}: {err.strerror}") from None
    check_model(options)
    lock = _lock()
    engine = load_engine(options)
    try:
        trace = Trace(options.trace)
    except OSError as err:
        raise StartupError(f"{PROG}: cannot open trace file {options.trace}: {err.strerror}") from None
    if not options.exact_dsml_replay:
        logging.info("exact DSML tool replay disabled: history tool calls use canonical rendering")
    memory = ToolMemory(options.tool_memory_max_ids, options.exact_dsml_replay)
    worker = Worker(engine, options, memory, trace)
    worker.start()
    app = create_app(options, Preparer(engine.tokenizer, options, memory, worker), worker)
    print(f"{PROG}: listening on http://{options.host}:{options.port}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_keep_alive=1, backlog=128)
    try:
        _Server(config).run()
    finally:
        worker.stop()
        trace.close()
        if lock is not None:
            lock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%m%d %H:%M:%S")
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
        return serve(options)
    except HelpRequested as help_text:
        print(help_text)
        return 0
    except (UsageError, StartupError) as err:
        print(err, file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
