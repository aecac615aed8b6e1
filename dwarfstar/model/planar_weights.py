"""The reference model's weights read from the CUDA engine's tensors (planar layouts).

Purpose: run model/reference.py on exactly the weights the CUDA backend holds, including
dummy weights that exist only on the GPU (engine/cuda_engine.dummy_tensors), with no GGUF
bytes and no fp32 copy of the model (80.8 GiB of q2 would be 300+ GiB as fp32).

Contract:
- `planar_weights(config, tensors, cache_limit=PLANAR_CACHE_LIMIT) -> Weights` for the dict
  `cuda_engine.load_tensors` / `dummy_tensors` return ({gguf_name: Planar | torch.Tensor}),
  checked against names.expected_tensors like `Weights.from_dict`.
- Planar matrices are dequantised on every use by `dequantize_planar` (bit-exact with gguf's
  dequantisation of the original bytes, tests/kernels/test_repack.py), so the reference sees
  the same floats as from the GGUF file; routed experts one selected expert at a time
  (`select_experts`). Only tensors of at most `cache_limit` elements are kept as fp32: vectors,
  HC mixes, the router; every Flash matrix (>= 2M elements) is a per-use temporary.
- Plain tensors are used as they are: float32 vectors, fp16 `token_embd` (converted per use),
  int64 `tid2eid`.
- `on_device(device)`: the reference builds token ids, positions and its decode state with
  torch's factory defaults, so it computes on the default device; run it (and `new_state`)
  inside this context to compute where the weights live.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from dwarfstar.gguf import names
from dwarfstar.kernels.repack import dequantize_planar, select_experts
from dwarfstar.model.weights import Weights, check_shapes
from dwarfstar.shape import ModelConfig

# Elements up to which a tensor is dequantised once and kept (4 MiB as fp32): on Flash this
# keeps ~0.5 GiB (norms, HC mixes, router, compressor APE) and dequantises every matrix per use.
PLANAR_CACHE_LIMIT = 1 << 20


class PlanarSource:
    """Weight source (model/weights.py) over {gguf_name: Planar | torch.Tensor}."""

    is_resident = False

    def __init__(self, tensors: dict):
        self._t = tensors

    def full(self, name: str) -> torch.Tensor:
        t = self._t[name]
        return t.float() if isinstance(t, torch.Tensor) else dequantize_planar(t)

    def expert(self, name: str, e: int) -> torch.Tensor:
        p = self._t[name]
        # The id is made on the weights' device (no host-to-device upload per expert).
        ids = torch.full((1,), e, dtype=torch.long, device=_device(p))
        return dequantize_planar(select_experts(p, ids))[0]

    def ints(self, name: str) -> torch.Tensor:
        return self._t[name].to(torch.int64)

    def ggml_type(self, name: str) -> int | None:
        t = self._t[name]
        return None if isinstance(t, torch.Tensor) else int(t.ggml_type)


def _device(p) -> torch.device:
    return getattr(p, dataclasses.fields(p)[0].name).device


def planar_weights(config: ModelConfig, tensors: dict, cache_limit: int = PLANAR_CACHE_LIMIT) -> Weights:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    check_shapes(names.expected_tensors(config), shapes)
    return Weights(config, PlanarSource(tensors), shapes, cache_limit)


@contextlib.contextmanager
def on_device(device: str | torch.device) -> Iterator[None]:
    """Torch's default device set to `device` for the block (restored after)."""
    before = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(before)
