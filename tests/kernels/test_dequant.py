"""Expert dequantisation to a low-precision scratch (kernels/dequant.py) and
`dequantize_planar(p, dtype)` (kernels/repack.py) vs gguf's float32 values rounded once.

Oracle: gguf-py's numpy dequantisation (independent of the planar layout), cast to the dtype.
CPU runs use the Triton interpreter at tiny shapes; the `gpu` test uses Flash expert shapes.
"""

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

pytest.importorskip("triton", reason="triton is not installed (pip install '.[test]')")

from dwarfstar.kernels.dequant import dequantize_experts  # noqa: E402
from dwarfstar.kernels.repack import dequantize_planar, repack  # noqa: E402
from dwarfstar.kernels.synth import random_raw  # noqa: E402


def gguf_experts(raw, ggml_type, shape, ids):
    e = shape[0]
    picked = raw.reshape(e, -1)[ids.long()].cpu().numpy().reshape(ids.numel() * shape[1], -1)
    return torch.from_numpy(dequantize(picked, ggml_type)).reshape(ids.numel(), *shape[1:])


@pytest.mark.parametrize("ggml_type", [T.IQ2_XXS, T.Q2_K, T.Q4_K])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantize_experts_exact(ggml_type, dtype, device, gen):
    shape = (5, 3, 512)
    raw = random_raw(ggml_type, shape, gen)
    p = repack(raw, ggml_type, shape)
    ids = torch.tensor([4, 0, 4, 2], device=device)
    got = dequantize_experts(p, ids, dtype)
    want = gguf_experts(raw, ggml_type, shape, ids).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("ggml_type", [T.IQ2_XXS, T.Q2_K, T.Q4_K])
@pytest.mark.parametrize("block_sb", [1, 2, 16])
def test_dequantize_experts_blocking(ggml_type, block_sb, device, gen):
    # n_sb = 7 * 3 = 21 super-blocks an expert: a masked tail program for block_sb 2 and 16 (and
    # 16 > n_sb); 21 * 32 = 672 octets an expert reach most IQ2_XXS grid rows and sign patterns.
    shape = (4, 7, 768)
    raw = random_raw(ggml_type, shape, gen)
    p = repack(raw, ggml_type, shape)
    ids = torch.tensor([3, 1, 3], device=device)
    want = gguf_experts(raw, ggml_type, shape, ids)
    # bf16 on the GPU only: the Triton interpreter's float32 -> bf16 cast truncates (so the old
    # per-element kernel differs from the twin there too); the GPU's cvt rounds to nearest even.
    dtypes = (torch.float16, torch.float32) + ((torch.bfloat16,) if device == "cuda" else ())
    for dtype in dtypes:
        got = dequantize_experts(p, ids, dtype, block_sb=block_sb)
        assert torch.equal(got.cpu(), want.to(dtype))
    # no experts selected: no launch, an empty result
    assert dequantize_experts(p, ids[:0], block_sb=block_sb).shape == (0, 7, 768)


# block bytes and the offsets of its fp16 d / dmin (gguf's block layouts)
BLOCK_BYTES = {T.IQ2_XXS: (66, (0,)), T.Q2_K: (84, (80, 82)), T.Q4_K: (144, (0, 2))}


@pytest.mark.parametrize("ggml_type", [T.IQ2_XXS, T.Q2_K, T.Q4_K])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_dequantize_experts_any_bytes(ggml_type, device, gen):
    # Every byte random (d / dmin any finite fp16: negative, subnormal, fp16-overflowing
    # products), some d = 0: 2 * 16 * 4 super-blocks = 4096 octets, every IQ2_XXS grid row and
    # sign pattern many times over.
    shape = (2, 16, 1024)
    nbytes, d_offs = BLOCK_BYTES[ggml_type]
    raw = torch.randint(0, 256, (2 * 16 * 4, nbytes), generator=gen, device=device, dtype=torch.uint8)
    for off in d_offs:
        hi = raw[:, off + 1]
        raw[:, off + 1] = torch.where((hi & 0x7C) == 0x7C, hi & 0x83, hi)
    raw[:8, d_offs[0]:d_offs[0] + 2] = 0
    raw = raw.reshape(-1)
    p = repack(raw, ggml_type, shape)
    ids = torch.tensor([1, 0], device=device)
    want = gguf_experts(raw, ggml_type, shape, ids)
    for dtype in (torch.float16, torch.float32):
        assert torch.equal(dequantize_experts(p, ids, dtype).cpu(), want.to(dtype))


@pytest.mark.parametrize("ggml_type,shape", [(T.Q8_0, (6, 64)), (T.Q2_K, (2, 256)), (T.F16, (4, 32))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_planar_dtype_is_one_rounding(ggml_type, shape, dtype, device, gen):
    raw = random_raw(ggml_type, shape, gen)
    p = repack(raw, ggml_type, shape)
    exact = dequantize_planar(p)
    got = dequantize_planar(p, dtype)
    assert got.dtype == dtype and torch.equal(got, exact.to(dtype))
    # The default stays float32 and gguf-exact (test_repack.py checks it against gguf).
    assert exact.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type,shape", [(T.IQ2_XXS, (256, 2048, 4096)), (T.Q2_K, (256, 4096, 2048)),
                                             (T.Q4_K, (256, 2048, 4096))])
def test_dequantize_experts_flash_shapes(ggml_type, shape):
    gen = torch.Generator(device="cuda").manual_seed(5)
    raw = random_raw(ggml_type, shape, gen)
    p = repack(raw, ggml_type, shape)
    ids = torch.tensor([255, 0, 17, 17, 128], device="cuda")
    got = dequantize_experts(p, ids, torch.float16)
    assert torch.equal(got, dequantize_planar(p.__class__(*(getattr(p, f)[ids] for f in p.__dataclass_fields__)),
                                              torch.float16))
    assert torch.equal(got[:2].cpu(), gguf_experts(raw, ggml_type, shape, ids[:2]).half())
