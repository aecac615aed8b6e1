"""Attention sublayer body: low-rank q, one shared KV row (K = V), raw window, compressed
rows, attention sinks, inverse RoPE, grouped output projection (model.md §2.3).

Dims: T tokens in the chunk, H heads, D head dim, N keys (raw + compressed), G output
groups, R_o output rank per group.

Contract: `attention(h, positions, lw, state, config, numerics, dtype)` -> f [T, D_model]
for the attn-normed input h [T, D_model] of tokens at absolute positions t0..t0+T-1
(t0 = tokens already in `state`). It mutates the layer's `state` exactly as T one-token
steps would, in the order model.md §4.1 gives: push raw KV, update the attention
compressor, update the indexer compressor, select, attend. Rows emitted at t are
visible to t.
"""

from __future__ import annotations

import math

import torch

from dwarfstar.engine.kv import LayerState
from dwarfstar.model.compressor import CompressorParams, compress, index_select, visible_rows
from dwarfstar.model.numerics import Numerics, indexer_rounding, kv_row_rounding, rms_norm
from dwarfstar.model.rope import apply_rope, rope_frequencies
from dwarfstar.model.weights import LayerWeights
from dwarfstar.shape import OVERLAP_RATIO, ModelConfig


def _raw_keys(kv: torch.Tensor, positions: torch.Tensor, state: LayerState,
              window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of the raw window for the chunk: earlier rows from the ring + the chunk's rows."""
    t0, t_end = int(positions[0]), int(positions[-1]) + 1
    first = max(0, t0 - window + 1)
    keys = torch.cat([state.raw_rows(first, t0), kv])                 # [P + T, D]
    key_pos = torch.arange(first, t_end)
    # Query t sees raw rows of positions t-W+1 .. t (the current token included).
    mask = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - window)
    return keys, mask


def _compressed_keys(h, qr, positions, lw, state, config, numerics, omega, dtype):
    """Run the compressors over the chunk; -> (compressed rows [n_c, D], mask [T, n_c])."""
    r, d = lw.ratio, config.head_dim
    compress(h, int(positions[0]), state.comp_frontier, state.comp, CompressorParams(
        lw.get("compressor_wkv", dtype), lw.get("compressor_wgate", dtype), lw.get("compressor_ape", dtype),
        lw.get("compressor_norm", dtype), r, omega,
        lambda rows: kv_row_rounding(rows, config.nope_head_dim, numerics)), config)
    rows = state.comp.live()
    if r != OVERLAP_RATIO:
        return rows, torch.arange(rows.shape[0])[None, :] < visible_rows(positions, r)[:, None]
    compress(h, int(positions[0]), state.index_frontier, state.index, CompressorParams(
        lw.get("indexer_compressor_wkv", dtype), lw.get("indexer_compressor_wgate", dtype),
        lw.get("indexer_compressor_ape", dtype), lw.get("indexer_compressor_norm", dtype), r, omega,
        lambda rows: indexer_rounding(rows, numerics, is_cached=True)), config)
    assert state.index.n == state.comp.n, (d, state.index.n, state.comp.n)
    mask = index_select(qr, h, positions, state.index.live(), lw, config, omega, numerics, dtype)
    return rows, mask


def _attend(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """One softmax over the visible keys plus a per-head sink logit that carries no value."""
    n_heads = q.shape[1]
    logits = torch.einsum("thd,nd->htn", q, keys) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask[None], float("-inf"))
    sink = sinks.view(n_heads, 1, 1).expand(n_heads, q.shape[0], 1)
    probs = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
    return torch.einsum("htn,nd->thd", probs, keys)                  # [T, H, D]


def attention(h: torch.Tensor, positions: torch.Tensor, lw: LayerWeights, state: LayerState,
              config: ModelConfig, numerics: Numerics, dtype: torch.dtype) -> torch.Tensor:
    t, n_heads, d = h.shape[0], config.n_heads, config.head_dim
    omega = rope_frequencies(config, lw.ratio)
    qr = rms_norm(lw.matvec_input(h, "wq_a", numerics) @ lw.get("wq_a", dtype).T, lw.get("q_norm", dtype),
                  config.norm_eps)
    q = rms_norm((lw.matvec_input(qr, "wq_b", numerics) @ lw.get("wq_b", dtype).T).view(t, n_heads, d), None,
                 config.norm_eps)
    q = apply_rope(q, positions, omega)                               # [T, H, D]

    kv = rms_norm(lw.matvec_input(h, "wkv", numerics) @ lw.get("wkv", dtype).T, lw.get("kv_norm", dtype),
                  config.norm_eps)
    kv = kv_row_rounding(apply_rope(kv, positions, omega), config.nope_head_dim, numerics)   # [T, D]
    keys, mask = _raw_keys(kv, positions, state, config.window_size)
    state.push_raw(kv, int(positions[0]))
    if lw.ratio > 0:
        comp, comp_mask = _compressed_keys(h, qr, positions, lw, state, config, numerics, omega, dtype)
        keys, mask = torch.cat([keys, comp]), torch.cat([mask, comp_mask], 1)

    o = _attend(q, keys, mask, lw.get("attn_sink", dtype))
    o = apply_rope(o, positions, omega, inverse=True)
    groups = config.o_groups
    wo_a = lw.get("wo_a", dtype).view(groups, config.o_lora_rank, -1)           # [G, R_o, H*D/G]
    o = lw.matvec_input(o.reshape(t, -1), "wo_a", numerics)
    y = torch.einsum("tgi,goi->tgo", o.reshape(t, groups, -1), wo_a).reshape(t, -1)
    return lw.matvec_input(y, "wo_b", numerics) @ lw.get("wo_b", dtype).T
