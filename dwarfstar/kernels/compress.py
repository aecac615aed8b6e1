"""The compressor's decode step in two launches (model.md §2.4; model/compressor.compress).

Dims: C row width (norm weight), W = coff * C frontier row width (coff = 2 for r = 4,
else 1), S = 2r (r = 4) or r frontier slots, NP = d_r / 2 RoPE pairs, P table positions.

Contract (graph-safe: device positions, no allocation beyond the returned row):
- `compress_pool(a, z, ape, pos, kv_f, score_f, norm, cos, sin, eps, r) -> [1, C]`:
  a, z float32 [1, W] (this token's kv and raw gate projections), ape [r, W],
  pos int64 [1], the frontier kv_f / score_f [S, W] (updated in place). Writes slot
  (pos mod r) (+ r for r = 4) with (a, z + ape[pos mod r]); pools the window per channel
  (softmax over the candidates: for r = 4 slots 0..3 at columns [:C] and 4..7 at [C:]);
  when the window completes (pos + 1 ≡ 0 mod r) and r = 4, slots 4..7 take over 0..3.
  With norm = None (cos, sin, eps unused) it returns the pooled row, the channels split
  over programs of POOL_BLOCK_C (each owns its columns of every slot: no program reads
  another's writes). With `norm` (cos/sin from glue.rope_table) the row is also RMS-normed
  with `norm` and RoPE'd on the last 2 NP dims at position pos + 1 - r: by the one program
  that pools it when its [slots x channels] tile is at most POOL_FINISH_TILE elements, else
  by a second launch after the wide pool. For rows that pass another finisher before the
  emit (the indexer's rounding).
  The row is always computed; it is meaningful only when the window completes (an
  incomplete first window pools the -inf scores to 0, never emitted).
- `emit_row(x, rows, pos, r, n_nope, fp8, half, norm=None, cos=None, sin=None, eps=0.0)`:
  with `norm`, x is a pooled row, first RMS-normed and RoPE'd as above (every program
  reads all of x for the norm's sum). Then, when pos + 1 ≡ 0 mod r, writes the row [1, C]
  to rows[(pos + 1) / r - 1], rounded as rounding.kv_round(row, n_nope, fp8, half) does
  (no rounding when both flags are off); otherwise writes nothing. One program per 64.
The twins `compress_pool_ref` / `emit_row_ref` are the torch ops forward.py used before
(about 40 launches per compressor step); the kernels differ from them by fp32 order only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.kernels.rounding import _round_kv_block
from dwarfstar.model.numerics import FP8_AMAX_FLOOR, FP8_BLOCK, fp8_sim, half_round, rms_norm
from dwarfstar.model.rope import apply_rope
from dwarfstar.shape import OVERLAP_RATIO

# Channels per pool program: C = 512 rows run on 16 programs (one program per row cost
# ~20 µs at r = 128 on the H200, docs/PERF.md). Warps: 4 once a program's candidate tile
# (slots x channels) reaches POOL_WIDE_TILE elements, else 1.
POOL_BLOCK_C = 32
POOL_WIDE_TILE = 2048
# Largest tile one program pools and finishes (r = 4: 8 x 512).
POOL_FINISH_TILE = 4096


@triton.jit
def _rope_block(y, c0, p0, cos_ptr, sin_ptr, C, NP: tl.constexpr, B: tl.constexpr):
    """y [B]: channels c0 .. c0 + B - 1 (c0 even) of a row; RoPE of the pairs (2j, 2j + 1)
    among its last 2 NP dims at table row p0 (as model/rope.apply_rope); others unchanged."""
    ev, od = tl.split(tl.reshape(y, (B // 2, 2)))
    j = c0 // 2 + tl.arange(0, B // 2) - (C // 2 - NP)          # pair index within the RoPE dims
    rm = (j >= 0) & (j < NP)
    jj = tl.where(rm, j, 0)
    c = tl.load(cos_ptr + p0 * NP + jj, mask=rm, other=1.0)
    s = tl.load(sin_ptr + p0 * NP + jj, mask=rm, other=0.0)
    ev2 = tl.where(rm, ev * c - od * s, ev)
    od2 = tl.where(rm, ev * s + od * c, od)
    return tl.reshape(tl.join(ev2, od2), (B,))


@triton.jit
def _compress_pool_kernel(a_ptr, z_ptr, ape_ptr, pos_ptr, kv_ptr, sc_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
                          eps, R: tl.constexpr, C: tl.constexpr, W: tl.constexpr, OV: tl.constexpr,
                          NP: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, FINISH: tl.constexpr,
                          PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    pos = tl.load(pos_ptr)
    ph = (pos % R).to(tl.int32)
    NS: tl.constexpr = 2 * R if OV else R
    cur = ph + R if OV else ph
    c0 = tl.program_id(0) * CB
    ch = c0 + tl.arange(0, CB)
    cm = ch < C
    # Slot write: this token's frontier row (both halves for r = 4), this program's channels.
    for part in tl.static_range(2 if OV else 1):
        av = tl.load(a_ptr + part * C + ch, mask=cm, other=0.0)
        zv = tl.load(z_ptr + part * C + ch, mask=cm, other=0.0) + tl.load(ape_ptr + ph * W + part * C + ch,
                                                                          mask=cm, other=0.0)
        tl.store(kv_ptr + cur * W + part * C + ch, av, mask=cm)
        tl.store(sc_ptr + cur * W + part * C + ch, zv, mask=cm)
    # The candidates [SB, CB]: slot i, at columns [C:] for i >= r when r = 4 (else [:C]); the
    # slot just written comes from registers (its stores need not be visible to other threads).
    hi = C if OV else 0
    a_cur = tl.load(a_ptr + hi + ch, mask=cm, other=0.0)
    z_cur = tl.load(z_ptr + hi + ch, mask=cm, other=0.0) + tl.load(ape_ptr + ph * W + hi + ch, mask=cm, other=0.0)
    i = tl.arange(0, SB)
    if OV:
        col = tl.where(i >= R, C, 0)
    else:
        col = i * 0
    offs = (i * W + col)[:, None] + ch[None, :]
    m2 = (i < NS)[:, None] & cm[None, :]
    is_cur = (i == cur)[:, None]
    s = tl.where(is_cur, z_cur[None, :], tl.load(sc_ptr + offs, mask=m2, other=float("-inf")))
    v = tl.where(is_cur, a_cur[None, :], tl.load(kv_ptr + offs, mask=m2, other=0.0))
    mx = tl.max(s, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    p = tl.exp(s - mx[None, :])
    den = tl.sum(p, axis=0)
    y = tl.sum(p * v, axis=0) / tl.where(den > 0.0, den, 1.0)
    y = tl.where(cm, y, 0.0)
    if OV:
        # Hand-over when the window completes: slots r..2r-1 (both halves) -> 0..r-1, after
        # every thread has read the old slots 0..r-1 above.
        tl.debug_barrier()
        k = tl.arange(0, R)
        hm = ((k * 0 + ph) == R - 1)[:, None] & cm[None, :]
        take = (k == ph)[:, None]
        for part in tl.static_range(2):
            src = ((R + k) * W)[:, None] + part * C + ch[None, :]
            dst = (k * W)[:, None] + part * C + ch[None, :]
            av = tl.load(a_ptr + part * C + ch, mask=cm, other=0.0)
            zv = tl.load(z_ptr + part * C + ch, mask=cm, other=0.0) + tl.load(ape_ptr + ph * W + part * C + ch,
                                                                              mask=cm, other=0.0)
            kv = tl.where(take, av[None, :], tl.load(kv_ptr + src, mask=hm, other=0.0))
            sc = tl.where(take, zv[None, :], tl.load(sc_ptr + src, mask=hm, other=0.0))
            tl.store(kv_ptr + dst, kv, mask=hm)
            tl.store(sc_ptr + dst, sc, mask=hm)
    if FINISH:
        # One program holds the whole row: RMS norm, then RoPE at the window's first position.
        rn = 1.0 / tl.sqrt_rn(tl.sum(y * y, axis=0) / C + eps)
        y = y * rn * tl.load(w_ptr + ch, mask=cm, other=0.0)
        y = _rope_block(y, 0, tl.maximum(pos + 1 - R, 0), cos_ptr, sin_ptr, C, NP, CB)
    tl.store(out_ptr + ch, y, mask=cm)


def compress_pool(a, z, ape, pos, kv_f, score_f, norm, cos, sin, eps: float, r: int,
                  block_c: int = POOL_BLOCK_C) -> torch.Tensor:
    ov = r == OVERLAP_RATIO
    s, w = kv_f.shape
    c = w // 2 if ov else w
    assert s == (2 * r if ov else r) and score_f.shape == kv_f.shape and ape.shape == (r, w)
    for t in (a, z, ape, kv_f, score_f):
        assert t.dtype == torch.float32 and t.is_contiguous()
    assert a.numel() == w and z.numel() == w and pos.dtype == torch.int64 and pos.numel() == 1
    finish = norm is not None
    if finish:
        for t in (norm, cos, sin):
            assert t.dtype == torch.float32 and t.is_contiguous()
        assert norm.shape == (c,) and c % 2 == 0 and 2 * cos.shape[1] <= c and sin.shape == cos.shape
    sb = triton.next_power_of_2(s)
    one = finish and sb * triton.next_power_of_2(c) <= POOL_FINISH_TILE
    cb = triton.next_power_of_2(c) if one else block_c
    out = torch.empty(1, c, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(c, cb),)
    _compress_pool_kernel[grid](
        a, z, ape, pos, kv_f, score_f, norm if one else a, cos if one else a, sin if one else a, out,
        eps, R=r, C=c, W=w, OV=ov, NP=cos.shape[1] if one else 1, CB=cb, SB=sb, FINISH=one,
        **pdl.launch(grid), num_warps=4 if sb * cb >= POOL_WIDE_TILE else 1)
    if finish and not one:
        row = torch.empty_like(out)
        _finish(out, row, pos, r, 0, False, False, norm, cos, sin, eps, always=True)
        return row
    return out


@triton.jit
def _emit_row_kernel(x_ptr, rows_ptr, pos_ptr, w_ptr, cos_ptr, sin_ptr, C, N_NOPE, eps, amax_floor,
                     R: tl.constexpr, NP: tl.constexpr, CP: tl.constexpr, NORM: tl.constexpr,
                     FP8: tl.constexpr, HALF: tl.constexpr, ALWAYS: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    blk = tl.program_id(0)
    pos = tl.load(pos_ptr)
    offs = blk * 64 + tl.arange(0, 64)
    v = tl.load(x_ptr + offs)
    if NORM:
        full = tl.arange(0, CP)
        xf = tl.load(x_ptr + full, mask=full < C, other=0.0)
        rn = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, axis=0) / C + eps)
        v = v * rn * tl.load(w_ptr + offs)
        v = _rope_block(v, blk * 64, tl.maximum(pos + 1 - R, 0), cos_ptr, sin_ptr, C, NP, 64)
    v = _round_kv_block(v, blk, N_NOPE, amax_floor, FP8, HALF)
    if ALWAYS:
        tl.store(rows_ptr + offs, v, mask=offs < C)        # compress_pool's finish: row 0, no condition
    else:
        idx = tl.maximum((pos + 1) // R - 1, 0).to(tl.int64)
        emit = tl.full([64], 0, tl.int32) + ((pos + 1) % R == 0).to(tl.int32)
        tl.store(rows_ptr + idx * C + offs, v, mask=(offs < C) & (emit != 0))


def emit_row(x, rows, pos, r: int, n_nope: int = 0, fp8: bool = False, half: bool = False,
             norm=None, cos=None, sin=None, eps: float = 0.0) -> None:
    _finish(x, rows, pos, r, n_nope, fp8, half, norm, cos, sin, eps, always=False)


def _finish(x, rows, pos, r, n_nope, fp8, half, norm, cos, sin, eps, always: bool) -> None:
    c = rows.shape[1]
    assert x.dtype == rows.dtype == torch.float32 and x.is_contiguous() and rows.is_contiguous()
    assert x.numel() == c and c % FP8_BLOCK == 0 and n_nope % FP8_BLOCK == 0 and pos.dtype == torch.int64
    has_norm = norm is not None
    if has_norm:
        for t in (norm, cos, sin):
            assert t.dtype == torch.float32 and t.is_contiguous()
        assert norm.shape == (c,) and 2 * cos.shape[1] <= c and sin.shape == cos.shape
    grid = (c // FP8_BLOCK,)
    _emit_row_kernel[grid](
        x, rows, pos, norm if has_norm else x, cos if has_norm else x, sin if has_norm else x, c, n_nope, eps,
        FP8_AMAX_FLOOR, R=r, NP=cos.shape[1] if has_norm else 1, CP=triton.next_power_of_2(c), NORM=has_norm,
        FP8=fp8, HALF=half, ALWAYS=always, **pdl.launch(grid), num_warps=1)


# ---- twins ------------------------------------------------------------------------------

def _norm_rope_ref(x, pos, r: int, norm, omega, eps: float):
    return apply_rope(rms_norm(x, norm, eps), pos + 1 - r, omega)


def compress_pool_ref(a, z, ape, pos, kv_f, score_f, norm, omega, eps: float, r: int):
    ov = r == OVERLAP_RATIO
    width = kv_f.shape[1] // 2 if ov else kv_f.shape[1]
    slot = pos % r + (r if ov else 0)
    kv_f.index_copy_(0, slot, a)
    score_f.index_copy_(0, slot, z + ape[pos % r])
    if ov:
        kv = torch.cat([kv_f[:r, :width], kv_f[r:, width:]])
        score = torch.cat([score_f[:r, :width], score_f[r:, width:]])
    else:
        kv, score = kv_f, score_f
    row = (torch.softmax(score, 0) * kv).sum(0, keepdim=True)
    if norm is not None:
        row = _norm_rope_ref(row, pos, r, norm, omega, eps)
    if ov:
        emit = ((pos + 1) % r == 0)[:, None]
        kv_f[:r].copy_(torch.where(emit, kv_f[r:], kv_f[:r]))
        score_f[:r].copy_(torch.where(emit, score_f[r:], score_f[:r]))
    return row


def emit_row_ref(x, rows, pos, r: int, n_nope: int = 0, fp8: bool = False, half: bool = False,
                 norm=None, omega=None, eps: float = 0.0) -> None:
    row = x if norm is None else _norm_rope_ref(x, pos, r, norm, omega, eps)
    if fp8:
        row = torch.cat([fp8_sim(row[..., :n_nope]), row[..., n_nope:]], -1)
    if half:
        row = half_round(row)
    emit = ((pos + 1) % r == 0)[:, None]
    idx = ((pos + 1) // r - 1).clamp_min(0)
    rows.index_copy_(0, idx, torch.where(emit, row, rows.index_select(0, idx)))
