"""kernels/compress.py (Triton; the CPU interpreter without a GPU) vs its torch twins.

A run of decode steps over both frontier layouts (r = 4 overlapping, r = 8), through the
first incomplete windows (-inf scores), several emits and, for r = 4, the slot hand-over.
"""

import pytest
import torch

from dwarfstar.kernels.compress import compress_pool, compress_pool_ref, emit_row, emit_row_ref
from dwarfstar.kernels.glue import rope_table
from dwarfstar.model.rope import rope_frequencies
from dwarfstar.shape import FLASH

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("r,c,fp8,half", [(4, 128, True, True), (8, 128, False, False), (4, 64, False, True)])
def test_compress_step_matches_twin(r, c, fp8, half):
    g = torch.Generator(device=DEV).manual_seed(r + c)
    ov = r == 4
    w, slots = (2 if ov else 1) * c, (2 if ov else 1) * r
    omega = rope_frequencies(FLASH, r).to(DEV)[: 32]          # d_r = 64 of every row width here
    cos, sin = rope_table(omega, 64)
    ape = torch.randn(r, w, generator=g, device=DEV)
    norm = torch.randn(c, generator=g, device=DEV)
    state = {k: (torch.zeros(slots, w, device=DEV), torch.full((slots, w), float("-inf"), device=DEV),
                 torch.zeros(6, c, device=DEV)) for k in ("kernel", "twin")}
    for p in range(3 * r + 1):
        a = torch.randn(1, w, generator=g, device=DEV) * 2
        z = torch.randn(1, w, generator=g, device=DEV)
        pos = torch.tensor([p], device=DEV)
        kv_f, sc_f, rows = state["kernel"]
        got = compress_pool(a, z, ape, pos, kv_f, sc_f, norm, cos, sin, 1e-6, r)
        emit_row(got, rows, pos, r, c - 64, fp8, half)
        kv_t, sc_t, rows_t = state["twin"]
        want = compress_pool_ref(a, z, ape, pos, kv_t, sc_t, norm, omega, 1e-6, r)
        emit_row_ref(want, rows_t, pos, r, c - 64, fp8, half)
        # The frontier is copied, not computed: bit-equal.
        assert torch.equal(kv_f, kv_t) and torch.equal(sc_f, sc_t), p
        if (p + 1) % r == 0:
            # fp32 order (softmax sum, norm sum, FMA in the rotation): a few ulp of the row.
            assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item(), p
    n = (3 * r + 1) // r
    assert torch.equal(rows[n:], rows_t[n:])
    if fp8 or half:
        # A few-ulp difference can cross a rounding midpoint: at most one FP8/f16 step per element
        # (1/8 relative for e4m3) and only rarely.
        diff = (rows[:n] - rows_t[:n]).abs()
        assert (diff <= rows_t[:n].abs() / 8 + 1e-30).all()
        assert (diff > 0).float().mean().item() <= 0.02
    else:
        assert (rows[:n] - rows_t[:n]).abs().max().item() <= 2e-6 * rows_t.abs().max().item()
