"""Chunk attention in query blocks (kernels/prefill_attend.py) vs the reference `_attend`
(model/attention.py) over all keys of the chunk with the full window mask."""

import pytest
import torch

from dwarfstar.kernels.prefill_attend import attend_chunk, block_size
from dwarfstar.model.attention import _attend

H, DH, W = 4, 64, 8


def _case(t, n_comp, t0, gen, h=H, dh=DH, w=W):
    q = torch.nn.functional.normalize(torch.randn(t, h, dh, generator=gen), dim=-1) * dh ** 0.5
    kv = torch.randn(t, dh, generator=gen)
    ring = torch.randn(w, dh, generator=gen)
    # Ring slots hold positions t0 - W .. t0 - 1 (slot p % W); -1 = never written (t0 < W).
    ring_pos = torch.full((w,), -1, dtype=torch.int64)
    for p in range(max(0, t0 - w), t0):
        ring_pos[p % w] = p
    positions = torch.arange(t0, t0 + t)
    comp = torch.randn(n_comp, dh, generator=gen) if n_comp else None
    comp_mask = torch.rand(t, n_comp, generator=gen) < 0.6 if n_comp else None
    sinks = torch.randn(h, generator=gen)
    return q, kv, ring, ring_pos, positions, comp, comp_mask, sinks


def _full(q, kv, ring, ring_pos, positions, comp, comp_mask, sinks, w=W):
    keys, key_pos = torch.cat([ring, kv]), torch.cat([ring_pos, positions])
    mask = (key_pos[None] <= positions[:, None]) & (key_pos[None] > positions[:, None] - w) & (key_pos[None] >= 0)
    if comp is not None:
        keys, mask = torch.cat([keys, comp]), torch.cat([mask, comp_mask], 1)
    return _attend(q, keys, mask, sinks)


@pytest.mark.parametrize("t,n_comp,t0", [(37, 0, 0), (37, 11, 5), (20, 6, 100)])
def test_blocks_match_full_attention(t, n_comp, t0, tol, single_thread):
    case = _case(t, n_comp, t0, torch.Generator().manual_seed(t + n_comp + t0))
    want = _full(*case)
    small = 16 * H * 4 * (2 * W + 4 + n_comp)          # forces 4-query blocks
    assert block_size(H, W, n_comp, small) == 4
    got = attend_chunk(*case, W, torch.float32, max_bytes=small)
    assert ((got - want).norm() / want.norm()).item() <= tol("prefill_attend_fp32")
    half = attend_chunk(*case, W, torch.float16, max_bytes=small)
    assert ((half - want).norm() / want.norm()).item() <= tol("prefill_attend_fp16")


def test_block_size_bounds_memory():
    # Flash: 64 heads, window 128; 128K context at ratio 4 = 32768 compressed rows.
    tq = block_size(64, 128, 32768)
    assert 1 <= tq < 256 and 16 * 64 * tq * (256 + tq + 32768) <= 2 << 30
    assert block_size(64, 128, 16) == 256


@pytest.mark.gpu
def test_fp16_blocks_flash_shapes(tol):
    """Flash attention shapes (64 heads x 512, window 128), a 2048-query chunk at position 4096
    with 1024 compressed rows: fp16 tensor-core blocks vs the fp32 reference on the GPU."""
    from dwarfstar.shape import FLASH

    w = FLASH.window_size
    torch.set_default_device("cuda")
    try:
        case = list(_case(2048, 1024, 4096, torch.Generator(device="cuda").manual_seed(1), FLASH.n_heads,
                          FLASH.head_dim, w))
        want = _full(*case, w=w)
        got = attend_chunk(*case, w, torch.float16)
        # Ratio 4: at most 512 chosen rows per query, gathered per query (comp_k).
        top = torch.rand(2048, 1024, generator=torch.Generator(device="cuda").manual_seed(2)).topk(512, 1).indices
        case[6] = case[6] & torch.zeros(2048, 1024, dtype=torch.bool).scatter_(1, top, True)
        want_sparse = _full(*case, w=w)
        got_sparse = attend_chunk(*case, w, torch.float16, comp_k=512)
    finally:
        torch.set_default_device(None)
    for name, a, b in (("dense", got, want), ("per-query rows", got_sparse, want_sparse)):
        err = ((a - b).norm() / b.norm()).item()
        print(f"fp16 chunk attention ({name}) vs fp32 reference: rel L2 {err:.3g}")
        assert err <= tol("prefill_attend_fp16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_compressed_rows_match_full_attention(dtype, tol, single_thread):
    """comp_k: each query keeps at most comp_k compressed rows (as the indexer's top-k mask)."""
    gen = torch.Generator().manual_seed(3)
    t, n_comp, k = 30, 20, 5
    case = list(_case(t, n_comp, 40, gen))
    # At most k true per row, some rows with fewer (early queries see few rows).
    score = torch.rand(t, n_comp, generator=gen)
    top = score.topk(k, 1).indices
    chosen = torch.zeros(t, n_comp, dtype=torch.bool).scatter_(1, top, True)
    visible = torch.arange(n_comp)[None, :] < torch.arange(t)[:, None] // 2
    case[6] = chosen & visible
    want = _full(*case)
    got = attend_chunk(*case, W, dtype, max_bytes=16 * H * 4 * (2 * W + 4 + k), comp_k=k)
    name = "prefill_attend_fp32" if dtype == torch.float32 else "prefill_attend_fp16"
    assert ((got - want).norm() / want.norm()).item() <= tol(name)
