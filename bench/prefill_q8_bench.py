"""Tile sweep of the int8 prefill GEMM (kernels/prefill_q8.py) at Flash shapes, against the
fp16 path it replaces (dequantise to fp16 + torch GEMM with fp32 output, kernels/prefill_moe).

Prints µs per call of each shape for each tiling in TILINGS, the tiling with the least summed
time over the shapes (each runs once per layer), and that tiling as one line to stdout's end
(for `cuda_session_bench.py --q8-tiles`).

Usage: PYTHONPATH=.:bench python3 bench/prefill_q8_bench.py [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json

import torch
from gguf import GGMLQuantizationType as T

from dwarfstar.kernels.moe import quantize_act
from dwarfstar.kernels.prefill_moe import matmul_f32
from dwarfstar.kernels.prefill_q8 import TILES, gemm_q8
from dwarfstar.kernels.repack import dequantize_planar, repack
from dwarfstar.kernels.synth import random_raw

# name, weight shape ([N, K] or grouped [G, N, K]): the Q8_0 products of one Flash layer's chunk.
CASES = [("q_a+kv", (1536, 4096)), ("q_b", (32768, 1024)), ("out_a (8 groups)", (8, 1024, 4096)),
         ("out_b", (4096, 8192)), ("shared gate+up", (4096, 4096)), ("shared down", (4096, 2048))]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILINGS = [TILES, (128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (128, 256, 128, 8, 3), (64, 256, 128, 8, 3),
           (128, 64, 128, 4, 3), (128, 128, 256, 8, 2), (256, 128, 128, 8, 3), (64, 128, 256, 4, 3),
           (128, 128, 128, 4, 4), (64, 64, 256, 4, 3)]


def timed_us(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    times = {t: [] for t in TILINGS}
    fp16 = []
    for name, shape in CASES:
        w = repack(random_raw(T.Q8_0, shape, gen), T.Q8_0, shape)
        g, n, k = (1, *shape) if len(shape) == 2 else shape
        x = torch.randn(args.tokens, g * k, generator=gen, device="cuda")
        xq = quantize_act(x)
        if g == 1:
            half = timed_us(lambda: matmul_f32(x, dequantize_planar(w, torch.float16), torch.float16))
        else:
            half = timed_us(lambda: matmul_f32(x.view(-1, g, k).transpose(0, 1),
                                               dequantize_planar(w, torch.float16), torch.float16))
        fp16.append(half)
        row = []
        for tiles in TILINGS:
            try:
                us = timed_us(lambda: gemm_q8(w, xq, tiles))
            except Exception as e:          # a tiling over the shared-memory limit: reported, skipped
                print(f"{name} {tiles}: {type(e).__name__}", flush=True)
                us = float("inf")
            times[tiles].append(us)
            row.append(f"{us:8.1f}")
        flops = 2 * args.tokens * g * n * k
        best = min(times[t][-1] for t in TILINGS)
        print(f"{name:>17}: fp16 {half:8.1f} µs | int8 best {best:8.1f} µs ({flops / best / 1e6:6.0f} TOPS) | "
              f"{' '.join(row)}", flush=True)
    total = {t: sum(v) for t, v in times.items()}
    best = min(total, key=total.get)
    print(f"summed: fp16 {sum(fp16):.1f} µs; int8 per tiling " +
          ", ".join(f"{t}: {v:.1f}" for t, v in total.items()))
    print(json.dumps({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "fp16_us": fp16,
                      "int8_us": {str(t): v for t, v in times.items()}, "best": best}))
    print(" ".join(map(str, best)))


if __name__ == "__main__":
    main()
