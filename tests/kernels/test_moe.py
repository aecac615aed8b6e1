"""Routed-MoE decode kernels vs their twins vs gguf's numpy dequantisation in float64.

Three checks per case: kernel vs twin (same int8 activations; fp32 rounding only), twin vs an
independent float64 oracle built from `gguf.quants.dequantize` and the unquantised
activations (int8 rounding only), and every output element written (NaN-poisoned).
CPU runs use the Triton interpreter at tiny shapes; `gpu` tests use the Flash shapes
(256 experts, 2048 x 4096 gate/up, 4096 x 2048 down), the dp4a asm path and graph replay.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import IQ2_XXS, dequantize

pytest.importorskip("triton", reason="triton is not installed (pip install '.[test]')")

from dwarfstar.kernels import moe_nvrtc  # noqa: E402
from dwarfstar.kernels.moe import (  # noqa: E402
    iq2xxs_grid64, moe_decode, moe_decode_ref, moe_down, moe_down_ref, moe_gate_up, moe_gate_up_ref, quantize_act,
    quantize_act_ref,
)
from dwarfstar.kernels.repack import repack  # noqa: E402
from dwarfstar.kernels.synth import random_raw  # noqa: E402

FORMATS = [T.IQ2_XXS, T.Q2_K, T.Q4_K]
LIMIT = 10.0


def oracle_experts(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], ids: torch.Tensor) -> torch.Tensor:
    """float64 [B, K, N, K_in] of the selected experts, from gguf-py's numpy dequantisation."""
    e, n, k = shape
    picked = raw.reshape(e, -1)[ids.reshape(-1).long()].cpu().numpy().reshape(ids.numel() * n, -1)
    return torch.from_numpy(dequantize(picked, ggml_type)).double().reshape(*ids.shape, n, k)


def experts(ggml_type, shape, gen):
    raw = random_raw(ggml_type, shape, gen)
    return raw, repack(raw, ggml_type, shape)


def routing(n_tok, k, n_exp, gen):
    dev = gen.device
    ids = torch.stack([torch.randperm(n_exp, generator=gen, device=dev)[:k] for _ in range(n_tok)]).int()
    weights = torch.rand(n_tok, k, generator=gen, device=dev) + 0.1
    return ids.contiguous(), weights


def check_gate_up(ggml_type, n_exp, f, d, n_tok, k, gen, check, limit=LIMIT):
    raw_g, gate = experts(ggml_type, (n_exp, f, d), gen)
    raw_u, up = experts(ggml_type, (n_exp, f, d), gen)
    ids, weights = routing(n_tok, k, n_exp, gen)
    x = torch.randn(n_tok, d, generator=gen, device=gen.device)
    xd = x.double().cpu()
    g = torch.einsum("bkfd,bd->bkf", oracle_experts(raw_g, ggml_type, (n_exp, f, d), ids), xd)
    v = torch.einsum("bkfd,bd->bkf", oracle_experts(raw_u, ggml_type, (n_exp, f, d), ids), xd)
    # Rescale x (the products are linear in it) so that gate/up values have rms limit / 2, as in
    # the real model: some pass the clamp on both sides, most stay in silu's curved range.
    s = 5.0 / g.pow(2).mean().sqrt().item()
    x, g, v = x * s, g * s, v * s
    mid = moe_gate_up(gate, up, x, ids, weights, limit, out=torch.full((n_tok, k, f), float("nan"), device=x.device))
    twin = moe_gate_up_ref(gate, up, x, ids, weights, limit)
    if limit > 0:
        g, v = g.clamp(max=limit), v.clamp(-limit, limit)
    expected = weights.double().cpu()[..., None] * F.silu(g) * v
    check(mid, twin, "int8_vs_twin")
    check(twin, expected, "int8_act_swiglu")


def check_down(ggml_type, n_exp, d, f, n_tok, k, gen, check):
    raw, down = experts(ggml_type, (n_exp, d, f), gen)
    ids, _ = routing(n_tok, k, n_exp, gen)
    mid = torch.randn(n_tok, k, f, generator=gen, device=gen.device)
    y = moe_down(down, mid, ids, out=torch.full((n_tok, d), float("nan"), device=mid.device))
    expected = torch.einsum("bkdf,bkf->bd", oracle_experts(raw, ggml_type, (n_exp, d, f), ids), mid.double().cpu())
    check(y, moe_down_ref(down, mid, ids), "int8_vs_twin")
    check(moe_down_ref(down, mid, ids), expected, "int8_act")


def check_quantize(rows, n, gen):
    """The packed int8 activations equal the twin's integers and scales exactly."""
    a = torch.randn(rows, n, generator=gen, device=gen.device) * torch.rand(rows, 1, generator=gen, device=gen.device)
    a[0, :32] = 0  # an all-zero block: scale 0, q 0
    words, scale, qsum = quantize_act(a)
    q, s = quantize_act_ref(a)
    q = q.to(torch.int32)
    b = q.reshape(rows, -1, 4) & 255
    packed = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    assert torch.equal(words, packed)
    assert torch.equal(scale, s)
    assert torch.equal(qsum, q.reshape(rows, -1, 16).sum(-1, dtype=torch.int32))


def test_quantize_act_tiny(gen):
    check_quantize(3, 512, gen)


# F = 37 / D = 41 leave a ragged last row block; two tokens with three experts each, one
# expert shared between them in some draws (5 experts).
@pytest.mark.parametrize("ggml_type", FORMATS, ids=lambda t: t.name)
def test_moe_gate_up_tiny(ggml_type, gen, check):
    check_gate_up(ggml_type, 5, 37, 512, 2, 3, gen, check)


@pytest.mark.parametrize("ggml_type", FORMATS, ids=lambda t: t.name)
def test_moe_down_tiny(ggml_type, gen, check):
    check_down(ggml_type, 5, 41, 512, 2, 3, gen, check)


def test_moe_gate_up_without_clamp(gen, check):
    """limit <= 0 means no clamp (ds4 and the official model), not a clamp at 0. 2 x 2 x 64
    outputs: with 32 (16 rows, 1 token) the int8 error's relative L2 had a tail past the
    int8_act_swiglu bound (4 of 300 seeds, up to 0.064; CI failed once on one)."""
    check_gate_up(T.Q2_K, 3, 64, 512, 2, 2, gen, check, limit=0.0)


def test_moe_decode_matches_twin(gen, check):
    """gate/up -> down end to end; the down input is re-quantised, so a 1-ulp difference in mid
    can flip one int8 rounding: compared at the int8_act bound, not int8_vs_twin."""
    n_exp, f, d = 4, 256, 256
    gate, up = experts(T.IQ2_XXS, (n_exp, f, d), gen)[1], experts(T.IQ2_XXS, (n_exp, f, d), gen)[1]
    down = experts(T.Q2_K, (n_exp, d, f), gen)[1]
    ids, weights = routing(1, 2, n_exp, gen)
    x = torch.randn(1, d, generator=gen, device=gen.device)
    y = moe_decode(gate, up, down, x, ids, weights, LIMIT)
    check(y, moe_decode_ref(gate, up, down, x, ids, weights, LIMIT), "int8_act")


def test_launchers_reject_bad_inputs(gen):
    _, w = experts(T.Q2_K, (2, 8, 256), gen)
    ids, weights = routing(1, 2, 2, gen)
    x = torch.randn(1, 256, device=gen.device)
    with pytest.raises(AssertionError, match="float32"):
        moe_gate_up(w, w, x.half(), ids, weights, LIMIT)
    with pytest.raises(AssertionError, match="int32"):
        moe_gate_up(w, w, x, ids.long(), weights, LIMIT)
    with pytest.raises(AssertionError, match="mid"):
        moe_down(w, torch.randn(1, 2, 8, device=gen.device), ids)


@pytest.mark.gpu
def test_quantize_act_gpu(gen):
    check_quantize(64, 4096, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("n_tok", [1, 3], ids=["B1", "B3"])
@pytest.mark.parametrize("ggml_type", FORMATS, ids=lambda t: t.name)
def test_moe_gpu_flash_shapes(ggml_type, n_tok, gen, check):
    check_gate_up(ggml_type, 256, 2048, 4096, n_tok, 6, gen, check)
    check_down(ggml_type, 256, 4096, 2048, n_tok, 6, gen, check)


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type", FORMATS, ids=lambda t: t.name)
def test_moe_gpu_asm_equals_integer_path(ggml_type, gen):
    """dp4a asm and the plain-integer fallback compute the same integers: equal bit for bit."""
    _, gate = experts(ggml_type, (8, 512, 1024), gen)
    _, down = experts(ggml_type, (8, 1024, 512), gen)
    ids, weights = routing(2, 6, 8, gen)
    x = torch.randn(2, 1024, generator=gen, device="cuda")
    mid = moe_gate_up(gate, gate, x, ids, weights, LIMIT, use_asm=True)
    assert torch.equal(mid, moe_gate_up(gate, gate, x, ids, weights, LIMIT, use_asm=False))
    assert torch.equal(moe_down(down, mid, ids, use_asm=True), moe_down(down, mid, ids, use_asm=False))


@pytest.mark.gpu
def test_moe_graph_replay_matches_eager(gen):
    """Captured in a CUDA graph, replay on new ids/weights/x equals eager launches bit for bit."""
    gate, up = experts(T.IQ2_XXS, (16, 2048, 4096), gen)[1], experts(T.IQ2_XXS, (16, 2048, 4096), gen)[1]
    down = experts(T.Q2_K, (16, 4096, 2048), gen)[1]
    ids, weights = routing(2, 6, 16, gen)
    x = torch.randn(2, 4096, generator=gen, device="cuda")
    mid = moe_gate_up(gate, up, x, ids, weights, LIMIT)
    y = moe_down(down, mid, ids)  # warm-up compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_gate_up(gate, up, x, ids, weights, LIMIT, out=mid)
        moe_down(down, mid, ids, out=y)
    new_ids, new_w = routing(2, 6, 16, gen)
    ids.copy_(new_ids)
    weights.copy_(new_w)
    x.copy_(torch.randn(2, 4096, generator=gen, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, moe_decode(gate, up, down, x, ids, weights, LIMIT))


# (experts, F, D, tokens): the Flash shapes, and F = 1001 / D = 2304 (ragged row steps; a partly
# filled second piece per lane).
NVRTC_CASES = {"flash_B1": (256, 2048, 4096, 1), "flash_B3": (256, 2048, 4096, 3),
               "F1001_D2304_B2": (16, 1001, 2304, 2)}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(NVRTC_CASES))
@pytest.mark.parametrize("warps", [4, 8, 16])
def test_nvrtc_gate_up_equals_triton(warps, case, gen, monkeypatch):
    """The CUDA C IQ2_XXS gate/up (default on CUDA; moe_nvrtc.ROWS_WARPS per block, production and the
    sizes bench/moe_bench.py --nvrtc-kernels times) and the Triton kernel: same integer dots, fp32 sums in
    another order and expf vs tl.sigmoid -> within 1e-5 relative L2."""
    monkeypatch.setattr(moe_nvrtc, "ROWS_WARPS", warps)
    n_exp, f, d, n_tok = NVRTC_CASES[case]
    _, gate = experts(T.IQ2_XXS, (n_exp, f, d), gen)
    _, up = experts(T.IQ2_XXS, (n_exp, f, d), gen)
    ids, weights = routing(n_tok, 6, n_exp, gen)
    x = torch.randn(n_tok, d, generator=gen, device="cuda") * 0.3
    got = moe_gate_up(gate, up, x, ids, weights, LIMIT, out=torch.full((n_tok, 6, f), float("nan"), device="cuda"))
    want = moe_gate_up(gate, up, x, ids, weights, LIMIT, use_asm=True)
    assert not got.isnan().any()
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.gpu
def test_nvrtc_gate_up_reads_routing_of_the_launch_before(gen):
    """Decode's order in a CUDA graph: the routing kernel writes ids and weights, and the CUDA C gate/up
    launched right after it (a programmatic dependent where PDL is on: it fills its tables before
    `griddepcontrol.wait`) must read this replay's routing, never the last one's. Five replays with new
    router logits each (new ids), each against the same launches run eagerly one at a time."""
    from dwarfstar.kernels.route import route

    n_exp, f, d, k = 256, 2048, 4096, 6
    _, gate = experts(T.IQ2_XXS, (n_exp, f, d), gen)
    _, up = experts(T.IQ2_XXS, (n_exp, f, d), gen)
    x = torch.randn(1, d, generator=gen, device="cuda") * 0.3
    xq = quantize_act(x)
    logits = torch.randn(1, n_exp, generator=gen, device="cuda")
    token = torch.zeros(1, dtype=torch.int64, device="cuda")
    bias = torch.zeros(n_exp, device="cuda")
    out = torch.empty(1, k, f, device="cuda")

    def step():
        ids, wts = route(logits, token, bias, None, k, True, 1.0)
        return ids, moe_gate_up(gate, up, x, ids, wts, LIMIT, out=out, xq=xq)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids_g, _ = step()
    for _ in range(5):
        logits.copy_(torch.randn(1, n_exp, generator=gen, device="cuda") * 4)
        graph.replay()
        torch.cuda.synchronize()
        got = out.clone()
        want_ids, want = step()
        torch.cuda.synchronize()
        assert torch.equal(ids_g, want_ids)
        assert torch.equal(got, want)


def test_iq2xxs_sign_masks_and_octet_math():
    """The CUDA C kernel's sign masks (moe_nvrtc.iq2xxs_sign_masks) and its octet math (octet_dot_rep) in
    numpy, for all 128 sign fields x 256 grid rows: mask byte i is 0xFF iff element i is negative (7
    stored bits, the 8th their parity), and the per-byte weights of dp4a(g ^ m, x) - dp4a(m, x) equal
    gguf's ksigns x grid, so the integer dot of every group is exact for any activations."""
    masks = moe_nvrtc.iq2xxs_sign_masks("cpu").numpy().view(np.uint8).reshape(128, 8)
    s = np.arange(128, dtype=np.uint32)
    parity = np.array([bin(v).count("1") & 1 for v in range(128)], dtype=np.uint32)
    bits = (((s | parity << 7)[:, None] >> np.arange(8, dtype=np.uint32)) & 1).astype(np.uint8)  # [128, 8]
    assert np.array_equal(masks, bits * np.uint8(0xFF))
    grid = iq2xxs_grid64("cpu").numpy().view(np.uint8).reshape(256, 8)
    g = grid[None, :, :]  # [1, 256, 8]
    m = masks[:, None, :]  # [128, 1, 8]
    new = (g ^ m).view(np.int8).astype(np.int32) - m.view(np.int8).astype(np.int32)  # [128, 256, 8]
    ksigns = np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8)
    sign = np.where((ksigns[:, None] >> np.arange(8, dtype=np.uint8)) & 1, -1, 1)  # [128, 8]
    assert np.array_equal(new, sign[:, None, :] * grid[None, :, :].astype(np.int32))
