"""`hc_split` (Triton; the CPU interpreter without a GPU) vs its twin `hc_split_ref`."""

import pytest
import torch

from dwarfstar.kernels.hc import hc_split, hc_split_ref


@pytest.mark.parametrize("t", [1, 7])
def test_hc_split_matches_twin(t):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(t)
    n = 4
    mix = torch.randn(t, (2 + n) * n, generator=g, device=dev)
    scale = torch.rand(3, generator=g, device=dev) * 0.4 + 0.1
    base = torch.randn((2 + n) * n, generator=g, device=dev) * 0.1
    got = hc_split(mix, scale, base, n, 20, 1e-6)
    want = hc_split_ref(mix.double(), scale.double(), base.double(), n, 20, 1e-6)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        # fp32 exp/divide vs float64: ~1e-6 relative after 20 Sinkhorn rounds.
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize("t,d", [(1, 1024), (3, 700)])
def test_hc_post_and_weighted_sum_match_twins(t, d):
    from dwarfstar.kernels.hc import hc_post, hc_post_ref, hc_weighted_sum, hc_weighted_sum_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(d)
    n = 4
    f = torch.randn(t, d, generator=g, device=dev)
    x = torch.randn(t, n, d, generator=g, device=dev)
    post = torch.rand(t, n, generator=g, device=dev) * 2
    m = torch.rand(t, n, n, generator=g, device=dev)
    pre = torch.rand(t, n, generator=g, device=dev)
    # fp32 sums of 4-5 terms in another order vs float64: ~1e-7 relative.
    got = hc_post(f, x, post, m)
    want = hc_post_ref(f.double(), x.double(), post.double(), m.double())
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
    got = hc_weighted_sum(x, pre)
    want = hc_weighted_sum_ref(x.double(), pre.double())
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
