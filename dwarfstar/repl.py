"""Interactive `ds4` chat: one token transcript, one live session (cli.md §2.7).

Contract (`Chat`):
- The transcript starts as BOS + [Think Max prefix if effective] + BPE(system). Each
  turn appends USER + BPE(text) + ASSISTANT + `<think>`|`</think>` (current mode),
  syncs the session (only the suffix beyond the live tokens is prefilled), appends
  every generated token (reasoning included, never dropped) and finally EOS, which is
  evaluated only as part of the next turn's suffix.
- A turn whose prompt cannot be processed (transcript >= ctx, engine error) is rolled
  back with an error message. Ctrl+C before the first generated token rolls the turn
  back and invalidates the session (the next turn re-prefills everything); after it,
  the partial answer is kept and closed with EOS.
- Inserting or removing the Think Max prefix shifts every position, so it invalidates
  the session; earlier turns' `<think>`/`</think>` tokens are never rewritten.
- `/ctx N` drops the session and makes a new one of N tokens (transcript kept).
Invalidating means dropping the session object; a new one is made on the next turn.

Session files (`/save FILE`, `/load FILE`, `ds4 --save-session/--load-session`) are
disk-cache checkpoints (engine/diskcache_session.py, server.md §10.3): the KV of the
transcript without its pending EOS, named by nothing but FILE, with the exact bytes
of those tokens as cache text. `/save` first syncs the session to that prefix (a
no-op right after a turn). `/load` refuses a corrupt file or one of another model
with one line and keeps the current state; otherwise it replaces the session and
the transcript: the file's tokens, plus the EOS that closes its last answer when
the tokens end inside an assistant turn (the KV of a finished turn stops before
its EOS, in the REPL as in the server, server.md §9.3), so the next turn prefills
only EOS + the new turn.

`run_repl(chat, ...)` is the line loop: commands, history in `~/.ds4_history` (512
entries, saved after every line), Ctrl+C ignored at the prompt, Ctrl+D exits.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

from dwarfstar import cliprompt, shape
from dwarfstar.engine import diskcache_session
from dwarfstar.engine.diskcache_session import SessionFileError
from dwarfstar.generate import Picker, StopFlag, generate, sigint_stops, token_budget
from dwarfstar.printer import AnswerPrinter, PrefillProgress

HELP = """Commands:
  /help          Show this help.
  /think         Use normal thinking mode.
  /think-max     Use Think Max only when context is at least 393216 tokens.
  /nothink       Disable thinking mode.
  /ctx N         Set context size for following prompts.
  /read FILE     Read a prompt from FILE and run it.
  /save FILE     Save the session (KV cache and transcript) to FILE.
  /load FILE     Continue a session saved with /save or --save-session.
  /quit, /exit   Leave the prompt.
  Ctrl+C         Stop generation and return to the prompt.
"""
HISTORY_MAX = 512


class Interrupted(Exception):
    """Ctrl+C arrived while the prompt was being prefilled."""


class SessionFiles:
    """Session files of one engine. `identity` (model id, quant bits) is computed on
    first use from the GGUF unless given (tests with a fake engine give one)."""

    def __init__(self, engine, identity: diskcache_session.Identity | None = None):
        self.engine = engine
        self.tok = engine.tokenizer
        self._identity = identity

    @property
    def identity(self) -> diskcache_session.Identity:
        if self._identity is None:
            self._identity = diskcache_session.identity(self.engine)
        return self._identity

    def save(self, session, path: str, ctx: int) -> int:
        """Write `session` as it is; returns the file size (OSError propagates)."""
        text = b"".join(self.tok.token_bytes(t) for t in session.tokens)
        return diskcache_session.save(path, session, text, self.identity, ctx)

    def read(self, path: str, ctx: int) -> diskcache_session.Checkpoint:
        return diskcache_session.read(path, self.identity, ctx)

    def restore(self, checkpoint, path: str, ctx: int) -> tuple[object, list[int]]:
        """(a new session holding the checkpoint, the transcript it continues)."""
        session = self.engine.new_session(ctx=ctx)
        try:
            session.restore(checkpoint.snapshot)
        except Exception as e:  # the engine's own check of the snapshot
            raise SessionFileError(f"{path}: the engine refused its snapshot: {e}") from None
        tokens = list(session.tokens)
        if len(tokens) != checkpoint.header.n_tokens:
            raise SessionFileError(f"{path} is corrupt: it holds {len(tokens)} tokens, "
                                   f"its header says {checkpoint.header.n_tokens}")
        if not checkpoint.is_visible_key and b"".join(map(self.tok.token_bytes, tokens)) != checkpoint.text:
            raise SessionFileError(f"{path}: its text is not the bytes of its tokens (another vocabulary?)")
        return session, transcript_of(tokens, self.tok)


def kv_tokens(transcript: list[int], eos_id: int) -> list[int]:
    """The part of the transcript a session holds between turns: all but a final EOS."""
    return transcript[:-1] if transcript and transcript[-1] == eos_id else list(transcript)


def transcript_of(tokens: list[int], tok) -> list[int]:
    """The transcript a saved KV continues: + EOS when it ends inside an assistant turn."""
    user, assistant = tok.id_of(shape.USER), tok.id_of(shape.ASSISTANT)
    last_user = max((i for i, t in enumerate(tokens) if t == user), default=-1)
    last_assistant = max((i for i, t in enumerate(tokens) if t == assistant), default=-1)
    is_open = last_assistant > last_user and tokens[-1] != tok.eos_id
    return list(tokens) + ([tok.eos_id] if is_open else [])


class Chat:
    """The REPL's transcript and session; the engine is only touched through sessions."""

    def __init__(self, engine, opts, params, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.engine = engine
        self.tok = engine.tokenizer
        self.opts = opts
        self.params = params
        self.out, self.err = out, err
        self.mode = opts.mode
        self.ctx = opts.ctx
        self.stop = StopFlag()
        self.n_max_prefix = 0
        self.transcript = [self.tok.bos_id]
        self.apply_max_prefix(self.effective_mode() == "max")
        if opts.system:
            self.transcript += cliprompt.plain_bpe(self.tok, opts.system)
        self.session = None
        self.files = SessionFiles(engine)

    def effective_mode(self) -> str:
        return cliprompt.effective_mode(self.mode, self.ctx)

    def apply_max_prefix(self, is_enabled: bool) -> None:
        """Insert (after BOS) or remove the Think Max prefix; either invalidates the session."""
        if is_enabled and self.n_max_prefix == 0:
            prefix = cliprompt.max_prefix_tokens(self.tok)
            self.transcript[1:1] = prefix
            self.n_max_prefix = len(prefix)
            self.session = None
        elif not is_enabled and self.n_max_prefix > 0:
            del self.transcript[1 : 1 + self.n_max_prefix]
            self.n_max_prefix = 0
            self.session = None

    def set_mode(self, mode: str) -> str:
        """Switch thinking mode; returns the line to print."""
        self.mode = mode
        if mode != "max":
            self.apply_max_prefix(False)
            return f"Thinking mode: {mode}."
        is_active = self.effective_mode() == "max"
        self.apply_max_prefix(is_active)
        self._warn(cliprompt.think_max_warning(mode, self.ctx, "/think-max"))
        return "Thinking mode: max." if is_active else "Thinking mode: high (ctx below 393216)."

    def set_ctx(self, ctx: int) -> None:
        self.ctx = ctx
        self.session = None
        self.apply_max_prefix(self.effective_mode() == "max")
        self._warn(cliprompt.think_max_warning(self.mode, ctx, "/ctx"))

    def turn(self, text: str) -> int:
        """Run one user turn; returns the number of generated tokens."""
        mode = self.effective_mode()
        self.apply_max_prefix(mode == "max")
        rollback = len(self.transcript)
        self.transcript += cliprompt.turn_tokens(self.tok, text, mode)
        self.stop.clear()
        with sigint_stops(self.stop):
            t0 = time.perf_counter()
            n_new = self._prefill(rollback)
            if n_new is None:
                return 0
            t1 = time.perf_counter()
            n_gen = self._answer(mode)
            t2 = time.perf_counter()
        if self.stop.is_set() and n_gen == 0:
            del self.transcript[rollback:]
            self.session = None
        else:
            self.transcript.append(self.tok.eos_id)
        self.stop.clear()
        self.err.write(f"ds4: prefill: {_rate(n_new, t1 - t0):.2f} t/s, generation: {_rate(n_gen, t2 - t1):.2f} t/s\n")
        return n_gen

    def _prefill(self, rollback: int) -> int | None:
        """Sync the session to the transcript; None (turn rolled back) on failure or Ctrl+C."""
        try:
            return self._sync(self.transcript)
        except Interrupted:
            del self.transcript[rollback:]
            self.session = None
            self.out.write("\n")
        except Exception as e:  # the engine's own errors: report, keep the REPL alive
            del self.transcript[rollback:]
            self.err.write(f"ds4: prompt processing failed: {e}\n")
        self.stop.clear()
        return None

    def _sync(self, tokens: list[int]) -> int:
        """Make the session hold `tokens`, prefilling (with progress) only what it lacks;
        returns that count. Raises Interrupted on Ctrl+C, the engine's errors otherwise."""
        if len(tokens) >= self.ctx:
            raise ValueError("prompt exceeds context")
        if self.session is None:
            self.session = self.engine.new_session(ctx=self.ctx)
        live = list(self.session.tokens)
        cached = len(live) if tokens[: len(live)] == live else 0
        progress = PrefillProgress(len(tokens) - cached, base=cached, err=self.err)
        try:
            self.session.sync(list(tokens), progress=self._checked(progress))
        finally:
            progress.close()
        return len(tokens) - cached

    def save(self, path: str) -> bool:
        """Write the session at the transcript (minus its pending EOS) to `path`."""
        target = kv_tokens(self.transcript, self.tok.eos_id)
        self.stop.clear()
        try:
            with sigint_stops(self.stop):
                self._sync(target)
            size = self.files.save(self.session, path, self.ctx)
        except Interrupted:
            self.session = None
            self.err.write("\nds4: /save interrupted; nothing written\n")
            return False
        except OSError as e:
            self.err.write(f"ds4: failed to save the session to {path}: {e.strerror or e}\n")
            return False
        except Exception as e:  # engine errors while syncing: one line, the REPL goes on
            self.err.write(f"ds4: failed to save the session to {path}: {e}\n")
            return False
        finally:
            self.stop.clear()
        self.err.write(f"ds4: session saved to {path} ({len(target)} tokens, {size} bytes)\n")
        return True

    def load(self, path: str) -> bool:
        """Replace the session and transcript with a saved session; on a refused file
        both stay as they were (if only the engine refuses the snapshot, the transcript
        stays and the next turn re-prefills it)."""
        try:
            checkpoint = self.files.read(path, self.ctx)
            # The old KV goes first, so only one session's buffers exist at a time.
            self.session = None
            self.session, transcript = self.files.restore(checkpoint, path, self.ctx)
        except SessionFileError as e:
            self.err.write(f"ds4: {e}\n")
            return False
        self.transcript = transcript
        prefix = cliprompt.max_prefix_tokens(self.tok)
        self.n_max_prefix = len(prefix) if transcript[1 : 1 + len(prefix)] == prefix else 0
        self.err.write(f"ds4: session loaded from {path} ({len(self.session.tokens)} tokens)\n")
        return True

    def _checked(self, progress):
        def report(*args):
            if self.stop.is_set():
                raise Interrupted()
            progress(*args)

        return report

    def _answer(self, mode: str) -> int:
        """Stream the answer, appending each token to the transcript; returns the count."""
        printer = AnswerPrinter(self.out, is_thinking=mode != "none", use_color=_isatty(self.out))
        decoder = self.tok.stream_decoder()
        budget = token_budget(self.opts.n_tokens, self.ctx, len(self.session.tokens))
        start = len(self.transcript)
        try:
            for token in generate(self.session, Picker(self.params), budget, self.tok.eos_id, self.stop):
                self.transcript.append(token)
                printer.write(decoder.push(token))
        except Exception as e:  # keep what was generated; the REPL stays usable
            self.err.write(f"ds4: decode failed: {e}\n")
        printer.write(decoder.flush())
        printer.finish()
        return len(self.transcript) - start

    def _warn(self, line: str | None) -> None:
        if line:
            self.err.write(line + "\n")


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def handle_line(chat: Chat, line: str) -> int | None:
    """Run one input line; returns an exit code to leave the REPL, else None."""
    cmd = line.strip()
    if not cmd:
        return None
    word, arg = (cmd.split(maxsplit=1) + [""])[:2]
    if cmd in ("/quit", "/exit"):
        return 0
    if cmd == "/help":
        chat.out.write(HELP)
    elif cmd in ("/think", "/think-max", "/nothink"):
        mode = {"/think": "high", "/think-max": "max", "/nothink": "none"}[cmd]
        chat.out.write(chat.set_mode(mode) + "\n")
    elif word == "/ctx":
        return _ctx_command(chat, arg.strip())
    elif word == "/read":
        _read_command(chat, arg.strip())
    elif word in ("/save", "/load"):
        if not arg.strip():
            chat.err.write(f"ds4: {word} needs a file path\n")
        elif word == "/save":
            chat.save(arg.strip())
        else:
            chat.load(arg.strip())
    elif cmd.startswith("/"):
        chat.err.write(f"ds4: unknown command: {cmd}\nds4: type /help for commands\n")
    else:
        chat.turn(cmd)
    return None


def _ctx_command(chat: Chat, arg: str) -> int | None:
    if not arg:
        chat.err.write("ds4: /ctx needs a positive integer\n")
        return None
    if not arg.isascii() or not arg.isdigit() or not 0 < int(arg) < 2**31:
        # [QUIRK] ds4 exits on a bad /ctx value (its parse_int is the flag parser's).
        chat.err.write(f"ds4: invalid value for /ctx: {arg}\n")
        return 2
    chat.set_ctx(int(arg))
    return None


def _read_command(chat: Chat, path: str) -> None:
    if not path:
        chat.err.write("ds4: /read needs a file path\n")
        return
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        chat.err.write(f"ds4: failed to open prompt file: {path}\n")
        return
    chat.turn(text)


def _open_history():
    """GNU readline history (~/.ds4_history) if readline exists, else None."""
    try:
        import readline
    except ImportError:
        return None
    path = Path(os.environ.get("HOME") or ".") / ".ds4_history"
    readline.set_history_length(HISTORY_MAX)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    return lambda: _save_history(readline, path)


def _save_history(readline, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def run_repl(chat: Chat) -> int:
    """Read lines until /quit or EOF; returns the process exit code."""
    save_history = _open_history()
    chat.out.write(HELP)
    chat.out.flush()
    while True:
        try:
            line = input("ds4> ")
            if line.strip() and save_history:
                save_history()
            code = handle_line(chat, line)
        except KeyboardInterrupt:
            # Ctrl+C at the prompt (or between turns) is ignored, as in ds4.
            chat.out.write("\n")
            continue
        except EOFError:
            chat.out.write("\n")
            return 0
        chat.out.flush()
        if code is not None:
            return code
