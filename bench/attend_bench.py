"""Decode attention (kernels/attend.py) at Flash shapes: time per call for a sweep of its block
constants, against the torch twin. H = 64 heads, Dh = 512, window 128; cases: ratio 0 (window
only), ratio 4 with the indexer's 512 rows, ratio 128 at 2K and 32K context.

Kernel times are CUDA-graph replays (20 calls per graph), so launch costs are the device's only.
`--precision ieee tf32x3` repeats the sweep per tl.dot precision (attend.DOT_PRECISION) and prints
each setting's largest relative error against the float64 twin, so a faster precision shows
what it costs in accuracy (the GPU tests hold the kernel to 1e-5). `--blocks BN BH BD WARPS`
times that one tiling instead of the sweep (e.g. production's, per precision, in seconds).
`--qk-split 1 2 4` sweeps attend.QK_SPLIT (the QK dot's head-dim chunks as a batched dot).
`--fp16-keys` rounds the keys through fp16 and runs the kernel's two-product form (attend.EXACT_KEYS).
Usage: PYTHONPATH=.:bench python3 bench/attend_bench.py [--precision ieee tf32x3] [--blocks 16 16 128 4]
       [--qk-split 1 4] [--fp16-keys]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing

from dwarfstar.kernels import attend

H, D, W = 64, 512, 128


def case(pos: int, ratio: int, n_rows: int, k: int | None, gen: torch.Generator) -> dict:
    dev = "cuda"
    slots = torch.arange(W)
    ring = pos - 1 - ((pos - 1 - slots) % W)
    comp = torch.randn(n_rows, D, generator=gen).to(dev) if n_rows else None
    idx = torch.randperm(n_rows, generator=gen)[:k].sort().values.to(dev) if k else None
    return dict(q=torch.randn(H, D, generator=gen).to(dev), raw=torch.randn(W, D, generator=gen).to(dev),
                ring_pos=ring.to(dev), kv=torch.randn(1, D, generator=gen).to(dev),
                pos=torch.tensor([pos], device=dev), comp=comp, comp_idx=idx, ratio=ratio,
                sinks=torch.randn(H, generator=gen).to(dev))


def graph_us(fn, calls: int = 20) -> float:
    """µs per call, replaying a CUDA graph of `calls` calls (no Python launch cost in it)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return triton.testing.do_bench(graph.replay) * 1e3 / calls


def max_rel_error(cases: dict) -> float:
    """Largest relative L2 error of the kernel against the float64 twin over the cases."""
    worst = 0.0
    for c in cases.values():
        want = attend.attend_decode_ref(**{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                           else v for k, v in dict(c, raw=c["raw"].clone()).items()
                                           if k != "keys_fp16"})
        got = attend.attend_decode(**dict(c, raw=c["raw"].clone()))
        worst = max(worst, ((got.double() - want).norm() / want.norm()).item())
    return worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", nargs="+", default=["ieee"], help="tl.dot precisions to sweep")
    p.add_argument("--qk-split", type=int, nargs="+", default=[attend.QK_SPLIT],
                   help="QK head-dim chunks as a batched dot (attend.QK_SPLIT) to sweep")
    p.add_argument("--blocks", type=int, nargs=4, default=None, metavar=("BN", "BH", "BD", "WARPS"),
                   help="one tiling instead of the sweep")
    p.add_argument("--fp16-keys", action="store_true",
                   help="keys rounded through fp16 and attend_decode(keys_fp16=True), as decode runs them")
    args = p.parse_args()
    tilings = [tuple(args.blocks)] if args.blocks else list(itertools.product((16, 32), (16, 32), (128, D), (4, 8)))
    gen = torch.Generator().manual_seed(0)
    cases = {"r0": case(2048, 0, 0, None, gen), "r4 k512 @2K": case(2048, 4, 512, 512, gen),
             "r4 k512 @32K": case(32768, 4, 8192, 512, gen), "r128 @2K": case(2048, 128, 16, None, gen),
             "r128 @32K": case(32768, 128, 256, None, gen)}
    if args.fp16_keys:
        for c in cases.values():
            c.update({k: c[k].half().float() for k in ("raw", "kv", "comp") if c[k] is not None}, keys_fp16=True)
    # Production mix per step: 2 ratio-0 layers, 21 ratio-4, 20 ratio-128.
    weights = {"r0": 2, "r4 k512 @2K": 21, "r128 @2K": 20}
    twin_cases = {n: {k: v for k, v in c.items() if k != "keys_fp16"} for n, c in cases.items()}
    print("twin:", {n: round(triton.testing.do_bench(lambda c=c: attend.attend_decode_ref(**c)) * 1e3, 1)
                    for n, c in twin_cases.items()})
    best = None
    for dot, split, (bn, bh, bd, nw) in itertools.product(args.precision, args.qk_split, tilings):
        attend.BLOCK_N, attend.BLOCK_H, attend.BLOCK_D, attend.NUM_WARPS = bn, bh, bd, nw
        attend.GATHERED_BLOCKS, attend.DOT_PRECISION, attend.QK_SPLIT = (bn, bh, bd), dot, split
        try:
            us = {n: graph_us(lambda c=c: attend.attend_decode(**c)) for n, c in cases.items()}
        except Exception as e:            # out of shared memory / registers for this tile
            print(f"{dot} split {split} BLOCK_N {bn} BLOCK_H {bh} BLOCK_D {bd} warps {nw}: {type(e).__name__}")
            continue
        step = sum(us[n] * m for n, m in weights.items())
        print(f"{dot} split {split} BLOCK_N {bn:3d} BLOCK_H {bh:3d} BLOCK_D {bd:4d} warps {nw}: "
              + " ".join(f"{n} {v:6.1f}" for n, v in us.items()) + f" | 2K step {step:7.1f} us"
              + f" | max rel err {max_rel_error(cases):.1e}")
        if best is None or step < best[0]:
            best = (step, dot, split, bn, bh, bd, nw)
    print("best (2K step µs, precision, QK split, BLOCK_N, BLOCK_H, BLOCK_D, warps):",
          tuple(round(v, 1) if isinstance(v, float) else v for v in best))


if __name__ == "__main__":
    main()
