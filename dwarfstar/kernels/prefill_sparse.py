"""Sparse attention of a prefill chunk in one Triton launch: per query, its raw window (ring rows
held before the chunk + the chunk's own rows) and its compressed rows (by index on ratio-4
layers, every emitted row on ratio-128 layers), with sinks (model.md §2.3).

Dims: T chunk queries, H heads, D head dim, W window, R ring rows (W), N_c compressed rows,
K indices per query (the indexer's top-k).

Contract:
- `attend_prefill(q [T, H, D], kv [T, D], ring [R, D], ring_pos int64 [R], positions int64 [T],
  comp [N_c, D] | None, comp_idx int [T, K] | None, ratio, sinks [H], window, dtype, out=None)`
  -> o float32 [T, H, D] (written into `out` when given). positions strictly increasing
  integers (a chunk); the ring holds rows of positions < positions[0] only (-1: empty slot).
  Keys of query t at position p, which double as values:
  ring slot j iff p - W < ring_pos[j] <= p and ring_pos[j] >= 0; chunk row j iff
  p - W < positions[j] <= p (so j <= t); compressed row c = comp_idx[t, i] (or every c when
  comp_idx is None) iff 0 <= c < min((p + 1) // ratio, N_c), the rows emitted up to p that
  comp holds (the engine passes its whole capacity, so N_c never cuts) — an index list
  may hold rows the query cannot see yet (the indexer's top-k over -inf scores) and they are
  masked here, not by the caller. logits = q.k / sqrt(D), one softmax over the visible keys
  plus a per-head sink logit carrying no value: model/attention._attend, the same function as
  kernels/prefill_attend.attend_chunk (the twin, `attend_prefill_ref`).
- `dtype`: the products' input type (DOT_DTYPE). float16 on CUDA: q, keys and the
  probabilities rounded to fp16, fp32 accumulation and fp32 softmax, as attend_chunk's
  fp16 path; float32 (CPU interpreter): ieee fp32 dots, equal to the twin up to fp32 order.
Design: program (g, t) takes head block g of query t (head blocks of one query adjacent in
the launch order, so they share the query's key rows in L2): a Q tile [BLOCK_H, D] held in
registers, an fp32 accumulator [BLOCK_H, D], an online softmax over key blocks of BLOCK_N
rows — the ring (only while the window reaches before the chunk), the chunk band
max(0, t - W + 1) .. t, then the compressed rows (gathered by index, or 0 .. (p+1)//ratio - 1)
— and the sink folded into the denominator at the end. Single pass: T * H / BLOCK_H programs
fill the GPU without splitting keys. The key tensors are cast to DOT_DTYPE once in the launcher.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dwarfstar.kernels.prefill_attend import attend_chunk

# H200 sweep at Flash shapes (4096 queries at position 12288; BLOCK_H 16/32/64 x BLOCK_N 16/32/64
# x 4/8 warps, 2 stages): (32, 32, 4) best for both ratio 4 (512 indexed rows: 2.4 ms, attend_chunk
# fp16 17.5 ms) and ratio 128 (96-128 rows: 1.3 ms, attend_chunk fp16 10.1 ms); 8 warps 1.3-2x slower.
BLOCK_H = 32      # heads per program (tl.dot needs >= 16)
BLOCK_N = 32      # key rows per online-softmax step
NUM_WARPS = 4
NUM_STAGES = 2


def comp_mask_of(comp_idx: torch.Tensor | None, positions: torch.Tensor, n_comp: int, ratio: int) -> torch.Tensor:
    """The [T, N_c] bool mask the kernel's visibility rule means: chosen (or every) row c with
    c < (p + 1) // ratio."""
    visible = torch.arange(n_comp, device=positions.device)[None, :] < ((positions + 1) // ratio)[:, None]
    if comp_idx is None:
        return visible
    ok = (comp_idx >= 0) & (comp_idx < n_comp)
    chosen = torch.zeros_like(visible).scatter_(1, torch.where(ok, comp_idx, 0).long(), ok)
    return chosen & visible


def attend_prefill_ref(q, kv, ring, ring_pos, positions, comp, comp_idx, ratio, sinks, window: int,
                       dtype: torch.dtype = torch.float32, out=None) -> torch.Tensor:
    """Twin: the index list turned into attend_chunk's mask (fp32: _attend over all keys)."""
    comp_mask = comp_k = None
    if comp is not None:
        comp_mask = comp_mask_of(comp_idx, positions, comp.shape[0], ratio)
        comp_k = None if comp_idx is None else comp_idx.shape[1]
    o = attend_chunk(q, kv, ring, ring_pos, positions, comp, comp_mask, sinks, window, dtype, comp_k=comp_k)
    return o if out is None else out.copy_(o)


@triton.jit
def _online_step(acc, m_i, l_i, qt, kt, ok, sqrt_d, DOT_DTYPE: tl.constexpr):
    """One key block kt [BLOCK_N, D] (zero rows where not ok) into the running max m_i, sum l_i
    and value sum acc [BLOCK_H, D] (all scaled to exp(-m_i))."""
    s = tl.dot(qt, tl.trans(kt), input_precision="ieee")                     # [BLOCK_H, BLOCK_N]
    s = tl.where(ok[None, :], tl.div_rn(s, sqrt_d), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # No visible key yet: m_new = -inf, and p = 0, alpha = 0 (acc and l_i are 0 then anyway).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(DOT_DTYPE), kt, acc * alpha[:, None], input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _rows(ptr, rows, ok, dd, D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Rows [BLOCK_N, D] of a [*, D] tensor, zero where not ok, in DOT_DTYPE."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0).to(DOT_DTYPE)


@triton.jit
def _prefill_sparse_kernel(q_ptr, kv_ptr, ring_ptr, ring_pos_ptr, pos_ptr, comp_ptr, idx_ptr, sinks_ptr, out_ptr,
                           H, R, W, K, N_C, ratio, sqrt_d, D: tl.constexpr, HAS_COMP: tl.constexpr,
                           HAS_IDX: tl.constexpr, DOT_DTYPE: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    g = tl.program_id(0)
    t = tl.program_id(1)
    heads = g * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    dd = tl.arange(0, D)
    nn = tl.arange(0, BLOCK_N)
    p = tl.load(pos_ptr + t)
    q_off = (t.to(tl.int64) * H + heads)[:, None] * D + dd[None, :]
    qt = tl.load(q_ptr + q_off, mask=h_ok[:, None], other=0.0).to(DOT_DTYPE)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)

    # Ring rows hold positions < positions[0]: none is visible once p - W >= positions[0] - 1.
    if p - W < tl.load(pos_ptr) - 1:
        for j0 in range(0, R, BLOCK_N):
            j = j0 + nn
            rp = tl.load(ring_pos_ptr + j, mask=j < R, other=-1)
            ok = (rp >= 0) & (rp > p - W) & (rp <= p)
            acc, m_i, l_i = _online_step(acc, m_i, l_i, qt, _rows(ring_ptr, j, ok, dd, D, DOT_DTYPE), ok, sqrt_d,
                                         DOT_DTYPE)
    # The chunk band: positions strictly increase, so rows before t - W + 1 are out of the window.
    for j0 in range(tl.maximum(t - W + 1, 0), t + 1, BLOCK_N):
        j = j0 + nn
        pj = tl.load(pos_ptr + j, mask=j <= t, other=-1)
        ok = (j <= t) & (pj > p - W) & (pj <= p)
        acc, m_i, l_i = _online_step(acc, m_i, l_i, qt, _rows(kv_ptr, j, ok, dd, D, DOT_DTYPE), ok, sqrt_d,
                                     DOT_DTYPE)
    if HAS_COMP:
        n_vis = tl.minimum((p + 1) // ratio, N_C)
        if HAS_IDX:
            for c0 in range(0, K, BLOCK_N):
                c = c0 + nn
                row = tl.load(idx_ptr + t.to(tl.int64) * K + c, mask=c < K, other=-1).to(tl.int64)
                ok = (c < K) & (row >= 0) & (row < n_vis)
                acc, m_i, l_i = _online_step(acc, m_i, l_i, qt, _rows(comp_ptr, row, ok, dd, D, DOT_DTYPE), ok,
                                             sqrt_d, DOT_DTYPE)
        else:
            for c0 in range(0, n_vis, BLOCK_N):
                c = c0 + nn
                ok = c < n_vis
                acc, m_i, l_i = _online_step(acc, m_i, l_i, qt, _rows(comp_ptr, c, ok, dd, D, DOT_DTYPE), ok,
                                             sqrt_d, DOT_DTYPE)

    # The sink joins the max and the denominator only. The query's own row is always visible,
    # so m_i is finite.
    sink = tl.load(sinks_ptr + heads, mask=h_ok, other=0.0)
    mx = tl.maximum(m_i, sink)
    scale = tl.exp(m_i - mx)
    den = l_i * scale + tl.exp(sink - mx)
    o = acc * tl.div_rn(scale, den)[:, None]
    tl.store(out_ptr + q_off, o, mask=h_ok[:, None])


_DOT_DTYPES = {torch.float16: tl.float16, torch.float32: tl.float32}


def attend_prefill(q, kv, ring, ring_pos, positions, comp, comp_idx, ratio, sinks, window: int,
                   dtype: torch.dtype = torch.float32, out=None, block_h: int = BLOCK_H,
                   block_n: int = BLOCK_N) -> torch.Tensor:
    t, n_heads, d = q.shape
    r = ring.shape[0]
    assert d & (d - 1) == 0, "head dim: a power of two (one [BLOCK_H, D] tile)"
    assert kv.shape == (t, d) and ring.shape == (r, d) and sinks.shape == (n_heads,)
    assert ring_pos.shape == (r,) and positions.shape == (t,)
    assert ring_pos.dtype == torch.int64 and positions.dtype == torch.int64
    has_comp = comp is not None
    has_idx = has_comp and comp_idx is not None
    if has_comp:
        assert comp.shape[1] == d and ratio > 0
    if has_idx:
        assert comp_idx.dim() == 2 and comp_idx.shape[0] == t and not comp_idx.dtype.is_floating_point
    if out is None:
        out = torch.empty(t, n_heads, d, dtype=torch.float32, device=q.device)
    assert out.shape == (t, n_heads, d) and out.dtype == torch.float32 and out.is_contiguous()
    # Keys are read by many programs: cast once (no-op for float32).
    kv, ring = kv.to(dtype).contiguous(), ring.to(dtype).contiguous()
    comp = comp.to(dtype).contiguous() if has_comp else ring
    comp_idx = comp_idx.contiguous() if has_idx else ring_pos
    k = comp_idx.shape[1] if has_idx else 0
    block_h = min(block_h, max(16, triton.next_power_of_2(n_heads)))
    _prefill_sparse_kernel[(triton.cdiv(n_heads, block_h), t)](
        q.contiguous(), kv, ring, ring_pos.contiguous(), positions.contiguous(), comp, comp_idx,
        sinks.float().contiguous(), out, n_heads, r, window, k, comp.shape[0], max(ratio, 1), math.sqrt(d),
        D=d, HAS_COMP=has_comp, HAS_IDX=has_idx, DOT_DTYPE=_DOT_DTYPES[dtype], BLOCK_H=block_h, BLOCK_N=block_n,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
