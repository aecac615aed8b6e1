"""The test-model generator behind `ds4-gguf synth`: random but numerically sane ds4-layout GGUFs.

Contract (gguf.md §8, cli.md §5.2):
- `synthesize(out, preset, layers, experts, real_vocab, seed, config)` writes every key of
  gguf.md §2.1 (plus the §2.2 extras and the §7 tokenizer keys) and exactly the tensor set
  of `plan(config, experts)`, which is the table of `names.expected_tensors` with the ds4
  types (routed experts: `names.EXPERT_TYPES[experts]`). `general.name` starts with
  `shape.SYNTHETIC_NAME_PREFIX`, so loaders apply the generic checks, not the Flash profile.
- Same arguments and seed give a byte-identical file: every tensor draws from its own
  generator seeded by (seed, crc32(name)), independent of write order.
- Values (none inf/NaN): matrices have RMS 1/sqrt(ne0) so each projection roughly keeps
  the activation scale; the embedding has RMS 1; norms ~1; HC scales in [0.1, 0.5], HC
  bases, sinks, compressor position biases and router biases small (the Sinkhorn step and
  softmax exponentiate them); `tid2eid` rows are K distinct ids < X; router weights are
  random so routing is diverse.
- Quantised tensors: "exact" mode (default for tiny/custom configs) quantises float weights
  to Q8_0 with gguf-py's quantizer and fills IQ2_XXS/Q2_K/Q4_K with random valid blocks
  whose f16 scales are patched (gguf.md §8.2). "Pooled" mode (the flash preset) streams
  every tensor of 1 MiB or more from a 16 MiB pool of pre-generated valid data per
  (type, scale), starting at a random block offset per tensor: a full-size file costs
  about its disk write time and holds one tensor's small parts in memory at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType, LlamaFileType
from gguf.quants import quantize

from dwarfstar import shape
from dwarfstar.gguf import names
from dwarfstar.gguf.writer import TensorSource, Value, tensor_bytes, write_gguf
from dwarfstar.shape import ModelConfig

PRESETS = ("tiny", "flash")
EXPERTS = ("q2", "q4")

# gguf.md §8.1 example: every Q8_0 ne0 (E, Q, D*H/G, G*O, F) a multiple of 32, E and F of 256,
# (D - R) % 64 == 0, indexer head dim 128. Ratios follow the Flash schedule for 4 layers.
TINY = ModelConfig(
    n_layers=4, dim=256, vocab_size=1024, n_heads=4, n_kv_heads=1, head_dim=128, value_dim=128,
    rope_head_dim=64, q_lora_rank=128, o_lora_rank=64, o_groups=2, n_routed_experts=8,
    n_activated_experts=2, moe_inter_dim=256, n_shared_experts=1, n_hash_layers=1, window_size=32,
    index_n_heads=4, index_head_dim=128, index_topk=16, hc_mult=4, hc_sinkhorn_iters=20,
    compress_ratios=shape.flash_compress_ratios(4), swiglu_limits=(10.0,) * 4,
    original_seq_len=shape.FLASH.original_seq_len, rope_theta=shape.FLASH.rope_theta,
    rope_factor=shape.FLASH.rope_factor, beta_fast=shape.FLASH.beta_fast, beta_slow=shape.FLASH.beta_slow,
    compress_rope_theta=shape.FLASH.compress_rope_theta, route_scale=shape.FLASH.route_scale,
    norm_eps=shape.FLASH.norm_eps, hc_eps=shape.FLASH.hc_eps, norm_topk_prob=True, context_length=4096,
)
REAL_VOCAB_SIZE = shape.FLASH.vocab_size

# RMS of a random block's values at f16 scale d = 1, with dmin = DMIN_RATIO * d, which
# centres the K-quant blocks (mean ~0). Measured with gguf.quants.dequantize on 16384
# random blocks; gguf.md §8.2 lists the dmin = d variants.
RMS_PER_UNIT_SCALE = {T.Q8_0: 73.9, T.IQ2_XXS: 53.4, T.Q2_K: 13.9, T.Q4_K: 258.0}
DMIN_RATIO = {T.Q2_K: 1.5, T.Q4_K: 7.5}
# Byte offsets of the f16 super-scale d (and dmin) inside a block (gguf.md §4).
D_OFFSET = {T.Q8_0: 0, T.IQ2_XXS: 0, T.Q2_K: 80, T.Q4_K: 0}
DMIN_OFFSET = {T.Q2_K: 82, T.Q4_K: 2}

POOL_BYTES = 16 << 20
POOL_MIN_TENSOR_BYTES = 1 << 20

_NORMS = {"norm", "attn_norm", "q_norm", "kv_norm", "ffn_norm", "compressor_norm", "indexer_compressor_norm"}
_HC_SCALES = {"hc_head_scale", "hc_attn_scale", "hc_ffn_scale"}
# Small additive parameters: standard deviation of each.
_SMALL_STD = {
    "hc_head_base": 0.1, "hc_attn_base": 0.1, "hc_ffn_base": 0.1, "attn_sink": 0.1,
    "compressor_ape": 0.1, "indexer_compressor_ape": 0.1, "gate_bias": 0.05,
}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    field: str          # official-vocabulary weight field (names.TensorSpec.field)
    layer: int          # -1 for global tensors
    ne: tuple[int, ...]
    ggml_type: T

    @property
    def n_bytes(self) -> int:
        return tensor_bytes(self.ggml_type, self.ne)


def resolve_config(preset: str = "tiny", layers: int | None = None, config: ModelConfig | None = None,
                   real_vocab: bool = False) -> ModelConfig:
    """The config a synth call writes: `config` as given, else the preset with `layers` layers."""
    if config is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}, expected one of {PRESETS}")
        base = TINY if preset == "tiny" else shape.FLASH
        n = base.n_layers if layers is None else layers
        if n <= 0:
            raise ValueError(f"layers must be > 0, got {n}")
        # Layer i takes the Flash schedule's ratio; hash layers are the first min(base, n).
        config = dataclasses.replace(
            base, n_layers=n, compress_ratios=shape.flash_compress_ratios(n),
            swiglu_limits=(base.swiglu_limits[0],) * n, n_hash_layers=min(base.n_hash_layers, n))
    if real_vocab:
        config = dataclasses.replace(config, vocab_size=REAL_VOCAB_SIZE)
    config.check_consistency()
    return config


def plan(config: ModelConfig, experts: str = "q2") -> list[PlannedTensor]:
    """Every tensor of the file in write order, with its ds4 type (gguf.md §3)."""
    if experts not in EXPERTS:
        raise ValueError(f"unknown expert types {experts!r}, expected one of {EXPERTS}")
    out = []
    for name, (spec, ne) in names.expected_tensors(config).items():
        ggml_type = names.EXPERT_TYPES[experts][spec.field] if spec.is_routed else spec.types[0]
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        out.append(PlannedTensor(name, spec.field, layer, tuple(ne), T(ggml_type)))
    return out


def build_metadata(config: ModelConfig, experts: str, real_vocab: bool, name: str) -> dict:
    """The KV section: general keys, every §2.1 hyperparameter typed as ds4 reads it, tokenizer."""
    from dwarfstar.text import vocab

    file_type = LlamaFileType.MOSTLY_IQ2_XXS if experts == "q2" else LlamaFileType.MOSTLY_Q4_K_M
    md: dict = {
        "general.architecture": shape.ARCH,
        "general.name": name,
        "general.type": "model",
        "general.file_type": int(file_type),
        "general.quantization_version": 2,
    }
    # Plain ints become UINT32 and int lists INT32 in the writer; float fields are forced to
    # FLOAT32 so an integral value (rope_theta=10000) never turns into an integer key.
    float_fields = {f.name for f in dataclasses.fields(ModelConfig) if f.type in ("float", "tuple[float, ...]")}
    for field, key in shape.KEY_OF_FIELD.items():
        value = getattr(config, field)
        if field in float_fields:
            value = [float(v) for v in value] if isinstance(value, tuple) else float(value)
        md[key] = list(value) if isinstance(value, tuple) else value
    md[shape.CONTEXT_LENGTH_KEY] = config.context_length
    md["deepseek4.rope.scaling.type"] = "yarn"
    md["deepseek4.expert_gating_func"] = shape.EXPERT_GATING_FUNC_SQRT_SOFTPLUS
    md["deepseek4.nextn_predict_layers"] = 0
    tok = vocab.real_vocab_metadata() if real_vocab else vocab.tiny_vocab_metadata(config.vocab_size)
    if len(tok["tokenizer.ggml.tokens"]) != config.vocab_size:
        raise ValueError(f"vocabulary has {len(tok['tokenizer.ggml.tokens'])} tokens, "
                         f"config.vocab_size is {config.vocab_size}")
    for key, value in tok.items():
        vtype, sub = vocab.VOCAB_VALUE_TYPES[key]
        md[key] = Value(value, vtype, sub)
    return md


def _rng(seed: int, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def _std(field: str, ne: tuple[int, ...]) -> float:
    """Standard deviation of a weight drawn around 0 (matrices: keep the activation scale)."""
    if field == "embed":
        return 1.0
    return _SMALL_STD.get(field, 1.0 / np.sqrt(ne[0]))


def float_values(field: str, ne: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Float32 values of a non-routed weight, torch shape (reversed ne)."""
    shape_ = tuple(reversed(ne))
    if field in _NORMS:
        return (1.0 + 0.1 * rng.standard_normal(shape_)).astype(np.float32)
    if field in _HC_SCALES:
        return rng.uniform(0.1, 0.5, size=shape_).astype(np.float32)
    return (_std(field, ne) * rng.standard_normal(shape_)).astype(np.float32)


def tid2eid(n_tokens: int, k: int, n_experts: int, rng: np.random.Generator) -> np.ndarray:
    """int32 [V, K]: per token K distinct expert ids < X."""
    if n_tokens * n_experts <= 1 << 22:
        return np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :k].astype(np.int32)
    # Large tables (Flash: 129280 x 256): redraw rows with a repeated id until none is left.
    ids = rng.integers(0, n_experts, size=(n_tokens, k))
    while True:
        s = np.sort(ids, axis=1)
        bad = np.nonzero((s[:, 1:] == s[:, :-1]).any(axis=1))[0]
        if bad.size == 0:
            return ids.astype(np.int32)
        ids[bad] = rng.integers(0, n_experts, size=(bad.size, k))


def random_blocks(ggml_type: T, n_blocks: int, target_rms: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n_blocks, block_bytes]: random payload, f16 scales set for values of RMS ~target."""
    block_bytes = GGML_QUANT_SIZES[ggml_type][1]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    # +-25 % per block so blocks differ in scale as real weights do; mean stays at target.
    d = target_rms / RMS_PER_UNIT_SCALE[ggml_type] * rng.uniform(0.75, 1.25, size=n_blocks)
    off = D_OFFSET[ggml_type]
    blocks[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if ggml_type in DMIN_OFFSET:
        off = DMIN_OFFSET[ggml_type]
        dmin = (DMIN_RATIO[ggml_type] * d).astype(np.float16)
        blocks[:, off:off + 2] = dmin.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def exact_data(p: PlannedTensor, config: ModelConfig, seed: int) -> np.ndarray:
    """The bytes of one tensor, fully materialised (tiny models; small tensors of big ones)."""
    rng = _rng(seed, p.name)
    if p.field == "tid2eid":
        return tid2eid(config.vocab_size, config.n_activated_experts, config.n_routed_experts, rng)
    if p.ggml_type in (T.IQ2_XXS, T.Q2_K, T.Q4_K):
        n_blocks = p.n_bytes // GGML_QUANT_SIZES[p.ggml_type][1]
        return random_blocks(p.ggml_type, n_blocks, 1.0 / np.sqrt(p.ne[0]), rng)
    values = float_values(p.field, p.ne, rng)
    if p.ggml_type == T.F32:
        return values
    if p.ggml_type == T.F16:
        return values.astype(np.float16)
    if p.ggml_type == T.Q8_0:
        return quantize(values, T.Q8_0)
    raise ValueError(f"{p.name}: no generator for type {p.ggml_type.name}")


class Pools:
    """Pre-generated valid data per (type, std), shared by the big tensors of a pooled file."""

    def __init__(self, seed: int):
        self.seed = seed
        self._pools: dict[tuple[T, float], np.ndarray] = {}

    def get(self, ggml_type: T, std: float) -> np.ndarray:
        key = (ggml_type, round(std, 9))
        if key not in self._pools:
            rng = _rng(self.seed, f"pool {ggml_type.name} {key[1]}")
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
            n_blocks = POOL_BYTES // block_bytes
            if ggml_type in RMS_PER_UNIT_SCALE:
                data = random_blocks(ggml_type, n_blocks, std, rng)
            elif ggml_type == T.F16:
                data = (std * rng.standard_normal(n_blocks)).astype(np.float16)
            else:
                raise ValueError(f"no pool for type {ggml_type.name}")
            self._pools[key] = data.reshape(-1).view(np.uint8)
        return self._pools[key]

    def stream(self, p: PlannedTensor) -> Callable[[], Iterable[np.ndarray]]:
        """A chunk source for `p`: the pool from a random block offset, wrapping around."""
        pool = self.get(p.ggml_type, _std(p.field, p.ne))
        block_bytes = GGML_QUANT_SIZES[p.ggml_type][1]
        start = int(_rng(self.seed, p.name).integers(0, len(pool) // block_bytes)) * block_bytes

        def chunks() -> Iterable[np.ndarray]:
            pos, left = start, p.n_bytes
            while left:
                take = min(left, len(pool) - pos)
                yield pool[pos:pos + take]
                left -= take
                pos = 0
        return chunks


def _is_pooled(p: PlannedTensor) -> bool:
    # Norm-like and id tables keep exact generation: their values are not N(0, std).
    poolable = p.ggml_type in RMS_PER_UNIT_SCALE or (p.ggml_type == T.F16 and p.field not in _NORMS)
    return poolable and p.field != "tid2eid" and p.n_bytes >= POOL_MIN_TENSOR_BYTES


def tensor_sources(config: ModelConfig, experts: str, seed: int, pooled: bool) -> list[TensorSource]:
    """Lazy sources for `write_gguf`: nothing is generated before its tensor is written."""
    pools = Pools(seed) if pooled else None
    out = []
    for p in plan(config, experts):
        if pools is not None and _is_pooled(p):
            data = pools.stream(p)
        else:
            data = (lambda p=p: (exact_data(p, config, seed),))
        out.append(TensorSource(p.name, p.ne, p.ggml_type, data))
    return out


def synthesize(out_path: str | Path, preset: str = "tiny", layers: int | None = None, experts: str = "q2",
               real_vocab: bool = False, seed: int = 0, config: ModelConfig | None = None,
               pooled: bool | None = None) -> Path:
    """Write a synthetic GGUF (module contract). `pooled` defaults to on for the flash preset."""
    label = "custom" if config is not None else preset
    if pooled is None:
        pooled = config is None and preset == "flash"
    config = resolve_config(preset, layers, config, real_vocab)
    name = f"{shape.SYNTHETIC_NAME_PREFIX} {label} {config.n_layers}L {experts} seed {seed}"
    metadata = build_metadata(config, experts, real_vocab, name)
    return write_gguf(out_path, metadata, tensor_sources(config, experts, seed, pooled))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a value > 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `ds4-gguf synth` (cli.md §5.2); argparse exits 2 on usage errors."""
    parser.add_argument("--preset", required=True, choices=PRESETS, help="tiny test model or full Flash dims")
    parser.add_argument("--layers", type=_positive_int, default=None, help="layer count (default: preset's)")
    parser.add_argument("--experts", choices=EXPERTS, default="q2",
                        help="routed expert types: q2 = IQ2_XXS gate/up + Q2_K down, q4 = Q4_K")
    parser.add_argument("--real-vocab", action="store_true", help="the real 129,280-token DeepSeek V4 vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("out", type=Path, help="output GGUF path")


def run(args: argparse.Namespace) -> int:
    """Run `ds4-gguf synth`; 0 on success, 1 if the file cannot be written."""
    try:
        path = synthesize(args.out, preset=args.preset, layers=args.layers, experts=args.experts,
                          real_vocab=args.real_vocab, seed=args.seed)
    except OSError as e:
        print(f"ds4-gguf synth: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0
