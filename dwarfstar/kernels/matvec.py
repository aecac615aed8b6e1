"""Quantised mat-vecs y = x W^T for decode: dense weights and routed experts picked by id.

Dims: B activation columns (1..MAX_COLS; decode sessions), S expert slots, E experts,
N output rows, K inputs.

Contract:
- `matvec(w, x)`: w a planar tensor [N, K] (repack.py), x float32 [B, K] -> y float32 [B, N],
  y[b, n] = sum_k x[b, k] * W[n, k]. The weight is read once for all B columns.
- `expert_matvec(w, ids, x)`: w planar [E, N, K], ids int32 [S], x float32 [S, K] ->
  y float32 [S, N], y[s] = W[ids[s]] @ x[s]. Only the selected experts' rows are read.
- `matvec_split_k(w, x, splits)` -> partial products float32 [S, B, N] over S consecutive K
  ranges (`split_chunk`); their sum is matvec(w, x). For few rows with a long K.
- `cat_planar(parts)` / `split_planar(w, sizes)`: dense planar weights of one type stacked
  along N (one launch for mat-vecs sharing x) and row views of such a stack.
- All take an optional preallocated `out` (static addresses for CUDA graphs) and never sync.
- Weights are dequantised in registers to fp32 and multiplied by fp32 x with fp32
  accumulation: the result differs from the float64 product by fp32 rounding only.
  (The int8-activation dp4a recipe of kernels.md §4 is a later, faster variant.)

One kernel serves all five formats (FMT constexpr picks the tile decoder) and both calls
(HAS_IDS constexpr): program (i, s) computes rows i*BLOCK_N.. of slot s; a dense call has one
slot holding all B columns, an expert call S slots of one column each. With SPLIT, program
(i, s, c) covers the c-th K range only and writes partial c.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.kernels.repack import (
    Planar, PlanarF16, PlanarIQ2XXS, PlanarQ2K, PlanarQ4K, PlanarQ8_0,
    dequantize_planar, iq2xxs_tables, select_experts,
)

MAX_COLS = 8
# Tile decoders, by planar type.
FMT = {PlanarQ8_0: 0, PlanarIQ2XXS: 1, PlanarQ2K: 2, PlanarQ4K: 3, PlanarF16: 4}
# Default tiling; bench/matvec_bench.py sweeps these on the device.
BLOCK_K = 256
NUM_WARPS = 4


def matvec_ref(w: Planar, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of `matvec`: dequantise all of w, one fp32 matmul."""
    y = x.float() @ dequantize_planar(w).T  # [B, N]
    return y if out is None else out.copy_(y)


def expert_matvec_ref(
    w: Planar, ids: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Twin of `expert_matvec`: dequantise the selected experts only, batched fp32 matvec."""
    wsel = dequantize_planar(select_experts(w, ids))  # [S, N, K]
    y = torch.bmm(wsel, x.float()[:, :, None])[:, :, 0]  # [S, N]
    return y if out is None else out.copy_(y)


@triton.jit
def _tile_q8_0(qs_ptr, d_ptr, rows, offs_k, mask, mask_n, K, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BN, BK] of a Q8_0 tile: qs[row, k] * d[row, k // 32].

    d is loaded once per 32-block ([BN, BK/32]) and broadcast through a reshape, rather than
    gathered per element.
    """
    q = tl.load(qs_ptr + rows[:, None] * K + offs_k[None, :], mask=mask, other=0)
    offs_kb = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    mask_d = mask_n[:, None] & (offs_kb < K // 32)[None, :]
    d = tl.load(d_ptr + rows[:, None] * (K // 32) + offs_kb[None, :], mask=mask_d, other=0)
    w = tl.reshape(q.to(tl.float32), [BLOCK_N, BLOCK_K // 32, 32]) * d.to(tl.float32)[:, :, None]
    return tl.reshape(w, [BLOCK_N, BLOCK_K])


@triton.jit
def _tile_iq2_xxs(words_ptr, d_ptr, grid_ptr, rows, offs_k, mask, K):
    """fp32 [BN, BK] of an IQ2_XXS tile (gguf.md §4): db * GRID[a][t] * sign."""
    i = offs_k % 256
    group = i // 32
    octet = (i % 32) // 8
    t = i % 8
    wbase = rows[:, None] * (K // 16) + (offs_k // 256)[None, :] * 16 + 2 * group[None, :]
    gw = tl.load(words_ptr + wbase, mask=mask, other=0)
    sw = tl.load(words_ptr + wbase + 1, mask=mask, other=0)
    gi = (gw >> (8 * octet[None, :])) & 255
    si = (sw >> (7 * octet[None, :])) & 127
    # The 8th sign is the parity of the 7 stored ones (KSIGNS), folded here instead of a table.
    par = si ^ (si >> 4)
    par = par ^ (par >> 2)
    par = (par ^ (par >> 1)) & 1
    neg = ((si | (par << 7)) >> t[None, :]) & 1
    d = tl.load(d_ptr + rows[:, None] * (K // 256) + (offs_k // 256)[None, :], mask=mask, other=0)
    db = d.to(tl.float32) * (0.5 + ((sw >> 28) & 15).to(tl.float32)) * 0.25
    g = tl.load(grid_ptr + gi * 8 + t[None, :], mask=mask, other=0)
    v = db * g
    return tl.where(neg != 0, -v, v)


@triton.jit
def _tile_q2_k(qs_ptr, sc_ptr, dm_ptr, rows, offs_k, mask, K):
    """fp32 [BN, BK] of a Q2_K tile: d * (sc & 15) * q - dmin * (sc >> 4)."""
    i = offs_k % 256
    kb = (offs_k // 256)[None, :]
    qoff = 32 * (i // 128) + i % 32
    qb = tl.load(qs_ptr + rows[:, None] * (K // 4) + kb * 64 + qoff[None, :], mask=mask, other=0)
    q = (qb >> (2 * ((i % 128) // 32))[None, :]) & 3
    sc = tl.load(sc_ptr + rows[:, None] * (K // 16) + kb * 16 + (i // 16)[None, :], mask=mask, other=0)
    dmb = dm_ptr + rows[:, None] * (K // 128) + kb * 2
    d = tl.load(dmb, mask=mask, other=0).to(tl.float32)
    dmin = tl.load(dmb + 1, mask=mask, other=0).to(tl.float32)
    return d * (sc & 15).to(tl.float32) * q.to(tl.float32) - dmin * (sc >> 4).to(tl.float32)


@triton.jit
def _tile_q4_k(qs_ptr, sc_ptr, mn_ptr, dm_ptr, rows, offs_k, mask, K):
    """fp32 [BN, BK] of a Q4_K tile: d * sc[j] * q - dmin * mn[j], j = sub-block of 32."""
    i = offs_k % 256
    kb = (offs_k // 256)[None, :]
    qoff = 32 * (i // 64) + i % 32
    qb = tl.load(qs_ptr + rows[:, None] * (K // 2) + kb * 128 + qoff[None, :], mask=mask, other=0)
    q = (qb >> (4 * ((i % 64) // 32))[None, :]) & 15
    soff = rows[:, None] * (K // 32) + kb * 8 + (i // 32)[None, :]
    sc = tl.load(sc_ptr + soff, mask=mask, other=0).to(tl.float32)
    mn = tl.load(mn_ptr + soff, mask=mask, other=0).to(tl.float32)
    dmb = dm_ptr + rows[:, None] * (K // 128) + kb * 2
    d = tl.load(dmb, mask=mask, other=0).to(tl.float32)
    dmin = tl.load(dmb + 1, mask=mask, other=0).to(tl.float32)
    return d * sc * q.to(tl.float32) - dmin * mn


@triton.jit
def slot_rows(ids_ptr, pid_n, pid_s, N, HAS_IDS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows pid_n*BLOCK_N.. of slot pid_s -> (offs_n, mask_n, rows): rows index the stacked
    [E, N] weight (expert ids[pid_s] with HAS_IDS, else 0), int64 because E*N*K exceeds 2**31."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_IDS:
        e = tl.load(ids_ptr + pid_s).to(tl.int64)
    else:
        e = 0
    return offs_n, offs_n < N, e * N + offs_n.to(tl.int64)


@triton.jit
def _matvec_kernel(
    p0, p1, p2, p3, ids_ptr, x_ptr, y_ptr, N, K, K_CHUNK,
    FMT: tl.constexpr, HAS_IDS: tl.constexpr, B: tl.constexpr, BP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # Split K: program (i, s, c) sums inputs [c K_CHUNK, (c + 1) K_CHUNK) into partial c.
    if SPLIT:
        pid_k = tl.program_id(2)
        k_lo = pid_k * K_CHUNK
        k_hi = tl.minimum(K, k_lo + K_CHUNK)
        y_ptr += pid_k * tl.num_programs(1) * B * N
    else:
        k_lo = 0
        k_hi = K
    offs_n, mask_n, rows = slot_rows(ids_ptr, pid_n, pid_s, N, HAS_IDS, BLOCK_N)
    offs_b = tl.arange(0, BP)
    mask_b = offs_b < B
    x_base = x_ptr + pid_s * B * K
    acc = tl.zeros([BLOCK_N, BP], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_n[:, None] & mask_k[None, :]
        if FMT == 0:
            w = _tile_q8_0(p0, p1, rows, offs_k, mask, mask_n, K, k0, BLOCK_N, BLOCK_K)
        elif FMT == 1:
            w = _tile_iq2_xxs(p0, p1, p2, rows, offs_k, mask, K)
        elif FMT == 2:
            w = _tile_q2_k(p0, p1, p2, rows, offs_k, mask, K)
        elif FMT == 3:
            w = _tile_q4_k(p0, p1, p2, p3, rows, offs_k, mask, K)
        else:
            w = tl.load(p0 + rows[:, None] * K + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        # One column at a time reuses the decoded tile from registers; a [BN, BP, BK]
        # broadcast product instead multiplied register use by BP (measured 6 % at B = 8).
        for b in tl.static_range(B):
            xb = tl.load(x_base + b * K + offs_k, mask=mask_k, other=0)
            part = tl.sum(w * xb[None, :], axis=1)
            acc += tl.where(offs_b[None, :] == b, part[:, None], 0.0)
    y_ptrs = y_ptr + pid_s * B * N + offs_b[None, :] * N + offs_n[:, None]
    tl.store(y_ptrs, acc, mask=mask_n[:, None] & mask_b[None, :])


def cat_planar(parts: list[Planar]) -> Planar:
    """Dense planar weights [N_i, K] of one type stacked along N -> [sum N_i, K], so mat-vecs
    reading the same x run as one launch. Every planar field has N as its leading dim, so
    this is a torch.cat of each field: dequantize_planar(result) == cat(dequantize_planar(parts))."""
    kind, k = type(parts[0]), parts[0].shape[-1]
    assert all(type(p) is kind and len(p.shape) == 2 and p.shape[-1] == k for p in parts), \
        "cat_planar: dense weights of one planar type and one K"
    return kind(*(torch.cat([getattr(p, f) for p in parts]) for f in kind.__dataclass_fields__))


def split_planar(w: Planar, sizes: list[int]) -> list[Planar]:
    """Row ranges of a dense planar weight as planar views (contiguous, no copy)."""
    assert len(w.shape) == 2 and sum(sizes) == w.shape[0], f"sizes {sizes} do not cover {w.shape[0]} rows"
    out, r0 = [], 0
    for n in sizes:
        out.append(type(w)(*(getattr(w, f)[r0:r0 + n] for f in w.__dataclass_fields__)))
        r0 += n
    return out


def _weight_args(w: Planar) -> tuple[torch.Tensor, ...]:
    """The four pointer arguments of `_matvec_kernel` for this format (unused ones repeat p0)."""
    for t in w.__dataclass_fields__:
        assert getattr(w, t).is_contiguous(), f"{type(w).__name__}.{t} must be contiguous"
    if isinstance(w, PlanarQ8_0):
        assert w.qs.dtype == torch.int8 and w.d.dtype == torch.float16
        return w.qs, w.d, w.qs, w.qs
    if isinstance(w, PlanarIQ2XXS):
        assert w.words.dtype == torch.int32 and w.d.dtype == torch.float16
        grid, _ = iq2xxs_tables(str(w.words.device))
        return w.words, w.d, grid, w.words
    if isinstance(w, PlanarQ2K):
        assert w.qs.dtype == torch.uint8 and w.dm.dtype == torch.float16
        return w.qs, w.sc, w.dm, w.qs
    if isinstance(w, PlanarQ4K):
        assert w.qs.dtype == torch.uint8 and w.dm.dtype == torch.float16
        return w.qs, w.sc, w.mn, w.dm
    assert isinstance(w, PlanarF16) and w.w.dtype == torch.float16
    return w.w, w.w, w.w, w.w


def _b1_tiling(w: Planar, n_rows: int, k: int) -> tuple[int, int, int]:
    """(block_n, block_k, num_warps) for one column: the winners of bench/matvec_bench.py's
    sweeps (H100 table, then the H200 --wide sweep; docs/PERF.md) by shape class. Few rows: long K tiles,
    many warps (fewer, fuller programs); the vocab head: 8 x 2048; else 8 x 512 (K <= 4096)
    or 4 x 1024."""
    if isinstance(w, (PlanarQ8_0, PlanarF16)):
        f16 = isinstance(w, PlanarF16)
        if n_rows <= 2048:
            return (2 if n_rows <= 1024 else 4), min(2048, triton.next_power_of_2(k)), (4 if f16 else 8)
        if n_rows >= 65536:
            return 8, 2048, 4
        # H200 wide sweep of the production shapes (bench/matvec_bench.py --wide, docs/PERF.md):
        # merged F16 compressors 2624 x 4096 best at (2, 2048, 2), the indexer's 8192 x 1024 at
        # (8, 512, 4); Q8_0 up to 4096 rows (shared gate+up, down) at (4, 1024, 4).
        if f16:
            return (2, 2048, 2) if k >= 4096 else (8, 512, 4)
        if n_rows <= 4096:
            return 4, 1024, 4
        return (8, 512, 4) if k <= 4096 else (4, 1024, 4)
    return 2, 1024 if k <= 2048 else 2048, 8


def _default_block_n(n_rows: int, n_slots: int, cols: int) -> int:
    """Rows per program: enough programs to fill the GPU, fewer registers as B grows."""
    block_n = 16 if n_rows * n_slots >= 16384 else 8 if n_rows * n_slots >= 4096 else 4
    return max(1, block_n // max(1, cols // 2))


def _launch(w, ids, x, out, n_slots, cols, block_n, block_k, num_warps, splits=0):
    *_, n, k = w.shape
    assert x.dtype == torch.float32 and x.is_contiguous() and x.shape[-1] == k, "x: float32 [.., K] contiguous"
    assert 1 <= cols <= MAX_COLS, f"at most {MAX_COLS} columns per slot, got {cols}"
    shape = (splits, x.shape[0], n) if splits else (x.shape[0], n)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == shape
    p0, p1, p2, p3 = _weight_args(w)
    assert p0.device == x.device == out.device, "weights, x and out on one device"
    if block_n is None and cols == 1 and block_k == BLOCK_K and num_warps == NUM_WARPS:
        block_n, block_k, num_warps = _b1_tiling(w, n, k)
    block_n = block_n or _default_block_n(n, n_slots, cols)
    grid = (triton.cdiv(n, block_n), n_slots, max(1, splits))
    _matvec_kernel[grid](
        p0, p1, p2, p3, ids if ids is not None else p0, x, out, n, k, split_chunk(k, splits, block_k),
        FMT=FMT[type(w)], HAS_IDS=ids is not None, B=cols, BP=triton.next_power_of_2(cols),
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=splits > 0, **pdl.launch(grid), num_warps=num_warps,
    )
    return out


def split_chunk(k: int, splits: int, block_k: int) -> int:
    """Inputs per split-K partial: K / splits rounded up to whole BLOCK_K tiles (a tile never
    straddles two partials); the last partials may be short or empty (then zero)."""
    return triton.cdiv(triton.cdiv(k, max(1, splits)), block_k) * block_k


def matvec(
    w: Planar, x: torch.Tensor, out: torch.Tensor | None = None,
    block_n: int | None = None, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """y [B, N] = x [B, K] @ W^T for a planar [N, K] weight; B <= MAX_COLS."""
    assert len(w.shape) == 2 and x.dim() == 2, "dense weight [N, K], x [B, K]"
    return _launch(w, None, x, out, 1, x.shape[0], block_n, block_k, num_warps)


def expert_matvec(
    w: Planar, ids: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None,
    block_n: int | None = None, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """y [S, N] with y[s] = W[ids[s]] @ x[s] for a planar [E, N, K] weight."""
    assert len(w.shape) == 3 and x.dim() == 2, "expert weight [E, N, K], x [S, K]"
    assert ids.dtype == torch.int32 and ids.is_contiguous() and ids.shape == (x.shape[0],), "ids: int32 [S]"
    return _launch(w, ids, x, out, x.shape[0], 1, block_n, block_k, num_warps)


# ---- split K: few-row mat-vecs with a long K (the HC fn 24 x 16384, the head's 4 x 16384) --
# One program per row block reads all of K: 12 programs for 24 rows, 3 % of streaming read on
# H100 (docs/PERF.md). Split over K instead, each program writing its partial sum; the consumer
# sums the S partials (kernels/hc.py hc_split does, in the launch it makes anyway).
SPLIT_K = 32
SPLIT_TILING = (4, 512, 4)   # (block_n, block_k, num_warps); untuned, see bench/matvec_bench.py


def matvec_split_k_ref(w: Planar, x: torch.Tensor, splits: int = SPLIT_K, block_k: int = SPLIT_TILING[1]):
    """Twin of `matvec_split_k`: partial [S, B, N] over the same K ranges."""
    wf, xf = dequantize_planar(w), x.float()
    chunk = split_chunk(wf.shape[1], splits, block_k)
    return torch.stack([xf[:, i * chunk:(i + 1) * chunk] @ wf[:, i * chunk:(i + 1) * chunk].T
                        for i in range(splits)])


def matvec_split_k(
    w: Planar, x: torch.Tensor, splits: int = SPLIT_K, out: torch.Tensor | None = None,
    block_n: int = SPLIT_TILING[0], block_k: int = SPLIT_TILING[1], num_warps: int = SPLIT_TILING[2],
) -> torch.Tensor:
    """Partial products [S, B, N]: partial c = x[:, Kc] @ W[:, Kc]^T over the c-th K range
    (`split_chunk`); their sum is `matvec(w, x)` up to fp32 order."""
    assert len(w.shape) == 2 and x.dim() == 2 and splits >= 1, "dense weight [N, K], x [B, K]"
    return _launch(w, None, x, out, 1, x.shape[0], block_n, block_k, num_warps, splits)
