"""QAT rounding simulations (model.md §5.2) against brute-force nearest-value oracles."""

from __future__ import annotations

import itertools

import torch

from dwarfstar.model.numerics import fp4_sim, fp8_sim, hadamard, rms_norm


def e4m3_values() -> torch.Tensor:
    """Every finite non-negative E4M3FN value, built from the bit layout (bias 7)."""
    vals = []
    for e, m in itertools.product(range(16), range(8)):
        if e == 15 and m == 7:
            continue                                     # NaN code
        vals.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(sorted(vals), dtype=torch.float64)


def nearest_even(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest grid magnitude, ties to the even grid index (= even mantissa/code)."""
    a = x.abs().unsqueeze(-1)
    d = (a - grid).abs()
    best = d.min(-1, keepdim=True).values
    ties = d == best
    idx = torch.arange(grid.shape[0])
    # Prefer an even index among the tied candidates.
    score = torch.where(ties, (idx % 2 == 0).double() * 2 + 1 - idx / 1e6, torch.tensor(-1.0, dtype=torch.float64))
    return torch.sign(x) * grid[score.argmax(-1)]


def block_oracle(x, block, qmax, floor, grid):
    b = x.reshape(-1, block)
    amax = b.abs().amax(-1, keepdim=True).clamp_min(floor)
    s = torch.tensor([2.0 ** float(torch.ceil(torch.log2(v / qmax))) for v in amax.flatten()],
                     dtype=torch.float64).view(-1, 1)
    return (nearest_even((b / s).clamp(-qmax, qmax), grid) * s).reshape(x.shape)


def test_fp8_matches_enumerated_e4m3():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 128, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 6, dtype=torch.float64)[:, None]
    x[0, :64] = 0                                        # all-zero block: amax floor
    want = block_oracle(x, 64, 448.0, 1e-4, e4m3_values())
    assert torch.equal(fp8_sim(x), want)


def test_fp4_matches_enumerated_e2m1_with_ties():
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, generator=g, dtype=torch.float64)
    # Exact midpoints after scaling by 1 (block amax 6 -> scale 1): ties go to the even code.
    x[0, :32] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4, dtype=torch.float64)
    got = fp4_sim(x)
    assert torch.equal(got, block_oracle(x, 32, 6.0, 7.052966104933725e-38, grid))
    assert got[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_hadamard_is_orthonormal_sylvester():
    x = torch.eye(4, dtype=torch.float64)
    want = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64) / 2
    assert torch.allclose(hadamard(x), want, atol=0, rtol=0)
    v = torch.randn(3, 128, dtype=torch.float64)
    assert torch.allclose(hadamard(hadamard(v)), v, atol=1e-12)


def test_rms_norm():
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    assert torch.allclose(rms_norm(x, torch.tensor([1.0, 2.0], dtype=torch.float64), 0.0),
                          torch.tensor([[3, 8]], dtype=torch.float64) / 12.5 ** 0.5)
