"""The plain-PyTorch DeepSeek V4 forward pass: ground truth for every other path (model.md §2).

Dims: T tokens in a chunk, n HC streams, D hidden, V vocab.

Contract:
- `ReferenceModel(weights, numerics="official"|"exact", dtype=float32|float64)`.
  Activations and decode state use `dtype`; weights are converted on use.
- `model.new_state(ctx)` -> empty `DecodeState` for up to `ctx` tokens.
- `model.forward(state, tokens, all_logits=True)` appends `tokens` (one chunk of any
  length) to the state and returns the logits after each of them [T, V] (only the
  last row, [1, V], with all_logits=False: prefill skips the big head matmul);
  `state.last_logits` is set to the last row. Chunked calls give the same result as one call (model.md §4.2).
- `model.run(state, tokens)` is the same without the head: final HC streams [T, n, D].
- `model.head(x)` -> logits [T, V] from HC streams.
"""

from __future__ import annotations

import torch

from dwarfstar.engine.kv import DecodeState, LayerState
from dwarfstar.model.attention import attention
from dwarfstar.model.hc import hc_head, hc_post, hc_pre
from dwarfstar.model.moe import moe
from dwarfstar.model.numerics import Numerics, rms_norm
from dwarfstar.model.weights import LayerWeights, Weights


def block(x: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, lw: LayerWeights,
          state: LayerState, numerics: Numerics, dtype: torch.dtype) -> torch.Tensor:
    """One decoder block on HC streams x [T, n, D]: attention then MoE, each wrapped in mHC."""
    c = lw.weights.config
    u, post, m = hc_pre(x, lw.get("hc_attn_fn", dtype), lw.get("hc_attn_scale", dtype),
                        lw.get("hc_attn_base", dtype), c)
    f = attention(rms_norm(u, lw.get("attn_norm", dtype), c.norm_eps), positions, lw, state, c, numerics, dtype)
    x = hc_post(f, x, post, m)
    u, post, m = hc_pre(x, lw.get("hc_ffn_fn", dtype), lw.get("hc_ffn_scale", dtype),
                        lw.get("hc_ffn_base", dtype), c)
    f = moe(rms_norm(u, lw.get("ffn_norm", dtype), c.norm_eps), tokens, lw, c, dtype)
    return hc_post(f, x, post, m)


class ReferenceModel:
    def __init__(self, weights: Weights, numerics: str = "official", dtype: torch.dtype = torch.float32):
        self.weights = weights
        self.config = weights.config
        self.numerics = Numerics.of(numerics)
        self.dtype = dtype
        self.layers = [weights.layer(i) for i in range(self.config.n_layers)]

    def new_state(self, ctx: int) -> DecodeState:
        return DecodeState.new(self.config, ctx, self.dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """HC streams of the embeddings: every stream starts as the token's embedding row."""
        e = self.weights.get("token_embd.weight", self.dtype)[tokens]          # [T, D]
        return e[:, None, :].expand(-1, self.config.hc_mult, -1).contiguous()

    def run(self, state: DecodeState, tokens: list[int]) -> torch.Tensor:
        if not tokens:
            raise ValueError("run() needs at least one token")
        t0 = state.n_tokens
        if t0 + len(tokens) > state.ctx:
            raise ValueError(f"context overflow: {t0} + {len(tokens)} tokens > ctx {state.ctx}")
        ids = torch.tensor(tokens, dtype=torch.long)
        positions = torch.arange(t0, t0 + len(tokens))
        x = self.embed(ids)
        with torch.no_grad():
            for lw, ls in zip(self.layers, state.layers):
                x = block(x, ids, positions, lw, ls, self.numerics, self.dtype)
        state.tokens.extend(tokens)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        w, c, dt = self.weights, self.config, self.dtype
        y = hc_head(x, w.get("output_hc_fn.weight", dt), w.get("output_hc_scale.weight", dt),
                    w.get("output_hc_base.weight", dt), c)
        y = rms_norm(y, w.get("output_norm.weight", dt), c.norm_eps)
        return w.matvec_input(y, "output.weight", self.numerics) @ w.get("output.weight", dt).T

    def forward(self, state: DecodeState, tokens: list[int], all_logits: bool = True) -> torch.Tensor:
        with torch.no_grad():
            x = self.run(state, tokens)
            logits = self.head(x if all_logits else x[-1:])
        state.last_logits = logits[-1].clone()
        return logits
