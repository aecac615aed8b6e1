"""The indexer kernels of kernels/rounding.py (Triton; the CPU interpreter without a GPU) vs
the reference rounding (numerics.fp4_sim, hadamard, half_round) and the forward's torch scoring."""

import pytest
import torch

from dwarfstar.kernels.rounding import index_round, index_scores
from dwarfstar.model.numerics import _hadamard_matrix, fp4_sim, half_round, hadamard

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_index_round_fp4_grid_exact():
    """With a permutation for h the product is exact: the E2M1 rounding itself must be bit-equal,
    midpoints (ties to even) included."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 128, generator=g) * torch.rand(40, 1, generator=g) * 10
    mids = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 1.0, 3.0, 4.0, 2.0, 1.5, 0.1] * 2)
    x[0, :32], x[1, :32] = mids, -mids                    # block amax 6: scale 1
    perm = torch.eye(128)[torch.randperm(128, generator=g)]
    got = index_round(x.to(DEV), perm.to(DEV), True, True).cpu()
    assert torch.equal(got, half_round(fp4_sim(x @ perm)))
    assert torch.equal(index_round(x.to(DEV), perm.to(DEV), False, True).cpu(), half_round(x))


@pytest.mark.parametrize("shape", [(1, 128), (3, 64, 128)])
def test_index_round_hadamard_matches_reference(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    got = index_round(x.to(DEV), _hadamard_matrix(128).float().to(DEV), True, False).cpu()
    want = fp4_sim(hadamard(x))
    # fp32 order of the 128-term product can cross an E2M1 midpoint: one step (<= 1/3 of the
    # value, scale-relative 2/6) on a rare element; measured 0 of 24704 here.
    diff = (got - want).abs()
    assert (diff > 0).float().mean().item() <= 1e-3
    assert diff.max().item() <= want.abs().max().item() / 3


@pytest.mark.parametrize("n_h,cap,pos", [(4, 10, 27), (64, 150, 401), (16, 70, 2)])
def test_index_scores_match_torch(n_h, cap, pos):
    g = torch.Generator().manual_seed(cap)
    q = torch.randn(n_h, 128, generator=g)
    rows = torch.randn(cap, 128, generator=g)
    wts = torch.randn(n_h, generator=g)
    denom = (128 * n_h) ** 0.5
    got = index_scores(q.to(DEV), wts.to(DEV), rows.to(DEV), torch.tensor([pos], device=DEV), 4, denom).cpu()
    want = torch.einsum("h,hc->c", wts / denom, torch.relu(q @ rows.T))[None]
    visible = torch.arange(cap)[None] < (pos + 1) // 4
    want = want.masked_fill(~visible, float("-inf"))
    assert torch.equal(torch.isinf(got), ~visible)
    # fp32 order over 128 products and the head sum: relative to the score scale.
    if visible.any():
        assert (got[visible] - want[visible]).abs().max().item() <= 1e-5 * want[visible].abs().max().item()
