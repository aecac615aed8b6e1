"""Routed MoE of a prefill chunk: (token, slot) pairs grouped by expert, each expert's
weights dequantised once to an fp16 scratch (kernels/dequant.py) and multiplied with all
of its tokens in one batched GEMM (tensor cores, fp32 accumulation and results).

Dims: T tokens, K experts per token, E experts, D hidden, F expert width, S experts in a
batch, M padded pairs per expert in a batch.

Contract:
- `prefill_moe(w1, w3, w2, x [T, D] fp32, sel int [T, K], wts fp32 [T, K], limit, act, dtype)`
  -> fp32 [T, D] = sum_k W2[e] act(wts[t, k] * swiglu(W1[e] act(x[t]), W3[e] act(x[t]), limit)),
  e = sel[t, k]: the function of forward.py's expert loop (and of the decode kernels when
  `act` = forward.int8_round, their per-32 int8 rounding points), with the GEMM inputs
  rounded to `dtype` (fp16: 2**-11 relative per input, fp32 accumulation). dtype float32
  computes the loop's function up to summation order (the CPU test).
- One host sync (the per-expert counts). Experts are taken in decreasing count, batched so
  the dequantised weights stay under `max_bytes` and the padded rows under `max_rows`;
  padding rows carry routing weight 0, so they add exact zeros to the output.
- `matmul_f32(a, b, dtype)` = a @ b^T in fp32 from inputs rounded to dtype (b already in
  dtype); cuBLAS with an fp32 output where this torch has `out_dtype`, else the fp16 result
  widened (same products, one more rounding of the output).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from dwarfstar.kernels.dequant import dequantize_experts, dequantize_experts_ref
from dwarfstar.kernels.repack import Planar, PlanarF16
from dwarfstar.model.moe import swiglu

# Dequantised gate + up + down weights of one batch (Flash fp16: 50.3 MB per expert, 69 per
# batch: all 256 experts in 4 batches, ~35 launches each).
MAX_BYTES = 13 << 28
# Padded (expert, pair) rows of one batch: bounds the [S, M, D|F] fp32 activations (~256 MB).
MAX_ROWS = 16384


# Input dtype of a chunk's GEMMs with quantised weights on CUDA (docs/PERF.md for the speed).
GEMM_DTYPE = torch.float16


# F16 weights up to this many elements keep float32 GEMMs on CUDA (see gemm_dtype).
F32_MAX_ELEMENTS = 1 << 20


def gemm_dtype(w: Planar, device: torch.device) -> torch.dtype:
    """GEMM_DTYPE on CUDA, except float32 for the small F16 weights (Flash: router 256 x 4096,
    HC mixes 24 x 16384, indexer head weights 64 x 4096, indexer compressor 256 x 4096): the
    router's top-k is a discrete choice and the HC weights mix the whole residual, while they
    are ~2 % of a token's dense multiply-adds. The other weights' quantisation error (Q8_0:
    >= 2**-9 relative) or downstream FP8/FP4 rounding (compressor, indexer q) dwarfs fp16's
    2**-12. CPUs: float32 (the CPU tests compare prefill with decode tightly)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    if isinstance(w, PlanarF16) and w.w.numel() <= F32_MAX_ELEMENTS:
        return torch.float32
    return GEMM_DTYPE


@functools.lru_cache(maxsize=None)
def _has_out_dtype(device: str) -> bool:
    """Whether mm/bmm take out_dtype=float32 for half inputs on this device (torch >= 2.8, CUDA)."""
    try:
        a = torch.ones(1, 2, 2, dtype=torch.float16, device=device)
        torch.mm(a[0], a[0], out_dtype=torch.float32)
        torch.bmm(a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def matmul_f32(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a [.., M, K] fp32, b [.., N, K] in dtype -> fp32 [.., M, N] (2-D or batched 3-D)."""
    bt = b.transpose(-1, -2)
    if dtype == torch.float32:
        return a @ bt
    a = a.to(dtype)
    if _has_out_dtype(str(a.device)):
        return (torch.mm if a.dim() == 2 else torch.bmm)(a, bt, out_dtype=torch.float32)
    return (a @ bt).float()


def _dequant(p: Planar, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_experts(p, ids, dtype) if ids.is_cuda else dequantize_experts_ref(p, ids, dtype)


def prefill_moe(w1: Planar, w3: Planar, w2: Planar, x: torch.Tensor, sel: torch.Tensor, wts: torch.Tensor,
                limit: float, act: Callable, dtype: torch.dtype = torch.float16,
                max_bytes: int = MAX_BYTES, max_rows: int = MAX_ROWS) -> torch.Tensor:
    n_e, f, d = w1.shape
    k = sel.shape[1]
    xq = act(x)
    flat = sel.reshape(-1)
    order = torch.argsort(flat, stable=True)                                   # pairs by expert
    counts = torch.bincount(flat, minlength=n_e)                               # [E]
    n_pairs = counts.tolist()                                                  # the host sync
    # Experts by decreasing count (stable): the host list and the device ids agree.
    used = sorted((e for e in range(n_e) if n_pairs[e]), key=lambda e: -n_pairs[e])
    ids_by_load = torch.argsort(counts, descending=True, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    token, pair_w = order // k, wts.reshape(-1)[order]
    # Each (token, slot) pair's output lands in its own row (padding rows in a spare last
    # row), then the K slots are summed in slot order: deterministic, where index_add_ on
    # CUDA adds the K rows of a token with atomics in a run-dependent order.
    n_flat = flat.shape[0]
    per_pair = x.new_zeros(n_flat + 1, x.shape[1])
    per_expert = (2 * f * d + d * f) * torch.finfo(dtype).bits // 8
    i = 0
    while i < len(used):
        m = n_pairs[used[i]]
        n = max(1, min(len(used) - i, max_bytes // per_expert, max_rows // m))
        ids = ids_by_load[i:i + n]
        arange = torch.arange(m, device=x.device)
        valid = arange[None, :] < counts[ids][:, None]                        # [S, M]
        pair = torch.where(valid, starts[ids][:, None] + arange, 0)
        tok = token[pair]                                                      # [S, M]
        h = xq[tok]                                                            # [S, M, D]
        g = matmul_f32(h, _dequant(w1, ids, dtype), dtype)
        v = matmul_f32(h, _dequant(w3, ids, dtype), dtype)                    # [S, M, F]
        mid = act(swiglu(g, v, limit) * torch.where(valid, pair_w[pair], 0)[..., None])
        y = matmul_f32(mid, _dequant(w2, ids, dtype), dtype)                  # [S, M, D]
        dest = torch.where(valid, order[pair], n_flat)                        # [S, M]
        per_pair.index_copy_(0, dest.reshape(-1), y.reshape(-1, d))
        i += n
    return per_pair[:n_flat].view(-1, k, d).sum(1)
