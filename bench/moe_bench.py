"""Routed-MoE decode kernels at DeepSeek V4 Flash shapes: µs, GB/s, % of streaming read.

Method (docs/PERF.md): 256 random valid experts per tensor, repacked on the GPU; R launches
captured in one CUDA graph, cycling over 16 random routing sets (K = 6 distinct experts per
token) so the selected weights come from HBM, not L2; time = median replay / R.
Bytes per launch = planar bytes of the distinct experts the routing selects (each read
once is the minimum) + activations in/out. A small (block_n, num_warps, num_stages) sweep per case. Each call
includes its activation-quantisation launch.
"layer" cases time gate/up + down back to back (one routed FFN of one layer).
--nvrtc-kernels times only q2 gate/up (B = 1, 2, 4) with the CUDA C kernel of kernels/moe_nvrtc.py
at ROWS_WARPS 4, 8, 16, on the same weights and routing sets: an A/B of its block sizes.

Usage: PYTHONPATH=.:bench python3 bench/moe_bench.py [--quick | --nvrtc-kernels]   (human table, then one JSON line)
"""

from __future__ import annotations

import argparse
import json
import subprocess

import torch
from gguf import GGMLQuantizationType as T

import bandwidth
from dwarfstar.kernels import moe_nvrtc
from dwarfstar.kernels.moe import moe_down, moe_gate_up
from dwarfstar.kernels.repack import planar_nbytes, repack
from dwarfstar.kernels.synth import random_raw

LAUNCHES_PER_GRAPH = 24
N_SETS = 16
N_EXPERTS, TOP_K, D, F = 256, 6, 4096, 2048
LIMIT, LAYERS = 10.0, 43
# quant name -> (gate/up type, down type)
QUANTS = {"q2": (T.IQ2_XXS, T.Q2_K), "q4": (T.Q4_K, T.Q4_K)}
CASES = [("q2", 1), ("q2", 2), ("q2", 4), ("q4", 1), ("q4", 4)]
NVRTC_TOKENS = (1, 2, 4)
NVRTC_ROWS_WARPS = (4, 8, 16)
SWEEP = [(bn, nw, ns) for bn in (4, 8, 16) for nw in (2, 4) for ns in (1, 2, 3)]
# The down kernel also splits each expert's inputs (partials summed after the launch).
DOWN_SWEEP = [(bn, nw, ns, sp) for bn in (8, 16, 32) for nw in (2, 4) for ns in (2, 3) for sp in (1, 2, 4)]


def tiling(t) -> dict:
    """Launcher keywords for a (block_n, num_warps, num_stages[, splits]) tuple; None = the default."""
    return {k: v for k, v in zip(("block_n", "num_warps", "num_stages", "splits"), t) if v is not None}


def weights(quant, gen):
    tg, td = QUANTS[quant]
    mk = lambda t, shape: repack(random_raw(t, shape, gen), t, shape)
    return mk(tg, (N_EXPERTS, F, D)), mk(tg, (N_EXPERTS, F, D)), mk(td, (N_EXPERTS, D, F))


def time_graph(calls) -> float:
    """µs per launch: median replay of a graph of LAUNCHES_PER_GRAPH launches over rotated sets."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAUNCHES_PER_GRAPH):
            calls[i % len(calls)]()
    return 1000 * bandwidth.median_ms(graph.replay, rep=100) / LAUNCHES_PER_GRAPH


def routing_sets(b, gen) -> tuple[list[torch.Tensor], float]:
    """N_SETS routings of b tokens (ids int32 [b, TOP_K]) and the mean number of distinct experts per set."""
    sets = [torch.stack([torch.randperm(N_EXPERTS, generator=gen, device="cuda")[:TOP_K]
                         for _ in range(b)]).int().contiguous() for _ in range(N_SETS)]
    return sets, sum(s.unique().numel() for s in sets) / N_SETS


def run_nvrtc_kernels(gen, read_gbps):
    """q2 gate/up at B = NVRTC_TOKENS with the moe_nvrtc kernel at each block size: same weights, sets
    and bytes per case."""
    tg = QUANTS["q2"][0]
    gate, up = (repack(random_raw(tg, (N_EXPERTS, F, D), gen), tg, (N_EXPERTS, F, D)) for _ in range(2))
    per_gu = (planar_nbytes(gate) + planar_nbytes(up)) // N_EXPERTS
    default_warps, rows = moe_nvrtc.ROWS_WARPS, []
    try:
        for b in NVRTC_TOKENS:
            sets, distinct = routing_sets(b, gen)
            wts = torch.rand(b, TOP_K, generator=gen, device="cuda")
            x = torch.randn(b, D, generator=gen, device="cuda")
            mid = torch.empty(b, TOP_K, F, device="cuda")
            n_bytes = distinct * per_gu + 4 * b * (D + TOP_K * F)
            # one block per SM at 16 warps: one 48 KB table fill per SM
            for warps in NVRTC_ROWS_WARPS:
                # gate_up reads ROWS_WARPS at each call: the warm-up and the capture launch this size.
                moe_nvrtc.ROWS_WARPS = warps
                us = time_graph([lambda ids=ids: moe_gate_up(gate, up, x, ids, wts, LIMIT, out=mid) for ids in sets])
                rows.append(row("q2", f"gate_up w{warps}", b, n_bytes, us, None, read_gbps, distinct))
    finally:
        moe_nvrtc.ROWS_WARPS = default_warps
    return rows


def run_quant(quant, n_toks, gen, read_gbps, quick):
    gate, up, down = weights(quant, gen)
    per_gu = (planar_nbytes(gate) + planar_nbytes(up)) // N_EXPERTS
    per_down = planar_nbytes(down) // N_EXPERTS
    rows = []
    for b in n_toks:
        sets, distinct = routing_sets(b, gen)
        wts = torch.rand(b, TOP_K, generator=gen, device="cuda")
        x = torch.randn(b, D, generator=gen, device="cuda")
        mid = torch.randn(b, TOP_K, F, generator=gen, device="cuda")
        y = torch.empty(b, D, device="cuda")
        act_gu, act_down = 4 * b * (D + TOP_K * F), 4 * b * (TOP_K * F + D)
        kinds = {
            "gate_up": (distinct * per_gu + act_gu,
                        lambda ids, t: moe_gate_up(gate, up, x, ids, wts, LIMIT, out=mid, **tiling(t))),
            "down": (distinct * per_down + act_down,
                     lambda ids, t: moe_down(down, mid, ids, out=y, **tiling(t))),
        }
        best = {}
        for kind, (n_bytes, fn) in kinds.items():
            sweep = [(None, None, None)] if quick else DOWN_SWEEP if kind == "down" else SWEEP
            timed = [(time_graph([lambda ids=ids, t=t: fn(ids, t) for ids in sets]), t) for t in sweep]
            us, best_t = min(timed)
            best[kind] = best_t
            rows.append(row(quant, kind, b, n_bytes, us, best_t, read_gbps, distinct))
        layer = [lambda ids=ids: (kinds["gate_up"][1](ids, best["gate_up"]), kinds["down"][1](ids, best["down"]))
                 for ids in sets]
        n_bytes = kinds["gate_up"][0] + kinds["down"][0]
        rows.append(row(quant, "layer", b, n_bytes, time_graph(layer), None, read_gbps, distinct))
    return rows


def row(quant, kind, b, n_bytes, us, tiling, read_gbps, distinct):
    gbps = n_bytes / us / 1e3
    return {"quant": quant, "kind": kind, "B": b, "experts_read": distinct, "bytes": n_bytes, "us": us,
            "gbps": gbps, "pct_read": 100 * gbps / read_gbps, "best": tiling}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="default tiling only, no sweep")
    parser.add_argument("--nvrtc-kernels", action="store_true",
                        help="only q2 gate/up with the CUDA C kernel, once per block size (moe_nvrtc.ROWS_WARPS)")
    args = parser.parse_args()
    ceilings = {"device": torch.cuda.get_device_name(), "read_gbps": bandwidth.read_bandwidth()}
    gen = torch.Generator(device="cuda").manual_seed(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if args.nvrtc_kernels:
        results = run_nvrtc_kernels(gen, ceilings["read_gbps"])
        for r in results:
            print(f"{r['quant']:<4}{r['kind']:<22}B={r['B']}  experts {r['experts_read']:5.1f} "
                  f"{r['bytes'] / 1e6:8.2f} MB {r['us']:8.2f} us {r['gbps']:7.0f} GB/s {r['pct_read']:5.1f}%")
        print(f"device {ceilings['device']}: stream read {ceilings['read_gbps']:.0f} GB/s")
        print(json.dumps({"commit": commit, "ceilings": ceilings, "nvrtc_kernels": results}))
        return
    results = []
    for quant in QUANTS:
        n_toks = [b for q, b in CASES if q == quant]
        for r in run_quant(quant, n_toks, gen, ceilings["read_gbps"], args.quick):
            results.append(r)
            print(f"{r['quant']:<4}{r['kind']:<9}B={r['B']}  experts {r['experts_read']:5.1f} "
                  f"{r['bytes'] / 1e6:8.2f} MB {r['us']:8.2f} us {r['gbps']:7.0f} GB/s "
                  f"{r['pct_read']:5.1f}%  best={r['best']}", flush=True)
        torch.cuda.empty_cache()
    layer = {f"{r['quant']} B={r['B']}": r["us"] * LAYERS / 1e3 for r in results if r["kind"] == "layer"}
    print(f"device {ceilings['device']}: stream read {ceilings['read_gbps']:.0f} GB/s")
    print("routed experts per token (43 layers, ms): " + ", ".join(f"{k} {v:.2f}" for k, v in layer.items()))
    print(json.dumps({"commit": commit, "ceilings": ceilings, "routed_ms_per_token": layer, "cases": results}))


if __name__ == "__main__":
    main()
