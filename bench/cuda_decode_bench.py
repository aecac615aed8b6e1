"""Decode speed of the CUDA backend at batch 1: CUDA-graph replay of one whole token step.

Weights: dummy full-width Flash weights generated on the GPU (`CudaEngine.dummy`, random
valid q2 blocks, no file), `--layers` of them (43 = the whole model; q2 needs ~81 GiB, an
H200). The decode state is filled synthetically to each context length (random rows in the
ring, compressed and indexer rows; the step's cost does not depend on their values), then
the captured step is replayed. The step is the production one: routed experts through
`expert_matvec`, the indexer scoring every allocated ratio-4 row.

Bytes arithmetic per token (what the step must read at least): every non-routed weight once
(token_embd: one row), K experts' gate/up/down slabs per layer, and the KV it reads: the
ring (W x D fp32) per layer, all indexer rows + k_eff gathered rows on ratio-4 layers, all
compressed rows on ratio-128 layers. Roofline = bytes / measured streaming-read bandwidth
(bench/bandwidth.py). Per-kernel times come from torch.profiler over eager steps (the
kernels a graph replays are the same; eager adds launch gaps, not kernel time).

Usage: PYTHONPATH=.:bench python3 bench/cuda_decode_bench.py [--layers 43] [--ctx 2048 32768]
Prints a human table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import time
from collections import defaultdict

import torch

from dwarfstar.engine.cuda_engine import CudaEngine, tensor_bytes
from dwarfstar.engine.engine import EngineOptions
from dwarfstar.kernels.repack import planar_nbytes
from dwarfstar.shape import FLASH, flash_compress_ratios

GIB = 1 << 30


def flash_config(layers: int):
    return dataclasses.replace(FLASH, n_layers=layers, compress_ratios=flash_compress_ratios(layers),
                               swiglu_limits=FLASH.swiglu_limits[:layers])


def fill_state(session, n: int, gen: torch.Generator) -> None:
    """Pretend the session holds n tokens: random rows everywhere a real prefill would write."""
    st = session.state
    for s in st.layers:
        s.raw.normal_(generator=gen)
        for rows in (s.comp, s.index):
            if rows is not None:
                rows[: n // s.ratio].normal_(generator=gen)
        for f in (s.comp_kv, s.comp_score, s.index_kv, s.index_score):
            if f is not None:
                f.normal_(generator=gen)
    w = st.config.window_size
    st.tokens = [1] * n
    st.pos.fill_(n)
    slots = torch.arange(w, device=st.pos.device)
    st.ring_pos.copy_(n - 1 - ((n - 1 - slots) % w))
    st.has_logits = True


def step_bytes(engine, session) -> dict:
    c, t = engine.config, engine.model.t
    routed = {f"blk.{i}.{g}" for i in range(c.n_layers) for g in
              ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")}
    dense = sum(planar_nbytes(v) if not isinstance(v, torch.Tensor) else v.numel() * v.element_size()
                for n, v in t.items() if n not in routed and n != "token_embd.weight")
    dense += c.dim * 2
    experts = sum(planar_nbytes(t[n]) for n in routed) * c.n_activated_experts // c.n_routed_experts
    kv = 0
    for s in session.state.layers:
        kv += s.raw.numel() * 4
        if s.index is not None:
            k_eff = min(c.index_topk, s.comp.shape[0])
            kv += s.index.numel() * 4 + k_eff * s.comp.shape[1] * 4
        elif s.comp is not None:
            kv += s.comp.numel() * 4
    return {"dense": dense, "experts": experts, "kv": kv, "total": dense + experts + kv}


def time_graph(session, n_steps: int) -> float:
    """Median ms of one graph replay (a decode step), over n_steps replays."""
    session.eval(2)   # captures
    times = []
    for _ in range(n_steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        session.graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def kernel_profile(engine, session, n_steps: int = 3) -> list[tuple[str, int, float]]:
    """(kernel name, launches per step, µs per step) over eager steps, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        engine.model.step(session.state)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n_steps):
                engine.model.step(session.state)
            torch.cuda.synchronize()
    agg = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        # Kernel (device-side) events: their time range is the kernel's run on the GPU.
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:60]
            agg[name][0] += 1
            agg[name][1] += e.time_range.elapsed_us()
    rows = [(k, v[0] // n_steps, v[1] / n_steps) for k, v in agg.items()]
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=43)
    p.add_argument("--ctx", type=int, nargs="+", default=[2048, 32768])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--profile-ctx", type=int, default=None, help="context of the per-kernel profile")
    p.add_argument("--compare-no-glue", action="store_true",
                   help="also time the first ctx with the glue kernels off (torch glue, as before)")
    p.add_argument("--fp32", action="store_true",
                   help="TRITON_OPS: fp32 mat-vecs for the Q8_0 products (production: int8 activations)")
    args = p.parse_args()
    from bandwidth import read_bandwidth

    torch.backends.cuda.matmul.allow_tf32 = False
    read_gbs = read_bandwidth()
    t0 = time.time()
    engine = CudaEngine.dummy(flash_config(args.layers), EngineOptions(backend="cuda"))
    if args.fp32:
        from dwarfstar.model.forward import TRITON_OPS

        engine.model.ops = TRITON_OPS
    torch.cuda.synchronize()
    load_s = time.time() - t0
    w_bytes = tensor_bytes(engine.model.t)
    mem_weights = torch.cuda.memory_allocated()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for ctx in args.ctx:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        session = engine.new_session(ctx=ctx + 64)
        fill_state(session, ctx, gen)
        ms = time_graph(session, args.steps)
        by = step_bytes(engine, session)
        roof_ms = by["total"] / (read_gbs * 1e9) * 1e3
        results.append({
            "ctx": ctx, "ms_per_token": ms, "tok_s": 1e3 / ms, "bytes_per_token": by,
            "roofline_ms": roof_ms, "fraction_of_roofline": roof_ms / ms,
            "state_bytes": session.state.nbytes(),
            "workspace_bytes": torch.cuda.max_memory_allocated() - before - session.state.nbytes(),
        })
        del session
        torch.cuda.empty_cache()
    # The eager profile comes after every timing: a graph replayed after torch.profiler has run in
    # the process measured slower (32K 6.19 ms after a 2K profile, 5.71 ms before it, H200).
    profile_ctx = args.profile_ctx or args.ctx[0]
    session = engine.new_session(ctx=profile_ctx + 64)
    fill_state(session, profile_ctx, gen)
    prof = kernel_profile(engine, session)
    del session
    torch.cuda.empty_cache()
    no_glue = None
    if args.compare_no_glue:
        from dwarfstar.model.forward import TRITON_OPS

        engine.model.ops = dataclasses.replace(TRITON_OPS, glue=False)
        session = engine.new_session(ctx=args.ctx[0] + 64)
        fill_state(session, args.ctx[0], gen)
        no_glue = {"ctx": args.ctx[0], "ms_per_token": time_graph(session, args.steps)}
        engine.model.ops = TRITON_OPS
        print(f"glue kernels off: ctx {args.ctx[0]} {no_glue['ms_per_token']:.2f} ms/token")
        del session
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"device {torch.cuda.get_device_name()}, layers {args.layers}, commit {commit}, "
          f"streaming read {read_gbs:.0f} GB/s, dummy weights {w_bytes / GIB:.2f} GiB "
          f"(allocated {mem_weights / GIB:.2f} GiB) made in {load_s:.0f} s")
    print(f"{'ctx':>7} {'ms/tok':>8} {'tok/s':>7} {'GB/tok':>7} {'roof ms':>8} {'% roof':>7} "
          f"{'state MiB':>9} {'work MiB':>8}")
    for r in results:
        print(f"{r['ctx']:>7} {r['ms_per_token']:8.2f} {r['tok_s']:7.1f} {r['bytes_per_token']['total'] / 1e9:7.2f} "
              f"{r['roofline_ms']:8.2f} {100 * r['fraction_of_roofline']:6.1f}% "
              f"{r['state_bytes'] / 2**20:9.1f} {r['workspace_bytes'] / 2**20:8.1f}")
    step_us = sum(r[2] for r in prof)
    print(f"\nper-kernel time of one eager decode step (sum {step_us / 1e3:.2f} ms, "
          f"{sum(r[1] for r in prof)} launches):")
    for name, n, us in prof[:25]:
        print(f"  {us:9.1f} µs {100 * us / step_us:5.1f}%  x{n:<5} {name}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "layers": args.layers, "commit": commit,
                      "read_gbs": read_gbs, "weight_bytes": w_bytes, "results": results, "no_glue": no_glue,
                      "kernels": [{"name": n, "launches": c, "us": u} for n, c, u in prof[:25]]}))


if __name__ == "__main__":
    main()
