"""mHC mixing weights from the projected mix: pre, post and the Sinkhorn matrix in one launch.

Dims: T tokens, n HC streams (hc_mult), M = (2 + n) n mix width, S split-K partials,
K = n D the HC row width.

Contract: `hc_split(mix, scale, base, n, iters, eps, x=None, norm_eps=0.0)` with mix float32
[T, M] or [S, T, M] (partial sums of a split-K mat-vec, summed here), scale [3], base [M] ->
(pre [T, n], post [T, n], m [T, n, n]) as model/hc.py's hc_pre computes them:
pre = σ(scale0 mix[:n] + base[:n]) + eps, post = 2σ(scale1 mix[n:2n] + base[n:2n]),
m = Sinkhorn(scale2 mix[2n:] + base[2n:]) (row softmax + eps, column norm, then iters - 1
row/column rounds). The reference spends ~6 launches per Sinkhorn round (about 120 per
call, two calls per layer); here one program per token keeps the n x n matrix in registers.
With x (float32 [T, K], the raw HC rows) the mix is the projection of the RAW rows and the
HC RMS norm is folded in here: fn . (x rsqrt(mean(x^2) + norm_eps)) = (fn . x) rsqrt(...),
so mix is scaled per row by rsqrt(mean(x^2) + norm_eps) (as numerics.rms_norm) before use;
this saves the separate 16384-wide norm launch before each HC mat-vec.
`hc_split_norm(mix, scale, base, n, iters, eps, x, norm_eps, weight)` -> (h, post, m): the
same split, then h = rms_norm(sum_i pre_i x_i, weight) in the same program (the sublayer's
input; ds4 fuses these too).
`hc_head_split(mix, scale, base, eps, x=None, norm_eps=0.0)`: the output head's weights,
mix [T, n] (or [S, T, n]) -> σ(scale0 mix' + base) + eps [T, n], mix' normed as above.
The kernel's exp differs from torch's by an ulp or two, so results agree to ~1e-6 relative.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.kernels.glue import row_rsqrt
from dwarfstar.kernels.moe import act_buffers, store_int8_act
from dwarfstar.kernels import pdl
from dwarfstar.kernels.pdl import wait_for_inputs
from dwarfstar.kernels.repack import PlanarF16
from dwarfstar.model.hc import sinkhorn
from dwarfstar.model.numerics import rms_norm
from dwarfstar.shape import QK_K

NORM_BLOCK = 1024


def _mix_ref(mix, x, norm_eps):
    """Sum split-K partials, then the folded RMS norm of the raw rows x."""
    if mix.dim() == 3:
        mix = mix.sum(0)
    if x is not None:
        mix = mix * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)
    return mix


def hc_split_ref(mix, scale, base, n: int, iters: int, eps: float, x=None, norm_eps: float = 0.0):
    mix = _mix_ref(mix, x, norm_eps)
    t = mix.shape[0]
    pre = torch.sigmoid(scale[0] * mix[:, :n] + base[:n]) + eps
    post = 2 * torch.sigmoid(scale[1] * mix[:, n:2 * n] + base[n:2 * n])
    comb = (scale[2] * mix[:, 2 * n:] + base[2 * n:]).view(t, n, n)
    return pre, post, sinkhorn(comb, iters, eps)


def hc_head_split_ref(mix, scale, base, eps: float, x=None, norm_eps: float = 0.0):
    return torch.sigmoid(scale[0] * _mix_ref(mix, x, norm_eps) + base) + eps


@triton.jit
def _row_scale(x_ptr, row, norm_eps, K, ss_ptr, HAS_X: tl.constexpr, BLOCK: tl.constexpr, NSS: tl.constexpr):
    """rsqrt(mean(x[row]^2) + norm_eps) as glue._rms_norm_kernel computes it (1.0 without x);
    with NSS > 0 from the NSS partial sums of squares hc_post wrote (`ss`), not from x."""
    if NSS > 0:
        j = tl.arange(0, NSS)
        ss = tl.load(ss_ptr + row.to(tl.int64) * NSS + j)
        r = 1.0 / tl.sqrt_rn(tl.sum(ss, axis=0) / K + norm_eps)
    elif HAS_X:
        r = row_rsqrt(x_ptr, row, norm_eps, K, BLOCK)
    else:
        r = 1.0
    return r


@triton.jit
def _load_mix(mix_ptr, row, offs, T, M: tl.constexpr, S: tl.constexpr):
    v = tl.load(mix_ptr + row * M + offs)
    for s in tl.static_range(1, S):
        v += tl.load(mix_ptr + (s * T + row) * M + offs)
    return v


@triton.jit
def _weighted_norm(x_ptr, pre, w_ptr, h_ptr, row, norm_eps, K, hw_ptr, hs_ptr, hq_ptr, N: tl.constexpr,
                   BLOCK: tl.constexpr, QUANT: tl.constexpr, USE_ASM: tl.constexpr):
    """h[row] = rms_norm(sum_i pre[i] x[row, i], w): u is written, then re-read and scaled by
    the same program (same shapes and layout, so each thread re-reads its own stores). QUANT:
    also h's int8 form (kernels/moe.py quantize_act layout) from the same registers."""
    D = K // N
    row = row.to(tl.int64)
    i = tl.arange(0, N)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        mask = offs < D
        xv = tl.load(x_ptr + row * K + i[:, None] * D + offs[None, :], mask=mask[None, :], other=0.0)
        u = tl.sum(pre[:, None] * xv, axis=0)
        tl.store(h_ptr + row * D + offs, u, mask=mask)
        acc += u * u
    r = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / D + norm_eps)
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        mask = offs < D
        u = tl.load(h_ptr + row * D + offs, mask=mask, other=0.0)
        y = u * r * tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(h_ptr + row * D + offs, y, mask=mask)
        if QUANT:
            # BLOCK divides D here (the launcher's check), so no lane is masked.
            store_int8_act(y, hw_ptr + row * (D // 4) + d0 // 4, hs_ptr + row * (D // 32) + d0 // 32,
                           hq_ptr + row * (D // 16) + d0 // 16, BLOCK // 32, USE_ASM)


@triton.jit
def _post_and_comb(mix_ptr, scale_ptr, base_ptr, post_ptr, m_ptr, row, r, eps, T, N: tl.constexpr,
                   M: tl.constexpr, S: tl.constexpr, ITERS: tl.constexpr):
    """post = 2σ(scale1 mix' + base) and the Sinkhorn matrix m of one row (mix' = mix r)."""
    i = tl.arange(0, N)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    b = s1 * (_load_mix(mix_ptr, row, N + i, T, M, S) * r) + tl.load(base_ptr + N + i)
    tl.store(post_ptr + row * N + i, 2.0 / (1.0 + tl.exp(-b)))
    ij = i[:, None] * N + i[None, :]
    c = s2 * (_load_mix(mix_ptr, row, 2 * N + ij, T, M, S) * r) + tl.load(base_ptr + 2 * N + ij)
    e = tl.exp(c - tl.max(c, axis=1)[:, None])
    m = e / tl.sum(e, axis=1)[:, None] + eps
    m = m / (tl.sum(m, axis=0)[None, :] + eps)
    for _ in tl.static_range(ITERS - 1):
        m = m / (tl.sum(m, axis=1)[:, None] + eps)
        m = m / (tl.sum(m, axis=0)[None, :] + eps)
    tl.store(m_ptr + row * N * N + ij, m)


@triton.jit
def _hc_split_kernel(mix_ptr, scale_ptr, base_ptr, x_ptr, pre_ptr, post_ptr, m_ptr, w_ptr, h_ptr, eps, norm_eps,
                     T, K, hw_ptr, hs_ptr, hq_ptr, ss_ptr, N: tl.constexpr, M: tl.constexpr, S: tl.constexpr,
                     ITERS: tl.constexpr, FULL: tl.constexpr, HAS_X: tl.constexpr, NORMED: tl.constexpr,
                     BLOCK: tl.constexpr, QUANT: tl.constexpr, USE_ASM: tl.constexpr, NSS: tl.constexpr,
                     PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    r = _row_scale(x_ptr, row, norm_eps, K, ss_ptr, HAS_X, BLOCK, NSS)
    i = tl.arange(0, N)
    s0 = tl.load(scale_ptr)
    a = s0 * (_load_mix(mix_ptr, row, i, T, M, S) * r) + tl.load(base_ptr + i)
    pre = 1.0 / (1.0 + tl.exp(-a)) + eps
    tl.store(pre_ptr + row * N + i, pre)
    if NORMED:
        _weighted_norm(x_ptr, pre, w_ptr, h_ptr, row, norm_eps, K, hw_ptr, hs_ptr, hq_ptr, N, BLOCK, QUANT, USE_ASM)
    if FULL:
        _post_and_comb(mix_ptr, scale_ptr, base_ptr, post_ptr, m_ptr, row, r, eps, T, N, M, S, ITERS)


def _check_width(width: int, n: int) -> None:
    assert width == (2 + n) * n and n & (n - 1) == 0, f"mix width {width} for n = {n} (power of two)"


def _check_mix(mix, x, scale, base):
    assert mix.dim() in (2, 3), "mix: [T, M] or split-K partials [S, T, M]"
    s = mix.shape[0] if mix.dim() == 3 else 1
    t, width = mix.shape[-2:]
    for a in (mix, scale, base) + ((x,) if x is not None else ()):
        assert a.dtype == torch.float32 and a.is_contiguous()
    if x is not None:
        assert x.dim() == 2 and x.shape[0] == t, "x: the raw HC rows [T, K]"
    return s, t, width


def _launch_split(mix, scale, base, n, iters, eps, x, norm_eps, full, weight=None, quantize=False, ss=None):
    s, t, width = _check_mix(mix, x, scale, base)
    if ss is not None:
        assert x is not None and ss.dtype == torch.float32 and ss.is_contiguous() and ss.dim() == 2 \
            and ss.shape[0] == t and ss.shape[1] & (ss.shape[1] - 1) == 0, "ss: hc_post's partials [T, 2^k]"
    dev = mix.device
    pre = torch.empty(t, n, dtype=torch.float32, device=dev)
    post = torch.empty(t, n, dtype=torch.float32, device=dev) if full else pre
    m = torch.empty(t, n, n, dtype=torch.float32, device=dev) if full else pre
    k = x.shape[1] if x is not None else 1
    h = pre
    if weight is not None:
        assert x is not None and weight.dtype == torch.float32 and weight.shape == (k // n,), \
            "the normed weighted sum needs the raw rows x [T, n D] and a weight [D]"
        h = torch.empty(t, k // n, dtype=torch.float32, device=dev)
    block = min(NORM_BLOCK, triton.next_power_of_2(k))
    hq = (pre, pre, pre)
    if quantize:
        d = k // n
        block = min(block, d)
        assert weight is not None and d % QK_K == 0 and d % block == 0, "quantised h: D a multiple of 256"
        hq = act_buffers(t, d, dev)
    # 4 warps when the program also reads the 16384-wide row (64 KB), 1 for the n x n math.
    grid = (t,)
    _hc_split_kernel[grid](mix, scale, base, x if x is not None else mix, pre, post, m,
                           weight if weight is not None else pre, h, eps, norm_eps, t, k, *hq,
                           ss if ss is not None else pre,
                           N=n, M=width, S=s, ITERS=iters, FULL=full, HAS_X=x is not None,
                           NORMED=weight is not None, BLOCK=block, QUANT=quantize, USE_ASM=dev.type == "cuda",
                           NSS=0 if ss is None else ss.shape[1], **pdl.launch(grid),
                           num_warps=4 if x is not None else 1)
    if quantize:
        return h, post, m, hq
    return (h if weight is not None else pre), post, m


def hc_split(mix, scale, base, n: int, iters: int, eps: float, x=None, norm_eps: float = 0.0):
    width = mix.shape[-1]
    _check_width(width, n)
    return _launch_split(mix, scale, base, n, iters, eps, x, norm_eps, True)


def hc_split_norm(mix, scale, base, n: int, iters: int, eps: float, x, norm_eps: float, weight,
                  quantize: bool = False):
    """`hc_split` with the raw rows x [T, n D], then the sublayer input in the same launch:
    h = rms_norm(sum_i pre[t, i] x[t, i], weight, norm_eps) [T, D] -> (h, post, m). Saves the
    weighted-sum and RMS-norm launches of each HC pre (two per layer side). quantize: also
    h's int8 form, `quantize_act(h)` (kernels/moe.py), as a fourth result (D % 256 == 0),
    for the int8-activation products that read h (no quantiser launch of their own)."""
    width = mix.shape[-1]
    _check_width(width, n)
    return _launch_split(mix, scale, base, n, iters, eps, x, norm_eps, True, weight, quantize)


def hc_split_norm_ref(mix, scale, base, n: int, iters: int, eps: float, x, norm_eps: float, weight):
    pre, post, m = hc_split_ref(mix, scale, base, n, iters, eps, x, norm_eps)
    u = hc_weighted_sum_ref(x.view(x.shape[0], n, -1), pre)
    return rms_norm(u, weight, norm_eps), post, m


def hc_head_split(mix, scale, base, eps: float, x=None, norm_eps: float = 0.0, ss=None):
    n = mix.shape[-1]
    assert n & (n - 1) == 0 and base.shape == (n,), f"head mix width {n}: a power of two, base [n]"
    return _launch_split(mix, scale, base, n, 1, eps, x, norm_eps, False, ss=ss)[0]


# ---- the split from hc_post's Gram partials (Ops.hc_gram, production) -----------------
# `hc_split_norm_gram(mix, scale, base, n, iters, eps, x, norm_eps, weight, gram, quantize)`:
# hc_split_norm for decode rows whose producer hc_post also wrote the Gram partials of its output
# (`hc_post(..., gram=True)`: gram [T, G, n, n], G[t, b, i, j] = sum over program b's columns of
# x_i x_j). Both norms then come from the n x n Gram matrix G of the row's streams without a pass
# over x: the HC RMS norm from trace(G) = sum(x^2), and the sublayer's from
# |u|^2 = sum_ij pre_i pre_j G_ij for u = sum_i pre_i x_i. So the row is read once, split over
# D / GRAM_SLICE programs (hc_split_norm: one program, three dependent passes over 64 KB),
# and one more program computes post and the Sinkhorn matrix. Equal to hc_split_norm up to fp32
# order (the norms' sums are associated differently).

GRAM_SLICE = 256


@triton.jit
def _hc_split_gram_kernel(mix_ptr, scale_ptr, base_ptr, x_ptr, gram_ptr, pre_ptr, post_ptr, m_ptr, w_ptr, h_ptr,
                          eps, norm_eps, T, D, hw_ptr, hs_ptr, hq_ptr, N: tl.constexpr, M: tl.constexpr,
                          S: tl.constexpr, ITERS: tl.constexpr, G: tl.constexpr, SLICE: tl.constexpr,
                          QUANT: tl.constexpr, USE_ASM: tl.constexpr, H: tl.constexpr = True,
                          COMB: tl.constexpr = True, PDL: tl.constexpr = False):
    """Program (row, part): part < D / SLICE (H) a slice of h; the next one (COMB) post and m."""
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    part = tl.program_id(1)
    row64 = row.to(tl.int64)
    i = tl.arange(0, N)
    ij = i[:, None] * N + i[None, :]
    gram = tl.load(gram_ptr + row64 * G * N * N + ij)
    for b in tl.static_range(1, G):
        gram += tl.load(gram_ptr + (row64 * G + b) * N * N + ij)
    k = N * D
    trace = tl.sum(tl.sum(tl.where(i[:, None] == i[None, :], gram, 0.0), axis=1), axis=0)
    r = 1.0 / tl.sqrt_rn(trace / k + norm_eps)
    h_parts = D // SLICE if H else 0
    if COMB and part >= h_parts:
        _post_and_comb(mix_ptr, scale_ptr, base_ptr, post_ptr, m_ptr, row, r, eps, T, N, M, S, ITERS)
    elif H:
        a = tl.load(scale_ptr) * (_load_mix(mix_ptr, row, i, T, M, S) * r) + tl.load(base_ptr + i)
        pre = 1.0 / (1.0 + tl.exp(-a)) + eps
        if part == 0:
            tl.store(pre_ptr + row * N + i, pre)
        uu = tl.sum(tl.sum(pre[:, None] * pre[None, :] * gram, axis=1), axis=0)
        ru = 1.0 / tl.sqrt_rn(uu / D + norm_eps)
        offs = part * SLICE + tl.arange(0, SLICE)
        xv = tl.load(x_ptr + row64 * k + i[:, None] * D + offs[None, :])
        y = tl.sum(pre[:, None] * xv, axis=0) * ru * tl.load(w_ptr + offs)
        tl.store(h_ptr + row64 * D + offs, y)
        if QUANT:
            store_int8_act(y, hw_ptr + row64 * (D // 4) + part * (SLICE // 4),
                           hs_ptr + row64 * (D // 32) + part * (SLICE // 32),
                           hq_ptr + row64 * (D // 16) + part * (SLICE // 16), SLICE // 32, USE_ASM)


def hc_split_norm_gram(mix, scale, base, n: int, iters: int, eps: float, x, norm_eps: float, weight, gram,
                       quantize: bool = False, parts: str = "all"):
    """(h, post, m[, h's int8 form]) as hc_split_norm, from hc_post's Gram partials (above).

    parts: "all" in one launch; "h" -> (h[, h's int8 form]) only, "comb" -> (post, m) only: the
    two halves as separate launches (decode runs the Sinkhorn one on a side stream: post and m
    are used only by the sublayer's hc_post, h at once), each equal to its share of "all"."""
    assert parts in ("all", "h", "comb"), parts
    s, t, width = _check_mix(mix, x, scale, base)
    _check_width(width, n)
    d = x.shape[1] // n
    g = gram.shape[1]
    assert gram.dtype == torch.float32 and gram.is_contiguous() and gram.shape == (t, g, n, n), \
        "gram: hc_post's partials [T, G, n, n]"
    assert weight.dtype == torch.float32 and weight.shape == (d,)
    slice_ = min(GRAM_SLICE, d)
    assert d % slice_ == 0 and slice_ % 32 == 0, f"D = {d}: a multiple of {slice_} (and of 32)"
    dev = mix.device
    with_h, with_comb = parts != "comb", parts != "h"
    pre = torch.empty(t, n, dtype=torch.float32, device=dev)
    post = torch.empty(t, n, dtype=torch.float32, device=dev) if with_comb else pre
    m = torch.empty(t, n, n, dtype=torch.float32, device=dev) if with_comb else pre
    h = torch.empty(t, d, dtype=torch.float32, device=dev) if with_h else pre
    hq = (pre, pre, pre)
    if quantize and with_h:
        assert d % QK_K == 0, "quantised h: D a multiple of 256"
        hq = act_buffers(t, d, dev)
    grid = (t, (d // slice_ if with_h else 0) + int(with_comb))
    _hc_split_gram_kernel[grid](
        mix, scale, base, x, gram, pre, post, m, weight, h, eps, norm_eps, t, d, *hq,
        N=n, M=width, S=s, ITERS=iters, G=g, SLICE=slice_, QUANT=quantize and with_h, USE_ASM=dev.type == "cuda",
        H=with_h, COMB=with_comb, **pdl.launch(grid), num_warps=2)
    if parts == "comb":
        return post, m
    out = (h, post, m) if with_comb else (h,)
    return out + (hq,) if quantize else out


# ---- the stream mixes around a sublayer (one launch each) -----------------------------
# `hc_post(f, x, post, m, f_add=None)`: f [T, D], x [T, n, D], post [T, n], m [T, n, n] ->
# post[t, j] f[t] + sum_i m[t, i, j] x[t, i]  [T, n, D] (model/hc.py hc_post; a torch
# broadcast + einsum is 4-5 launches). f may also be partial sums [T, P, D] (the routed
# experts' per-expert outputs, kernels/moe.py moe_down_parts), summed here in order p = 0..,
# and f_add [T, D] (the shared expert) added to them: no separate reduction or add launch.
# With mix_fn (the next sublayer's HC fn, PlanarF16 [M, n D]) hc_post also writes that
# sublayer's mix as split-K partials [S, T, M] over its S column blocks (`hc_post_mix_ref`), the
# layout hc_split / hc_split_norm_gram / hc_head_split sum: no separate mix mat-vec launch.
# `hc_weighted_sum(x, pre)` -> sum_i pre[t, i] x[t, i] [T, D] (2 launches in torch).
# Both differ from their twins by fp32 summation order only.

def sublayer_out(f, f_add):
    """The sublayer output hc_post mixes in: partials summed, f_add added."""
    if f.dim() == 3:
        f = f.sum(1)
    return f if f_add is None else f + f_add


def hc_post_ref(f, x, post, m, f_add=None):
    f = sublayer_out(f, f_add)
    return post[:, :, None] * f[:, None, :] + torch.einsum("tij,tid->tjd", m, x)


def hc_post_mix_ref(y, fn, block: int):
    """hc_post's mix partials [S, T, M]: partial s = fn . y over column block s of every stream
    (S = cdiv(D, block)), in y's dtype (fn converted to it)."""
    t, n, d = y.shape
    w = (fn.w if isinstance(fn, PlanarF16) else fn).to(y.dtype).view(-1, n, d)   # [M, n, D]
    return torch.stack([torch.einsum("tid,mid->tm", y[:, :, c:c + block], w[:, :, c:c + block])
                        for c in range(0, d, block)])


def hc_weighted_sum_ref(x, pre):
    return (pre[:, :, None] * x).sum(1)


@triton.jit
def _mix_fn_tile(fn_ptr, D, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BLOCK_D: tl.constexpr):
    """fn[:, i D + d] for this program's columns d, [MP, n, BLOCK_D] in fn's dtype; rows >= M and
    columns >= D read as 0, so they add nothing to the mix."""
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mm = tl.arange(0, MP)
    i = tl.arange(0, N)
    ptrs = fn_ptr + (mm[:, None, None] * N + i[None, :, None]) * D + offs[None, None, :]
    return tl.load(ptrs, mask=(mm < M)[:, None, None] & (offs < D)[None, None, :], other=0.0)


@triton.jit
def _hc_post_kernel(f_ptr, add_ptr, x_ptr, post_ptr, m_ptr, y_ptr, ss_ptr, gram_ptr, fn_ptr, mix_ptr, D,
                    N: tl.constexpr, P: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_D: tl.constexpr,
                    SUMSQ: tl.constexpr, GRAM: tl.constexpr, MIX: tl.constexpr, M: tl.constexpr,
                    MP: tl.constexpr, PDL: tl.constexpr = False):
    """MIX: fn is a weight (written at load, never by a kernel ahead in the stream), so its tile
    is read before the wait and overlaps the previous kernel's tail (kernels/pdl.py)."""
    wait_for_inputs(PDL & (not MIX))
    if MIX:
        fn_tile = _mix_fn_tile(fn_ptr, D, N, M, MP, BLOCK_D)                                       # [MP, n, BD]
    wait_for_inputs(PDL & MIX)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    i = tl.arange(0, N)
    x = tl.load(x_ptr + (t * N + i[:, None]) * D + offs[None, :], mask=mask[None, :], other=0.0)   # [n(i), BD]
    m_t = tl.load(m_ptr + t * N * N + i[None, :] * N + i[:, None])                                  # [n(j), n(i)]
    mixed = tl.sum(m_t[:, :, None] * x[None, :, :], axis=1)                                         # [n(j), BD]
    f = tl.load(f_ptr + t * P * D + offs, mask=mask, other=0.0)
    for p in tl.static_range(1, P):
        f += tl.load(f_ptr + (t * P + p) * D + offs, mask=mask, other=0.0)
    if HAS_ADD:
        f += tl.load(add_ptr + t * D + offs, mask=mask, other=0.0)
    post = tl.load(post_ptr + t * N + i)
    y = post[:, None] * f[None, :] + mixed
    tl.store(y_ptr + (t * N + i[:, None]) * D + offs[None, :], y, mask=mask[None, :])
    part = t * tl.num_programs(1) + tl.program_id(1)
    if GRAM:
        # This block's share of the n x n Gram matrix of the row's streams, sum_d y_i y_j.
        ym = tl.where(mask[None, :], y, 0.0)
        g = tl.sum(ym[:, None, :] * ym[None, :, :], axis=2)
        tl.store(gram_ptr + part * N * N + i[:, None] * N + i[None, :], g)
        if SUMSQ:
            # sum(y^2) over the block is the Gram partial's trace.
            tl.store(ss_ptr + part, tl.sum(tl.sum(tl.where(i[:, None] == i[None, :], g, 0.0), axis=1), axis=0))
    elif SUMSQ:
        # This block's share of sum(y^2) over the whole HC row (masked lanes hold 0).
        yy = tl.where(mask[None, :], y * y, 0.0)
        tl.store(ss_ptr + part, tl.sum(tl.sum(yy, axis=1), axis=0))
    if MIX:
        # Split-K partial s = program_id(1) of the next mix, stored [S, T, M] (_load_mix's layout).
        mix = tl.sum(tl.sum(fn_tile.to(tl.float32) * y[None, :, :], axis=2), axis=1)                 # [MP]
        mm = tl.arange(0, MP)
        tl.store(mix_ptr + (tl.program_id(1) * tl.num_programs(0) + t) * M + mm, mix, mask=mm < M)


@triton.jit
def _hc_weighted_sum_kernel(x_ptr, pre_ptr, y_ptr, D, N: tl.constexpr, BLOCK_D: tl.constexpr,
                            PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    i = tl.arange(0, N)
    x = tl.load(x_ptr + (t * N + i[:, None]) * D + offs[None, :], mask=mask[None, :], other=0.0)
    pre = tl.load(pre_ptr + t * N + i)
    tl.store(y_ptr + t * D + offs, tl.sum(pre[:, None] * x, axis=0), mask=mask)


def _check_streams(x, *small):
    t, n, _ = x.shape
    assert n & (n - 1) == 0, "stream count: a power of two"
    for a in (x, *small):
        assert a.dtype == torch.float32 and a.is_contiguous() and a.shape[0] == t
    return t, n


HC_BLOCK_D = 512
# With the mix (mix_fn): each program also holds fn's [M, n, block] tile, which at 512 columns
# (24 x 4 x 512 fp16) would not fit in registers; 128 columns is an MP x 4 x 128 fp16 tile (32 KB
# at M = 24 padded to 32; sm_90 at 4 warps: 128 registers, no spills) and 32 programs per row at
# D = 4096 instead of 8. D / block stays a power of two (the sumsq and Gram partial counts the
# split kernels sum).
HC_MIX_BLOCK_D = 128


def _mix_weight(mix_fn, n: int, d: int, dev):
    w = mix_fn.w if isinstance(mix_fn, PlanarF16) else mix_fn
    assert w.dtype in (torch.float16, torch.float32) and w.is_contiguous() and w.dim() == 2 \
        and w.shape[1] == n * d and w.device == dev, "mix_fn: PlanarF16 (or an fp16/fp32 tensor) [M, n D]"
    return w


def hc_post(f, x, post, m, f_add=None, sumsq: bool = False, gram: bool = False, mix_fn=None):
    """y [T, n, D] (the contract above), then, as a tuple with it, per program (column block,
    HC_BLOCK_D wide, HC_MIX_BLOCK_D with mix_fn; S = D / block of them): with sumsq, ss [T, S]
    the partial sums of y[t]^2, which hc_head_split takes (`ss=`) in place of re-reading the
    16384-wide row for its RMS norm (with gram too, each is its Gram partial's trace); with
    gram, the Gram partials [T, S, n, n] of y[t]'s streams for hc_split_norm_gram; with mix_fn
    [M, n D], the next mix's split-K partials [S, T, M] (hc_post_mix_ref), summed by the splits."""
    f = f.contiguous()
    t, n = _check_streams(x, f, post, m, *(() if f_add is None else (f_add,)))
    d = x.shape[2]
    assert f.shape[-1] == d and f.dim() in (2, 3), "f: [T, D] or partials [T, P, D]"
    y = torch.empty_like(x)
    block = HC_BLOCK_D if mix_fn is None else HC_MIX_BLOCK_D
    blocks = triton.cdiv(d, block)
    ss = g = mix = w = None
    if sumsq:
        assert blocks & (blocks - 1) == 0, "sumsq: D / block a power of two (the split kernel's arange)"
        ss = torch.empty(t, blocks, dtype=torch.float32, device=x.device)
    if gram:
        g = torch.empty(t, blocks, n, n, dtype=torch.float32, device=x.device)
    if mix_fn is not None:
        w = _mix_weight(mix_fn, n, d, x.device)
        mix = torch.empty(blocks, t, w.shape[0], dtype=torch.float32, device=x.device)
    grid = (t, blocks)
    _hc_post_kernel[grid](
        f, f if f_add is None else f_add, x, post, m, y, y if ss is None else ss, y if g is None else g,
        y if w is None else w, y if mix is None else mix, d, N=n, P=f.shape[1] if f.dim() == 3 else 1,
        HAS_ADD=f_add is not None, BLOCK_D=block, SUMSQ=sumsq, GRAM=gram, MIX=w is not None,
        M=1 if w is None else w.shape[0], MP=1 if w is None else triton.next_power_of_2(w.shape[0]),
        **pdl.launch(grid), num_warps=4)
    extras = [a for a in (ss, g, mix) if a is not None]
    return (y, *extras) if extras else y


def hc_weighted_sum(x, pre):
    t, n = _check_streams(x, pre)
    d = x.shape[2]
    y = torch.empty(t, d, dtype=x.dtype, device=x.device)
    grid = (t, triton.cdiv(d, HC_BLOCK_D))
    _hc_weighted_sum_kernel[grid](x, pre, y, d, N=n, BLOCK_D=HC_BLOCK_D, **pdl.launch(grid), num_warps=4)
    return y
