"""Regenerate bench/data/stdlib_docstrings.txt, the long text `ds4-bench` walks.

Source: the docstrings of the Python standard library's own modules, read with `ast`
from the installed sources (nothing is imported or executed), in sorted file order:
module docstring, then each class and function docstring, headed by its qualified
name. English technical prose with code fragments, a realistic mix for a chat model.
Licence: Python Software Foundation License v2 (permissive; see bench/data/README.md).

    python3 bench/make_bench_text.py [--max-bytes N] [OUT]

The shipped file was made with CPython 3.11; other versions give different text.
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
from pathlib import Path

# Test suites, GUI and demo code carry few or odd docstrings; site-packages is not stdlib.
SKIP_PARTS = {
    "test", "tests", "idlelib", "tkinter", "turtledemo", "site-packages", "lib2to3", "__pycache__", "ensurepip",
}


def docstrings(path: Path, module: str) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    doc = ast.get_docstring(tree)
    if doc:
        out.append(f"Module {module}\n\n{doc}\n")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                out.append(f"{module}.{node.name}\n\n{doc}\n")
    return out


def build(max_bytes: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts) or rel.name.startswith("_"):
            continue
        module = ".".join(rel.with_suffix("").parts)
        for text in docstrings(path, module):
            if size + len(text) > max_bytes:
                return "\n".join(parts)
            parts.append(text)
            size += len(text) + 1
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).parent / "data" / "stdlib_docstrings.txt"))
    parser.add_argument("--max-bytes", type=int, default=600_000)
    args = parser.parse_args()
    text = build(args.max_bytes)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {len(text.encode())} bytes to {args.out} (Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
