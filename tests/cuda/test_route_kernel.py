"""kernels/route.py (Triton; the CPU interpreter without a GPU) vs its torch twin and the
reference model's routing (model/moe.route), at tiny and at Flash shapes."""

import pytest
import torch

from dwarfstar.kernels.route import route, route_ref
from dwarfstar.model import moe
from dwarfstar.shape import FLASH

DEV = "cuda" if torch.cuda.is_available() else "cpu"
E, K, V = FLASH.n_routed_experts, FLASH.n_activated_experts, FLASH.vocab_size     # 256, 6, 129280


def _close(wts, want):
    # softplus/sqrt to a few ulp and the K-sum order: relative 1e-6.
    return ((wts - want).abs() <= 1e-6 * want.abs() + 1e-30).all()


@pytest.mark.parametrize("e,k,is_hash,norm", [(256, 6, False, True), (8, 2, False, False), (16, 6, True, True)])
def test_route_matches_twin(e, k, is_hash, norm):
    g = torch.Generator(device=DEV).manual_seed(e + k)
    bias = None if is_hash else torch.randn(e, generator=g, device=DEV) * 0.1
    tid2eid = torch.stack([torch.randperm(e, generator=g, device=DEV)[:k] for _ in range(10)])
    for trial in range(4):
        # Logits across softplus's regimes: very negative (log1p branch), around 0, above 20.
        logits = torch.randn(1, e, generator=g, device=DEV) * (3, 10, 30, 1)[trial]
        if not is_hash and trial == 3:
            bias = torch.zeros(e, device=DEV)
            logits[0, 1::2] = logits[0, 0::2]          # equal scores: ties -> lower id
        token = torch.tensor([trial], device=DEV)
        ids, wts = route(logits, token, bias, tid2eid, k, norm, 1.5)
        ids_t, wts_t = route_ref(logits, token, bias, tid2eid, k, norm, 1.5)
        # Random logits leave no near-ties other than the exact ones made above: same ids, same order.
        assert torch.equal(ids, ids_t), trial
        assert _close(wts, wts_t), trial


class _Router:
    """One layer as model/moe.route reads it; the gate is the identity, so x = the logits."""

    def __init__(self, bias, tid2eid):
        self.is_hash, self.bias, self.tid2eid = bias is None, bias, tid2eid
        self.gate = torch.eye(E, device=DEV)

    def has(self, field):
        return field == "gate_bias" and self.bias is not None

    def get(self, field, dtype):
        return (self.gate if field == "gate" else self.bias).to(dtype)

    def ints(self, field):
        return self.tid2eid


def _flash_draws(g, n):
    """(logits [1, E], bias [E]) at Flash's E: realistic scales, past softplus's threshold of 20,
    all-underflowing scores (chosen by bias alone, with +-0.0 biases), exact ties."""
    for d in range(n):
        logits = torch.randn(1, E, generator=g, device=DEV) * (1.0, 3.0, 8.0)[d % 3]
        bias = torch.randn(E, generator=g, device=DEV) * 0.05
        if d % 4 == 1:
            logits[0, :8] = torch.tensor([25.0, 21.0, 20.0, 19.5, 50.0, 20.5, 40.0, 22.0])
        if d % 4 == 2:
            logits.fill_(-120.0)                                   # every score exactly 0
            bias[:4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
            bias[4:] = -bias[4:].abs() - 1e-3
        if d % 4 == 3:
            logits[0, 1::2] = logits[0, 0::2]
            bias[1::2] = bias[0::2]                                # pairwise equal: ties -> lower id
        yield logits, bias


def _check_flash(n_draws, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    tid2eid = torch.randint(0, E, (V, K), generator=g, device=DEV)
    config = FLASH
    tokens = [0, 1, 2**15, 2**16 + 3, V - 1] + torch.randint(0, V, (n_draws,), generator=g, device=DEV).tolist()
    for d, (logits, bias) in enumerate(_flash_draws(g, n_draws)):
        token = torch.tensor([tokens[d % len(tokens)]], device=DEV)
        for layer_bias in (bias, None):                            # biased top-k, hash
            ids, wts = route(logits, token, layer_bias, tid2eid, K, config.norm_topk_prob, config.route_scale)
            ids_t, wts_t = route_ref(logits, token, layer_bias, tid2eid, K, config.norm_topk_prob,
                                     config.route_scale)
            sel, w = moe.route(logits, token, _Router(layer_bias, tid2eid), config, torch.float32)
            assert torch.equal(ids, ids_t) and torch.equal(ids.long(), sel), (d, layer_bias is None)
            assert ids.dtype == torch.int32 and wts.dtype == torch.float32 and wts.shape == (1, K)
            assert _close(wts, wts_t) and _close(wts, w), (d, layer_bias is None)


def test_route_flash_shapes_match_reference_routing():
    """E = 256, K = 6, the full [129280, 6] hash table with large token ids."""
    _check_flash(8, 0)


@pytest.mark.gpu
def test_route_flash_shapes_match_reference_routing_gpu():
    _check_flash(400, 1)


@pytest.mark.gpu
def test_route_scores_are_torch_softplus_bits():
    """On CUDA the kernel's sqrt-softplus is libdevice's log1pf(expf(x)), the functions torch's
    softplus calls: every score bit-equal, so no near-tie can select differently. A hash table
    that walks all E experts returns raw scores with norm_topk off and route_scale 1."""
    g = torch.Generator(device=DEV).manual_seed(2)
    table = torch.arange(E + K, device=DEV)[: (E + K - 1) // K * K].remainder(E).view(-1, K)
    for scale in (0.5, 1.0, 3.0, 10.0):
        logits = torch.randn(1, E, generator=g, device=DEV) * scale
        want = torch.sqrt(torch.nn.functional.softplus(logits))[0]
        for t in range(table.shape[0]):
            ids, wts = route(logits, torch.tensor([t], device=DEV), None, table, K, False, 1.0)
            assert torch.equal(wts[0], want[ids[0].long()]), (scale, t)


@pytest.mark.gpu
def test_route_in_cuda_graph_follows_device_token():
    """Captured once (as the decode step is), replayed with new logits and token ids."""
    g = torch.Generator(device=DEV).manual_seed(3)
    tid2eid = torch.randint(0, E, (V, K), generator=g, device=DEV)
    bias = torch.randn(E, generator=g, device=DEV) * 0.05
    logits = torch.zeros(1, E, device=DEV)
    token = torch.zeros(1, dtype=torch.int64, device=DEV)
    route(logits, token, bias, tid2eid, K, True, FLASH.route_scale)           # compile outside capture
    route(logits, token, None, tid2eid, K, True, FLASH.route_scale)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_b = route(logits, token, bias, tid2eid, K, True, FLASH.route_scale)
        out_h = route(logits, token, None, tid2eid, K, True, FLASH.route_scale)
    for step in range(50):
        logits.copy_(torch.randn(1, E, generator=g, device=DEV))
        token.fill_(int(torch.randint(0, V, (1,), generator=g, device=DEV)))
        graph.replay()
        for (ids, wts), b in ((out_b, bias), (out_h, None)):
            ids_t, wts_t = route_ref(logits, token, b, tid2eid, K, True, FLASH.route_scale)
            assert torch.equal(ids, ids_t) and _close(wts, wts_t), (step, b is None)


@pytest.mark.gpu
def test_route_kernel_equals_torch_route_in_decode_graph():
    """In the model's captured decode step (4-layer Flash, dummy weights): the kernel next to
    forward.route in every layer, on the same gate logits; device counters of disagreements
    (ids, or weights past 1e-6 relative) are read after the replays. If this passes while
    test_cuda_gpu's route part fails, the cause lies outside the routing outputs."""
    from dwarfstar.engine.cuda_engine import CudaEngine, flash_config
    from dwarfstar.engine.engine import EngineOptions
    from dwarfstar.kernels.rounding import stable_topk

    engine = CudaEngine.dummy(flash_config(4), EngineOptions(backend="cuda", ctx=512))
    model, c = engine.model, engine.config
    count = torch.zeros(3, dtype=torch.int64, device=DEV)               # calls, id and weight disagreements
    step = model.moe_step

    def moe_step(x, tokens, layer):
        w = layer.w
        logits = model.proj(w["gate"], x)
        ids, wts = route(logits, tokens, None if layer.is_hash else w["gate_bias"], w.get("tid2eid"),
                         c.n_activated_experts, c.norm_topk_prob, c.route_scale)
        sel, wts_t = model.route(x, tokens, layer, stable_topk)
        count.add_(torch.stack([torch.ones((), dtype=torch.int64, device=DEV), (ids != sel).any().long(),
                                ((wts - wts_t).abs() > 1e-6 * wts_t.abs()).any().long()]))
        return step(x, tokens, layer)

    model.moe_step = moe_step
    try:
        session = engine.new_session()
        session.sync(torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(0)).tolist())
        for _ in range(32):
            session.eval(int(session.logits().argmax()))
    finally:
        del model.moe_step
    calls, bad_ids, bad_wts = count.tolist()
    assert calls == c.n_layers * (1 + 32)           # the capture's warm-up step, then 32 replays
    assert bad_ids == 0 and bad_wts == 0, (bad_ids, bad_wts)
