"""bench/plot_bench.py: a ds4-bench CSV becomes a well-formed SVG with one polyline per
file and panel, points ordered like the rows (x grows with ctx_tokens, y falls as
tokens/s rises)."""

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_plot():
    spec = importlib.util.spec_from_file_location("plot_bench", REPO / "bench" / "plot_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_svg_from_two_csvs(tmp_path):
    plot = load_plot()
    header = "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes\n"
    (tmp_path / "a.csv").write_text(header + "2048,2048,410.62,128,23.22,52184460\n4096,2048,389.21,128,23.19,80373132\n"
                                    "6144,2048,300.00,128,20.00,90000000\n")
    (tmp_path / "b.csv").write_text(header + "2048,2048,100.00,128,10.00,1\n6144,4096,90.00,128,9.00,2\n")
    out = tmp_path / "plot.svg"
    assert plot.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), str(out)]) == 0
    root = ET.parse(out).getroot()
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 4, "two panels x two files"
    points = [[tuple(map(float, p.split(","))) for p in line.get("points").split()] for line in lines]
    assert [len(p) for p in points] == [3, 2, 3, 2]
    prefill_a = points[0]
    assert prefill_a[0][0] < prefill_a[1][0] < prefill_a[2][0]
    assert prefill_a[0][1] < prefill_a[1][1] < prefill_a[2][1], "higher tokens/s is drawn higher (smaller y)"
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "prefill tokens/s" in texts and "generation tokens/s" in texts and "a" in texts and "b" in texts
