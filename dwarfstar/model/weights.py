"""Weights of the reference model, bound by GGUF name (names.py), dequantised on use.

Contract:
- `Weights.from_dict(config, tensors)`: `{gguf_name: tensor}` of torch shape (tests,
  transformers-derived models). `Weights.from_gguf(file)`: a `GGUFFile`; the config is
  read from its metadata. Both check every expected tensor is present with the torch
  shape `reversed(ne)` from names.py.
- `Weights(config, source, shapes, cache_limit=CACHE_LIMIT)`: any source with `full`,
  `expert`, `ints` and `is_resident` (model/planar_weights.py reads the CUDA engine's tensors).
- `weights.get(name, dtype)` -> float tensor of torch shape. Small tensors are
  dequantised once and kept; big ones (above `cache_limit` elements, non-resident sources)
  are dequantised on every use so a full model never lives in memory as floats.
- `weights.expert(name, e, dtype)` -> one routed expert's [out, in] matrix; from a GGUF
  only that expert's contiguous slab is dequantised (one expert = one slab, gguf.md §3),
  unless the whole tensor is small enough to cache.
- `weights.ints(name)` -> int64 tensor (tid2eid).
- `weights.layer(l)` / `weights.mtp_layer()` -> `LayerWeights`: the same accessors by
  field name (wq_a, wkv, ...) plus the layer's ratio, hash flag and SwiGLU clamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dwarfstar.gguf import names
from dwarfstar.model.numerics import int8_round
from dwarfstar.shape import QK_K, ModelConfig

# Elements above which a GGUF tensor is dequantised per use instead of cached.
CACHE_LIMIT = 1 << 24
# ggml type ids read without the quant module (gguf.md §4).
_F32, _F16, _Q8_0, _I32 = 0, 1, 8, 26


class Weights:
    """Name -> tensor source. Build with `from_dict` or `from_gguf`."""

    def __init__(self, config: ModelConfig, source: Any, shapes: dict[str, tuple[int, ...]],
                 cache_limit: int = CACHE_LIMIT):
        self.config = config
        self._source = source
        self._shapes = shapes
        self._cache_limit = cache_limit
        self._cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: ModelConfig, tensors: dict[str, torch.Tensor], mtp: bool = False) -> "Weights":
        expected = names.expected_mtp_tensors(config) if mtp else names.expected_tensors(config)
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        check_shapes(expected, shapes)
        return cls(config, _DictSource(tensors), shapes)

    @classmethod
    def from_gguf(cls, gguf_file: Any, config: ModelConfig | None = None, mtp: bool = False) -> "Weights":
        if config is None:
            config = ModelConfig.from_metadata(gguf_file.metadata)
        expected = names.expected_mtp_tensors(config) if mtp else names.expected_tensors(config)
        shapes = {name: tuple(info.shape) for name, info in gguf_file.tensors.items()}
        check_shapes(expected, shapes)
        return cls(config, _GGUFSource(gguf_file), shapes)

    # ---- access -----------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def ggml_type(self, name: str) -> int | None:
        """The stored GGML type (GGUF weights), None for in-memory float tensors."""
        return self._source.ggml_type(name)

    def matvec_input(self, x: torch.Tensor, name: str, numerics) -> torch.Tensor:
        """See LayerWeights.matvec_input."""
        # As the CUDA engine: only where the weight's rows are whole 256-input super-blocks (every
        # Q8_0 product of Flash; the grouped out-a's rows are one group's inputs).
        if numerics.int8_act and self.ggml_type(name) == _Q8_0 and self.shape(name)[-1] % QK_K == 0:
            return int8_round(x)
        return x

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (name, dtype)
        if key in self._cache:
            return self._cache[key]
        t = self._source.full(name).to(dtype)
        if self._source.is_resident or t.numel() <= self._cache_limit:
            self._cache[key] = t
        return t

    def expert(self, name: str, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._source.is_resident or _numel(self._shapes[name]) <= self._cache_limit:
            # Small expert tensors (test models) are dequantised once, whole.
            return self.get(name, dtype)[e]
        return self._source.expert(name, e).to(dtype)

    def ints(self, name: str) -> torch.Tensor:
        return self._source.ints(name)

    def layer(self, index: int) -> "LayerWeights":
        c = self.config
        return LayerWeights(self, f"blk.{index}.", c.compress_ratios[index], c.is_hash_layer(index),
                            c.swiglu_limits[index])

    def mtp_layer(self) -> "LayerWeights":
        """The MTP block: sliding-only, top-k routed (model.md §3.1); clamp of the last layer."""
        return LayerWeights(self, names.MTP_PREFIX, 0, False, self.config.swiglu_limits[-1])


@dataclass(frozen=True)
class LayerWeights:
    """One block's tensors by official field name, plus the facts the block math needs."""

    weights: Weights
    prefix: str
    ratio: int
    is_hash: bool
    swiglu_limit: float

    def name(self, field: str) -> str:
        return self.prefix + _GGUF_OF_FIELD[field]

    def has(self, field: str) -> bool:
        return self.weights.has(self.name(field))

    def get(self, field: str, dtype: torch.dtype) -> torch.Tensor:
        return self.weights.get(self.name(field), dtype)

    def expert(self, field: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weights.expert(self.name(field), e, dtype)

    def ints(self, field: str) -> torch.Tensor:
        return self.weights.ints(self.name(field))

    def matvec_input(self, x: torch.Tensor, field: str, numerics) -> torch.Tensor:
        """x as a product with this weight takes it: int8-rounded per 32 when `numerics.int8_act`
        and the weight is stored as Q8_0 (the CUDA engine's and ds4's decode rounding point)."""
        return self.weights.matvec_input(x, self.name(field), numerics)


_GGUF_OF_FIELD = {s.field: s.gguf for s in names.LAYER} | {"mtp_" + s.field: s.gguf for s in names.MTP_GLOBAL}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_shapes(expected: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present with the torch shape reversed(ne) (names.py)."""
    for name, (_, ne) in expected.items():
        if name not in shapes:
            raise KeyError(f"tensor {name} is missing")
        want = tuple(reversed(ne))
        if shapes[name] != want:
            raise ValueError(f"tensor {name}: expected torch shape {want}, got {shapes[name]}")


class _DictSource:
    is_resident = True

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._t = tensors

    def full(self, name: str) -> torch.Tensor:
        return self._t[name]

    def expert(self, name: str, e: int) -> torch.Tensor:
        return self._t[name][e]

    def ints(self, name: str) -> torch.Tensor:
        return self._t[name].to(torch.int64)

    def ggml_type(self, name: str) -> None:
        return None


class _GGUFSource:
    is_resident = False

    def __init__(self, gguf_file: Any):
        self._f = gguf_file

    def _decode(self, raw: torch.Tensor, ggml_type: int, ne: tuple[int, ...]) -> torch.Tensor:
        shape = tuple(reversed(ne))
        if ggml_type == _F32:
            return raw.view(torch.float32).reshape(shape)
        if ggml_type == _F16:
            return raw.view(torch.float16).reshape(shape).to(torch.float32)
        from dwarfstar.gguf.quants import dequantize

        return dequantize(raw, ggml_type, ne)

    def full(self, name: str) -> torch.Tensor:
        info = self._f.tensors[name]
        return self._decode(self._f.raw_torch(name), int(info.ggml_type), tuple(info.ne))

    def expert(self, name: str, e: int) -> torch.Tensor:
        info = self._f.tensors[name]
        n_experts = info.ne[-1]
        slab = info.n_bytes // n_experts
        raw = self._f.raw_torch(name)[e * slab:(e + 1) * slab]
        return self._decode(raw, int(info.ggml_type), tuple(info.ne[:-1]))

    def ggml_type(self, name: str) -> int:
        return int(self._f.tensors[name].ggml_type)

    def ints(self, name: str) -> torch.Tensor:
        info = self._f.tensors[name]
        assert int(info.ggml_type) == _I32, f"{name}: expected I32"
        return self._f.raw_torch(name).view(torch.int32).reshape(info.shape).to(torch.int64)
