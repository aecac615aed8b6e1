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
expert ids[s]; each output element gathers its own word/byte and scale (the loads of one
super-block hit the same cache lines), so the kernel is bound by the fp16 write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels.repack import (
    Planar, PlanarIQ2XXS, PlanarQ2K, PlanarQ4K, dequantize_planar, iq2xxs_tables, select_experts,
)
from dwarfstar.shape import QK_K

FMT = {PlanarIQ2XXS: 1, PlanarQ2K: 2, PlanarQ4K: 3}
BLOCK_SB = 8
NUM_WARPS = 4


def dequantize_experts_ref(p: Planar, ids: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return dequantize_planar(select_experts(p, ids), dtype)


@triton.jit
def _dequant_kernel(p0, p1, p2, p3, p4, ids_ptr, out_ptr, n_sb, FMT: tl.constexpr, BLOCK_SB: tl.constexpr):
    s = tl.program_id(0)
    e = tl.load(ids_ptr + s).to(tl.int64)
    sb = tl.program_id(1) * BLOCK_SB + tl.arange(0, BLOCK_SB)[:, None]           # [BSB, 1]
    mask = sb < n_sb
    g = e * n_sb + tl.where(mask, sb, 0).to(tl.int64)                           # global super-block
    j = tl.arange(0, 256)[None, :]                                              # [1, 256]
    if FMT == 1:
        # IQ2_XXS: p0 words int32 [.., 16], p1 d fp16, p2 grid fp32 [256 * 8], p3 ksigns uint8.
        grp = j // 32
        octet = (j // 8) % 4
        t = j % 8
        gw = tl.load(p0 + g * 16 + 2 * grp, mask=mask, other=0)
        sw = tl.load(p0 + g * 16 + 2 * grp + 1, mask=mask, other=0)
        d = tl.load(p1 + g, mask=mask, other=0.0).to(tl.float32)
        db = d * (0.5 + ((sw >> 28) & 15).to(tl.float32)) * 0.25
        gi = (gw >> (8 * octet)) & 255
        si = (sw >> (7 * octet)) & 127
        gv = tl.load(p2 + gi * 8 + t)
        bit = (tl.load(p3 + si).to(tl.int32) >> t) & 1
        val = (db * gv) * (1.0 - 2.0 * bit.to(tl.float32))
    else:
        if FMT == 2:
            # Q2_K: p0 qs uint8 [.., 64], p1 sc uint8 [.., 16] (scale | min << 4), p2 dm fp16 [.., 2].
            byte = tl.load(p0 + g * 64 + 32 * (j // 128) + j % 32, mask=mask, other=0).to(tl.int32)
            q = (byte >> (2 * ((j // 32) % 4))) & 3
            scb = tl.load(p1 + g * 16 + j // 16, mask=mask, other=0).to(tl.int32)
            sc = scb & 15
            mn = scb >> 4
        else:
            # Q4_K: p0 qs uint8 [.., 128], p1 sc, p3 mn uint8 [.., 8], p2 dm fp16 [.., 2].
            byte = tl.load(p0 + g * 128 + 32 * (j // 64) + j % 32, mask=mask, other=0).to(tl.int32)
            q = (byte >> (4 * ((j // 32) % 2))) & 15
            sc = tl.load(p1 + g * 8 + j // 32, mask=mask, other=0).to(tl.int32)
            mn = tl.load(p3 + g * 8 + j // 32, mask=mask, other=0).to(tl.int32)
        d = tl.load(p2 + g * 2, mask=mask, other=0.0).to(tl.float32)
        dmin = tl.load(p2 + g * 2 + 1, mask=mask, other=0.0).to(tl.float32)
        val = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
    out = out_ptr + s.to(tl.int64) * n_sb * 256 + sb.to(tl.int64) * 256 + j
    tl.store(out, val.to(out_ptr.dtype.element_ty), mask=mask)


def _args(p: Planar) -> tuple[torch.Tensor, ...]:
    for f in p.__dataclass_fields__:
        assert getattr(p, f).is_contiguous(), f"{type(p).__name__}.{f} must be contiguous"
    if isinstance(p, PlanarIQ2XXS):
        grid, ksigns = iq2xxs_tables(str(p.words.device))
        return p.words, p.d, grid, ksigns, ksigns
    if isinstance(p, PlanarQ2K):
        return p.qs, p.sc, p.dm, p.dm, p.dm
    return p.qs, p.sc, p.dm, p.mn, p.mn


def dequantize_experts(p: Planar, ids: torch.Tensor, dtype: torch.dtype = torch.float16,
                       out: torch.Tensor | None = None) -> torch.Tensor:
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
        _dequant_kernel[(ids.shape[0], triton.cdiv(n_sb, BLOCK_SB))](
            *_args(p), ids.contiguous(), out, n_sb, FMT=FMT[type(p)], BLOCK_SB=BLOCK_SB, num_warps=NUM_WARPS)
    return out
