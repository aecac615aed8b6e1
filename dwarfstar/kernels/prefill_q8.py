"""Prefill GEMMs of Q8_0 weights on int8 activations: the chunk form of kernels/matvec_int8.py.

Dims: T chunk tokens, G groups (1, or the grouped out-a's 8), N output rows per group,
K inputs per group (a multiple of 256), J = K / 32 blocks.

Contract: `gemm_q8(w, xq)` for w PlanarQ8_0 [N, K] (or [G, N, K]) and xq = quantize_act(x)
of x float32 [T, G*K] (kernels/moe.py: int8 words [T, G*K/4], scales [T, G*J]) -> y float32
[T, G*N], y[t, g*N + n] = sum_j d[g, n, j] * s[t, g*J + j] * I_j, I_j the exact integer dot
of block j of token t's codes (group g's inputs) with row n's codes. No host sync.

Why (not the fp16 GEMM of kernels/prefill_moe.py): with int8 activations the decode mat-vecs
round their inputs to int8, and so does the chunk path, so the two compute one function. An
fp16 GEMM's products carry ~2^-12 relative noise into the next layer's int8 rounding, which
then flips ~6 % of the codes against the decode and the oracle (both exact up to fp32 order).
Here the block dots are exact integers from the same codes, as in the mat-vec: the chunk and
decode paths then differ by fp32 summation order only.

Kernel: program (i, j, g) owns a BLOCK_M x BLOCK_N tile of group g; per 32-input block one
int8 `tl.dot` (int32, exact) scaled by the outer product of the token scales and the row
scales, accumulated in fp32. The twin `gemm_q8_ref` multiplies the int8-rounded activations
by the dequantised weight in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels.moe import QBLOCK
from dwarfstar.kernels.repack import PlanarQ8_0, dequantize_planar
from dwarfstar.model.numerics import int8_round

QB = tl.constexpr(QBLOCK)
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); bench/prefill_q8_bench.py sweeps it.
TILES = (64, 256, 128, 8, 3)     # best summed over a Flash layer's GEMMs at T = 4096 (H200)


def gemm_q8_ref(w: PlanarQ8_0, x: torch.Tensor) -> torch.Tensor:
    """Twin: x float32 [T, G*K] int8-rounded per 32, times the dequantised weight (fp32)."""
    xr = int8_round(x.float())
    wf = dequantize_planar(w)
    if len(w.shape) == 2:
        return xr @ wf.T
    g, n, k = w.shape
    return torch.einsum("tgk,gnk->tgn", xr.view(-1, g, k), wf).reshape(-1, g * n)


@triton.jit
def _gemm_q8_kernel(a_ptr, sa_ptr, b_ptr, d_ptr, y_ptr, T, N, K, G,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_m = offs_m < T
    ok_n = offs_n < N
    t64 = offs_m.to(tl.int64)
    rows = g * N + offs_n.to(tl.int64)
    J = K // QB
    a_row = a_ptr + t64[:, None] * (G * K) + g * K
    sa_row = sa_ptr + t64 * (G * J) + g * J
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for kk in tl.static_range(BLOCK_K // QB):
            kb = k0 + kk * QB
            offs_k = kb + tl.arange(0, QB)
            a = tl.load(a_row + offs_k[None, :], mask=ok_m[:, None], other=0)                  # [BM, 32] int8
            b = tl.load(b_ptr + rows[:, None] * K + offs_k[None, :], mask=ok_n[:, None], other=0)  # [BN, 32]
            p = tl.dot(a, tl.trans(b), out_dtype=tl.int32)                                      # exact
            sa = tl.load(sa_row + kb // QB, mask=ok_m, other=0)
            d = tl.load(d_ptr + rows * J + kb // QB, mask=ok_n, other=0).to(tl.float32)
            acc += p.to(tl.float32) * (sa[:, None] * d[None, :])
    y = y_ptr + t64[:, None] * (G * N) + g * N + offs_n[None, :]
    tl.store(y, acc, mask=ok_m[:, None] & ok_n[None, :])


def gemm_q8(w: PlanarQ8_0, xq, tiles: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """y [T, G*N] (module contract); xq = quantize_act(x [T, G*K]); tiles: see TILES."""
    block_m, block_n, block_k, num_warps, num_stages = tiles or TILES
    words, scale = xq[0], xq[1]
    assert isinstance(w, PlanarQ8_0) and w.qs.is_contiguous() and w.d.is_contiguous(), "PlanarQ8_0, contiguous"
    g, n, k = (1, *w.shape) if len(w.shape) == 2 else w.shape
    t = words.shape[0]
    assert k % 256 == 0 and words.shape == (t, g * k // 4) and scale.shape == (t, g * k // QBLOCK), \
        "activations: quantize_act of [T, G*K]"
    assert words.dtype == torch.int32 and words.is_contiguous() and scale.is_contiguous()
    block_k = min(block_k, k)
    assert k % block_k == 0 and block_k % QBLOCK == 0
    y = torch.empty(t, g * n, dtype=torch.float32, device=words.device)
    grid = (triton.cdiv(t, block_m), triton.cdiv(n, block_n), g)
    _gemm_q8_kernel[grid](words.view(torch.int8), scale, w.qs, w.d, y, t, n, k, g,
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                          num_stages=num_stages)
    return y
