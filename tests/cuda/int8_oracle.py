"""The reference model with the CUDA engine's int8 rounding points (kernels/moe.py, matvec_int8.py).

`int8_expert_moe` is model/moe.py's `moe` except that each routed expert multiplies the
int8-rounded activations the kernels use (per 32 inputs, scale amax/127; `numerics.int8_round`)
for both its gate/up input and its down input. `int8_reference(model)` patches it into
model/reference.py for a `with`: the numerics of TRITON_OPS. With `dense=True` (production,
TRITON_INT8_OPS) every Q8_0 product's input is rounded too: the shared expert's here
(`LayerWeights.matvec_input`), attention's projections and the head through the model's
`Numerics.int8_act`.

`floor_ratio` is the GPU tests' measure for production's numerics (every Q8_0 input in int8):
the GPU's distance to this oracle in float64 relative to the float32 oracle's.

`ROUTE_GAPS` records, for every score-routed layer the oracle runs on one token, the gap
between the K-th and (K+1)-th biased router score (the margin of its top-K choice); the GPU
tests read the smallest gap of a step to tell a routing near-tie from a real error.
"""

import contextlib
import dataclasses

import torch

from dwarfstar.kernels.moe import _dequantized_act
from dwarfstar.model import moe as ref_moe
from dwarfstar.model import reference
from dwarfstar.model.numerics import Numerics

INT8 = dataclasses.replace(Numerics.of("official"), int8_act=True)
_DENSE = [False]        # set by int8_reference(dense=...) for int8_expert_moe's shared expert


ROUTE_GAPS: list[float] = []


def floor_ratio(errors: list[float], floor: list[float]) -> float:
    """Mean distance of the GPU to the float64 oracle over the float32 oracle's mean distance to
    it (TOLERANCES "int8_floor_ratio")."""
    return (sum(errors) / len(errors)) / max(sum(floor) / len(floor), 1e-12)


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
    numerics = INT8 if _DENSE[0] else Numerics.of("official")
    xs = lw.matvec_input(x, "shared_w1", numerics)
    shared = ref_moe.swiglu(xs @ lw.get("shared_w1", dtype).T, xs @ lw.get("shared_w3", dtype).T, lw.swiglu_limit)
    return out + lw.matvec_input(shared, "shared_w2", numerics) @ lw.get("shared_w2", dtype).T


@contextlib.contextmanager
def int8_reference(model, dense: bool = False):
    """model: the ReferenceModel whose forward runs inside the `with`."""
    saved, saved_numerics = reference.moe, model.numerics
    reference.moe = int8_expert_moe
    model.numerics = dataclasses.replace(saved_numerics, int8_act=dense)
    _DENSE[0] = dense
    try:
        yield
    finally:
        reference.moe = saved
        model.numerics = saved_numerics
        _DENSE[0] = False
