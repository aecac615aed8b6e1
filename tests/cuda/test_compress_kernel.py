"""kernels/compress.py (Triton; the CPU interpreter without a GPU) vs its torch twins.

Runs of decode steps over both frontier layouts (r = 4 overlapping, r = 8 / 128), through
the first incomplete windows (-inf scores), several emits and, for r = 4, the slot
hand-over; both ways of finishing a row: pooled over several programs and normed + RoPE'd
in the emit (attention rows), or normed + RoPE'd by one pool program (indexer rows).
"""

import pytest
import torch

from dwarfstar.kernels.compress import compress_pool, compress_pool_ref, emit_row, emit_row_ref
from dwarfstar.kernels.glue import rope_table
from dwarfstar.model.rope import rope_frequencies
from dwarfstar.shape import FLASH

DEV = "cuda" if torch.cuda.is_available() else "cpu"
D_R = 64        # RoPE dims of every row width here (Flash: qk_rope_head_dim)


def _run(r, c, fp8, half, wide, positions, g, block_c=64, warm=False):
    """Kernel and twin over `positions`; -> (rows, twin rows, n emitted) after the checks per step.
    warm: the frontier starts random and finite (a run joined mid-stream), else empty."""
    ov = r == 4
    w, slots = (2 if ov else 1) * c, (2 if ov else 1) * r
    omega = rope_frequencies(FLASH, r).to(DEV)[: D_R // 2]
    cos, sin = rope_table(omega, positions[-1] + 2)
    ape = torch.randn(r, w, generator=g, device=DEV)
    norm = torch.randn(c, generator=g, device=DEV)
    if warm:
        kv0, sc0 = torch.randn(slots, w, generator=g, device=DEV), torch.randn(slots, w, generator=g, device=DEV)
    else:
        kv0, sc0 = torch.zeros(slots, w, device=DEV), torch.full((slots, w), float("-inf"), device=DEV)
    n_rows = positions[-1] // r + 2
    kv_f, sc_f, rows = kv0.clone(), sc0.clone(), torch.zeros(n_rows, c, device=DEV)
    kv_t, sc_t, rows_t = kv0.clone(), sc0.clone(), torch.zeros(n_rows, c, device=DEV)
    emitted = []
    for p in positions:
        a = torch.randn(1, w, generator=g, device=DEV) * 2
        z = torch.randn(1, w, generator=g, device=DEV)
        pos = torch.tensor([p], device=DEV)
        if wide:
            got = compress_pool(a, z, ape, pos, kv_f, sc_f, None, None, None, 0.0, r, block_c=block_c)
            emit_row(got, rows, pos, r, c - D_R, fp8, half, norm, cos, sin, 1e-6)
            want = compress_pool_ref(a, z, ape, pos, kv_t, sc_t, None, None, 0.0, r)
            emit_row_ref(want, rows_t, pos, r, c - D_R, fp8, half, norm, omega, 1e-6)
        else:
            got = compress_pool(a, z, ape, pos, kv_f, sc_f, norm, cos, sin, 1e-6, r)
            emit_row(got, rows, pos, r, c - D_R, fp8, half)
            want = compress_pool_ref(a, z, ape, pos, kv_t, sc_t, norm, omega, 1e-6, r)
            emit_row_ref(want, rows_t, pos, r, c - D_R, fp8, half)
        # The frontier is copied, not computed: bit-equal.
        assert torch.equal(kv_f, kv_t) and torch.equal(sc_f, sc_t), p
        if (p + 1) % r == 0:
            # fp32 order (softmax sum, norm sum, FMA in the rotation): a few ulp of the row.
            assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item(), p
            emitted.append((p + 1) // r - 1)
    return rows, rows_t, emitted


def _check_rows(rows, rows_t, emitted, fp8, half):
    untouched = [i for i in range(rows.shape[0]) if i not in emitted]
    assert emitted and torch.equal(rows[untouched], rows_t[untouched])
    got, want = rows[emitted], rows_t[emitted]
    if fp8 or half:
        # A few-ulp difference can cross a rounding midpoint: at most one FP8/f16 step per element
        # (1/8 relative for e4m3) and only rarely.
        diff = (got - want).abs()
        assert (diff <= want.abs() / 8 + 1e-30).all()
        assert (diff > 0).float().mean().item() <= 0.02
    else:
        assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item()


@pytest.mark.parametrize("r,c,fp8,half,wide", [
    (4, 128, True, True, True),       # attention-row layout: 2 pool programs, norm + RoPE in the emit
    (8, 128, False, False, True),
    (4, 64, False, True, False),      # indexer-row layout: one program pools, norms and RoPEs
])
def test_compress_step_matches_twin(r, c, fp8, half, wide):
    g = torch.Generator(device=DEV).manual_seed(r + c)
    _check_rows(*_run(r, c, fp8, half, wide, list(range(3 * r + 1)), g), fp8, half)


@pytest.mark.parametrize("wide", [True, False])
def test_compress_ratio128_window_end_matches_twin(wide):
    """r = 128 (128 candidates per channel) joined mid-stream: the last steps of a window,
    its emit, and the first of the next. Not wide: compress_pool finishes the row itself, in
    a second launch as its tile (128 x 64) is past POOL_FINISH_TILE."""
    g = torch.Generator(device=DEV).manual_seed(128)
    _check_rows(*_run(128, 64, True, True, wide, list(range(2 * 128 - 3, 2 * 128 + 2)), g, 32, True),
                True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("r,c,wide,positions", [
    (128, 512, True, list(range(2 * 128 - 2, 3 * 128 + 1))),   # attention rows of a ratio-128 layer
    (4, 512, True, list(range(3 * 4 + 1))),                    # attention rows of a ratio-4 layer
    (4, 128, False, list(range(3 * 4 + 1))),                   # indexer rows of a ratio-4 layer
])
def test_compress_flash_shapes_match_twin(r, c, wide, positions):
    g = torch.Generator(device=DEV).manual_seed(r * c)
    _check_rows(*_run(r, c, True, True, wide, positions, g, 32, r == 128), True, True)
