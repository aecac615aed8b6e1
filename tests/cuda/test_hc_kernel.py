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
