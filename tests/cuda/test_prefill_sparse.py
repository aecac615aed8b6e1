"""Sparse chunk attention in one launch (kernels/prefill_sparse.py) vs its twin (attend_chunk with
the index list turned into a mask) and vs `_attend` in float64 over keys and masks built here,
query by query, from the contract.

Tolerances (tests/conftest.py): DOT_DTYPE float32 (ieee dots, the interpreter) is the same
function as the twin, fp32 summation order only: "prefill_attend_fp32" (1e-6 relative L2;
~2e-7 measured). DOT_DTYPE float16 rounds q, keys and the unnormalised probabilities to fp16
as attend_chunk's fp16 path does (there the probabilities are normalised first, here scaled
by the running max, both in [0, 1]): "prefill_attend_fp16" (2e-3; ~3e-4 measured).
"""

import pytest
import torch

from dwarfstar.kernels.prefill_sparse import attend_prefill, attend_prefill_ref, comp_mask_of
from dwarfstar.model.attention import _attend

W = 8


def _case(t, t0, n_comp, k, gen, h=16, dh=64, w=W, stale=False, dev="cpu"):
    """Queries at positions t0 .. t0 + T - 1; the ring as held before the chunk (slot p % W);
    k random indices per query out of all n_comp rows (many not yet visible)."""
    q = torch.nn.functional.normalize(torch.randn(t, h, dh, generator=gen, device=dev), dim=-1) * dh ** 0.5
    kv = torch.randn(t, dh, generator=gen, device=dev)
    ring = torch.randn(w, dh, generator=gen, device=dev)
    ring_pos = torch.full((w,), -1, dtype=torch.int64)
    for p in range(max(0, t0 - w), t0):
        ring_pos[p % w] = p
    if stale and t0 > w + 3:
        # A slot holding a row older than any window of the chunk (allowed: positions < t0).
        ring_pos[0] = t0 - w - 3
    positions = torch.arange(t0, t0 + t, device=dev)
    comp = torch.randn(n_comp, dh, generator=gen, device=dev) if n_comp else None
    idx = None
    if k:
        idx = torch.stack([torch.randperm(n_comp, generator=gen, device=dev)[:k] for _ in range(t)])
    sinks = torch.randn(h, generator=gen, device=dev)
    return q, kv, ring, ring_pos.to(dev), positions, comp, idx, sinks


def _explicit(q, kv, ring, ring_pos, positions, comp, idx, ratio, sinks, w=W):
    """float64 `_attend`, one query at a time, keys listed from the contract's rules."""
    out = []
    for i, p in enumerate(positions.tolist()):
        keys = [ring[j] for j in range(ring.shape[0]) if 0 <= ring_pos[j] and p - w < ring_pos[j] <= p]
        keys += [kv[j] for j in range(kv.shape[0]) if p - w < positions[j] <= p]
        if comp is not None:
            rows = range(comp.shape[0]) if idx is None else idx[i].tolist()
            keys += [comp[c] for c in rows if c < (p + 1) // ratio]
        keys = torch.stack(keys).double()
        mask = torch.ones(1, keys.shape[0], dtype=torch.bool)
        out.append(_attend(q[i:i + 1].double(), keys, mask, sinks.double())[0])
    return torch.stack(out)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (T, t0, N_c, k, ratio, H): ratio 4 by index from an empty ring (t0 = 0) and a partly filled one
# (t0 = 5 < W); a wrapped ring with a stale slot; ratio 4 with no index list (N_c <= top-k: every
# emitted row; here fewer held than emitted, so N_c cuts); ratio 128 across a row boundary
# (p + 1 = 1024) with a row never visible; ratio 0; H = 24 (a partial head block).
CASES = [(20, 0, 12, 4, 4, 16), (20, 5, 12, 4, 4, 16), (19, 30, 14, 4, 4, 16), (20, 9, 6, 0, 4, 16),
         (20, 1015, 9, 0, 128, 16), (21, 3, 0, 0, 0, 16), (20, 13, 10, 4, 4, 24)]


@pytest.mark.parametrize("t,t0,n_comp,k,ratio,h", CASES)
def test_kernel_matches_twin_and_explicit_keys(t, t0, n_comp, k, ratio, h, tol, single_thread):
    gen = torch.Generator().manual_seed(t + 7 * t0 + n_comp + k + ratio + h)
    q, kv, ring, ring_pos, positions, comp, idx, sinks = _case(t, t0, n_comp, k, gen, h=h, stale=True)
    if idx is not None:
        # The index lists hold rows invisible to early queries (what the test is about).
        assert not comp_mask_of(idx, positions, n_comp, ratio).sum(1).eq(k).all()
    args = (q, kv, ring, ring_pos, positions, comp, idx, ratio, sinks, W)
    want = _explicit(*args[:-1])
    twin = attend_prefill_ref(*args)
    assert _rel(twin, want) <= tol("prefill_attend_fp32")
    for dtype, name in ((torch.float32, "prefill_attend_fp32"), (torch.float16, "prefill_attend_fp16")):
        out = torch.full((t, h, q.shape[2]), float("nan"))
        got = attend_prefill(*args, dtype, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all(), "every output written"
        assert _rel(got, twin) <= tol(name), (dtype, _rel(got, twin))
        assert _rel(got, want) <= tol(name), (dtype, _rel(got, want))


def test_small_blocks_and_head_blocks(tol, single_thread):
    """BLOCK_N smaller than the window (several band blocks, unaligned starts) and two head blocks."""
    gen = torch.Generator().manual_seed(11)
    q, kv, ring, ring_pos, positions, comp, idx, sinks = _case(18, 21, 11, 5, gen, h=32)
    args = (q, kv, ring, ring_pos, positions, comp, idx, 4, sinks, W)
    got = attend_prefill(*args, torch.float32, block_h=16, block_n=4)
    assert _rel(got, _explicit(*args[:-1])) <= tol("prefill_attend_fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [4, 128, 0])
def test_flash_shapes_gpu(ratio, tol):
    """Flash attention shapes (64 heads x 512, window 128), a 512-query chunk with 1024 compressed
    rows: ratio 4 with 512 indices per query (positions where (p+1)//4 crosses 1024, so some
    indices are not yet visible), ratio 128 late in a long context ((p+1)//128 crosses 1024, so
    the N_c cut matters), ratio 0. fp16 tl.dot vs the
    fp32 twin; float32 dots vs it too (fp32 order only)."""
    from dwarfstar.shape import FLASH

    w, t, n_comp = FLASH.window_size, 512, 1024
    t0 = {4: 3900, 128: 130900, 0: 4096}[ratio]
    gen = torch.Generator(device="cuda").manual_seed(ratio)
    q, kv, ring, ring_pos, positions, comp, _, sinks = _case(t, t0, n_comp if ratio else 0, 0, gen, FLASH.n_heads,
                                                             FLASH.head_dim, w, stale=True, dev="cuda")
    idx = None
    if ratio == 4:
        idx = torch.rand(t, n_comp, generator=gen, device="cuda").topk(FLASH.index_topk, 1).indices
    args = (q, kv, ring, ring_pos, positions, comp, idx, ratio, sinks, w)
    want = attend_prefill_ref(*args)
    for dtype, name in ((torch.float16, "prefill_attend_fp16"), (torch.float32, "prefill_attend_fp32")):
        out = torch.full_like(want, float("nan"))
        got = attend_prefill(*args, dtype, out=out)
        err = _rel(got, want)
        print(f"ratio {ratio} {dtype} sparse prefill attention vs fp32 twin: rel L2 {err:.3g}")
        assert torch.isfinite(out).all() and err <= tol(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU twin run of the wiring (GPU: test_cuda_gpu.py)")
def test_forward_routes_chunks_through_kernel(tmp_path, tol, logprob_error, monkeypatch, single_thread):
    """model/forward.py's CUDA branch on a CPU: attend_dtype reports fp16 (as on CUDA) so chunks go
    through compressed_keys(as_indices=True) and attend_prefill, which runs with fp32 dots here;
    chunked prefill must then match token-by-token decode as tightly as the fp32 path does
    (exact numerics: fp32 order only). Tiny model: a sliding-only layer, ratio 4 with the
    indexer (top-4 of up to 16 rows, so index lists with rows not yet visible), ratio 8."""
    import dataclasses

    from dwarfstar.engine.engine import Engine, EngineOptions
    from dwarfstar.gguf.synth import TINY, synthesize
    from dwarfstar.model import forward

    config = dataclasses.replace(TINY, window_size=8, index_topk=4, compress_ratios=(0, 4, 8, 4), n_hash_layers=1)
    tokens = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = Engine.load(synthesize(tmp_path / "tiny.gguf", config=config),
                         EngineOptions(backend="cuda", ctx=64, numerics="exact"))
    stepped = engine.new_session()
    stepped.sync(tokens[:1])
    for t in tokens[1:]:
        stepped.eval(t)

    calls = []

    def fp32_kernel(q, kv, ring, ring_pos, positions, comp, comp_idx, ratio, sinks, window, dtype):
        assert dtype == torch.float16
        calls.append((ratio, None if comp_idx is None else tuple(comp_idx.shape)))
        return attend_prefill(q, kv, ring, ring_pos, positions, comp, comp_idx, ratio, sinks, window, torch.float32)

    monkeypatch.setattr(forward, "attend_dtype", lambda device: torch.float16)
    monkeypatch.setattr(forward, "attend_prefill", fp32_kernel)
    s = engine.new_session()
    s.prefill_chunk = 13
    s.sync(tokens)
    # Index lists [T, top-k] on ratio-4 layers once more than top-k rows exist; every row otherwise.
    assert (4, (13, 4)) in calls and (8, None) in calls and (0, None) in calls
    assert logprob_error(stepped.logits(), s.logits()) <= tol("exact_numerics")
