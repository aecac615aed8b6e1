"""GPU decode state of one session: static buffers sized by ctx, so a decode step can be a CUDA graph.

Dims: W raw window, D head dim, d_I indexer head dim, r ratio, cap = ctx // r + 2 (as
engine/kv.py), V vocab.

Contract:
- `CudaDecodeState.new(config, ctx, device)` allocates everything a session needs once:
  per layer the raw ring [W, D], and for r > 0 the compressed rows [cap, D] with the
  compressor frontier (kv, score) [slots, width]; for r = 4 the indexer rows [cap, d_I] and
  their frontier [8, 2 d_I]. Plus the step's inputs and outputs: `token` int64 [1],
  `pos` int64 [1] (position of the next token = tokens held), `ring_pos` int64 [W]
  (position each ring slot holds, -1 when empty; the same for every layer) and `logits`
  float32 [V]. Tensors are never re-bound, only written in place (static addresses).
- The layout and meaning of every buffer is that of engine/kv.py (row p of the ring at
  slot p mod W; compressed row i = window i; frontier slots as the reference keeps them),
  so `to_reference()` / `load_reference(state)` convert to and from the reference state
  and snapshots use the reference format (bit-identical fp32 values).
- Buffers are float32: the official numerics already round KV rows through f16, so fp32
  storage is exact; fp16 storage (half the KV bytes) is a later option.
Host-side `tokens` is the only copy of the ids; `pos` on the GPU mirrors len(tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dwarfstar.engine.kv import DecodeState, Frontier, new_layer_state
from dwarfstar.shape import OVERLAP_RATIO, ModelConfig


@dataclass
class CudaLayerState:
    ratio: int
    raw: torch.Tensor                        # [W, D]
    comp: torch.Tensor | None = None         # [cap, D]
    comp_kv: torch.Tensor | None = None      # [slots, width]
    comp_score: torch.Tensor | None = None   # [slots, width]
    index: torch.Tensor | None = None        # [cap, d_I]
    index_kv: torch.Tensor | None = None     # [8, 2 d_I]
    index_score: torch.Tensor | None = None  # [8, 2 d_I]


@dataclass
class CudaDecodeState:
    config: ModelConfig
    ctx: int
    layers: list[CudaLayerState]
    token: torch.Tensor      # [1] int64, input of the decode step
    pos: torch.Tensor        # [1] int64
    ring_pos: torch.Tensor   # [W] int64
    logits: torch.Tensor     # [V] float32
    tokens: list[int] = field(default_factory=list)
    has_logits: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def device(self) -> torch.device:
        return self.pos.device

    @classmethod
    def new(cls, config: ModelConfig, ctx: int, device: str | torch.device) -> "CudaDecodeState":
        layers = []
        for r in config.compress_ratios:
            ref = new_layer_state(config, r, ctx, torch.float32)
            s = CudaLayerState(r, ref.raw.to(device))
            if ref.comp is not None:
                s.comp = ref.comp.rows.to(device)
                s.comp_kv, s.comp_score = ref.comp_frontier.kv.to(device), ref.comp_frontier.score.to(device)
            if ref.index is not None:
                s.index = ref.index.rows.to(device)
                s.index_kv, s.index_score = ref.index_frontier.kv.to(device), ref.index_frontier.score.to(device)
            layers.append(s)
        w = config.window_size
        return cls(config, ctx, layers,
                   token=torch.zeros(1, dtype=torch.int64, device=device),
                   pos=torch.zeros(1, dtype=torch.int64, device=device),
                   ring_pos=torch.full((w,), -1, dtype=torch.int64, device=device),
                   logits=torch.zeros(config.vocab_size, dtype=torch.float32, device=device))

    def reset(self) -> None:
        """Back to empty, in place (buffers keep their addresses for captured graphs)."""
        fresh = CudaDecodeState.new(self.config, self.ctx, "cpu")
        self._copy_from(fresh)
        self.tokens = []
        self.has_logits = False

    def _copy_from(self, other: "CudaDecodeState") -> None:
        for dst, src in zip(self.layers, other.layers):
            for name in ("raw", "comp", "comp_kv", "comp_score", "index", "index_kv", "index_score"):
                if getattr(dst, name) is not None:
                    getattr(dst, name).copy_(getattr(src, name))
        self.pos.copy_(other.pos)
        self.ring_pos.copy_(other.ring_pos)
        self.logits.copy_(other.logits)

    # ---- conversion to and from the reference state (snapshots, tests) ----------------
    def to_reference(self) -> DecodeState:
        """The same state as a CPU float32 `DecodeState` (engine/kv.py)."""
        ref = DecodeState.new(self.config, self.ctx, torch.float32)
        ref.tokens = list(self.tokens)
        ref.last_logits = self.logits.cpu().clone() if self.has_logits else None
        n = self.n_tokens
        for s, rs in zip(self.layers, ref.layers):
            rs.raw.copy_(s.raw.cpu())
            if s.comp is not None:
                rs.comp.rows.copy_(s.comp.cpu())
                rs.comp.n = n // s.ratio
                rs.comp_frontier = Frontier(s.comp_kv.cpu().clone(), s.comp_score.cpu().clone())
            if s.index is not None:
                rs.index.rows.copy_(s.index.cpu())
                rs.index.n = n // s.ratio
                rs.index_frontier = Frontier(s.index_kv.cpu().clone(), s.index_score.cpu().clone())
        return ref

    def load_reference(self, ref: DecodeState) -> None:
        """Take over a reference state (any ctx <= self.ctx) into the static buffers."""
        if ref.n_tokens > self.ctx:
            raise ValueError(f"state holds {ref.n_tokens} tokens, more than the context of {self.ctx}")
        self.reset()
        n = ref.n_tokens
        for s, rs in zip(self.layers, ref.layers):
            s.raw.copy_(rs.raw.to(torch.float32))
            if s.comp is not None:
                s.comp[: rs.comp.n].copy_(rs.comp.live().to(torch.float32))
                s.comp_kv.copy_(rs.comp_frontier.kv)
                s.comp_score.copy_(rs.comp_frontier.score)
            if s.index is not None:
                s.index[: rs.index.n].copy_(rs.index.live().to(torch.float32))
                s.index_kv.copy_(rs.index_frontier.kv)
                s.index_score.copy_(rs.index_frontier.score)
        w = self.config.window_size
        self.pos.fill_(n)
        slots = torch.arange(w)
        # Slot s holds the latest position p < n with p mod W = s.
        held = n - 1 - ((n - 1 - slots) % w)
        self.ring_pos.copy_(torch.where(held >= 0, held, -1))
        self.tokens = list(ref.tokens)
        self.has_logits = ref.last_logits is not None
        if self.has_logits:
            self.logits.copy_(ref.last_logits.to(torch.float32))

    def nbytes(self) -> int:
        total = 0
        for s in self.layers:
            for name in ("raw", "comp", "comp_kv", "comp_score", "index", "index_kv", "index_score"):
                t = getattr(s, name)
                total += 0 if t is None else t.numel() * t.element_size()
        return total + self.logits.numel() * 4


def overlap(ratio: int) -> bool:
    return ratio == OVERLAP_RATIO
