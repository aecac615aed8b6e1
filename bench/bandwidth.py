"""Measured memory ceilings of this GPU: device-to-device copy and streaming read bandwidth.

Bytes arithmetic: a copy of S bytes moves 2*S (read + write); a streaming read of S bytes
moves S (plus one float per program, negligible). Timed with CUDA events (do_bench median,
which flushes L2 between calls); buffers are 2 GiB, 40x the L2.

Usage: python3 bench/bandwidth.py   (human table, then one JSON line)
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl

GIB = 1 << 30
READ_BLOCK = 4096
READ_CHUNKS = 8


@triton.jit
def _read_kernel(src_ptr, out_ptr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    """Each program sums CHUNKS*BLOCK int32 words; the sum only keeps the loads alive."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * CHUNKS
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for c in tl.static_range(CHUNKS):
        acc += tl.load(src_ptr + base + c * BLOCK + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def median_ms(fn, rep: int = 300) -> float:
    """Median ms of fn over ~rep ms of calls after a warm-up (CUDA events, L2 flushed per call)."""
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def copy_bandwidth(n_bytes: int = 2 * GIB) -> float:
    """GB/s of dst.copy_(src), counting bytes read plus bytes written."""
    src = torch.randint(-2**31, 2**31 - 1, (n_bytes // 4,), dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n_bytes / median_ms(lambda: dst.copy_(src)) / 1e6


def read_bandwidth(n_bytes: int = 2 * GIB, num_warps: int = 8) -> float:
    """GB/s of a Triton kernel that only reads (the ceiling for a weight-streaming mat-vec)."""
    words = n_bytes // 4
    src = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device="cuda")
    n_prog = words // (READ_BLOCK * READ_CHUNKS)
    out = torch.empty(n_prog, dtype=torch.int32, device="cuda")
    launch = lambda: _read_kernel[(n_prog,)](src, out, BLOCK=READ_BLOCK, CHUNKS=READ_CHUNKS, num_warps=num_warps)
    return n_bytes / median_ms(launch) / 1e6


def measure() -> dict:
    props = torch.cuda.get_device_properties(0)
    buf = torch.randn(2 * GIB // 4, device="cuda")
    return {
        "device": props.name,
        "sms": props.multi_processor_count,
        "copy_gbps": copy_bandwidth(),
        "read_gbps": max(read_bandwidth(num_warps=w) for w in (4, 8)),
        "torch_sum_gbps": 2 * GIB / median_ms(lambda: buf.sum()) / 1e6,
    }


def main() -> None:
    result = measure()
    print(f"{'device':<16}{result['device']} ({result['sms']} SMs)")
    print(f"{'copy (r+w)':<16}{result['copy_gbps']:8.0f} GB/s")
    print(f"{'stream read':<16}{result['read_gbps']:8.0f} GB/s")
    print(f"{'torch sum':<16}{result['torch_sum_gbps']:8.0f} GB/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
