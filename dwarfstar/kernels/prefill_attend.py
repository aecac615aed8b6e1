"""Attention of a prefill chunk in query blocks: bounded memory, and each block reads only the
raw rows its sliding window can reach.

Dims: T chunk queries, H heads, Dh head dim, W window, R ring rows (W), N_c compressed rows,
TQ queries per block.

Contract:
- `attend_chunk(q [T, H, Dh], kv [T, Dh], ring [R, Dh], ring_pos [R], positions [T],
  comp [N_c, Dh] | None, comp_mask bool [T, N_c] | None, sinks [H], window, dtype)` -> [T, H, Dh]
  fp32: model/attention.py `_attend` over keys = ring + chunk rows (+ compressed rows) with the
  window mask (key position in (p - W, p], >= 0) and comp_mask — the same function, since a
  query block only drops raw rows its mask hides (exp(-inf) = 0 in the softmax).
- `comp_k` (ratio-4 layers: the indexer's top-k): comp_mask has at most comp_k true entries per
  row; each query then attends to its own <= comp_k gathered rows (`_attend_split`), not all N_c.
- Block size: the [H, TQ, N] logits (about four live copies in the softmax) stay under
  `max_bytes`; at most MAX_BLOCK queries, so a block reads W + TQ + W raw rows, not W + T.
- `dtype` float16 (CUDA): both products on tensor cores with fp16 inputs and fp32 results
  (q is RMS-normed, |q_i| <= sqrt(Dh); keys are normed rows, already f16-rounded under the
  official numerics; probabilities are in [0, 1]); float32 is `_attend` itself.
"""

from __future__ import annotations

import math

import torch

from dwarfstar.kernels.prefill_moe import GEMM_DTYPE, matmul_f32
from dwarfstar.model.attention import _attend

# Logits budget of one query block (bytes, all live copies) and the largest block.
MAX_BYTES = 2 << 30
MAX_BLOCK = 256


def attend_dtype(device: torch.device) -> torch.dtype:
    """GEMM_DTYPE on CUDA, float32 elsewhere (the CPU tests compare prefill with decode tightly)."""
    return GEMM_DTYPE if torch.device(device).type == "cuda" else torch.float32


def _attend_lowp(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """`_attend` with the two products' inputs rounded to dtype (fp32 results)."""
    t, n_heads, d = q.shape
    n = keys.shape[0]
    k16 = keys.to(dtype)
    logits = matmul_f32(q.transpose(0, 1).reshape(n_heads * t, d), k16, dtype).view(n_heads, t, n)
    logits = (logits / math.sqrt(d)).masked_fill(~mask[None], float("-inf"))
    sink = sinks.view(n_heads, 1, 1).expand(n_heads, t, 1)
    probs = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
    o = matmul_f32(probs.reshape(n_heads * t, n), k16.T, dtype)               # [H*T, Dh]
    return o.view(n_heads, t, d).transpose(0, 1)                               # [T, H, Dh]


def _attend_split(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, own: torch.Tensor,
                  own_mask: torch.Tensor, sinks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`_attend` over shared keys [N, Dh] (mask [T, N]) plus per-query keys own [T, k, Dh]
    (mask [T, k]) in one softmax; products with inputs rounded to dtype, fp32 results."""
    t, n_heads, d = q.shape
    n = keys.shape[0]
    kd, od = keys.to(dtype), own.to(dtype)
    shared = matmul_f32(q.transpose(0, 1).reshape(n_heads * t, d), kd, dtype).view(n_heads, t, n)
    per_query = matmul_f32(q, od, dtype).transpose(0, 1)                        # [H, T, k]
    logits = torch.cat([shared, per_query], -1) / math.sqrt(d)
    logits = logits.masked_fill(~torch.cat([mask, own_mask], 1)[None], float("-inf"))
    sink = sinks.view(n_heads, 1, 1).expand(n_heads, t, 1)
    probs = torch.softmax(torch.cat([logits, sink], -1), -1)                    # [H, T, N + k + 1]
    o = matmul_f32(probs[..., :n].reshape(n_heads * t, n), kd.T, dtype).view(n_heads, t, d).transpose(0, 1)
    return o + matmul_f32(probs[..., n:-1].transpose(0, 1), od.transpose(1, 2), dtype)   # [T, H, Dh]


def block_size(n_heads: int, window: int, n_comp: int, max_bytes: int = MAX_BYTES) -> int:
    """Queries per block: 4 copies of fp32 [H, TQ, 2W + TQ + N_c] within max_bytes."""
    tq = MAX_BLOCK
    while tq > 1 and 16 * n_heads * tq * (2 * window + tq + n_comp) > max_bytes:
        tq //= 2
    return tq


def attend_chunk(q, kv, ring, ring_pos, positions, comp, comp_mask, sinks, window: int,
                 dtype: torch.dtype = torch.float32, max_bytes: int = MAX_BYTES,
                 comp_k: int | None = None) -> torch.Tensor:
    t = q.shape[0]
    n_comp = 0 if comp is None else comp.shape[0]
    # Sparse compressed rows: every query sees at most comp_k of them (the indexer's top-k),
    # so gather those per query instead of scoring all N_c rows.
    sparse = comp is not None and comp_k is not None and comp_k < n_comp
    tq = block_size(q.shape[1], window, comp_k if sparse else n_comp, max_bytes)
    # Per-query rows are gathered from a copy already in the product dtype: the same values
    # _attend_split would round them to, at half the gathered bytes and without a cast pass.
    gather_from = comp.to(dtype) if sparse else None
    out = []
    for i0 in range(0, t, tq):
        i1 = min(t, i0 + tq)
        # Chunk rows before i0 - W + 1 are outside every window of this block.
        j0 = max(0, i0 - window + 1)
        pos = positions[i0:i1, None]
        key_pos = torch.cat([ring_pos, positions[j0:i1]])[None, :]
        mask = (key_pos <= pos) & (key_pos > pos - window) & (key_pos >= 0)   # [TQ, R + i1 - j0]
        keys = [ring, kv[j0:i1]]
        if sparse:
            # The (at most comp_k) visible chosen rows of each query first, stable.
            cm = comp_mask[i0:i1]
            idx = torch.sort(cm.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :comp_k]
            out.append(_attend_split(q[i0:i1], torch.cat(keys), mask, gather_from[idx], cm.gather(1, idx), sinks,
                                     dtype))
            continue
        if comp is not None:
            keys.append(comp)
            mask = torch.cat([mask, comp_mask[i0:i1]], 1)
        keys = torch.cat(keys)
        if dtype == torch.float32:
            out.append(_attend(q[i0:i1], keys, mask, sinks))
        else:
            out.append(_attend_lowp(q[i0:i1], keys, mask, sinks, dtype))
    return out[0] if len(out) == 1 else torch.cat(out)
