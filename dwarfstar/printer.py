"""Terminal output of the `ds4` CLI: the answer printer and the prefill progress (cli.md §2.4).

Contract:
- `AnswerPrinter.write(text)` prints generated text as it arrives. With thinking on,
  the `<think>`/`</think>` tags are not printed, text inside the reasoning is wrapped
  in dim grey (`ESC[90m` … `ESC[0m`) only when `use_color` (stdout is a TTY), and a
  newline follows the reasoning if it did not end with one. A tag split across writes
  is held back until it is complete or proven not to be a tag. `finish()` flushes
  what is held, closes the colour and guarantees the output ends with a newline.
- Without thinking, text is printed raw (tags included).
- `PrefillProgress` reports prefill as `processing N input tokens: a/N (p%)`: a tqdm
  bar on a TTY, one plain line per report otherwise (log files stay readable).
"""

from __future__ import annotations

import sys
from typing import TextIO

from dwarfstar import shape

GREY = "\x1b[90m"
RESET = "\x1b[0m"
_TAGS = (shape.THINK_OPEN, shape.THINK_CLOSE)


class AnswerPrinter:
    """Streams one answer to `out`; one instance per answer."""

    def __init__(self, out: TextIO, is_thinking: bool, use_color: bool):
        self.out = out
        self.is_thinking = is_thinking
        self.in_think = is_thinking
        self.use_color = use_color
        self.has_color_open = False
        self.ends_with_newline = True
        self.pending = ""

    def write(self, text: str) -> None:
        if not self.is_thinking:
            self._emit_raw(text)
        else:
            self._process(self.pending + text, is_final=False)
        self.out.flush()

    def finish(self) -> None:
        if self.is_thinking:
            self._process(self.pending, is_final=True)
            self._close_color()
        if not self.ends_with_newline:
            self.out.write("\n")
            self.ends_with_newline = True
        self.out.flush()

    def _emit_raw(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.ends_with_newline = text.endswith("\n")

    def _process(self, buf: str, is_final: bool) -> None:
        self.pending = ""
        i = 0
        while i < len(buf):
            rest = buf[i:]
            if rest.startswith(shape.THINK_OPEN):
                self.in_think = True
                i += len(shape.THINK_OPEN)
            elif rest.startswith(shape.THINK_CLOSE):
                self._end_reasoning()
                i += len(shape.THINK_CLOSE)
            elif not is_final and any(tag.startswith(rest) for tag in _TAGS):
                # A possible tag cut by a token boundary: wait for more text.
                self.pending = rest
                return
            else:
                # Copy up to the next '<' in one write; only '<' can start a tag.
                j = buf.find("<", i + 1)
                j = len(buf) if j < 0 else j
                self._emit_text(buf[i:j])
                i = j

    def _emit_text(self, text: str) -> None:
        if self.in_think and self.use_color and not self.has_color_open:
            self.out.write(GREY)
            self.has_color_open = True
        self._emit_raw(text)

    def _end_reasoning(self) -> None:
        self.in_think = False
        self._close_color()
        if not self.ends_with_newline:
            self.out.write("\n")
            self.ends_with_newline = True

    def _close_color(self) -> None:
        if self.has_color_open:
            self.out.write(RESET)
            self.has_color_open = False


class PrefillProgress:
    """Callback for `session.sync(progress=...)`: reports `done` of `total` new tokens.

    `base` is the number of tokens the session already held, so the numbers shown
    count only the newly prefilled suffix (cli.md §2.7).
    """

    def __init__(self, n_input: int, base: int = 0, err: TextIO | None = None, is_tty: bool | None = None):
        self.n_input = n_input
        self.base = base
        self.err = err or sys.stderr
        self.is_tty = self.err.isatty() if is_tty is None else is_tty
        self.bar = None
        self.last = -1

    def __call__(self, done: int, total: int | None = None) -> None:
        if self.n_input <= 0:
            return
        done = min(max(done - self.base, 0), self.n_input)
        if done == self.last:
            return
        self.last = done
        if self.is_tty:
            self._tqdm_update(done)
        else:
            pct = 100.0 * done / self.n_input
            self.err.write(f"processing {self.n_input} input tokens: {done}/{self.n_input} ({pct:.1f}%)\n")
            self.err.flush()

    def _tqdm_update(self, done: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            desc = f"processing {self.n_input} input tokens"
            self.bar = tqdm(total=self.n_input, desc=desc, file=self.err, unit="tok", leave=False)
        self.bar.update(done - self.bar.n)
        if done >= self.n_input:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
