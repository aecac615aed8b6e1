"""Routed-expert gate/up for IQ2_XXS weights in CUDA C (NVRTC): the decode hot spot Triton
cannot place well (kernels.md §2, the escape hatch; §4, IQ2_XXS).

Why: the Triton decoder (kernels/moe.py) gathers each octet's grid row from a global-memory
table; a warp's 32 random 8-byte gathers touch many L1 lines each, and those gathers, not
the bytes read, set its speed (35 µs per layer for 26 MB on the H200; a second gather per
octet for the signs made it 23 % slower). Here the 2 KB grid lives in shared memory and the
signs are computed (popc parity, multiply spread): 19 µs per layer on the H200, 26 µs when
the signs also came from a shared-memory table (bank cycles are the limit there too).

Contract: `gate_up(gate, up, words, scale, ids, weights, limit, out)` = kernels/moe.py
`moe_gate_up` for IQ2_XXS gate/up planar [E, F, D] with the activations already quantised
(`quantize_act`: words int32 [B, D/4], scales float32 [B, D/32]), ids int32 [B, K], weights
float32 [B, K], out float32 [B, K, F]. The integer dot of each 32-input group is exact and
equal to the Triton kernel's; the fp32 sums run in another order (lanes, then a warp
shuffle tree) and the sigmoid uses expf: agreement with the twin within fp32 rounding.

Layout: one warp per output row (gate and up rows together, so x is loaded once for both),
lane l takes the 32-input groups l, l + 32, ...; 8 warps per block; grid (F / 8, B K).
`torch.cuda._compile_kernel` is private API (torch >= 2.11): compiled once per process.
"""

from __future__ import annotations

import functools

import torch

from dwarfstar.kernels.repack import PlanarIQ2XXS

ROWS_PER_BLOCK = 8   # warps per block, one row each

_SOURCE = r"""
__device__ __forceinline__ float half_bits_to_float(unsigned short u) {
    float f;
    asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(u));
    return f;
}

// acc + the dot of octet j of a group (grid word gw, sign + scale word sw) with the 8 int8
// activations in words xa, xb. A negative byte g becomes (g ^ 0xFF) + 1 = 256 - g (no carry).
__device__ __forceinline__ int octet_dot(const unsigned long long* tab, int gw, int sw, int j, int xa, int xb,
                                         int acc) {
    const unsigned long long g8 = tab[(gw >> (8 * j)) & 255];
    // The 8th sign is the parity of the 7 stored ones; bit i -> byte i by a multiply.
    unsigned s = (sw >> (7 * j)) & 127;
    s |= (__popc(s) & 1) << 7;
    const unsigned blo = ((s & 15u) * 0x00204081u) & 0x01010101u;
    const unsigned bhi = ((s >> 4) * 0x00204081u) & 0x01010101u;
    const unsigned mlo = blo * 255u, mhi = bhi * 255u;
    acc = __dp4a((int)(((unsigned)g8 ^ mlo) + blo), xa, acc);
    return __dp4a((int)(((unsigned)(g8 >> 32) ^ mhi) + bhi), xb, acc);
}

extern "C" __global__ void iq2xxs_gate_up(
    const int* __restrict__ gw, const unsigned short* __restrict__ gd,
    const int* __restrict__ uw, const unsigned short* __restrict__ ud,
    const unsigned long long* __restrict__ table,
    const int* __restrict__ ids, const float* __restrict__ wts,
    const int* __restrict__ xw, const float* __restrict__ xs,
    float* __restrict__ mid, int F, int D, int K, double limit_d, int has_limit)
{
    // the grid: 256 rows of 8 bytes (element t in byte t)
    __shared__ unsigned long long tab[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) tab[i] = table[i];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int slot = blockIdx.y;
    if (row >= F) return;
    const long long e = ids[slot];
    const long long tok = slot / K;
    const int kb = D >> 8;
    const int groups = D >> 5;
    const long long rw = (e * F + row) * (long long)kb;   // this row's first super-block
    const int* gwr = gw + rw * 16;
    const int* uwr = uw + rw * 16;
    const int* xr = xw + tok * (D >> 2);
    const float* xsr = xs + tok * groups;
    float acc_g = 0.f, acc_u = 0.f;
    #pragma unroll 4
    for (int g = lane; g < groups; g += 32) {
        const int2 pg = *reinterpret_cast<const int2*>(gwr + 2 * g);
        const int2 pu = *reinterpret_cast<const int2*>(uwr + 2 * g);
        const int4 xa = *reinterpret_cast<const int4*>(xr + 8 * g);
        const int4 xb = *reinterpret_cast<const int4*>(xr + 8 * g + 4);
        const int xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        int sg = 0, su = 0;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            sg = octet_dot(tab, pg.x, pg.y, j, xv[2 * j], xv[2 * j + 1], sg);
            su = octet_dot(tab, pu.x, pu.y, j, xv[2 * j], xv[2 * j + 1], su);
        }
        const int sb = g >> 3;
        const float xsc = xsr[g];
        const float dg = half_bits_to_float(gd[rw + sb]) * (0.5f + (float)((pg.y >> 28) & 15)) * 0.25f;
        const float du = half_bits_to_float(ud[rw + sb]) * (0.5f + (float)((pu.y >> 28) & 15)) * 0.25f;
        acc_g += (float)sg * dg * xsc;
        acc_u += (float)su * du * xsc;
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        acc_g += __shfl_xor_sync(0xffffffffu, acc_g, o);
        acc_u += __shfl_xor_sync(0xffffffffu, acc_u, o);
    }
    if (lane == 0) {
        if (has_limit) {
            const float limit = (float)limit_d;
            acc_g = fminf(acc_g, limit);
            acc_u = fminf(fmaxf(acc_u, -limit), limit);
        }
        mid[(long long)slot * F + row] = wts[slot] * (acc_g / (1.0f + expf(-acc_g))) * acc_u;
    }
}
"""

@functools.lru_cache(maxsize=None)
def _kernel():
    return torch.cuda._compile_kernel(_SOURCE, "iq2xxs_gate_up")


def usable(w, x: torch.Tensor) -> bool:
    """IQ2_XXS weights on a CUDA device with the private NVRTC entry point present."""
    return isinstance(w, PlanarIQ2XXS) and x.is_cuda and hasattr(torch.cuda, "_compile_kernel")


def gate_up(gate: PlanarIQ2XXS, up: PlanarIQ2XXS, words: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor, limit: float, out: torch.Tensor) -> torch.Tensor:
    """The launch (checks are the caller's, kernels/moe.py moe_gate_up)."""
    from dwarfstar.kernels.moe import iq2xxs_grid64

    table = iq2xxs_grid64(str(words.device))
    _, f, d = gate.shape
    n_tok, k = ids.shape
    grid = ((f + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, n_tok * k, 1)
    _kernel()(grid=grid, block=(32 * ROWS_PER_BLOCK, 1, 1),
              args=[gate.words, gate.d, up.words, up.d, table, ids, weights, words, scale, out,
                    f, d, k, float(limit), int(limit > 0)])
    return out
