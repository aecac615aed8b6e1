"""KV compressors and the lightning indexer (model.md §2.4, §2.5, §4.1).

Dims: T tokens in the chunk, D hidden, c row width (head_dim for attention rows,
index_head_dim for indexer rows), r ratio, n_c emitted rows, H_I indexer heads.

Contract:
- `compress(h, t0, frontier, store, p, config)` runs the streaming compressor over the
  chunk's tokens t0..t0+T-1 in order: each token writes its (kv, gate + ape[t mod r])
  into the frontier slot of its window; the token completing a window (t+1 ≡ 0 mod r)
  pools the window (per channel softmax over the candidates), and the pooled row is
  normed, RoPE'd at the window's FIRST position, rounded by `p.finish` and appended to
  `store`. For r = 4 the candidates are the previous window's first half (Ca) and the
  current window's second half (Cb); slots 0..3 then take over slots 4..7.
  The frontier after the chunk is exactly the state one-token decode would have: this
  is why prefill equals decode for any chunking.
- `index_select(qr, h, positions, rows, lw, config, omega, numerics, dtype)` -> bool
  mask [T, n_c]: the compressed rows each query attends to (visible rows, top-k by
  indexer score when more than index_topk are visible; ties -> lower index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from dwarfstar.engine.kv import Frontier, RowStore
from dwarfstar.model.moe import stable_topk
from dwarfstar.model.numerics import Numerics, indexer_rounding, rms_norm
from dwarfstar.model.rope import apply_rope
from dwarfstar.model.weights import LayerWeights
from dwarfstar.shape import OVERLAP_RATIO, ModelConfig


@dataclass(frozen=True)
class CompressorParams:
    wkv: torch.Tensor           # [coff*c, D]
    wgate: torch.Tensor         # [coff*c, D]
    ape: torch.Tensor           # [r, coff*c]
    norm: torch.Tensor          # [c]
    ratio: int
    omega: torch.Tensor         # RoPE frequencies of the layer
    finish: Callable[[torch.Tensor], torch.Tensor]   # QAT / cache rounding of finished rows


def visible_rows(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed rows visible to each query: floor((t+1)/r)."""
    return (positions + 1) // ratio


def compress(h: torch.Tensor, t0: int, frontier: Frontier, store: RowStore, p: CompressorParams,
             config: ModelConfig) -> None:
    r = p.ratio
    overlap = r == OVERLAP_RATIO
    c = p.norm.shape[0]
    positions = torch.arange(t0, t0 + h.shape[0])
    a = h @ p.wkv.T                                                   # [T, coff*c]
    z = h @ p.wgate.T + p.ape[positions % r]
    pooled, starts = [], []
    for i, t in enumerate(positions.tolist()):
        slot = t % r + (r if overlap else 0)
        frontier.kv[slot] = a[i]
        frontier.score[slot] = z[i]
        if (t + 1) % r:
            continue
        if overlap:
            kv = torch.cat([frontier.kv[:r, :c], frontier.kv[r:, c:]])         # [2r, c]
            score = torch.cat([frontier.score[:r, :c], frontier.score[r:, c:]])
            frontier.kv[:r] = frontier.kv[r:]
            frontier.score[:r] = frontier.score[r:]
        else:
            kv, score = frontier.kv, frontier.score
        pooled.append((torch.softmax(score, 0) * kv).sum(0))
        starts.append(t + 1 - r)
    if not pooled:
        return
    rows = rms_norm(torch.stack(pooled), p.norm, config.norm_eps)     # [n_new, c]
    rows = apply_rope(rows, torch.tensor(starts), p.omega)
    store.append(p.finish(rows))


def index_select(qr: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                 lw: LayerWeights, config: ModelConfig, omega: torch.Tensor, numerics: Numerics,
                 dtype: torch.dtype) -> torch.Tensor:
    n_c = rows.shape[0]
    visible = torch.arange(n_c)[None, :] < visible_rows(positions, OVERLAP_RATIO)[:, None]   # [T, n_c]
    k = config.index_topk
    if n_c <= k:
        # ds4 skips scoring when every visible row fits: same set as a top-k.
        return visible
    d_i, n_h = config.index_head_dim, config.index_n_heads
    q = (qr @ lw.get("indexer_wq_b", dtype).T).view(-1, n_h, d_i)     # [T, H_I, d_I]
    q = indexer_rounding(apply_rope(q, positions, omega), numerics, is_cached=False)
    w = (h @ lw.get("indexer_weights_proj", dtype).T) / math.sqrt(d_i * n_h)   # [T, H_I]
    score = torch.einsum("th,thc->tc", w, torch.relu(torch.einsum("thd,cd->thc", q, rows)))
    score = score.masked_fill(~visible, float("-inf"))
    top = stable_topk(score, k)                                       # [T, k]
    chosen = torch.zeros_like(visible).scatter_(1, top, True)
    return chosen & visible
