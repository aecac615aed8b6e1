"""Plot a `ds4-bench` CSV: prefill and generation tokens/s against the context frontier.

    python3 bench/plot_bench.py bench.csv out.svg     # self-contained SVG, no dependencies
    python3 bench/plot_bench.py bench.csv out.png     # needs matplotlib

Several CSVs may be given before the output (one line per file, labelled by file
name), e.g. to compare devices or commits. The SVG writer is plain text so the plot
works on machines without matplotlib.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

PANELS = (("prefill_tps", "prefill tokens/s"), ("gen_tps", "generation tokens/s"))
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
W, H, PAD = 520, 320, 56


def read_rows(path: str | Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _panel_svg(series: dict[str, list[dict]], key: str, title: str, x0: int) -> list[str]:
    xs = [r["ctx_tokens"] for rows in series.values() for r in rows]
    ys = [r[key] for rows in series.values() for r in rows]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_hi = max(ys) * 1.1 or 1.0
    sx = lambda x: x0 + PAD + (x - x_lo) / (x_hi - x_lo) * (W - 2 * PAD)
    sy = lambda y: H - PAD - y / y_hi * (H - 2 * PAD)
    out = [
        f'<text x="{x0 + W / 2}" y="24" text-anchor="middle" font-size="15">{title}</text>',
        f'<line x1="{x0 + PAD}" y1="{H - PAD}" x2="{x0 + W - PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<line x1="{x0 + PAD}" y1="{PAD}" x2="{x0 + PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<text x="{x0 + W / 2}" y="{H - 14}" text-anchor="middle" font-size="12">context tokens</text>',
        f'<text x="{x0 + PAD - 6}" y="{PAD}" text-anchor="end" font-size="11">{y_hi:.0f}</text>',
        f'<text x="{x0 + PAD - 6}" y="{H - PAD}" text-anchor="end" font-size="11">0</text>',
        f'<text x="{x0 + PAD}" y="{H - PAD + 16}" text-anchor="middle" font-size="11">{x_lo:.0f}</text>',
        f'<text x="{x0 + W - PAD}" y="{H - PAD + 16}" text-anchor="middle" font-size="11">{x_hi:.0f}</text>',
    ]
    for i, (label, rows) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = " ".join(f"{sx(r['ctx_tokens']):.1f},{sy(r[key]):.1f}" for r in rows)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        out.append(f'<text x="{x0 + W - PAD}" y="{PAD + 14 * i}" text-anchor="end" font-size="11" '
                   f'fill="{color}">{label}</text>')
    return out


def write_svg(series: dict[str, list[dict]], out: str | Path) -> None:
    body = []
    for i, (key, title) in enumerate(PANELS):
        body += _panel_svg(series, key, title, i * W)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H}" font-family="sans-serif">\n'
           f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")
    Path(out).write_text(svg)


def write_png(series: dict[str, list[dict]], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        for label, rows in series.items():
            ax.plot([r["ctx_tokens"] for r in rows], [r[key] for r in rows], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("context tokens")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    *inputs, out = argv
    series = {Path(p).stem: read_rows(p) for p in inputs}
    if out.endswith(".png"):
        write_png(series, out)
    else:
        write_svg(series, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
