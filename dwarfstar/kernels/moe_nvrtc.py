"""Routed-expert gate/up for IQ2_XXS weights in CUDA C (NVRTC): the decode hot spot Triton
cannot place well (kernels.md §2, the escape hatch; §4, IQ2_XXS).

Why: the Triton decoder (kernels/moe.py) gathers each octet's grid row from a global-memory
table; a warp's 32 random 8-byte gathers touch many L1 lines each, and those gathers, not
the bytes read, set its speed (35 µs per layer for 26 MB on the H200; a second gather per
octet for the signs made it 23 % slower). Here the tables live in shared memory.

Contract: `gate_up(gate, up, words, scale, ids, weights, limit, out)` = kernels/moe.py
`moe_gate_up` for IQ2_XXS gate/up planar [E, F, D] with the activations already quantised
(`quantize_act`: words int32 [B, D/4], scales float32 [B, D/32]), ids int32 [B, K], weights
float32 [B, K], out float32 [B, K, F]. The integer dot of each 32-input group is exact and
equal to the Triton kernel's; the fp32 sums run in another order (lanes, then a warp
shuffle tree) and the sigmoid uses expf: agreement with the twin within fp32 rounding.

Layout (`iq2xxs_gate_up_rows<P, W>`): one wave of long-lived warps that prefetch. Grid
(min(R / W * SMs / (B K), F / W), B K) with W = ROWS_WARPS warps per block and R =
ROWS_RESIDENT_WARPS per SM (the launch bounds hold a thread to 128 registers so that R stay
resident; B K > R / W * SMs: one block per slot, several waves); the grid depends only on
shapes and the device, never on ids (CUDA graphs replay it). The warps of a slot take its rows
w, w + n, w + 2n, ... (5-6 each at B = 1), gate and up rows together, so each step of them reads
one contiguous stretch. Lane l takes the 16-byte pieces l, l + 32, ... of a row (P = ceil(D /
2048); a piece is 2 groups of 32 inputs in one super-block): a warp's weight loads are 512-byte
runs and a lane reads one fp16 d per piece. The token's activations for the lane's pieces are
loaded once per warp into registers and serve every row; the next row's pieces load into a
second register buffer (the two swap roles) while the current row is computed, so its DRAM
latency hides behind this row's work.

Tables: the 2 KB grid and the 1 KB of sign masks (`iq2xxs_sign_masks`: per 7 stored sign bits,
8 bytes 0x00 / 0xFF, the parity bit included) live in shared memory as 16 interleaved copies
(entry e of copy c at 64-bit word 16 e + c; lane l reads copy l % 16: a half warp hits 16
different bank pairs, 2 wavefronts per lookup, the least for 64 bits). Per 4 weights one xor
and two dp4a: dp4a(g ^ m, x) - dp4a(m, x). The copies take 32 + 16 KB (the static limit of a
block), written in the prologue while the first row's loads are in flight.

Why (H200): the first design, one warp per row that computed its signs (popc parity, multiply
spread) from one shared copy of the grid, took 20.1 µs at Flash decode shapes (B = 1, K = 6,
F = 2048, D = 4096, with the ~2 µs quantise launch; bench/moe_bench.py --nvrtc-kernels), 28 % of
the stream rate. Nsight Compute named two limits: instruction issue (0.74 per scheduler per
cycle; ~900 warp instructions per row, 768 of them the octet dots) and the shared-memory pipe
(L1/TEX 83 % busy: its random 8-byte grid lookups averaged 5.9-way bank conflicts), and each
warp waited out its row's DRAM latency alone (1.45 waves of short blocks). This kernel: ~580
instructions per row (SASS, sm_90), 128 registers, no spills; at B = 1 / 2 / 4 W = 8 takes 15.7
/ 26.6 / 45.8 µs (W = 4 17.0 / 28.8 / 49.4, W = 16 17.4 / 27.6 / 49.6; the first design 20.1 /
36.6 / 66.1); the whole 2K decode step 6.17 -> 6.01 ms (bench/decode_variants.py, at W = 4).
PDL: the blocks write the table copies before `griddepcontrol.wait` and read every input after it,
so the kernel is launched as a programmatic dependent (`_launch`, cuLaunchKernelEx) and fills its
tables while the routing launch before it runs.
`torch.cuda._compile_kernel` is private API (torch >= 2.11): compiled once per process and kernel.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch
from gguf.quants import IQ2_XXS

from dwarfstar.kernels import pdl
from dwarfstar.kernels.repack import PlanarIQ2XXS

# Warps per block (a template argument: any divisor of ROWS_RESIDENT_WARPS, read at each call)
ROWS_WARPS = 8
# Resident warps per SM the launch bounds hold (65536 registers / (32 x 128 registers a thread))
# and the grid is sized for: ROWS_RESIDENT_WARPS / ROWS_WARPS blocks per SM. Each block's 48 KB of
# table copies (+ 1 KB the driver reserves) keep up to 4 blocks within the 228 KB of an SM.
ROWS_RESIDENT_WARPS = 16
# Launch the gate/up as a programmatic dependent wherever pdl.launch allows one (False: torch's plain
# launch; the decode_variants A/B): its blocks fill their tables while the routing before them runs.
PDL = True
# The inputs of a row that one piece (64 inputs) per lane covers; P = ceil(D / this).
_INPUTS_PER_WARP_PIECE = 32 * 64

_SOURCE = f"""
#define ROWS_RESIDENT_WARPS {ROWS_RESIDENT_WARPS}
""" + r"""
__device__ __forceinline__ float half_bits_to_float(unsigned short u) {
    float f;
    asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(u));
    return f;
}

// The group's weight scale: the super-block's d times (0.5 + its 4-bit scale) / 4.
__device__ __forceinline__ float group_scale(unsigned short d, int sw) {
    return half_bits_to_float(d) * (0.5f + (float)((sw >> 28) & 15)) * 0.25f;
}

// Sums each lane's partial gate and up dots over the warp (every lane gets the totals).
__device__ __forceinline__ void warp_sum2(float& acc_g, float& acc_u) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        acc_g += __shfl_xor_sync(0xffffffffu, acc_g, o);
        acc_u += __shfl_xor_sync(0xffffffffu, acc_u, o);
    }
}

// The row's output wt * silu(min(g, limit)) * clamp(u, -limit, limit) (no clamp unless has_limit).
__device__ __forceinline__ float clamped_swiglu(float g, float u, float wt, double limit_d, int has_limit) {
    if (has_limit) {
        const float limit = (float)limit_d;
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
    }
    return wt * (g / (1.0f + expf(-g))) * u;
}

// The rows kernel's tables live in shared memory as TABLE_COPIES interleaved copies: entry e of copy c is
// 64-bit word TABLE_COPIES e + c, and lane l reads copy l % 16. A warp's 64-bit load is served a half warp
// at a time, so its 16 lanes hit 16 different bank pairs whichever entries they pick: 2 wavefronts per load
// (the least for 64 bits) where one shared copy of the grid averaged 5.9.
#define TABLE_COPIES 16
#define GRID_ENTRIES 256
#define SIGN_ENTRIES 128
// An entry's 16 copies span 128 bytes: entry e starts at byte e << ENTRY_SHIFT.
#define ENTRY_SHIFT 7
static_assert(8 * TABLE_COPIES == 1 << ENTRY_SHIFT, "an entry's copies are 1 << ENTRY_SHIFT bytes");

// Fills rep with the TABLE_COPIES copies of src's N entries. Thread t takes entries t, t + THREADS, ... and
// stores each as 8 16-byte chunks of 2 copies; chunk c of entry e goes to position c ^ (e % 8), so the 8
// lanes of a quarter warp (8 consecutive entries: one phase of a 16-byte store) hit 8 different bank quads.
template <int THREADS, int N>
__device__ __forceinline__ void fill_copies(unsigned long long* rep, const unsigned long long* __restrict__ src) {
    constexpr int per_thread = (N + THREADS - 1) / THREADS;
    unsigned long long v[per_thread];
    #pragma unroll
    for (int k = 0; k < per_thread; ++k) {
        const int e = threadIdx.x + k * THREADS;
        if (e < N) v[k] = src[e];
    }
    #pragma unroll
    for (int k = 0; k < per_thread; ++k) {
        const int e = threadIdx.x + k * THREADS;
        // byte offset of chunk 0's position; e << ENTRY_SHIFT leaves bits 4-6 free for the xor
        const unsigned first = (e << ENTRY_SHIFT) | ((e & 7) << 4);
        const ulonglong2 vv = make_ulonglong2(v[k], v[k]);
        if (e < N) {
            #pragma unroll
            for (int c = 0; c < TABLE_COPIES / 2; ++c)
                *reinterpret_cast<ulonglong2*>(reinterpret_cast<char*>(rep) + (first ^ (c << 4))) = vv;
        }
    }
}

// Byte offset, in a replicated table, of this lane's copy (lane_off = 8 (lane % 16)) of entry
// (w >> lo) & (mask >> ENTRY_SHIFT): one shift puts the field at bit ENTRY_SHIFT, one LOP3 masks and ors.
__device__ __forceinline__ unsigned rep_offset(unsigned w, int lo, unsigned mask, unsigned lane_off) {
    const unsigned f = lo <= ENTRY_SHIFT ? w << (ENTRY_SHIFT - lo) : w >> (lo - ENTRY_SHIFT);
    return (f & mask) | lane_off;
}

// pos, neg + octet j of a group (grid word gw, sign + scale word sw) against the 8 int8 activations in xa,
// xb, from the replicated grid and sign-mask tables. A mask byte is 0xFF where the weight is negative, so
// byte g ^ m is g or ~g = -g - 1 and the signed octet dot is dp4a(g ^ m, x) - dp4a(m, x) (m's bytes read
// as 0 / -1): pos takes the first, neg the second. That is 3 instructions per 4 bytes (1 LOP3, 2 dp4a);
// forming the signed bytes, (g ^ m) + (m & 0x01010101), before one dp4a takes 4 (2 of them ALU).
__device__ __forceinline__ void octet_dot_rep(const char* grid, const char* signs, unsigned gw, unsigned sw,
                                              int j, unsigned lane_off, int xa, int xb, int& pos, int& neg) {
    const uint2 g = *reinterpret_cast<const uint2*>(grid + rep_offset(gw, 8 * j, 255u << ENTRY_SHIFT, lane_off));
    const uint2 m = *reinterpret_cast<const uint2*>(signs + rep_offset(sw, 7 * j, 127u << ENTRY_SHIFT, lane_off));
    pos = __dp4a((int)(g.x ^ m.x), xa, pos);
    pos = __dp4a((int)(g.y ^ m.y), xb, pos);
    neg = __dp4a((int)m.x, xa, neg);
    neg = __dp4a((int)m.y, xb, neg);
}

// The exact integer dot of one 32-input group (words gw, sw) with its 8 activation words x[0..7].
__device__ __forceinline__ int group_dot_rep(const char* grid, const char* signs, int gw, int sw,
                                             unsigned lane_off, const int* x) {
    int pos = 0, neg = 0;
    #pragma unroll
    for (int j = 0; j < 4; ++j) octet_dot_rep(grid, signs, gw, sw, j, lane_off, x[2 * j], x[2 * j + 1], pos, neg);
    return pos - neg;
}

// One row's weights as one lane of the rows kernel holds them: its P pieces (16 bytes = the
// grid and sign words of 2 groups) of the gate and up rows and their super-blocks' d.
template <int P> struct RowPieces {
    int4 g[P], u[P];
    unsigned dg[P], du[P];
};

// The lane's pieces of the row starting at super-block sb: piece p = lane + 32 j of the row's D / 64
// lies in super-block sb + p / 4.
template <int P>
__device__ __forceinline__ void load_row(RowPieces<P>& w, const int4* __restrict__ gw4, const int4* __restrict__ uw4,
                                         const unsigned short* __restrict__ gd, const unsigned short* __restrict__ ud,
                                         long long sb, int lane, int n_pieces) {
    const int4* g = gw4 + sb * 4 + lane;
    const int4* u = uw4 + sb * 4 + lane;
    const unsigned short* dg = gd + sb + (lane >> 2);
    const unsigned short* du = ud + sb + (lane >> 2);
    #pragma unroll
    for (int j = 0; j < P; ++j) {
        if (lane + 32 * j < n_pieces) {
            w.g[j] = g[32 * j];
            w.u[j] = u[32 * j];
            w.dg[j] = dg[8 * j];
            w.du[j] = du[8 * j];
        }
    }
}

// One row from the lane's pieces w, activation words x and scales xsc: lane 0 writes it to dst.
template <int P>
__device__ __forceinline__ void row_out(const char* grid, const char* signs, unsigned lane_off,
                                        const RowPieces<P>& w, const int (&x)[P][16], const float (&xsc)[P][2],
                                        int lane, int n_pieces, float wt, double limit_d, int has_limit, float* dst) {
    float acc_g = 0.f, acc_u = 0.f;
    #pragma unroll
    for (int j = 0; j < P; ++j) {
        if (lane + 32 * j < n_pieces) {
            const int4 g = w.g[j], u = w.u[j];
            const int sg0 = group_dot_rep(grid, signs, g.x, g.y, lane_off, x[j]);
            const int sg1 = group_dot_rep(grid, signs, g.z, g.w, lane_off, x[j] + 8);
            const int su0 = group_dot_rep(grid, signs, u.x, u.y, lane_off, x[j]);
            const int su1 = group_dot_rep(grid, signs, u.z, u.w, lane_off, x[j] + 8);
            acc_g += (float)sg0 * group_scale(w.dg[j], g.y) * xsc[j][0];
            acc_g += (float)sg1 * group_scale(w.dg[j], g.w) * xsc[j][1];
            acc_u += (float)su0 * group_scale(w.du[j], u.y) * xsc[j][0];
            acc_u += (float)su1 * group_scale(w.du[j], u.w) * xsc[j][1];
        }
    }
    warp_sum2(acc_g, acc_u);
    if (lane == 0) *dst = clamped_swiglu(acc_g, acc_u, wt, limit_d, has_limit);
}

// gate_up's arguments (see the module docstring) plus the sign masks. Block (x, s) of grid (n / WARPS, B K):
// warp w = x WARPS + warp index of slot s computes rows w, w + n, ... with the next row's pieces in flight
// while it computes the current one. The launch bounds keep ROWS_RESIDENT_WARPS warps per SM (128 registers).
template <int P, int WARPS>
__global__ void __launch_bounds__(32 * WARPS, ROWS_RESIDENT_WARPS / WARPS) iq2xxs_gate_up_rows(
    const int* __restrict__ gw, const unsigned short* __restrict__ gd,
    const int* __restrict__ uw, const unsigned short* __restrict__ ud,
    const unsigned long long* __restrict__ table, const unsigned long long* __restrict__ sign_masks,
    const int* __restrict__ ids, const float* __restrict__ wts,
    const int* __restrict__ xw, const float* __restrict__ xs,
    float* __restrict__ mid, int F, int D, int K, double limit_d, int has_limit)
{
    // 32 KB + 16 KB: the 48 KB a block may declare statically.
    __shared__ __align__(16) unsigned long long grid_rep[GRID_ENTRIES * TABLE_COPIES];
    __shared__ __align__(16) unsigned long long sign_rep[SIGN_ENTRIES * TABLE_COPIES];
    const int lane = threadIdx.x & 31;
    const unsigned lane_off = (lane & (TABLE_COPIES - 1)) * 8u;
    const int slot = blockIdx.y;
    const int n_warps = gridDim.x * WARPS;
    int row = blockIdx.x * WARPS + (threadIdx.x >> 5);
    // Before the PDL wait only the constant tables are touched: ids and weights come from the launch just before
    // this one, and the activations may too (a quantiser launch when their producer did not write them).
    fill_copies<32 * WARPS, GRID_ENTRIES>(grid_rep, table);
    fill_copies<32 * WARPS, SIGN_ENTRIES>(sign_rep, sign_masks);
    // Launched as a programmatic dependent (pdl.py): wait until the launch before this one is complete and its
    // writes are visible, then let the next one launch. Outside such a launch both return at once.
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    const long long e = ids[slot];
    const long long tok = slot / K;
    const int kb = D >> 8;
    const int n_pieces = D >> 6;
    const int4* gw4 = reinterpret_cast<const int4*>(gw);
    const int4* uw4 = reinterpret_cast<const int4*>(uw);
    // super-block index of the next row to load, and the step to the warp's row after it
    long long sb = (e * F + row) * kb;
    const long long sb_step = (long long)n_warps * kb;
    // The first row's loads go out before the activations' so their latencies overlap.
    RowPieces<P> a, b;
    if (row < F) load_row<P>(a, gw4, uw4, gd, ud, sb, lane, n_pieces);
    sb += sb_step;
    int x[P][16];
    float xsc[P][2];
    #pragma unroll
    for (int j = 0; j < P; ++j) {
        const int p = lane + 32 * j;
        if (p < n_pieces) {
            const int4* xp = reinterpret_cast<const int4*>(xw + tok * (D >> 2) + 16 * p);
            #pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int4 v = xp[q];
                x[j][4 * q] = v.x, x[j][4 * q + 1] = v.y, x[j][4 * q + 2] = v.z, x[j][4 * q + 3] = v.w;
            }
            const float2 s = *reinterpret_cast<const float2*>(xs + tok * (D >> 5) + 2 * p);
            xsc[j][0] = s.x, xsc[j][1] = s.y;
        }
    }
    const float wt = wts[slot];
    __syncthreads();
    const char* grid = reinterpret_cast<const char*>(grid_rep);
    const char* signs = reinterpret_cast<const char*>(sign_rep);
    float* out = mid + (long long)slot * F;
    // Buffers a and b take turns (copying one into the other would cost ~25 moves per row):
    // the next row loads into one while the row in the other is computed.
    while (row < F) {
        if (row + n_warps < F) load_row<P>(b, gw4, uw4, gd, ud, sb, lane, n_pieces);
        sb += sb_step;
        row_out<P>(grid, signs, lane_off, a, x, xsc, lane, n_pieces, wt, limit_d, has_limit, out + row);
        row += n_warps;
        if (row >= F) break;
        if (row + n_warps < F) load_row<P>(a, gw4, uw4, gd, ud, sb, lane, n_pieces);
        sb += sb_step;
        row_out<P>(grid, signs, lane_off, b, x, xsc, lane, n_pieces, wt, limit_d, has_limit, out + row);
        row += n_warps;
    }
}
"""


@functools.lru_cache(maxsize=None)
def iq2xxs_sign_masks(device: str) -> torch.Tensor:
    """int64 [128]: for the 7 stored sign bits s of an octet, byte i = 0xFF where element i is negative
    (bit i of gguf-py's ksigns[s], whose bit 7 is the parity of s), else 0."""
    bits = np.unpackbits(np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    masks = np.ascontiguousarray(bits * np.uint8(0xFF))  # [128, 8]: byte i of entry s
    return torch.from_numpy(masks.view(np.int64).reshape(128).copy()).to(device)


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    return torch.cuda._compile_kernel(_SOURCE, name)


# CUDA driver API: cuLaunchKernelEx's config and the one launch attribute set here.
_PROGRAMMATIC_STREAM_SERIALIZATION = 6     # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union (here an int flag).
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


def _launch(kernel, grid: tuple, block: tuple, args: list) -> None:
    """kernel(*args) on the current stream, as a programmatic dependent launch (pdl.py) where
    pdl.launch allows one: torch's launcher (`_CudaKernel.__call__`) takes no launch attributes.
    Arguments as it converts them: tensors by pointer, ints as C int, floats as C double."""
    if not (PDL and pdl.launch(grid)["PDL"]):
        kernel(grid=grid, block=block, args=args)
        return
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
              else ctypes.c_int(a) if isinstance(a, int) else ctypes.c_double(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), 0,
                           ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), ctypes.pointer(attr), 1)
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    err = libcuda.cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {err}")


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    args = [gate.words, gate.d, up.words, up.d, table, iq2xxs_sign_masks(str(words.device)), ids, weights, words,
            scale, out, f, d, k, float(limit), int(limit > 0)]
    assert ROWS_RESIDENT_WARPS % ROWS_WARPS == 0, f"ROWS_WARPS {ROWS_WARPS} does not divide {ROWS_RESIDENT_WARPS}"
    # One wave split evenly over the slots, and no block without a row.
    per_sm = ROWS_RESIDENT_WARPS // ROWS_WARPS
    blocks = max(1, per_sm * _sm_count(words.device.index) // (n_tok * k))
    blocks = min(blocks, (f + ROWS_WARPS - 1) // ROWS_WARPS)
    pieces = (d + _INPUTS_PER_WARP_PIECE - 1) // _INPUTS_PER_WARP_PIECE
    kernel = _kernel(f"iq2xxs_gate_up_rows<{pieces},{ROWS_WARPS}>")
    _launch(kernel, (blocks, n_tok * k, 1), (32 * ROWS_WARPS, 1, 1), args)
    return out
