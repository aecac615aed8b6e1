"""Q8_0 mat-vecs with int8 activations (kernels/matvec_int8.py) vs an independent float64 oracle.

The oracle: gguf-py's numpy dequantisation of the weight bytes times the int8-rounded
activations computed here from the rule (per 32 inputs: scale amax/127, round half to even),
not through our quantiser's twin. CPU runs use the Triton interpreter at tiny shapes (the
plain-integer dp4a path); `gpu` tests repeat the check at Flash shapes with the dp4a asm.
"""

import pytest
import torch
from gguf import GGMLQuantizationType as T

pytest.importorskip("triton", reason="triton is not installed (pip install '.[test]')")

from dwarfstar.kernels.matvec_int8 import (  # noqa: E402
    expert_matvec_q8, expert_matvec_q8_ref, matvec_q8, matvec_q8_ref,
)
from dwarfstar.kernels.moe import quantize_act  # noqa: E402
from dwarfstar.kernels.repack import repack  # noqa: E402
from dwarfstar.kernels.synth import random_raw  # noqa: E402
from tests.kernels.test_matvec import oracle_weight, poisoned  # noqa: E402


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """float64: x rounded to int8 per 32 inputs by the rule, independently of kernels/moe.py."""
    xb = x.double().cpu().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True).float().double()
    scale = (amax / 127).float().double()                      # fp32 scale, as stored
    inv = torch.where(amax > 0, (127 / amax).float().double(), torch.zeros_like(amax))
    q = torch.round((xb.float() * inv.float()).double())        # the fp32 product, then rint
    return (q * scale).reshape(x.shape)


def dense_case(n, k, b, gen, check, **kw):
    raw = random_raw(T.Q8_0, (n, k), gen)
    w = repack(raw, T.Q8_0, (n, k))
    x = torch.randn(b, k, generator=gen, device=gen.device)
    x[0, :32] = 0                                      # an all-zero block: scale 0, codes 0
    expected = int8_rounded(x) @ oracle_weight(raw, T.Q8_0, (n, k)).T
    y = matvec_q8(w, quantize_act(x), out=poisoned(b, n, x.device), **kw)
    check(y, expected, "int8_vs_twin")
    check(matvec_q8_ref(w, x), expected, "int8_vs_twin")
    # And against the unrounded product: the int8 rounding of x only.
    check(y, x.double().cpu() @ oracle_weight(raw, T.Q8_0, (n, k)).T, "int8_act")


# N = 37 leaves a ragged row block; K = 768 a ragged K tile (BLOCK_K 512 below); B up to 8.
@pytest.mark.parametrize("n,k,b", [(37, 512, 1), (37, 768, 3), (13, 256, 8)], ids=["B1", "B3-K768", "B8"])
def test_matvec_q8_tiny(n, k, b, gen, check):
    dense_case(n, k, b, gen, check, tiling=(8, 512, 4))


def test_expert_matvec_q8_tiny(gen, check):
    e, n, k, ids = 5, 19, 512, [3, 0, 3, 4]   # repeated, out of order (groups / several sessions)
    raw = random_raw(T.Q8_0, (e, n, k), gen)
    w = repack(raw, T.Q8_0, (e, n, k))
    idt = torch.tensor(ids, dtype=torch.int32, device=gen.device)
    x = torch.randn(len(ids), k, generator=gen, device=gen.device)
    wsel = oracle_weight(raw, T.Q8_0, (e, n, k))[idt.long().cpu()]
    expected = torch.einsum("snk,sk->sn", wsel, int8_rounded(x))
    y = expert_matvec_q8(w, idt, quantize_act(x), out=poisoned(len(ids), n, x.device), tiling=(8, 256, 4))
    check(y, expected, "int8_vs_twin")
    check(expert_matvec_q8_ref(w, idt, x), expected, "int8_vs_twin")


def test_matvec_q8_rejects_bad_inputs(gen):
    w = repack(random_raw(T.Q8_0, (4, 256), gen), T.Q8_0, (4, 256))
    xq = quantize_act(torch.randn(1, 512, device=gen.device))
    with pytest.raises(AssertionError):
        matvec_q8(w, xq)                               # K of x and of w differ
    with pytest.raises(AssertionError, match="columns"):
        matvec_q8(w, quantize_act(torch.randn(9, 256, device=gen.device)))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,b", [(1536, 4096, 1), (32768, 1024, 1), (4096, 8192, 1), (4096, 4096, 1),
                                   (4096, 2048, 1), (129280, 4096, 1), (4096, 8192, 4)])
def test_matvec_q8_gpu_flash_shapes(n, k, b, gen, check):
    dense_case(n, k, b, gen, check)


@pytest.mark.gpu
def test_expert_matvec_q8_gpu_grouped_out_a(gen, check):
    """The grouped out-a: 8 groups of [1024, 4096], ids 0..7."""
    raw = random_raw(T.Q8_0, (8, 1024, 4096), gen)
    w = repack(raw, T.Q8_0, (8, 1024, 4096))
    ids = torch.arange(8, dtype=torch.int32, device="cuda")
    x = torch.randn(8, 4096, generator=gen, device="cuda")
    expected = torch.einsum("snk,sk->sn", oracle_weight(raw, T.Q8_0, (8, 1024, 4096)), int8_rounded(x))
    check(expert_matvec_q8(w, ids, quantize_act(x)), expected, "int8_vs_twin")


def norm_fold_case(n, k, gen, check, **kw):
    """matvec_q8(norm=(x, weight, eps)) against the two launches it replaces (glue.rms_norm with
    the int8 form, then matvec_q8) and against the float64 oracle of the normed, rounded row."""
    from dwarfstar.kernels.glue import rms_norm

    raw = random_raw(T.Q8_0, (n, k), gen)
    w = repack(raw, T.Q8_0, (n, k))
    x = torch.randn(1, k, generator=gen, device=gen.device) * 3
    nw = torch.rand(k, generator=gen, device=gen.device) + 0.5
    eps = 1e-6
    y = matvec_q8(w, None, out=poisoned(1, n, x.device), norm=(x, nw, eps), **kw)
    xn, xq = rms_norm(x, nw, eps, quantize=True)
    two = matvec_q8(w, xq, **kw)
    check(y, two, "int8_norm_fold")
    wf = oracle_weight(raw, T.Q8_0, (n, k))
    check(y, int8_rounded(xn) @ wf.T, "int8_norm_fold")
    xd = x.double().cpu()
    normed = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps) * nw.double().cpu()
    check(y, normed @ wf.T, "int8_act")
    return y, two


def test_matvec_q8_norm_fold_tiny(gen, check):
    """Two K tiles (K = 512, BLOCK_K 256); under the interpreter both paths sum the squares in the
    same order, so the codes and the output are the same bit for bit."""
    y, two = norm_fold_case(37, 512, gen, check, tiling=(8, 256, 4))
    if not y.is_cuda:
        assert torch.equal(y, two)


def test_matvec_q8_norm_fold_rejects_bad_inputs(gen):
    w = repack(random_raw(T.Q8_0, (4, 512), gen), T.Q8_0, (4, 512))
    nw = torch.ones(512, device=gen.device)
    with pytest.raises(AssertionError, match="one dense row"):
        matvec_q8(w, None, norm=(torch.randn(2, 512, device=gen.device), nw, 1e-6))
    w3 = repack(random_raw(T.Q8_0, (4, 768), gen), T.Q8_0, (4, 768))
    with pytest.raises(AssertionError, match="multiple of BLOCK_K"):
        matvec_q8(w3, None, norm=(torch.randn(1, 768, device=gen.device), nw[:1].expand(768).contiguous(), 1e-6),
                  tiling=(8, 512, 4))


@pytest.mark.gpu
def test_matvec_q8_norm_fold_gpu_q_b(gen, check):
    """Decode's q_b at Flash shape: [32768, 1024] from q_a's raw row, production tiling."""
    norm_fold_case(32768, 1024, gen, check)
