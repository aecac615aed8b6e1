"""kernels/glue.py (Triton; the CPU interpreter without a GPU) vs the reference functions."""

import pytest
import torch

from dwarfstar.kernels.glue import norm_rope, norm_rope_ref, rms_norm, rope, rope_table
from dwarfstar.model.numerics import rms_norm as rms_norm_ref
from dwarfstar.model.rope import apply_rope
from dwarfstar.model.rope import rope_frequencies
from dwarfstar.shape import FLASH

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape,weighted", [((3, 1536), True), ((2, 4, 128), False), ((1, 96), True)])
def test_rms_norm_matches_reference(shape, weighted):
    g = torch.Generator(device=DEV).manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, device=DEV) * 3
    w = torch.randn(shape[-1], generator=g, device=DEV) if weighted else None
    got = rms_norm(x, w, 1e-6)
    # fp32 sum order and one rsqrt vs torch's: a few ulp.
    assert _rel(got, rms_norm_ref(x.double(), None if w is None else w.double(), 1e-6)) < 1e-6


@pytest.mark.parametrize("ratio,inverse", [(0, False), (4, True)])
def test_rope_matches_apply_rope(ratio, inverse):
    omega = rope_frequencies(FLASH, ratio).to(DEV)
    cos, sin = rope_table(omega, 5000)
    g = torch.Generator(device=DEV).manual_seed(ratio)
    positions = torch.tensor([0, 7, 4999], device=DEV)
    for shape in ((3, 5, 128), (3, 96)):
        x = torch.randn(shape, generator=g, device=DEV)
        want = apply_rope(x, positions, omega, inverse)
        got = rope(x.clone(), positions, cos, sin, inverse)
        # Same float32 factors; the kernel may contract a*c - b*s into one FMA: 1-2 ulp.
        assert (got - want).abs().max().item() <= 4e-7 * want.abs().max().item()
        assert torch.equal(got[..., :-64], x[..., :-64])


@pytest.mark.parametrize("shape,weighted", [((3, 4, 128), False), ((2, 96), True), ((1, 64, 512), False),
                                            ((1, 512), True)])
def test_norm_rope_matches_norm_then_rope(shape, weighted):
    """One launch = rms_norm then rope: against the reference pair in float64 and against the two
    glue kernels (same sum and products: equal up to FMA contraction)."""
    omega = rope_frequencies(FLASH, 4).to(DEV)
    cos, sin = rope_table(omega, 5000)
    g = torch.Generator(device=DEV).manual_seed(shape[-1])
    x = torch.randn(shape, generator=g, device=DEV) * 3
    w = torch.randn(shape[-1], generator=g, device=DEV) if weighted else None
    positions = torch.tensor([0, 4999, 7][:shape[0]], device=DEV)
    got = norm_rope(x, w, 1e-6, positions, cos, sin)
    want = norm_rope_ref(x.double(), None if w is None else w.double(), 1e-6, positions, omega.double())
    assert _rel(got, want) < 1e-6
    two = rope(rms_norm(x, w, 1e-6), positions, cos, sin)
    assert (got - two).abs().max().item() <= 4e-7 * two.abs().max().item()


@pytest.mark.parametrize("limit", [10.0, 0.0])
def test_swiglu_matches_reference(limit):
    """Clamped SwiGLU in one launch vs model/moe.swiglu in float64 (exp ulps: ~1e-7)."""
    from dwarfstar.kernels.glue import swiglu
    from dwarfstar.model.moe import swiglu as swiglu_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(7)
    gate, up = (torch.randn(2, 1500, generator=g, device=dev) * 8 for _ in range(2))
    got = swiglu(gate, up, limit)
    want = swiglu_ref(gate.double(), up.double(), limit)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
    if limit > 0:
        assert (got.double() - swiglu_ref(gate.double(), up.double(), 0.0)).abs().max() > 1   # the clamp acts


@pytest.mark.parametrize("rows,d", [(1, 1024), (3, 256)])
def test_quantized_forms_equal_the_quantiser(rows, d):
    """rms_norm / swiglu with quantize=True: the same y, and y's int8 form bit-equal to
    kernels/moe.py quantize_act(y) (what the int8-activation products would make themselves)."""
    from dwarfstar.kernels.glue import rms_norm, swiglu
    from dwarfstar.kernels.moe import quantize_act

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(rows * d)
    x = torch.randn(rows, d, generator=g, device=dev) * 2
    w = torch.rand(d, generator=g, device=dev) + 0.5
    w[:32] = 0                                                     # an all-zero block: scale 0
    v = torch.randn(rows, d, generator=g, device=dev) * 4
    for plain, (y, yq) in ((rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6, quantize=True)),
                           (swiglu(x, v, 10.0), swiglu(x, v, 10.0, quantize=True))):
        assert torch.equal(y, plain)
        for a, b in zip(yq, quantize_act(plain)):
            assert torch.equal(a, b)
