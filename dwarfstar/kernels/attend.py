"""Sparse decode attention in two launches: raw window + compressed rows, with sinks (model.md §2.3).

Dims: H heads, D head dim, W raw window (ring slots), N compressed rows held, M rows attended
(k selected by index, or all N), J = W + 1 + M keys, B = ceil(J / BLOCK_N) key blocks.

Contract (graph-safe: device positions, grid fixed by the allocated W, M, H; no host sync):
- `attend_decode(q, raw, ring_pos, kv, pos, comp, comp_idx, ratio, sinks) -> o float32 [H, D]`
  for one decode token at `pos` (int64 [1]): q float32 [H, D]; raw float32 [W, D] the ring
  as held before this token, ring_pos int64 [W] the position each slot holds (-1: empty);
  kv float32 [1, D] this token's row; comp float32 [N, D] or None (no compressor);
  comp_idx int64 [k] rows of comp to attend, or None for all N; ratio the layer's
  compression ratio; sinks float32 [H].
  Keys, which double as values: ring slot j iff pos - W < ring_pos[j] <= pos (ring_pos >= 0);
  this token's row always; compressed row c (comp_idx[i], or i) iff c < (pos + 1) // ratio,
  the rows emitted so far (so the selection may hold invisible rows when fewer than k are
  visible, as the indexer's top-k over -inf scores does). logits = q.k / sqrt(D); one softmax
  over the visible keys plus a per-head sink logit that carries no value (model/attention._attend).
  keys_fp16=True: the caller vouches that every key row holds fp16 numbers (decode's cache
  rounding); the tf32x3 products then take two tensor-core passes, not three (EXACT_KEYS).
- Side effect, the ring write of this token: raw[pos % W] = kv. That slot holds position
  pos - W or nothing, never a visible key; the kernel also masks it out explicitly, so no
  program reads the slot that program (0, 0) writes.
Flash-decoding: program (b, g) takes key block b for head block g, computes the logits
[BLOCK_H, BLOCK_N] with a `tl.dot` over D (DOT_PRECISION), the block's max m, sum l of
exp(logit - m) and the partial value sum [BLOCK_H, D]; the combine kernel (one program per
head and D block) rescales the B partials to the common max, which includes the sink, and
adds exp(sink - max) to the denominator only. The twin `attend_decode_ref` builds the keys
and calls _attend as forward.py did; the kernel differs from it by fp32 order only (sum
order of the dots and of the softmax, the exp implementation).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dwarfstar.kernels.moe import act_buffers, store_int8_act
from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.model.attention import _attend

BLOCK_N = 16      # keys per program
BLOCK_H = 16      # heads per program (tl.dot needs >= 16)
BLOCK_D = 128     # head-dim chunk of the dots
COMBINE_D = 128   # head-dim chunk of a combine program
NUM_WARPS = 4
# (BLOCK_N, BLOCK_H, BLOCK_D) when the compressed rows come by index (the indexer's top-k on
# ratio-4 layers). bench/attend_bench.py as graph replays on the H200 (docs/PERF.md): (16, 16, 128)
# 30.1 µs vs 31.9 at (16, 32, 128) per 2K ratio-4 call; the whole 43-layer step 8.72 vs 8.97 ms.
GATHERED_BLOCKS = (16, 16, 128)
# tl.dot precision of QK and PV: "tf32x3" (three tf32 tensor-core products: ~fp32 accuracy) or
# "ieee" (fp32 FMA products). On the H200 (bench/attend_bench.py --precision ieee tf32x3) the
# weighted 2K step's attention took 826 µs against 1,042, with the largest error against the
# float64 twin 4.6e-7 against 7.1e-7.
DOT_PRECISION = "tf32x3"
# Head-dim chunks of the QK dot taken as the batch axis of a 3D tl.dot (independent accumulators,
# one chain each, summed at the end); 1: one [BLOCK_H, BLOCK_N] accumulator through all of D.
# A program is a serial instruction stream (Nsight Compute on the H200: ~1 warp per scheduler,
# one issue every ~6 cycles), and the single accumulator's QK is one dependent chain of 192 mma
# per warp. bench/attend_bench.py (H200, tf32x3, 16 x 16 x 128, 4 warps), weighted 2K step:
# split 1 612 µs, 4 536 µs, 8 542 µs; 8 warps were slower at every split (696-944 µs).
QK_SPLIT = 4
# Keys rounded through fp16 (the official numerics' cache rounding) are tf32 numbers: tf32x3's
# three products of the split operands then have one that is exactly zero (the keys' low part),
# so the kernel takes two (`_dot_exact_b`), and splits only q and p (A/B in bench/decode_variants.py).
EXACT_KEYS = True


@triton.jit
def _tf32_hi(a):
    """a rounded to tf32 (10 mantissa bits, to nearest, ties away: cvt.rna.tf32.f32) for finite a."""
    return ((a.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)


@triton.jit
def _dot_exact_b(a, b, acc, DOT: tl.constexpr, B_TF32: tl.constexpr):
    """acc + a @ b; B_TF32 (b's elements are tf32 numbers) with DOT tf32x3: as tf32x3 with b's low
    part zero, dot(hi(a), b, dot(hi(a - hi(a)), b, 0)) + acc in tf32, the order of Triton's split."""
    if B_TF32 and DOT == "tf32x3":
        a_hi = _tf32_hi(a)
        small = tl.dot(_tf32_hi(a - a_hi), b, tl.zeros_like(acc), input_precision="tf32")
        return acc + tl.dot(a_hi, b, small, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision=DOT)


def attend_decode_ref(q, raw, ring_pos, kv, pos, comp, comp_idx, ratio, sinks) -> torch.Tensor:
    """Twin: the keys and mask built with torch ops, then model/attention._attend."""
    w = raw.shape[0]
    slot = pos % w
    seen = (ring_pos >= 0) & (ring_pos > pos - w) & (ring_pos <= pos)
    seen &= torch.arange(w, device=raw.device) != slot
    keys, mask = [raw, kv], [seen, torch.ones(1, dtype=torch.bool, device=raw.device)]
    if comp is not None:
        rows = torch.arange(comp.shape[0], device=comp.device) if comp_idx is None else comp_idx
        keys.append(comp.index_select(0, rows))
        mask.append(rows < (pos + 1) // ratio)
    o = _attend(q[None], torch.cat(keys), torch.cat(mask)[None], sinks)[0]   # [H, D]
    raw.index_copy_(0, slot, kv)
    return o


@triton.jit
def _key_rows(raw_ptr, kv_ptr, comp_ptr, j, row, is_raw, is_comp, D):
    """Pointer to each key's row [BLOCK_N]: its ring slot, this token's row, or its compressed
    row, so a key tile is one load per element whichever kind the key is."""
    key = tl.where(is_raw, raw_ptr + j * D, kv_ptr + 0 * j)
    return tl.where(is_comp, comp_ptr + row * D, key)


@triton.jit
def _attend_partial_kernel(q_ptr, raw_ptr, ring_pos_ptr, kv_ptr, pos_ptr, comp_ptr, idx_ptr,
                           m_ptr, l_ptr, o_ptr, ratio, H, W, M, sqrt_d, D: tl.constexpr,
                           HAS_COMP: tl.constexpr, HAS_IDX: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT: tl.constexpr, QK_SPLIT: tl.constexpr = 1, KEYS_TF32: tl.constexpr = False,
                           PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    b = tl.program_id(0)
    g = tl.program_id(1)
    pos = tl.load(pos_ptr)
    slot = pos % W
    heads = g * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    # Key index: 0..W-1 ring slots, W this token's row, W+1.. the compressed rows.
    j = b * BLOCK_N + tl.arange(0, BLOCK_N)
    is_raw = j < W
    rp = tl.load(ring_pos_ptr + j, mask=is_raw, other=-1)
    seen_raw = is_raw & (rp >= 0) & (rp > pos - W) & (rp <= pos) & (j != slot)
    is_cur = j == W
    ci = j - (W + 1)
    row = ci.to(tl.int64)
    is_comp = j < 0
    seen_comp = is_comp
    if HAS_COMP:
        is_comp = (ci >= 0) & (ci < M)
        if HAS_IDX:
            row = tl.load(idx_ptr + ci, mask=is_comp, other=0)
        seen_comp = is_comp & (row < (pos + 1) // ratio)
    seen = seen_raw | is_cur | seen_comp
    # QK loads every key that exists (bounded by kind, not by visibility, so they need not wait
    # for ring_pos): an invisible key's logit is replaced by -inf whatever its row holds (even
    # NaN, or the slot being written). PV loads only the visible rows (zeros elsewhere, since
    # p = 0 times NaN would not be 0).
    exists = is_raw | is_cur | is_comp
    key = _key_rows(raw_ptr, kv_ptr, comp_ptr, j.to(tl.int64), row, is_raw, is_comp, D)

    if QK_SPLIT == 1:
        acc = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            qt = tl.load(q_ptr + heads[:, None] * D + dd[None, :], mask=h_ok[:, None], other=0.0)
            kt = tl.load(key[:, None] + dd[None, :], mask=exists[:, None], other=0.0)
            acc = _dot_exact_b(qt, tl.trans(kt), acc, DOT, KEYS_TF32)
    else:
        # The head dim as QK_SPLIT chunks on the batch axis of a 3D dot: one accumulator per
        # chunk (its own warp), so the tensor-core products form QK_SPLIT short chains instead
        # of one chain through all of D; the chunks are summed at the end.
        DC: tl.constexpr = BLOCK_D // QK_SPLIT
        acc3 = tl.zeros([QK_SPLIT, BLOCK_H, BLOCK_N], dtype=tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, QK_SPLIT)[:, None] * DC + tl.arange(0, DC)[None, :]       # [S, DC]
            qt = tl.load(q_ptr + heads[None, :, None] * D + dd[:, None, :], mask=h_ok[None, :, None], other=0.0)
            kt = tl.load(key[None, :, None] + dd[:, None, :], mask=exists[None, :, None], other=0.0)
            acc3 = _dot_exact_b(qt, tl.permute(kt, (0, 2, 1)), acc3, DOT, KEYS_TF32)
        acc = tl.sum(acc3, axis=0)
    logits = tl.where(seen[None, :], tl.div_rn(acc, sqrt_d), float("-inf"))
    m = tl.max(logits, axis=1)                                                  # [BLOCK_H]
    # A block with no visible key: m = -inf, p = 0, l = 0 (the combine weighs it by 0).
    p = tl.exp(logits - tl.where(m == float("-inf"), 0.0, m)[:, None])
    tl.store(m_ptr + b * H + heads, m, mask=h_ok)
    tl.store(l_ptr + b * H + heads, tl.sum(p, axis=1), mask=h_ok)
    for d0 in tl.static_range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        kt = tl.load(key[:, None] + dd[None, :], mask=seen[:, None], other=0.0)
        o = _dot_exact_b(p, kt, tl.zeros([BLOCK_H, BLOCK_D], tl.float32), DOT, KEYS_TF32)   # [BLOCK_H, BLOCK_D]
        tl.store(o_ptr + (b * H + heads)[:, None] * D + dd[None, :], o, mask=h_ok[:, None])
    # The ring write. Other programs' QK may load slot `slot` meanwhile, but its logit is -inf
    # (`seen_raw` excludes it) and PV does not load it.
    if (b == 0) & (g == 0):
        for d0 in tl.static_range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            tl.store(raw_ptr + slot * D + dd, tl.load(kv_ptr + dd))


@triton.jit
def _attend_combine_kernel(m_ptr, l_ptr, o_ptr, sinks_ptr, out_ptr, H, D, NB,
                           pos_ptr, cos_ptr, sin_ptr, qw_ptr, qs_ptr, qq_ptr,
                           NB_P2: tl.constexpr, BLOCK_D: tl.constexpr, NP: tl.constexpr,
                           ROPE: tl.constexpr, QUANT: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    h = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    dd = d0 + tl.arange(0, BLOCK_D)
    blk = tl.arange(0, NB_P2)
    ok = blk < NB
    m = tl.load(m_ptr + blk * H + h, mask=ok, other=float("-inf"))
    l = tl.load(l_ptr + blk * H + h, mask=ok, other=0.0)
    sink = tl.load(sinks_ptr + h)
    # This token's row is always visible, so mx is finite; blocks with m = -inf weigh 0.
    mx = tl.maximum(tl.max(m, axis=0), sink)
    scale = tl.exp(m - mx)
    den = tl.sum(l * scale, axis=0) + tl.exp(sink - mx)
    o = tl.load(o_ptr + (blk * H + h)[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
    y = tl.div_rn(tl.sum(o * scale[:, None], axis=0), den)
    if ROPE:
        # The inverse RoPE of the last 2 NP dims (glue._rope_kernel's products, angle -phi),
        # pair (2j, 2j + 1) of this block; dims below D - 2 NP pass through.
        a, b = tl.split(tl.reshape(y, [BLOCK_D // 2, 2]))
        j = (d0 - (D - 2 * NP)) // 2 + tl.arange(0, BLOCK_D // 2)
        rot = j >= 0
        p = tl.maximum(tl.load(pos_ptr), 0)
        c = tl.load(cos_ptr + p * NP + j, mask=rot, other=1.0)
        s = -tl.load(sin_ptr + p * NP + j, mask=rot, other=0.0)
        y = tl.reshape(tl.join(tl.where(rot, a * c - b * s, a), tl.where(rot, a * s + b * c, b)), [BLOCK_D])
    tl.store(out_ptr + h * D + dd, y)
    if QUANT:
        # Out-a's int8 form: the row-major [H * D] order, which is the grouped rows' order.
        e0 = h * D + d0
        store_int8_act(y, qw_ptr + e0 // 4, qs_ptr + e0 // 32, qq_ptr + e0 // 16, BLOCK_D // 32, USE_ASM)


def attend_decode(q, raw, ring_pos, kv, pos, comp, comp_idx, ratio, sinks, inv_rope=None, quantize=False,
                  keys_fp16=False):
    """o [H, D] (module contract). inv_rope = (cos, sin) tables of glue.rope_table: the combine
    also applies the inverse RoPE to o's last dims (glue.rope(o, pos, cos, sin, inverse=True)).
    quantize: also o's int8 form, quantize_act(o.view(G, -1)) for any G | H, as (o, oq).
    keys_fp16: see the module contract."""
    n_heads, d = q.shape
    w = raw.shape[0]
    for name, t in (("q", q), ("raw", raw), ("kv", kv), ("sinks", sinks), ("comp", comp)):
        assert t is None or (t.dtype == torch.float32 and t.is_contiguous()), f"{name}: contiguous float32"
    assert raw.shape == (w, d) and kv.shape == (1, d) and sinks.shape == (n_heads,)
    assert ring_pos.dtype == torch.int64 and ring_pos.shape == (w,) and ring_pos.is_contiguous()
    assert pos.dtype == torch.int64 and pos.shape == (1,)
    has_comp = comp is not None
    has_idx = has_comp and comp_idx is not None
    block_n, block_h, block_d = GATHERED_BLOCKS if has_idx else (BLOCK_N, BLOCK_H, BLOCK_D)
    block_d = min(block_d, d)
    assert d % block_d == 0 and d % min(COMBINE_D, d) == 0, "head dim: a multiple of the D blocks"
    if has_comp:
        assert comp.shape[1] == d and ratio > 0
    if has_idx:
        assert comp_idx.dtype == torch.int64 and comp_idx.dim() == 1 and comp_idx.is_contiguous()
    n_rows = (comp_idx.shape[0] if has_idx else comp.shape[0]) if has_comp else 0
    n_blocks = triton.cdiv(w + 1 + n_rows, block_n)
    m = torch.empty(n_blocks, n_heads, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    part = torch.empty(n_blocks, n_heads, d, dtype=torch.float32, device=q.device)
    out = torch.empty(n_heads, d, dtype=torch.float32, device=q.device)
    grid = (n_blocks, triton.cdiv(n_heads, block_h))
    _attend_partial_kernel[grid](
        q, raw, ring_pos, kv, pos, comp if has_comp else raw, comp_idx if has_idx else ring_pos,
        m, l, part, max(ratio, 1), n_heads, w, n_rows, math.sqrt(d), D=d,
        HAS_COMP=has_comp, HAS_IDX=has_idx, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT=DOT_PRECISION, QK_SPLIT=QK_SPLIT, KEYS_TF32=keys_fp16 and EXACT_KEYS, **pdl.launch(grid),
        num_warps=NUM_WARPS)
    combine_d = min(COMBINE_D, d)
    n_pairs = 1
    if inv_rope is not None:
        cos, sin = inv_rope
        n_pairs = cos.shape[1]
        assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape
        assert 2 * n_pairs <= combine_d and n_pairs & (n_pairs - 1) == 0, "rotated dims within one D block"
    oq = None
    if quantize:
        assert combine_d % 32 == 0 and (n_heads * d) % 256 == 0, "o's int8 form: whole 32-blocks per program"
        oq = act_buffers(1, n_heads * d, q.device)
    grid = (n_heads, d // combine_d)
    _attend_combine_kernel[grid](
        m, l, part, sinks, out, n_heads, d, n_blocks, pos, *(inv_rope or (sinks, sinks)), *(oq or (out, out, out)),
        NB_P2=triton.next_power_of_2(n_blocks), BLOCK_D=combine_d, NP=n_pairs, ROPE=inv_rope is not None,
        QUANT=quantize, USE_ASM=q.is_cuda, **pdl.launch(grid), num_warps=NUM_WARPS)
    return (out, oq) if quantize else out
