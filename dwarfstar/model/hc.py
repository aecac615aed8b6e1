"""Manifold-constrained hyper-connections (mHC) and the output-head collapse (model.md §2.2).

Dims: T tokens, n streams (hc_mult), D hidden size.

Contract:
- `hc_pre(X, fn, scale, base, config)` -> (u [T, D], post [T, n], M [T, n, n]).
- `hc_post(f, X, post, M)` -> X' = post ⊗ f + Mᵀ X, the sum running over M's FIRST
  index (M is doubly stochastic but not symmetric; M instead of Mᵀ is a silent bug).
- `hc_head(X, fn, scale, base, config)` -> y [T, D]: sigmoid weights only, no Sinkhorn.
The HC input norm is unweighted over all n·D values with the model's RMS epsilon.
"""

from __future__ import annotations

import torch

from dwarfstar.model.numerics import rms_norm
from dwarfstar.shape import ModelConfig


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax + ε, then alternate column/row normalisation; starts and ends on columns."""
    m = torch.softmax(logits, -1) + eps                              # [T, n, n]
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, n, _ = x.shape
    mix = rms_norm(x.reshape(t, -1), None, config.norm_eps) @ fn.T    # [T, (2+n)n]
    pre = torch.sigmoid(scale[0] * mix[:, :n] + base[:n]) + config.hc_eps
    post = 2 * torch.sigmoid(scale[1] * mix[:, n:2 * n] + base[n:2 * n])
    comb = (scale[2] * mix[:, 2 * n:] + base[2 * n:]).view(t, n, n)
    m = sinkhorn(comb, config.hc_sinkhorn_iters, config.hc_eps)
    u = (pre[:, :, None] * x).sum(1)                                  # [T, D]
    return u, post, m


def hc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # X'[j] = post[j] f + sum_i M[i][j] X[i]
    return post[:, :, None] * f[:, None, :] + torch.einsum("tij,tid->tjd", m, x)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            config: ModelConfig) -> torch.Tensor:
    t = x.shape[0]
    mix = rms_norm(x.reshape(t, -1), None, config.norm_eps) @ fn.T    # [T, n]
    w = torch.sigmoid(scale[0] * mix + base) + config.hc_eps
    return (w[:, :, None] * x).sum(1)
