"""Engine + Session on a synthetic GGUF, end to end through the real reader, validator,
dequantisers and tokenizer.

Oracle: transformers DeepseekV4ForCausalLM built by gguf/hf_export.py from the same
file (dequantised independently with gguf-py's numpy code), float64 on both sides.
Tolerance 2e-5 on logits for the same reason as tests/model/test_reference_vs_hf.py
(transformers keeps HC and RoPE in float32).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dwarfstar.engine.engine import Engine, EngineOptions
from dwarfstar.gguf import synth

ATOL = 2e-5
# The synth tiny model with every layer type reachable in a short sequence.
CONFIG = dataclasses.replace(synth.TINY, compress_ratios=(0, 0, 4, 8), window_size=8, index_topk=2)
N_TOKENS = 27


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return synth.synthesize(tmp_path_factory.mktemp("engine") / "tiny.gguf", config=CONFIG, seed=5)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, CONFIG.vocab_size, (N_TOKENS,), generator=g).tolist()


@pytest.fixture(scope="module")
def expected(gguf_path, tokens):
    from transformers import DeepseekV4ForCausalLM

    from dwarfstar.gguf.hf_export import export

    hf_cfg, state_dict = export(gguf_path, dtype=torch.float64)
    model = DeepseekV4ForCausalLM(hf_cfg).to(torch.float64).eval()
    model.load_state_dict(state_dict, strict=True)
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]


def load(path, **kw):
    return Engine.load(path, EngineOptions(numerics="exact", dtype="float64", ctx=64, prefill_chunk=5, **kw))


def test_prefill_then_decode_matches_transformers(gguf_path, tokens, expected):
    engine = load(gguf_path)
    assert engine.config.compress_ratios == CONFIG.compress_ratios
    assert engine.tokenizer is not None
    session = engine.new_session()
    seen = []
    assert session.sync(tokens[:10], progress=lambda done, total: seen.append((done, total))) == 10
    assert seen == [(5, 10), (10, 10)]
    rows = [session.logits().double()]
    for t in tokens[10:]:
        session.eval(t)
        rows.append(session.logits().double())
    got = torch.stack(rows)
    # float32 logits() output: allow its rounding on top of ATOL.
    assert (got - expected[9:]).abs().max().item() <= ATOL + 1e-6 * expected.abs().max().item()
    assert session.tokens == tokens


def test_sync_reuses_prefix_and_resets_on_divergence(gguf_path, tokens):
    session = load(gguf_path).new_session()
    assert session.sync(tokens[:12]) == 12
    assert session.sync(tokens[:20]) == 8
    assert session.sync(tokens[:20]) == 0
    direct = load(gguf_path).new_session()
    direct.sync(tokens[:20])
    assert torch.allclose(session.logits(), direct.logits(), atol=1e-6)
    changed = tokens[:5] + [(tokens[5] + 1) % CONFIG.vocab_size] + tokens[6:9]
    assert session.sync(changed) == len(changed)
    assert session.tokens == changed
    assert session.sync(changed[:4]) == 4                 # shorter: reset and prefill


def test_session_snapshot_restore(gguf_path, tokens):
    engine = load(gguf_path)
    a = engine.new_session()
    a.sync(tokens[:13])
    blob = a.snapshot()
    b = engine.new_session(ctx=48)
    b.restore(blob)
    assert b.tokens == tokens[:13]
    for t in tokens[13:]:
        a.eval(t)
        b.eval(t)
    assert torch.equal(a.logits(), b.logits())


def test_official_numerics_run_and_differ(gguf_path, tokens):
    exact = load(gguf_path).new_session()
    official = Engine.load(gguf_path, EngineOptions(ctx=64)).new_session()
    exact.sync(tokens)
    official.sync(tokens)
    diff = (exact.logits() - official.logits()).abs().max().item()
    assert torch.isfinite(official.logits()).all()
    assert 1e-5 < diff < 1.0


def test_unknown_backend_is_refused(gguf_path):
    with pytest.raises(ValueError, match="backend"):
        Engine.load(gguf_path, EngineOptions(backend="tpu"))
