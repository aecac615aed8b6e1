"""Planar GPU layouts of the GGUF weight formats, the repack into them, and their dequant twin.

Purpose: raw GGUF blocks interleave scales and quants in 34/66/84/144-byte records, which
makes every kernel load unaligned. At load we transcode each quantised tensor once into
separate, aligned planes (kernels.md §3). The transcode is lossless: the same bits, moved.

Dims: E experts (optional leading axes), N output rows, K inputs (ne[0] of the GGUF tensor),
KB = K / 256 super-blocks per row.

Layouts (all tensors contiguous, leading axes `...` = [E] or nothing):
- `PlanarQ8_0`:    qs int8 [..., N, K], d fp16 [..., N, K/32].
- `PlanarIQ2XXS`:  words int32 [..., N, KB, 16] (the 64 payload bytes of a block: word 2g
                   holds the four grid indices of group g, word 2g+1 its four 7-bit sign
                   indices and the 4-bit group scale in bits 28..31), d fp16 [..., N, KB].
- `PlanarQ2K`:     qs uint8 [..., N, KB, 64], sc uint8 [..., N, KB, 16] (scale | min << 4),
                   dm fp16 [..., N, KB, 2] = (d, dmin).
- `PlanarQ4K`:     qs uint8 [..., N, KB, 128], sc uint8 [..., N, KB, 8], mn uint8 [..., N, KB, 8]
                   (the 12 packed 6-bit bytes expanded), dm fp16 [..., N, KB, 2] = (d, dmin).
- `PlanarF16`:     w fp16 [..., N, K] (unchanged; bf16 would be lossy).

Contract: `repack(raw, ggml_type, shape)` takes the raw bytes (uint8, any shape with the right
byte count, any device) and the torch-order logical shape (..., N, K); it runs in torch ops on
raw's device. `dequantize_planar(p)` returns float32 [..., N, K] equal bit for bit to
`gguf.quants.dequantize` of the raw bytes (same float operations in the same order).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import IQ2_XXS

from dwarfstar.shape import QK8_0, QK_K

# Bytes per block of each format (gguf.md §4).
Q8_0_BYTES = 34
Q2_K_BYTES = 84
Q4_K_BYTES = 144
IQ2_XXS_BYTES = 66


@dataclass(frozen=True)
class PlanarQ8_0:
    qs: torch.Tensor  # [..., N, K] int8
    d: torch.Tensor  # [..., N, K/32] fp16
    ggml_type = T.Q8_0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qs.shape)


@dataclass(frozen=True)
class PlanarIQ2XXS:
    words: torch.Tensor  # [..., N, KB, 16] int32
    d: torch.Tensor  # [..., N, KB] fp16
    ggml_type = T.IQ2_XXS

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, kb, _ = self.words.shape
        return (*lead, kb * QK_K)


@dataclass(frozen=True)
class PlanarQ2K:
    qs: torch.Tensor  # [..., N, KB, 64] uint8
    sc: torch.Tensor  # [..., N, KB, 16] uint8
    dm: torch.Tensor  # [..., N, KB, 2] fp16
    ggml_type = T.Q2_K

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, kb, _ = self.qs.shape
        return (*lead, kb * QK_K)


@dataclass(frozen=True)
class PlanarQ4K:
    qs: torch.Tensor  # [..., N, KB, 128] uint8
    sc: torch.Tensor  # [..., N, KB, 8] uint8
    mn: torch.Tensor  # [..., N, KB, 8] uint8
    dm: torch.Tensor  # [..., N, KB, 2] fp16
    ggml_type = T.Q4_K

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, kb, _ = self.qs.shape
        return (*lead, kb * QK_K)


@dataclass(frozen=True)
class PlanarF16:
    w: torch.Tensor  # [..., N, K] fp16
    ggml_type = T.F16

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)


Planar = PlanarQ8_0 | PlanarIQ2XXS | PlanarQ2K | PlanarQ4K | PlanarF16


def _fields(p: Planar) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(p, f) for f in p.__dataclass_fields__)


def planar_nbytes(p: Planar) -> int:
    """Bytes the planar tensor occupies (what a kernel streams to read all of it)."""
    return sum(t.numel() * t.element_size() for t in _fields(p))


def select_experts(p: Planar, ids: torch.Tensor) -> Planar:
    """The planar tensor restricted to experts `ids` along the leading axis (a gather copy)."""
    return type(p)(*(t.index_select(0, ids.long()) for t in _fields(p)))


@functools.lru_cache(maxsize=None)
def iq2xxs_tables(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid float32 [256, 8] of values 8/25/43, ksigns uint8 [128]) on `device`, from gguf-py.

    Cached per device: these are constants, uploaded once.
    """
    IQ2_XXS.init_grid()
    grid = torch.from_numpy(np.ascontiguousarray(IQ2_XXS.grid.reshape(256, 8), dtype=np.float32))
    ksigns = torch.frombuffer(bytearray(IQ2_XXS.ksigns), dtype=torch.uint8)
    return grid.to(device), ksigns.to(device)


def _blocks(raw: torch.Tensor, shape: tuple[int, ...], block: int, nbytes: int) -> torch.Tensor:
    """raw bytes -> uint8 [..., N, K/block, nbytes], after checking the byte count."""
    *lead, k = shape
    if k % block:
        raise ValueError(f"row length {k} is not a multiple of the block size {block}")
    expected = math.prod(lead) * (k // block) * nbytes
    if raw.dtype != torch.uint8 or raw.numel() != expected:
        raise ValueError(f"expected {expected} uint8 bytes for shape {shape}, got {raw.numel()} {raw.dtype}")
    return raw.reshape(*lead, k // block, nbytes)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2m] -> fp16 [..., m] (little-endian reinterpretation, a copy)."""
    return b.contiguous().view(torch.float16)


def repack(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> Planar:
    """Transcode raw GGUF bytes of logical torch shape (..., N, K) into the planar layout."""
    shape = tuple(int(s) for s in shape)
    if ggml_type == T.F16:
        return PlanarF16(_blocks(raw, shape, 1, 2).contiguous().view(torch.float16).reshape(shape))
    if ggml_type == T.Q8_0:
        b = _blocks(raw, shape, QK8_0, Q8_0_BYTES)
        return PlanarQ8_0(b[..., 2:].contiguous().view(torch.int8).reshape(shape), _f16(b[..., :2])[..., 0])
    if ggml_type == T.IQ2_XXS:
        b = _blocks(raw, shape, QK_K, IQ2_XXS_BYTES)
        return PlanarIQ2XXS(b[..., 2:].contiguous().view(torch.int32), _f16(b[..., :2])[..., 0].contiguous())
    if ggml_type == T.Q2_K:
        b = _blocks(raw, shape, QK_K, Q2_K_BYTES)
        return PlanarQ2K(b[..., 16:80].contiguous(), b[..., :16].contiguous(), _f16(b[..., 80:84]))
    if ggml_type == T.Q4_K:
        b = _blocks(raw, shape, QK_K, Q4_K_BYTES)
        sc, mn = _unpack_q4_k_scales(b[..., 4:16])
        return PlanarQ4K(b[..., 16:].contiguous(), sc, mn, _f16(b[..., :4]))
    raise ValueError(f"no planar layout for ggml type {ggml_type}")


def _unpack_q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes [..., 12] -> (scale [..., 8], min [..., 8]) as 6-bit uint8 (gguf.md §4)."""
    lo, hi, mixed = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (mixed & 15) | ((lo >> 2) & 48)], dim=-1)
    mn = torch.cat([hi & 63, (mixed >> 4) | ((hi >> 2) & 48)], dim=-1)
    return sc.contiguous(), mn.contiguous()


def dequantize_planar(p: Planar, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dtype` [..., N, K]: float32 is bit-exact with gguf's numpy dequantisation of the
    original bytes; another dtype is that float32 result rounded once to it (prefill GEMMs)."""
    shape = p.shape
    if isinstance(p, PlanarF16):
        return p.w.to(dtype)
    if isinstance(p, PlanarQ8_0):
        if dtype == torch.float16:
            # int8 times an fp16 scale needs <= 19 significant bits, so the fp32 product is
            # exact and one rounding to fp16 equals the fp16 multiply: no fp32 matrix.
            q = p.qs.to(dtype).reshape(*shape[:-1], -1, QK8_0)
            return (q * p.d[..., None]).reshape(shape)
        q = p.qs.float().reshape(*shape[:-1], -1, QK8_0)
        return (q * p.d.float()[..., None]).reshape(shape).to(dtype)
    return _dequantize_blocks(p).to(dtype)


def _dequantize_blocks(p: Planar) -> torch.Tensor:
    shape = p.shape
    if isinstance(p, PlanarQ2K):
        return _dequantize_q2_k(p).reshape(shape)
    if isinstance(p, PlanarQ4K):
        return _dequantize_q4_k(p).reshape(shape)
    if isinstance(p, PlanarIQ2XXS):
        return _dequantize_iq2_xxs(p).reshape(shape)
    raise TypeError(f"not a planar tensor: {type(p).__name__}")


def _shifts(values: list[int], device: torch.device) -> torch.Tensor:
    # Cached per device: a fresh torch.tensor upload waits for the stream on every dequantise.
    return _shift_table(tuple(values), str(device))


@functools.lru_cache(maxsize=None)
def _shift_table(values: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _dequantize_q2_k(p: PlanarQ2K) -> torch.Tensor:
    d, dmin = p.dm.float().unbind(-1)
    dl = d[..., None] * (p.sc & 15).float()  # [..., KB, 16]
    ml = dmin[..., None] * (p.sc >> 4).float()
    # byte 32h + l carries elements 128h + 32s + l in bit pairs s = 0..3
    q = p.qs.reshape(*p.qs.shape[:-1], 2, 1, 32) >> _shifts([0, 2, 4, 6], p.qs.device).reshape(4, 1)
    q = (q & 3).reshape(*p.qs.shape[:-1], 16, 16).float()
    return dl[..., None] * q - ml[..., None]


def _dequantize_q4_k(p: PlanarQ4K) -> torch.Tensor:
    d, dmin = p.dm.float().unbind(-1)
    dl = d[..., None] * p.sc.float()  # [..., KB, 8]
    ml = dmin[..., None] * p.mn.float()
    # chunk c of 32 bytes: low nibbles = elements 64c..64c+31, high nibbles the next 32
    q = p.qs.reshape(*p.qs.shape[:-1], 4, 1, 32) >> _shifts([0, 4], p.qs.device).reshape(2, 1)
    q = (q & 15).reshape(*p.qs.shape[:-1], 8, 32).float()
    return dl[..., None] * q - ml[..., None]


def _dequantize_iq2_xxs(p: PlanarIQ2XXS) -> torch.Tensor:
    grid, ksigns = iq2xxs_tables(str(p.words.device))
    w = p.words.reshape(*p.words.shape[:-1], 8, 2).long() & 0xFFFFFFFF
    gw, sw = w[..., 0], w[..., 1]  # [..., KB, 8]
    db = p.d.float()[..., None] * (0.5 + (sw >> 28).float()) * 0.25
    octet = torch.arange(4, device=w.device)
    gi = (gw[..., None] >> (8 * octet)) & 255  # [..., KB, 8, 4]
    si = (sw[..., None] >> (7 * octet)) & 127
    bits = (ksigns[si].long()[..., None] >> torch.arange(8, device=w.device)) & 1  # [..., KB, 8, 4, 8]
    sign = 1.0 - 2.0 * bits.float()
    return (db[..., None, None] * grid[gi]) * sign
