"""Prefill == token-by-token decode == chunked prefill; snapshot -> restore -> continue.

Oracle: the same model run on the same tokens in one full-sequence call. In exact
arithmetic every chunking gives identical logits (model.md §4.2); in float64 the only
differences are matmul reduction orders, ~1e-13, hence ATOL 1e-9. Both numerics
settings are checked: the official rounding points (FP8, FP4, f16) are applied when a
row is made, so they must agree across chunkings too.
"""

from __future__ import annotations

import pytest
import torch

from dwarfstar.engine.kv import DecodeState
from dwarfstar.model.reference import ReferenceModel
from dwarfstar.model.weights import Weights

from .tiny_hf import random_tensors, tiny_config

ATOL = 1e-9
# Official-numerics-friendly dims: 64 non-RoPE dims (FP8 block), indexer dim 32 (FP4 block).
CONFIG = tiny_config(head_dim=72, value_dim=72, index_head_dim=32, n_layers=5,
                     compress_ratios=(0, 4, 8, 4, 0), swiglu_limits=(10.0,) * 5)
N_TOKENS = 29


@pytest.fixture(scope="module")
def weights():
    return Weights.from_dict(CONFIG, random_tensors(CONFIG, seed=3))


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, CONFIG.vocab_size, (N_TOKENS,), generator=g).tolist()


def run_chunks(model, tokens, sizes):
    state = model.new_state(64)
    out, i, k = [], 0, 0
    while i < len(tokens):
        n = sizes[k % len(sizes)]
        out.append(model.forward(state, tokens[i:i + n]))
        i, k = i + n, k + 1
    return torch.cat(out), state


@pytest.mark.parametrize("numerics", ["exact", "official"])
@pytest.mark.parametrize("sizes", [[1], [5, 1, 1], [3], [7, 2], [13]], ids=str)
def test_chunked_equals_full(weights, tokens, numerics, sizes):
    model = ReferenceModel(weights, numerics, torch.float64)
    full, _ = run_chunks(model, tokens, [len(tokens)])
    got, state = run_chunks(model, tokens, sizes)
    assert (got - full).abs().max().item() <= ATOL
    assert state.tokens == tokens
    assert torch.equal(state.last_logits, got[-1])


@pytest.mark.parametrize("numerics", ["exact", "official"])
def test_snapshot_restore_continue(weights, tokens, numerics):
    model = ReferenceModel(weights, numerics, torch.float64)
    straight, _ = run_chunks(model, tokens, [len(tokens)])
    # Stop after a prefix that is not a multiple of 4 or 8 (open compressor windows).
    cut = 11
    state = model.new_state(64)
    model.forward(state, tokens[:cut])
    blob = state.snapshot()
    restored = DecodeState.restore(CONFIG, blob)
    assert restored.tokens == tokens[:cut]
    assert torch.equal(restored.last_logits, state.last_logits)
    assert restored.snapshot() == blob
    rest = torch.cat([model.forward(restored, [t]) for t in tokens[cut:]])
    assert (rest - straight[cut:]).abs().max().item() <= ATOL


def test_restore_rejects_bad_input():
    state = DecodeState.new(CONFIG, 16, torch.float64)
    blob = state.snapshot()
    with pytest.raises(ValueError, match="magic"):
        DecodeState.restore(CONFIG, b"XXXX" + blob[4:])
    with pytest.raises(ValueError, match="version"):
        DecodeState.restore(CONFIG, blob[:8] + b"\x63\x00\x00\x00" + blob[12:])
    other = tiny_config()
    with pytest.raises(ValueError, match="schedule"):
        DecodeState.restore(other, blob)


def test_context_overflow_is_an_error(weights):
    model = ReferenceModel(weights, "exact", torch.float64)
    state = model.new_state(4)
    with pytest.raises(ValueError, match="context overflow"):
        model.forward(state, [1, 2, 3, 4, 5])
