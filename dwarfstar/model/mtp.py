"""The MTP (multi-token prediction) block, `mtp.0.*` from its own GGUF (model.md §3.1).

Dims: T tokens, n HC streams, D hidden, V vocab.

Contract: `MTPBlock(mtp_weights, main_model)`; `mtp.new_state()` -> its own raw-window
LayerState (sliding-only: no compressor, no indexer; never part of session snapshots).
`mtp.forward(hs, tokens, t0, state)` -> (logits [T, V], X1 [T, n, D]):
    e  = rmsw(E[τ], enorm);  X0[i] = e_proj·e + h_proj·rmsw(Hs[i], hnorm)
    X1 = one decoder block (ratio 0, top-k routing) at positions t0.. with the mtp weights
    logits = output · rmsw(collapse(X1; mtp hc_head), mtp norm)
`hs` are HC streams from a previous block (the main model's final streams, or X1 of a
previous MTP call), never a head-collapsed vector. The embedding and the `output`
matrix are the main model's.
"""

from __future__ import annotations

import torch

from dwarfstar.engine.kv import LayerState, new_layer_state
from dwarfstar.model.hc import hc_head
from dwarfstar.model.numerics import rms_norm
from dwarfstar.model.reference import ReferenceModel, block
from dwarfstar.model.weights import Weights
from dwarfstar.gguf.names import MTP_PREFIX


class MTPBlock:
    def __init__(self, weights: Weights, main: ReferenceModel):
        self.weights = weights
        self.main = main
        self.config = main.config
        self.layer = weights.mtp_layer()

    def new_state(self) -> LayerState:
        # The ring holds the last W rows only, so the context size does not matter here.
        return new_layer_state(self.config, 0, 0, self.main.dtype)

    def _get(self, name: str) -> torch.Tensor:
        return self.weights.get(MTP_PREFIX + name, self.main.dtype)

    def forward(self, hs: torch.Tensor, tokens: list[int], t0: int,
                state: LayerState) -> tuple[torch.Tensor, torch.Tensor]:
        c, dt = self.config, self.main.dtype
        ids = torch.tensor(tokens, dtype=torch.long)
        positions = torch.arange(t0, t0 + len(tokens))
        with torch.no_grad():
            e = rms_norm(self.main.weights.get("token_embd.weight", dt)[ids], self._get("enorm.weight"), c.norm_eps)
            h = rms_norm(hs.to(dt), self._get("hnorm.weight"), c.norm_eps) @ self._get("h_proj.weight").T
            x0 = (e @ self._get("e_proj.weight").T)[:, None, :] + h                  # [T, n, D]
            x1 = block(x0, ids, positions, self.layer, state, self.main.numerics, dt)
            y = hc_head(x1, self._get("hc_head_fn.weight"), self._get("hc_head_scale.weight"),
                        self._get("hc_head_base.weight"), c)
            y = rms_norm(y, self._get("norm.weight"), c.norm_eps)
            logits = y @ self.main.weights.get("output.weight", dt).T
        return logits, x1
