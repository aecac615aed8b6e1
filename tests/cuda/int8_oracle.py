"""The reference MoE with the production rounding points of the routed experts (kernels/moe.py).

`int8_expert_moe` is model/moe.py's `moe` except that each routed expert multiplies the
int8-rounded activations the kernels use (per 32 inputs, scale amax/127; `moe.quantize_act_ref`)
for both its gate/up input and its down input. The shared expert stays unquantised (it goes
through the fp32 mat-vec). `int8_reference()` patches it into model/reference.py for a `with`.

`ROUTE_GAPS` records, for every score-routed layer the oracle runs on one token, the gap
between the K-th and (K+1)-th biased router score (the margin of its top-K choice); the GPU
tests read the smallest gap of a step to tell a routing near-tie from a real error.
"""

import contextlib

import torch

from dwarfstar.kernels.moe import _dequantized_act
from dwarfstar.model import moe as ref_moe
from dwarfstar.model import reference


ROUTE_GAPS: list[float] = []


def _record_route_gap(x, lw, config, dtype) -> None:
    if lw.is_hash or x.shape[0] != 1:
        return
    scores = torch.sqrt(torch.nn.functional.softplus(x @ lw.get("gate", dtype).T))[0]
    if lw.has("gate_bias"):
        scores = scores + lw.get("gate_bias", dtype)
    top = torch.topk(scores.double(), config.n_activated_experts + 1).values
    ROUTE_GAPS.append((top[-2] - top[-1]).item())


def int8_expert_moe(x, tokens, lw, config, dtype):
    _record_route_gap(x, lw, config, dtype)
    sel, w = ref_moe.route(x, tokens, lw, config, dtype)
    out = torch.zeros_like(x)
    xq = _dequantized_act(x).to(x.dtype)
    for e in torch.unique(sel).tolist():
        rows, slot = torch.nonzero(sel == e, as_tuple=True)
        h = xq[rows]
        mid = ref_moe.swiglu(h @ lw.expert("w1", e, dtype).T, h @ lw.expert("w3", e, dtype).T, lw.swiglu_limit)
        mid = _dequantized_act(w[rows, slot, None] * mid).to(x.dtype)
        out.index_add_(0, rows, mid @ lw.expert("w2", e, dtype).T)
    shared = ref_moe.swiglu(x @ lw.get("shared_w1", dtype).T, x @ lw.get("shared_w3", dtype).T, lw.swiglu_limit)
    return out + shared @ lw.get("shared_w2", dtype).T


@contextlib.contextmanager
def int8_reference():
    saved = reference.moe
    reference.moe = int8_expert_moe
    try:
        yield
    finally:
        reference.moe = saved
