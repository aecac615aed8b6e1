"""Partial RoPE on the tail of each vector, adjacent pairs (model.md §1.3, §2.1).

Contract:
- `rope_frequencies(config, ratio)` -> float64 [d_r/2]: θ_main without scaling for
  ratio-0 (sliding-only) layers; θ_comp with the YaRN ramp and NO magnitude scale for
  compressed layers (everything in such a layer: q, kv, compressed rows, indexer).
- `apply_rope(x, positions, omega, inverse=False)`: x [T, ..., Dv], positions [T];
  rotates (x[a], x[a+1]) for a = Dv - d_r + 2j. `inverse` uses -φ (de-rotation of the
  attention output at the query position). Angles are formed in float64 so long
  contexts do not lose phase.
"""

from __future__ import annotations

import math

import torch

from dwarfstar.shape import ModelConfig


def _yarn_ramp(config: ModelConfig, n_pairs: int) -> torch.Tensor:
    d_r, base = config.rope_head_dim, config.compress_rope_theta

    def corr(n_rot: float) -> float:
        return d_r * math.log(config.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(config.beta_fast)), 0)
    high = min(math.ceil(corr(config.beta_slow)), d_r - 1)
    if high == low:
        high += 0.001
    j = torch.arange(n_pairs, dtype=torch.float64)
    return ((j - low) / (high - low)).clamp(0, 1)


def rope_frequencies(config: ModelConfig, ratio: int) -> torch.Tensor:
    n_pairs = config.rope_head_dim // 2
    exponent = torch.arange(0, config.rope_head_dim, 2, dtype=torch.float64) / config.rope_head_dim
    if ratio == 0:
        return config.rope_theta ** -exponent
    omega = config.compress_rope_theta ** -exponent
    if config.rope_factor <= 1.0:
        return omega
    ramp = _yarn_ramp(config, n_pairs)
    return omega * (1 - ramp) + (omega / config.rope_factor) * ramp


def apply_rope(x: torch.Tensor, positions: torch.Tensor, omega: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    n_pairs = omega.shape[0]
    phi = positions.to(torch.float64)[:, None] * omega.to(positions.device)[None, :]  # [T, d_r/2]
    if inverse:
        phi = -phi
    shape = (phi.shape[0],) + (1,) * (x.dim() - 2) + (n_pairs,)
    cos, sin = phi.cos().to(x.dtype).view(shape), phi.sin().to(x.dtype).view(shape)
    head, tail = x[..., : -2 * n_pairs], x[..., -2 * n_pairs:]
    pairs = tail.reshape(*tail.shape[:-1], n_pairs, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(tail.shape)
    return torch.cat([head, rotated], -1)
