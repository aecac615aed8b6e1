"""The production forward (model/forward.py) on a CPU with the kernels' twins, vs the reference.

A tiny synthetic model whose schedule exercises every path in a few dozen tokens: a
sliding-only layer, ratio 4 with the indexer (top-k 4 of up to 10 visible rows), ratio 8
(non-overlapping rows), window 8 so the ring wraps. Oracle: the reference backend on the
same GGUF. Graph capture itself needs a GPU (test_cuda_gpu.py); the eager decode step here is
the code that gets captured.
"""

import dataclasses

import pytest
import torch

from dwarfstar.engine.engine import Engine, EngineOptions
from dwarfstar.gguf.synth import TINY, synthesize

# With a GPU present the cuda backend loads onto it (and captures graphs, which the twins'
# host constants cannot enter): these are CPU runs; test_cuda_gpu.py is the GPU side.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU twin runs (GPU: test_cuda_gpu.py)")

CONFIG = dataclasses.replace(TINY, window_size=8, index_topk=4, compress_ratios=(0, 4, 8, 4), n_hash_layers=1)
N_PROMPT, N_DECODE = 13, 19


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cuda_cpu") / "tiny.gguf", config=CONFIG)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CONFIG.vocab_size, (N_PROMPT + N_DECODE,),
                         generator=torch.Generator().manual_seed(7)).tolist()


@pytest.mark.parametrize("numerics", ["exact", "official"])
def test_decode_matches_reference(model_path, tokens, numerics, tol, logprob_error):
    ref = Engine.load(model_path, EngineOptions(backend="reference", ctx=64, numerics=numerics)).new_session()
    cu = Engine.load(model_path, EngineOptions(backend="cuda", ctx=64, numerics=numerics)).new_session()
    assert not cu.use_graph
    ref.sync(tokens[:N_PROMPT])
    cu.sync(tokens[:N_PROMPT])
    errors = [logprob_error(ref.logits(), cu.logits())]
    for t in tokens[N_PROMPT:]:
        ref.eval(t)
        cu.eval(t)
        errors.append(logprob_error(ref.logits(), cu.logits()))
    assert cu.tokens == ref.tokens
    assert max(errors) <= tol(f"{numerics}_numerics"), errors


def test_prefill_chunks_match_decode(model_path, tokens, tol, logprob_error):
    engine = Engine.load(model_path, EngineOptions(backend="cuda", ctx=64, numerics="exact"))
    stepped = engine.new_session()
    stepped.sync(tokens[:1])
    for t in tokens[1:]:
        stepped.eval(t)
    for chunk in (5, 9, 64):
        s = engine.new_session()
        s.prefill_chunk = chunk
        s.sync(tokens)
        assert logprob_error(stepped.logits(), s.logits()) <= tol("exact_numerics"), chunk
        a, b = stepped.state.to_reference(), s.state.to_reference()
        for la, lb in zip(a.layers, b.layers):
            assert torch.allclose(la.raw, lb.raw, atol=1e-4)
            if la.comp is not None:
                assert la.comp.n == lb.comp.n
                assert torch.allclose(la.comp.live(), lb.comp.live(), atol=1e-4)
                assert torch.allclose(la.comp_frontier.kv, lb.comp_frontier.kv, atol=1e-4)


def test_snapshot_restore_and_reference_interchange(model_path, tokens):
    cuda = Engine.load(model_path, EngineOptions(backend="cuda", ctx=64))
    ref = Engine.load(model_path, EngineOptions(backend="reference", ctx=64))
    s = cuda.new_session()
    s.sync(tokens[:N_PROMPT])
    blob = s.snapshot()
    s.eval(tokens[N_PROMPT])
    after = s.logits()
    s.restore(blob)
    assert s.tokens == tokens[:N_PROMPT]
    s.eval(tokens[N_PROMPT])
    assert torch.equal(s.logits(), after)
    # The snapshot is the reference format: the reference session continues from it.
    r = ref.new_session()
    r.restore(blob)
    r.eval(tokens[N_PROMPT])
    assert (r.logits() - after).abs().max() < 1e-3


def test_int8_moe_step_matches_int8_oracle(model_path, tol):
    """forward.moe_step on the int8 twins (kernels/moe.py numerics) = the reference MoE with the
    same int8 rounding points, layer by layer (routing, weights, clamp and shared expert wiring)."""
    from int8_oracle import int8_expert_moe

    from dwarfstar.engine.cuda_engine import CudaEngine
    from dwarfstar.kernels.hc import sublayer_out
    from dwarfstar.model.forward import TWIN_INT8_OPS

    ref = Engine.load(model_path, EngineOptions(backend="reference", ctx=64))
    cu = CudaEngine.load(model_path, EngineOptions(backend="cuda", ctx=64), ops=TWIN_INT8_OPS)
    gen = torch.Generator().manual_seed(3)
    for i, layer in enumerate(cu.model.layers):
        for token in (5, 77):
            x = torch.randn(1, CONFIG.dim, generator=gen)
            tok = torch.tensor([token])
            want = int8_expert_moe(x, tok, ref.model.weights.layer(i), ref.config, torch.float32)
            got = sublayer_out(*cu.model.moe_step(x, tok, layer))   # routed (+ partials) + shared
            assert ((got - want).norm() / want.norm()).item() <= tol("moe_layer_int8"), (i, token)


@pytest.mark.parametrize("numerics,fused", [("exact", False), ("official", False), ("official", True)])
def test_triton_glue_forward_matches_reference(model_path, tokens, numerics, fused, tol, logprob_error):
    """Glue kernels (RMS norm, RoPE, HC mixes, KV rounding; fused: also compressor step, routing,
    indexer rounding and scores; interpreter), mat-vecs on twins:
    prefill + a few decode steps (ring wrap, compressor emits, negative window starts)."""
    from dwarfstar.engine.cuda_engine import CudaEngine
    from dwarfstar.model.forward import TWIN_FUSED_OPS, TWIN_GLUE_OPS

    ref = Engine.load(model_path, EngineOptions(backend="reference", ctx=64, numerics=numerics)).new_session()
    cu = CudaEngine.load(model_path, EngineOptions(backend="cuda", ctx=64, numerics=numerics),
                         ops=TWIN_FUSED_OPS if fused else TWIN_GLUE_OPS).new_session()
    ref.sync(tokens[:N_PROMPT])
    cu.sync(tokens[:N_PROMPT])
    errors = [logprob_error(ref.logits(), cu.logits())]
    for t in tokens[N_PROMPT:N_PROMPT + 6]:
        ref.eval(t)
        cu.eval(t)
        errors.append(logprob_error(ref.logits(), cu.logits()))
    assert max(errors) <= tol(f"{numerics}_numerics"), errors


def test_int8_ops_products_match_their_twins_in_the_forward(tmp_path, tol, logprob_error):
    """TRITON_INT8_OPS (int8-activation Q8_0 products: dp4a mat-vecs, the grouped out-a, chunk
    GEMMs on the codes; the int8 forms written by hc_split_norm, the q norm, the attention combine
    (with the inverse RoPE) and SwiGLU) under the interpreter vs the same forward on the twins
    (TWIN_INT8_DENSE_OPS, held to the oracle by test_planar_weights.py), prefill + decode steps.
    Every product the forward makes is checked against its twin on the same x (a stale or wrong
    int8 form would miss by far more than fp32 order), and the quantiser launches are counted.

    End to end the logits are only held loosely: fp32-order differences (the glue kernels vs
    torch) flip int8 codes, which on this tiny random model moves the top-20 by 0.02-0.05 (the
    int8 twins with the glue kernels vs without), while dropping the chunk rounding altogether
    moves it by only 0.06-0.08; the per-product checks are what discriminate here. Every Q8_0
    input width is a multiple of 256 (the Triton quantiser's super-block), as on Flash."""
    from dwarfstar.engine.cuda_engine import CudaEngine
    from dwarfstar.kernels import moe
    from dwarfstar.kernels.matvec_int8 import expert_matvec_q8_ref, matvec_q8_ref
    from dwarfstar.kernels.prefill_q8 import gemm_q8_ref
    from dwarfstar.model import forward as fw

    config = dataclasses.replace(CONFIG, q_lora_rank=256, o_lora_rank=128)
    path = synthesize(tmp_path / "tiny256.gguf", config=config)
    calls = {"matvec": 0, "grouped": 0, "gemm": 0, "quantise": 0}

    def checked(name, fn, twin):
        def run(w, *args, **kw):
            calls[name] += 1
            got = fn(w, *args, **kw)
            want = twin(w, *args).double()
            assert ((got.double() - want).norm() / want.norm()).item() <= tol("int8_vs_twin"), name
            return got
        return run

    ops = dataclasses.replace(
        fw.TRITON_INT8_OPS,
        q8_matvec=checked("matvec", fw.TRITON_INT8_OPS.q8_matvec, matvec_q8_ref),
        q8_expert_matvec=checked("grouped", fw.TRITON_INT8_OPS.q8_expert_matvec, expert_matvec_q8_ref),
        q8_gemm=checked("gemm", fw.TRITON_INT8_OPS.q8_gemm, gemm_q8_ref))
    twin = CudaEngine.load(path, EngineOptions(backend="cuda", ctx=64), ops=fw.TWIN_INT8_DENSE_OPS).new_session()
    fast = CudaEngine.load(path, EngineOptions(backend="cuda", ctx=64), ops=ops).new_session()
    toks = torch.randint(0, config.vocab_size, (11,), generator=torch.Generator().manual_seed(11)).tolist()
    twin.sync(toks[:9])
    fast.sync(toks[:9])
    errors = [logprob_error(twin.logits(), fast.logits())]
    # Chunk products per layer: q_a, kv, q_b, out-a, out-b, shared gate, up, down; then the head.
    assert calls["gemm"] == 8 * config.n_layers and calls["matvec"] == 1
    quantise = moe.quantize_act

    def counted(*a, **k):
        calls["quantise"] += 1
        return quantise(*a, **k)

    fw.quantize_act = moe.quantize_act = counted
    try:
        for t in toks[9:]:
            twin.eval(t)
            fast.eval(t)
            errors.append(logprob_error(twin.logits(), fast.logits()))
    finally:
        fw.quantize_act = moe.quantize_act = quantise
    steps = len(toks) - 9
    # Per step and layer: q_a + kv, q_b, out-b, shared gate + up, shared down (mat-vecs), out-a
    # (grouped); the quantiser for out-b and the routed down only (the two h's, q_b's, out-a's and
    # the shared down's inputs come from hc_split_norm, the q norm, the attention combine and
    # SwiGLU), plus the head's mat-vec (its input's int8 form from the output norm). The wrapped
    # q8_matvec is not production's, so q_b keeps its own norm launch here (forward.Q_NORM_IN_QB).
    assert calls["matvec"] == 1 + steps * (5 * config.n_layers + 1)
    assert calls["grouped"] == steps * config.n_layers
    assert calls["quantise"] == steps * 2 * config.n_layers, calls
    assert max(errors) <= tol("int8_flips_tiny"), errors


def _two_steps_against_triton_ops(model_path, tokens, logprob_error, monkeypatch, spies, **changes):
    """TRITON_OPS with `changes` vs TRITON_OPS on the same prompt, then two decode steps with
    `spies` ({forward.py name: wrapper of it}) installed for the steps -> top-20 errors per step."""
    from dwarfstar.engine.cuda_engine import CudaEngine
    from dwarfstar.model import forward as fw

    plain = CudaEngine.load(model_path, EngineOptions(backend="cuda", ctx=64), ops=fw.TRITON_OPS).new_session()
    ops = dataclasses.replace(fw.TRITON_OPS, **changes)
    fast = CudaEngine.load(model_path, EngineOptions(backend="cuda", ctx=64), ops=ops).new_session()
    plain.sync(tokens[:N_PROMPT])
    fast.sync(tokens[:N_PROMPT])
    for name, wrap in spies.items():
        monkeypatch.setattr(fw, name, wrap(getattr(fw, name)))
    errors = []
    for t in tokens[N_PROMPT:N_PROMPT + 2]:
        plain.eval(t)
        fast.eval(t)
        errors.append(logprob_error(plain.logits(), fast.logits()))
    return errors


def test_hc_gram_forward_matches_production(model_path, tokens, tol, logprob_error, monkeypatch):
    """Ops.hc_gram (hc_post's Gram partials give the next HC split both of its RMS norms, read
    once by several programs: kernels/hc.py hc_split_norm_gram) under the interpreter vs the
    same Triton ops without it: fp32 order only, so the official numerics bound; and the
    partials are really taken (every HC split but the first layer's attention split)."""
    calls = []

    def spy(name):
        def wrap(fn):
            def run(*a, **k):
                calls.append(name)
                return fn(*a, **k)
            return run
        return wrap

    errors = _two_steps_against_triton_ops(model_path, tokens, logprob_error, monkeypatch,
                                           {"hc_split_norm": spy("rows"), "hc_split_norm_gram": spy("gram")},
                                           hc_gram=True)
    assert max(errors) <= tol("official_numerics"), errors
    # Per step: 2 splits per layer in each session; the gram form in all but the first, as two
    # launches (h, then post + Sinkhorn on a side stream: ForwardModel.hc_pre).
    per_step = 2 * CONFIG.n_layers
    assert calls.count("gram") == 2 * 2 * (per_step - 1) and calls.count("rows") == 2 * per_step + 2, calls


def test_int8_ops_keep_fp32_matvecs_where_k_is_not_whole_super_blocks(model_path, tokens, tol, logprob_error):
    """Production (TRITON_INT8_OPS) on a tiny model whose Q8_0 input widths are not all multiples
    of 256 (the quantiser's super-block): those products keep the fp32 mat-vec, the others take
    int8, and the reference's `matvec_input` makes the same choice, so the decode step runs and
    agrees with the int8-dense twins (the loose int8 end-to-end guard, see above)."""
    from dwarfstar.engine.cuda_engine import CudaEngine
    from dwarfstar.kernels.repack import PlanarQ8_0
    from dwarfstar.model import forward as fw
    from dwarfstar.model.numerics import Numerics
    from dwarfstar.model.planar_weights import planar_weights

    fast = CudaEngine.load(model_path, EngineOptions(backend="cuda", ctx=64), ops=fw.TRITON_INT8_OPS)
    widths = {name: w.shape[-1] for name, w in fast.model.t.items() if isinstance(w, PlanarQ8_0)}
    assert {k % 256 == 0 for k in widths.values()} == {True, False}, widths     # both kinds present
    reference = planar_weights(fast.config, fast.model.t)
    numerics = dataclasses.replace(Numerics.of("official"), int8_act=True)
    for name, k in widths.items():
        assert fast.model._int8_act(fast.model.t[name]) == (k % 256 == 0), name
        x = torch.randn(2, k, generator=torch.Generator().manual_seed(k))
        assert torch.equal(reference.matvec_input(x, name, numerics), x) == (k % 256 != 0), name
    twin = CudaEngine.load(model_path, EngineOptions(backend="cuda", ctx=64), ops=fw.TWIN_INT8_DENSE_OPS)
    a, b = fast.new_session(), twin.new_session()
    a.sync(tokens[:3])
    b.sync(tokens[:3])
    a.eval(tokens[3])
    b.eval(tokens[3])
    assert logprob_error(b.logits(), a.logits()) <= tol("int8_flips_tiny")


def test_q_b_norm_fold_is_the_same_function(tmp_path, monkeypatch):
    """forward.Q_NORM_IN_QB: decode's q_b takes q_a's raw row and norms and rounds it per program
    (matvec_q8(norm=)), and the indexer's query makes its own qr on its branch. Under the
    interpreter the fold sums the squares in the glue norm's order, so the codes, and with them
    every logit of prefill and decode, are the same bit for bit as with the norm launch."""
    from dwarfstar.engine.cuda_engine import CudaEngine
    from dwarfstar.model import forward as fw

    config = dataclasses.replace(CONFIG, q_lora_rank=256, o_lora_rank=128)
    path = synthesize(tmp_path / "tiny256.gguf", config=config)
    toks = torch.randint(0, config.vocab_size, (6,), generator=torch.Generator().manual_seed(5)).tolist()
    folds = []

    def counted(w, xq, **kw):
        folds.append(kw.get("norm") is not None)
        return matvec_q8(w, xq, **kw)

    matvec_q8 = fw.matvec_q8
    monkeypatch.setattr(fw, "matvec_q8", counted)
    logits = {}
    for fold in (True, False):
        monkeypatch.setattr(fw, "Q_NORM_IN_QB", fold)
        folds.clear()
        session = CudaEngine.load(path, EngineOptions(backend="cuda", ctx=64), ops=fw.TRITON_INT8_OPS).new_session()
        session.sync(toks[:3])
        out = [session.logits().clone()]
        for t in toks[3:]:
            session.eval(t)
            out.append(session.logits().clone())
        logits[fold] = torch.stack(out)
        # Every layer's q_b folds in each decode step (all layers are ratio 0 or have the fused indexer).
        assert sum(folds) == (len(toks) - 3) * config.n_layers * fold, folds
    assert torch.equal(logits[True], logits[False])
