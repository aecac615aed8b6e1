"""Expert dequantisation (kernels/dequant.py) at DeepSeek V4 Flash shapes: GB/s of fp16 written.

Method: random valid blocks (kernels/synth.py), repacked on the GPU; one launch dequantises
N_IDS experts (a 1.16 GB fp16 scratch, 20x the L2, so the writes reach HBM) and is timed
with triton.testing.do_bench (median, L2 flushed between calls). Bytes = fp16 written (the
planar bytes read are 8x-14x fewer and not counted). Each case sweeps BLOCK_SB x num_warps;
the best setting is checked bit for bit against the twin on a few experts. The per-layer
projection is one 2048-token prefill chunk's work: gate + up (IQ2_XXS) + down (Q2_K) for all
256 experts at the best measured rates.

Usage: python3 bench/dequant_bench.py [--quick]   (human table, then one JSON line)
"""

from __future__ import annotations

import argparse
import json
import subprocess

import torch
from gguf import GGMLQuantizationType as T
from triton.testing import do_bench

from dwarfstar.kernels import dequant
from dwarfstar.kernels.dequant import dequantize_experts, dequantize_experts_ref
from dwarfstar.kernels.repack import repack
from dwarfstar.kernels.synth import random_raw

N_EXPERTS = 256
N_IDS = 69
# name, type, N, K (expert weight [256, N, K])
CASES = [
    ("gate/up iq2", T.IQ2_XXS, 2048, 4096),
    ("down q2k", T.Q2_K, 4096, 2048),
    ("gate/up q4k", T.Q4_K, 2048, 4096),
]
SWEEP = [(bsb, nw) for bsb in (4, 8, 16, 32, 64) for nw in (2, 4, 8)]


def run_case(case, gen, quick):
    name, ggml_type, n, k = case
    shape = (N_EXPERTS, n, k)
    p = repack(random_raw(ggml_type, shape, gen), ggml_type, shape)
    ids = torch.randperm(N_EXPERTS, generator=gen, device="cuda")[:N_IDS]
    out = torch.empty(N_IDS, n, k, dtype=torch.float16, device="cuda")
    n_bytes = out.numel() * out.element_size()
    sweep = [(dequant.BLOCK_SB, dequant.NUM_WARPS)] if quick else SWEEP
    timed = []
    for bsb, nw in sweep:
        ms = do_bench(lambda: dequantize_experts(p, ids, torch.float16, out=out, block_sb=bsb, num_warps=nw),
                      warmup=25, rep=200)
        timed.append((ms, (bsb, nw)))
        print(f"  {name:<12} block_sb={bsb:<3} num_warps={nw}: {ms * 1e3:8.1f} us {n_bytes / ms / 1e6:7.0f} GB/s",
              flush=True)
    ms, best = min(timed)
    few = ids[:4]
    got = dequantize_experts(p, few, torch.float16, block_sb=best[0], num_warps=best[1])
    exact = torch.equal(got, dequantize_experts_ref(p, few, torch.float16))
    default = next((t for t, cfg in timed if cfg == (dequant.BLOCK_SB, dequant.NUM_WARPS)), None)
    return {"name": name, "type": ggml_type.name, "N": n, "K": k, "ids": N_IDS, "bytes": n_bytes,
            "us": ms * 1e3, "gbps": n_bytes / ms / 1e6, "best": best, "exact": exact,
            "default_us": None if default is None else default * 1e3,
            "sweep": [{"block_sb": cfg[0], "num_warps": cfg[1], "us": t * 1e3} for t, cfg in timed]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="default BLOCK_SB / NUM_WARPS only, no sweep")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(1)
    results = []
    for case in CASES:
        r = run_case(case, gen, args.quick)
        results.append(r)
        print(f"{r['name']:<12}{r['type']:<8}{N_IDS}x{r['N']}x{r['K']} {r['bytes'] / 1e9:.2f} GB "
              f"{r['us']:9.1f} us {r['gbps']:6.0f} GB/s best={r['best']} exact={r['exact']}", flush=True)
    rate = {r["type"]: r["us"] / N_IDS for r in results}
    layer_ms = (2 * rate["IQ2_XXS"] + rate["Q2_K"]) * N_EXPERTS / 1e3
    print(f"device {torch.cuda.get_device_name()}: one layer's gate + up + down, {N_EXPERTS} experts "
          f"(a 2048-token chunk): {layer_ms:.2f} ms at the best settings")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"commit": commit, "device": torch.cuda.get_device_name(), "layer_ms": layer_ms,
                      "cases": results}))


if __name__ == "__main__":
    main()
