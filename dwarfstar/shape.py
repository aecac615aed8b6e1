"""The DeepSeek V4 Flash numbers, once, and the model configuration read from GGUF metadata.

Contract:
- `ModelConfig` is the only description of model sizes the rest of the code reads.
  It is built from a GGUF metadata dict by `ModelConfig.from_metadata` and written
  back by `ModelConfig.to_metadata` (the test-model generator uses the latter).
- `FLASH` is the published DeepSeek V4 Flash configuration (ds4.c "Fixed DeepSeek
  V4 Flash Shape"; spec gguf.md §2.1, model.md §1.1). A real (non-synthetic) file
  must match it exactly: `flash_differences` names the first mismatches.
- Field names follow DeepSeek's official inference code (`ModelArgs` in
  inference/model.py) so they read beside the checkpoint vocabulary.

Errors: `ConfigError` carries one message naming the metadata key, what was
expected and what was found. It never wraps a traceback.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

ARCH = "deepseek4"
MTP_ARCH = "deepseek4_mtp_support"
# general.name prefix the generator writes; such files skip the strict Flash profile (gguf.md §2.4).
SYNTHETIC_NAME_PREFIX = "dwarfstar synthetic"

# Quant block sizes (ggml): K-quants and IQ2_XXS use 256-element super-blocks.
QK_K = 256
QK8_0 = 32

# Compression ratios the model code implements. 8 is not in Flash; it exists so tiny test
# models emit ratio-128-style (non-overlapping) rows in short sequences (model.md §8).
SUPPORTED_RATIOS = (0, 4, 8, 128)
# The ratio whose compressor overlaps windows and carries the lightning indexer (model.md §2.4).
OVERLAP_RATIO = 4

# Routing score is sqrt(softplus(logit)); ds4 hard-codes it, the HF config calls it "sqrtsoftplus".
EXPERT_GATING_FUNC_SQRT_SOFTPLUS = 4

# The seven tokens ds4 requires (gguf.md §5.1) and the rest the renderer relies on (gguf.md §5.2).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
TASK_TOKENS = ("<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜read_url｜>")
REQUIRED_SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE, DSML, LATEST_REMINDER) + TASK_TOKENS


class ConfigError(ValueError):
    """A metadata value is missing, of the wrong type, or inconsistent."""


# One row per config field: (field, GGUF key, kind). kind is "int", "float", "bool",
# "int_array" or "float_array". Order follows gguf.md §2.1.
_KEYS: tuple[tuple[str, str, str], ...] = (
    ("n_layers", "deepseek4.block_count", "int"),
    ("dim", "deepseek4.embedding_length", "int"),
    ("vocab_size", "deepseek4.vocab_size", "int"),
    ("n_heads", "deepseek4.attention.head_count", "int"),
    ("n_kv_heads", "deepseek4.attention.head_count_kv", "int"),
    ("head_dim", "deepseek4.attention.key_length", "int"),
    ("value_dim", "deepseek4.attention.value_length", "int"),
    ("rope_head_dim", "deepseek4.rope.dimension_count", "int"),
    ("q_lora_rank", "deepseek4.attention.q_lora_rank", "int"),
    ("o_lora_rank", "deepseek4.attention.output_lora_rank", "int"),
    ("o_groups", "deepseek4.attention.output_group_count", "int"),
    ("n_routed_experts", "deepseek4.expert_count", "int"),
    ("n_activated_experts", "deepseek4.expert_used_count", "int"),
    ("moe_inter_dim", "deepseek4.expert_feed_forward_length", "int"),
    ("n_shared_experts", "deepseek4.expert_shared_count", "int"),
    ("n_hash_layers", "deepseek4.hash_layer_count", "int"),
    ("window_size", "deepseek4.attention.sliding_window", "int"),
    ("index_n_heads", "deepseek4.attention.indexer.head_count", "int"),
    ("index_head_dim", "deepseek4.attention.indexer.key_length", "int"),
    ("index_topk", "deepseek4.attention.indexer.top_k", "int"),
    ("hc_mult", "deepseek4.hyper_connection.count", "int"),
    ("hc_sinkhorn_iters", "deepseek4.hyper_connection.sinkhorn_iterations", "int"),
    ("compress_ratios", "deepseek4.attention.compress_ratios", "int_array"),
    ("swiglu_limits", "deepseek4.swiglu_clamp_exp", "float_array"),
    ("original_seq_len", "deepseek4.rope.scaling.original_context_length", "int"),
    ("rope_theta", "deepseek4.rope.freq_base", "float"),
    ("rope_factor", "deepseek4.rope.scaling.factor", "float"),
    ("beta_fast", "deepseek4.rope.scaling.yarn_beta_fast", "float"),
    ("beta_slow", "deepseek4.rope.scaling.yarn_beta_slow", "float"),
    ("compress_rope_theta", "deepseek4.attention.compress_rope_freq_base", "float"),
    ("route_scale", "deepseek4.expert_weights_scale", "float"),
    ("norm_eps", "deepseek4.attention.layer_norm_rms_epsilon", "float"),
    ("hc_eps", "deepseek4.hyper_connection.epsilon", "float"),
    ("norm_topk_prob", "deepseek4.expert_weights_norm", "bool"),
)
KEY_OF_FIELD = {field: key for field, key, _ in _KEYS}
# Optional keys: if present they must be 0 (no group-limited routing in V4 Flash).
OPTIONAL_ZERO_KEYS = ("deepseek4.expert_group_count", "deepseek4.expert_group_used_count")
CONTEXT_LENGTH_KEY = "deepseek4.context_length"


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    dim: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    value_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    n_shared_experts: int
    n_hash_layers: int
    window_size: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    compress_ratios: tuple[int, ...]
    swiglu_limits: tuple[float, ...]
    original_seq_len: int
    rope_theta: float
    rope_factor: float
    beta_fast: float
    beta_slow: float
    compress_rope_theta: float
    route_scale: float
    norm_eps: float
    hc_eps: float
    norm_topk_prob: bool
    # Informational only (ds4 prints it, never checks it).
    context_length: int = 1048576

    # ---- derived sizes -------------------------------------------------------------
    @property
    def hc_dim(self) -> int:
        """Flattened hyper-connection state, n_hc * dim (16384 in Flash)."""
        return self.hc_mult * self.dim

    @property
    def hc_mix(self) -> int:
        """Width of the HC mixing projection: pre (n) + post (n) + comb (n*n) = 24 in Flash."""
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    def has_indexer(self, layer: int) -> bool:
        return self.compress_ratios[layer] == OVERLAP_RATIO

    def compressor_width(self, layer: int) -> int:
        """Output width of the attention compressor's kv/gate projections (2*D when overlapping)."""
        r = self.compress_ratios[layer]
        return 2 * self.head_dim if r == OVERLAP_RATIO else self.head_dim

    # ---- metadata ------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "ModelConfig":
        """Build from a GGUF metadata dict (key -> plain Python value; arrays as lists)."""
        values: dict[str, Any] = {}
        for field, key, kind in _KEYS:
            if key not in metadata:
                raise ConfigError(f"required metadata key is missing: {key}")
            values[field] = _coerce(key, metadata[key], kind)
        for key in OPTIONAL_ZERO_KEYS:
            if key in metadata and _coerce(key, metadata[key], "int") != 0:
                raise ConfigError(f"{key}: expected 0 (no group-limited routing), got {metadata[key]!r}")
        if CONTEXT_LENGTH_KEY in metadata:
            values["context_length"] = _coerce(CONTEXT_LENGTH_KEY, metadata[CONTEXT_LENGTH_KEY], "int")
        config = cls(**values)
        config.check_consistency()
        # Arrays may be longer than n_layers (the release lists the MTP slot too); keep the layers' part.
        return dataclasses.replace(
            config,
            compress_ratios=config.compress_ratios[: config.n_layers],
            swiglu_limits=config.swiglu_limits[: config.n_layers],
        )

    def to_metadata(self) -> dict[str, Any]:
        """Metadata key -> Python value (ints, floats, bools, lists), as the generator writes them."""
        out: dict[str, Any] = {}
        for field, key, _ in _KEYS:
            value = getattr(self, field)
            out[key] = list(value) if isinstance(value, tuple) else value
        out[CONTEXT_LENGTH_KEY] = self.context_length
        return out

    def check_consistency(self) -> None:
        """Generic checks every file must pass, Flash or synthetic (gguf.md §5.2, §8.1)."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        k = KEY_OF_FIELD
        need(self.n_layers > 0, f"{k['n_layers']}: expected > 0, got {self.n_layers}")
        need(self.n_kv_heads == 1, f"{k['n_kv_heads']}: expected 1, got {self.n_kv_heads}")
        need(self.head_dim == self.value_dim,
             f"{k['value_dim']}: expected {self.head_dim} (= key_length), got {self.value_dim}")
        need(0 < self.rope_head_dim <= self.head_dim and self.rope_head_dim % 2 == 0,
             f"{k['rope_head_dim']}: expected an even value <= {self.head_dim}, got {self.rope_head_dim}")
        need(self.rope_head_dim <= self.index_head_dim,
             f"{k['rope_head_dim']}: expected <= indexer key_length {self.index_head_dim}, got {self.rope_head_dim}")
        need(self.o_groups > 0 and self.n_heads % self.o_groups == 0,
             f"{k['o_groups']}: expected a divisor of head_count {self.n_heads}, got {self.o_groups}")
        need(0 < self.n_activated_experts <= self.n_routed_experts,
             f"{k['n_activated_experts']}: expected 1..{self.n_routed_experts}, got {self.n_activated_experts}")
        need(self.n_shared_experts == 1, f"{k['n_shared_experts']}: expected 1, got {self.n_shared_experts}")
        need(0 <= self.n_hash_layers <= self.n_layers,
             f"{k['n_hash_layers']}: expected 0..{self.n_layers}, got {self.n_hash_layers}")
        need(self.norm_topk_prob is True, f"{k['norm_topk_prob']}: expected true, got {self.norm_topk_prob}")
        need(self.hc_mult > 0, f"{k['hc_mult']}: expected > 0, got {self.hc_mult}")
        need(self.window_size > 0, f"{k['window_size']}: expected > 0, got {self.window_size}")
        need(len(self.compress_ratios) >= self.n_layers,
             f"{k['compress_ratios']}: has {len(self.compress_ratios)} entries, shorter than the layer count {self.n_layers}")
        need(len(self.swiglu_limits) >= self.n_layers,
             f"{k['swiglu_limits']}: has {len(self.swiglu_limits)} entries, shorter than the layer count {self.n_layers}")
        for layer, r in enumerate(self.compress_ratios[: self.n_layers]):
            need(r in SUPPORTED_RATIOS,
                 f"{k['compress_ratios']}: compression ratio at layer {layer}: got {r}, expected one of {SUPPORTED_RATIOS}")
        for layer, c in enumerate(self.swiglu_limits[: self.n_layers]):
            need(c > 0, f"{k['swiglu_limits']}: clamp at layer {layer}: expected > 0, got {c}")


def _coerce(key: str, value: Any, kind: str) -> Any:
    """Check the Python type of a metadata value (ints for int keys, numbers for floats)."""
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a boolean, got {type(value).__name__} {value!r}")
        return value
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected an array, got {type(value).__name__}")
    item_kind = "int" if kind == "int_array" else "float"
    items = tuple(_coerce(f"{key}[{i}]", v, item_kind) for i, v in enumerate(value))
    if item_kind == "int" and any(v < 0 for v in items):
        raise ConfigError(f"{key}: negative entries are not allowed, got {list(items)}")
    return items


def flash_compress_ratios(n_layers: int) -> tuple[int, ...]:
    """The Flash layer pattern: 0, 0, then 4 on even and 128 on odd layers (model.md §1.2)."""
    return tuple(0 if i < 2 else (4 if i % 2 == 0 else 128) for i in range(n_layers))


# DeepSeek V4 Flash as published (gguf.md §2.1; model.md §1.1).
FLASH = ModelConfig(
    n_layers=43,
    dim=4096,
    vocab_size=129280,
    n_heads=64,
    n_kv_heads=1,
    head_dim=512,
    value_dim=512,
    rope_head_dim=64,
    q_lora_rank=1024,
    o_lora_rank=1024,
    o_groups=8,
    n_routed_experts=256,
    n_activated_experts=6,
    moe_inter_dim=2048,
    n_shared_experts=1,
    n_hash_layers=3,
    window_size=128,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    compress_ratios=flash_compress_ratios(43),
    swiglu_limits=(10.0,) * 43,
    original_seq_len=65536,
    rope_theta=10000.0,
    rope_factor=16.0,
    beta_fast=32.0,
    beta_slow=1.0,
    compress_rope_theta=160000.0,
    route_scale=1.5,
    norm_eps=1e-6,
    hc_eps=1e-6,
    norm_topk_prob=True,
)


def flash_differences(config: ModelConfig) -> list[str]:
    """Every field where `config` differs from FLASH, as 'expected KEY=V for DeepSeek4 Flash, got G'."""
    out = []
    for field, key, kind in _KEYS:
        want, got = getattr(FLASH, field), getattr(config, field)
        if kind == "float":
            same = math.isclose(want, got, rel_tol=1e-6)
        elif kind in ("int_array", "float_array"):
            same = tuple(got[: FLASH.n_layers]) == tuple(want) and len(got) >= FLASH.n_layers
        else:
            same = want == got
        if not same:
            out.append(f"expected {key}={_show(want)} for DeepSeek4 Flash, got {_show(got)}")
    return out


def _show(value: Any) -> str:
    if isinstance(value, tuple) and len(value) > 8:
        return f"[{', '.join(map(str, value[:8]))}, ...] ({len(value)} entries)"
    return str(list(value)) if isinstance(value, tuple) else str(value)
