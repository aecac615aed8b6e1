"""Numeric primitives of the reference model and the QAT rounding points (model.md §2.1, §5).

Contract:
- `rms_norm(x, weight, eps)` normalises over the last dim; `weight=None` is the
  unweighted form used by HC inputs and the per-head q norm.
- `fp8_sim`, `fp4_sim`, `hadamard` reproduce the rounding DeepSeek's official code
  (and ds4) applies to KV rows and indexer vectors; `half_round` is ds4's f16 cache
  rounding. They return a new tensor of the input dtype and never touch the input.
- `Numerics` says which of them are on. "official" (default) = all on, matching ds4 /
  the official model; "exact" = all off, the un-quantised math transformers implements.
  `int8_act` (off in both; the CUDA engine's rounding point, which ds4's CUDA decode shares):
  inputs of Q8_0 mat-vecs rounded to int8 per 32 (`int8_round`) — the GPU tests' oracle sets it.
- `int8_quantize(x) -> (q, scale)` / `int8_round(x)`: per 32 inputs of the last dim, scale =
  amax / 127 (0 for an all-zero block), q = rint(x * (127 / amax)) in [-127, 127], both
  divisions correctly rounded to fp32; `int8_round` returns q * scale in x's dtype.

Block quantisers act on consecutive blocks of the last dim (its size must be a multiple
of the block). Scales are powers of two, so `x / s` is exact and only the element
rounding loses information.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

FP8_BLOCK = 64
FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
FP4_BLOCK = 32
FP4_MAX = 6.0
FP4_AMAX_FLOOR = 7.052966104933725e-38
INT8_BLOCK = 32
# E2M1 magnitudes by code, and the midpoints between neighbours (model.md §5.2).
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass(frozen=True)
class Numerics:
    """Which rounding points are simulated. Build with `Numerics.of("official"|"exact")`."""

    fp8_kv: bool
    fp4_indexer: bool
    half_cache: bool
    int8_act: bool = False

    @classmethod
    def of(cls, name: str) -> "Numerics":
        if name == "official":
            return cls(fp8_kv=True, fp4_indexer=True, half_cache=True)
        if name == "exact":
            return cls(fp8_kv=False, fp4_indexer=False, half_cache=False)
        raise ValueError(f"numerics must be 'official' or 'exact', got {name!r}")


def int8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., n] -> (q float32 integers in [-127, 127] [..., n], scale float32 [..., n/32])."""
    xb = x.float().reshape(*x.shape[:-1], -1, INT8_BLOCK)
    amax = xb.abs().amax(-1)
    # Divisions in float64 then rounded to float32: correctly rounded fp32 quotients on any
    # device (torch's CUDA division by a scalar multiplies by the reciprocal instead).
    inv = torch.where(amax > 0, (127.0 / amax.double()).float(), torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None])  # round half to even, as the kernels' rint
    return q.reshape(x.shape), (amax.double() / 127.0).float()


def int8_round(x: torch.Tensor) -> torch.Tensor:
    """The activations an int8 kernel multiplies: int8 per 32 inputs, back to x's dtype."""
    q, scale = int8_quantize(x)
    return (q.view(*scale.shape, INT8_BLOCK) * scale[..., None]).view(x.shape).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    assert x.shape[-1] % block == 0, f"last dim {x.shape[-1]} is not a multiple of block {block}"
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _pow2_scale(blocks: torch.Tensor, floor: float, qmax: float) -> torch.Tensor:
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(floor)
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def fp8_sim(x: torch.Tensor) -> torch.Tensor:
    """Round to E4M3FN per block of 64 with a power-of-two scale (model.md §5.2 FP8sim)."""
    b = _blocks(x, FP8_BLOCK)
    s = _pow2_scale(b, FP8_AMAX_FLOOR, FP8_MAX)
    # float8_e4m3fn casts round to nearest, ties to even; x/s is exact, the f32 hop is too
    # for f32 inputs (f64 inputs get one extra rounding far below the fp8 step).
    q = (b / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float32).to(torch.float8_e4m3fn).to(x.dtype)
    return (q * s).reshape(x.shape)


def _e2m1_round(a: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude of a >= 0 (a <= 6), ties to the even code."""
    mids = torch.tensor(_FP4_MIDPOINTS, dtype=a.dtype, device=a.device)
    values = torch.tensor(_FP4_VALUES, dtype=a.dtype, device=a.device)
    lo = torch.bucketize(a, mids, right=False)
    hi = torch.bucketize(a, mids, right=True)
    # lo != hi only exactly on a midpoint: take the neighbour with the even code.
    code = torch.where(hi % 2 == 0, hi, lo)
    return values[code]


def fp4_sim(x: torch.Tensor) -> torch.Tensor:
    """Round to E2M1 per block of 32 with a power-of-two scale (model.md §5.2 FP4sim)."""
    b = _blocks(x, FP4_BLOCK)
    s = _pow2_scale(b, FP4_AMAX_FLOOR, FP4_MAX)
    y = (b / s).clamp(-FP4_MAX, FP4_MAX)
    return (torch.sign(y) * _e2m1_round(y.abs()) * s).reshape(x.shape)


@lru_cache(maxsize=8)
def _hadamard_matrix(n: int) -> torch.Tensor:
    assert n > 0 and n & (n - 1) == 0, f"Hadamard size must be a power of two, got {n}"
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        # Sylvester order: [[H, H], [H, -H]] (un-permuted, like ds4 and the official kernel).
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dim (Hadamard128 for Flash)."""
    return x @ _hadamard_matrix(x.shape[-1]).to(device=x.device, dtype=x.dtype)


def half_round(x: torch.Tensor) -> torch.Tensor:
    """Round through IEEE half, as ds4's CPU path stores cached rows."""
    return x.to(torch.float16).to(x.dtype)


def kv_row_rounding(row: torch.Tensor, n_nope: int, numerics: Numerics) -> torch.Tensor:
    """QAT + cache rounding of a raw or compressed attention row [..., D] (after RoPE)."""
    if numerics.fp8_kv:
        row = torch.cat([fp8_sim(row[..., :n_nope]), row[..., n_nope:]], -1)
    return half_round(row) if numerics.half_cache else row


def indexer_rounding(v: torch.Tensor, numerics: Numerics, is_cached: bool) -> torch.Tensor:
    """Hadamard + FP4 of an indexer query head or row [..., d_I] (after RoPE)."""
    if numerics.fp4_indexer:
        v = fp4_sim(hadamard(v))
    return half_round(v) if (is_cached and numerics.half_cache) else v
