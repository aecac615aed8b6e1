"""Graph-safe twins of the reference rounding points and a tie-stable top-k (kernels.md §4, §6).

The reference versions (model/numerics.py, model/moe.py) build small constant tensors on
every call (FP4 midpoints, the Hadamard matrix) and sort with `stable=True`; inside a CUDA
graph capture a host-to-device copy of a fresh constant is not allowed. These functions
compute the same values with no host data:

- `fp4_round(x)`: E2M1 rounding per block of 32 with a power-of-two scale, bit-identical
  to `numerics.fp4_sim`. Round-to-nearest-even on the E2M1 grid is a plain
  `torch.round` at a step of 0.5 below 2, 1 below 4 and 2 up to 6 (each step a power of
  two, so the divisions are exact; the even-code tie rule equals round-half-even on the
  step multiples, checked at every midpoint by the tests).
- `hadamard_round(x, h)`: `fp4_round(x @ h)` with the orthonormal Hadamard matrix `h`
  passed in (built once by `numerics._hadamard_matrix`).
- `stable_topk(values, k)`: indices of the k largest along the last dim, equal values
  -> lower index first, as `moe.stable_topk`; one `torch.topk` over int64 keys
  (order-preserving float bits << 32 | reversed index), so the result is unique.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.model.numerics import FP4_AMAX_FLOOR, FP4_BLOCK, FP4_MAX


def fp4_round(x: torch.Tensor) -> torch.Tensor:
    b = x.reshape(*x.shape[:-1], x.shape[-1] // FP4_BLOCK, FP4_BLOCK)
    amax = b.abs().amax(-1, keepdim=True).clamp_min(FP4_AMAX_FLOOR)
    s = torch.exp2(torch.ceil(torch.log2(amax / FP4_MAX)))
    y = (b / s).clamp(-FP4_MAX, FP4_MAX)
    a = y.abs()
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0)).to(a.dtype)
    q = torch.round(a / step) * step
    return (torch.sign(y) * q * s).reshape(x.shape)


def hadamard_round(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return fp4_round(x @ h)


def stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """int64 indices [..., k] of the k largest values; ties -> lower index. float32 input."""
    n = values.shape[-1]
    # +0.0 turns -0.0 into +0.0 so both get one key; NaN must not occur.
    bits = (values.float() + 0.0).view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    rev = (n - 1) - torch.arange(n, device=values.device, dtype=torch.int64)
    keys = ordered * (1 << 32) + rev
    return torch.topk(keys, k, dim=-1).indices


# ---- the KV-row rounding of official numerics in one launch ---------------------------
# `kv_round(row, n_nope, fp8, half)`: row float32 [R, D] -> the first n_nope dims rounded to
# E4M3FN per block of 64 with a power-of-two scale (numerics.fp8_sim) when fp8, then every
# dim through IEEE half when half: model/numerics.kv_row_rounding (about 15 torch launches).
# The scale 2**ceil(log2(amax / 448)) is taken from the float bits (exact); torch's float32
# log2 can round to an integer just above a power of two (y < 2**k (1 + 2**-22)), the only
# case where the two differ (a one-in-a-million block, then by one scale step). The E4M3
# rounding is round-half-even at the step 2**(max(e, -6) - 3) of the value's exponent e.

@triton.jit
def _pow2_ceil(y):
    """2**ceil(log2(y)) for normal float32 y > 0, from the bits."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 255) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_kv_block(v, blk, N_NOPE, amax_floor, FP8: tl.constexpr, HALF: tl.constexpr):
    """One 64-wide block `blk` of a KV row, rounded as `kv_round` (also kernels/compress.py)."""
    if FP8:
        if blk * 64 < N_NOPE:
            amax = tl.maximum(tl.max(tl.abs(v), axis=0), amax_floor)
            s = _pow2_ceil(tl.div_rn(amax, 448.0))
            a = tl.minimum(tl.maximum(tl.div_rn(v, s), -448.0), 448.0)
            e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127, -6)
            step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
            r = tl.div_rn(a, step)
            r = (r + 12582912.0) - 12582912.0          # round half to even, |r| <= 16
            v = r * step * s
    if HALF:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _kv_round_kernel(x_ptr, y_ptr, D, N_NOPE, amax_floor, FP8: tl.constexpr, HALF: tl.constexpr,
                     PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * 64 + tl.arange(0, 64)
    v = _round_kv_block(tl.load(x_ptr + row * D + offs), blk, N_NOPE, amax_floor, FP8, HALF)
    tl.store(y_ptr + row * D + offs, v)


def kv_round(row: torch.Tensor, n_nope: int, fp8: bool, half: bool) -> torch.Tensor:
    from dwarfstar.model.numerics import FP8_AMAX_FLOOR, FP8_BLOCK

    assert row.dtype == torch.float32 and row.shape[-1] % FP8_BLOCK == 0 and n_nope % FP8_BLOCK == 0
    x = row.contiguous()
    d = x.shape[-1]
    y = torch.empty_like(x)
    n = x.numel() // d
    if n:
        grid = (n, d // FP8_BLOCK)
        _kv_round_kernel[grid](x, y, d, n_nope, FP8_AMAX_FLOOR, FP8=fp8, HALF=half, **pdl.launch(grid), num_warps=1)
    return y


# ---- the indexer rounding (Hadamard + FP4, then f16 for cached rows) in one launch ------
# `index_round(x, h, fp4, half)`: x float32 [..., d_I] -> fp4_round(x @ h) (when fp4), then
# through IEEE half (when half): numerics.indexer_rounding (about 20 torch launches). The
# product runs as an ieee tl.dot (fp32 order differs from torch's matmul, which can move an
# element across an E2M1 midpoint: one FP4 step, rarely); the scale from the float bits as
# in kv_round.

# Warps of an index_round program (decode calls it on the indexer branches, for one or 64 rows).
# 8 instead of 4 made the whole 2K decode step 5.51 -> 6.44 ms on the H200 (bench/decode_variants.py,
# variant index-round-w8), ~22 µs more per call; why was not looked into.
INDEX_ROUND_WARPS = 4


@triton.jit
def _index_round_kernel(x_ptr, h_ptr, y_ptr, R, amax_floor, D: tl.constexpr, BR: tl.constexpr,
                        FP4: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = (rows < R)[:, None]
    d = tl.arange(0, D)
    ptr = rows.to(tl.int64)[:, None] * D + d[None, :]
    x = tl.load(x_ptr + ptr, mask=rm, other=0.0)
    if FP4:
        h = tl.load(h_ptr + d[:, None] * D + d[None, :])
        y = tl.reshape(tl.dot(x, h, input_precision="ieee"), [BR, D // 32, 32])
        amax = tl.maximum(tl.max(tl.abs(y), axis=2), amax_floor)
        s = _pow2_ceil(tl.div_rn(amax, 6.0))[:, :, None]
        a = tl.minimum(tl.maximum(y / s, -6.0), 6.0)
        mag = tl.abs(a)
        step = tl.where(mag < 2.0, 0.5, tl.where(mag < 4.0, 1.0, 2.0))
        q = mag / step
        q = ((q + 12582912.0) - 12582912.0) * step      # round half to even, q <= 12
        x = tl.reshape(tl.where(a < 0.0, -q, q) * s, [BR, D])
    if HALF:
        x = x.to(tl.float16).to(tl.float32)
    tl.store(y_ptr + ptr, x, mask=rm)


def index_round(x: torch.Tensor, h: torch.Tensor, fp4: bool, half: bool) -> torch.Tensor:
    d = x.shape[-1]
    assert x.dtype == h.dtype == torch.float32 and h.shape == (d, d) and h.is_contiguous()
    assert d % FP4_BLOCK == 0 and d & (d - 1) == 0
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel() // d
    grid = (triton.cdiv(n, 16),)
    _index_round_kernel[grid](xc, h, y, n, FP4_AMAX_FLOOR, D=d, BR=16, FP4=fp4, HALF=half,
                              **pdl.launch(grid), num_warps=INDEX_ROUND_WARPS)
    return y


# ---- indexer scores over the row capacity in one launch --------------------------------
# `index_scores(q, wts, rows, pos, r, denom)`: q float32 [H_I, d_I] (rounded query heads),
# wts [H_I] (the weights projection), rows [cap, d_I], pos int64 [1] -> float32 [1, cap]:
# sum_h wts[h] / denom * relu(q[h] . rows[c]) for the visible rows c < (pos + 1) // r, -inf
# for the rest; the forward's einsum / relu / einsum / masked_fill (fp32 order differs).
# The grid is fixed by cap (graph capture), one small block of rows per program so that a
# short context still spreads over the SMs; a block wholly past the visible count (read on
# the device) only stores -inf, so the cost follows the filled rows, not the allocation.
# The heads go through tl.dot in chunks of INDEX_SCORE_HEADS (one [d_I, rows] tile and a
# [heads, d_I] chunk in registers) at INDEX_SCORE_DOT precision: "tf32x3" (three tf32
# tensor-core products, ~fp32 accuracy, as the decode attention) or "ieee" (fp32 FMA).
# On ratio-4 layers the indexer branch (compressors, index query, these scores, the top-k)
# is longer than the query heads' mat-vec it runs beside, so its latency is the layer's.

INDEX_SCORE_ROWS = 16
INDEX_SCORE_HEADS = 64
INDEX_SCORE_DOT = "tf32x3"


@triton.jit
def _index_score_kernel(q_ptr, w_ptr, rows_ptr, pos_ptr, out_ptr, CAP, H, denom, R: tl.constexpr,
                        HC: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, DOT: tl.constexpr,
                        PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    c0 = tl.program_id(0) * BC
    c = c0 + tl.arange(0, BC)
    n_vis = (tl.load(pos_ptr) + 1) // R
    if c0 < n_vis:
        vis = c < n_vis
        d = tl.arange(0, D)
        k = tl.load(rows_ptr + c.to(tl.int64)[None, :] * D + d[:, None], mask=vis[None, :], other=0.0)  # [D, BC]
        sc = tl.zeros([BC], dtype=tl.float32)
        for h0 in range(0, H, HC):
            hh = h0 + tl.arange(0, HC)
            hm = hh < H
            q = tl.load(q_ptr + hh[:, None] * D + d[None, :], mask=hm[:, None], other=0.0)            # [HC, D]
            s = tl.maximum(tl.dot(q, k, input_precision=DOT), 0.0)                                   # [HC, BC]
            w = tl.load(w_ptr + hh, mask=hm, other=0.0) / denom
            sc += tl.sum(w[:, None] * s, axis=0)
        tl.store(out_ptr + c, tl.where(vis, sc, float("-inf")), mask=c < CAP)
    else:
        tl.store(out_ptr + c, tl.full([BC], float("-inf"), tl.float32), mask=c < CAP)


def index_scores(q, wts, rows, pos, r: int, denom: float) -> torch.Tensor:
    n_h, d = q.shape
    cap = rows.shape[0]
    for t in (q, wts, rows):
        assert t.dtype == torch.float32 and t.is_contiguous()
    assert rows.shape[1] == d and wts.numel() == n_h and d & (d - 1) == 0 and d >= 16 and pos.dtype == torch.int64
    out = torch.empty(1, cap, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(cap, INDEX_SCORE_ROWS),)
    _index_score_kernel[grid](q, wts, rows, pos, out, cap, n_h, denom, R=r,
                              HC=min(INDEX_SCORE_HEADS, max(16, triton.next_power_of_2(n_h))), D=d,
                              BC=INDEX_SCORE_ROWS, DOT=INDEX_SCORE_DOT, **pdl.launch(grid), num_warps=4)
    return out
