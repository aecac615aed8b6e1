"""Kernel test bootstrap: the Triton CPU interpreter, devices, fresh seeds, tolerances.

TRITON_INTERPRET must be set before any `@triton.jit` runs (it is read at decoration time),
so it is set here, before the test modules import dwarfstar.kernels. On a CUDA machine the
real compiler is used and the same tests run on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402



@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen(device, request) -> torch.Generator:
    """A generator with a fresh seed per test (printed on failure via the test's report)."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator(device=device).manual_seed(seed)


@pytest.fixture
def check(tolerance):
    """assert_close(y, ref, name): every element finite (NaN-poisoned outputs must be
    overwritten) and relative L2 within TOLERANCES[name] (tests/conftest.py)."""
    def assert_close(y: torch.Tensor, ref: torch.Tensor, name: str) -> None:
        bound, reason = tolerance(name)
        assert y.shape == ref.shape, (y.shape, ref.shape)
        assert torch.isfinite(y).all(), "non-finite output: an element was not written"
        y, ref = y.double().cpu(), ref.double().cpu()
        err = ((y - ref).norm() / ref.norm()).item()
        max_abs = (y - ref).abs().max().item()
        assert err <= bound, f"rel L2 {err:.3g} > {bound:g} ({reason}); max abs err {max_abs:.3g}"
    return assert_close
