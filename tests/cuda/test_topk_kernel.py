"""kernels/topk.select_topk (Triton; the CPU interpreter without a GPU) vs a plain-Python oracle
(sort by value descending, then index) and the twin (rounding.stable_topk sorted by index).
The result must be exactly that set, in ascending index order."""

import pytest
import torch

from dwarfstar.kernels import topk
from dwarfstar.kernels.topk import select_topk, select_topk_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("-inf")


def python_topk(row: list[float], k: int) -> list[int]:
    """Indices of the k largest (equal values: the lower index first), ascending. Python's
    -0.0 == 0.0, so the two zeros tie as in stable_topk."""
    return sorted(sorted(range(len(row)), key=lambda i: (-row[i], i))[:k])


def scores(n: int, pattern: str, seed: int) -> torch.Tensor:
    """One row of n indexer-like float32 scores."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g) * 3
    if pattern == "ties":                           # few distinct values, long runs of equals
        v = torch.round(v)
    elif pattern == "masked":                       # a visible prefix, -inf after it (decode)
        v[max(1, n // 5):] = INF
    elif pattern == "k_plus_3":                     # 515 visible, then -inf: just past k = 512
        v[515:] = INF
    elif pattern == "few_finite":                   # fewer finite than k: -inf rows get picked
        v[:] = INF
        v[torch.randperm(n, generator=g)[:3]] = torch.tensor([0.5, -2.0, 0.5])
    elif pattern == "zeros":                        # -0.0 / +0.0 ties, subnormals, +-inf
        v = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        v[::7] = torch.tensor([1e-45, -1e-45, 1e-40, -3.0, float("inf"), INF, 2.0])[torch.arange(0, n, 7) % 7]
    return v


@pytest.mark.parametrize("n,k,pattern", [
    (1, 1, "random"), (7, 3, "random"), (16, 16, "ties"), (33, 5, "zeros"), (100, 100, "zeros"),
    (129, 64, "ties"), (300, 40, "masked"), (300, 16, "few_finite"), (512, 512, "masked"),
    (1000, 512, "ties"), (2500, 512, "masked"), (2500, 100, "few_finite"),
])
def test_select_topk_matches_python_oracle(n, k, pattern):
    v = scores(n, pattern, seed=n + k)
    got = select_topk(v[None].to(DEV), k).cpu()
    assert got.dtype == torch.int64 and got.shape == (1, k)
    assert got[0].tolist() == python_topk(v.tolist(), k)
    assert torch.equal(got, select_topk_ref(v[None], k))


def test_select_topk_rows_and_all_equal():
    """Several rows in one launch (one program each); a row of one repeated value takes the first k."""
    v = torch.stack([scores(700, p, seed=i) for i, p in enumerate(["random", "ties", "masked", "zeros"])])
    v[1] = 0.25
    got = select_topk(v.to(DEV), 200).cpu()
    assert torch.equal(got, select_topk_ref(v, 200))
    assert torch.equal(got[1], torch.arange(200))


@pytest.mark.parametrize("pattern", ["masked", "ties", "few_finite"])
def test_select_topk_flash_capacity(pattern):
    """The 131K-token allocation: 32768 ratio-4 rows, the indexer's k = 512."""
    v = scores(32768, pattern, seed=3)
    assert torch.equal(select_topk(v[None].to(DEV), 512).cpu(), select_topk_ref(v[None], 512))


@pytest.mark.parametrize("k", [40, 512])
@pytest.mark.parametrize("excess", [-5, 0, 1, 3, 16, 17])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("short", [16, -1])
def test_select_topk_few_more_finite_than_k(k, excess, ties, short, monkeypatch):
    """Decode around the context where the compressed rows first outnumber k (2K tokens at ratio 4,
    k = 512): k + excess visible scores, then -inf. The kernel's short paths (at most k finite,
    or up to topk.SHORT_EXCESS more: 16) and the bit search past them (17, or short paths off)
    all give the same set; with ties, equal values straddle the threshold."""
    monkeypatch.setattr(topk, "SHORT_EXCESS", short)
    n = k + 30
    g = torch.Generator().manual_seed(k + excess)
    v = torch.full((n,), INF)
    v[:k + excess] = torch.randn(k + excess, generator=g) * 3
    if ties:
        v[:k + excess] = torch.round(v[:k + excess] * 2) / 2
    got = select_topk(v[None].to(DEV), k).cpu()
    assert got[0].tolist() == python_topk(v.tolist(), k)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(32768, 512), (8192, 512), (512, 512), (2048, 100)])
@pytest.mark.parametrize("pattern", ["random", "masked", "ties", "few_finite", "zeros", "k_plus_3"])
def test_select_topk_gpu_decode_shapes(n, k, pattern):
    v = scores(n, pattern, seed=n)[None].cuda()
    assert torch.equal(select_topk(v, k), select_topk_ref(v, k))
