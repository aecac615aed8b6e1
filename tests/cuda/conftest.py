"""CUDA-backend tests: CPU runs (the forward on kernel twins, tiny models) and `gpu` runs.

Tolerances live in tests/conftest.py (TOLERANCES, `tol`). Logit comparisons are
|Δ log-prob| over the reference's top-20 tokens, in nats.
"""

import os

import torch

# Read when a @triton.jit kernel is decorated: set before any test module imports dwarfstar.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402



def top_logprob_error(ref: torch.Tensor, got: torch.Tensor, k: int = 20) -> float:
    """max |Δ log-softmax| over the reference's top-k tokens."""
    lr, lg = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double().to(ref.device), -1)
    top = torch.topk(lr, k).indices
    return (lr[top] - lg[top]).abs().max().item()


@pytest.fixture
def logprob_error():
    return top_logprob_error
