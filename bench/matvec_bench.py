"""Mat-vec kernels at DeepSeek V4 Flash shapes: µs, GB/s, % of measured streaming read bandwidth.

Method (docs/PERF.md): random valid blocks, repacked on the GPU; R launches captured in one
CUDA graph (decode runs as graphs), cycling over enough weight copies (dense) or expert-id
sets (routed) that the weights come from HBM, not the 50-60 MB L2; time = median replay / R.
Bytes per launch = planar weight bytes read (selected experts only) + x + y.
A small tiling sweep per case picks the best (block_n, block_k, num_warps).
The per-token projection sums every mat-vec of one q2 decode step at B = 1 (kernels.md §1)
using each case's measured GB/s for weights of the same format and kind.

Usage: python3 bench/matvec_bench.py [--quick]   (human table, then one JSON line)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess

import torch
from gguf import GGMLQuantizationType as T

import bandwidth
from dwarfstar.kernels.matvec import expert_matvec, matvec
from dwarfstar.kernels.repack import planar_nbytes, repack
from dwarfstar.kernels.synth import random_raw

L2_FLUSH_BYTES = 512 << 20
LAUNCHES_PER_GRAPH = 24
N_EXPERTS, TOP_K = 256, 6

# name, type, N, K, B (columns), routed (weight [256, N, K], 6 ids per column)
CASES = [
    ("q_a", T.Q8_0, 1024, 4096, 1, False),
    ("kv", T.Q8_0, 512, 4096, 1, False),
    ("q_b", T.Q8_0, 32768, 1024, 1, False),
    ("out_a", T.Q8_0, 8192, 4096, 1, False),
    ("out_b", T.Q8_0, 4096, 8192, 1, False),
    ("shexp_gate", T.Q8_0, 2048, 4096, 1, False),
    ("shexp_down", T.Q8_0, 4096, 2048, 1, False),
    ("head", T.Q8_0, 129280, 4096, 1, False),
    ("q_b B=8", T.Q8_0, 32768, 1024, 8, False),
    ("out_b B=4", T.Q8_0, 4096, 8192, 4, False),
    ("compressor_kv", T.F16, 1024, 4096, 1, False),
    ("indexer_q_b", T.F16, 8192, 1024, 1, False),
    ("router", T.F16, 256, 4096, 1, False),
    ("hc_fn", T.F16, 24, 16384, 1, False),
    ("exp_gate iq2", T.IQ2_XXS, 2048, 4096, 1, True),
    ("exp_down q2k", T.Q2_K, 4096, 2048, 1, True),
    ("exp_gate q4k", T.Q4_K, 2048, 4096, 1, True),
    ("exp_down q4k", T.Q4_K, 4096, 2048, 1, True),
]

SWEEP_B1 = [(bn, bk, nw) for bn in (2, 4, 8) for bk in (512, 1024, 2048) for nw in (4, 8)]
# --wide: the decode step's dense B = 1 shapes as production runs them (merged weights of
# forward.SHARED_INPUT included) over a wider tiling grid.
WIDE_CASES = [
    ("q_a+kv", T.Q8_0, 1536, 4096, 1, False),
    ("q_b", T.Q8_0, 32768, 1024, 1, False),
    ("out_a (8 x 1024 rows)", T.Q8_0, 8192, 4096, 1, False),
    ("out_b", T.Q8_0, 4096, 8192, 1, False),
    ("shexp gate+up", T.Q8_0, 4096, 4096, 1, False),
    ("shexp_down", T.Q8_0, 4096, 2048, 1, False),
    ("compressors r4", T.F16, 2624, 4096, 1, False),
    ("indexer_q_b", T.F16, 8192, 1024, 1, False),
]
SWEEP_WIDE = [(bn, bk, nw) for bn in (2, 4, 8, 16, 32) for bk in (256, 512, 1024, 2048) for nw in (2, 4, 8)]
SWEEP_BN = [(bn, bk, nw) for bn in (2, 4, 8) for bk in (256, 512, 1024) for nw in (4, 8)]


def build(case, gen):
    """(list of launch closures over rotated weights, bytes moved per launch)."""
    name, ggml_type, n, k, b, routed = case
    if routed:
        shape = (N_EXPERTS, n, k)
        w = repack(random_raw(ggml_type, shape, gen), ggml_type, shape)
        per_expert = planar_nbytes(w) // N_EXPERTS
        id_sets = [torch.randperm(N_EXPERTS, generator=gen, device="cuda")[:TOP_K].int() for _ in range(16)]
        x = torch.randn(TOP_K, k, generator=gen, device="cuda")
        y = torch.empty(TOP_K, n, device="cuda")
        calls = [lambda ids=ids, **t: expert_matvec(w, ids, x, out=y, **t) for ids in id_sets]
        return calls, TOP_K * (per_expert + 4 * (k + n))
    w0 = repack(random_raw(ggml_type, (n, k), gen), ggml_type, (n, k))
    copies = [w0] + [repack(random_raw(ggml_type, (n, k), gen), ggml_type, (n, k))
                     for _ in range(min(31, math.ceil(L2_FLUSH_BYTES / planar_nbytes(w0))) - 1)]
    x = torch.randn(b, k, generator=gen, device="cuda")
    y = torch.empty(b, n, device="cuda")
    calls = [lambda w=w, **t: matvec(w, x, out=y, **t) for w in copies]
    return calls, planar_nbytes(w0) + 4 * b * (k + n)


def time_graph(calls, tiling) -> float:
    """µs per launch: median replay time of a graph of LAUNCHES_PER_GRAPH rotated launches."""
    tiling = dict(zip(("block_n", "block_k", "num_warps"), tiling))
    for c in calls:
        c(**tiling)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAUNCHES_PER_GRAPH):
            calls[i % len(calls)](**tiling)
    ms = bandwidth.median_ms(graph.replay, rep=100)
    return 1000 * ms / LAUNCHES_PER_GRAPH


def run_case(case, gen, read_gbps, quick, sweep=None):
    calls, n_bytes = build(case, gen)
    sweep = sweep or ([(None, 256, 4)] if quick else (SWEEP_B1 if case[4] == 1 else SWEEP_BN))
    timed = [(time_graph(calls, t), t) for t in sweep]
    us, best = min(timed, key=lambda r: r[0])
    if sweep is SWEEP_WIDE:
        from dwarfstar.kernels import matvec as mv
        from dwarfstar.kernels.repack import PlanarF16, PlanarQ8_0

        kind = PlanarQ8_0 if case[1] == T.Q8_0 else PlanarF16
        prod = mv._b1_tiling(kind.__new__(kind), case[2], case[3])
        prod_us = time_graph(calls, prod)
        print(f"  {case[0]}: production tiling {prod} {prod_us:.2f} us, best {best} {us:.2f} us", flush=True)
    gbps = n_bytes / us / 1e3
    return {"name": case[0], "type": case[1].name, "N": case[2], "K": case[3], "B": case[4],
            "routed": case[5], "bytes": n_bytes, "us": us, "gbps": gbps,
            "pct_read": 100 * gbps / read_gbps, "best": best}


def decode_matrices():
    """(type, N, K, count) of every weight mat-vec in one q2 decode step at B = 1 (gguf.md §3)."""
    layers, ratio4, ratio128 = 43, 21, 20
    q8 = [((1024, 4096), 1), ((512, 4096), 1), ((32768, 1024), 1), ((8192, 4096), 1),
          ((4096, 8192), 1), ((2048, 4096), 2), ((4096, 2048), 1)]
    rows = [(T.Q8_0, n, k, c * layers, False) for (n, k), c in q8]
    rows += [(T.Q8_0, 129280, 4096, 1, False), (T.F16, 4, 16384, 1, False)]
    rows += [(T.F16, 24, 16384, 2 * layers, False), (T.F16, 256, 4096, layers, False),
             (T.F16, 1024, 4096, 2 * ratio4, False), (T.F16, 512, 4096, 2 * ratio128, False),
             (T.F16, 8192, 1024, ratio4, False), (T.F16, 64, 4096, ratio4, False),
             (T.F16, 256, 4096, 2 * ratio4, False)]
    rows += [(T.IQ2_XXS, 2048, 4096, 2 * TOP_K * layers, True), (T.Q2_K, 4096, 2048, TOP_K * layers, True)]
    return rows


def weight_bytes(ggml_type, n, k) -> int:
    per_block = {T.Q8_0: (32, 34), T.F16: (1, 2), T.IQ2_XXS: (256, 66), T.Q2_K: (256, 84)}[ggml_type]
    return n * k // per_block[0] * per_block[1]


def projection(results) -> dict:
    """Bytes and projected time of all mat-vecs of one decode step, from measured rates."""
    total_bytes, total_us = 0, 0.0
    for ggml_type, n, k, count, routed in decode_matrices():
        n_bytes = weight_bytes(ggml_type, n, k) * count
        same = [r for r in results if r["type"] == ggml_type.name and r["routed"] == routed and r["B"] == 1]
        exact = [r for r in same if (r["N"], r["K"]) == (n, k)]
        rate = (exact or same)[0]["gbps"] if (exact or same) else float("nan")
        total_bytes += n_bytes
        total_us += n_bytes / rate / 1e3
    return {"bytes_per_token": total_bytes, "matvec_us_per_token": total_us,
            "matvec_tok_per_s": 1e6 / total_us}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="default tiling only, no sweep")
    parser.add_argument("--wide", action="store_true", help="production dense shapes, wide tiling grid")
    args = parser.parse_args()
    ceilings = bandwidth.measure()
    gen = torch.Generator(device="cuda").manual_seed(1)
    results = []
    for case in (WIDE_CASES if args.wide else CASES):
        results.append(run_case(case, gen, ceilings["read_gbps"], args.quick, SWEEP_WIDE if args.wide else None))
        r = results[-1]
        print(f"{r['name']:<16}{r['type']:<8}{r['N']:>7}x{r['K']:<6}B={r['B']} {r['bytes'] / 1e6:9.2f} MB "
              f"{r['us']:9.2f} us {r['gbps']:8.0f} GB/s {r['pct_read']:5.1f}%  best={r['best']}", flush=True)
    proj = projection(results)
    print(f"device {ceilings['device']}: copy {ceilings['copy_gbps']:.0f} GB/s, read {ceilings['read_gbps']:.0f} GB/s")
    print(f"q2 B=1 decode mat-vecs: {proj['bytes_per_token'] / 1e9:.2f} GB/token, "
          f"{proj['matvec_us_per_token'] / 1e3:.2f} ms/token at measured rates "
          f"(roofline {proj['bytes_per_token'] / ceilings['read_gbps'] / 1e6:.2f} ms)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"commit": commit, "ceilings": ceilings, "projection": proj, "cases": results}))


if __name__ == "__main__":
    main()
