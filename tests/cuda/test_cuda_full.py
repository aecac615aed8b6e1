"""CUDA backend vs the reference engine on the full-size q2 Flash model (dummy weights), one GPU.

The weights exist only on the GPU: `CudaEngine.dummy` makes 80.8 GiB of random valid q2
blocks directly in the planar layouts (no GGUF bytes). The reference engine (model/reference.py
behind engine/session.py) runs on the same tensors through model/planar_weights.py: every
matrix dequantised per use by `dequantize_planar` (bit-exact with gguf's dequantisation),
routed experts one selected expert at a time, computing on the GPU in float32 with numerics
"official". Oracle: that reference with every Q8_0 product's input and the routed experts'
inputs rounded to int8 as production's kernels round them (int8_oracle.py, dense), so it differs
from the CUDA path by fp32 order only; the plain reference (no int8 rounding) is measured beside
it. Structure and tolerances follow test_cuda_gpu.py's `test_greedy_and_top20_match_reference`
(4 layers), here at 43 layers: 300-token prompt (one reference prefill), 32 greedy steps.

Memory: 80.8 GiB weights + CUDA state and workspace + the reference's temporaries (largest:
the fp32 head and embedding, 2 GiB each, per forward); needs a GPU of >= 120 GiB (H200).
Run alone: `python3 -m pytest -m gpu tests/cuda/test_cuda_full.py -x -q -s`.
"""

import contextlib
import dataclasses
import gc
import math
import time

import pytest
import torch

from dwarfstar.engine.cuda_engine import CudaEngine, flash_config, tensor_bytes
from dwarfstar.engine.engine import EngineOptions
from dwarfstar.engine.session import Session
from dwarfstar.shape import ModelConfig
from dwarfstar.model.planar_weights import on_device, planar_weights
from dwarfstar.model.reference import ReferenceModel
import int8_oracle
from int8_oracle import int8_reference

N_PROMPT, N_GREEDY = 300, 32
N_STEPS_SYNCED = 8
CTX = 512
MIN_GPU_GIB = 120


def _gpu_gib() -> float:
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_gpu_gib() < MIN_GPU_GIB, reason=f"needs a GPU with >= {MIN_GPU_GIB} GiB "
                       f"(80.8 GiB of q2 weights + reference temporaries); this one has {_gpu_gib():.0f} GiB"),
]


# Random full-size weights are chaotic at the routing near-ties: on the H200 (2026-11-23) the
# int8-expert reference and the plain reference (inputs differing by the ~0.5 % int8 rounding)
# were 1.42 nats apart on average over the 33 steps, the CUDA engine 1.38 / 1.25 from them, and
# one step from an identical state 0.15-1.2 nats — each token's smallest top-6 routing margin over
# the 40 score-routed layers was 4e-5..1.6e-3, so an fp32 summation-order difference swaps an
# expert somewhere in nearly every step. The score bias of every score-routed layer is widened to
# N(0, ROUTE_PIN_STD): the top-6 are then decided by margins of order one, and the comparison
# measures the kernels instead of the chaos. Data-dependent selection is covered by the 4-layer
# test (tests/cuda/test_cuda_gpu.py) and the route kernel tests.
ROUTE_PIN_STD = 10.0


def _pin_routing(engine) -> None:
    gen = torch.Generator(device="cuda").manual_seed(7)
    for i in range(engine.config.n_layers):
        bias = engine.model.t.get(f"blk.{i}.exp_probs_b.bias")
        if bias is not None and not engine.config.is_hash_layer(i):
            bias.copy_(torch.randn(bias.shape, generator=gen, device="cuda") * ROUTE_PIN_STD)


@pytest.fixture(scope="module")
def models():
    """(CUDA engine on full-size dummy q2 weights, the reference model on the same tensors)."""
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = CudaEngine.dummy(flash_config(), EngineOptions(backend="cuda", ctx=CTX, prefill_chunk=512), "q2")
    _pin_routing(engine)
    torch.cuda.synchronize()
    print(f"\ndummy q2 weights: {tensor_bytes(engine.model.t) / 2**30:.2f} GiB "
          f"in {time.perf_counter() - start:.1f} s")
    yield engine, ReferenceModel(planar_weights(engine.config, engine.model.t))
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def _prompt(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class ReferenceRun:
    """A reference engine session on `device`; `int8` = the CUDA engine's int8 rounding points
    (the routed experts' inputs; with `dense` every Q8_0 product's too: int8_oracle.py)."""

    def __init__(self, model, ctx, int8, device="cuda", dense=False):
        self.int8, self.device, self.model, self.dense = int8, device, model, dense
        with on_device(device):
            self.session = Session(model, ctx, prefill_chunk=ctx)

    def _run(self, fn, arg):
        rounding = int8_reference(self.model, self.dense) if self.int8 else contextlib.nullcontext()
        with on_device(self.device), rounding:
            fn(arg)
        return self.session.logits()

    def sync(self, tokens):
        return self._run(self.session.sync, tokens)

    def eval(self, token):
        return self._run(self.session.eval, token)


@dataclasses.dataclass
class Agreement:
    errors: list          # top-20 |Δ logprob| vs the int8-expert reference, after the prompt and each step
    plain_errors: list    # the same vs the plain reference
    greedy_flips: list    # (step, got, reference's argmax, reference's top-2 gap) beyond a near-tie
    over: list            # indices into errors past the bound, flips included
    reference_s: float
    gaps: list            # the oracle's smallest top-6 routing margin at each step (inf: not recorded)
    ref_gaps: list        # top-20 |Δ logprob| of the int8 oracle vs the plain reference, same tokens

    def summary(self) -> str:
        def stats(e):
            return f"max {max(e):.3g}, mean {sum(e) / len(e):.3g}"
        return (f"top-20 |Δ logprob| vs int8-expert reference: {stats(self.errors)}; vs plain reference: "
                f"{stats(self.plain_errors)}; steps past the bound: {self.over} (routing margins "
                f"{[round(self.gaps[i], 5) for i in self.over]}); greedy flips beyond a near-tie {self.greedy_flips}")


def greedy_agreement(session, oracle: ReferenceRun, plain: ReferenceRun, prompt, n_greedy, bound,
                     logprob_error) -> Agreement:
    """Prefill `prompt` into all three, then `n_greedy` steps on the CUDA session's greedy tokens."""
    session.sync(prompt)
    start = time.perf_counter()
    ref, ref_plain = oracle.sync(prompt), plain.sync(prompt)
    reference_s = time.perf_counter() - start
    errors = [logprob_error(ref, session.logits())]
    plain_errors = [logprob_error(ref_plain, session.logits())]
    ref_gaps = [logprob_error(ref, ref_plain)]       # how far the int8 rounding alone moves the reference
    greedy_flips = []
    gaps = [math.inf]
    for step in range(n_greedy):
        token = int(session.logits().argmax())
        top2 = torch.topk(ref.double(), 2).values
        gap = (top2[0] - top2[1]).item()
        if token != int(ref.argmax()) and gap > bound:
            # Not a near-tie: a discrete flip (TOLERANCES "discrete_flips_full"); both go on with `token`.
            greedy_flips.append((step, token, int(ref.argmax()), round(gap, 4)))
        session.eval(token)
        start = time.perf_counter()
        int8_oracle.ROUTE_GAPS.clear()
        ref = oracle.eval(token)
        gaps.append(min(int8_oracle.ROUTE_GAPS, default=math.inf))
        ref_plain = plain.eval(token)
        reference_s += time.perf_counter() - start
        errors.append(logprob_error(ref, session.logits()))
        plain_errors.append(logprob_error(ref_plain, session.logits()))
        ref_gaps.append(logprob_error(ref, ref_plain))
    print(f"int8-expert reference vs plain reference (same tokens): max {max(ref_gaps):.3g}, "
          f"mean {sum(ref_gaps) / len(ref_gaps):.3g}")
    over = sorted({i for i, e in enumerate(errors) if e > bound} | {step + 1 for step, *_ in greedy_flips})
    return Agreement(errors, plain_errors, greedy_flips, over, reference_s, gaps, ref_gaps)


def test_full_size_greedy_and_top20_match_reference(models, tol, logprob_error):
    engine, reference = models
    bound = tol("int8_official")
    prompt = _prompt(N_PROMPT, engine.config.vocab_size)
    oracle, plain = ReferenceRun(reference, CTX, int8=True, dense=True), ReferenceRun(reference, CTX, int8=False)
    start = time.perf_counter()
    a = greedy_agreement(engine.new_session(), oracle, plain, prompt, N_GREEDY, bound, logprob_error)
    total_s = time.perf_counter() - start
    mean, plain_mean = sum(a.errors) / len(a.errors), sum(a.plain_errors) / len(a.plain_errors)
    print(f"full-size q2, {N_PROMPT}-token prompt + {N_GREEDY} greedy steps, bound {bound}: {a.summary()}")
    print(f"per step vs int8 reference: {[round(e, 4) for e in a.errors]}")
    print(f"per step vs plain reference: {[round(e, 4) for e in a.plain_errors]}")
    print(f"CUDA {total_s - a.reference_s:.1f} s, reference (int8 + plain) {a.reference_s:.1f} s; "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    # Free-running over 300 + 32 tokens the random model amplifies every difference, so the
    # bound is relative to what the int8 rounding alone does to the reference on the same tokens
    # (TOLERANCES "full_size_vs_rounding", "full_size_max_vs_rounding"); the absolute check is the
    # one-step test below.
    scale = tol("full_size_vs_rounding")
    ref_mean = sum(a.ref_gaps) / len(a.ref_gaps)
    assert len(a.greedy_flips) <= tol("discrete_flips_full"), a.greedy_flips
    assert mean <= scale * ref_mean, (mean, ref_mean, a.errors)
    assert max(a.errors) <= tol("full_size_max_vs_rounding") * max(a.ref_gaps), (a.errors, a.ref_gaps)
    assert plain_mean <= tol("int8_experts_vs_plain"), a.plain_errors


def _widened(value):
    """A float64 copy of a reference decode state (DecodeState and its layer dataclasses)."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value.clone()
    if isinstance(value, list):
        return [_widened(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, ModelConfig):
        fields = {f.name: _widened(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if "dtype" in fields:
            fields["dtype"] = torch.float64
        return dataclasses.replace(value, **fields)
    return value


def test_full_size_one_step_from_the_reference_state(models, tol, logprob_error):
    """Each step starts from the int8 oracle's own state (copied into the CUDA session), so only
    the error of one decode step through 43 layers is measured, not its accumulation over the
    prompt and the earlier steps. Anchor: the same step of the oracle in float64 from that state
    (widened); floor: the float32 oracle's own step against it (see test_cuda_gpu.py's int8
    gate: with every Q8_0 input rounded to int8, fp32 order alone flips codes at every step)."""
    engine, reference = models
    prompt = _prompt(N_PROMPT, engine.config.vocab_size, seed=3)
    oracle = ReferenceRun(reference, CTX, int8=True, dense=True)
    wide = ReferenceRun(ReferenceModel(reference.weights, dtype=torch.float64), CTX, int8=True, dense=True)
    oracle.sync(prompt)
    session = engine.new_session()
    errors, floor, gaps = [], [], []
    token = prompt[-1]
    for step in range(N_STEPS_SYNCED):
        session.state.load_reference(oracle.session.state)
        wide.session.state = _widened(oracle.session.state)
        token = int(oracle.session.logits().argmax())
        session.eval(token)
        anchor = wide.eval(token)
        int8_oracle.ROUTE_GAPS.clear()
        ref = oracle.eval(token)
        gaps.append(min(int8_oracle.ROUTE_GAPS, default=math.inf))
        errors.append(logprob_error(anchor, session.logits()))
        floor.append(logprob_error(anchor, ref))
    ratio = int8_oracle.floor_ratio(errors, floor)
    print(f"one step from the reference state, {N_STEPS_SYNCED} steps, top-20 |Δ logprob| vs the float64 "
          f"oracle: CUDA {[round(e, 4) for e in errors]}, float32 oracle {[round(e, 4) for e in floor]}, "
          f"ratio of means {ratio:.3g} (routing margins {[round(g, 5) for g in gaps]})")
    assert all(math.isfinite(e) for e in errors)
    assert ratio <= tol("int8_floor_ratio"), (errors, floor)
