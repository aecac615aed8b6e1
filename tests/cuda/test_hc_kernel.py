"""`hc_split` (Triton; the CPU interpreter without a GPU) vs its twin `hc_split_ref`."""

import pytest
import torch

from dwarfstar.kernels.hc import hc_head_split, hc_head_split_ref, hc_split, hc_split_ref
from dwarfstar.model.numerics import rms_norm


@pytest.mark.parametrize("t", [1, 7])
def test_hc_split_matches_twin(t):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(t)
    n = 4
    mix = torch.randn(t, (2 + n) * n, generator=g, device=dev)
    scale = torch.rand(3, generator=g, device=dev) * 0.4 + 0.1
    base = torch.randn((2 + n) * n, generator=g, device=dev) * 0.1
    got = hc_split(mix, scale, base, n, 20, 1e-6)
    want = hc_split_ref(mix.double(), scale.double(), base.double(), n, 20, 1e-6)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        # fp32 exp/divide vs float64: ~1e-6 relative after 20 Sinkhorn rounds.
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize("t,splits", [(1, 1), (3, 2)])
def test_hc_split_folds_the_norm(t, splits, tol):
    """Raw-row mix (split-K partials) + x vs the unfused order of model/hc.hc_pre in float64."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(10 + t)
    n, k, norm_eps = 4, 3000, 1e-6
    fn = torch.randn((2 + n) * n, k, generator=g, device=dev) * 0.05
    x = torch.randn(t, k, generator=g, device=dev) * 3
    scale = torch.rand(3, generator=g, device=dev) * 0.4 + 0.1
    base = torch.randn((2 + n) * n, generator=g, device=dev) * 0.1
    parts = torch.stack([x[:, i::splits] @ fn[:, i::splits].T for i in range(splits)])  # [S, T, M]
    got = hc_split(parts if splits > 1 else parts[0], scale, base, n, 20, 1e-6, x=x, norm_eps=norm_eps)
    # Independent oracle: the unfused order (norm the rows, then project), float64.
    mix = rms_norm(x.double(), None, norm_eps) @ fn.double().T
    want = hc_split_ref(mix, scale.double(), base.double(), n, 20, 1e-6)
    twin = hc_split_ref(parts, scale, base, n, 20, 1e-6, x=x, norm_eps=norm_eps)
    for a, b, c in zip(got, want, twin):
        assert ((a.double() - b).norm() / b.norm()).item() < tol("fp32_matvec")
        assert ((c.double() - b).norm() / b.norm()).item() < tol("fp32_matvec")
    head_mix = parts[..., :n].contiguous()
    got = hc_head_split(head_mix if splits > 1 else head_mix[0], scale[:1], base[:n].contiguous(), 1e-6,
                        x=x, norm_eps=norm_eps)
    want = torch.sigmoid(scale[0].double() * mix[:, :n] + base[:n].double()) + 1e-6
    assert ((got.double() - want).norm() / want.norm()).item() < tol("fp32_matvec")
    twin = hc_head_split_ref(head_mix, scale[:1], base[:n], 1e-6, x, norm_eps)
    assert ((twin.double() - want).norm() / want.norm()).item() < tol("fp32_matvec")


@pytest.mark.parametrize("t,d", [(1, 1024), (3, 700)])
def test_hc_post_and_weighted_sum_match_twins(t, d):
    from dwarfstar.kernels.hc import hc_post, hc_post_ref, hc_weighted_sum, hc_weighted_sum_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(d)
    n = 4
    f = torch.randn(t, d, generator=g, device=dev)
    x = torch.randn(t, n, d, generator=g, device=dev)
    post = torch.rand(t, n, generator=g, device=dev) * 2
    m = torch.rand(t, n, n, generator=g, device=dev)
    pre = torch.rand(t, n, generator=g, device=dev)
    # fp32 sums of 4-5 terms in another order vs float64: ~1e-7 relative.
    got = hc_post(f, x, post, m)
    want = hc_post_ref(f.double(), x.double(), post.double(), m.double())
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
    got = hc_weighted_sum(x, pre)
    want = hc_weighted_sum_ref(x.double(), pre.double())
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6


@pytest.mark.parametrize("t,parts", [(1, 12), (2, 3)])
def test_hc_post_sums_partials_and_shared(t, parts):
    """f as routed-expert partials [T, P, D] plus the shared expert's [T, D]: the kernel sums
    them itself; against the float64 sum of the same terms (fp32 order only: ~1e-7)."""
    from dwarfstar.kernels.hc import hc_post, hc_post_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(parts)
    n, d = 4, 520
    f = torch.randn(t, parts, d, generator=g, device=dev)
    shared = torch.randn(t, d, generator=g, device=dev)
    x = torch.randn(t, n, d, generator=g, device=dev)
    post = torch.rand(t, n, generator=g, device=dev) * 2
    m = torch.rand(t, n, n, generator=g, device=dev)
    got = hc_post(f, x, post, m, shared)
    want = hc_post_ref(f.double().sum(1) + shared.double(), x.double(), post.double(), m.double())
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
    assert torch.equal(hc_post_ref(f, x, post, m, shared), hc_post_ref(f.sum(1) + shared, x, post, m))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4])
def test_hc_chain_flash_shape(t, tol):
    """forward.hc_pre's decode chain at Flash shape: split-K mat-vec of the raw 4 x 4096 rows,
    then hc_split summing the partials with the folded norm, vs the unfused float64 order."""
    from dwarfstar.kernels.matvec import matvec_split_k
    from dwarfstar.kernels.repack import PlanarF16

    g = torch.Generator(device="cuda").manual_seed(t)
    n, k, norm_eps = 4, 16384, 1e-6
    fn = (torch.randn((2 + n) * n, k, generator=g, device="cuda") * 0.02).half()
    x = torch.randn(t, k, generator=g, device="cuda") * 20
    scale = torch.rand(3, generator=g, device="cuda") * 0.4 + 0.1
    base = torch.randn((2 + n) * n, generator=g, device="cuda") * 0.1
    got = hc_split(matvec_split_k(PlanarF16(fn), x), scale, base, n, 20, 1e-6, x=x, norm_eps=norm_eps)
    mix = rms_norm(x.double(), None, norm_eps) @ fn.double().T
    want = hc_split_ref(mix, scale.double(), base.double(), n, 20, 1e-6)
    for a, b in zip(got, want):
        assert ((a.double() - b).norm() / b.norm()).item() < tol("fp32_matvec")


@pytest.mark.parametrize("t,d", [(1, 1024), (2, 700)])
def test_hc_split_norm_matches_twin(t, d):
    """The split, then rms_norm(sum_i pre_i x_i, w) in the same launch, vs the float64 twin
    (split, weighted sum, numerics.rms_norm): fp32 order and exp ulps only (~1e-6)."""
    from dwarfstar.kernels.hc import hc_split_norm, hc_split_norm_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(t * d)
    n, iters, eps, norm_eps = 4, 20, 1e-6, 1e-6
    x = torch.randn(t, n * d, generator=g, device=dev) * 3
    mix = torch.randn(3, t, (2 + n) * n, generator=g, device=dev)   # split-K partials
    scale = torch.rand(3, generator=g, device=dev)
    base = torch.randn((2 + n) * n, generator=g, device=dev)
    weight = torch.rand(d, generator=g, device=dev) + 0.5
    h = torch.full((t, d), float("nan"), device=dev)
    got = hc_split_norm(mix, scale, base, n, iters, eps, x, norm_eps, weight)
    want = hc_split_norm_ref(*(a.double() for a in (mix, scale, base)), n, iters, eps, x.double(), norm_eps,
                             weight.double())
    assert not torch.isnan(got[0]).any() and got[0].shape == h.shape
    for a, b in zip(got, want):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-6


@pytest.mark.parametrize("t,d", [(1, 4096), (2, 256)])
def test_hc_split_norm_quantized_h_equals_the_quantiser(t, d):
    """quantize=True: the same (h, post, m), and h's int8 form bit-equal to kernels/moe.py's
    quantize_act of that h (words, scales and per-16 sums), which the products then skip."""
    from dwarfstar.kernels.hc import hc_split_norm
    from dwarfstar.kernels.moe import quantize_act

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(7 * t + d)
    n, iters, eps, norm_eps = 4, 20, 1e-6, 1e-6
    x = torch.randn(t, n * d, generator=g, device=dev) * 3
    x[0, :64] = 0                                       # zero blocks in h's first 32 inputs
    mix = torch.randn(3, t, (2 + n) * n, generator=g, device=dev)
    scale = torch.rand(3, generator=g, device=dev)
    base = torch.randn((2 + n) * n, generator=g, device=dev)
    weight = torch.rand(d, generator=g, device=dev) + 0.5
    weight[:32] = 0                                      # an all-zero block of h: scale 0
    plain = hc_split_norm(mix, scale, base, n, iters, eps, x, norm_eps, weight)
    *fused, hq = hc_split_norm(mix, scale, base, n, iters, eps, x, norm_eps, weight, quantize=True)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
    for a, b in zip(hq, quantize_act(plain[0])):
        assert torch.equal(a, b)
    assert (hq[1][:, 0] == 0).all()


HC_N, HC_ITERS, HC_EPS, NORM_EPS = 4, 20, 1e-6, 1e-6


def _post_then_split_inputs(t, d, seed):
    """Random hc_post inputs (f, x, post, m) for T rows of n = 4 streams of width d, and the
    split's (mix partials, scale, base, weight), from one generator."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    n = HC_N
    post_in = (torch.randn(t, d, generator=g, device=dev), torch.randn(t, n, d, generator=g, device=dev),
               torch.rand(t, n, generator=g, device=dev) * 2, torch.rand(t, n, n, generator=g, device=dev))
    split_in = (torch.randn(3, t, (2 + n) * n, generator=g, device=dev), torch.rand(3, generator=g, device=dev),
                torch.randn((2 + n) * n, generator=g, device=dev), torch.rand(d, generator=g, device=dev) + 0.5)
    return post_in, split_in


def _rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("t,d", [(1, 4096), (2, 1024)])
def test_hc_post_sums_of_squares_feed_the_split(t, d):
    """hc_post(sumsq=True): the same y, and per-program partial sums of y^2 whose total is the
    row's (fp32 order); given as `ss`, the head split uses them for the HC RMS norm instead of
    re-reading the row, and agrees with the x-reading form to fp32 order (1e-6)."""
    from dwarfstar.kernels.hc import hc_post

    (f, x, post, m), (mix, scale, base, weight) = _post_then_split_inputs(t, d, 3 * t + d)
    y = hc_post(f, x, post, m)
    y2, ss = hc_post(f, x, post, m, sumsq=True)
    assert torch.equal(y, y2)
    want = y.double().reshape(t, -1).square().sum(1)
    assert ((ss.double().sum(1) - want).abs() / want).max().item() < 1e-6
    rows = y.reshape(t, -1)
    head_mix = mix[0, :, :HC_N].contiguous()
    a = hc_head_split(head_mix, scale, base[:HC_N], HC_EPS, rows, NORM_EPS, ss=ss)
    b = hc_head_split(head_mix, scale, base[:HC_N], HC_EPS, rows, NORM_EPS)
    assert ((a - b).abs() / b.abs()).max().item() < 1e-6


@pytest.mark.parametrize("t,d", [(1, 4096), (2, 512)])
def test_hc_split_norm_from_gram_partials(t, d):
    """hc_post(gram=True): the same y, and per-program Gram partials whose sum is y's Gram
    matrix of streams (fp32 order, 1e-6). hc_split_norm_gram on them agrees with hc_split_norm
    on the rows to fp32 order (1e-6 relative L2: both norms come from sums associated
    differently), and its int8 form of h is quantize_act's of its h, bit for bit."""
    from dwarfstar.kernels.hc import hc_post, hc_split_norm, hc_split_norm_gram
    from dwarfstar.kernels.moe import quantize_act

    (f, x, post, m), (mix, scale, base, weight) = _post_then_split_inputs(t, d, 5 * t + d)
    y, ss, gram = hc_post(f, x, post, m, sumsq=True, gram=True)
    assert torch.equal(y, hc_post(f, x, post, m))
    want = torch.einsum("tid,tjd->tij", y.double(), y.double())
    assert ((gram.double().sum(1) - want).abs().max() / want.abs().max()).item() < 1e-6
    split = (HC_N, HC_ITERS, HC_EPS, y.reshape(t, -1), NORM_EPS, weight)
    plain = hc_split_norm(mix, scale, base, *split)
    *fused, hq = hc_split_norm_gram(mix, scale, base, *split, gram, quantize=True)
    for a, b in zip(fused, plain):
        assert _rel_l2(a, b) < 1e-6
    for a, b in zip(hq, quantize_act(fused[0])):
        assert torch.equal(a, b)
    assert torch.equal(hc_split_norm_gram(mix, scale, base, *split, gram)[0], fused[0])
    # The two halves as separate launches (decode's h now, Sinkhorn on a side stream): bit for bit.
    h, hq_h = hc_split_norm_gram(mix, scale, base, *split, gram, quantize=True, parts="h")
    post, m = hc_split_norm_gram(mix, scale, base, *split, gram, parts="comb")
    for a, b in zip((h, post, m, *hq_h), (*fused, *hq)):
        assert torch.equal(a, b)


def _mix_fn(rows, k, seed, planar=True):
    """A next-sublayer HC fn [rows, k] as production holds it (PlanarF16), or as an fp32 tensor."""
    from dwarfstar.kernels.repack import PlanarF16

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    w = (torch.randn(rows, k, generator=g, device=dev) * 0.05).half()
    return PlanarF16(w) if planar else w.float()


def _on_gpu(a):
    return a.device.type == "cuda"


@pytest.mark.parametrize("t,d,rows", [(1, 512, 24), (2, 200, 24), (2, 256, 4)])
def test_hc_post_mix_keeps_y_and_the_norm_partials(t, d, rows):
    """hc_post(mix_fn=...): y as without it, and ss / Gram partials over the narrower blocks
    whose totals are y's sum of squares and Gram matrix (fp32 order vs float64: 1e-6, as the
    default path's); asking for the mix alone gives the same y and partials bit for bit."""
    from dwarfstar.kernels.hc import HC_MIX_BLOCK_D, hc_post

    (f, x, post, m), _ = _post_then_split_inputs(t, d, 11 * t + d)
    fn = _mix_fn(rows, HC_N * d, t + d)
    y0, ss0, gram0 = hc_post(f, x, post, m, f, sumsq=True, gram=True)
    y, ss, gram, mix = hc_post(f, x, post, m, f, sumsq=True, gram=True, mix_fn=fn)
    blocks = -(-d // HC_MIX_BLOCK_D)
    assert ss.shape == (t, blocks) and gram.shape == (t, blocks, HC_N, HC_N) and mix.shape == (blocks, t, rows)
    if _on_gpu(y):
        # Other block widths give the 4-term stream sum another thread layout, which may reassociate it.
        assert _rel_l2(y, y0) < 1e-6
    else:
        assert torch.equal(y, y0)
    yd = y0.double()
    want = yd.reshape(t, -1).square().sum(1)
    gram_want = torch.einsum("tid,tjd->tij", yd, yd)
    for s, g in ((ss, gram), (ss0, gram0)):
        assert ((s.double().sum(1) - want).abs() / want).max().item() < 1e-6
        assert ((g.double().sum(1) - gram_want).abs().max() / gram_want.abs().max()).item() < 1e-6
    y1, mix1 = hc_post(f, x, post, m, f, mix_fn=fn)
    assert torch.equal(y1, y) and torch.equal(mix1, mix)


@pytest.mark.parametrize("t,d,rows,planar", [(1, 512, 24, True), (2, 256, 24, True), (1, 256, 4, True),
                                             (2, 200, 4, True), (2, 256, 5, False)])
def test_hc_post_mix_partials_match_twin(t, d, rows, planar, tol):
    """The mix partials [S, T, M] vs the twin in float32 and float64, and their sum over S vs
    the float64 fn . y: fp16 weights are exact in fp32, so only the fp32 sums of 4 x 128 products
    per partial differ (fp32_matvec). M = 24 and 4 (Flash's layer and head fn) pad to 32 and 4
    rows, 5 to 8; D = 200 leaves the last block part-masked."""
    from dwarfstar.kernels.hc import HC_MIX_BLOCK_D, hc_post, hc_post_mix_ref

    (f, x, post, m), _ = _post_then_split_inputs(t, d, 13 * t + d)
    fn = _mix_fn(rows, HC_N * d, 3 * t + d, planar)
    y, mix = hc_post(f, x, post, m, mix_fn=fn)
    twin = hc_post_mix_ref(y, fn, HC_MIX_BLOCK_D)
    oracle = hc_post_mix_ref(y.double(), fn, HC_MIX_BLOCK_D)
    assert twin.dtype == torch.float32 and twin.shape == mix.shape == (-(-d // HC_MIX_BLOCK_D), t, rows)
    assert torch.isfinite(mix).all()
    assert _rel_l2(mix, twin) < tol("fp32_matvec")
    for a in (mix, twin):
        assert _rel_l2(a, oracle) < tol("fp32_matvec")
    w = (fn.w if planar else fn).double()
    full = y.double().reshape(t, -1) @ w.T                  # [T, M], the unsplit product
    # The float64 twin's blocks cover every column once: equal to the unsplit product to float64 order.
    assert _rel_l2(oracle.sum(0), full) < 1e-12
    assert _rel_l2(mix.sum(0), full) < tol("fp32_matvec")


@pytest.mark.parametrize("t,d", [(1, 512), (2, 256)])
def test_hc_splits_take_hc_post_mix_partials(t, d, tol):
    """Decode's use: the splits fed hc_post's mix partials equal the same splits fed the split-K
    mat-vec of hc_post's rows (matvec_split_k, today's separate launch). The mixes differ by fp32
    order only (~1e-7 relative), and the sigmoids / Sinkhorn do not amplify that past fp32_matvec."""
    from dwarfstar.kernels.hc import hc_post, hc_split_norm_gram
    from dwarfstar.kernels.matvec import matvec_split_k

    (f, x, post, m), (_, scale, base, weight) = _post_then_split_inputs(t, d, 17 * t + d)
    fn = _mix_fn((2 + HC_N) * HC_N, HC_N * d, 5 * t + d)
    y, gram, mix = hc_post(f, x, post, m, f, gram=True, mix_fn=fn)
    rows = y.reshape(t, -1)
    split = (HC_N, HC_ITERS, HC_EPS, rows, NORM_EPS, weight)
    got = hc_split_norm_gram(mix, scale, base, *split, gram)
    want = hc_split_norm_gram(matvec_split_k(fn, rows), scale, base, *split, gram)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and _rel_l2(a, b) < tol("fp32_matvec")
    # The output head: fn of n rows, its RMS norm from hc_post's sums of squares.
    head = _mix_fn(HC_N, HC_N * d, 7 * t + d)
    y, ss, mix = hc_post(f, x, post, m, f, sumsq=True, mix_fn=head)
    rows = y.reshape(t, -1)
    got = hc_head_split(mix, scale, base[:HC_N], HC_EPS, rows, NORM_EPS, ss=ss)
    want = hc_head_split(matvec_split_k(head, rows), scale, base[:HC_N], HC_EPS, rows, NORM_EPS)
    assert torch.isfinite(got).all() and _rel_l2(got, want) < tol("fp32_matvec")
