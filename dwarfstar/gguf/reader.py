"""Memory-mapped GGUF v3 reader: header, metadata and tensor directory; tensor data by view only.

Contract (gguf.md §1):
- `GGUFFile(path)` maps the file read-only and parses the header, every KV record and
  every tensor-info record. Tensor data is never touched: opening an 80 GB file costs
  the metadata parse only (~5 MB for the real vocabulary).
- `.metadata` holds plain Python values: int, float, bool, str, and lists of those
  (nested arrays become nested lists). `.metadata_types[key] = (value_type, elem_type)`
  with `elem_type` None for scalars (both are `gguf.GGUFValueType`).
- `.tensors` maps name -> `TensorInfo` in file order; `offset` is absolute in the file.
- `.raw(name)` / `.raw_torch(name)` are zero-copy uint8 views of a tensor's bytes. They
  are read-only: the mapping is shared with the page cache and must never be written.
- Every malformed input raises `GGUFError` with one message naming the byte offset,
  key or tensor at fault. No partial object is ever returned.

Why our own parser: gguf.GGUFReader builds one numpy object per token and merge string
(~250k objects); here a string array costs one struct unpack and one slice per item.
"""

from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
# ds4 limits (gguf.md §1.1, §5.1): tensor rank and metadata array nesting.
MAX_DIMS = 8
MAX_ARRAY_DEPTH = 8
# Fixed-size value types: struct format (little-endian).
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {t: np.dtype(f) for t, f in _SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFError(ValueError):
    """The file is not a well-formed GGUF v3 (or not an acceptable ds4-layout model)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]               # GGUF order, innermost first
    ggml_type: GGMLQuantizationType
    offset: int                       # absolute byte offset in the file
    n_bytes: int                      # unpadded data size

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch/numpy order: reversed `ne`."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n


def row_bytes(ggml_type: int, ne0: int) -> int:
    """Bytes of one row of `ne0` elements; `ne0` must be a multiple of the block size."""
    qtype = GGMLQuantizationType(ggml_type)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    if ne0 % block:
        raise GGUFError(f"ne[0]={ne0} is not a multiple of the {qtype.name} block size {block}")
    return ne0 // block * block_bytes


def tensor_bytes(ggml_type: int, ne: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor with GGUF dims `ne` (innermost first), unpadded."""
    n_rows = 1
    for d in ne[1:]:
        n_rows *= d
    return row_bytes(ggml_type, ne[0]) * n_rows


class _Cursor:
    """Bounds-checked little-endian reads over the mapped bytes."""

    def __init__(self, buf: mmap.mmap, size: int, pos: int):
        self.buf, self.size, self.pos = buf, size, pos

    def need(self, n: int, what: str) -> int:
        start = self.pos
        if start + n > self.size:
            raise GGUFError(f"truncated GGUF file at byte {start}: {what} needs {n} bytes, "
                            f"file has {self.size}")
        self.pos = start + n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        start = self.need(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} at byte {start} is not valid UTF-8 ({e.reason})") from None

    def strings(self, count: int, what: str) -> list[str]:
        """A STRING array body; the hot loop for tokens and merges, kept minimal."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            end = pos + 8 + unpack(buf, pos)[0]
            if end > size:
                self.pos = pos + 8
                self.need(end - pos - 8, what)
            append(buf[pos + 8:end])
            pos = end
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in out]
        except UnicodeDecodeError:
            bad = next(i for i, b in enumerate(out) if not _is_utf8(b))
            raise GGUFError(f"{what}: item {bad} is not valid UTF-8") from None


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _value_type(code: int, what: str, at: int) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        raise GGUFError(f"{what}: unknown metadata value type {code} at byte {at}") from None


def _read_value(cur: _Cursor, vtype: GGUFValueType, what: str, depth: int = 0) -> tuple[Any, int | None]:
    """One metadata value of type `vtype`; returns (value, array element type or None)."""
    if vtype == GGUFValueType.STRING:
        return cur.string(what), None
    if vtype == GGUFValueType.ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {cur.pos}")
        at = cur.pos
        etype = _value_type(cur.u32(what), what, at)
        count = cur.u64(what)
        return _read_array(cur, etype, count, what, depth), etype
    value = struct.unpack_from(_SCALAR_FORMATS[vtype], cur.buf, cur.need(_NUMPY_DTYPES[vtype].itemsize, what))[0]
    return (bool(value) if vtype == GGUFValueType.BOOL else value), None


def _read_array(cur: _Cursor, etype: GGUFValueType, count: int, what: str, depth: int) -> list:
    if etype == GGUFValueType.STRING:
        return cur.strings(count, what)
    if etype == GGUFValueType.ARRAY:
        return [_read_value(cur, etype, f"{what}[{i}]", depth + 1)[0] for i in range(count)]
    dtype = _NUMPY_DTYPES[etype]
    start = cur.need(count * dtype.itemsize, what)
    items = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=start)
    if etype == GGUFValueType.BOOL:
        return [bool(v) for v in items.tolist()]
    return items.tolist()


class GGUFFile:
    """A GGUF v3 file, mapped read-only; see the module docstring for the contract."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                size = self.path.stat().st_size
                if size < 24:
                    raise GGUFError(f"{self.path}: too small to be a GGUF file ({size} bytes)")
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror or e}") from None
        self.size = size
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # ---- parsing -------------------------------------------------------------------
    def _parse(self) -> None:
        mm = self._mm
        if mm[0:4] != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {bytes(mm[0:4])!r}, expected b'GGUF')")
        cur = _Cursor(mm, self.size, 4)
        self.version = cur.u32("version")
        if self.version != GGUF_VERSION:
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported, "
                            f"only version {GGUF_VERSION}")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        self._parse_metadata(cur, n_kv)
        self.alignment = self._alignment()
        infos = self._parse_tensor_infos(cur, n_tensors)
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors = self._place_tensors(infos)

    def _parse_metadata(self, cur: _Cursor, n_kv: int) -> None:
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        for i in range(n_kv):
            at = cur.pos
            key = cur.string(f"metadata key {i}")
            if key in self.metadata:
                raise GGUFError(f"duplicate metadata key {key!r} at byte {at}")
            vtype = _value_type(cur.u32(f"metadata {key!r}"), f"metadata {key!r}", cur.pos - 4)
            value, etype = _read_value(cur, vtype, f"metadata {key!r}")
            self.metadata[key] = value
            self.metadata_types[key] = (vtype, etype)

    def _alignment(self) -> int:
        if ALIGNMENT_KEY not in self.metadata:
            return DEFAULT_ALIGNMENT
        value, vtype = self.metadata[ALIGNMENT_KEY], self.metadata_types[ALIGNMENT_KEY][0]
        if vtype != GGUFValueType.UINT32 or value <= 0 or value & (value - 1):
            raise GGUFError(f"bad alignment: {ALIGNMENT_KEY} must be a UINT32 power of two, "
                            f"got {vtype.name} {value!r}")
        return value

    def _parse_tensor_infos(self, cur: _Cursor, n_tensors: int) -> list[tuple[str, tuple, int, int]]:
        infos, seen = [], set()
        for i in range(n_tensors):
            at = cur.pos
            name = cur.string(f"tensor info {i} name")
            if name in seen:
                raise GGUFError(f"duplicate tensor {name!r} at byte {at}")
            seen.add(name)
            n_dims = cur.u32(f"tensor {name!r} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"tensor {name!r}: n_dims={n_dims}, expected 1..{MAX_DIMS}")
            ne = tuple(cur.u64(f"tensor {name!r} ne") for _ in range(n_dims))
            code = cur.u32(f"tensor {name!r} type")
            offset = cur.u64(f"tensor {name!r} offset")
            if code not in GGML_QUANT_SIZES:
                raise GGUFError(f"tensor {name!r}: unknown quant type {code}")
            infos.append((name, ne, code, offset))
        return infos

    def _place_tensors(self, infos: list[tuple[str, tuple, int, int]]) -> dict[str, TensorInfo]:
        tensors = {}
        for name, ne, code, offset in infos:
            qtype = GGMLQuantizationType(code)
            if offset % self.alignment:
                raise GGUFError(f"tensor {name!r}: bad alignment: offset {offset} is not a multiple "
                                f"of {self.alignment}")
            try:
                n_bytes = tensor_bytes(qtype, ne)
            except GGUFError as e:
                raise GGUFError(f"tensor {name!r}: {e}") from None
            start = self.data_start + offset
            if start + n_bytes > self.size:
                raise GGUFError(f"tensor {name!r}: data [{start}, {start + n_bytes}) lies past end of "
                                f"file ({self.size} bytes); truncated file?")
            tensors[name] = TensorInfo(name, ne, qtype, start, n_bytes)
        return tensors

    # ---- access --------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only numpy uint8 view of the mapping (no copy)."""
        info = self._info(name)
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.n_bytes, offset=info.offset)

    def raw_torch(self, name: str) -> "torch.Tensor":
        """The tensor's bytes as a torch uint8 view of the mapping (no copy; never write it)."""
        import torch  # here, so that header-only users (ds4-gguf info) never pay for importing torch

        info = self._info(name)
        if info.n_bytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        # torch warns that the buffer is read-only; that is the intended contract here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=info.n_bytes, offset=info.offset)

    def close(self) -> None:
        """Unmap now if no view is alive; otherwise the mapping lives until the last view dies."""
        mm = getattr(self, "_mm", None)
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            # Views handed out by raw()/raw_torch() still reference the mapping.
            pass
        self._mm = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")
