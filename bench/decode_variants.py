"""Decode step time of switchable variants on one set of dummy weights (A/B in one process).

A variant is a set of overrides of production: `ops` fields of the ForwardModel (fp32 mat-vecs
instead of the int8-activation Q8_0 products, the HC norms without hc_post's Gram partials) and
kernel module switches ("module.NAME": value, restored after the variant): decode attention's
block shape for gathered rows, its tl.dot precision or QK form, programmatic dependent launch
(kernels/pdl.py) off or only for small grids, the IQ2_XXS gate/up block size. Speed only: accuracy is the GPU
tests' job. A fresh session is captured per variant and timed as in cuda_decode_bench (graph
replay, median of --steps), interleaved over --rounds so drift hits all variants alike.

Usage: PYTHONPATH=.:bench python3 bench/decode_variants.py [--layers 43] [--ctx 2048] [--only base ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from cuda_decode_bench import fill_state, flash_config, time_graph
from dwarfstar.engine.cuda_engine import CudaEngine
from dwarfstar.engine.engine import EngineOptions
from dwarfstar.kernels import attend, hc, matvec_int8, moe_nvrtc, pdl, rounding, topk
from dwarfstar.model import forward

FP32 = {"q8_matvec": None, "q8_expert_matvec": None, "q8_gemm": None}     # TRITON_OPS's mat-vecs
MODULES = {"attend": attend, "forward": forward, "hc": hc, "matvec_int8": matvec_int8, "moe_nvrtc": moe_nvrtc,
           "pdl": pdl, "rounding": rounding, "topk": topk}
VARIANTS = {
    "base": {},
    "fp32-dense": {"ops": FP32},
    "no-gram": {"ops": {"hc_gram": False}},
    "gathered-16x32": {"set": {"attend.GATHERED_BLOCKS": (16, 32, 128)}},
    "attend-ieee": {"set": {"attend.DOT_PRECISION": "ieee"}},
    "qk-split-1": {"set": {"attend.QK_SPLIT": 1}},
    "index-ieee": {"set": {"rounding.INDEX_SCORE_DOT": "ieee", "rounding.INDEX_SCORE_HEADS": 16}},
    "index-round-w8": {"set": {"rounding.INDEX_ROUND_WARPS": 8}},
    "iq2-w4": {"set": {"moe_nvrtc.ROWS_WARPS": 4}},
    "no-comp-branch": {"set": {"forward.ATTN_COMPRESSOR_BRANCH": False}},
    "no-kv-branch": {"set": {"forward.KV_ROW_BRANCH": False}},
    "no-mix-in-post": {"set": {"forward.HC_MIX_IN_POST": False}},
    "late-compressors": {"set": {"forward.EARLY_COMPRESSORS": False}},
    "q-norm-launch": {"set": {"forward.Q_NORM_IN_QB": False}},
    "comb-join-at-post": {"set": {"forward.COMB_JOIN_AT_ATTENTION": False}},
    "gram-slice-128": {"set": {"hc.GRAM_SLICE": 128}},
    "combine-d-64": {"set": {"attend.COMBINE_D": 64}},
    "combine-d-256": {"set": {"attend.COMBINE_D": 256}},
    "q8-short-8x1024": {"set": {"matvec_int8.TILING_SHORT_ROWS": (8, 1024, 4)}},
    "q8-long-4x2048w8": {"set": {"matvec_int8.TILING": (4, 2048, 8)}},
    "q8-slots-16x512": {"set": {"matvec_int8.TILING_SLOTS": (16, 512, 4)}},
    "attend-three-products": {"set": {"attend.EXACT_KEYS": False}},
    "nvrtc-no-pdl": {"set": {"moe_nvrtc.PDL": False}},
    "topk-no-short": {"set": {"topk.SHORT_EXCESS": -1}},
    "no-pdl": {"set": {"pdl.ENABLED": False}},
    "pdl-small": {"set": {"pdl.MAX_PROGRAMS": 264}},          # grids of at most two waves of 132 SMs
}


def switch(settings: dict) -> dict:
    """Set "module.NAME" switches; -> the previous values (to restore with the same call)."""
    old = {}
    for key, value in settings.items():
        mod, name = key.split(".")
        old[key] = getattr(MODULES[mod], name)
        setattr(MODULES[mod], name, value)
    return old


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=43)
    p.add_argument("--ctx", type=int, nargs="+", default=[2048])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    engine = CudaEngine.dummy(flash_config(args.layers), EngineOptions(backend="cuda"))
    production = engine.model.ops
    gen = torch.Generator(device="cuda").manual_seed(0)
    res: dict = {}
    for ctx in args.ctx:
        for r in range(args.rounds):
            for name in args.only or list(VARIANTS):
                v = VARIANTS[name]
                engine.model.ops = dataclasses.replace(production, **v.get("ops", {}))
                old = switch(v.get("set", {}))
                session = engine.new_session(ctx=ctx + 64)
                fill_state(session, ctx, gen)
                ms = time_graph(session, args.steps)
                switch(old)
                res.setdefault(f"{ctx}:{name}", []).append(ms)
                print(f"ctx {ctx} round {r} {name:>20}: {ms:.3f} ms ({1e3 / ms:.1f} tok/s)", flush=True)
                del session
                torch.cuda.empty_cache()
    engine.model.ops = production
    print(json.dumps({k: min(v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
