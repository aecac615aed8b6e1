"""GGUF weights -> transformers `DeepseekV4ForCausalLM` config and state dict (a test oracle).

Contract (model.md §6, §8):
- `export(path, dtype=torch.float32) -> (DeepseekV4Config, state_dict)`: every tensor of
  the file dequantised (gguf-py's numpy reference, independent of our quants.py) to
  `dtype`, keyed by the HF names of `names.py`. `DeepseekV4ForCausalLM(config)
  .load_state_dict(state_dict, strict=True)` succeeds: routed gate/up are fused as
  `gate_up_proj = cat([w1, w3], dim=1)` ([E, 2F, D]); `tid2eid` becomes int64 [V, K];
  the router bias fills the `e_score_correction_bias` buffer of top-k layers. A router
  bias on a hash layer (accepted by ds4, gguf.md §3.1) has no HF counterpart and is dropped.
- `hf_config(config, metadata)` avoids the traps of model.md §8: the layer schedule comes
  from `compress_ratios` (HF's default is the Pro schedule), YaRN is given flat with
  `attention_factor = 1.0` (no mscale), the CSA rate stays 4 and the HCA rate is the file's
  other non-zero ratio, attention is eager, and float64 exports use eager experts
  (`grouped_mm` rejects fp64).
- transformers is imported inside the functions only: the package never needs it.

Limits: HF has one HCA rate and one `swiglu_limit`; a file with two different non-4
ratios or per-layer clamps that differ raises ValueError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dwarfstar import shape
from dwarfstar.gguf import names
from dwarfstar.shape import ModelConfig

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def _schedule(config: ModelConfig) -> tuple[list[str], dict[str, int]]:
    """HF layer_types and compress_rates from the per-layer ratios."""
    ratios = config.compress_ratios[: config.n_layers]
    hca = sorted({r for r in ratios if r not in (0, shape.OVERLAP_RATIO)})
    if len(hca) > 1:
        raise ValueError(f"transformers supports one heavily-compressed ratio, the file has {hca}")
    types = [SLIDING if r == 0 else CSA if r == shape.OVERLAP_RATIO else HCA for r in ratios]
    # An unused HCA rate keeps HF's default (128).
    return types, {CSA: shape.OVERLAP_RATIO, HCA: hca[0] if hca else 128}


def hf_config(config: ModelConfig, metadata: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32):
    """A `DeepseekV4Config` describing the same model as `config` (model.md §1.1 field map)."""
    from transformers import DeepseekV4Config

    metadata = metadata or {}
    limits = set(config.swiglu_limits[: config.n_layers])
    if len(limits) != 1:
        raise ValueError(f"transformers supports one swiglu_limit, the file has {sorted(limits)}")
    layer_types, compress_rates = _schedule(config)
    n_hash = config.n_hash_layers
    hf = DeepseekV4Config(
        vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        q_lora_rank=config.q_lora_rank, qk_rope_head_dim=config.rope_head_dim,
        o_groups=config.o_groups, o_lora_rank=config.o_lora_rank,
        layer_types=layer_types, compress_rates=compress_rates,
        mlp_layer_types=["hash_moe"] * n_hash + ["moe"] * (config.n_layers - n_hash),
        sliding_window=config.window_size, index_n_heads=config.index_n_heads,
        index_head_dim=config.index_head_dim, index_topk=config.index_topk,
        n_routed_experts=config.n_routed_experts, num_experts_per_tok=config.n_activated_experts,
        n_shared_experts=config.n_shared_experts, moe_intermediate_size=config.moe_inter_dim,
        scoring_func="sqrtsoftplus", norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.route_scale, swiglu_limit=limits.pop(),
        hc_mult=config.hc_mult, hc_sinkhorn_iters=config.hc_sinkhorn_iters, hc_eps=config.hc_eps,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, compress_rope_theta=config.compress_rope_theta,
        # Flat YaRN parameters: HF derives {"main": plain, "compress": yarn}. attention_factor
        # 1.0 explicitly, since the V4 math has no YaRN mscale (model.md §8 item 3).
        rope_parameters={"rope_type": "yarn", "factor": config.rope_factor,
                         "original_max_position_embeddings": config.original_seq_len,
                         "beta_fast": config.beta_fast, "beta_slow": config.beta_slow, "attention_factor": 1.0},
        max_position_embeddings=int(config.rope_factor * config.original_seq_len),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id", 0),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id", 1),
        attn_implementation="eager",
    )
    if dtype == torch.float64:
        hf._experts_implementation = "eager"
    return hf


def _read(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, np.ndarray]]]:
    """Metadata (plain values) and name -> (ggml type, raw data) via gguf-py's reader."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (int(t.tensor_type), t.data) for t in reader.tensors}
    return metadata, tensors


def _dequantised(ggml_type: int, data: np.ndarray, ne: tuple[int, ...]) -> torch.Tensor:
    """Float32 (or int32 for I32) tensor of torch shape reversed(ne)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if ggml_type == GGMLQuantizationType.I32:
        values = np.asarray(data, dtype=np.int32)
    else:
        values = dequantize(np.asarray(data), GGMLQuantizationType(ggml_type))
    # A copy: the reader's arrays are read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(values, copy=True).reshape(tuple(reversed(ne))))


def hf_key(spec: names.TensorSpec, layer: int) -> str:
    """The HF state-dict key of a GGUF tensor (global rows carry their full HF name)."""
    return spec.hf if layer < 0 else f"model.layers.{layer}.{spec.hf}"


def state_dict_from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor],
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF state dict from GGUF name -> dequantised tensor (torch shape): fuse, cast, drop."""
    sd: dict[str, torch.Tensor] = {}
    for spec in names.GLOBAL:
        sd[hf_key(spec, -1)] = tensors[spec.gguf].to(dtype)
    for layer in range(config.n_layers):
        by_field = {s.field: tensors[names.layer_name(layer, s)] for s in names.layer_specs(config, layer)}
        for spec in names.layer_specs(config, layer):
            if spec.field in ("w1", "w3"):
                continue
            value = by_field[spec.field]
            sd[hf_key(spec, layer)] = value.to(torch.int64) if spec.field == "tid2eid" else value.to(dtype)
        w1_spec = next(s for s in names.LAYER if s.field == "w1")
        sd[hf_key(w1_spec, layer)] = torch.cat([by_field["w1"], by_field["w3"]], dim=1).to(dtype)  # [E, 2F, D]
    return sd


def export(path: str | Path, dtype: torch.dtype = torch.float32):
    """(DeepseekV4Config, state_dict) for the GGUF at `path` (module contract)."""
    metadata, raw = _read(path)
    config = ModelConfig.from_metadata(metadata)
    tensors = {}
    for name, (spec, ne) in names.expected_tensors(config).items():
        if name not in raw:
            raise ValueError(f"{path}: tensor {name} is missing")
        tensors[name] = _dequantised(raw[name][0], raw[name][1], ne)
    return hf_config(config, metadata, dtype), state_dict_from_tensors(config, tensors, dtype)
