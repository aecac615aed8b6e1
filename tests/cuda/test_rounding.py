"""Graph-safe rounding twins and the key-based stable top-k vs the reference functions (bit-exact)."""

import pytest
import torch

from dwarfstar.kernels.rounding import fp4_round, hadamard_round, stable_topk
from dwarfstar.model.moe import stable_topk as sort_topk
from dwarfstar.model.numerics import _hadamard_matrix, fp4_sim, hadamard


def test_fp4_round_equals_fp4_sim_at_every_midpoint():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 10
    mids = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 1.0, 3.0, 4.0, 2.0, 1.5, 0.1] * 2)
    # Block amax 6 gives scale 1, so these values are rounded as written.
    x[0, :32], x[1, :32] = mids, -mids
    assert torch.equal(fp4_round(x), fp4_sim(x))


def test_hadamard_round_equals_reference():
    x = torch.randn(5, 3, 128, generator=torch.Generator().manual_seed(2))
    assert torch.equal(hadamard_round(x, _hadamard_matrix(128).float()), fp4_sim(hadamard(x)))


@pytest.mark.parametrize("n,k", [(7, 3), (256, 6), (1050, 512)])
def test_stable_topk_matches_sort_with_ties(n, k):
    g = torch.Generator().manual_seed(n)
    v = torch.randint(-3, 4, (9, n), generator=g).float()           # many ties
    v[0, :4] = torch.tensor([-0.0, 0.0, -0.0, 0.0])
    v[1, n // 2:] = float("-inf")
    v[2] = torch.randn(n, generator=g)
    assert torch.equal(stable_topk(v, k), sort_topk(v, k))


@pytest.mark.parametrize("fp8,half", [(True, True), (True, False), (False, True)])
def test_kv_round_matches_kv_row_rounding(fp8, half):
    """Bit-equal to the reference rounding on random rows (incl. tiny and huge blocks, exact
    E4M3 midpoints); see rounding.py for the one-in-a-million log2 edge it avoids."""
    from dwarfstar.kernels.rounding import kv_round
    from dwarfstar.model.numerics import Numerics, kv_row_rounding

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(int(fp8) * 2 + int(half))
    x = torch.randn(5, 512, generator=g, device=dev) * torch.logspace(-6, 3, 5, device=dev)[:, None]
    x[0, :64] = torch.arange(64, device=dev) * 0.5 + 0.25        # ties on the E4M3 grid
    x[1, 64:128] = 0.0                                            # all-zero block: amax floor
    num = Numerics(fp8_kv=fp8, half_cache=half, fp4_indexer=False)
    want = kv_row_rounding(x, 448, num)
    got = kv_round(x, 448, fp8, half)
    assert torch.equal(got, want)
