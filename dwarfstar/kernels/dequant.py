"""Selected routed experts dequantised to a dense fp16 (or bf16 / fp32) scratch: prefill's
grouped expert GEMMs (kernels/prefill_moe.py) multiply these with tensor cores.

Dims: E experts, S selected ids, N rows, K inputs, KB = K / 256 super-blocks per row.

Contract:
- `dequantize_experts(p, ids, dtype)`: planar [E, N, K] (IQ2_XXS, Q2_K or Q4_K; other
  formats go through the twin), ids integer [S] on p's device -> dtype [S, N, K] equal bit for
  bit to `dequantize_experts_ref` = `dequantize_planar(select_experts(p, ids), dtype)`: the
  float32 dequantisation (gguf's values) rounded once to dtype. One launch, no gather copy of
  the planar bytes, no float32 matrix in between.
- Exactness does not depend on FMA contraction: every product of the float32 recipe is exact
  (fp16 d times a <= 6-bit scale and a <= 6-bit code or grid value: <= 23 significant bits),
  so the only rounding in fp32 is Q2_K/Q4_K's final `dl * q - ml`, one rounding fused or not.

Kernel: program (s, b) writes BLOCK_SB super-blocks (BLOCK_SB x 256 outputs, contiguous) of
expert ids[s]. It decodes whole super-blocks like kernels/moe.py's decoders: one vector load of
the packed words per super-block, codes expanded in registers by constant shifts, scale
products once per sub-block (not per element), so an output costs a few integer ops, one
convert and one multiply(-add) instead of its own address arithmetic and 2-5 gathers.
- IQ2_XXS: one 8-byte gather per octet from moe.py's int64 grid table; the 7 sign bits +
  parity are spread to byte masks by a multiply and applied to the grid bytes as a two's
  complement negation (so each byte is the signed grid value), then a byte is sign-extended
  by (w << 24 - 8b) >> 24. db * (+-g) is exact, = the twin's (db * g) * sign.
- Q2_K: byte 32h + l holds elements 128h + 32s + l in bit pair s, so int32 word 8h + w' gives
  elements 128h + 32s + 4w' + b as (word >> 2s + 8b) & 3; Q4_K: (word >> 4n + 8b) & 15.
  d * sc and dmin * mn are formed per sub-block (exact), then dl * q - ml per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels.moe import iq2xxs_grid64, iq2xxs_signed_words
from dwarfstar.kernels.repack import (
    Planar, PlanarIQ2XXS, PlanarQ2K, PlanarQ4K, dequantize_planar, select_experts,
)
from dwarfstar.shape import QK_K

FMT = {PlanarIQ2XXS: 1, PlanarQ2K: 2, PlanarQ4K: 3}
# Untuned on a GPU yet: bench/dequant_bench.py sweeps (BLOCK_SB, num_warps). 32 super-blocks
# (16 KB of fp16) a program amortise the per-program id/word/grid load latency; the CPU-compiled
# sm_90 code has ~9 instructions an output here vs 13-23 for the per-element-gather kernel.
BLOCK_SB = 32
NUM_WARPS = 4


def dequantize_experts_ref(p: Planar, ids: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return dequantize_planar(select_experts(p, ids), dtype)


@triton.jit
def _dequant_kernel(p0, p1, p2, p3, p4, ids_ptr, out_ptr, n_sb, FMT: tl.constexpr, BLOCK_SB: tl.constexpr):
    s = tl.program_id(0)
    e = tl.load(ids_ptr + s).to(tl.int64)
    sb = tl.program_id(1) * BLOCK_SB + tl.arange(0, BLOCK_SB)                  # [BSB]
    mask = sb < n_sb
    g = (e * n_sb + tl.where(mask, sb, 0).to(tl.int64))[:, None]                # global super-block
    m2 = mask[:, None]
    if FMT == 1:
        # IQ2_XXS: p0 words int32 [.., 16], p1 d fp16, p2 grid int64 [256] (8 bytes a row).
        wv = tl.load(p0 + g * 16 + tl.arange(0, 16)[None, :], mask=m2, other=0)
        gw, sw = tl.split(tl.reshape(wv, [BLOCK_SB, 8, 2]))                    # [BSB, 8] per group of 32
        lo, hi = iq2xxs_signed_words(gw, sw, p2)                                # [BSB, 8, 4] int32
        w = tl.join(lo, hi)                                                     # [BSB, 8, 4, 2]
        b = tl.arange(0, 4)[None, None, None, None, :]
        q = (w[:, :, :, :, None] << (24 - 8 * b)) >> 24                         # [BSB, 8, 4, 2, 4] signed
        d = tl.load(p1 + g, mask=m2, other=0.0).to(tl.float32)
        db = d * (0.5 + ((sw >> 28) & 15).to(tl.float32)) * 0.25                # [BSB, 8]
        val = db[:, :, None, None, None] * q.to(tl.float32)
    else:
        if FMT == 2:
            # Q2_K: p0 qs as int32 [.., 16], p1 sc uint8 [.., 16] (scale | min << 4), p2 dm fp16 [.., 2].
            wv = tl.load(p0 + g * 16 + tl.arange(0, 16)[None, :], mask=m2, other=0)
            sh = (2 * tl.arange(0, 4)[None, None, :, None, None, None]
                  + 8 * tl.arange(0, 4)[None, None, None, None, None, :])
            q = (tl.reshape(wv, [BLOCK_SB, 2, 1, 2, 4, 1]) >> sh) & 3             # [BSB, h, s, w'/4, w'%4, b]
            scb = tl.load(p1 + g * 16 + tl.arange(0, 16)[None, :], mask=m2, other=0).to(tl.int32)
            sc = scb & 15
            mn = scb >> 4
        else:
            # Q4_K: p0 qs as int32 [.., 32], p1 sc, p3 mn uint8 [.., 8], p2 dm fp16 [.., 2].
            wv = tl.load(p0 + g * 32 + tl.arange(0, 32)[None, :], mask=m2, other=0)
            sh = (4 * tl.arange(0, 2)[None, None, :, None, None]
                  + 8 * tl.arange(0, 4)[None, None, None, None, :])
            q = (tl.reshape(wv, [BLOCK_SB, 4, 1, 8, 1]) >> sh) & 15              # [BSB, c, n, w', b]
            sc = tl.load(p1 + g * 8 + tl.arange(0, 8)[None, :], mask=m2, other=0).to(tl.int32)
            mn = tl.load(p3 + g * 8 + tl.arange(0, 8)[None, :], mask=m2, other=0).to(tl.int32)
        d = tl.load(p2 + g * 2, mask=m2, other=0.0).to(tl.float32)
        dmin = tl.load(p2 + g * 2 + 1, mask=m2, other=0.0).to(tl.float32)
        # per sub-block (16 for Q2_K, 32 for Q4_K), both products exact
        dl = d * sc.to(tl.float32)
        ml = dmin * mn.to(tl.float32)
        if FMT == 2:
            dl = tl.reshape(dl, [BLOCK_SB, 2, 4, 2, 1, 1])
            ml = tl.reshape(ml, [BLOCK_SB, 2, 4, 2, 1, 1])
        else:
            dl = tl.reshape(dl, [BLOCK_SB, 4, 2, 1, 1])
            ml = tl.reshape(ml, [BLOCK_SB, 4, 2, 1, 1])
        val = dl * q.to(tl.float32) - ml
    val = tl.reshape(val, [BLOCK_SB, 256])
    out = out_ptr + (s.to(tl.int64) * n_sb + sb.to(tl.int64))[:, None] * 256 + tl.arange(0, 256)[None, :]
    tl.store(out, val.to(out_ptr.dtype.element_ty), mask=m2)


def _args(p: Planar) -> tuple[torch.Tensor, ...]:
    for f in p.__dataclass_fields__:
        assert getattr(p, f).is_contiguous(), f"{type(p).__name__}.{f} must be contiguous"
    if isinstance(p, PlanarIQ2XXS):
        grid = iq2xxs_grid64(str(p.words.device))
        return p.words, p.d, grid, grid, grid
    if isinstance(p, PlanarQ2K):
        return p.qs.view(torch.int32), p.sc, p.dm, p.dm, p.dm
    return p.qs.view(torch.int32), p.sc, p.dm, p.mn, p.mn


def dequantize_experts(p: Planar, ids: torch.Tensor, dtype: torch.dtype = torch.float16,
                       out: torch.Tensor | None = None, block_sb: int = BLOCK_SB,
                       num_warps: int = NUM_WARPS) -> torch.Tensor:
    """dtype [S, N, K]: experts `ids` of p dequantised (see the module contract)."""
    if type(p) not in FMT:
        return dequantize_experts_ref(p, ids, dtype)
    _, n, k = p.shape
    assert k % QK_K == 0 and ids.dim() == 1, "planar [E, N, K] with K a multiple of 256, ids [S]"
    if out is None:
        out = torch.empty(ids.shape[0], n, k, dtype=dtype, device=ids.device)
    assert out.shape == (ids.shape[0], n, k) and out.is_contiguous() and out.dtype == dtype
    n_sb = n * (k // QK_K)
    if ids.shape[0]:
        _dequant_kernel[(ids.shape[0], triton.cdiv(n_sb, block_sb))](
            *_args(p), ids.contiguous(), out, n_sb, FMT=FMT[type(p)], BLOCK_SB=block_sb, num_warps=num_warps)
    return out
