"""The compressor's decode step in two launches (model.md §2.4; model/compressor.compress).

Dims: C row width (norm weight), W = coff * C frontier row width (coff = 2 for r = 4,
else 1), S = 2r (r = 4) or r frontier slots, NP = d_r / 2 RoPE pairs, P table positions.

Contract (graph-safe: device positions, no allocation beyond the returned row):
- `compress_pool(a, z, ape, pos, kv_f, score_f, norm, cos, sin, eps, r) -> row [1, C]`:
  a, z float32 [1, W] (this token's kv and raw gate projections), ape [r, W], pos int64 [1],
  the frontier kv_f / score_f [S, W] (updated in place). Writes slot (pos mod r) (+ r for
  r = 4) with (a, z + ape[pos mod r]); pools the window per channel (softmax over the
  candidates: for r = 4 slots 0..3 at columns [:C] and 4..7 at [C:]), RMS-norms with
  `norm`, RoPEs the last 2 NP dims at position pos + 1 - r (cos/sin from glue.rope_table);
  when the window completes (pos + 1 ≡ 0 mod r) and r = 4, slots 4..7 take over 0..3.
  The row is always computed; it is meaningful only when the window completes (an
  incomplete first window pools the -inf scores to 0, never emitted).
- `emit_row(row, rows, pos, r, n_nope, fp8, half)`: when pos + 1 ≡ 0 mod r, writes row
  [1, C] to rows[(pos + 1) / r - 1], rounded as rounding.kv_round(row, n_nope, fp8, half) does
  (no rounding when both flags are off); otherwise writes nothing.
The twins `compress_pool_ref` / `emit_row_ref` are the torch ops forward.py used before
(about 40 launches per compressor step); the kernels differ from them by fp32 order only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels.rounding import _round_kv_block
from dwarfstar.model.numerics import FP8_AMAX_FLOOR, FP8_BLOCK, fp8_sim, half_round, rms_norm
from dwarfstar.model.rope import apply_rope
from dwarfstar.shape import OVERLAP_RATIO


@triton.jit
def _compress_pool_kernel(a_ptr, z_ptr, ape_ptr, pos_ptr, kv_ptr, sc_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
                          eps, R: tl.constexpr, C: tl.constexpr, W: tl.constexpr, OV: tl.constexpr,
                          NP: tl.constexpr, BLOCK: tl.constexpr):
    pos = tl.load(pos_ptr)
    ph = pos % R
    cur = ph + R if OV else ph
    ch = tl.arange(0, BLOCK)
    cm = ch < C
    # This token's candidate columns: [C:] for r = 4 (it sits in the second half), else all.
    hi = C if OV else 0
    a_cur = tl.load(a_ptr + hi + ch, mask=cm, other=0.0)
    z_cur = tl.load(z_ptr + hi + ch, mask=cm, other=0.0) + tl.load(ape_ptr + ph * W + hi + ch, mask=cm, other=0.0)
    for part in tl.static_range(2 if OV else 1):
        av = tl.load(a_ptr + part * C + ch, mask=cm, other=0.0)
        zv = tl.load(z_ptr + part * C + ch, mask=cm, other=0.0) + tl.load(ape_ptr + ph * W + part * C + ch,
                                                                          mask=cm, other=0.0)
        tl.store(kv_ptr + cur * W + part * C + ch, av, mask=cm)
        tl.store(sc_ptr + cur * W + part * C + ch, zv, mask=cm)
    NS: tl.constexpr = 2 * R if OV else R
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for i in range(NS):
        col = tl.where(i >= R, C, 0) if OV else 0
        s = tl.load(sc_ptr + i * W + col + ch, mask=cm, other=0.0)
        s = tl.where(i == cur, z_cur, s)
        m = tl.maximum(m, s)
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK], tl.float32)
    num = tl.zeros([BLOCK], tl.float32)
    for i in range(NS):
        col = tl.where(i >= R, C, 0) if OV else 0
        s = tl.load(sc_ptr + i * W + col + ch, mask=cm, other=0.0)
        v = tl.load(kv_ptr + i * W + col + ch, mask=cm, other=0.0)
        s = tl.where(i == cur, z_cur, s)
        v = tl.where(i == cur, a_cur, v)
        p = tl.exp(s - m)
        den += p
        num += p * v
    pooled = num / tl.where(den > 0.0, den, 1.0)
    pooled = tl.where(cm, pooled, 0.0)
    rn = 1.0 / tl.sqrt_rn(tl.sum(pooled * pooled, axis=0) / C + eps)
    y = pooled * rn * tl.load(w_ptr + ch, mask=cm, other=0.0)
    tl.debug_barrier()
    if OV:
        if ph == R - 1:
            for i in range(R):
                for part in tl.static_range(2):
                    kv = tl.load(kv_ptr + (R + i) * W + part * C + ch, mask=cm, other=0.0)
                    sc = tl.load(sc_ptr + (R + i) * W + part * C + ch, mask=cm, other=0.0)
                    tl.store(kv_ptr + i * W + part * C + ch, kv, mask=cm)
                    tl.store(sc_ptr + i * W + part * C + ch, sc, mask=cm)
    # RoPE on the last 2 NP dims at the window's first position (pairs (2j, 2j + 1)).
    tl.store(out_ptr + ch, y, mask=cm)
    tl.debug_barrier()
    head = C - 2 * NP
    rm = cm & (ch >= head)
    partner = tl.load(out_ptr + (ch ^ 1), mask=rm, other=0.0)
    tl.debug_barrier()
    p0 = tl.maximum(pos + 1 - R, 0)
    j = tl.where(rm, (ch - head) // 2, 0)
    c = tl.load(cos_ptr + p0 * NP + j, mask=rm, other=1.0)
    s = tl.load(sin_ptr + p0 * NP + j, mask=rm, other=0.0)
    odd = ((ch - head) % 2) == 1
    rot = tl.where(odd, partner * s + y * c, y * c - partner * s)
    tl.store(out_ptr + ch, tl.where(rm, rot, y), mask=cm)


def compress_pool(a, z, ape, pos, kv_f, score_f, norm, cos, sin, eps: float, r: int) -> torch.Tensor:
    ov = r == OVERLAP_RATIO
    c = norm.shape[0]
    w = kv_f.shape[1]
    assert w == (2 if ov else 1) * c and kv_f.shape[0] == (2 * r if ov else r)
    for t in (a, z, ape, kv_f, score_f, norm, cos, sin):
        assert t.dtype == torch.float32 and t.is_contiguous()
    assert a.numel() == w and z.numel() == w and pos.dtype == torch.int64 and c % 2 == 0
    out = torch.empty(1, c, dtype=torch.float32, device=a.device)
    _compress_pool_kernel[(1,)](a, z, ape, pos, kv_f, score_f, norm, cos, sin, out, eps, R=r, C=c, W=w, OV=ov,
                                NP=cos.shape[1], BLOCK=triton.next_power_of_2(c), num_warps=4)
    return out


@triton.jit
def _emit_row_kernel(x_ptr, rows_ptr, pos_ptr, C, N_NOPE, amax_floor, R: tl.constexpr,
                     FP8: tl.constexpr, HALF: tl.constexpr):
    blk = tl.program_id(0)
    pos = tl.load(pos_ptr)
    idx = tl.maximum((pos + 1) // R - 1, 0).to(tl.int64)
    offs = blk * 64 + tl.arange(0, 64)
    v = _round_kv_block(tl.load(x_ptr + offs), blk, N_NOPE, amax_floor, FP8, HALF)
    emit = tl.full([64], 0, tl.int32) + ((pos + 1) % R == 0).to(tl.int32)
    tl.store(rows_ptr + idx * C + offs, v, mask=(offs < C) & (emit != 0))


def emit_row(row, rows, pos, r: int, n_nope: int = 0, fp8: bool = False, half: bool = False) -> None:
    c = rows.shape[1]
    assert row.dtype == rows.dtype == torch.float32 and row.is_contiguous() and rows.is_contiguous()
    assert row.numel() == c and c % FP8_BLOCK == 0 and n_nope % FP8_BLOCK == 0
    _emit_row_kernel[(c // FP8_BLOCK,)](row, rows, pos, c, n_nope, FP8_AMAX_FLOOR, R=r, FP8=fp8, HALF=half,
                                        num_warps=1)


# ---- twins ------------------------------------------------------------------------------

def compress_pool_ref(a, z, ape, pos, kv_f, score_f, norm, omega, eps: float, r: int) -> torch.Tensor:
    ov = r == OVERLAP_RATIO
    width = norm.shape[0]
    slot = pos % r + (r if ov else 0)
    kv_f.index_copy_(0, slot, a)
    score_f.index_copy_(0, slot, z + ape[pos % r])
    if ov:
        kv = torch.cat([kv_f[:r, :width], kv_f[r:, width:]])
        score = torch.cat([score_f[:r, :width], score_f[r:, width:]])
    else:
        kv, score = kv_f, score_f
    pooled = (torch.softmax(score, 0) * kv).sum(0, keepdim=True)
    row = apply_rope(rms_norm(pooled, norm, eps), pos + 1 - r, omega)
    if ov:
        emit = ((pos + 1) % r == 0)[:, None]
        kv_f[:r].copy_(torch.where(emit, kv_f[r:], kv_f[:r]))
        score_f[:r].copy_(torch.where(emit, score_f[r:], score_f[:r]))
    return row


def emit_row_ref(row, rows, pos, r: int, n_nope: int = 0, fp8: bool = False, half: bool = False) -> None:
    if fp8:
        row = torch.cat([fp8_sim(row[..., :n_nope]), row[..., n_nope:]], -1)
    if half:
        row = half_round(row)
    emit = ((pos + 1) % r == 0)[:, None]
    idx = ((pos + 1) // r - 1).clamp_min(0)
    rows.index_copy_(0, idx, torch.where(emit, row, rows.index_select(0, idx)))
