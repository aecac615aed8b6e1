"""quants.py against gguf-py's numpy implementation (independent oracle), bit for bit.

Tolerance: zero (TOLERANCES["exact"]). Results are compared as raw float32 bit patterns,
which is stricter than torch.equal (it also separates -0.0 from +0.0). Inputs are fresh
random blocks each run (seed printed on failure) with the f16 scale fields patched to
finite values (gguf.md §8.2); every other byte pattern is a valid encoding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from dwarfstar.gguf.quants import dequantize, quantize_q8_0, row_bytes, tensor_bytes

from gguf_helpers import random_blocks

BLOCK_TYPES = (T.Q8_0, T.Q2_K, T.Q4_K, T.IQ2_XXS)
PLAIN_TYPES = (T.F32, T.F16, T.BF16)
# (name, ne in units of the block size along ne[0]): one block, several rows, 3-D experts.
SHAPES = (("one_block", (1,)), ("rows", (3, 5)), ("experts", (2, 3, 4)), ("wide_row", (7, 1)))


def _seed() -> int:
    return int(np.random.SeedSequence().entropy % (1 << 32))


def _ne(qtype, blocks_ne) -> tuple[int, ...]:
    block, _ = GGML_QUANT_SIZES[qtype]
    return (blocks_ne[0] * block, *blocks_ne[1:])


def _oracle(raw: np.ndarray, qtype, ne) -> np.ndarray:
    """gguf-py dequantisation of bytes laid out as rows of ne[0] elements, torch shape."""
    rows = raw.reshape(*reversed(ne[1:]), row_bytes(qtype, ne[0]))
    return np.ascontiguousarray(gguf.quants.dequantize(rows, qtype), dtype=np.float32)


def _assert_bits_equal(got: torch.Tensor, want: np.ndarray, seed: int) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, (got.shape, want.shape)
    same = got.contiguous().view(torch.int32).numpy() == want.view(np.int32)
    assert same.all(), f"seed {seed}: {int((~same).sum())} of {same.size} values differ"


def _plain_values(qtype, n: int, rng: np.random.Generator) -> np.ndarray:
    """Finite values of every magnitude the type holds (random bits minus inf/NaN, plus zeros)."""
    if qtype == T.F16:
        bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF
        return bits.view(np.uint8)
    bits = rng.integers(0, 1 << 32, size=n, dtype=np.uint32)
    bits[(bits & 0x7F800000) == 0x7F800000] &= 0xBFFFFFFF
    bits[:: 7] &= 0x80000000
    if qtype == T.BF16:
        return (bits >> 16).astype(np.uint16).view(np.uint8)
    return bits.view(np.uint8)


@pytest.mark.parametrize("shape_id,blocks_ne", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_dequant_matches_gguf(qtype, shape_id, blocks_ne):
    seed = _seed()
    rng = np.random.default_rng(seed)
    ne = _ne(qtype, blocks_ne)
    raw = random_blocks(qtype, int(np.prod(blocks_ne)), rng).reshape(-1)
    got = dequantize(torch.from_numpy(raw), qtype, ne)
    _assert_bits_equal(got, _oracle(raw, qtype, ne), seed)


@pytest.mark.parametrize("ne", [(1,), (33, 5), (16, 3, 4)], ids=str)
@pytest.mark.parametrize("qtype", PLAIN_TYPES, ids=lambda t: t.name)
def test_plain_dequant_matches_gguf(qtype, ne):
    seed = _seed()
    raw = _plain_values(qtype, int(np.prod(ne)), np.random.default_rng(seed))
    got = dequantize(torch.from_numpy(raw), qtype, ne)
    _assert_bits_equal(got, _oracle(raw, qtype, ne), seed)


def test_i32_stays_integer():
    # gguf-py has no I32 "dequantize"; the oracle is numpy's own int32 view.
    values = np.random.default_rng(_seed()).integers(-(2**31), 2**31, size=(5, 6), dtype=np.int64)
    raw = values.astype("<i4").view(np.uint8).reshape(-1)
    got = dequantize(torch.from_numpy(raw), T.I32, (6, 5))
    assert got.dtype == torch.int32
    assert torch.equal(got, torch.from_numpy(values.astype(np.int32)))


def test_q8_k_formula():
    # gguf-py cannot dequantise Q8_K; oracle: the layout of gguf.md §4 (f32 d, 256 int8) in numpy.
    rng = np.random.default_rng(_seed())
    blocks = rng.integers(0, 256, size=(3, 292), dtype=np.uint8)
    blocks[:, 0:4] = rng.uniform(-1, 1, size=(3, 1)).astype("<f4").view(np.uint8)
    want = blocks[:, 4:260].view(np.int8).astype(np.float32) * blocks[:, 0:4].copy().view("<f4")
    got = dequantize(torch.from_numpy(blocks.reshape(-1)), T.Q8_K, (256, 3))
    _assert_bits_equal(got, want, 0)


def test_numpy_input_and_mmap_style_views():
    rng = np.random.default_rng(_seed())
    raw = random_blocks(T.Q4_K, 4, rng).reshape(-1)
    raw.flags.writeable = False
    got = dequantize(raw, T.Q4_K, (512, 2))
    _assert_bits_equal(got, _oracle(raw, T.Q4_K, (512, 2)), 0)


@pytest.mark.parametrize("lead", [(1,), (5,), (3, 4)], ids=str)
def test_quantize_q8_0_matches_gguf(lead):
    seed = _seed()
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, 96)) * rng.choice([1e-3, 1.0, 300.0])).astype(np.float32)
    x.reshape(-1, 32)[0] = 0.0
    got = quantize_q8_0(torch.from_numpy(x))
    want = gguf.quants.quantize(x, T.Q8_0)
    assert got.dtype == torch.uint8 and tuple(got.shape) == want.shape
    assert np.array_equal(got.numpy(), want), f"seed {seed}"


def test_quantize_q8_0_rounds_half_away_from_zero():
    # d = 127/127 = 1, so every x is its own rounding input; .5 ties go away from zero (not RNE).
    x = np.zeros(32, dtype=np.float32)
    x[0], x[1:9] = 127.0, [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -3.51]
    got = quantize_q8_0(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, gguf.quants.quantize(x, T.Q8_0))
    assert got[2:11].view(np.int8).tolist() == [127, 1, 2, 3, -1, -2, -3, 3, -4]


def test_q8_0_round_trip_error_bound():
    x = torch.randn(4, 64)
    back = dequantize(quantize_q8_0(x).reshape(-1), T.Q8_0, (64, 4))
    # One Q8_0 step is amax/127 per block; rounding costs at most half a step, and storing the
    # step as f16 (relative error <= 2^-11) moves a code of up to 127 by 127 * 2^-11 steps more.
    step = x.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
    bound = step * (0.5 + 127 * 2.0**-11) * (1 + 1e-6)
    assert ((back.reshape(-1, 32) - x.reshape(-1, 32)).abs() <= bound).all()


def test_sizes_match_gguf():
    for qtype in (*PLAIN_TYPES, T.I32, *BLOCK_TYPES, T.Q8_K):
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        ne = (block * 6, 5, 3)
        want = gguf.quants.quant_shape_to_byte_shape(tuple(reversed(ne)), qtype)
        assert row_bytes(qtype, ne[0]) == want[-1]
        assert tensor_bytes(qtype, ne) == int(np.prod(want))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        row_bytes(T.Q4_K, 100)
    with pytest.raises(ValueError, match="needs 144 bytes, got 143"):
        dequantize(torch.zeros(143, dtype=torch.uint8), T.Q4_K, (256,))
    with pytest.raises(ValueError, match="unsupported ggml type Q5_K"):
        dequantize(torch.zeros(176, dtype=torch.uint8), T.Q5_K, (256,))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", BLOCK_TYPES + PLAIN_TYPES, ids=lambda t: t.name)
def test_cuda_matches_cpu(qtype):
    rng = np.random.default_rng(_seed())
    ne = _ne(qtype, (3, 4, 2))
    if qtype in PLAIN_TYPES:
        raw = _plain_values(qtype, int(np.prod(ne)), rng)
    else:
        raw = random_blocks(qtype, 24, rng).reshape(-1)
    cpu = dequantize(torch.from_numpy(raw), qtype, ne)
    gpu = dequantize(torch.from_numpy(raw).cuda(), qtype, ne)
    assert gpu.is_cuda
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))
    x = torch.randn(8, 64)
    assert torch.equal(quantize_q8_0(x.cuda()).cpu(), quantize_q8_0(x))
