"""Decode glue in one launch each: RMS norm, and partial RoPE from a cos/sin table.

Dims: R rows, D row width, T tokens, Dv vector width, P table positions, NP = d_r / 2 pairs.

Contract:
- `rms_norm(x, weight, eps)`: x float32 [..., D] -> x * rsqrt(mean(x^2) + eps) (* weight),
  as model/numerics.rms_norm (which takes 4-5 torch launches; here one program per row).
- `rope_table(omega, n)`: (cos, sin) float32 [n, NP] for positions 0..n-1, computed exactly
  as model/rope.apply_rope computes its factors (float64 angle, cos/sin, then float32).
- `rope(x, positions, cos, sin, inverse=False)`: x float32 [T, ..., Dv], positions int64 [T]
  (< n of the table) -> x with the last 2 NP dims rotated pairwise as apply_rope (inverse:
  angle -phi). Works in place on a contiguous x (the forward never reuses an unrotated
  tensor) and returns it. About 14 torch launches in apply_rope, one here. Positions < 0
  use row 0 (their rows are discarded by the caller).
- `norm_rope(x, weight, eps, positions, cos, sin)`: x float32 [T, ..., D] -> rope(rms_norm(x,
  weight, eps), positions, cos, sin) in one launch (one program per row; the norm's sum is
  formed as in `rms_norm`, then the same products), a new tensor. Twin: `norm_rope_ref`.
- `swiglu(g, v, limit)`: g, v float32 [R, F] -> silu(min(g, limit)) * clamp(v, -limit, limit)
  (no clamp when limit <= 0), as model/moe.swiglu (up to 4 torch launches; the shared expert's).
- `rms_norm(..., quantize=True)` / `swiglu(..., quantize=True)` -> (y, yq): also y's int8 form,
  kernels/moe.py `quantize_act(y)` bit for bit, from the same registers (rows of a multiple of
  256), for the int8-activation products that read y (no quantiser launch of their own).
All differ from their twins (`rms_norm_ref`, `rope_ref`, model/moe.swiglu) by fp32 rounding only
(sum order, contraction into FMA, the exp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels.moe import act_buffers, store_int8_act
from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.model.numerics import rms_norm as rms_norm_ref
from dwarfstar.model.rope import apply_rope

NORM_BLOCK = 1024


def rope_table(omega: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    phi = torch.arange(n, dtype=torch.float64, device=omega.device)[:, None] * omega.double()[None, :]
    return phi.cos().float().contiguous(), phi.sin().float().contiguous()


def rope_ref(x, positions, omega_or_table, inverse: bool = False, omega=None):
    """Twin: model/rope.apply_rope (the table is ignored; omega is what the twin needs)."""
    return apply_rope(x, positions, omega, inverse)


@triton.jit
def row_rsqrt(x_ptr, row, eps, D, BLOCK: tl.constexpr):
    """rsqrt(mean(x[row]^2) + eps) of a [.., D] float32 row, summed BLOCK lanes at a time (the
    RMS norm's scale; kernels/hc.py folds the same scale into the HC split)."""
    base = row.to(tl.int64) * D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + base + offs, mask=offs < D, other=0.0)
        acc += v * v
    return 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / D + eps)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, eps, qw_ptr, qs_ptr, qq_ptr, HAS_W: tl.constexpr, BLOCK: tl.constexpr,
                     QUANT: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    r = row_rsqrt(x_ptr, row, eps, D, BLOCK)
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        m = offs < D
        y = tl.load(x_ptr + base + offs, mask=m, other=0.0) * r
        if HAS_W:
            y = y * tl.load(w_ptr + offs, mask=m, other=0.0)
        tl.store(y_ptr + base + offs, y, mask=m)
        if QUANT:   # BLOCK divides D (the launcher's check): no masked lane
            store_int8_act(y, qw_ptr + row * (D // 4) + d0 // 4, qs_ptr + row * (D // 32) + d0 // 32,
                           qq_ptr + row * (D // 16) + d0 // 16, BLOCK // 32, USE_ASM)


def _act_form(rows: int, d: int, block: int, quantize: bool, device):
    """int8-form buffers for `quantize=True` (or placeholders), after the launchers' check."""
    if not quantize:
        return None
    assert d % 256 == 0 and d % block == 0, "the int8 form needs rows of a multiple of 256"
    return act_buffers(rows, d, device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, quantize: bool = False):
    assert x.dtype == torch.float32, "x: float32"
    d = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty_like(xc)
    if weight is not None:
        assert weight.dtype == torch.float32 and weight.is_contiguous() and weight.shape == (d,)
    block = min(NORM_BLOCK, triton.next_power_of_2(d))
    rows = xc.numel() // d
    yq = _act_form(rows, d, block, quantize, x.device)
    grid = (rows,)
    _rms_norm_kernel[grid](xc, weight if weight is not None else xc, y, d, eps, *(yq or (y, y, y)),
                           HAS_W=weight is not None, BLOCK=block, QUANT=quantize, USE_ASM=x.is_cuda,
                           **pdl.launch(grid), num_warps=4)
    return (y, yq) if quantize else y


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, R, DV, HEAD,
                 NP: tl.constexpr, INVERSE: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    rb = tl.program_id(1)
    # Negative positions (a compressor window not yet complete in decode) read row 0: the
    # forward discards those rows; the clamp only keeps the load inside the table.
    p = tl.maximum(tl.load(pos_ptr + t), 0)
    j = tl.arange(0, NP)
    c = tl.load(cos_ptr + p * NP + j)
    s = tl.load(sin_ptr + p * NP + j)
    if INVERSE:
        s = -s
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    m = (rows < R)[:, None]
    ptr = x_ptr + ((t.to(tl.int64) * R + rows) * DV + HEAD)[:, None] + 2 * j[None, :]
    a = tl.load(ptr, mask=m, other=0.0)
    b = tl.load(ptr + 1, mask=m, other=0.0)
    tl.store(ptr, a * c[None, :] - b * s[None, :], mask=m)
    tl.store(ptr + 1, a * s[None, :] + b * c[None, :], mask=m)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         inverse: bool = False) -> torch.Tensor:
    assert x.dtype == torch.float32 and positions.dtype == torch.int64 and positions.shape == (x.shape[0],)
    n_pairs = cos.shape[1]
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape
    assert n_pairs & (n_pairs - 1) == 0, "pairs per vector: a power of two"
    x = x.contiguous()
    t, dv = x.shape[0], x.shape[-1]
    r = x.numel() // max(1, t * dv)
    block_r = min(16, triton.next_power_of_2(max(r, 1)))
    if t > 0 and r > 0:
        grid = (t, triton.cdiv(r, block_r))
        _rope_kernel[grid](x, positions, cos, sin, r, dv, dv - 2 * n_pairs,
                           NP=n_pairs, INVERSE=inverse, BLOCK_R=block_r, **pdl.launch(grid), num_warps=2)
    return x


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, y_ptr, pos_ptr, cos_ptr, sin_ptr, R, D, HEAD, eps,
                      HAS_W: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)              # token t = row // R
    base = row * D
    offs = tl.arange(0, BLOCK)
    m = offs < D
    v = tl.load(x_ptr + base + offs, mask=m, other=0.0)
    r = 1.0 / tl.sqrt_rn(tl.sum(v * v, axis=0) / D + eps)
    y = v * r
    if HAS_W:
        y = y * tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(y_ptr + base + offs, y, mask=m & (offs < HEAD))
    # The rotated pairs: reload the two halves of each pair, normalise them the same way.
    p = tl.maximum(tl.load(pos_ptr + row // R), 0)
    j = tl.arange(0, NP)
    ia = HEAD + 2 * j
    a = tl.load(x_ptr + base + ia) * r
    b = tl.load(x_ptr + base + ia + 1) * r
    if HAS_W:
        a = a * tl.load(w_ptr + ia)
        b = b * tl.load(w_ptr + ia + 1)
    c = tl.load(cos_ptr + p * NP + j)
    s = tl.load(sin_ptr + p * NP + j)
    tl.store(y_ptr + base + ia, a * c - b * s)
    tl.store(y_ptr + base + ia + 1, a * s + b * c)


def norm_rope_ref(x, weight, eps: float, positions, omega) -> torch.Tensor:
    """Twin of `norm_rope`: the reference norm, then the reference RoPE."""
    return apply_rope(rms_norm_ref(x, weight, eps), positions, omega)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    assert x.dtype == torch.float32 and positions.dtype == torch.int64 and positions.shape == (x.shape[0],)
    d, n_pairs = x.shape[-1], cos.shape[1]
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape
    assert n_pairs & (n_pairs - 1) == 0 and 2 * n_pairs <= d, "pairs per vector: a power of two, within D"
    block = triton.next_power_of_2(d)
    assert block <= 4 * NORM_BLOCK, "norm_rope holds one row in registers"
    if weight is not None:
        assert weight.dtype == torch.float32 and weight.is_contiguous() and weight.shape == (d,)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    rows = xc.numel() // d
    per_token = rows // max(1, x.shape[0])
    if rows:
        grid = (rows,)
        _norm_rope_kernel[grid](xc, weight if weight is not None else xc, y, positions, cos, sin,
                                per_token, d, d - 2 * n_pairs, eps, HAS_W=weight is not None,
                                BLOCK=block, NP=n_pairs, **pdl.launch(grid), num_warps=4)
    return y


@triton.jit
def _swiglu_kernel(g_ptr, v_ptr, y_ptr, F, limit, qw_ptr, qs_ptr, qq_ptr, HAS_LIMIT: tl.constexpr,
                   BLOCK: tl.constexpr, QUANT: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(g_ptr + row * F + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + row * F + offs, mask=mask, other=0.0)
    if HAS_LIMIT:
        g = tl.minimum(g, limit)
        v = tl.minimum(tl.maximum(v, -limit), limit)
    y = g / (1.0 + tl.exp(-g)) * v
    tl.store(y_ptr + row * F + offs, y, mask=mask)
    if QUANT:   # BLOCK divides F (the launcher's check): no masked lane
        d0 = tl.program_id(1) * BLOCK
        store_int8_act(y, qw_ptr + row * (F // 4) + d0 // 4, qs_ptr + row * (F // 32) + d0 // 32,
                       qq_ptr + row * (F // 16) + d0 // 16, BLOCK // 32, USE_ASM)


def swiglu(g: torch.Tensor, v: torch.Tensor, limit: float, quantize: bool = False):
    assert g.dtype == v.dtype == torch.float32 and g.shape == v.shape and g.dim() == 2
    g, v = g.contiguous(), v.contiguous()
    y = torch.empty_like(g)
    r, f = g.shape
    block = min(NORM_BLOCK, triton.next_power_of_2(f))
    yq = _act_form(r, f, block, quantize, g.device)
    grid = (r, triton.cdiv(f, block))
    _swiglu_kernel[grid](g, v, y, f, float(limit), *(yq or (y, y, y)), HAS_LIMIT=limit > 0,
                         BLOCK=block, QUANT=quantize, USE_ASM=g.is_cuda, **pdl.launch(grid), num_warps=4)
    return (y, yq) if quantize else y
