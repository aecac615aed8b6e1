"""GGUF v3 writer: header, typed metadata, tensor directory, aligned tensor data, streamed.

Contract (gguf.md §1.1, §1.5):
- `write_gguf(path, metadata, tensors)` writes exactly the keys given, in the order given
  (nothing is added: no `general.architecture`, no `general.alignment`), then one
  tensor-info record per tensor and the tensor data, each tensor starting at a multiple
  of 32 bytes and zero-padded to 32 bytes (also the last one).
- Metadata values are plain Python or `Value(value, vtype, sub_type)` where the Python
  type is ambiguous. Plain values are typed as ds4 expects (gguf.md §2.1, §7.1):
  int -> UINT32, float -> FLOAT32, bool -> BOOL, str -> STRING, list of str -> STRING
  array, list of int -> INT32 array, list of float -> FLOAT32 array, list of bool -> BOOL
  array. Empty strings and empty arrays are written like any other value (gguf-py's
  `add_string("")` / `add_array([])` silently drop them); an empty array needs an
  explicit `Value(..., sub_type=...)` since its element type cannot be guessed.
- Tensors are `TensorSource(name, ne, ggml_type, data)` or the equivalent 4-tuple. `ne` is
  GGUF order (innermost first). `data` is bytes-like / numpy / torch (written as raw
  bytes) or a zero-argument callable returning an iterable of such chunks; callables are
  called only when their tensor's turn comes, so a full-size model never sits in memory.
  The byte count must equal `tensor_bytes(ggml_type, ne)`, else `ValueError`.
- The file is written to `<path>.part` and renamed at the end: a failed write leaves no
  truncated file under the final name.

Why not gguf.GGUFWriter: its empty-value traps, its auto-added architecture key and its
byte-shape convention for uint8 data (gguf.md §1.5) all need working around, and it
packs arrays element by element; the container itself is ~100 lines.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32
# Numeric value types: numpy little-endian dtype of one element.
_NUMERIC = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "<u1",
}
_INT_RANGES = {
    GGUFValueType.UINT8: (0, 2**8), GGUFValueType.INT8: (-(2**7), 2**7),
    GGUFValueType.UINT16: (0, 2**16), GGUFValueType.INT16: (-(2**15), 2**15),
    GGUFValueType.UINT32: (0, 2**32), GGUFValueType.INT32: (-(2**31), 2**31),
    GGUFValueType.UINT64: (0, 2**64), GGUFValueType.INT64: (-(2**63), 2**63),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Write chunks of at most this size when a source hands over one big buffer.
_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class Value:
    """A metadata value with an explicit GGUF type (`sub_type` = element type of an ARRAY)."""
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


Chunk = Union[bytes, bytearray, memoryview, np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class TensorSource:
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    data: Union[Chunk, Callable[[], Iterable[Chunk]]]

    @property
    def n_bytes(self) -> int:
        return tensor_bytes(self.ggml_type, self.ne)


def tensor_bytes(ggml_type: int, ne: Sequence[int]) -> int:
    """Bytes of a tensor: whole blocks along ne[0] (which must be a multiple of the block)."""
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if not ne or any(int(n) <= 0 for n in ne):
        raise ValueError(f"tensor dims must be positive, got ne={list(ne)}")
    if ne[0] % block:
        raise ValueError(f"ne[0]={ne[0]} is not a multiple of the {GGMLQuantizationType(ggml_type).name} "
                         f"block of {block}")
    n = 1
    for d in ne:
        n *= int(d)
    return n // block * block_bytes


def pad_to(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def typed(value: Any) -> Value:
    """The GGUF type a plain Python metadata value gets (see the module contract)."""
    if isinstance(value, Value):
        return value
    if isinstance(value, (bool, np.bool_)):
        return Value(bool(value), GGUFValueType.BOOL)
    if isinstance(value, (int, np.integer)):
        return Value(int(value), GGUFValueType.UINT32)
    if isinstance(value, (float, np.floating)):
        return Value(float(value), GGUFValueType.FLOAT32)
    if isinstance(value, str):
        return Value(value, GGUFValueType.STRING)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty array needs an explicit element type: Value([], ARRAY, sub_type)")
        kinds = {_element_type(v) for v in value}
        if len(kinds) == 2 and kinds == {GGUFValueType.INT32, GGUFValueType.FLOAT32}:
            kinds = {GGUFValueType.FLOAT32}
        if len(kinds) != 1:
            raise ValueError(f"array elements of mixed types: {sorted(k.name for k in kinds)}")
        return Value(list(value), GGUFValueType.ARRAY, kinds.pop())
    raise ValueError(f"cannot type metadata value of Python type {type(value).__name__}")


def _element_type(v: Any) -> GGUFValueType:
    if isinstance(v, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(v, (int, np.integer)):
        return GGUFValueType.INT32
    if isinstance(v, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(v, str):
        return GGUFValueType.STRING
    raise ValueError(f"unsupported array element type {type(v).__name__}")


def _string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return _U64.pack(len(raw)) + raw


def _scalar(value: Any, vtype: GGUFValueType, key: str) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype in _INT_RANGES:
        lo, hi = _INT_RANGES[vtype]
        if isinstance(value, bool) or not lo <= int(value) < hi:
            raise ValueError(f"{key}: {value!r} does not fit {vtype.name}")
    return np.asarray(value, dtype=_NUMERIC[vtype]).tobytes()


def _encode_value(key: str, v: Value) -> bytes:
    """Value type + payload of one KV record."""
    head = _U32.pack(v.vtype)
    if v.vtype != GGUFValueType.ARRAY:
        if v.vtype not in _NUMERIC and v.vtype != GGUFValueType.STRING:
            raise ValueError(f"{key}: unsupported value type {v.vtype!r}")
        return head + _scalar(v.value, v.vtype, key)
    if v.sub_type is None:
        raise ValueError(f"{key}: an ARRAY value needs sub_type")
    items = list(v.value)
    head += _U32.pack(v.sub_type) + _U64.pack(len(items))
    if v.sub_type == GGUFValueType.STRING:
        return head + b"".join(_string(s) for s in items)
    if v.sub_type not in _NUMERIC:
        raise ValueError(f"{key}: unsupported array element type {v.sub_type!r}")
    if v.sub_type in _INT_RANGES and items:
        lo, hi = _INT_RANGES[v.sub_type]
        if min(items) < lo or max(items) >= hi:
            raise ValueError(f"{key}: array values do not fit {v.sub_type.name}")
    return head + np.asarray(items, dtype=_NUMERIC[v.sub_type]).tobytes()


def encode_metadata(metadata: dict[str, Any]) -> bytes:
    """All KV records, in dict order."""
    return b"".join(_string(key) + _encode_value(key, typed(value)) for key, value in metadata.items())


def _tensor_infos(tensors: Sequence[TensorSource], alignment: int) -> bytes:
    out, offset, seen = [], 0, set()
    for t in tensors:
        if t.name in seen:
            raise ValueError(f"duplicate tensor name {t.name!r}")
        seen.add(t.name)
        if not 1 <= len(t.ne) <= 8:
            raise ValueError(f"{t.name}: {len(t.ne)} dims, expected 1..8")
        out.append(_string(t.name) + _U32.pack(len(t.ne)) + b"".join(_U64.pack(int(n)) for n in t.ne)
                   + _U32.pack(int(t.ggml_type)) + _U64.pack(offset))
        offset += pad_to(t.n_bytes, alignment)
    return b"".join(out)


def _as_bytes(chunk: Chunk) -> memoryview:
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().cpu().contiguous().numpy()
    if isinstance(chunk, np.ndarray):
        chunk = np.ascontiguousarray(chunk)
        return memoryview(chunk.reshape(-1).view(np.uint8))
    return memoryview(chunk).cast("B")


def _chunks(t: TensorSource) -> Iterable[memoryview]:
    produced = t.data() if callable(t.data) else (t.data,)
    for chunk in produced:
        view = _as_bytes(chunk)
        for start in range(0, len(view), _CHUNK_BYTES):
            yield view[start:start + _CHUNK_BYTES]


def _write_tensor(f, t: TensorSource, alignment: int) -> None:
    written = 0
    for view in _chunks(t):
        written += len(view)
        if written > t.n_bytes:
            raise ValueError(f"{t.name}: source produced more than the {t.n_bytes} bytes of its type and ne")
        f.write(view)
    if written != t.n_bytes:
        raise ValueError(f"{t.name}: source produced {written} bytes, expected {t.n_bytes}")
    f.write(bytes(pad_to(written, alignment) - written))


def write_gguf(path: str | os.PathLike, metadata: dict[str, Any],
               tensors: Sequence[TensorSource | tuple], alignment: int = ALIGNMENT) -> Path:
    """Write a GGUF v3 file (see the module contract); returns the final path."""
    path = Path(path)
    sources = [t if isinstance(t, TensorSource) else TensorSource(t[0], tuple(t[1]), t[2], t[3]) for t in tensors]
    if "general.alignment" in metadata and typed(metadata["general.alignment"]).value != alignment:
        raise ValueError("general.alignment in metadata disagrees with the alignment argument")
    header = (GGUF_MAGIC + _U32.pack(GGUF_VERSION) + _U64.pack(len(sources)) + _U64.pack(len(metadata))
              + encode_metadata(metadata) + _tensor_infos(sources, alignment))
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb", buffering=1 << 20) as f:
            f.write(header)
            f.write(bytes(pad_to(len(header), alignment) - len(header)))
            for t in sources:
                _write_tensor(f, t, alignment)
        os.replace(part, path)
    finally:
        if part.exists():
            part.unlink()
    return path
