"""Sampler: greedy, seeded reproducibility, and each filter against a direct computation.

The oracle for the filters is a plain-Python restatement of server.md §6.1 (softmax
probabilities, sorted order, cut rules); the inverse-CDF draw is checked with chosen
uniforms, and the empirical frequencies of 4000 seeded draws against the candidate
probabilities (tolerance 0.03 absolute: ~4 standard deviations of a Bernoulli(0.5)
frequency over 4000 draws).
"""

from __future__ import annotations

import math

import pytest
import torch

from dwarfstar.engine.sampling import Rng, SamplingParams, _draw, candidates, sample

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 3.0, 0.2, float("-inf"), 2.9])


def probs(logits, temperature):
    finite = [(i, v) for i, v in enumerate(logits.tolist()) if math.isfinite(v)]
    m = max(v for _, v in finite)
    w = {i: math.exp((v - m) / temperature) for i, v in finite}
    return w, {i: x / sum(w.values()) for i, x in w.items()}


def test_greedy_is_first_argmax():
    s = sample(LOGITS, SamplingParams(temperature=0), Rng(1), n_top=3)
    assert s.token == 1                                  # ids 1 and 4 tie; lower id wins
    lp = torch.log_softmax(LOGITS.double(), -1)
    assert s.logprob == pytest.approx(lp[1].item(), abs=1e-12)
    assert [i for i, _ in s.top] == [1, 4, 7]


def test_min_p_only_walks_ascending_ids():
    ids, w = candidates(LOGITS, SamplingParams(temperature=0.7, min_p=0.3))
    weights, _ = probs(LOGITS, 0.7)
    expected = [i for i in sorted(weights) if weights[i] >= 0.3]
    assert ids.tolist() == expected
    assert torch.allclose(w, torch.tensor([weights[i] for i in expected], dtype=torch.float64))


def test_top_p_and_min_p_cut_in_sorted_order():
    params = SamplingParams(temperature=1.0, top_p=0.6, min_p=0.0)
    _, p = probs(LOGITS, 1.0)
    order = sorted(p, key=lambda i: (-p[i], i))
    kept, cum = [order[0]], p[order[0]]
    for i in order[1:]:
        if cum >= 0.6:
            break
        kept.append(i)
        cum += p[i]
    assert candidates(LOGITS, params)[0].tolist() == kept
    # min_p relative to the best token stops the walk earlier.
    strict = candidates(LOGITS, SamplingParams(temperature=1.0, top_p=0.99, min_p=0.95))[0].tolist()
    assert strict == [i for i in order if p[i] >= 0.95 * p[order[0]]]


def test_top_k_keeps_lower_ids_on_ties():
    ids, _ = candidates(LOGITS, SamplingParams(temperature=1.0, top_k=3, min_p=0.0))
    assert ids.tolist() == [1, 4, 7]
    ids, _ = candidates(LOGITS, SamplingParams(temperature=1.0, top_k=1, min_p=0.0))
    assert ids.tolist() == [1]


def test_draw_is_inverse_cdf():
    ids, w = torch.tensor([5, 2, 9]), torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    assert [_draw(ids, w, u) for u in (0.0, 0.24, 0.26, 0.74, 0.76, 0.999)] == [5, 5, 2, 2, 9, 9]


def test_seeded_reproducible_and_distributed():
    params = SamplingParams(temperature=0.8, top_p=0.9, min_p=0.01, seed=42)
    draws = lambda seed: [sample(LOGITS, params, rng).token for rng in [Rng(seed)] for _ in range(4000)]
    a, b = draws(42), draws(42)
    assert a == b
    assert a != draws(43)
    ids, w = candidates(LOGITS, params)
    for i, pi in zip(ids.tolist(), (w / w.sum()).tolist()):
        assert abs(a.count(i) / len(a) - pi) < 0.03
    assert set(a) <= set(ids.tolist())


def test_rng_matches_xorshift64_star_definition():
    rng = Rng(1)
    x = 1
    x ^= x >> 12
    x ^= (x << 25) % 2**64
    x ^= x >> 27
    assert rng.next_u64() == (x * 0x2545F4914F6CDD1D) % 2**64
    assert all(0 <= Rng(7).uniform() < 1 for _ in range(10))


def test_clamping():
    p = SamplingParams(top_p=0, min_p=-1, top_k=5000).clamped()
    assert (p.top_p, p.min_p, p.top_k) == (1.0, 0.0, 1024)


def test_torch_generator_is_accepted_and_reproducible():
    params = SamplingParams(temperature=1.0, min_p=0.0)
    run = lambda: [sample(LOGITS, params, g).token for g in [torch.Generator().manual_seed(5)] for _ in range(50)]
    assert run() == run()


def _walk_cut(logits, params):
    """ds4's candidate walk written as the sequential loop (the twin of the vectorised cut)."""
    p = params.clamped()
    lg = logits.double()
    ids = torch.nonzero(torch.isfinite(lg)).flatten()
    if p.top_k > 0:
        ids = ids[torch.sort(lg[ids], descending=True, stable=True).indices[: p.top_k]]
    else:
        ids = ids[torch.sort(lg[ids], descending=True, stable=True).indices]
    w = torch.exp((lg[ids] - lg[ids].max()) / p.temperature)
    prob = (w / w.sum()).tolist()
    n, cum = 1, prob[0]
    while n < len(prob) and cum < p.top_p and prob[n] >= prob[0] * p.min_p:
        cum += prob[n]
        n += 1
    return ids[:n].tolist()


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_top_p_cut_equals_the_sequential_walk(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3000, generator=gen) * (0.5 + seed)
    logits[torch.randint(0, 3000, (50,), generator=gen)] = float("-inf")
    for top_k, top_p, min_p in ((0, 0.9, 0.0), (0, 0.5, 0.01), (40, 0.95, 0.05), (0, 0.999, 0.2), (7, 1.0, 0.0)):
        params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, min_p=min_p)
        got = candidates(logits, params)[0].tolist()
        assert got == _walk_cut(logits, params), (top_k, top_p, min_p)
