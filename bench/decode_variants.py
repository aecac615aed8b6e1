"""Decode step time of switchable variants on one set of dummy weights (A/B in one process).

A variant is a set of overrides of production: `ops` fields of the ForwardModel (fp32 mat-vecs
instead of the int8-activation Q8_0 products, the HC norms without hc_post's Gram partials),
decode attention's block shape for gathered rows or its tl.dot precision, and programmatic
dependent launch (kernels/pdl.py) off or only for small grids. Speed only: accuracy is the GPU
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
from dwarfstar.kernels import attend, pdl

FP32 = {"q8_matvec": None, "q8_expert_matvec": None, "q8_gemm": None}     # TRITON_OPS's mat-vecs
VARIANTS = {
    "base": {},
    "fp32-dense": {"ops": FP32},
    "no-gram": {"ops": {"hc_gram": False}},
    "gathered-16x32": {"gathered": (16, 32, 128)},
    "attend-ieee": {"dot": "ieee"},
    "no-pdl": {"pdl": False},
    "pdl-small": {"pdl_max": 264},          # grids of at most two waves of 132 SMs
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=43)
    p.add_argument("--ctx", type=int, nargs="+", default=[2048])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    engine = CudaEngine.dummy(flash_config(args.layers), EngineOptions(backend="cuda"))
    production, blocks, dot = engine.model.ops, attend.GATHERED_BLOCKS, attend.DOT_PRECISION
    pdl_on, pdl_max = pdl.ENABLED, pdl.MAX_PROGRAMS
    gen = torch.Generator(device="cuda").manual_seed(0)
    res: dict = {}
    for ctx in args.ctx:
        for r in range(args.rounds):
            for name in args.only or list(VARIANTS):
                v = VARIANTS[name]
                engine.model.ops = dataclasses.replace(production, **v.get("ops", {}))
                attend.GATHERED_BLOCKS = v.get("gathered", blocks)
                attend.DOT_PRECISION = v.get("dot", dot)
                pdl.ENABLED, pdl.MAX_PROGRAMS = v.get("pdl", pdl_on), v.get("pdl_max", pdl_max)
                session = engine.new_session(ctx=ctx + 64)
                fill_state(session, ctx, gen)
                ms = time_graph(session, args.steps)
                res.setdefault(f"{ctx}:{name}", []).append(ms)
                print(f"ctx {ctx} round {r} {name:>20}: {ms:.3f} ms ({1e3 / ms:.1f} tok/s)", flush=True)
                del session
                torch.cuda.empty_cache()
    engine.model.ops, attend.GATHERED_BLOCKS, attend.DOT_PRECISION = production, blocks, dot
    pdl.ENABLED, pdl.MAX_PROGRAMS = pdl_on, pdl_max
    print(json.dumps({k: min(v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
