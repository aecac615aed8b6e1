"""GGUF block formats: byte sizes, reference dequantisation in PyTorch, the Q8_0 quantiser.

Contract:
- `dequantize(raw, ggml_type, ne)` takes the tensor's bytes as a 1-D uint8 torch tensor
  (any device; `GGUFFile.raw_torch` gives one) and returns float32 of torch shape
  `reversed(ne)` on the same device. Pure torch ops, vectorised over blocks, so the same
  code serves CPU tests and GPU loading. Results are bit-identical to
  `gguf.quants.dequantize` (same float32 operations in the same order).
  I32 is the one exception: it returns int32, because its only use (`tid2eid`) holds ids,
  which must stay exact.
- `quantize_q8_0(x)` is bit-identical to `gguf.quants.quantize(x, Q8_0)` (and so to ggml
  and ds4): scale `amax/127`, round half away from zero, scale stored as f16.
- `tensor_bytes` / `row_bytes` use gguf's `GGML_QUANT_SIZES`; rows must be whole blocks
  (else `GGUFError`, a `ValueError`).

Each block format below is one unit: its byte layout (gguf.md §4) atop a function
`_dequant_<type>(blocks: uint8 [N, block_bytes]) -> float32 [N, block_elems]`.
Multi-byte fields are little-endian. f16(b) reads two bytes as an IEEE half.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import IQ2_XXS as _GGUF_IQ2_XXS

# Sizes live with the reader (no torch there); re-exported as part of this module's interface.
from dwarfstar.gguf.reader import row_bytes, tensor_bytes  # noqa: F401

QK_K = 256


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """float32 [N, 1] from the f16 at byte `start` of each block."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _u32(bytes4: torch.Tensor) -> torch.Tensor:
    """int64 [..., ] from little-endian u32 fields given as uint8 [..., 4] (no alignment needed)."""
    b = bytes4.long()
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


# ---- F32 / F16 / BF16 / I32: plain little-endian arrays -------------------------------
def _plain(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return raw.contiguous().view(dtype)


# ---- Q8_0: 32 elements, 34 bytes ----------------------------------------------------
#   0..1   d      f16 scale
#   2..33  q[32]  int8
#   x[i] = f16(d) * q[i]
def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = blocks[:, 2:].view(torch.int8).float()
    return q * d


# ---- Q8_K: 256 elements, 292 bytes (never stored in ds4 files; activation format) ----
#   0..3     d       f32 scale
#   4..259   q[256]  int8
#   260..291 bsums   16 x int16 (sums of 16 q each; unused for dequantisation)
#   x[i] = d * q[i]
def _dequant_q8_k(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks[:, 0:4].contiguous().view(torch.float32)
    q = blocks[:, 4:4 + QK_K].view(torch.int8).float()
    return q * d


# ---- Q2_K: 256 elements, 84 bytes, 16 sub-blocks of 16 ---------------------------------
#   0..15   sc[16]  low nibble: scale code, high nibble: min code of sub-block j
#   16..79  qs[64]  2-bit codes; byte 32h+l holds elements 128h + 32s + l in bits 2s..2s+1
#   80..81  d       f16 super-scale
#   82..83  dmin    f16 super-min
#   x[i] = f16(d) * (sc[j] & 15) * q - f16(dmin) * (sc[j] >> 4),  j = i // 16
def _dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    sc = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (sc & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).float()).reshape(n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
    q = (blocks[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3  # [N, half, s, l]
    q = q.reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


# ---- Q4_K: 256 elements, 144 bytes, 8 sub-blocks of 32 ---------------------------------
#   0..1    d       f16
#   2..3    dmin    f16
#   4..15   s[12]   6-bit scale and min per sub-block j:
#                   j < 4:  sc = s[j] & 63,  m = s[j+4] & 63
#                   j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4,  m = (s[j+4] >> 4) | (s[j] >> 6) << 4
#   16..143 qs[128] 4-bit codes; chunk c (64 elements) uses qs[32c .. 32c+31]:
#                   low nibbles = elements 64c + 0..31, high nibbles = 64c + 32..63
#   x[i] = f16(d) * sc_j * q - f16(dmin) * m_j,  j = i // 32
def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, m


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _q4_k_scales(blocks[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * m.float()).reshape(n, 8, 1)
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 2, 1)
    q = (blocks[:, 16:144].reshape(n, 4, 1, 32) >> shifts) & 15  # [N, chunk, nibble, l]
    q = q.reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


# ---- IQ2_XXS: 256 elements, 66 bytes, 8 groups of 32 = 4 octets of 8 -------------------
#   0..1           d     f16
#   2+8g .. 2+8g+3 a[4]  grid index of octet k of group g (u8)
#   2+8g+4 .. +7   w     u32: bits 7k..7k+6 sign index of octet k, bits 28..31 group scale s
#   db = f16(d) * (0.5 + s) * 0.25
#   x[32g + 8k + t] = db * GRID[a[k]][t] * (-1 if bit t of KSIGNS[sign index] else 1)
# GRID (256 x 8 values in {8, 25, 43}) and KSIGNS (7 stored sign bits + parity bit) come
# from the gguf package, checked equal to ds4's tables (gguf.md §4).
_GGUF_IQ2_XXS.init_grid()
_IQ2_GRID = torch.from_numpy(np.ascontiguousarray(_GGUF_IQ2_XXS.grid.reshape(256, 8), dtype=np.float32))
_IQ2_SIGNS = torch.from_numpy(np.frombuffer(_GGUF_IQ2_XXS.ksigns, dtype=np.uint8).copy())
# Sign table expanded to +-1 per element: [128, 8].
_IQ2_SIGN_VALUES = torch.where(
    (_IQ2_SIGNS.long().reshape(128, 1) >> torch.arange(8)) & 1 == 1, -1.0, 1.0).float()
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _iq2_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The constant grid and sign tables on `device` (copied once per device)."""
    if device not in _TABLES:
        _TABLES[device] = (_IQ2_GRID.to(device), _IQ2_SIGN_VALUES.to(device))
    return _TABLES[device]


def _dequant_iq2_xxs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    grid, sign_values = _iq2_tables(blocks.device)
    d = _f16(blocks, 0)
    groups = blocks[:, 2:66].reshape(n, 8, 8)
    index = groups[:, :, 0:4].long()                                   # [N, 8, 4]
    w = _u32(groups[:, :, 4:8])                                        # [N, 8]
    db = d * (0.5 + (w >> 28).float()) * 0.25                          # [N, 8]
    sign_index = (w.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=blocks.device)) & 127
    values = grid[index]                                               # [N, 8, 4, 8]
    signs = sign_values[sign_index]                                    # [N, 8, 4, 8]
    return (db.reshape(n, 8, 1, 1) * values * signs).reshape(n, QK_K)


_BLOCK_DEQUANT = {
    T.Q8_0: _dequant_q8_0,
    T.Q8_K: _dequant_q8_k,
    T.Q2_K: _dequant_q2_k,
    T.Q4_K: _dequant_q4_k,
    T.IQ2_XXS: _dequant_iq2_xxs,
}
_PLAIN = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16, T.I32: torch.int32}
SUPPORTED_TYPES = tuple(_PLAIN) + tuple(_BLOCK_DEQUANT)


def _as_uint8_tensor(raw) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        # Views of the read-only mapping: torch warns about writability; we never write.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(raw.view(np.uint8).reshape(-1))
    if raw.dtype != torch.uint8:
        raise TypeError(f"dequantize: expected uint8 bytes, got {raw.dtype}")
    return raw.reshape(-1)


def dequantize(raw: torch.Tensor, ggml_type: int, ne: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Bytes of a tensor -> float32 (int32 for I32) of torch shape reversed(ne), same device."""
    qtype = T(ggml_type)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"dequantize: unsupported ggml type {qtype.name}")
    raw = _as_uint8_tensor(raw)
    want = tensor_bytes(qtype, ne)
    if raw.numel() != want:
        raise ValueError(f"dequantize: {qtype.name} ne={list(ne)} needs {want} bytes, got {raw.numel()}")
    shape = tuple(reversed(tuple(ne)))
    if qtype in _PLAIN:
        out = _plain(raw, _PLAIN[qtype])
        return (out if qtype == T.I32 else out.float()).reshape(shape)
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    return _BLOCK_DEQUANT[qtype](raw.reshape(-1, block_bytes)).reshape(shape)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float tensor (last dim % 32 == 0) -> Q8_0 bytes, uint8 [..., last/32*34], bit-exact with ggml."""
    if x.shape[-1] % 32:
        raise ValueError(f"quantize_q8_0: last dim {x.shape[-1]} is not a multiple of 32")
    lead = x.shape[:-1]
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    p = blocks * inv
    # Round half away from zero, computed the way ggml/gguf do it (not via torch.round, which is RNE).
    a = p.abs()
    fl = torch.floor(a)
    q = torch.sign(p) * (fl + torch.floor(2 * (a - fl)))
    d_bytes = d.half().view(torch.uint8)                               # [N, 2]
    q_bytes = q.to(torch.int8).view(torch.uint8)                       # [N, 32]
    return torch.cat([d_bytes, q_bytes], dim=1).reshape(*lead, -1)
