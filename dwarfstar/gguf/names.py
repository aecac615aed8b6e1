"""The single table: GGUF tensor name <-> weight field <-> transformers parameter, with shape and type.

Everything that needs to know which tensors a DeepSeek V4 GGUF holds reads it from here:
validation (exact set, dims, types), the test-model generator, the transformers export and
the weight binding of the model. GGUF spellings appear nowhere else (STYLE.md).

Conventions (gguf.md §1.4, model.md §6):
- `ne` is GGUF order (innermost first); the torch shape is `tuple(reversed(ne))`.
- Weight fields use the official checkpoint vocabulary (wq_a, wkv, wo_a, ...).
- `types` lists the ggml types accepted for the tensor; the first one is what the
  ds4 files (and our generator) use. Routed experts accept any of ROUTED_TYPES.
- The MTP block (separate GGUF, prefix `mtp.0.`) reuses the per-layer rows of a
  sliding-only (ratio 0), non-hash layer plus MTP_GLOBAL rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gguf import GGMLQuantizationType as T

from dwarfstar.shape import ModelConfig, OVERLAP_RATIO

# Routed expert types in the published files: q2 = IQ2_XXS gate/up + Q2_K down; q4 = Q4_K.
ROUTED_TYPES = (T.IQ2_XXS, T.Q2_K, T.Q4_K)
EXPERT_TYPES = {
    "q2": {"w1": T.IQ2_XXS, "w3": T.IQ2_XXS, "w2": T.Q2_K},
    "q4": {"w1": T.Q4_K, "w3": T.Q4_K, "w2": T.Q4_K},
}

Present = Callable[[ModelConfig, int], bool]


def _always(c: ModelConfig, l: int) -> bool:
    return True


@dataclass(frozen=True)
class TensorSpec:
    field: str              # official-vocabulary weight field
    gguf: str               # GGUF name; per-layer rows get the "blk.N." prefix
    hf: str                 # transformers parameter (per-layer rows: after "model.layers.N.")
    ne: Callable[[ModelConfig, int], tuple[int, ...]]
    types: tuple[int, ...]
    present: Present = _always

    @property
    def is_routed(self) -> bool:
        return self.field in ("w1", "w3", "w2")


def _compressed(c: ModelConfig, l: int) -> bool:
    return c.compress_ratios[l] != 0


def _indexed(c: ModelConfig, l: int) -> bool:
    return c.compress_ratios[l] == OVERLAP_RATIO


def _hash(c: ModelConfig, l: int) -> bool:
    return l < c.n_hash_layers


def _not_hash(c: ModelConfig, l: int) -> bool:
    return l >= c.n_hash_layers


F16, F32, Q8, I32 = (T.F16,), (T.F32,), (T.Q8_0,), (T.I32,)

GLOBAL: tuple[TensorSpec, ...] = (
    TensorSpec("embed", "token_embd.weight", "model.embed_tokens.weight", lambda c, l: (c.dim, c.vocab_size), F16),
    TensorSpec("head", "output.weight", "lm_head.weight", lambda c, l: (c.dim, c.vocab_size), Q8),
    TensorSpec("norm", "output_norm.weight", "model.norm.weight", lambda c, l: (c.dim,), F32),
    TensorSpec("hc_head_fn", "output_hc_fn.weight", "model.hc_head.hc_fn", lambda c, l: (c.hc_dim, c.hc_mult), F16),
    TensorSpec("hc_head_base", "output_hc_base.weight", "model.hc_head.hc_base", lambda c, l: (c.hc_mult,), F32),
    TensorSpec("hc_head_scale", "output_hc_scale.weight", "model.hc_head.hc_scale", lambda c, l: (1,), F32),
)

LAYER: tuple[TensorSpec, ...] = (
    TensorSpec("hc_attn_fn", "hc_attn_fn.weight", "attn_hc.fn", lambda c, l: (c.hc_dim, c.hc_mix), F16),
    TensorSpec("hc_attn_scale", "hc_attn_scale.weight", "attn_hc.scale", lambda c, l: (3,), F32),
    TensorSpec("hc_attn_base", "hc_attn_base.weight", "attn_hc.base", lambda c, l: (c.hc_mix,), F32),
    TensorSpec("attn_norm", "attn_norm.weight", "input_layernorm.weight", lambda c, l: (c.dim,), F32),
    TensorSpec("wq_a", "attn_q_a.weight", "self_attn.q_a_proj.weight", lambda c, l: (c.dim, c.q_lora_rank), Q8),
    TensorSpec("q_norm", "attn_q_a_norm.weight", "self_attn.q_a_norm.weight", lambda c, l: (c.q_lora_rank,), F32),
    TensorSpec("wq_b", "attn_q_b.weight", "self_attn.q_b_proj.weight",
               lambda c, l: (c.q_lora_rank, c.n_heads * c.head_dim), Q8),
    TensorSpec("wkv", "attn_kv.weight", "self_attn.kv_proj.weight", lambda c, l: (c.dim, c.head_dim), Q8),
    TensorSpec("kv_norm", "attn_kv_a_norm.weight", "self_attn.kv_norm.weight", lambda c, l: (c.head_dim,), F32),
    TensorSpec("attn_sink", "attn_sinks.weight", "self_attn.sinks", lambda c, l: (c.n_heads,), F32),
    TensorSpec("wo_a", "attn_output_a.weight", "self_attn.o_a_proj.weight",
               lambda c, l: (c.head_dim * (c.n_heads // c.o_groups), c.o_groups * c.o_lora_rank), Q8),
    TensorSpec("wo_b", "attn_output_b.weight", "self_attn.o_b_proj.weight",
               lambda c, l: (c.o_groups * c.o_lora_rank, c.dim), Q8),
    # Attention compressor (ratio > 0); width 2*head_dim when overlapping (ratio 4).
    TensorSpec("compressor_ape", "attn_compressor_ape.weight", "self_attn.compressor.position_bias",
               lambda c, l: (c.compressor_width(l), c.compress_ratios[l]), F16, _compressed),
    TensorSpec("compressor_wkv", "attn_compressor_kv.weight", "self_attn.compressor.kv_proj.weight",
               lambda c, l: (c.dim, c.compressor_width(l)), F16, _compressed),
    TensorSpec("compressor_wgate", "attn_compressor_gate.weight", "self_attn.compressor.gate_proj.weight",
               lambda c, l: (c.dim, c.compressor_width(l)), F16, _compressed),
    TensorSpec("compressor_norm", "attn_compressor_norm.weight", "self_attn.compressor.kv_norm.weight",
               lambda c, l: (c.head_dim,), F32, _compressed),
    # Lightning indexer (ratio 4 only) and its own overlapping compressor of width 2*index_head_dim.
    TensorSpec("indexer_wq_b", "indexer.attn_q_b.weight", "self_attn.compressor.indexer.q_b_proj.weight",
               lambda c, l: (c.q_lora_rank, c.index_n_heads * c.index_head_dim), F16, _indexed),
    TensorSpec("indexer_weights_proj", "indexer.proj.weight",
               "self_attn.compressor.indexer.scorer.weights_proj.weight",
               lambda c, l: (c.dim, c.index_n_heads), F16, _indexed),
    TensorSpec("indexer_compressor_ape", "indexer_compressor_ape.weight",
               "self_attn.compressor.indexer.position_bias",
               lambda c, l: (2 * c.index_head_dim, OVERLAP_RATIO), F16, _indexed),
    TensorSpec("indexer_compressor_wkv", "indexer_compressor_kv.weight", "self_attn.compressor.indexer.kv_proj.weight",
               lambda c, l: (c.dim, 2 * c.index_head_dim), F16, _indexed),
    TensorSpec("indexer_compressor_wgate", "indexer_compressor_gate.weight",
               "self_attn.compressor.indexer.gate_proj.weight",
               lambda c, l: (c.dim, 2 * c.index_head_dim), F16, _indexed),
    TensorSpec("indexer_compressor_norm", "indexer_compressor_norm.weight",
               "self_attn.compressor.indexer.kv_norm.weight",
               lambda c, l: (c.index_head_dim,), F32, _indexed),
    TensorSpec("hc_ffn_fn", "hc_ffn_fn.weight", "ffn_hc.fn", lambda c, l: (c.hc_dim, c.hc_mix), F16),
    TensorSpec("hc_ffn_scale", "hc_ffn_scale.weight", "ffn_hc.scale", lambda c, l: (3,), F32),
    TensorSpec("hc_ffn_base", "hc_ffn_base.weight", "ffn_hc.base", lambda c, l: (c.hc_mix,), F32),
    TensorSpec("ffn_norm", "ffn_norm.weight", "post_attention_layernorm.weight", lambda c, l: (c.dim,), F32),
    TensorSpec("gate", "ffn_gate_inp.weight", "mlp.gate.weight", lambda c, l: (c.dim, c.n_routed_experts), F16),
    # Required on top-k layers; ds4 also accepts (and validates) it on hash layers: see OPTIONAL_ON_HASH.
    TensorSpec("gate_bias", "exp_probs_b.bias", "mlp.gate.e_score_correction_bias",
               lambda c, l: (c.n_routed_experts,), F32, _not_hash),
    TensorSpec("tid2eid", "ffn_gate_tid2eid.weight", "mlp.gate.tid2eid",
               lambda c, l: (c.n_activated_experts, c.vocab_size), I32, _hash),
    TensorSpec("shared_w1", "ffn_gate_shexp.weight", "mlp.shared_experts.gate_proj.weight",
               lambda c, l: (c.dim, c.moe_inter_dim), Q8),
    TensorSpec("shared_w3", "ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight",
               lambda c, l: (c.dim, c.moe_inter_dim), Q8),
    TensorSpec("shared_w2", "ffn_down_shexp.weight", "mlp.shared_experts.down_proj.weight",
               lambda c, l: (c.moe_inter_dim, c.dim), Q8),
    # Routed experts: one contiguous [out, in] slab per expert. HF fuses gate and up into
    # mlp.experts.gate_up_proj [E, 2F, D] (gate = first F rows); see hf_export.
    TensorSpec("w1", "ffn_gate_exps.weight", "mlp.experts.gate_up_proj",
               lambda c, l: (c.dim, c.moe_inter_dim, c.n_routed_experts), ROUTED_TYPES),
    TensorSpec("w3", "ffn_up_exps.weight", "mlp.experts.gate_up_proj",
               lambda c, l: (c.dim, c.moe_inter_dim, c.n_routed_experts), ROUTED_TYPES),
    TensorSpec("w2", "ffn_down_exps.weight", "mlp.experts.down_proj",
               lambda c, l: (c.moe_inter_dim, c.dim, c.n_routed_experts), ROUTED_TYPES),
)
# Tensors accepted (and then validated) on layers where they are not required.
OPTIONAL_ON_HASH = ("gate_bias",)

MTP_PREFIX = "mtp.0."
# MTP-only tensors (model.md §6.3). F32 first: the published MTP file stores these in F32.
MTP_GLOBAL: tuple[TensorSpec, ...] = (
    TensorSpec("e_proj", "e_proj.weight", "", lambda c, l: (c.dim, c.dim), Q8),
    TensorSpec("h_proj", "h_proj.weight", "", lambda c, l: (c.dim, c.dim), Q8),
    TensorSpec("enorm", "enorm.weight", "", lambda c, l: (c.dim,), F32),
    TensorSpec("hnorm", "hnorm.weight", "", lambda c, l: (c.dim,), F32),
    TensorSpec("norm", "norm.weight", "", lambda c, l: (c.dim,), F32),
    TensorSpec("hc_head_fn", "hc_head_fn.weight", "", lambda c, l: (c.hc_dim, c.hc_mult), (T.F32, T.F16)),
    TensorSpec("hc_head_scale", "hc_head_scale.weight", "", lambda c, l: (1,), F32),
    TensorSpec("hc_head_base", "hc_head_base.weight", "", lambda c, l: (c.hc_mult,), F32),
)
# Per-layer rows whose type the MTP file may widen to F32.
MTP_F32_OK = ("hc_attn_fn", "hc_ffn_fn", "gate")


def layer_name(layer: int, spec: TensorSpec) -> str:
    return f"blk.{layer}.{spec.gguf}"


def layer_specs(config: ModelConfig, layer: int) -> list[TensorSpec]:
    """The tensors a main-model layer must hold."""
    return [s for s in LAYER if s.present(config, layer)]


def expected_tensors(config: ModelConfig) -> dict[str, tuple[TensorSpec, tuple[int, ...]]]:
    """GGUF name -> (spec, ne) for every tensor a main-model file must hold, in file order."""
    out: dict[str, tuple[TensorSpec, tuple[int, ...]]] = {}
    for spec in GLOBAL:
        out[spec.gguf] = (spec, spec.ne(config, 0))
    for layer in range(config.n_layers):
        for spec in layer_specs(config, layer):
            out[layer_name(layer, spec)] = (spec, spec.ne(config, layer))
    return out


def optional_tensors(config: ModelConfig) -> dict[str, tuple[TensorSpec, tuple[int, ...]]]:
    """Tensors accepted but not required (validated when present)."""
    out = {}
    for layer in range(config.n_layers):
        for spec in LAYER:
            if spec.field in OPTIONAL_ON_HASH and not spec.present(config, layer):
                out[layer_name(layer, spec)] = (spec, spec.ne(config, layer))
    return out


def mtp_layer_specs() -> list[TensorSpec]:
    """Per-layer rows of the MTP block: a sliding-only, top-k-routed layer (no compressor, no tid2eid)."""
    return [s for s in LAYER if s.present is _always or s.field == "gate_bias"]


def expected_mtp_tensors(config: ModelConfig) -> dict[str, tuple[TensorSpec, tuple[int, ...]]]:
    """GGUF name -> (spec, ne) for the 32 tensors of the MTP file, dims from the main model."""
    out: dict[str, tuple[TensorSpec, tuple[int, ...]]] = {}
    for spec in MTP_GLOBAL:
        out[MTP_PREFIX + spec.gguf] = (spec, spec.ne(config, 0))
    for spec in mtp_layer_specs():
        out[MTP_PREFIX + spec.gguf] = (spec, spec.ne(config, 0))
    return out
