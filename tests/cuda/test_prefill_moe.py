"""Grouped prefill MoE (kernels/prefill_moe.py) vs forward.py's per-expert loop (CPU) and vs the
decode kernels (kernels/moe.py, GPU, Flash shapes).

The loop (`ForwardModel.moe_chunk` on a CPU) is the independent twin: the same function written
one expert at a time with fp32 matmuls. In float32 the grouped path differs from it by summation
order only; in fp16 by the rounding of the GEMM inputs.
"""

import dataclasses

import pytest
import torch

from dwarfstar.engine.cuda_engine import CudaEngine
from dwarfstar.engine.engine import EngineOptions
from dwarfstar.gguf.synth import TINY, synthesize
from dwarfstar.kernels.prefill_moe import matmul_f32, prefill_moe
from dwarfstar.model.forward import TWIN_INT8_OPS, TWIN_OPS, int8_round
from dwarfstar.model.moe import stable_topk as sort_topk

CONFIG = dataclasses.replace(TINY, n_layers=2, compress_ratios=(0, 0), swiglu_limits=(10.0, 1.5), n_hash_layers=1)
T = 48


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("prefill_moe") / "tiny.gguf", config=CONFIG)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU loop path (GPU: the gpu test below)")
@pytest.mark.parametrize("int8", [True, False])
def test_grouped_matches_expert_loop(model_path, int8, tol, single_thread):
    ops = TWIN_INT8_OPS if int8 else TWIN_OPS
    model = CudaEngine.load(model_path, EngineOptions(backend="cuda", ctx=64), ops=ops).model
    gen = torch.Generator().manual_seed(11)
    act = int8_round if int8 else (lambda a: a)
    for layer in model.layers:                 # layer 0 hash-routed (limit 10), layer 1 top-k (limit 1.5: clamps)
        x = torch.randn(T, CONFIG.dim, generator=gen)
        tokens = torch.randint(0, CONFIG.vocab_size, (T,), generator=gen)
        want = model.moe_chunk(x, tokens, layer) - model.shared(x, layer)
        sel, wts = model.route(x, tokens, layer, sort_topk)
        w = layer.w
        # Small batches: several expert batches, and an expert with more pairs than max_rows.
        got = prefill_moe(w["w1"], w["w3"], w["w2"], x, sel, wts, layer.swiglu_limit, act, torch.float32,
                          max_bytes=3 * 2 * CONFIG.dim * CONFIG.moe_inter_dim * 4, max_rows=8)
        assert _rel(got, want) <= tol("prefill_moe_fp32"), layer
        half = prefill_moe(w["w1"], w["w3"], w["w2"], x, sel, wts, layer.swiglu_limit, act, torch.float16)
        assert _rel(half, want) <= tol("prefill_moe_fp16"), layer


def test_matmul_f32_rounds_inputs_only():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 64, generator=gen), torch.randn(3, 7, 64, generator=gen)
    want = a.half().double() @ b[0].half().double().T
    got = matmul_f32(a, b[0].half(), torch.float16)
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-3
    assert torch.equal(matmul_f32(a, b[0], torch.float32), a @ b[0].T)
    batched = matmul_f32(a.expand(3, -1, -1), b.half(), torch.float16)
    assert batched.shape == (3, 5, 7) and batched.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["q2", "q4"])
def test_fp16_grouped_matches_decode_kernels_flash(experts, tol):
    """Flash expert shapes (256 x 2048 x 4096), 512 tokens with 6 distinct experts each: the
    grouped fp16 path vs the decode kernels over the same tokens (int8 activations both)."""
    from dwarfstar.engine.cuda_engine import dummy_tensors, flash_config
    from dwarfstar.kernels.moe import moe_decode

    config = flash_config(1)
    t = dummy_tensors(config, "cuda", experts, progress=False)
    w1, w3, w2 = (t[f"blk.0.ffn_{n}_exps.weight"] for n in ("gate", "up", "down"))
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(512, config.dim, generator=gen, device="cuda")
    sel = torch.rand(512, config.n_routed_experts, generator=gen, device="cuda").topk(6).indices
    wts = torch.rand(512, 6, generator=gen, device="cuda") + 0.5
    want = moe_decode(w1, w3, w2, x, sel.to(torch.int32), wts, 10.0)
    got = prefill_moe(w1, w3, w2, x, sel, wts, 10.0, int8_round, torch.float16)
    err = _rel(got, want)
    print(f"{experts}: grouped fp16 vs decode kernels rel L2 {err:.3g}")
    assert err <= tol("prefill_moe_fp16")


def test_gemm_dtype_policy():
    from dwarfstar.kernels.prefill_moe import GEMM_DTYPE, gemm_dtype
    from dwarfstar.kernels.repack import PlanarF16, PlanarQ8_0

    router = PlanarF16(torch.zeros(256, 4096, dtype=torch.float16))
    indexer_q_b = PlanarF16(torch.zeros(8192, 1024, dtype=torch.float16))
    q8 = PlanarQ8_0(torch.zeros(64, 64, dtype=torch.int8), torch.zeros(64, 2, dtype=torch.float16))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert gemm_dtype(router, cuda) == torch.float32
    assert gemm_dtype(indexer_q_b, cuda) == GEMM_DTYPE and gemm_dtype(q8, cuda) == GEMM_DTYPE
    assert {gemm_dtype(w, cpu) for w in (router, indexer_q_b, q8)} == {torch.float32}
