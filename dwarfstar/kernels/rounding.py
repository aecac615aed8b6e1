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
