"""Long-context decode checks and session snapshot costs of the CUDA backend (issues 5 and 7).

Weights: dummy full-width Flash weights made on the GPU (`CudaEngine.dummy`, q2, `--layers`).
Decode states are filled synthetically (bench/cuda_decode_bench.fill_state), except the TTFT
part, which prefills a real prompt.

1. Context crossings: a session allocated for the largest `--cross` value is filled to
   n - 8 tokens and decoded 16 graph steps across n (4096: ratio-4 rows pass top-k 512 x 4 ...;
   32768; 131072): every logit finite, `pos` advanced; ms/token and GPU memory reported.
2. Snapshots at each `--snap` context: `session.snapshot()` time and size, the KVC session
   file (engine/diskcache_session.py) write (fsync) and read+validate time and size,
   `session.restore()` time, and that one decode step after the restore reproduces the
   logits of the same step before it (bit-equal).
3. Time to first token for a `--ttft` token prompt: cold (sync = chunked prefill, then
   logits on the host) vs a cache hit (read the KVC file, restore, logits on the host).
Before these, the engine's load (dummy weights) and its warm-up (`CudaEngine.warm_up`, with the
engine's ctx = the TTFT session's) are timed apart; `--no-warmup` skips the warm-up, so with
`--cross --snap` (no points) the cold TTFT is the process's first prefill: the A/B of the warm-up.

Usage: PYTHONPATH=.:bench python3 bench/cuda_session_bench.py [--layers 43] [--cross 4096 32768 131072]
       [--snap 32768 131072] [--ttft 30000] [--dir /tmp] [--no-warmup]
Prints lines of results and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch

from cuda_decode_bench import fill_state
from dwarfstar.engine import diskcache_session as dcs
from dwarfstar.engine.cuda_engine import CudaEngine, flash_config
from dwarfstar.engine.engine import EngineOptions

GIB = 1 << 30


def _sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def crossings(engine, points: list[int], gen) -> list[dict]:
    session = engine.new_session(ctx=max(points) + 64)
    out = []
    for n in points:
        fill_state(session, n - 8, gen)
        times = []
        for _ in range(16):
            _, dt = _sync_time(lambda: session.eval(2))
            times.append(dt)
        logits = session.state.logits
        ok = bool(torch.isfinite(logits).all()) and int(session.state.pos) == n + 8
        r = {"ctx": n, "finite_and_advanced": ok, "ms_per_token_median": 1e3 * sorted(times[1:])[7],
             "alloc_ctx": session.ctx, "state_gib": session.state.nbytes() / GIB,
             "gpu_allocated_gib": torch.cuda.memory_allocated() / GIB,
             "gpu_peak_gib": torch.cuda.max_memory_allocated() / GIB}
        print(f"cross {n}: {r}", flush=True)
        out.append(r)
    del session
    torch.cuda.empty_cache()
    return out


def snapshots(engine, points: list[int], gen, directory: str) -> list[dict]:
    ident = dcs.Identity("dummy-weights", 2)
    out = []
    for n in points:
        session = engine.new_session(ctx=n + 64)
        fill_state(session, n, gen)
        session.eval(3)                                         # capture + a real state
        blob, t_snap = _sync_time(session.snapshot)
        session.eval(5)
        before = session.logits().clone()
        path = os.path.join(directory, f"snap{n}.kv")
        text = bytes(session.state.n_tokens - 1)                 # stand-in cache text, 1 byte/token
        size, t_write = _sync_time(lambda: dcs.save(path, _Frozen(session, blob), text, ident, session.ctx))
        ckpt, t_read = _sync_time(lambda: dcs.read(path, ident, session.ctx))
        _, t_restore = _sync_time(lambda: session.restore(ckpt.snapshot))
        session.eval(5)
        same = torch.equal(session.logits(), before)
        r = {"ctx": n, "snapshot_s": t_snap, "snapshot_bytes": len(blob), "file_write_s": t_write,
             "file_bytes": size, "file_read_s": t_read, "restore_s": t_restore, "step_after_restore_equal": same}
        print(f"snapshot {n}: {r}", flush=True)
        out.append(r)
        os.unlink(path)
        del session, blob, ckpt
        torch.cuda.empty_cache()
    return out


class _Frozen:
    """A session stand-in whose snapshot is a blob taken earlier (the save writes that state)."""

    def __init__(self, session, blob):
        self.tokens, self._blob = session.tokens[:-1], blob

    def snapshot(self):
        return self._blob


def ttft(engine, n: int, directory: str, gen) -> dict:
    """Cache hit first (a synthetic n-token state saved to a KVC file, then read + restore +
    logits on the host), then the cold prefill of an n-token prompt (progress printed, so a
    run cut short still gives the rate)."""
    ident = dcs.Identity("dummy-weights", 2)
    path = os.path.join(directory, "ttft.kv")
    src = engine.new_session(ctx=n + 64)
    fill_state(src, n, gen)
    dcs.save(path, src, bytes(n), ident, src.ctx)
    want = src.logits()
    del src
    fresh = engine.new_session(ctx=n + 64)

    def hit():
        fresh.restore(dcs.read(path, ident, fresh.ctx).snapshot)
        return fresh.logits()

    got, t_hit = _sync_time(hit)
    os.unlink(path)
    r = {"prompt_tokens": n, "hit_ttft_s": t_hit, "hit_logits_equal": torch.equal(got, want)}
    print(f"ttft hit: {r}", flush=True)
    del fresh
    torch.cuda.empty_cache()
    prompt = torch.randint(0, engine.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    session = engine.new_session(ctx=n + 64)
    t0 = time.perf_counter()

    def progress(done, total):
        if done % 4096 < session.prefill_chunk or done == total:
            print(f"  cold prefill {done}/{total} tokens at {time.perf_counter() - t0:.1f} s", flush=True)

    _, t_cold = _sync_time(lambda: (session.sync(prompt, progress), session.logits()))
    r.update({"cold_ttft_s": t_cold, "cold_prefill_tok_s": n / t_cold, "prefill_chunk": session.prefill_chunk})
    print(f"ttft: {r}", flush=True)
    return r


def prefill_profile(engine, chunk: int) -> dict:
    """Kernel time of one `chunk`-token prefill chunk after a first one (torch.profiler, top 15)."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    session = engine.new_session(ctx=4 * chunk)
    toks = torch.randint(0, engine.config.vocab_size, (2 * chunk,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.model.prefill(session.state, toks[:chunk])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.model.prefill(session.state, toks[chunk:])
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    agg = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            agg[e.name[:70]][0] += 1
            agg[e.name[:70]][1] += e.time_range.elapsed_us()
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])
    total = sum(v[1] for v in agg.values())
    print(f"prefill chunk {chunk}: wall {wall:.3f} s (profiled), kernel sum {total / 1e6:.3f} s, "
          f"{sum(v[0] for v in agg.values())} launches", flush=True)
    for name, (n, us) in rows[:15]:
        print(f"  {us / 1e3:9.1f} ms {100 * us / total:5.1f}%  x{n:<6} {name}", flush=True)
    del session
    torch.cuda.empty_cache()
    return {"chunk": chunk, "wall_s": wall, "kernel_s": total / 1e6,
            "top": [{"name": k, "launches": v[0], "ms": v[1] / 1e3} for k, v in rows[:15]]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=43)
    p.add_argument("--cross", type=int, nargs="*", default=[4096, 32768, 131072])
    p.add_argument("--snap", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--ttft", type=int, default=30000)
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--profile-prefill", type=int, default=0, help="profile one chunk of this many tokens")
    p.add_argument("--fp32", action="store_true",
                   help="TRITON_OPS: fp32 mat-vecs for the Q8_0 products (production: int8 activations)")
    p.add_argument("--q8-tiles", type=int, nargs=5, default=None,
                   help="prefill_q8.TILES for this run (BLOCK_M BLOCK_N BLOCK_K warps stages; prefill_q8_bench.py)")
    p.add_argument("--no-warmup", action="store_true", help="skip CudaEngine.warm_up (the cold-TTFT A/B)")
    args = p.parse_args()
    # The warm-up runs below, timed apart from the load; its session has the engine's ctx, the
    # TTFT session's, so the kernels it loads are specialised as that session's.
    opts = EngineOptions(backend="cuda", prefill_chunk=args.prefill_chunk, warmup=False,
                         **({"ctx": args.ttft + 64} if args.ttft else {}))
    engine, t_load = _sync_time(lambda: CudaEngine.dummy(flash_config(args.layers), opts))
    if args.fp32:
        from dwarfstar.model.forward import TRITON_OPS

        engine.model.ops = TRITON_OPS
    if args.q8_tiles:
        from dwarfstar.kernels import prefill_q8

        prefill_q8.TILES = tuple(args.q8_tiles)
    t_warm = None if args.no_warmup else _sync_time(engine.warm_up)[1]
    gen = torch.Generator(device="cuda").manual_seed(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"device {torch.cuda.get_device_name()}, layers {args.layers}, commit {commit}", flush=True)
    warm = "off" if t_warm is None else f"{t_warm:.2f} s"
    print(f"engine load (dummy weights) {t_load:.2f} s, warm-up {warm}", flush=True)
    res = {"device": torch.cuda.get_device_name(), "layers": args.layers, "commit": commit, "load_s": t_load,
           "warmup_s": t_warm}
    with torch.no_grad():
        if args.profile_prefill:
            res["prefill_profile"] = prefill_profile(engine, args.profile_prefill)
        res["cross"] = crossings(engine, args.cross, gen) if args.cross else []
        res["snapshots"] = snapshots(engine, args.snap, gen, args.dir) if args.snap else []
        res["ttft"] = ttft(engine, args.ttft, args.dir, gen) if args.ttft else None
    print(json.dumps(res))


if __name__ == "__main__":
    main()
