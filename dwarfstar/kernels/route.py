"""Decode routing in one launch (model.md §2.6; model/moe.route).

Dims: E routed experts, K experts per token, V vocab.

Contract (graph-safe: device token, preallocated-free apart from the two small outputs):
- `route(logits, token, bias, tid2eid, k, norm_topk, route_scale) -> (ids int32 [1, K],
  wts float32 [1, K])`: logits float32 [1, E] (the gate mat-vec), token int64 [1];
  scores s = sqrt(softplus(logits)); ids = tid2eid[token] (int64 [V, K]) on hash layers
  (bias None), else the K largest s + bias in descending order, ties -> lower id (as
  rounding.stable_topk); wts = s[ids] / max(sum, ROUTE_SUM_FLOOR) (if norm_topk) * route_scale.
  About 20 torch launches in forward.route, one here.
- `route_ref`: the twin, torch ops (what forward.route computes for one token).
Scores: on CUDA libdevice's log1pf(expf(x)) below torch's threshold of 20 (x above), the
calls torch's CUDA softplus makes, so the scores should be torch's bit for bit (a GPU test
checks it); the interpreter has no libdevice and uses max(x, 0) + log1p(exp(-|x|)), log1p
by Goldberg's log(u) * t / (u - 1) (a few ulp). Selection: one int64 max per round over
rounding.stable_topk's keys (exact, ties -> lower id), in one warp. Differences from the
twin: the K-sum order of the renormalisation (and the interpreter's score ulp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.kernels.rounding import stable_topk
from dwarfstar.model.moe import ROUTE_SUM_FLOOR

# One warp: E = 256 scores are 8 per lane and every reduction of the top-k loop stays
# inside the warp (shuffles; no shared-memory scratch reused across the K rounds).
ROUTE_WARPS = 1
# Below every key of a float (the smallest is -inf's, about -2**63 + 2**55).
_NO_KEY = tl.constexpr(-(2**63 - 1))


@triton.jit
def _score(x, LIBDEVICE: tl.constexpr):
    """sqrt(softplus(x)), softplus with torch's threshold: x above 20, else log(1 + e^x)."""
    if LIBDEVICE:
        # torch's CUDA softplus is log1pf(expf(x)) of the CUDA math library: the same functions.
        sp = tl.where(x > 20.0, x, libdevice.log1p(libdevice.exp(x)))
    else:
        # The interpreter has no libdevice: max(x, 0) + log1p(e^-|x|), log1p by Goldberg.
        t = tl.exp(-tl.abs(x))
        u = 1.0 + t
        l1p = tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))
        sp = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + l1p)
    return tl.sqrt_rn(sp)


@triton.jit
def _route_kernel(x_ptr, tok_ptr, bias_ptr, tid_ptr, ids_ptr, wts_ptr, E, route_scale, floor,
                  K: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr, HASH: tl.constexpr, NORM: tl.constexpr,
                  LIBDEVICE: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    e = tl.arange(0, BLOCK)
    em = e < E
    kk = tl.arange(0, KB)
    km = kk < K
    if HASH:
        tok = tl.load(tok_ptr).to(tl.int64)
        sel = tl.load(tid_ptr + tok * K + kk, mask=km, other=0).to(tl.int32)
    else:
        s = _score(tl.load(x_ptr + e, mask=em, other=0.0), LIBDEVICE)
        v = s + tl.load(bias_ptr + e, mask=em, other=0.0)
        # rounding.stable_topk's keys: the float's bits made monotone (-0.0 -> +0.0 first), then
        # the reversed index below them, so one int64 max picks the largest value, ties -> lower id.
        bits = (v + 0.0).to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        key = tl.where(em, ordered * 4294967296 + (E - 1 - e), _NO_KEY)
        sel = tl.zeros([KB], tl.int32)
        for k in tl.static_range(K):
            best = tl.max(key, axis=0)
            idx = (E - 1 - (best - (best >> 32) * 4294967296)).to(tl.int32)     # low word
            sel = tl.where(kk == k, idx, sel)
            key = tl.where(e == idx, _NO_KEY, key)
    w = tl.where(km, _score(tl.load(x_ptr + sel, mask=km, other=0.0), LIBDEVICE), 0.0)
    if NORM:
        w = w / tl.maximum(tl.sum(w, axis=0), floor)
    tl.store(ids_ptr + kk, sel, mask=km)
    tl.store(wts_ptr + kk, w * route_scale, mask=km)


def route(logits, token, bias, tid2eid, k: int, norm_topk: bool, route_scale: float):
    e = logits.shape[-1]
    assert logits.dtype == torch.float32 and logits.is_contiguous() and logits.shape == (1, e)
    assert token.dtype == torch.int64 and token.numel() == 1
    is_hash = bias is None
    if is_hash:
        assert tid2eid.dtype == torch.int64 and tid2eid.is_contiguous() and tid2eid.shape[1] == k
    else:
        assert bias.dtype == torch.float32 and bias.is_contiguous() and bias.shape == (e,)
    ids = torch.empty(1, k, dtype=torch.int32, device=logits.device)
    wts = torch.empty(1, k, dtype=torch.float32, device=logits.device)
    grid = (1,)
    _route_kernel[grid](logits, token, logits if is_hash else bias, tid2eid if is_hash else token, ids, wts, e,
                        route_scale, ROUTE_SUM_FLOOR, K=k, KB=triton.next_power_of_2(k),
                        BLOCK=triton.next_power_of_2(e), HASH=is_hash, NORM=norm_topk,
                        LIBDEVICE=logits.is_cuda, **pdl.launch(grid), num_warps=ROUTE_WARPS)
    return ids, wts


def route_ref(logits, token, bias, tid2eid, k: int, norm_topk: bool, route_scale: float):
    scores = torch.sqrt(F.softplus(logits))
    sel = tid2eid[token] if bias is None else stable_topk(scores + bias, k)
    w = scores.gather(1, sel)
    if norm_topk:
        w = w / w.sum(-1, keepdim=True).clamp_min(ROUTE_SUM_FLOOR)
    return sel.to(torch.int32), (w * route_scale).float()
