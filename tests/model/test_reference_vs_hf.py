"""Reference forward (numerics "exact") against transformers DeepseekV4ForCausalLM.

Oracle: transformers 5.23 on the same random weights (tiny_hf.py), float64 on both sides.
Tolerance: max |Δlogit| <= 2e-5 with logits of size ~1-5. transformers computes the HC
mixing and RoPE cos/sin in float32 even in a float64 model (model.md §8 item 5), which
leaves ~1e-6 differences; any real bug (see the wrong-variant tests) moves logits by
>= 1e-2.

The configs together exercise every layer type (ratios 0, 4, 8 and 128), hash and top-k
routing, window eviction, more compressed rows than the indexer's top-k, and YaRN.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dwarfstar.model import attention as attention_mod
from dwarfstar.model import reference as reference_mod
from dwarfstar.model.reference import ReferenceModel
from dwarfstar.model.rope import apply_rope
from dwarfstar.model.weights import Weights

from .tiny_hf import gguf_tensors, hf_logits, hf_model, tiny_config

ATOL = 2e-5
# Any deliberately wrong variant must move some logit by more than this.
WRONG_MIN = 1e-2

CONFIGS = {
    # model.md §8: Flash pattern with an 8-ratio heavy layer; indexer selects 3 of up to 10 rows.
    "flash_pattern": (dict(), 40),
    # Real ratio 128 (one row emitted at t = 127), window 16, one hash layer, top-k 8.
    # Dims allow the FP8 / FP4 blocks (64 non-RoPE dims, indexer dim 32).
    "ratio128": (dict(n_layers=5, compress_ratios=(0, 4, 128, 4, 0), swiglu_limits=(7.0,) * 5,
                      window_size=16, index_topk=8, n_hash_layers=1, head_dim=72, value_dim=72,
                      index_head_dim=32), 133),
    # Compressed layer first, 2 HC streams, 2 of 8 experts, odd window and length.
    "streams2": (dict(n_layers=4, compress_ratios=(4, 8, 0, 8), swiglu_limits=(3.0,) * 4, hc_mult=2,
                      n_heads=4, o_groups=2, n_routed_experts=8, n_activated_experts=2, n_hash_layers=2,
                      window_size=5, index_topk=2, head_dim=24, value_dim=24, rope_factor=4.0,
                      original_seq_len=512), 37),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    overrides, n_tokens = CONFIGS[request.param]
    config = tiny_config(**overrides)
    model = hf_model(config, seed=len(request.param), dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, config.vocab_size, (n_tokens,), generator=g).tolist()
    return config, gguf_tensors(model, config), tokens, hf_logits(model, tokens)


def ours(config, tensors, tokens, numerics="exact"):
    model = ReferenceModel(Weights.from_dict(config, tensors), numerics, torch.float64)
    return model.forward(model.new_state(len(tokens) + 8), tokens)


def test_logits_match_transformers(case):
    config, tensors, tokens, expected = case
    got = ours(config, tensors, tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= ATOL


def test_official_numerics_differ_from_transformers(case):
    """The QAT rounding points are real and visible (and off in "exact")."""
    config, tensors, tokens, expected = case
    if config.nope_head_dim % 64:
        pytest.skip("FP8 blocks of 64 need non-RoPE dims that are a multiple of 64")
    got = ours(config, tensors, tokens, "official")
    assert (got - expected).abs().max().item() > 1e-4


def _wrong_hc_post(f, x, post, m):
    # Mixes with M instead of Mᵀ.
    return post[:, :, None] * f[:, None, :] + torch.einsum("tij,tjd->tid", m, x)


def _neox_rope(x, positions, omega, inverse=False):
    # Half-split pairs instead of adjacent pairs.
    n = omega.shape[0]
    tail = x[..., -2 * n:]
    swapped = tail.reshape(*tail.shape[:-1], n, 2).transpose(-1, -2).reshape(tail.shape)
    rotated = apply_rope(torch.cat([x[..., :-2 * n], swapped], -1), positions, omega, inverse)[..., -2 * n:]
    back = rotated.reshape(*tail.shape[:-1], 2, n).transpose(-1, -2).reshape(tail.shape)
    return torch.cat([x[..., :-2 * n], back], -1)


def _select_all(qr, h, positions, rows, *args):
    return torch.arange(rows.shape[0])[None, :] < ((positions + 1) // 4)[:, None]


@pytest.mark.parametrize("variant", ["sinkhorn_untransposed", "no_route_scale", "neox_rope", "no_indexer"])
def test_wrong_variants_fail_the_comparison(case, variant, monkeypatch):
    config, tensors, tokens, expected = case
    if variant == "sinkhorn_untransposed" and config.hc_mult == 2:
        pytest.skip("every 2x2 doubly-stochastic matrix is symmetric: M and its transpose agree")
    if variant == "sinkhorn_untransposed":
        monkeypatch.setattr(reference_mod, "hc_post", _wrong_hc_post)
    elif variant == "no_route_scale":
        config = dataclasses.replace(config, route_scale=1.0)
    elif variant == "neox_rope":
        monkeypatch.setattr(attention_mod, "apply_rope", _neox_rope)
    elif variant == "no_indexer":
        monkeypatch.setattr(attention_mod, "index_select", _select_all)
    got = ours(config, tensors, tokens)
    assert (got - expected).abs().max().item() > WRONG_MIN
