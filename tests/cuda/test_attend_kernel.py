"""kernels/attend.py (Triton; the CPU interpreter without a GPU) vs its twin in float64.

The twin builds the keys and mask as forward.py's torch path did and calls
model/attention._attend; run in float64 it is the oracle for both the kernel and the fp32 twin.
"""

import pytest
import torch

from dwarfstar.kernels import attend
from dwarfstar.kernels.attend import attend_decode, attend_decode_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ring(pos: int, w: int) -> torch.Tensor:
    """ring_pos as the decode state holds it before position pos: slot p % w = the last p < pos."""
    ring = torch.full((w,), -1, dtype=torch.int64)
    for p in range(max(0, pos - w), pos):
        ring[p % w] = p
    return ring


def _case(h, d, w, pos, n, idx, ratio, seed, keys_fp16=False):
    """keys_fp16: every key row rounded through fp16 (as the cache's half rounding leaves them) and
    attend_decode told so (its two-product path, attend.EXACT_KEYS)."""
    g = torch.Generator().manual_seed(seed)
    ring = _ring(pos, w)
    keys = (lambda a: a.half().float()) if keys_fp16 else (lambda a: a)
    raw = keys(torch.randn(w, d, generator=g))
    raw[ring < 0] = 0.0
    t = dict(q=torch.randn(h, d, generator=g) * 2, raw=raw, ring_pos=ring, kv=keys(torch.randn(1, d, generator=g)),
             pos=torch.tensor([pos]), comp=keys(torch.randn(n, d, generator=g)) if n else None,
             comp_idx=None if idx is None else torch.tensor(idx, dtype=torch.int64),
             ratio=ratio, sinks=torch.randn(h, generator=g))
    case = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    return dict(case, keys_fp16=True) if keys_fp16 else case


def _check(case, bound):
    raw_before = case["raw"].clone()
    ref_case = {k: v for k, v in case.items() if k != "keys_fp16"}
    want_case = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in ref_case.items()}
    want_case["raw"] = raw_before.double()
    want = attend_decode_ref(**want_case)
    twin_case = dict(ref_case, raw=raw_before.clone())
    twin = attend_decode_ref(**twin_case)
    got = attend_decode(**case)
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = ((got.double() - want).norm() / want.norm()).item()
    twin_err = ((twin.double() - want).norm() / want.norm()).item()
    assert err <= bound, (err, twin_err)
    assert (got.double() - want).abs().max().item() <= bound * want.abs().max().item()
    # The ring write: this token's row into slot pos % W, every other slot untouched.
    assert torch.equal(case["raw"], twin_case["raw"])
    slot = int(case["pos"]) % raw_before.shape[0]
    assert torch.equal(case["raw"][slot], case["kv"][0])
    return err, twin_err


# (pos, N, comp_idx, ratio): ring filling (slots -1), ring wrapped, ratio-4 selection with
# invisible rows, all rows of a ratio-128-like layer, a key block with no visible key.
CASES = {
    "ring_filling_no_comp": (3, 0, None, 0),
    "wrapped_no_comp": (21, 0, None, 0),
    "wrapped_selected": (21, 12, [3, 7, 0, 11, 4], 4),
    "filling_selected_none_visible": (2, 12, [0, 1, 2, 3, 4], 4),
    "all_rows": (13, 12, None, 2),
    "empty_block": (10, 80, [0, 1] + list(range(40, 78)), 4),
}


# QK dot forms (attend.QK_SPLIT): one accumulator through D, and D in 2 or 4 batched chunks.
QK_SPLITS = [1, 4, 8]


@pytest.mark.parametrize("keys_fp16", [False, True])
@pytest.mark.parametrize("qk_split", QK_SPLITS)
@pytest.mark.parametrize("name", list(CASES))
def test_attend_decode_matches_twin(name, qk_split, keys_fp16, tol, monkeypatch):
    monkeypatch.setattr(attend, "QK_SPLIT", qk_split)
    pos, n, idx, ratio = CASES[name]
    _check(_case(4, 64, 8, pos, n, idx, ratio, seed=pos + n, keys_fp16=keys_fp16), tol("attend_decode"))


@pytest.mark.parametrize("keys_fp16", [False, True])
@pytest.mark.parametrize("qk_split", QK_SPLITS)
@pytest.mark.parametrize("name", ["wrapped_selected", "filling_selected_none_visible", "empty_block"])
def test_invisible_keys_never_count(name, qk_split, keys_fp16, monkeypatch):
    """The key loads are not masked by visibility (kernels/attend.py _key_tile): NaN in every
    ring slot and compressed row the token may not see changes no bit of the output."""
    monkeypatch.setattr(attend, "QK_SPLIT", qk_split)
    pos, n, idx, ratio = CASES[name]
    case = _case(4, 64, 8, pos, n, idx, ratio, seed=pos + n, keys_fp16=keys_fp16)
    want = attend_decode(**dict(case, raw=case["raw"].clone()))
    ring = case["ring_pos"]
    hidden = (ring < 0) | (ring <= pos - 8)
    hidden[pos % 8] = True
    poisoned = dict(case, raw=case["raw"].clone(), comp=case["comp"].clone())
    poisoned["raw"][hidden] = float("nan")
    poisoned["comp"][(pos + 1) // ratio:] = float("nan")
    assert hidden.any() and poisoned["comp"].isnan().any()
    assert torch.equal(attend_decode(**poisoned), want)


@pytest.mark.gpu
@pytest.mark.parametrize("qk_split", QK_SPLITS)
@pytest.mark.parametrize("ratio,ctx,pos", [(0, 32768, 30000), (4, 32768, 30000), (4, 32768, 300),
                                           (128, 131072, 100000), (128, 32768, 61)])
def test_attend_decode_flash_shapes(ratio, ctx, pos, qk_split, tol, monkeypatch):
    """Flash: H = 64, D = 512, W = 128; ratio 4 attends the indexer's top 512 of cap rows,
    ratio 128 all cap rows (cap = ctx / r + 2). With fp16 keys also the two-product form (what
    decode runs under the official numerics) against the three-product one on the same keys."""
    monkeypatch.setattr(attend, "QK_SPLIT", qk_split)
    cap = ctx // ratio + 2 if ratio else 0
    idx = None
    if ratio == 4:
        g = torch.Generator().manual_seed(pos)
        idx = torch.randperm(cap, generator=g)[:512].tolist()
    _check(_case(64, 512, 128, pos, cap, idx, ratio, seed=ratio + pos), tol("attend_decode"))
    case = _case(64, 512, 128, pos, cap, idx, ratio, seed=ratio + pos, keys_fp16=True)
    three = attend_decode(**dict(case, raw=case["raw"].clone(), keys_fp16=False))
    _check(case, tol("attend_decode"))
    two = attend_decode(**dict(case, raw=case["raw"].clone()))
    # The same products up to the order of two fp32 additions per tile (Triton's split adds the
    # accumulator last, or first in older versions): within a few ulp of the output's scale.
    assert (two - three).abs().max().item() <= 1e-6 * three.abs().max().item()


@pytest.mark.parametrize("d,n_pairs", [(128, 16), (64, 32)])
def test_combine_with_inverse_rope_and_int8_form(d, n_pairs):
    """attend_decode(inv_rope=, quantize=True) = glue.rope(attend_decode(...), inverse=True), and
    the int8 form is quantize_act of that o (flattened: any group split of its rows)."""
    from dwarfstar.kernels.glue import rope, rope_table
    from dwarfstar.kernels.moe import quantize_act

    h, pos = 8, 21
    case = _case(h, d, 8, pos, 12, [3, 7, 0, 11, 4], 4, seed=5)
    omega = torch.rand(n_pairs, dtype=torch.float64, device=DEV) * 0.5
    cos, sin = rope_table(omega, 64)
    plain_case = dict(case, raw=case["raw"].clone())
    want = rope(attend_decode(**plain_case)[None], case["pos"], cos, sin, inverse=True)[0]
    got, oq = attend_decode(**case, inv_rope=(cos, sin), quantize=True)
    assert torch.equal(case["raw"], plain_case["raw"])
    # The same products as the rope kernel; only FMA contraction may differ between kernels.
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()
    for a, b in zip(oq, quantize_act(got.reshape(1, -1))):
        assert torch.equal(a, b)
