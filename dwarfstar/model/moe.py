"""Mixture-of-experts FFN sublayer body (model.md §2.6).

Dims: T tokens, D hidden, E routed experts, K experts per token, F expert width.

Contract: `moe(x, tokens, lw, config, dtype)` -> [T, D] for normalised inputs x [T, D].
- scores s = sqrt(softplus(router logits)); selection: `tid2eid[token]` on hash layers,
  else the K largest s + bias (bias for selection only; ties -> lower expert id);
- weights = s of the selected experts, normalised over the K (if the config says so),
  times route_scale, applied to the SwiGLU output BEFORE the down projection;
- SwiGLU clamp: gate <= limit, up in [-limit, limit], only when limit > 0; the shared
  expert gets the same clamp and no routing weight.
Experts are fetched one at a time through `lw.expert`, so only selected experts are
ever dequantised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dwarfstar.model.weights import LayerWeights
from dwarfstar.shape import ModelConfig

# ds4 clamps the routing-weight sum from below (scores are > 0, so this only guards 0/0).
ROUTE_SUM_FLOOR = 2.0 ** -14


def stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim; among equal values the lower index wins."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def route(x: torch.Tensor, tokens: torch.Tensor, lw: LayerWeights, config: ModelConfig,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (expert ids [T, K], weights [T, K])."""
    scores = torch.sqrt(F.softplus(x @ lw.get("gate", dtype).T))             # [T, E]
    if lw.is_hash:
        sel = lw.ints("tid2eid")[tokens]
    else:
        bias = lw.get("gate_bias", dtype) if lw.has("gate_bias") else torch.zeros_like(scores[0])
        sel = stable_topk(scores + bias, config.n_activated_experts)
    w = scores.gather(1, sel)
    if config.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True).clamp_min(ROUTE_SUM_FLOOR)
    return sel, w * config.route_scale


def swiglu(g: torch.Tensor, v: torch.Tensor, limit: float) -> torch.Tensor:
    if limit > 0:
        g = g.clamp(max=limit)
        v = v.clamp(-limit, limit)
    return F.silu(g) * v


def moe(x: torch.Tensor, tokens: torch.Tensor, lw: LayerWeights, config: ModelConfig,
        dtype: torch.dtype) -> torch.Tensor:
    sel, w = route(x, tokens, lw, config, dtype)
    out = torch.zeros_like(x)
    for e in torch.unique(sel).tolist():
        rows, slot = torch.nonzero(sel == e, as_tuple=True)
        h = x[rows]
        mid = swiglu(h @ lw.expert("w1", e, dtype).T, h @ lw.expert("w3", e, dtype).T, lw.swiglu_limit)
        mid = w[rows, slot, None] * mid
        out.index_add_(0, rows, mid @ lw.expert("w2", e, dtype).T)
    shared = swiglu(x @ lw.get("shared_w1", dtype).T, x @ lw.get("shared_w3", dtype).T, lw.swiglu_limit)
    return out + shared @ lw.get("shared_w2", dtype).T
