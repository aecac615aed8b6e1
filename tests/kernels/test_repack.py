"""Repack into planar layouts: lossless, checked bit-exactly against gguf's numpy dequantisation."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from dwarfstar.kernels.repack import dequantize_planar, planar_nbytes, repack, select_experts
from dwarfstar.kernels.synth import random_raw

FORMATS = [T.Q8_0, T.IQ2_XXS, T.Q2_K, T.Q4_K, T.F16]


def gguf_dequant(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The independent oracle: gguf-py's numpy dequantisation of the raw bytes (float32)."""
    rows = raw.cpu().numpy().reshape(int(np.prod(shape[:-1])), -1)
    return torch.from_numpy(dequantize(rows, ggml_type).reshape(shape))


@pytest.mark.parametrize("ggml_type", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(7, 512), (3, 5, 256)], ids=["NK", "ENK"])
def test_repack_is_lossless(ggml_type, shape, gen, check):
    raw = random_raw(ggml_type, shape, gen)
    planar = repack(raw, ggml_type, shape)
    assert planar.shape == shape
    # Same information, no padding: planar bytes equal raw bytes except Q4_K's +4 B per block
    # (12 packed scale bytes expanded to 16) .
    extra = raw.numel() // 144 * 4 if ggml_type == T.Q4_K else 0
    assert planar_nbytes(planar) == raw.numel() + extra
    check(dequantize_planar(planar), gguf_dequant(raw, ggml_type, shape), "exact")
    assert torch.equal(dequantize_planar(planar).cpu(), gguf_dequant(raw, ggml_type, shape))


def test_select_experts_matches_slices(gen):
    shape = (4, 3, 256)
    planar = repack(random_raw(T.Q2_K, shape, gen), T.Q2_K, shape)
    ids = torch.tensor([2, 0, 2], device=gen.device)
    full = dequantize_planar(planar)
    assert torch.equal(dequantize_planar(select_experts(planar, ids)), full[ids.long()])


def test_wrong_byte_count_is_refused(gen):
    raw = random_raw(T.Q8_0, (2, 64), gen)
    with pytest.raises(ValueError, match="expected 136 uint8 bytes"):
        repack(raw[:-1], T.Q8_0, (2, 64))
    with pytest.raises(ValueError, match="not a multiple"):
        repack(raw, T.IQ2_XXS, (1, 100))


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type,shape", [
    (T.Q8_0, (1024, 4096)), (T.Q8_0, (32768, 1024)), (T.F16, (1024, 4096)),
    (T.IQ2_XXS, (4, 2048, 4096)), (T.Q2_K, (4, 4096, 2048)), (T.Q4_K, (4, 2048, 4096)),
], ids=lambda v: getattr(v, "name", None) or "x".join(map(str, v)))
def test_repack_on_gpu_real_shapes(ggml_type, shape):
    """Repack on the GPU (the load path) at Flash shapes; a few experts keep the CPU oracle quick."""
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    raw = random_raw(ggml_type, shape, gen)
    planar = repack(raw, ggml_type, shape)
    assert torch.equal(dequantize_planar(planar).cpu(), gguf_dequant(raw, ggml_type, shape))
