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
def _kv_round_kernel(x_ptr, y_ptr, D, N_NOPE, amax_floor, FP8: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * 64 + tl.arange(0, 64)
    v = tl.load(x_ptr + row * D + offs)
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
    tl.store(y_ptr + row * D + offs, v)


def kv_round(row: torch.Tensor, n_nope: int, fp8: bool, half: bool) -> torch.Tensor:
    from dwarfstar.model.numerics import FP8_AMAX_FLOOR, FP8_BLOCK

    assert row.dtype == torch.float32 and row.shape[-1] % FP8_BLOCK == 0 and n_nope % FP8_BLOCK == 0
    x = row.contiguous()
    d = x.shape[-1]
    y = torch.empty_like(x)
    n = x.numel() // d
    if n:
        _kv_round_kernel[(n, d // FP8_BLOCK)](x, y, d, n_nope, FP8_AMAX_FLOOR, FP8=fp8, HALF=half, num_warps=1)
    return y
