"""Q8_0 mat-vecs with int8 activations (dp4a): the decode form of the dense Q8_0 projections.

Dims: B activation columns (1..MAX_COLS), S slots (groups/experts picked by id), N output
rows, K inputs (a multiple of 256).

Contract:
- `matvec_q8(w, xq)`: w PlanarQ8_0 [N, K]; xq = `quantize_act(x)` of x float32 [B, K]
  (kernels/moe.py: int8 words [B, K/4], scales [B, K/32], per-16 sums unused) -> y float32
  [B, N], y[b, n] = sum over 32-blocks j of d[n, j] * s[b, j] * (integer dot of the block).
- `expert_matvec_q8(w, ids, xq)`: w PlanarQ8_0 [E, N, K], ids int32 [S], xq of x [S, K]
  -> y [S, N] = W[ids[s]] x_q[s] (the grouped out-a projection).
- `matvec_q8(w, None, norm=(x, weight, eps))`: x float32 [1, K] -> matvec_q8(w, quantize_act(
  rms_norm(x, weight, eps))), the norm and rounding done by each program on the row it reads
  (decode's q_b from q_a's output: no norm launch between the two projections).
- Optional preallocated `out`; no sync.
Numerics: the activations are rounded to int8 per 32 inputs exactly as the routed experts'
(`quantize_act_ref`: scale amax/127, round half to even) — ds4 does the same for its Q8_0
decode mat-vecs (`quantize_q8_0_f32_kernel`, then dp4a). The block dots are exact integers;
the kernel then differs from the twin (`matvec_q8_ref`, fp32 like the reference model) by fp32
rounding only (the tests also hold both to a float64 oracle). Against the unrounded fp32
product the difference is the int8 rounding of x (~0.5 % relative, kernels.md §7).

Why: the fp32 kernel (matvec.py) converts every weight byte to float and multiplies it,
which, not HBM, bounds it: from a warm L2 it is only ~10 % faster (bench/l2_bench.py on the
H200). One dp4a does four products on the integer pipe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels.matvec import MAX_COLS, slot_rows
from dwarfstar.kernels.moe import QBLOCK, _dp4a, int8_act_tile
from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.kernels.repack import PlanarQ8_0, dequantize_planar, select_experts
from dwarfstar.model.numerics import int8_round

QB = tl.constexpr(QBLOCK)   # the kernel's view of the activation block
# (BLOCK_N, BLOCK_K, num_warps) at B = 1 by shape class: the winners of `bench/l2_bench.py
# --int8` on the H200 (docs/PERF.md). Long rows: 2 rows x 2048 inputs per program (q_a + kv,
# out_b, shared expert, head); short rows (K <= 1024, q_b): 16 x 512; the grouped out-a
# (8 slots x 1024 rows): 8 x 1024.
TILING = (2, 2048, 4)
TILING_SHORT_ROWS = (16, 512, 4)
TILING_SLOTS = (8, 1024, 4)


def matvec_q8_ref(w: PlanarQ8_0, x: torch.Tensor, out: torch.Tensor | None = None, xq=None) -> torch.Tensor:
    """Twin of `matvec_q8` from the unquantised x: the int8-rounded activations times the
    dequantised weight, one fp32 matmul (as matvec_ref, so a forward on the twins computes what
    the reference with `Numerics.int8_act` does, product for product). xq (a producer's int8
    form of x) is ignored: the twin rounds x itself."""
    y = int8_round(x.float()) @ dequantize_planar(w).T
    return y if out is None else out.copy_(y)


def expert_matvec_q8_ref(w: PlanarQ8_0, ids: torch.Tensor, x: torch.Tensor,
                         out: torch.Tensor | None = None, xq=None) -> torch.Tensor:
    """Twin of `expert_matvec_q8` from the unquantised x [S, K] (fp32, as expert_matvec_ref; xq
    ignored as in matvec_q8_ref)."""
    wsel = dequantize_planar(select_experts(w, ids))                            # [S, N, K]
    y = torch.bmm(wsel, int8_round(x.float())[:, :, None])[:, :, 0]
    return y if out is None else out.copy_(y)


@triton.jit
def _q8_tile(qs_ptr, d_ptr, rows, mask_n, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight tile at inputs k0..k0+BLOCK_K of `rows`: int32 words [BLOCK_N, BLOCK_K / 4] and
    block scales [BLOCK_N, BLOCK_K / 32] (zeros past K, so a tile after the last reads nothing)."""
    KW = K // 4
    KB = K // QB
    offs_w = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    offs_j = k0 // QB + tl.arange(0, BLOCK_K // QB)
    wq = tl.load(qs_ptr + rows[:, None] * KW + offs_w[None, :], mask=mask_n[:, None] & (offs_w < KW)[None, :],
                 other=0)
    d = tl.load(d_ptr + rows[:, None] * KB + offs_j[None, :], mask=mask_n[:, None] & (offs_j < KB)[None, :],
                other=0).to(tl.float32)
    return wq, d


@triton.jit
def _q8_i8_kernel(qs_ptr, d_ptr, ids_ptr, xw_ptr, xs_ptr, y_ptr, N, K, nw_ptr, eps,
                  HAS_IDS: tl.constexpr, B: tl.constexpr, BP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr, NORM: tl.constexpr = False,
                  KP: tl.constexpr = 1, PDL: tl.constexpr = False):
    """Program (i, s): rows i*BLOCK_N.. of slot s (its expert ids[s] if HAS_IDS) for the B
    columns of slot s. Weights are read as int32 words of four int8 (qs viewed as int32), one
    tile ahead of the products (the next tile's loads are in flight while this one is summed).
    PDL: a dense weight's first tile is read before the wait (weights are never written by the
    kernel ahead, tests/kernels/test_pdl.py); with ids the rows come from ids, so it waits first.
    NORM (B = 1, no ids): xw_ptr is the float32 row x [K] itself, and the products take
    quantize_act(rms_norm(x, nw, eps)), normed and rounded here per tile (`matvec_q8(norm=)`)."""
    wait_for_inputs(PDL & HAS_IDS)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n, mask_n, rows = slot_rows(ids_ptr, pid_n, pid_s, N, HAS_IDS, BLOCK_N)
    wq, d = _q8_tile(qs_ptr, d_ptr, rows, mask_n, 0, K, BLOCK_N, BLOCK_K)
    wait_for_inputs(PDL & (not HAS_IDS))
    KW = K // 4
    KB = K // QB
    offs_b = tl.arange(0, BP)
    acc = tl.zeros([BLOCK_N, BP], dtype=tl.float32)
    if NORM:
        # glue._rms_norm_kernel's factor 1 / sqrt(mean(x^2) + eps), from one pass over the row.
        kk = tl.arange(0, KP)
        xv = tl.load(xw_ptr + kk, mask=kk < K, other=0.0)
        r = 1.0 / tl.sqrt_rn(tl.sum(xv * xv, axis=0) / K + eps)
    for k0 in range(0, K, BLOCK_K):
        offs_w = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        offs_j = k0 // QB + tl.arange(0, BLOCK_K // QB)
        ok_w = offs_w < KW
        ok_j = offs_j < KB
        for b in tl.static_range(B):
            col = pid_s * B + b
            if NORM:
                # K is a multiple of BLOCK_K here (the launcher's check): no lane is masked.
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(xw_ptr + offs_k) * r * tl.load(nw_ptr + offs_k)
                xw, xs, _ = int8_act_tile(xt, BLOCK_K // QB, USE_ASM)
            else:
                xw = tl.load(xw_ptr + col * KW + offs_w, mask=ok_w, other=0)
                xs = tl.load(xs_ptr + col * KB + offs_j, mask=ok_j, other=0)
            isum = _dp4a(wq, xw[None, :], tl.zeros_like(wq), USE_ASM)
            isum = tl.sum(tl.reshape(isum, [BLOCK_N, BLOCK_K // QB, QB // 4]), axis=2)
            part = tl.sum(isum.to(tl.float32) * d * xs[None, :], axis=1)
            acc += tl.where(offs_b[None, :] == b, part[:, None], 0.0)
        wq, d = _q8_tile(qs_ptr, d_ptr, rows, mask_n, k0 + BLOCK_K, K, BLOCK_N, BLOCK_K)
    y_ptrs = y_ptr + pid_s * B * N + offs_b[None, :] * N + offs_n[:, None]
    tl.store(y_ptrs, acc, mask=mask_n[:, None] & (offs_b < B)[None, :])


def _tiling(k: int, n_slots: int) -> tuple[int, int, int]:
    return TILING_SLOTS if n_slots > 1 else TILING_SHORT_ROWS if k <= 1024 else TILING


def _launch(w: PlanarQ8_0, ids, xq, out, n_slots: int, cols: int, tiling, use_asm, norm=None):
    *_, n, k = w.shape
    assert isinstance(w, PlanarQ8_0) and w.qs.is_contiguous() and w.d.is_contiguous(), "PlanarQ8_0, contiguous"
    if norm is not None:
        x, nw, eps = norm
        assert ids is None and cols == 1 and x.shape == (1, k) and nw.shape == (k,), "norm: one dense row x [1, K]"
        assert x.dtype == nw.dtype == torch.float32 and x.is_contiguous() and nw.is_contiguous()
        words, scale = x, x
    else:
        words, scale, nw, eps = xq[0], xq[1], xq[1], 0.0
        assert words.shape == (n_slots * cols, k // 4) and scale.shape == (n_slots * cols, k // QBLOCK)
        assert words.dtype == torch.int32 and scale.dtype == torch.float32 and words.is_contiguous()
    assert k % 256 == 0 and 1 <= cols <= MAX_COLS, f"K a multiple of 256, at most {MAX_COLS} columns per slot"
    shape = (n_slots * cols, n)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=words.device)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == shape
    block_n, block_k, num_warps = tiling or _tiling(k, n_slots)
    block_k = min(block_k, triton.next_power_of_2(k))
    assert norm is None or k % block_k == 0, "norm: K a multiple of BLOCK_K"
    if cols > 1:
        block_n = max(1, block_n // (cols // 2 or 1))
    grid = (triton.cdiv(n, block_n), n_slots)
    _q8_i8_kernel[grid](
        w.qs.view(torch.int32), w.d, ids if ids is not None else words, words, scale, out, n, k, nw, eps,
        HAS_IDS=ids is not None, B=cols, BP=triton.next_power_of_2(cols), BLOCK_N=block_n, BLOCK_K=block_k,
        USE_ASM=words.is_cuda if use_asm is None else use_asm, NORM=norm is not None,
        KP=triton.next_power_of_2(k) if norm is not None else 1, **pdl.launch(grid), num_warps=num_warps)
    return out


def matvec_q8(w: PlanarQ8_0, xq, out=None, tiling=None, use_asm=None, norm=None) -> torch.Tensor:
    """y [B, N] for a dense Q8_0 [N, K] weight and xq = quantize_act(x [B, K]); or, with
    norm = (x float32 [1, K], weight [K], eps) and xq None, of xq = quantize_act(rms_norm(x,
    weight, eps)) formed inside the kernel (each program norms the row it reads: no norm launch)."""
    assert len(w.shape) == 2, "dense weight [N, K]"
    return _launch(w, None, xq, out, 1, 1 if norm is not None else xq[0].shape[0], tiling, use_asm, norm)


def expert_matvec_q8(w: PlanarQ8_0, ids: torch.Tensor, xq, out=None, tiling=None, use_asm=None) -> torch.Tensor:
    """y [S, N], y[s] = W[ids[s]] x_q[s], for a Q8_0 [E, N, K] weight and xq = quantize_act(x [S, K])."""
    assert len(w.shape) == 3, "expert weight [E, N, K]"
    assert ids.dtype == torch.int32 and ids.is_contiguous() and ids.shape == (xq[0].shape[0],), "ids: int32 [S]"
    return _launch(w, ids, xq, out, ids.shape[0], 1, tiling, use_asm)
