"""A small left-to-right flag parser shared by `ds4`, `ds4-bench` and `ds4-server` (cli.md §1.2).

Contract:
- `parse(prog, argv, table, bench_style=False, usage="")` returns `{dest: value}` for
  every flag seen, in order, later flags overriding earlier ones. Flags taking a value
  consume the next argv element verbatim (no `--opt=value`, a value may start with `-`).
- Errors raise `UsageError(message, exit_code=2)` with ds4's wording:
  `<prog>: missing value for <opt>` (or the bench form `<opt> requires an argument`),
  `<prog>: invalid value for <opt>: <v>`, `<prog>: unknown option: <opt>`.
- `-h`/`--help` raises `HelpRequested`; the caller prints its usage to stdout, exit 0.
- With `usage=TEXT`, `HelpRequested` carries TEXT and the unknown-option message ends
  with a newline and TEXT (the server's form); without it both are bare.

Value kinds: "flag" (no value; stores `const`), "str", "int" (> 0), "int0" (>= 0),
"u64" (1 .. 2**64-1), "float" (finite, inside [lo, hi]), "choice" (one of `choices`).
Integers are decimal and must parse as a whole (no sign, no spaces, no underscores);
they are also at most `hi` (e.g. a port's 65535).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

# ds4 parses with strtol into an int32 (cli.md §1.2); larger values are invalid.
INT_MAX = 2**31 - 1
U64_MAX = 2**64 - 1
_DECIMAL = re.compile(r"[0-9]+")
# Plain decimal floats only: Python's float() would also take "1_0", " 1" and "nan".
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


class UsageError(Exception):
    """Bad command line; print `str(self)` to stderr and exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class HelpRequested(Exception):
    """-h/--help was given."""


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    dest: str
    kind: str = "flag"
    const: Any = True
    lo: float = -math.inf
    hi: float = math.inf
    choices: tuple[str, ...] = ()


def _convert(prog: str, flag: Flag, opt: str, text: str) -> Any:
    bad = UsageError(f"{prog}: invalid value for {opt}: {text}")
    if flag.kind == "str":
        return text
    if flag.kind == "choice":
        if text not in flag.choices:
            raise bad
        return text
    if flag.kind in ("int", "int0", "u64"):
        if not _DECIMAL.fullmatch(text):
            raise bad
        value = int(text)
        top = U64_MAX if flag.kind == "u64" else INT_MAX
        if value > min(top, flag.hi) or (value == 0 and flag.kind != "int0"):
            raise bad
        return value
    if flag.kind == "float":
        if not _FLOAT.fullmatch(text):
            raise bad
        value = float(text)
        if not math.isfinite(value) or not flag.lo <= value <= flag.hi:
            raise bad
        return value
    raise AssertionError(f"unknown flag kind {flag.kind}")


def parse(prog: str, argv: list[str], table: list[Flag], bench_style: bool = False,
          usage: str = "") -> dict[str, Any]:
    """Parse argv against the table; see the module docstring for the rules."""
    by_name = {name: flag for flag in table for name in flag.names}
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        opt = argv[i]
        if opt in ("-h", "--help"):
            raise HelpRequested(usage)
        flag = by_name.get(opt)
        if flag is None:
            raise UsageError(f"{prog}: unknown option: {opt}" + (f"\n{usage}" if usage else ""))
        if flag.kind == "flag":
            values[flag.dest] = flag.const
            i += 1
            continue
        if i + 1 >= len(argv):
            what = f"{opt} requires an argument" if bench_style else f"missing value for {opt}"
            raise UsageError(f"{prog}: {what}")
        values[flag.dest] = _convert(prog, flag, opt, argv[i + 1])
        i += 2
    return values
