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
