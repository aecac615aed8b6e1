"""Prefill Q8_0 GEMM on int8 activations (kernels/prefill_q8.py) vs an independent float64 oracle
(gguf's dequantisation times the activations rounded by the rule, tests/kernels/test_matvec_int8),
and against the decode mat-vec on the same codes: the chunk and decode forms must agree to fp32
order. CPU: Triton interpreter at tiny shapes; `gpu`: Flash shapes."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

pytest.importorskip("triton", reason="triton is not installed (pip install '.[test]')")

from dwarfstar.kernels.matvec_int8 import matvec_q8  # noqa: E402
from dwarfstar.kernels.moe import quantize_act  # noqa: E402
from dwarfstar.kernels.prefill_q8 import gemm_q8, gemm_q8_ref  # noqa: E402
from dwarfstar.kernels.repack import repack  # noqa: E402
from dwarfstar.kernels.synth import random_raw  # noqa: E402
from tests.kernels.test_matvec import oracle_weight  # noqa: E402
from tests.kernels.test_matvec_int8 import int8_rounded  # noqa: E402


def case(shape, t, gen, check, tiles=None):
    raw = random_raw(T.Q8_0, shape, gen)
    w = repack(raw, T.Q8_0, shape)
    g, n, k = (1, *shape) if len(shape) == 2 else shape
    x = torch.randn(t, g * k, generator=gen, device=gen.device)
    x[0, :32] = 0                                                     # an all-zero block
    wf = oracle_weight(raw, T.Q8_0, shape).reshape(g, n, k)
    expected = torch.einsum("tgk,gnk->tgn", int8_rounded(x).view(t, g, k), wf).reshape(t, g * n)
    y = gemm_q8(w, quantize_act(x), tiles)
    check(y, expected, "int8_vs_twin")
    check(gemm_q8_ref(w, x), expected, "int8_vs_twin")
    return w, x, y


# T = 19 and N = 40 leave ragged tiles; K = 512 with BLOCK_K 256: two K steps of 8 blocks.
def test_gemm_q8_tiny(gen, check):
    w, x, y = case((40, 512), 19, gen, check, tiles=(16, 32, 256, 4, 2))
    # The decode mat-vec on a row of the same chunk: the same function, fp32 order apart.
    row = matvec_q8(w, quantize_act(x[3:4].contiguous()), tiling=(8, 256, 4))
    check(row, y[3:4].double().cpu(), "int8_vs_twin")


def test_gemm_q8_grouped_tiny(gen, check):
    case((3, 24, 256), 17, gen, check, tiles=(16, 16, 128, 4, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,t", [((1536, 4096), 512), ((32768, 1024), 300), ((4096, 8192), 512),
                                     ((8, 1024, 4096), 512), ((4096, 2048), 77)])
def test_gemm_q8_gpu_flash_shapes(shape, t, gen, check):
    case(shape, t, gen, check)
