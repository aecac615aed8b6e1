"""Where a captured decode step's time goes: the kernel timeline of graph replays.

The per-kernel profile of cuda_decode_bench sums eager launches one after another; with the
side streams of `ForwardModel.on_branch` and programmatic dependent launch (a kernel starts
before its predecessor ends and waits inside) neither sums nor stream busy times show the
critical path. This replays the captured step under torch.profiler (CUPTI records each kernel
of a replayed graph with its GPU start and end; a replay spreads its nodes over many internal
streams) and, for the median replay, charges each kernel the time by which its end extends the
timeline past every kernel that ended before it ("marginal" µs): summed over a kernel name, how
much of the step that kernel keeps the GPU from being done. Raw events go to --json.

Usage: PYTHONPATH=.:bench python3 bench/step_timeline.py [--layers 43] [--ctx 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict

import torch

from cuda_decode_bench import fill_state, flash_config
from dwarfstar.engine.cuda_engine import CudaEngine
from dwarfstar.engine.engine import EngineOptions


def kernel_events(session, replays: int) -> list[dict]:
    """Kernel events (name, stream, ts, dur in µs) of `replays` graph replays, in GPU order."""
    from torch.profiler import ProfilerActivity, profile

    session.eval(2)   # captures
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            session.graph.replay()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        trace = json.load(open(path))
    events = [{"name": e["name"], "stream": e.get("args", {}).get("stream", e.get("tid")), "ts": float(e["ts"]),
               "dur": float(e["dur"])} for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]
    return sorted(events, key=lambda e: e["ts"])


def split_replays(events: list[dict], replays: int) -> list[list[dict]]:
    """The events cut into replays at the largest gaps (a host sync separates two replays)."""
    if replays == 1 or len(events) < 2:
        return [events]
    gaps = sorted(range(1, len(events)), key=lambda i: events[i]["ts"] - events[i - 1]["ts"] - events[i - 1]["dur"])
    cuts = sorted(gaps[-(replays - 1):])
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in zip(bounds, bounds[1:])]


def analyse(step: list[dict], top: int) -> dict:
    """Span of one replay, the sum of kernel durations (PDL waits included), and per kernel name
    the launches, summed duration and marginal time (module docstring), largest marginal first."""
    span = max(e["ts"] + e["dur"] for e in step) - step[0]["ts"]
    per = defaultdict(lambda: [0, 0.0, 0.0])
    last = step[0]["ts"]
    for e in sorted(step, key=lambda e: e["ts"] + e["dur"]):
        end = e["ts"] + e["dur"]
        row = per[e["name"][:60]]
        row[0] += 1
        row[1] += e["dur"]
        row[2] += max(0.0, end - last)
        last = max(last, end)
    rows = sorted(([k, n, d, m] for k, (n, d, m) in per.items()), key=lambda r: -r[3])
    return {"span_us": span, "kernels": len(step), "duration_sum_us": sum(e["dur"] for e in step),
            "by_kernel": rows[:top]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=43)
    p.add_argument("--ctx", type=int, nargs="+", default=[2048])
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="write the raw events and the analysis here")
    args = p.parse_args()
    engine = CudaEngine.dummy(flash_config(args.layers), EngineOptions(backend="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for ctx in args.ctx:
        session = engine.new_session(ctx=ctx + 64)
        fill_state(session, ctx, gen)
        events = kernel_events(session, args.replays)
        if not events:
            print(f"ctx {ctx}: the profiler recorded no kernel events of the graph replays")
            continue
        steps = split_replays(events, args.replays)
        spans = [max(e["ts"] + e["dur"] for e in s) - s[0]["ts"] for s in steps]
        median = sorted(range(len(steps)), key=lambda i: spans[i])[len(steps) // 2]
        a = analyse(steps[median], args.top)
        out[ctx] = {"analysis": a, "events": steps[median]}
        print(f"\nctx {ctx}: replay span {a['span_us'] / 1e3:.3f} ms (replays {[round(s / 1e3, 3) for s in spans]}), "
              f"{a['kernels']} kernels, durations summed {a['duration_sum_us'] / 1e3:.3f} ms")
        print("  marginal µs, launches, µs per launch, summed duration µs, kernel:")
        for name, n, dur, marginal in a["by_kernel"]:
            print(f"    {marginal:8.1f}  x{n:<4} {marginal / n:6.2f}  {dur:8.1f}  {name}")
        del session
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
