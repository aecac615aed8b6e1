"""Token sampling: logits -> token, seeded and reproducible (server.md §6, ds4 `sample_top_p_min_p`).

Dims: V vocab.

Contract:
- `SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0.05, seed=0)`; `clamped()`
  applies ds4's rules (top_p <= 0 or > 1 -> 1, min_p < 0 -> 0, top_k > 1024 -> 1024).
- `Rng(seed)` is ds4's xorshift64* stream; seed 0 draws a fresh seed from the OS. The
  same seed and the same logits give the same tokens on every machine.
- `candidates(logits, params)` -> (token ids, weights): the tokens that may be drawn,
  in the order the draw walks them, with unnormalised weights exp((l - l_max)/T).
- `sample(logits, params, rng, n_top=0)` -> Sample(token, logprob, top): temperature
  <= 0 is greedy (lowest id among equal maxima); otherwise one uniform u from `rng` (an
  `Rng`, or a seeded `torch.Generator` for callers that keep one; None = fresh OS seed)
  picks the first candidate whose cumulative weight reaches u·Σw. `logprob` and `top`
  (the n_top most likely tokens, lower id first among ties) are log-probabilities of
  the model's own distribution, log_softmax(logits), independent of the knobs.
- Everything runs on the logits' device (a CUDA session's logits need not be copied to the
  host: a few scalar reads per token, none per candidate).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

MAX_TOP_K = 1024
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.05
    seed: int = 0

    def clamped(self) -> "SamplingParams":
        top_p = 1.0 if (self.top_p <= 0 or self.top_p > 1) else self.top_p
        return replace(self, top_p=top_p, min_p=max(self.min_p, 0.0), top_k=min(max(self.top_k, 0), MAX_TOP_K))


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float
    top: list[tuple[int, float]]


class Rng:
    """xorshift64* (server.md §6.1); `uniform()` has 24 random bits like ds4."""

    def __init__(self, seed: int = 0):
        if seed <= 0:
            seed = int.from_bytes(os.urandom(8), "little")
        self.state = seed & _MASK64 or 0x9E3779B97F4A7C15

    def next_u64(self) -> int:
        x = self.state
        x ^= x >> 12
        x ^= (x << 25) & _MASK64
        x ^= x >> 27
        self.state = x
        return (x * 0x2545F4914F6CDD1D) & _MASK64

    def uniform(self) -> float:
        return ((self.next_u64() >> 40) & 0xFFFFFF) / 16777216.0


def _sorted_desc(values: torch.Tensor) -> torch.Tensor:
    """Indices by descending value, lower index first among equal values."""
    return torch.sort(values, descending=True, stable=True).indices


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    p = params.clamped()
    logits = logits.to(torch.float64)
    ids = torch.nonzero(torch.isfinite(logits)).flatten()
    if p.top_k > 0:
        ids = ids[_sorted_desc(logits[ids])[: p.top_k]]
    w = torch.exp((logits[ids] - logits[ids].max()) / p.temperature)
    if p.top_k == 0 and p.top_p >= 1:
        # Plain min-p: walk ids ascending, dropping weights below min_p (w_max = 1).
        keep = w >= p.min_p
        return ids[keep], w[keep]
    order = _sorted_desc(logits[ids]) if p.top_k == 0 else torch.arange(ids.shape[0])
    ids, w = ids[order], w[order]
    prob = w / w.sum()
    # ds4 walks the sorted candidates and keeps candidate n while the mass before it is
    # < top_p and prob[n] >= min_p * prob[0]. Both tests are monotone along the sorted list
    # (the running sum only grows, prob only falls), so the kept prefix is 1 + the number of
    # leading passes: computed on the logits' device without one host sync per candidate.
    before = torch.cumsum(prob, 0)[:-1]                       # mass of 0..n-1, for n >= 1
    ok = (before < p.top_p) & (prob[1:] >= prob[0] * p.min_p)
    n = 1 + int(torch.cumprod(ok.to(torch.int32), 0).sum())
    return ids[:n], w[:n]


def _draw(ids: torch.Tensor, w: torch.Tensor, u: float) -> int:
    r = u * w.sum().item()
    hit = torch.nonzero(torch.cumsum(w, 0) >= r).flatten()
    return int(ids[hit[0]] if hit.numel() else ids[torch.argmax(w)])


def _uniform(rng: Rng | torch.Generator | None) -> float:
    if isinstance(rng, torch.Generator):
        return float(torch.rand((), generator=rng, dtype=torch.float64))
    return (rng or Rng(0)).uniform()


def sample(logits: torch.Tensor, params: SamplingParams, rng: Rng | torch.Generator | None = None,
           n_top: int = 0) -> Sample:
    logits = logits.to(torch.float64)
    logp = torch.log_softmax(logits, -1)
    if params.temperature <= 0:
        token = int(torch.argmax(logits))         # first maximal index
    else:
        ids, w = candidates(logits, params)
        token = _draw(ids, w, _uniform(rng))
    top_ids = _sorted_desc(logp)[:n_top].tolist()
    return Sample(token, float(logp[token]), [(i, float(logp[i])) for i in top_ids])
