"""Programmatic dependent launch (PDL) between Triton kernels in a CUDA graph: what a kernel
boundary costs with and without it (a measurement for the decode step's ~1,400 launches).

A chain of K launches of one small kernel, each adding its programs' weight-block sums (1.0
exactly) to x, captured in a CUDA graph and replayed. Variants:
- `plain`: no PDL;
- `pdl`: launched with launch_pdl=True; the kernel calls gdc_wait (the previous grid complete and
  its writes visible) then gdc_launch_dependents before touching x or y;
- `pdl+prefetch`: as `pdl`, but the weight block (immutable) is loaded before gdc_wait, so it
  streams while the previous kernel finishes.
Checks the chain's result exactly (x0 + K) for every variant, so a PDL ordering fault shows.

Usage: PYTHONPATH=.:bench python3 bench/pdl_bench.py [--chain 400]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

BLOCK = 128


@triton.jit
def _chain_kernel(x_ptr, w_ptr, y_ptr, PDL: tl.constexpr, PREFETCH: tl.constexpr, BLOCK: tl.constexpr,
                  WBLOCK: tl.constexpr):
    pid = tl.program_id(0)
    woffs = pid.to(tl.int64) * WBLOCK + tl.arange(0, WBLOCK)
    if PREFETCH:
        w = tl.load(w_ptr + woffs)
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
    else:
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        w = tl.load(w_ptr + woffs)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) + tl.sum(w, axis=0))


def run(grid: int, wblock: int, chain: int, pdl: bool, prefetch: bool, reps: int = 10) -> tuple[float, bool]:
    x0 = torch.arange(grid * BLOCK, dtype=torch.float32, device="cuda")
    bufs = [x0.clone(), torch.empty_like(x0)]
    w = torch.full((grid * wblock,), 1.0 / wblock, device="cuda")     # block sums are exactly 1.0

    def body():
        for k in range(chain):
            _chain_kernel[(grid,)](bufs[k % 2], w, bufs[(k + 1) % 2], PDL=pdl, PREFETCH=prefetch, BLOCK=BLOCK,
                                   WBLOCK=wblock, num_warps=4, launch_pdl=pdl)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()                                                        # compile + warm up
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    bufs[0].copy_(x0)
    g.replay()
    torch.cuda.synchronize()
    ok = torch.equal(bufs[chain % 2], x0 + chain)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * chain), ok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--chain", type=int, default=400)
    args = p.parse_args()
    rows = []
    for grid, wblock in ((1, 1024), (132, 1024), (132, 8192), (1056, 2048)):
        mb = grid * wblock * 4 / 1e6
        line = {"grid": grid, "weight_MB": mb}
        for name, pdl, prefetch in (("plain", False, False), ("pdl", True, False), ("pdl+prefetch", True, True)):
            us, ok = run(grid, wblock, args.chain, pdl, prefetch)
            line[name] = us
            line[name + "_exact"] = ok
        print(f"grid {grid:5d}, weights {mb:6.2f} MB per launch: " +
              ", ".join(f"{n} {line[n]:.2f} µs ({'exact' if line[n + '_exact'] else 'WRONG'})"
                        for n in ("plain", "pdl", "pdl+prefetch")), flush=True)
        rows.append(line)
    print(json.dumps({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
