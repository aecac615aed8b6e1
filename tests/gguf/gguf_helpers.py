"""Helpers for the GGUF tests (imported by name; conftest.py only holds fixtures): random valid quant blocks, byte patching, a tiny model file.

The tiny model is built here from the tensor table (`names.expected_tensors`), the
config (`ModelConfig.to_metadata`) and the tiny vocabulary, written with our writer,
so validation tests do not depend on the test-model generator. Tensor bytes are zero
(valid for every type, and `tid2eid` zeros are in range).
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from dwarfstar import shape
from dwarfstar.gguf import names
from dwarfstar.gguf.writer import encode_metadata, pad_to, tensor_bytes, write_gguf
from dwarfstar.text.vocab import tiny_vocab_metadata

# Byte offsets of the f16 scale fields that must hold finite values (gguf.md §8.2).
F16_SCALE_FIELDS = {T.Q8_0: (0,), T.Q2_K: (80, 82), T.Q4_K: (0, 2), T.IQ2_XXS: (0,)}

# The example configuration of gguf.md §8.1 (4 layers: window, window, ratio 4, ratio 128).
TINY = dataclasses.replace(
    shape.FLASH,
    n_layers=4, dim=256, vocab_size=512, n_heads=4, head_dim=128, value_dim=128, rope_head_dim=64,
    q_lora_rank=128, o_lora_rank=64, o_groups=2, n_routed_experts=8, n_activated_experts=2,
    moe_inter_dim=256, n_hash_layers=1, window_size=32, index_n_heads=4, index_head_dim=128,
    index_topk=16, compress_ratios=(0, 0, 4, 128), swiglu_limits=(10.0,) * 4,
)
SYNTHETIC_NAME = shape.SYNTHETIC_NAME_PREFIX + " tiny (tests/gguf)"


def random_blocks(ggml_type: int, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n_blocks, block_bytes]: uniform random bytes, f16 scales patched to finite values."""
    _, block_bytes = GGML_QUANT_SIZES[T(ggml_type)]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for at in F16_SCALE_FIELDS.get(T(ggml_type), ()):
        scales = rng.uniform(-2.0, 2.0, size=(n_blocks, 1)).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8)
    return blocks


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def tensor_info_offset(path: Path, name: str) -> int:
    """Byte offset just after the name string of tensor-info record `name` (its n_dims field)."""
    blob = path.read_bytes()
    key = struct.pack("<Q", len(name)) + name.encode()
    at = blob.index(key)
    return at + len(key)


def model_metadata(config: shape.ModelConfig, name: str, vocab: dict | None = None) -> dict:
    metadata = {"general.architecture": shape.ARCH, "general.name": name}
    metadata.update(config.to_metadata())
    metadata.update(vocab if vocab is not None else tiny_vocab_metadata(config.vocab_size))
    return metadata


def table(expected: dict, experts: str = "q2") -> list[tuple[str, tuple[int, ...], int]]:
    """(name, ne, type) per tensor of a names.expected_* table, with the ds4 types."""
    return [(name, ne, names.EXPERT_TYPES[experts][spec.field] if spec.is_routed else spec.types[0])
            for name, (spec, ne) in expected.items()]


def tiny_model(path: Path, config: shape.ModelConfig = TINY, name: str = SYNTHETIC_NAME,
               drop_keys=(), set_keys=None, drop_tensors=(), set_tensors=None, data=None,
               extra_tensors=(), experts: str = "q2") -> Path:
    """Write a tiny main-model GGUF; the keyword arguments inject single deviations.

    set_tensors: name -> (ne, type); data: name -> bytes; extra_tensors: (name, ne, type).
    """
    metadata = model_metadata(config, name)
    metadata.update(set_keys or {})
    for key in drop_keys:
        del metadata[key]
    tensors = []
    for gguf_name, ne, qtype in table(names.expected_tensors(config), experts) + list(extra_tensors):
        if gguf_name in drop_tensors:
            continue
        ne, qtype = (set_tensors or {}).get(gguf_name, (ne, qtype))
        tensors.append((gguf_name, tuple(ne), qtype, (data or {}).get(gguf_name) or _zeros(qtype, ne)))
    return write_gguf(path, metadata, tensors)


def sparse_model(path: Path, metadata: dict, tensors: list[tuple[str, tuple[int, ...], int]]) -> Path:
    """A GGUF whose tensor data is one hole (all zeros, no disk blocks): full-size files in tests."""
    infos, offset = [], 0
    for name, ne, qtype in tensors:
        infos.append(struct.pack("<Q", len(name.encode())) + name.encode() + struct.pack("<I", len(ne))
                     + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", qtype, offset))
        offset += pad_to(tensor_bytes(qtype, ne))
    header = (b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
              + encode_metadata(metadata) + b"".join(infos))
    with open(path, "wb") as f:
        f.write(header + bytes(pad_to(len(header)) - len(header)))
        f.truncate(pad_to(len(header)) + offset)
    return path


def _zeros(qtype: int, ne) -> bytes:
    block, block_bytes = GGML_QUANT_SIZES[T(qtype)]
    return bytes(int(np.prod(ne)) // block * block_bytes)


def mtp_model(path: Path, arch=shape.MTP_ARCH, expert_count=8, drop=(), retype=None):
    """An MTP-support GGUF for a TINY main model (gguf.md §2.3, §3.5), q4 experts, zero data."""
    metadata = {"general.architecture": arch, "general.name": "DeepSeek V4 Flash MTP support",
                "deepseek4.expert_count": expert_count, "deepseek4.mtp_layer_count": 1,
                "deepseek4.nextn_predict_layers": 1}
    tensors = []
    for name, ne, qtype in table(names.expected_mtp_tensors(TINY), "q4"):
        qtype = (retype or {}).get(name, qtype)
        if name not in drop:
            tensors.append((name, ne, qtype, bytes(tensor_bytes(qtype, ne))))
    return write_gguf(path, metadata, tensors)
