"""The indexer kernels of kernels/rounding.py (Triton; the CPU interpreter without a GPU) vs
the reference rounding (numerics.fp4_sim, hadamard, half_round) and the forward's torch scoring."""

import pytest
import torch

from dwarfstar.kernels import rounding
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


def check_index_scores(n_h, cap, pos, dev, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_h, 128, generator=g)
    rows = torch.randn(cap, 128, generator=g)
    wts = torch.randn(n_h, generator=g)
    denom = (128 * n_h) ** 0.5
    n_vis = min(cap, (pos + 1) // 4)
    # Rows past the visible count are not written yet (NaN-poisoned here): still -inf.
    rows[n_vis:] = float("nan")
    got = index_scores(q.to(dev), wts.to(dev), rows.to(dev), torch.tensor([pos], device=dev), 4, denom).cpu()
    assert got.shape == (1, cap) and got.dtype == torch.float32
    q64, rows64 = q.double(), rows[:n_vis].double()
    want = torch.einsum("h,hc->c", wts.double() / denom, torch.relu(q64 @ rows64.T))
    visible = torch.arange(cap) < n_vis
    assert torch.equal(torch.isneginf(got[0]), ~visible)
    # fp32 order over 128 products and the head sum: relative to the score scale.
    if n_vis:
        err = (got[0, :n_vis].double() - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item()


# Blocks of 16 rows: caps off the block, a partly visible block, all / no rows visible.
@pytest.mark.parametrize("n_h,cap,pos", [(4, 10, 27), (64, 150, 401), (16, 70, 2), (16, 200, 600),
                                         (4, 1001, 45), (16, 37, 150), (64, 1000, 515)])
def test_index_scores_match_torch(n_h, cap, pos):
    check_index_scores(n_h, cap, pos, DEV, seed=cap)


@pytest.mark.gpu
@pytest.mark.parametrize("dot,heads", [("tf32x3", 64), ("ieee", 16)])
@pytest.mark.parametrize("cap,pos", [(32768, 2047), (32768, 131071), (32768, 0), (512, 2047), (8192, 20000)])
def test_index_scores_flash_shapes_gpu(cap, pos, dot, heads, monkeypatch):
    """Flash: 64 indexer heads of 128, the ratio-4 rows of a 2K / 32K / 131K allocation; the
    production dot (tf32x3, all heads in one) and the fp32-FMA one in head chunks."""
    monkeypatch.setattr(rounding, "INDEX_SCORE_DOT", dot)
    monkeypatch.setattr(rounding, "INDEX_SCORE_HEADS", heads)
    check_index_scores(64, cap, pos, "cuda", seed=pos)
