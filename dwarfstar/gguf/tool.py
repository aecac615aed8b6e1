"""`ds4-gguf`: report on a GGUF file (`info`) or write a synthetic test model (`synth`).

Contract (cli.md §5):
- `info FILE [--main MAIN]` prints the header, every metadata key (long arrays and strings
  shortened), one line per tensor, totals per type, and the validation verdict of
  gguf.md §5.2 (for a main model also: synthetic or not, Flash profile, routed types per
  layer). An MTP file is checked against the config of `--main`, else against Flash.
  Exit 0 if the file would load, 1 if it would be refused or cannot be read, 2 on usage errors.
- `synth ...` delegates to `dwarfstar.gguf.synth` (imported only for that subcommand).
- Every failure is one line `ds4-gguf: ...` on stderr and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence, TextIO

from gguf import GGUFValueType as V

from dwarfstar import shape
from dwarfstar.gguf.reader import GGUFError, GGUFFile
from dwarfstar.gguf import validate as validation

PROG = "ds4-gguf"
# How much of a long value `info` shows.
MAX_ARRAY_ITEMS = 8
MAX_STRING_CHARS = 120


class _Parser(argparse.ArgumentParser):
    """argparse with cli.md §1.2 error lines: '<prog>: message', usage to stderr, exit 2."""

    def error(self, message: str) -> None:
        message = message.replace("unrecognized arguments:", "unknown option:")
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: {message}\n")


def _parser(with_synth: bool) -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Inspect or generate ds4-layout GGUF files.")
    sub = parser.add_subparsers(dest="command", metavar="{info,synth}", parser_class=_Parser)
    info = sub.add_parser("info", help="print header, metadata, tensors and the validation verdict")
    info.add_argument("file", help="GGUF file")
    info.add_argument("--main", default=None, help="main model GGUF whose dims an MTP file is checked against")
    synth = sub.add_parser("synth", help="write a synthetic ds4-layout GGUF (random weights)")
    if with_synth:
        from dwarfstar.gguf import synth as synth_module
        synth_module.add_arguments(synth)
    return parser


# ---- info ---------------------------------------------------------------------------
def _type_label(vtype: V, etype: V | None, value: Any) -> str:
    if vtype == V.ARRAY:
        return f"{etype.name if etype is not None else '?'}[{len(value)}]"
    return vtype.name


def _show(value: Any) -> str:
    if isinstance(value, list):
        items = ", ".join(_show(v) for v in value[:MAX_ARRAY_ITEMS])
        more = f", ... ({len(value)} items)" if len(value) > MAX_ARRAY_ITEMS else ""
        return f"[{items}{more}]"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= MAX_STRING_CHARS else f"{text[:MAX_STRING_CHARS]}... ({len(value)} chars)"
    return repr(value)


def print_header_and_metadata(f: GGUFFile, out: TextIO) -> None:
    print(f"file: {f.path}", file=out)
    print(f"GGUF v{f.version}, alignment {f.alignment}, {len(f.metadata)} keys, {len(f.tensors)} tensors, "
          f"data at byte {f.data_start:,}, file size {f.size:,} bytes", file=out)
    print("\nmetadata:", file=out)
    width = max((len(k) for k in f.metadata), default=0)
    for key, value in f.metadata.items():
        label = _type_label(*f.metadata_types[key], value)
        print(f"  {key:<{width}}  {label:<14} {_show(value)}", file=out)


def print_tensors(f: GGUFFile, summary: validation.Summary, out: TextIO) -> None:
    print("\ntensors (name, ne in GGUF order, type, bytes):", file=out)
    width = max((len(n) for n in f.tensors), default=0)
    for name, info in f.tensors.items():
        print(f"  {name:<{width}}  {str(list(info.ne)):<22} {info.ggml_type.name:<8} {info.n_bytes:>16,}", file=out)
    print("\ntotals by type:", file=out)
    for type_name, (count, n_bytes) in sorted(summary.by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"  {type_name:<8} {count:>6} tensors {n_bytes:>18,} bytes", file=out)
    print(f"  {'total':<8} {summary.n_tensors:>6} tensors {summary.total_bytes:>18,} bytes "
          f"({summary.total_bytes / 2**30:.2f} GiB)", file=out)


def _flash_profile(f: GGUFFile) -> str:
    try:
        diffs = shape.flash_differences(validation.config_of(f))
    except GGUFError as e:
        return f"not applicable ({e})"
    return "pass" if not diffs else f"fail: {diffs[0]}"


def _verdict(f: GGUFFile, main_path: str | None) -> tuple[bool, list[str]]:
    """(accepted, report lines) for a main model or an MTP file."""
    arch = f.metadata.get(validation.ARCH_KEY)
    try:
        if arch == shape.MTP_ARCH:
            if main_path is None:
                against, config = "DeepSeek V4 Flash dims (no --main given)", shape.FLASH
            else:
                with GGUFFile(main_path) as main:
                    against, config = f"the main model {main_path}", validation.validate(main)
            validation.validate_mtp(f, config)
            return True, [f"validation: accepted (MTP file, checked against {against})"]
        validation.validate(f)
        lines = ["validation: accepted"]
    except GGUFError as e:
        lines = [f"validation: refused: {e}"]
        if arch == shape.MTP_ARCH:
            return False, lines
    lines.append(f"synthetic: {'yes' if validation.is_synthetic(f) else 'no'}")
    lines.append(f"flash_profile: {_flash_profile(f)}")
    return lines[0] == "validation: accepted", lines


def _routed_lines(summary: validation.Summary) -> list[str]:
    if not summary.routed_types:
        return []
    lines = ["routed expert types (gate/up/down) per layer:"]
    for prefix, types in summary.routed_types.items():
        lines.append(f"  {prefix.rstrip('.'):<8} {'/'.join(types):<24} {validation.routed_label(types)}")
    return lines


def run_info(path: str, main_path: str | None, out: TextIO | None = None) -> int:
    """Print the info report; 0 accepted, 1 refused or unreadable."""
    out = out if out is not None else sys.stdout
    try:
        f = GGUFFile(path)
    except GGUFError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    with f:
        summary = validation.summary(f)
        print_header_and_metadata(f, out)
        print_tensors(f, summary, out)
        accepted, lines = _verdict(f, main_path)
        print("", *lines, *_routed_lines(summary), sep="\n", file=out)
    if not accepted:
        print(f"{PROG}: {path}: {lines[0].removeprefix('validation: ')}", file=sys.stderr)
    return 0 if accepted else 1


# ---- entry point ----------------------------------------------------------------------
def _dispatch(argv: list[str]) -> int:
    parser = _parser(with_synth=bool(argv) and argv[0] == "synth")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: missing subcommand (info or synth)", file=sys.stderr)
        return 2
    if args.command == "info":
        return run_info(args.file, args.main)
    from dwarfstar.gguf import synth as synth_module
    return synth_module.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `ds4-gguf`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except SystemExit as e:
        # argparse exits for --help (0) and usage errors (2).
        return e.code if isinstance(e.code, int) else 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # last resort: the contract is one line, never a traceback
        print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
