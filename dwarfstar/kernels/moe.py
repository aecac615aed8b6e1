"""Routed-MoE decode: gate/up mat-vecs + clamped SwiGLU of the selected experts, then the
weighted down mat-vec summed over them (model.md §2.6), for B tokens with K experts each.

Dims: B tokens, K experts per token, E experts, D hidden (expert input), F expert width,
KB = inputs / 256 super-blocks per row.

Contract:
- `moe_gate_up(gate, up, x, ids, weights, limit)`: gate/up planar [E, F, D] of one format
  (IQ2_XXS, Q2_K or Q4_K), x float32 [B, D], ids int32 [B, K], weights float32 [B, K] ->
  mid float32 [B, K, F] = weights[b, k] * silu(min(g, limit)) * clamp(v, -limit, limit),
  g = W_gate[ids[b, k]] x_q[b], v = W_up[ids[b, k]] x_q[b]; no clamp when limit <= 0.
- `moe_down(down, mid, ids)`: down planar [E, D, F], mid float32 [B, K, F] ->
  y float32 [B, D] = sum_k W_down[ids[b, k]] mid_q[b, k]. `moe_down_parts` returns the
  partials [B, K * splits, D] (per expert and input range) for a consumer to sum.
- `moe_decode(...)` = moe_down(moe_gate_up(...)). All take an optional preallocated `out`
  (static addresses for CUDA graphs), never sync, read only the selected experts.
- Activations are quantised by a small kernel (`quantize_act`) that each launcher runs first
  (so a launcher is two launches; a producer kernel can later write this form itself): per 32
  inputs, amax = max |a|, q = rint(a * (127 / amax)), scale = amax / 127 (0 when amax = 0),
  both divisions correctly rounded. `a_q` above is q * scale. The twins quantise identically
  and then work in float64, so kernel and twin differ by fp32 rounding only; both differ from
  the unquantised product by the int8 rounding of the activations (~0.5 % relative,
  kernels.md §7: <= 2e-2).

Decoders (why this is fast): each program owns BLOCK_N rows of one expert and walks the
input one 256-element super-block at a time. A super-block's bytes are loaded once as
vectors ([BN, 16|32] int32 words) and expanded with shifts and reshapes into int32 words of
four int8 weights that line up with four consecutive activations, then multiplied with
`dp4a` (USE_ASM) or its plain-integer twin (the interpreter). No per-element div/mod.
- IQ2_XXS: one 8-byte gather per octet from a 2 KB int64 grid table (each byte one grid
  value 8/25/43); signs come from the 7 stored bits + parity, spread to byte masks by a
  multiply (bit i -> byte i), applied as (g ^ 0xFF..) + 1 per negative byte (never carries:
  ~43 + 1 < 256). (A 1 KB table of sign byte masks instead of the parity and multiply ran
  the gate/up kernel 23 % slower on the H200: a second gather per octet costs more than the
  arithmetic it saves.)
- Q2_K: byte 32h + l holds elements 128h + 32s + l in bit pair s, so (word >> 2s) & 0x03..
  is four consecutive codes; Q4_K: (word >> 4n) & 0x0F.. likewise. Mins use the per-16/32
  sums of the quantised activations.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl
from gguf.quants import IQ2_XXS

from dwarfstar.kernels import moe_nvrtc
from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.model.numerics import INT8_BLOCK, int8_quantize
from dwarfstar.kernels.repack import (
    Planar, PlanarIQ2XXS, PlanarQ2K, PlanarQ4K, dequantize_planar, select_experts,
)
from dwarfstar.shape import QK_K

# Activation quantisation block (one int8 scale per 32 inputs).
QBLOCK = INT8_BLOCK
FMT = {PlanarIQ2XXS: 1, PlanarQ2K: 2, PlanarQ4K: 3}
# Defaults = the q2 B = 1 winners of bench/moe_bench.py's sweep on H200 (docs/PERF.md,
# 2026-11-24): gate/up (8, 2 warps, 3 stages); down with one program per expert and input
# half (2026-11-23, second sweep): (32, 2, 2), 2 splits — 12.9 µs incl. its quantise launch
# and the partial sum, was 34 µs with one program per row block over all 6 experts.
GATE_UP_BLOCK_N = 8
DOWN_BLOCK_N = 32
# Input ranges per expert of the down kernel (partials summed by the consumer).
DOWN_SPLITS = 2
NUM_WARPS = 2
NUM_STAGES = 3
DOWN_STAGES = 2


def quantize_act_ref(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [..., n] -> (q float32 integers in [-127, 127] [..., n], scale [..., n/32])."""
    return int8_quantize(a)


def _dequantized_act(a: torch.Tensor) -> torch.Tensor:
    """float64 [..., n]: the activations the kernels actually multiply (q * scale)."""
    q, s = quantize_act_ref(a)
    return (q.double().reshape(*s.shape, QBLOCK) * s.double()[..., None]).reshape(a.shape)


def _clamped_swiglu(g: torch.Tensor, v: torch.Tensor, limit: float) -> torch.Tensor:
    if limit > 0:
        g, v = g.clamp(max=limit), v.clamp(-limit, limit)
    return g * torch.sigmoid(g) * v


def moe_gate_up_ref(gate: Planar, up: Planar, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    limit: float, out: torch.Tensor | None = None, xq=None) -> torch.Tensor:
    """Twin of `moe_gate_up`: dequantise the selected experts, float64 products (xq, a producer's
    int8 form of x, is ignored: the twin quantises x itself)."""
    n_tok, k = ids.shape
    flat = ids.reshape(-1)
    xq = _dequantized_act(x).repeat_interleave(k, dim=0)  # [B*K, D]
    g = torch.einsum("sfd,sd->sf", dequantize_planar(select_experts(gate, flat)).double(), xq)
    v = torch.einsum("sfd,sd->sf", dequantize_planar(select_experts(up, flat)).double(), xq)
    mid = weights.double().reshape(-1, 1) * _clamped_swiglu(g, v, limit)
    mid = mid.float().reshape(n_tok, k, -1)  # [B, K, F]
    return mid if out is None else out.copy_(mid)


def moe_down_ref(down: Planar, mid: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of `moe_down`: sum over k of the selected experts' products, float64."""
    n_tok, k, f = mid.shape
    w = dequantize_planar(select_experts(down, ids.reshape(-1))).double()  # [B*K, D, F]
    y = torch.einsum("sdf,sf->sd", w, _dequantized_act(mid).reshape(-1, f))
    y = y.reshape(n_tok, k, -1).sum(1).float()  # [B, D]
    return y if out is None else out.copy_(y)


def moe_decode_ref(gate, up, down, x, ids, weights, limit):
    return moe_down_ref(down, moe_gate_up_ref(gate, up, x, ids, weights, limit), ids)


@functools.lru_cache(maxsize=None)
def iq2xxs_grid64(device: str) -> torch.Tensor:
    """int64 [256]: grid row a as 8 bytes (element t in byte t), from gguf-py's table."""
    IQ2_XXS.init_grid()
    g = np.ascontiguousarray(IQ2_XXS.grid.reshape(256, 8), dtype=np.uint8)
    return torch.from_numpy(g.view(np.int64).reshape(256).copy()).to(device)


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum over the four bytes of a * b, bytes read as signed int8 (int32 tensors)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
            dtype=tl.int32, is_pure=True, pack=1)
    else:
        acc = c
        for i in tl.static_range(4):
            acc += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return acc


@triton.jit
def int8_act_tile(v, R: tl.constexpr, USE_ASM: tl.constexpr):
    """`quantize_act` of R * 32 consecutive activations v (float32 [R * 32]) in registers ->
    (words int32 [R * 8] (word w packs q[4w..4w+3], q[4w] in the low byte), scales [R] (per 32),
    the integers q [R, 32])."""
    a = tl.reshape(v, [R, 32])
    amax = tl.max(tl.abs(a), axis=1)
    safe = tl.where(amax > 0, amax, 1.0)
    inv = tl.where(amax > 0, tl.div_rn(tl.full([R], 127.0, tl.float32), safe), 0.0)
    v = a * inv[:, None]
    if USE_ASM:
        # One instruction, and no chance of the product being fused into an FMA (which would
        # round the exact product, not the fp32 one the twin rounds).
        q = tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [v], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        # rint by the 1.5 * 2**23 trick: exact round-half-even for |v| <= 127.
        q = ((v + 12582912.0) - 12582912.0).to(tl.int32)
    shift = 8 * tl.arange(0, 4)
    words = tl.sum((tl.reshape(q, [R * 8, 4]) & 255) << shift[None, :], axis=1)
    return words, tl.div_rn(amax, tl.full([R], 127.0, tl.float32)), q


@triton.jit
def store_int8_act(v, words_ptr, scale_ptr, qsum_ptr, R: tl.constexpr, USE_ASM: tl.constexpr):
    """`quantize_act` of R * 32 consecutive activations v (float32 [R * 32]): stores their words
    [R * 8], scales [R] (per 32) and integer sums [R * 2] (per 16) at these pointers (the caller
    offsets them). The quantiser kernel and producer kernels that write their output's int8 form
    (hc_split_norm, glue, the attention combine) all come here."""
    words, scale, q = int8_act_tile(v, R, USE_ASM)
    tl.store(words_ptr + tl.arange(0, R * 8), words)
    tl.store(scale_ptr + tl.arange(0, R), scale)
    tl.store(qsum_ptr + tl.arange(0, R * 2), tl.sum(tl.reshape(q, [R * 2, 16]), axis=1))


@triton.jit
def _quantize_act_kernel(a_ptr, words_ptr, scale_ptr, qsum_ptr, n, USE_ASM: tl.constexpr, PDL: tl.constexpr = False):
    """Program (r, j): super-block j (256 inputs) of activation row r."""
    wait_for_inputs(PDL)
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    a = tl.load(a_ptr + r * n + j * 256 + tl.arange(0, 256))
    store_int8_act(a, words_ptr + r * (n // 4) + j * 64, scale_ptr + r * (n // 32) + j * 8,
                   qsum_ptr + r * (n // 16) + j * 16, 8, USE_ASM)


def act_buffers(rows: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (words, scales, sums) of `quantize_act` for [rows, n] activations."""
    return (torch.empty(rows, n // 4, dtype=torch.int32, device=device),
            torch.empty(rows, n // 32, dtype=torch.float32, device=device),
            torch.empty(rows, n // 16, dtype=torch.int32, device=device))


@triton.jit
def iq2xxs_signed_words(gw, sw, grid_ptr):
    """Grid words gw and sign+scale words sw [R, 8] of IQ2_XXS groups -> (lo, hi) int32 [R, 8, 4]:
    each octet's 8 signed grid bytes as two words of 4 int8 (byte t = element t), read from the
    int64 grid table (`iq2xxs_grid64`). The 8th sign is the parity of the 7 stored ones; a
    negative byte g becomes 256 - g, which never carries (g <= 43)."""
    octet = tl.arange(0, 4)[None, None, :]
    g8 = tl.load(grid_ptr + ((gw[:, :, None] >> (8 * octet)) & 255))  # int64: the octet's 8 grid bytes
    si = (sw[:, :, None] >> (7 * octet)) & 127
    par = si ^ (si >> 4)
    par = par ^ (par >> 2)
    s8 = si | (((par ^ (par >> 1)) & 1) << 7)
    # bit i of a nibble -> byte i (0 or 1); no two partial products overlap
    m_lo = ((s8 & 15) * 0x00204081) & 0x01010101
    m_hi = ((s8 >> 4) * 0x00204081) & 0x01010101
    lo = (g8.to(tl.int32) ^ ((m_lo << 8) - m_lo)) + m_lo
    hi = ((g8 >> 32).to(tl.int32) ^ ((m_hi << 8) - m_hi)) + m_hi
    return lo, hi


@triton.jit
def _sb_iq2_xxs(w_ptr, d_ptr, grid_ptr, rows, kb, KB, mask_n, words, scale, USE_ASM: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """fp32 [BN]: dot of one IQ2_XXS super-block of BN rows with the quantised activations."""
    base = (rows * KB + kb) * 16
    wv = tl.load(w_ptr + base[:, None] + tl.arange(0, 16)[None, :], mask=mask_n[:, None], other=0)
    gw, sw = tl.split(tl.reshape(wv, [BLOCK_N, 8, 2]))  # [BN, 8] grid / sign+scale words
    lo, hi = iq2xxs_signed_words(gw, sw, grid_ptr)
    x_lo, x_hi = tl.split(tl.reshape(words, [8, 4, 2]))  # [8, 4]
    isum = _dp4a(lo, x_lo[None, :, :], tl.zeros_like(lo), USE_ASM)
    isum = tl.sum(_dp4a(hi, x_hi[None, :, :], isum, USE_ASM), axis=2)  # [BN, 8] per group of 32
    d = tl.load(d_ptr + rows * KB + kb, mask=mask_n, other=0).to(tl.float32)
    db = d[:, None] * (0.5 + ((sw >> 28) & 15).to(tl.float32)) * 0.25
    return tl.sum(isum.to(tl.float32) * db * scale[None, :], axis=1)


@triton.jit
def _sb_q2_k(qs_ptr, sc_ptr, dm_ptr, rows, kb, KB, mask_n, words, scale, qsum, USE_ASM: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """fp32 [BN]: dot of one Q2_K super-block (qs as int32 words) with the activations."""
    rb = rows * KB + kb
    wv = tl.load(qs_ptr + rb[:, None] * 16 + tl.arange(0, 16)[None, :], mask=mask_n[:, None], other=0)
    shift = 2 * tl.arange(0, 4)[None, None, :, None]
    codes = (tl.reshape(wv, [BLOCK_N, 2, 1, 8]) >> shift) & 0x03030303  # [BN, 2, 4, 8] = (h, s, w)
    x = tl.reshape(words, [2, 4, 8])
    isum = _dp4a(codes, x[None, :, :, :], tl.zeros_like(codes), USE_ASM)
    isum = tl.sum(tl.reshape(isum, [BLOCK_N, 16, 4]), axis=2)  # [BN, 16] per sub-block of 16
    sc = tl.load(sc_ptr + rb[:, None] * 16 + tl.arange(0, 16)[None, :], mask=mask_n[:, None], other=0).to(tl.int32)
    a = tl.sum(tl.reshape(isum * (sc & 15), [BLOCK_N, 8, 2]), axis=2)  # [BN, 8] per scale block
    m = tl.sum(tl.reshape((sc >> 4) * qsum[None, :], [BLOCK_N, 8, 2]), axis=2)
    d = tl.load(dm_ptr + rb * 2, mask=mask_n, other=0).to(tl.float32)
    dmin = tl.load(dm_ptr + rb * 2 + 1, mask=mask_n, other=0).to(tl.float32)
    a_f = tl.sum(a.to(tl.float32) * scale[None, :], axis=1)
    m_f = tl.sum(m.to(tl.float32) * scale[None, :], axis=1)
    return d * a_f - dmin * m_f


@triton.jit
def _sb_q4_k(qs_ptr, sc_ptr, mn_ptr, dm_ptr, rows, kb, KB, mask_n, words, scale, qsum, USE_ASM: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """fp32 [BN]: dot of one Q4_K super-block (qs as int32 words) with the activations."""
    rb = rows * KB + kb
    wv = tl.load(qs_ptr + rb[:, None] * 32 + tl.arange(0, 32)[None, :], mask=mask_n[:, None], other=0)
    shift = 4 * tl.arange(0, 2)[None, None, :, None]
    codes = (tl.reshape(wv, [BLOCK_N, 4, 1, 8]) >> shift) & 0x0F0F0F0F  # [BN, 4, 2, 8] = (c, n, w)
    x = tl.reshape(words, [4, 2, 8])
    isum = tl.sum(_dp4a(codes, x[None, :, :, :], tl.zeros_like(codes), USE_ASM), axis=3)
    isum = tl.reshape(isum, [BLOCK_N, 8])  # per sub-block of 32 = per activation scale
    offs8 = rb[:, None] * 8 + tl.arange(0, 8)[None, :]
    sc = tl.load(sc_ptr + offs8, mask=mask_n[:, None], other=0).to(tl.int32)
    mn = tl.load(mn_ptr + offs8, mask=mask_n[:, None], other=0).to(tl.int32)
    qsum = tl.sum(tl.reshape(qsum, [8, 2]), axis=1)  # per sub-block of 32
    d = tl.load(dm_ptr + rb * 2, mask=mask_n, other=0).to(tl.float32)
    dmin = tl.load(dm_ptr + rb * 2 + 1, mask=mask_n, other=0).to(tl.float32)
    a_f = tl.sum((isum * sc).to(tl.float32) * scale[None, :], axis=1)
    m_f = tl.sum((mn * qsum[None, :]).to(tl.float32) * scale[None, :], axis=1)
    return d * a_f - dmin * m_f


@triton.jit
def _sb_dot(p0, p1, p2, p3, rows, kb, KB, mask_n, words, scale, qsum,
            FMT: tl.constexpr, USE_ASM: tl.constexpr, BLOCK_N: tl.constexpr):
    if FMT == 1:
        return _sb_iq2_xxs(p0, p1, p2, rows, kb, KB, mask_n, words, scale, USE_ASM, BLOCK_N)
    elif FMT == 2:
        return _sb_q2_k(p0, p1, p2, rows, kb, KB, mask_n, words, scale, qsum, USE_ASM, BLOCK_N)
    else:
        return _sb_q4_k(p0, p1, p2, p3, rows, kb, KB, mask_n, words, scale, qsum, USE_ASM, BLOCK_N)


@triton.jit
def _load_act(aw_ptr, as_ptr, aq_ptr, r, kb, KB):
    """Super-block kb of quantised activation row r: (words [64], scales [8], sums [16])."""
    words = tl.load(aw_ptr + (r * KB + kb) * 64 + tl.arange(0, 64))
    scale = tl.load(as_ptr + (r * KB + kb) * 8 + tl.arange(0, 8))
    qsum = tl.load(aq_ptr + (r * KB + kb) * 16 + tl.arange(0, 16))
    return words, scale, qsum


@triton.jit
def _moe_gate_up_kernel(
    g0, g1, g2, g3, u0, u1, u2, u3, ids_ptr, wts_ptr, xw_ptr, xs_ptr, xq_ptr, mid_ptr, F, D, limit,
    FMT: tl.constexpr, K: tl.constexpr, HAS_LIMIT: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program (i, s): rows i*BN.. of slot s = b*K + k, gate and up together + SwiGLU."""
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    slot = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < F
    e = tl.load(ids_ptr + slot).to(tl.int64)
    # Global row in the stacked [E, F] weight; int64 because E*F*D exceeds 2**31.
    rows = tl.where(mask_n, e * F + offs_n, 0)
    KB = D // 256
    tok = (slot // K).to(tl.int64)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kb in range(0, KB):
        words, scale, qsum = _load_act(xw_ptr, xs_ptr, xq_ptr, tok, kb, KB)
        acc_g += _sb_dot(g0, g1, g2, g3, rows, kb, KB, mask_n, words, scale, qsum, FMT, USE_ASM, BLOCK_N)
        acc_u += _sb_dot(u0, u1, u2, u3, rows, kb, KB, mask_n, words, scale, qsum, FMT, USE_ASM, BLOCK_N)
    if HAS_LIMIT:
        acc_g = tl.minimum(acc_g, limit)
        acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
    wt = tl.load(wts_ptr + slot)
    mid = wt * (acc_g * tl.sigmoid(acc_g)) * acc_u
    tl.store(mid_ptr + slot.to(tl.int64) * F + offs_n, mid, mask=mask_n)


@triton.jit
def _moe_down_kernel(
    p0, p1, p2, p3, ids_ptr, mw_ptr, ms_ptr, mq_ptr, y_ptr, D, F,
    FMT: tl.constexpr, SPLITS: tl.constexpr, USE_ASM: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program (i, p): rows i*BN.. of partial p = slot * SPLITS + c, slot s = b*K + k: the
    c-th 1/SPLITS of expert ids[s]'s inputs. One program per (expert, input range) keeps
    enough of them in flight at B = 1 (one program per row block summing all K experts
    left most of the GPU idle); the launcher sums the partials in a fixed order."""
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    part = tl.program_id(1)
    slot = (part // SPLITS).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    KB = F // 256
    kb_per = KB // SPLITS
    e = tl.load(ids_ptr + slot).to(tl.int64)
    rows = tl.where(mask_n, e * D + offs_n, 0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kb in range((part % SPLITS) * kb_per, (part % SPLITS + 1) * kb_per):
        words, scale, qsum = _load_act(mw_ptr, ms_ptr, mq_ptr, slot, kb, KB)
        acc += _sb_dot(p0, p1, p2, p3, rows, kb, KB, mask_n, words, scale, qsum, FMT, USE_ASM, BLOCK_N)
    tl.store(y_ptr + part.to(tl.int64) * D + offs_n, acc, mask=mask_n)


def _weight_args(w: Planar) -> tuple[torch.Tensor, ...]:
    """The four pointer arguments of a decoder for this format (quant bytes as int32 words)."""
    for t in w.__dataclass_fields__:
        assert getattr(w, t).is_contiguous(), f"{type(w).__name__}.{t} must be contiguous"
    assert len(w.shape) == 3 and w.shape[-1] % QK_K == 0, "expert weight [E, N, K], K a multiple of 256"
    if isinstance(w, PlanarIQ2XXS):
        assert w.words.dtype == torch.int32 and w.d.dtype == torch.float16
        grid = iq2xxs_grid64(str(w.words.device))
        return w.words, w.d, grid, grid
    if isinstance(w, PlanarQ2K):
        assert w.qs.dtype == torch.uint8 and w.sc.dtype == torch.uint8 and w.dm.dtype == torch.float16
        return w.qs.view(torch.int32), w.sc, w.dm, w.dm
    assert isinstance(w, PlanarQ4K), f"no MoE decoder for {type(w).__name__}"
    assert w.qs.dtype == torch.uint8 and w.sc.dtype == torch.uint8 and w.dm.dtype == torch.float16
    return w.qs.view(torch.int32), w.sc, w.mn, w.dm


def quantize_act(a: torch.Tensor, use_asm: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 [R, n] -> (words int32 [R, n/4], scales float32 [R, n/32], sums int32 [R, n/16]):
    the int8 activations of `quantize_act_ref`, packed four per word, with per-16 sums."""
    assert a.dtype == torch.float32 and a.is_contiguous() and a.dim() == 2 and a.shape[1] % QK_K == 0, \
        "activations: float32 [R, n] contiguous, n a multiple of 256"
    r, n = a.shape
    words = torch.empty(r, n // 4, dtype=torch.int32, device=a.device)
    scale = torch.empty(r, n // 32, dtype=torch.float32, device=a.device)
    qsum = torch.empty(r, n // 16, dtype=torch.int32, device=a.device)
    grid = (r, n // QK_K)
    _quantize_act_kernel[grid](a, words, scale, qsum, n, USE_ASM=a.is_cuda if use_asm is None else use_asm,
                               **pdl.launch(grid), num_warps=2)
    return words, scale, qsum


def _check_routing(ids: torch.Tensor, n_tok: int, device) -> int:
    assert ids.dtype == torch.int32 and ids.is_contiguous() and ids.dim() == 2 and ids.shape[0] == n_tok, \
        "ids: int32 [B, K] contiguous"
    assert ids.device == device, "ids on the activations' device"
    return ids.shape[1]


def moe_gate_up(gate: Planar, up: Planar, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                limit: float, out: torch.Tensor | None = None, block_n: int = GATE_UP_BLOCK_N,
                num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES,
                use_asm: bool | None = None, xq=None) -> torch.Tensor:
    """mid [B, K, F] (see the module contract). IQ2_XXS on CUDA runs moe_nvrtc.py's kernel
    unless use_asm is given: dp4a asm or the plain-integer path of the Triton kernel
    (diagnostics; same integers). xq: `quantize_act(x)` already made by x's producer
    (kernels/hc.py hc_split_norm with quantize=True), else quantised here."""
    assert type(gate) is type(up) and gate.shape == up.shape, "gate and up: one format, one shape"
    _, f, d = gate.shape
    assert x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2 and x.shape[1] == d, \
        "x: float32 [B, D] contiguous"
    k = _check_routing(ids, x.shape[0], x.device)
    assert weights.dtype == torch.float32 and weights.is_contiguous() and weights.shape == ids.shape, \
        "weights: float32 [B, K] contiguous"
    if out is None:
        out = torch.empty(x.shape[0], k, f, dtype=torch.float32, device=x.device)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (x.shape[0], k, f)
    if use_asm is None and moe_nvrtc.usable(gate, x):
        # IQ2_XXS on CUDA: the CUDA C decoder with its tables in shared memory (moe_nvrtc.py).
        return moe_nvrtc.gate_up(gate, up, *(xq or quantize_act(x))[:2], ids, weights, limit, out)
    use_asm = x.is_cuda if use_asm is None else use_asm
    grid = (triton.cdiv(f, block_n), x.shape[0] * k)
    _moe_gate_up_kernel[grid](
        *_weight_args(gate), *_weight_args(up), ids, weights, *(xq or quantize_act(x, use_asm)), out, f, d,
        float(limit),
        FMT=FMT[type(gate)], K=k, HAS_LIMIT=limit > 0, USE_ASM=use_asm,
        BLOCK_N=block_n, **pdl.launch(grid), num_warps=num_warps, num_stages=num_stages,
    )
    return out


def moe_down_parts(down: Planar, mid: torch.Tensor, ids: torch.Tensor, block_n: int = DOWN_BLOCK_N,
                   num_warps: int = NUM_WARPS, num_stages: int = DOWN_STAGES, use_asm: bool | None = None,
                   splits: int = DOWN_SPLITS) -> torch.Tensor:
    """Partials [B, K * splits, D] of `moe_down`, one per expert and input range; their sum
    over dim 1 is y. A consumer that reads y anyway sums them there (kernels/hc.py hc_post)."""
    _, d, f = down.shape
    assert mid.dtype == torch.float32 and mid.is_contiguous() and mid.dim() == 3 and mid.shape[2] == f, \
        "mid: float32 [B, K, F] contiguous"
    k = _check_routing(ids, mid.shape[0], mid.device)
    assert mid.shape[1] == k, "mid and ids disagree on K"
    splits = math.gcd(splits, f // QK_K)  # whole super-blocks per range (tiny test shapes: 1)
    use_asm = mid.is_cuda if use_asm is None else use_asm
    parts = torch.empty(mid.shape[0], k * splits, d, dtype=torch.float32, device=mid.device)
    grid = (triton.cdiv(d, block_n), mid.shape[0] * k * splits)
    _moe_down_kernel[grid](
        *_weight_args(down), ids, *quantize_act(mid.reshape(-1, f), use_asm), parts, d, f,
        FMT=FMT[type(down)], SPLITS=splits, USE_ASM=use_asm, BLOCK_N=block_n, **pdl.launch(grid), num_warps=num_warps,
        num_stages=num_stages,
    )
    return parts


def moe_down(down: Planar, mid: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None,
             **tiling) -> torch.Tensor:
    """y [B, D] = sum_k W_down[ids[b, k]] mid[b, k] (the partials of `moe_down_parts`, summed)."""
    parts = moe_down_parts(down, mid, ids, **tiling)
    if out is None:
        out = torch.empty(parts.shape[0], parts.shape[2], dtype=torch.float32, device=mid.device)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (parts.shape[0], parts.shape[2])
    return torch.sum(parts, 1, out=out)


def moe_decode(gate: Planar, up: Planar, down: Planar, x: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts of B tokens: y [B, D] (two launches; mid [B, K, F] in between)."""
    return moe_down(down, moe_gate_up(gate, up, x, ids, weights, limit), ids)
