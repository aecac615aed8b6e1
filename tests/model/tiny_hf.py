"""Tiny random DeepSeek V4 models shared by the model and engine tests (model.md §8).

- `tiny_config(**overrides)` -> ModelConfig with every layer type in 6 layers.
- `hf_model(config, seed, dtype)` -> a transformers DeepseekV4ForCausalLM with every
  parameter and buffer randomised (HF zero-inits sinks, position biases, HC bases,
  router biases and tid2eid, which would hide bugs; model.md §8 item 2).
- `gguf_tensors(model, config)` -> {gguf_name: tensor} via names.py's `hf` column
  (gate_up_proj split into w1 / w3; no transposes, model.md §6).
transformers is a test-only oracle; nothing in dwarfstar imports it.
"""

from __future__ import annotations

import dataclasses

import torch

from dwarfstar import shape
from dwarfstar.gguf import names
from dwarfstar.shape import OVERLAP_RATIO, ModelConfig

BASE = dict(
    n_layers=6, dim=64, vocab_size=97, n_heads=8, n_kv_heads=1, head_dim=32, value_dim=32, rope_head_dim=8,
    q_lora_rank=16, o_lora_rank=12, o_groups=4, n_routed_experts=16, n_activated_experts=6, moe_inter_dim=32,
    n_shared_experts=1, n_hash_layers=3, window_size=8, index_n_heads=16, index_head_dim=16, index_topk=3,
    hc_mult=4, hc_sinkhorn_iters=20, compress_ratios=(0, 0, 4, 8, 4, 8), swiglu_limits=(10.0,) * 6,
    original_seq_len=4096, rope_theta=10000.0, rope_factor=16.0, beta_fast=32.0, beta_slow=1.0,
    compress_rope_theta=160000.0, route_scale=1.5, norm_eps=1e-6, hc_eps=1e-6, norm_topk_prob=True,
    context_length=65536,
)


def tiny_config(**overrides) -> ModelConfig:
    values = dict(BASE) | overrides
    n = values["n_layers"]
    values["compress_ratios"] = tuple(values["compress_ratios"])[:n]
    values["swiglu_limits"] = tuple(values["swiglu_limits"])[:n]
    config = ModelConfig(**values)
    config.check_consistency()
    return config


def hf_config(config: ModelConfig):
    from transformers import DeepseekV4Config

    heavy = {r for r in config.compress_ratios if r not in (0, OVERLAP_RATIO)}
    assert len(heavy) <= 1, "transformers has one heavily-compressed ratio per model"
    hca = heavy.pop() if heavy else 128
    return DeepseekV4Config(
        vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=1, head_dim=config.head_dim,
        q_lora_rank=config.q_lora_rank, qk_rope_head_dim=config.rope_head_dim,
        o_groups=config.o_groups, o_lora_rank=config.o_lora_rank,
        compress_ratios=[128 if r not in (0, OVERLAP_RATIO) else r for r in config.compress_ratios],
        compress_rates={"compressed_sparse_attention": OVERLAP_RATIO, "heavily_compressed_attention": hca},
        sliding_window=config.window_size, index_n_heads=config.index_n_heads,
        index_head_dim=config.index_head_dim, index_topk=config.index_topk,
        n_routed_experts=config.n_routed_experts, num_experts_per_tok=config.n_activated_experts,
        n_shared_experts=1, moe_intermediate_size=config.moe_inter_dim, num_hash_layers=config.n_hash_layers,
        routed_scaling_factor=config.route_scale, swiglu_limit=config.swiglu_limits[0],
        hc_mult=config.hc_mult, hc_sinkhorn_iters=config.hc_sinkhorn_iters, hc_eps=config.hc_eps,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, compress_rope_theta=config.compress_rope_theta,
        rope_parameters={"rope_type": "yarn", "factor": config.rope_factor,
                         "original_max_position_embeddings": config.original_seq_len,
                         "beta_fast": config.beta_fast, "beta_slow": config.beta_slow},
        max_position_embeddings=int(config.rope_factor * config.original_seq_len),
        attn_implementation="eager",
    )


def _randomise(name: str, p: torch.Tensor, g: torch.Generator, n_experts: int) -> torch.Tensor:
    def randn(std: float) -> torch.Tensor:
        return torch.randn(p.shape, generator=g, dtype=torch.float64) * std

    leaf = name.rsplit(".", 1)[-1]
    if "tid2eid" in name:
        rows = [torch.randperm(n_experts, generator=g)[: p.shape[1]] for _ in range(p.shape[0])]
        return torch.stack(rows)
    if leaf in ("scale", "hc_scale"):
        return 0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64)
    if leaf in ("base", "hc_base", "sinks", "position_bias", "e_score_correction_bias"):
        return randn(0.5)
    if p.dim() == 1:                                   # RMSNorm weights
        return 1 + randn(0.2)
    if "embed_tokens" in name:
        return randn(1.0)
    return randn(p.shape[-1] ** -0.5)                  # projections: keep activation scale


def hf_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float64):
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_config(config)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            t.copy_(_randomise(name, t, g, config.n_routed_experts).to(t.dtype))
    model = model.to(dtype)
    # grouped_mm rejects float64 (model.md §8 item 6).
    model.config._experts_implementation = "eager"
    return model


def gguf_tensors(model, config: ModelConfig) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {spec.gguf: sd[spec.hf] for spec in names.GLOBAL}
    for layer in range(config.n_layers):
        prefix = f"model.layers.{layer}."
        for spec in names.layer_specs(config, layer):
            t = sd[prefix + spec.hf]
            if spec.field in ("w1", "w3"):
                f = config.moe_inter_dim
                t = t[:, :f] if spec.field == "w1" else t[:, f:]
            out[names.layer_name(layer, spec)] = t.clone()
    return out


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]


def random_tensors(config: ModelConfig, seed: int = 0, mtp: bool = False) -> dict[str, torch.Tensor]:
    """{gguf_name: float64 tensor} for every tensor names.py expects, without transformers."""
    table = names.expected_mtp_tensors(config) if mtp else names.expected_tensors(config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (spec, ne) in table.items():
        shape_ = tuple(reversed(ne))
        field = spec.field
        if field == "tid2eid":
            out[name] = torch.stack([torch.randperm(config.n_routed_experts, generator=g)[: shape_[1]]
                                     for _ in range(shape_[0])])
            continue
        leaf = {"hc_attn_scale": "scale", "hc_ffn_scale": "scale", "hc_head_scale": "scale",
                "hc_attn_base": "base", "hc_ffn_base": "base", "hc_head_base": "base", "attn_sink": "sinks",
                "compressor_ape": "position_bias", "indexer_compressor_ape": "position_bias",
                "gate_bias": "base", "embed": "embed_tokens"}.get(field, field)
        proto = torch.empty(shape_, dtype=torch.float64)
        out[name] = _randomise(("embed_tokens." if leaf == "embed_tokens" else "x.") + leaf, proto, g,
                               config.n_routed_experts)
    return out
