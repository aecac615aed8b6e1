"""Is a decode mat-vec bound by HBM? Cold vs L2-warm weights, and the int8-activation sweep.

Default mode, per decode shape: one CUDA graph of R rounds, each round a spin kernel standing
in for a latency-bound kernel (attention, HC split: ~`--spin-us`), then the fp32 mat-vec
over one of several weight copies. Variants:
  spin      the spin kernels alone (subtracted from the others)
  cold      spin -> mat-vec of a rotated copy (cold in L2)
  warm      spin -> mat-vec of the same weight every round (L2-hot: what a perfect prefetch
            into L2 during the spin could give at most)
Reported: µs of the mat-vec per round (variant minus spin) and GB/s of its weight bytes.

`--int8`: back-to-back rotated launches of the fp32 mat-vec (production tiling) vs the
int8-activation dp4a mat-vec (kernels/matvec_int8.py) over a tiling grid, plus the quantiser.

Usage: PYTHONPATH=.:bench python3 bench/l2_bench.py [--spin-us 25] [--int8]
"""

from __future__ import annotations

import argparse
import json

import torch
from gguf import GGMLQuantizationType as T

import bandwidth
from dwarfstar.kernels.matvec import matvec
from dwarfstar.kernels.repack import planar_nbytes, repack
from dwarfstar.kernels.synth import random_raw

ROUNDS = 16
COPIES = 8
CASES = [("q_a+kv", 1536, 4096), ("q_b", 32768, 1024), ("out_b", 4096, 8192), ("shexp gate+up", 4096, 4096)]
INT8_CASES = CASES + [("out_a (8 groups)", 8192, 4096), ("shexp down", 4096, 2048), ("head", 129280, 4096)]
INT8_TILINGS = [(2, 2048, 4), (4, 2048, 8), (4, 1024, 4), (8, 1024, 4), (8, 2048, 8), (8, 512, 4),
                (16, 512, 4), (16, 1024, 8), (32, 256, 4), (4, 4096, 8)]


def graph_us(body) -> float:
    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return 1000 * bandwidth.median_ms(g.replay, rep=30) / ROUNDS


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spin-us", type=float, default=25.0)
    p.add_argument("--int8", action="store_true", help="only the int8-activation (dp4a) sweep")
    args = p.parse_args()
    if args.int8:
        return int8_sweep()
    gen = torch.Generator(device="cuda").manual_seed(0)
    # torch.cuda._sleep spins for a number of cycles; calibrate cycles per µs on this GPU.
    probe = 2_000_000
    torch.cuda._sleep(probe)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(probe)
    b.record()
    torch.cuda.synchronize()
    cycles = int(args.spin_us * probe / (1000 * a.elapsed_time(b)))
    out = []
    for name, n, k in CASES:
        ws = [repack(random_raw(T.Q8_0, (n, k), gen), T.Q8_0, (n, k)) for _ in range(COPIES)]
        x = torch.randn(1, k, generator=gen, device="cuda")
        y = torch.empty(1, n, device="cuda")
        nbytes = planar_nbytes(ws[0])

        def rounds(mode):
            def body():
                for r in range(ROUNDS):
                    w = ws[0] if mode == "warm" else ws[r % COPIES]
                    torch.cuda._sleep(cycles)
                    if mode != "spin":
                        matvec(w, x, out=y)
            return body

        spin = graph_us(rounds("spin"))
        row = {"case": name, "bytes": nbytes, "spin_us": spin}
        for mode in ("cold", "warm"):
            us = graph_us(rounds(mode)) - spin
            row[mode] = us
            print(f"{name:>14} {mode:>5}: {us:7.2f} µs  {nbytes / us / 1e3:7.0f} GB/s", flush=True)
        out.append(row)
        del ws
        torch.cuda.empty_cache()
    print(json.dumps({"device": torch.cuda.get_device_name(), "spin_us": args.spin_us, "rows": out}))


def int8_sweep() -> None:
    """Back-to-back rotated launches (no spin): the fp32 mat-vec at its production tiling vs the
    int8-activation one over INT8_TILINGS, plus the activation quantiser alone."""
    from dwarfstar.kernels.matvec import expert_matvec
    from dwarfstar.kernels.matvec_int8 import expert_matvec_q8, matvec_q8
    from dwarfstar.kernels.moe import quantize_act

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, n, k in INT8_CASES:
        grouped = name.startswith("out_a")
        copies = 4 if n * k > 100e6 else COPIES
        shape = (8, n // 8, k) if grouped else (n, k)
        ws = [repack(random_raw(T.Q8_0, shape, gen), T.Q8_0, shape) for _ in range(copies)]
        b = 8 if grouped else 1
        x = torch.randn(b, k, generator=gen, device="cuda")
        ids = torch.arange(8, dtype=torch.int32, device="cuda")
        xq = quantize_act(x)
        nbytes = planar_nbytes(ws[0])

        def timed(fn):
            return graph_us(lambda: [fn(ws[r % copies]) for r in range(ROUNDS)])

        fp32 = timed((lambda w: expert_matvec(w, ids, x)) if grouped else (lambda w: matvec(w, x)))
        best = None
        for t in INT8_TILINGS:
            fn = (lambda w, t=t: expert_matvec_q8(w, ids, xq, tiling=t)) if grouped else \
                (lambda w, t=t: matvec_q8(w, xq, tiling=t))
            us = timed(fn)
            if best is None or us < best[0]:
                best = (us, t)
        qus = graph_us(lambda: [quantize_act(x) for _ in range(ROUNDS)])
        print(f"{name:>18}: fp32 {fp32:6.2f} µs ({nbytes / fp32 / 1e3:5.0f} GB/s)  int8 best {best[0]:6.2f} µs "
              f"({nbytes / best[0] / 1e3:5.0f} GB/s) at {best[1]}; quantise {qus:5.2f} µs", flush=True)
        rows.append({"case": name, "bytes": nbytes, "fp32_us": fp32, "int8_us": best[0], "tiling": best[1],
                     "quantize_us": qus})
        del ws
        torch.cuda.empty_cache()
    print(json.dumps({"device": torch.cuda.get_device_name(), "int8": rows}))


if __name__ == "__main__":
    main()
