"""Where a captured decode step's time goes: the kernel timeline of graph replays, per stream.

The per-kernel profile of cuda_decode_bench sums eager launches one after another; with the
side streams of `ForwardModel.on_branch` that is far from the graph's critical path. This
replays the captured step under torch.profiler (CUPTI records each kernel of a replayed graph
with its stream and GPU start/end) and reports, for the busiest stream (the main one) of the
median replay: the replay's span, the sum of its kernels' durations, the idle gaps between
consecutive kernels (launch latency and waits on side streams), and the largest kernels and
gaps by name; for the other streams their busy time. Raw events go to --json.

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
    span = max(e["ts"] + e["dur"] for e in step) - step[0]["ts"]
    by_stream = defaultdict(list)
    for e in step:
        by_stream[e["stream"]].append(e)
    main = max(by_stream, key=lambda s: len(by_stream[s]))
    ks = by_stream[main]
    busy = sum(e["dur"] for e in ks)
    kernel_time = defaultdict(lambda: [0, 0.0])
    gap_time = defaultdict(lambda: [0, 0.0])
    for prev, e in zip(ks, ks[1:]):
        gap = e["ts"] - (prev["ts"] + prev["dur"])
        key = f"{prev['name'][:40]} -> {e['name'][:40]}"
        gap_time[key][0] += 1
        gap_time[key][1] += gap
    for e in ks:
        kernel_time[e["name"][:60]][0] += 1
        kernel_time[e["name"][:60]][1] += e["dur"]
    others = {str(s): {"kernels": len(v), "busy_us": sum(e["dur"] for e in v)}
              for s, v in by_stream.items() if s != main}
    return {
        "span_us": span, "main_stream": str(main), "main_kernels": len(ks), "main_busy_us": busy,
        "main_gaps_us": span - busy, "other_streams": others,
        "main_by_kernel": sorted(([k, n, t] for k, (n, t) in kernel_time.items()), key=lambda r: -r[2])[:top],
        "main_gaps_by_pair": sorted(([k, n, t] for k, (n, t) in gap_time.items()), key=lambda r: -r[2])[:top],
    }


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
        print(f"\nctx {ctx}: replay span {a['span_us'] / 1e3:.3f} ms (replays {[round(s / 1e3, 3) for s in spans]}); "
              f"main stream {a['main_kernels']} kernels busy {a['main_busy_us'] / 1e3:.3f} ms, "
              f"idle {a['main_gaps_us'] / 1e3:.3f} ms; other streams {a['other_streams']}")
        print("  main stream by kernel (launches, µs):")
        for name, n, t in a["main_by_kernel"]:
            print(f"    {t:8.1f}  x{n:<4} {name}")
        print("  main stream idle gaps by (previous -> next) kernel (count, µs):")
        for name, n, t in a["main_gaps_by_pair"]:
            print(f"    {t:8.1f}  x{n:<4} {name}")
        del session
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
