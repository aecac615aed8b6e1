"""mHC mixing weights from the projected mix: pre, post and the Sinkhorn matrix in one launch.

Dims: T tokens, n HC streams (hc_mult), M = (2 + n) n mix width.

Contract: `hc_split(mix, scale, base, n, iters, eps)` with mix float32 [T, M], scale [3], base
[M] -> (pre [T, n], post [T, n], m [T, n, n]) as model/hc.py's hc_pre computes them:
pre = σ(scale0 mix[:n] + base[:n]) + eps, post = 2σ(scale1 mix[n:2n] + base[n:2n]),
m = Sinkhorn(scale2 mix[2n:] + base[2n:]) (row softmax + eps, column norm, then iters - 1
row/column rounds). The reference spends ~6 launches per Sinkhorn round (about 120 per
call, two calls per layer); here one program per token keeps the n x n matrix in registers.
The kernel's exp differs from torch's by an ulp or two, so results agree to ~1e-6 relative.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.model.hc import sinkhorn


def hc_split_ref(mix, scale, base, n: int, iters: int, eps: float):
    t = mix.shape[0]
    pre = torch.sigmoid(scale[0] * mix[:, :n] + base[:n]) + eps
    post = 2 * torch.sigmoid(scale[1] * mix[:, n:2 * n] + base[n:2 * n])
    comb = (scale[2] * mix[:, 2 * n:] + base[2 * n:]).view(t, n, n)
    return pre, post, sinkhorn(comb, iters, eps)


@triton.jit
def _hc_split_kernel(mix_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, m_ptr, eps,
                     N: tl.constexpr, M: tl.constexpr, ITERS: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, N)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    a = s0 * tl.load(mix_ptr + row * M + i) + tl.load(base_ptr + i)
    tl.store(pre_ptr + row * N + i, 1.0 / (1.0 + tl.exp(-a)) + eps)
    b = s1 * tl.load(mix_ptr + row * M + N + i) + tl.load(base_ptr + N + i)
    tl.store(post_ptr + row * N + i, 2.0 / (1.0 + tl.exp(-b)))
    ij = i[:, None] * N + i[None, :]
    c = s2 * tl.load(mix_ptr + row * M + 2 * N + ij) + tl.load(base_ptr + 2 * N + ij)
    e = tl.exp(c - tl.max(c, axis=1)[:, None])
    m = e / tl.sum(e, axis=1)[:, None] + eps
    m = m / (tl.sum(m, axis=0)[None, :] + eps)
    for _ in tl.static_range(ITERS - 1):
        m = m / (tl.sum(m, axis=1)[:, None] + eps)
        m = m / (tl.sum(m, axis=0)[None, :] + eps)
    tl.store(m_ptr + row * N * N + ij, m)


def hc_split(mix, scale, base, n: int, iters: int, eps: float):
    t, width = mix.shape
    assert width == (2 + n) * n and n & (n - 1) == 0, f"mix width {width} for n = {n} (power of two)"
    for x in (mix, scale, base):
        assert x.dtype == torch.float32 and x.is_contiguous()
    pre = torch.empty(t, n, dtype=torch.float32, device=mix.device)
    post = torch.empty(t, n, dtype=torch.float32, device=mix.device)
    m = torch.empty(t, n, n, dtype=torch.float32, device=mix.device)
    _hc_split_kernel[(t,)](mix, scale, base, pre, post, m, eps, N=n, M=width, ITERS=iters, num_warps=1)
    return pre, post, m


# ---- the stream mixes around a sublayer (one launch each) -----------------------------
# `hc_post(f, x, post, m)`: f [T, D], x [T, n, D], post [T, n], m [T, n, n] ->
# post[t, j] f[t] + sum_i m[t, i, j] x[t, i]  [T, n, D] (model/hc.py hc_post; a torch
# broadcast + einsum is 4-5 launches). `hc_weighted_sum(x, pre)` -> sum_i pre[t, i] x[t, i]
# [T, D] (2 launches in torch). Both differ from their twins by fp32 summation order only.

def hc_post_ref(f, x, post, m):
    return post[:, :, None] * f[:, None, :] + torch.einsum("tij,tid->tjd", m, x)


def hc_weighted_sum_ref(x, pre):
    return (pre[:, :, None] * x).sum(1)


@triton.jit
def _hc_post_kernel(f_ptr, x_ptr, post_ptr, m_ptr, y_ptr, D, N: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    i = tl.arange(0, N)
    x = tl.load(x_ptr + (t * N + i[:, None]) * D + offs[None, :], mask=mask[None, :], other=0.0)   # [n(i), BD]
    m_t = tl.load(m_ptr + t * N * N + i[None, :] * N + i[:, None])                                  # [n(j), n(i)]
    mixed = tl.sum(m_t[:, :, None] * x[None, :, :], axis=1)                                         # [n(j), BD]
    f = tl.load(f_ptr + t * D + offs, mask=mask, other=0.0)
    post = tl.load(post_ptr + t * N + i)
    y = post[:, None] * f[None, :] + mixed
    tl.store(y_ptr + (t * N + i[:, None]) * D + offs[None, :], y, mask=mask[None, :])


@triton.jit
def _hc_weighted_sum_kernel(x_ptr, pre_ptr, y_ptr, D, N: tl.constexpr, BLOCK_D: tl.constexpr):
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


def hc_post(f, x, post, m):
    f = f.contiguous()
    t, n = _check_streams(x, f, post, m)
    d = x.shape[2]
    y = torch.empty_like(x)
    _hc_post_kernel[(t, triton.cdiv(d, HC_BLOCK_D))](f, x, post, m, y, d, N=n, BLOCK_D=HC_BLOCK_D, num_warps=4)
    return y


def hc_weighted_sum(x, pre):
    t, n = _check_streams(x, pre)
    d = x.shape[2]
    y = torch.empty(t, d, dtype=x.dtype, device=x.device)
    _hc_weighted_sum_kernel[(t, triton.cdiv(d, HC_BLOCK_D))](x, pre, y, d, N=n, BLOCK_D=HC_BLOCK_D, num_warps=4)
    return y
