"""Quantised mat-vec kernels vs their twins vs gguf's numpy dequantisation in float64.

CPU runs use the Triton interpreter at tiny shapes; `gpu` tests repeat the check at the
Flash shapes on the device, plus CUDA-graph replay equality.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

pytest.importorskip("triton", reason="triton is not installed (pip install '.[test]')")

from dwarfstar.kernels.matvec import expert_matvec, expert_matvec_ref, matvec, matvec_ref  # noqa: E402
from dwarfstar.kernels.repack import repack  # noqa: E402
from dwarfstar.kernels.synth import random_raw  # noqa: E402

FORMATS = [T.Q8_0, T.IQ2_XXS, T.Q2_K, T.Q4_K, T.F16]


def oracle_weight(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float64 [..., N, K] from gguf-py's numpy dequantisation (independent of our code)."""
    rows = raw.cpu().numpy().reshape(int(np.prod(shape[:-1])), -1)
    return torch.from_numpy(dequantize(rows, ggml_type).reshape(shape)).double()


def poisoned(rows: int, cols: int, device) -> torch.Tensor:
    return torch.full((rows, cols), float("nan"), device=device)


def check_dense(ggml_type, n, k, b, gen, check, **tiling):
    raw = random_raw(ggml_type, (n, k), gen)
    w = repack(raw, ggml_type, (n, k))
    x = torch.randn(b, k, generator=gen, device=gen.device)
    expected = x.double().cpu() @ oracle_weight(raw, ggml_type, (n, k)).T
    y = matvec(w, x, out=poisoned(b, n, x.device), **tiling)
    check(y, expected, "fp32_matvec")
    check(matvec_ref(w, x), expected, "fp32_matvec")


def check_experts(ggml_type, e, n, k, ids, gen, check):
    raw = random_raw(ggml_type, (e, n, k), gen)
    w = repack(raw, ggml_type, (e, n, k))
    ids = torch.tensor(ids, dtype=torch.int32, device=gen.device)
    x = torch.randn(len(ids), k, generator=gen, device=gen.device)
    # Oracle on the selected experts' bytes only (keeps full-size expert tensors cheap).
    picked = raw.reshape(e, -1)[ids.long()].reshape(-1)
    wsel = oracle_weight(picked, ggml_type, (len(ids), n, k))
    expected = torch.einsum("snk,sk->sn", wsel, x.double().cpu())
    y = expert_matvec(w, ids, x, out=poisoned(len(ids), n, x.device))
    check(y, expected, "fp32_matvec")
    check(expert_matvec_ref(w, ids, x), expected, "fp32_matvec")


# N = 37 / 13 leave a ragged last row block; B = 3 a padded column block; B = 8 the most
# columns (fewer rows there: the interpreter's cost grows with B * programs).
@pytest.mark.parametrize("ggml_type", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("n,b", [(37, 1), (37, 3), (13, 8)], ids=["B1", "B3", "B8"])
def test_matvec_tiny(ggml_type, n, b, gen, check):
    check_dense(ggml_type, n, 512, b, gen, check)


@pytest.mark.parametrize("ggml_type,k", [(T.Q8_0, 96), (T.F16, 200)], ids=["Q8_0-K96", "F16-K200"])
def test_matvec_ragged_k(ggml_type, k, gen, check):
    """K not a multiple of BLOCK_K: the masked tail must add nothing."""
    check_dense(ggml_type, 9, k, 2, gen, check)


@pytest.mark.parametrize("ggml_type", FORMATS, ids=lambda t: t.name)
def test_expert_matvec_tiny(ggml_type, gen, check):
    # Repeated and out-of-order ids, as several sessions routing to one expert produce.
    check_experts(ggml_type, 5, 19, 256, [3, 0, 3, 4], gen, check)


def test_launcher_rejects_bad_inputs(gen):
    w = repack(random_raw(T.Q8_0, (4, 64), gen), T.Q8_0, (4, 64))
    with pytest.raises(AssertionError, match="float32"):
        matvec(w, torch.randn(1, 64, device=gen.device).half())
    with pytest.raises(AssertionError, match="columns"):
        matvec(w, torch.randn(9, 64, device=gen.device))


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type,n,k,b", [
    (T.Q8_0, 1024, 4096, 1), (T.Q8_0, 32768, 1024, 1), (T.Q8_0, 4096, 8192, 8),
    (T.Q8_0, 129280, 4096, 1), (T.F16, 1024, 4096, 1), (T.F16, 24, 16384, 4),
    (T.IQ2_XXS, 2048, 4096, 2), (T.Q2_K, 4096, 2048, 5), (T.Q4_K, 2048, 4096, 8),
    # Merged at load (forward.py SHARED_INPUT): q_a + kv, shared gate + up, both compressors +
    # indexer weights (ratio 4), both compressor matrices (ratio 128).
    (T.Q8_0, 1536, 4096, 1), (T.Q8_0, 4096, 4096, 1), (T.F16, 2624, 4096, 1), (T.F16, 1024, 4096, 1),
], ids=lambda v: getattr(v, "name", str(v)))
def test_matvec_gpu_flash_shapes(ggml_type, n, k, b, gen, check):
    check_dense(ggml_type, n, k, b, gen, check)


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type,n,k", [
    (T.IQ2_XXS, 2048, 4096), (T.Q2_K, 4096, 2048), (T.Q4_K, 2048, 4096),
], ids=lambda v: getattr(v, "name", str(v)))
def test_expert_matvec_gpu_flash_shapes(ggml_type, n, k, gen, check):
    ids = torch.randperm(256, generator=torch.Generator().manual_seed(gen.initial_seed()))[:6].tolist()
    check_experts(ggml_type, 256, n, k, ids, gen, check)


@pytest.mark.gpu
def test_matvec_graph_replay_matches_eager(gen):
    """Captured in a CUDA graph, replay on new inputs equals eager launches bit for bit."""
    w = repack(random_raw(T.Q8_0, (4096, 4096), gen), T.Q8_0, (4096, 4096))
    e = repack(random_raw(T.IQ2_XXS, (16, 2048, 4096), gen), T.IQ2_XXS, (16, 2048, 4096))
    x = torch.randn(2, 4096, generator=gen, device="cuda")
    xe = torch.randn(6, 4096, generator=gen, device="cuda")
    ids = torch.randint(0, 16, (6,), generator=gen, device="cuda", dtype=torch.int32)
    y, ye = matvec(w, x), expert_matvec(e, ids, xe)  # warm-up compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        matvec(w, x, out=y)
        expert_matvec(e, ids, xe, out=ye)
    x.copy_(torch.randn(2, 4096, generator=gen, device="cuda"))
    ids.copy_(torch.randint(0, 16, (6,), generator=gen, device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, matvec(w, x)) and torch.equal(ye, expert_matvec(e, ids, xe))


@pytest.mark.parametrize("ggml_type", FORMATS, ids=lambda t: t.name)
def test_cat_planar_stacks_rows(ggml_type, gen, check):
    """Merged weights (one launch for mat-vecs sharing x): dequant(merged) == cat(dequant(parts))
    bit for bit, the row views give the parts back, and the merged mat-vec matches the oracle."""
    from dwarfstar.kernels.matvec import cat_planar, split_planar
    from dwarfstar.kernels.repack import dequantize_planar

    k, sizes = 512, (5, 3, 7)
    raws = [random_raw(ggml_type, (n, k), gen) for n in sizes]
    parts = [repack(r, ggml_type, (n, k)) for r, n in zip(raws, sizes)]
    merged = cat_planar(parts)
    assert merged.shape == (sum(sizes), k)
    assert torch.equal(dequantize_planar(merged), torch.cat([dequantize_planar(p) for p in parts]))
    for view, p in zip(split_planar(merged, list(sizes)), parts):
        assert view.shape == p.shape and torch.equal(dequantize_planar(view), dequantize_planar(p))
    x = torch.randn(2, k, generator=gen, device=gen.device)
    expected = torch.cat([x.double().cpu() @ oracle_weight(r, ggml_type, (n, k)).T
                          for r, n in zip(raws, sizes)], 1)
    check(matvec(merged, x, out=poisoned(2, sum(sizes), x.device)), expected, "fp32_matvec")


@pytest.mark.parametrize("ggml_type,k,splits", [(T.F16, 1000, 5), (T.Q8_0, 1024, 4)], ids=["F16", "Q8_0"])
def test_matvec_split_k(ggml_type, k, splits, gen, check):
    """Split-K partials: partial c is the product over the c-th K range (`split_chunk`), vs the
    gguf oracle in float64; the twin over the same ranges; a ragged K and an empty last range."""
    from dwarfstar.kernels.matvec import matvec_split_k, matvec_split_k_ref, split_chunk

    n, b, block_k = 6, 2, 128
    raw = random_raw(ggml_type, (n, k), gen)
    w = repack(raw, ggml_type, (n, k))
    x = torch.randn(b, k, generator=gen, device=gen.device)
    wd, xd = oracle_weight(raw, ggml_type, (n, k)), x.double().cpu()
    chunk = split_chunk(k, splits, block_k)
    expected = torch.stack([xd[:, i * chunk:(i + 1) * chunk] @ wd[:, i * chunk:(i + 1) * chunk].T
                            for i in range(splits)])
    out = torch.full((splits, b, n), float("nan"), device=x.device)
    got = matvec_split_k(w, x, splits, out=out, block_n=4, block_k=block_k)
    check(got, expected, "fp32_matvec")
    check(got.sum(0), xd @ wd.T, "fp32_matvec")
    check(matvec_split_k_ref(w, x, splits, block_k), expected, "fp32_matvec")


@pytest.mark.gpu
@pytest.mark.parametrize("n,b", [(24, 1), (24, 4), (4, 1)], ids=["hc-B1", "hc-B4", "head-hc"])
def test_matvec_split_k_gpu_hc_shapes(n, b, gen, check):
    """The HC fn mat-vecs at Flash shape (K = 4 x 4096) with the default split: the sum of the
    partials vs the gguf oracle."""
    from dwarfstar.kernels.matvec import SPLIT_K, matvec_split_k

    k = 16384
    raw = random_raw(T.F16, (n, k), gen)
    x = torch.randn(b, k, generator=gen, device=gen.device)
    got = matvec_split_k(repack(raw, T.F16, (n, k)), x)
    assert got.shape == (SPLIT_K, b, n)
    check(got.sum(0), x.double().cpu() @ oracle_weight(raw, T.F16, (n, k)).T, "fp32_matvec")
