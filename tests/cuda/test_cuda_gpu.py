"""CUDA backend on the GPU vs the reference, on a generated full-width 4-layer Flash GGUF.

Oracle: model/reference.py run on the same GPU (torch default device = cuda) over the engine's
weights through model/planar_weights.py (`dequantize_planar` per use, bit-exact with gguf's),
with the routed experts' inputs rounded to int8 as the decode kernels (kernels/moe.py) and
the prefill (forward.int8_round) round them: `int8_oracle.int8_reference()`. The distance
to the plain reference (the int8 rounding itself) is measured and guarded separately.
Layers 0..3 have ratios 0, 0, 4, 128 and hash routing on 0..2 (the Flash schedule).

Production (TRITON_INT8_OPS) rounds every Q8_0 product's input to int8 as well: its tests
(`test_int8_ops_*`) compare with that oracle evaluated in float64, with the float32 oracle's
distance as the floor. The tests against the experts-only oracle and its 0.04 bounds run the
fp32-mat-vec set TRITON_OPS, which shares every other kernel with production.
"""

import contextlib
import dataclasses
import math

import pytest
import torch

from dwarfstar.engine.engine import Engine, EngineOptions
from dwarfstar.gguf.synth import synthesize
from dwarfstar.model.forward import TRITON_INT8_OPS, TRITON_OPS
from dwarfstar.model.planar_weights import planar_weights
from dwarfstar.model.reference import ReferenceModel
import int8_oracle
from int8_oracle import int8_reference

pytestmark = pytest.mark.gpu
N_PROMPT, N_GREEDY = 300, 32


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = synthesize(tmp_path_factory.mktemp("flash4") / "flash4.gguf", preset="flash", layers=4)
    return Engine.load(path, EngineOptions(backend="cuda", ctx=4096 + 512, prefill_chunk=512))


@pytest.fixture(scope="module")
def reference(engine):
    return ReferenceModel(planar_weights(engine.config, engine.model.t))


def _prompt(n, seed=0):
    return torch.randint(0, 129280, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ref_logits(reference, state, tokens, int8=True, dense=False, every=False):
    """The oracle's last logits (every: all of them); dense: the int8 rounding of every Q8_0
    input too (TRITON_INT8_OPS)."""
    torch.set_default_device("cuda")
    try:
        with int8_reference(reference, dense) if int8 else contextlib.nullcontext():
            logits = reference.forward(state, tokens, all_logits=every)
            return logits if every else logits[-1]
    finally:
        torch.set_default_device(None)


def _new_ref_state(reference, ctx):
    torch.set_default_device("cuda")
    try:
        return reference.new_state(ctx)
    finally:
        torch.set_default_device(None)


def test_greedy_and_top20_match_reference(engine, reference, tol, logprob_error):
    """TRITON_OPS against the experts-only int8 oracle."""
    with _fp32_ops(engine):
        _check_greedy(engine, reference, tol, logprob_error)


@contextlib.contextmanager
def _ops(engine, ops):
    """engine.model.ops = ops for a `with`."""
    production = engine.model.ops
    engine.model.ops = ops
    try:
        yield
    finally:
        engine.model.ops = production


def _int8_ops(engine):
    """Production, TRITON_INT8_OPS (int8 activations for every Q8_0 product), for a `with`."""
    return _ops(engine, TRITON_INT8_OPS)


def _fp32_ops(engine):
    """TRITON_OPS (fp32 mat-vecs; int8 inputs for the routed experts only) for a `with`."""
    return _ops(engine, TRITON_OPS)


@pytest.fixture(scope="module")
def reference64(reference):
    """The same model evaluated in float64 (weights shared with `reference`)."""
    return ReferenceModel(reference.weights, dtype=torch.float64)


def test_int8_ops_greedy_and_top20_match_reference(engine, reference, reference64, tol, logprob_error):
    """Production's numerics, TRITON_INT8_OPS (int8 activations for every Q8_0 product).

    With ~10^5 int8 rounding points per token, an fp32-order difference flips some codes at
    every step, so the function itself is only defined to what an fp32 evaluation of it
    reaches. Anchor: the int8 oracle in float64. Floor: the same oracle in float32 against it
    (torch's order). The GPU (its own fp32 order) must stay as close to the anchor as the
    float32 oracle does, within int8_floor_ratio, on the mean over prompt + 32 greedy steps."""
    with _int8_ops(engine):
        session = engine.new_session()
        s32 = _new_ref_state(reference, engine.options.ctx)
        s64 = _new_ref_state(reference64, engine.options.ctx)
        tokens = _prompt(N_PROMPT)
        session.sync(tokens)
        gpu_err, fp32_err, mismatches = [], [], []
        for step in range(N_GREEDY + 1):
            r32 = _ref_logits(reference, s32, tokens, dense=True)
            r64 = _ref_logits(reference64, s64, tokens, dense=True)
            got = session.logits()
            gpu_err.append(logprob_error(r64, got))
            fp32_err.append(logprob_error(r64, r32))
            token = int(got.argmax())
            top2 = torch.topk(r64, 2).values
            if token != int(r64.argmax()):
                mismatches.append((step, round((top2[0] - top2[1]).item(), 4)))
            if step < N_GREEDY:
                session.eval(token)
                tokens = [token]
    # A greedy choice that differs where the anchor's top-2 gap exceeds the float32 oracle's
    # largest distance is not a near-tie.
    flips = [m for m in mismatches if m[1] > max(fp32_err)]
    ratio = int8_oracle.floor_ratio(gpu_err, fp32_err)
    print(f"int8 ops vs float64 int8 oracle: GPU mean {sum(gpu_err) / len(gpu_err):.3g} max {max(gpu_err):.3g}; "
          f"float32 oracle mean {sum(fp32_err) / len(fp32_err):.3g} max {max(fp32_err):.3g}; ratio {ratio:.3g}; "
          f"greedy flips beyond the float32 spread {flips}\nGPU {[round(e, 4) for e in gpu_err]}\n"
          f"f32 {[round(e, 4) for e in fp32_err]}")
    assert ratio <= tol("int8_floor_ratio"), (gpu_err, fp32_err)
    assert len(flips) <= tol("discrete_flips"), flips
    assert max(gpu_err) <= tol("int8_experts_vs_plain"), gpu_err


def test_int8_ops_prefill_matches_decode(engine, reference, reference64, tol, logprob_error):
    """Chunked prefill and token-by-token decode under TRITON_INT8_OPS, both against the
    float64 int8 oracle over a prompt's last 32 positions, with the float32 oracle as floor
    (see the greedy gate above); and chunk vs decode at the prompt's end."""
    prompt, last = _prompt(160, seed=3), 32
    with _int8_ops(engine):
        r32 = _ref_logits(reference, _new_ref_state(reference, engine.options.ctx), prompt, dense=True, every=True)
        r64 = _ref_logits(reference64, _new_ref_state(reference64, engine.options.ctx), prompt, dense=True, every=True)
        stepped = engine.new_session()
        stepped.sync(prompt[:1])
        step_logits = []
        for t in prompt[1:]:
            stepped.eval(t)
            step_logits.append(stepped.logits().clone())
        fp32_err = [logprob_error(r64[i], r32[i]) for i in range(-last, 0)]
        gpu_err = [logprob_error(r64[i], step_logits[i]) for i in range(-last, 0)]
        ratio = int8_oracle.floor_ratio(gpu_err, fp32_err)
        print(f"decode vs float64 oracle over the last {last}: mean {sum(gpu_err) / last:.3g}; "
              f"float32 oracle {sum(fp32_err) / last:.3g}; ratio {ratio:.3g}")
        assert ratio <= tol("int8_floor_ratio"), (gpu_err, fp32_err)
        for chunk in (37, 512):
            s = engine.new_session()
            s.prefill_chunk = chunk
            s.sync(prompt)
            vs_decode, vs_anchor = logprob_error(stepped.logits(), s.logits()), logprob_error(r64[-1], s.logits())
            print(f"int8 prefill chunk {chunk}: vs decode {vs_decode:.3g}, vs float64 oracle {vs_anchor:.3g}")
            assert vs_anchor <= max(gpu_err + fp32_err) * tol("int8_floor_ratio"), (vs_anchor, gpu_err, fp32_err)


@pytest.mark.parametrize("part", [
    "compress",
    "index",
    # "route" put 4 steps over the bound on the H200 before the kernel's rework (2026-11-23); the
    # same steps (6, 8, ...) go over with other parts, at routing near-ties (see _check_greedy).
    "route",
])
def test_fused_part_matches_reference(engine, reference, tol, logprob_error, part):
    """Each fused decode kernel group of Ops.fused on its own (on TRITON_OPS)."""
    with _ops(engine, dataclasses.replace(TRITON_OPS, fused=frozenset({part}))):
        _check_greedy(engine, reference, tol, logprob_error)


def _check_greedy(engine, reference, tol, logprob_error):
    bound = tol("int8_official")
    ref_state = _new_ref_state(reference, engine.options.ctx)
    plain_state = _new_ref_state(reference, engine.options.ctx)
    session = engine.new_session()
    prompt = _prompt(N_PROMPT)
    session.sync(prompt)
    ref = _ref_logits(reference, ref_state, prompt)
    plain = _ref_logits(reference, plain_state, prompt, int8=False)
    errors = [logprob_error(ref, session.logits())]
    plain_errors = [logprob_error(plain, session.logits())]
    greedy_flips = []
    gaps = [math.inf]                   # step 0 is the prefill's last token: not recorded
    for step in range(N_GREEDY):
        got = session.logits()
        token = int(got.argmax())
        top2 = torch.topk(ref.double(), 2).values
        if token != int(ref.argmax()) and (top2[0] - top2[1]).item() > bound:
            # Not a near-tie: a discrete flip (conftest "discrete_flips"); both go on with `token`.
            greedy_flips.append((step, token, int(ref.argmax()), round((top2[0] - top2[1]).item(), 4)))
        session.eval(token)
        int8_oracle.ROUTE_GAPS.clear()
        ref = _ref_logits(reference, ref_state, [token])
        gaps.append(min(int8_oracle.ROUTE_GAPS, default=math.inf))
        plain = _ref_logits(reference, plain_state, [token], int8=False)
        errors.append(logprob_error(ref, session.logits()))
        plain_errors.append(logprob_error(plain, session.logits()))
    over = {i for i, e in enumerate(errors) if e > bound} | {step + 1 for step, *_ in greedy_flips}
    # A step whose token the reference routes with a top-6 margin under route_near_tie: the
    # two sides may pick different experts for it (a discrete flip of known cause, reported).
    tied = {i for i in over if gaps[i] < tol("route_near_tie")}
    print(f"top-20 |Δ logprob| vs int8-expert reference: max {max(errors):.3g}, "
          f"mean {sum(errors) / len(errors):.3g}; vs plain reference: max {max(plain_errors):.3g}, "
          f"mean {sum(plain_errors) / len(plain_errors):.3g}; greedy flips beyond a near-tie {greedy_flips}; "
          f"steps over {sorted(over)} (routing margins {[round(gaps[i], 5) for i in sorted(over)]}, "
          f"near-ties {sorted(tied)})")
    assert len(over - tied) <= tol("discrete_flips"), (errors, greedy_flips, gaps)
    # A systematic error would raise every step, not a few: the mean over the steps that are not
    # excused near-ties is held to the per-step bound.
    kept = [e for i, e in enumerate(errors) if i not in tied]
    assert sum(kept) / len(kept) <= bound, errors
    assert max(errors) <= tol("int8_experts_vs_plain"), errors
    assert max(plain_errors) <= tol("int8_experts_vs_plain"), plain_errors


def test_graph_replay_equals_eager(engine, tol):
    prompt = _prompt(200, seed=1)
    graph, eager = engine.new_session(), engine.new_session(use_graph=False)
    graph.sync(prompt)
    eager.sync(prompt)
    for t in _prompt(24, seed=2):
        graph.eval(t)
        eager.eval(t)
        a, b = graph.logits(), eager.logits()
        assert (a - b).abs().max().item() <= tol("graph_vs_eager") * b.abs().max().item()


def test_prefill_matches_decode(engine, tol, logprob_error):
    with _fp32_ops(engine):
        _prefill_matches_decode(engine, tol, logprob_error)


def _prefill_matches_decode(engine, tol, logprob_error):
    prompt = _prompt(160, seed=3)
    stepped = engine.new_session()
    stepped.sync(prompt[:1])
    for t in prompt[1:]:
        stepped.eval(t)
    for chunk in (37, 512):
        s = engine.new_session()
        s.prefill_chunk = chunk
        s.sync(prompt)
        err = logprob_error(stepped.logits(), s.logits())
        print(f"prefill chunk {chunk} vs decode: {err:.3g}")
        assert err <= tol("int8_official")


def test_context_past_4096_with_indexer_topk(engine, reference, tol, logprob_error):
    """4200 tokens: 1050 ratio-4 rows > top-k 512, so decode gathers indexer-selected rows.
    On TRITON_OPS: the indexer, top-k and gathered attention kernels are production's; the
    int8 Q8_0 products do not depend on the context (their gate is the tests above)."""
    with _fp32_ops(engine):
        _context_past_4096(engine, reference, tol, logprob_error)


def _context_past_4096(engine, reference, tol, logprob_error):
    prompt = _prompt(4200, seed=4)
    session = engine.new_session()
    session.sync(prompt)
    ref_state = _new_ref_state(reference, engine.options.ctx)
    for i in range(0, len(prompt), 1024):
        _ref_logits(reference, ref_state, prompt[i:i + 1024])
    errors = []
    for t in _prompt(8, seed=5):
        session.eval(t)
        ref = _ref_logits(reference, ref_state, [t])
        got = session.logits()
        assert torch.isfinite(got).all()
        errors.append(logprob_error(ref, got))
    print(f"ctx 4200 top-20 |Δ logprob|: {[round(e, 5) for e in errors]}")
    assert sum(e > tol("int8_official") for e in errors) <= tol("discrete_flips")
    assert max(errors) <= tol("int8_experts_vs_plain")
    assert session.state.n_tokens == 4208 and int(session.state.pos) == 4208
    assert not math.isnan(float(session.logits().sum()))
