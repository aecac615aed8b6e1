"""MTP block: shapes, determinism, its own sliding window, and the §3.1 input formula.

No external oracle exists for the MTP (transformers drops `mtp.*`). The checks are
structural: deterministic output, chunked == token-by-token through its own raw ring
(float64, ATOL 1e-9 as in test_decode_state), the head uses the main model's `output`,
and X0 is built per stream (changing one input stream changes the result).
"""

from __future__ import annotations

import torch

from dwarfstar.model.mtp import MTPBlock
from dwarfstar.model.reference import ReferenceModel
from dwarfstar.model.weights import Weights

from .tiny_hf import random_tensors, tiny_config

CONFIG = tiny_config()


def make():
    main = ReferenceModel(Weights.from_dict(CONFIG, random_tensors(CONFIG, 1)), "exact", torch.float64)
    mtp = MTPBlock(Weights.from_dict(CONFIG, random_tensors(CONFIG, 2, mtp=True), mtp=True), main)
    return main, mtp


def test_mtp_shapes_determinism_and_chunking():
    main, mtp = make()
    tokens = list(range(3, 23))
    state = main.new_state(32)
    hs = main.run(state, tokens)                                       # [T, n, D]
    logits, x1 = mtp.forward(hs, tokens, 0, mtp.new_state())
    assert logits.shape == (len(tokens), CONFIG.vocab_size)
    assert x1.shape == (len(tokens), CONFIG.hc_mult, CONFIG.dim)
    again, _ = mtp.forward(hs, tokens, 0, mtp.new_state())
    assert torch.equal(logits, again)
    ring = mtp.new_state()
    steps = torch.cat([mtp.forward(hs[i:i + 1], tokens[i:i + 1], i, ring)[0] for i in range(len(tokens))])
    assert (steps - logits).abs().max().item() <= 1e-9


def test_mtp_depends_on_each_stream_and_uses_main_head():
    main, mtp = make()
    hs = main.run(main.new_state(8), [5, 6])[-1:]
    base, _ = mtp.forward(hs, [7], 1, mtp.new_state())
    bumped = hs.clone()
    bumped[0, 3] += 1.0
    assert (mtp.forward(bumped, [7], 1, mtp.new_state())[0] - base).abs().max() > 1e-3
    main.weights.get("output.weight", torch.float64).mul_(2.0)
    doubled, _ = mtp.forward(hs, [7], 1, mtp.new_state())
    assert torch.allclose(doubled, 2 * base, atol=1e-12)
