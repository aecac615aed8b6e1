"""Top-k as a set, by radix select in one launch: the indexer's decode top-k (kernels.md §4, item 5).

Dims: R rows, N values per row, K selected (K <= N).

Contract (graph-safe: one launch, grid (R,), no host sync, no data-dependent shape):
- `select_topk(values, k) -> idx int64 [R, k]`: values float32 [R, N] (no NaN; -inf allowed),
  the indices of the k largest per row, equal values -> the lower index first: exactly the
  set `rounding.stable_topk` returns (-0.0 and +0.0 are one value there and here), listed in
  ascending index order rather than by value. The indexer's consumer (forward.py
  `compressed_keys`: gather rows and their visibility by these indices, then one softmax
  over the keys) does not depend on the order.
The twin `select_topk_ref` is stable_topk sorted by index; the kernel equals it exactly.

How: each float maps to an order-preserving int32 key (the sign-magnitude bits, negatives
with the magnitude bits flipped). The k-th largest key t is the largest value with
count(key >= t) >= k, built one bit at a time from the top (32 counting passes over the row
held in registers); when at most k + SHORT_EXCESS keys lie above -inf's (short contexts, and
the first rows past k), one reduction or a few find it instead. Then every key > t is taken,
plus the lowest-index keys == t up to k; one scan over packed counts (greater << 16 | equal) gives each taken index its output
slot. Rows longer than MAX_N (the row must fit one program's registers) go through the
twin, whose result is the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.kernels.rounding import stable_topk

# Longest row held in one program's registers (16 warps x 64 keys); also keeps the packed
# scan below (counts < 2**15 in the high half) free of overflow.
MAX_N = 32768
# Finite keys beyond k up to which the threshold is found by stepping over the least distinct
# values (two reductions each) instead of the 32-pass bit search; -1: no short paths (A/B).
SHORT_EXCESS = 16
# Chunk of the emit pass (re-read from cache; holding the whole row through the scan spills).
EMIT_BLOCK = 2048


def select_topk_ref(values: torch.Tensor, k: int) -> torch.Tensor:
    return stable_topk(values, k).sort(dim=-1).values


@triton.jit
def _order_key(v):
    """float32 -> int32 with the same order; -0.0 and +0.0 -> 0 (a bit test, not a float
    compare, so that a flush-to-zero compare cannot merge subnormals with zero)."""
    b = v.to(tl.int32, bitcast=True)
    key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return tl.where(b == -2147483648, 0, key)


@triton.jit
def _bit_search(key, K):
    """The largest int32 t with count(key >= t) >= K, one bit at a time from the top: the
    unsigned image u = t + 2**31 searched in int64."""
    u = tl.zeros([], dtype=tl.int64)
    bit = tl.full([], 1 << 31, tl.int64)
    for _ in range(32):
        cand = u + bit
        n_ge = tl.sum((key >= (cand - (1 << 31)).to(tl.int32)).to(tl.int32), axis=0)
        u = tl.where(n_ge >= K, cand, u)
        bit = bit >> 1
    return (u - (1 << 31)).to(tl.int32)


@triton.jit
def _select_topk_kernel(v_ptr, out_ptr, N, K, BLOCK: tl.constexpr, EMIT: tl.constexpr, SHORT: tl.constexpr,
                        PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    v_row = v_ptr + row * N
    offs = tl.arange(0, BLOCK)
    m = offs < N
    # Padding gets the lowest int32, below every real key (-inf maps above it), never taken.
    key = tl.where(m, _order_key(tl.load(v_row + offs, mask=m, other=0.0)), -2147483648)
    # t: a key with count(key > t) <= K <= count(key >= t), which the emit below needs. Few keys
    # above -inf (decode until the context holds more than K rows per index key: every row is
    # attended) fix it in a reduction or a few: n_fin <= K -> the -inf key (all n_fin taken, the
    # lowest-index -inf rows fill up); n_fin = K + e, e <= SHORT_EXCESS -> the key at ascending
    # position e among those above -inf, found by stepping over the distinct least values.
    # SHORT < 0: the bit search always.
    if SHORT < 0:
        t = _bit_search(key, K)
    else:
        neg = _order_key(tl.full([], float("-inf"), tl.float32))
        n_fin = tl.sum((key > neg).to(tl.int32), axis=0)
        if n_fin <= K:
            t = neg
        elif n_fin - K <= SHORT:
            t = neg
            skip = n_fin - K          # finite keys still below t's position
            while skip >= 0:
                t = tl.min(tl.where(key > t, key, 2147483647), axis=0)
                skip -= tl.sum((key == t).to(tl.int32), axis=0)
        else:
            t = _bit_search(key, K)
    need = K - tl.sum((key > t).to(tl.int32), axis=0)
    # Emit in chunks: before = taken-so-far counts, greater in the high 16 bits, equal in the low.
    base = tl.zeros([], dtype=tl.int32)
    for start in range(0, N, EMIT):
        o = start + tl.arange(0, EMIT)
        om = o < N
        ko = _order_key(tl.load(v_row + o, mask=om, other=0.0))
        gt = (ko > t) & om
        eq = (ko == t) & om
        packed = gt.to(tl.int32) * 65536 + eq.to(tl.int32)
        before = base + tl.cumsum(packed, axis=0) - packed
        eq_before = before & 65535
        take = gt | (eq & (eq_before < need))
        slot = (before >> 16) + tl.minimum(eq_before, need)
        tl.store(out_ptr + row * K + slot, o.to(tl.int64), mask=take)
        base += tl.sum(packed, axis=0)


def select_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [R, k]: the stable top-k set of each row of float32 [R, N], ascending index order."""
    assert values.dtype == torch.float32 and values.dim() == 2 and values.is_contiguous()
    n_rows, n = values.shape
    assert 0 < k <= n
    if n > MAX_N:
        return select_topk_ref(values, k)
    out = torch.empty(n_rows, k, dtype=torch.int64, device=values.device)
    block = max(16, triton.next_power_of_2(n))
    grid = (n_rows,)
    _select_topk_kernel[grid](values, out, n, k, BLOCK=block, EMIT=min(block, EMIT_BLOCK), SHORT=SHORT_EXCESS,
                              **pdl.launch(grid), num_warps=min(16, max(4, block // 1024)))
    return out
