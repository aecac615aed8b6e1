"""Per-sequence decode state of the reference model, and its snapshot format (model.md §4).

Dims: W raw window, D head dim (KV row width), c compressor row width (D or d_I),
r compression ratio, n_c emitted compressed rows.

Contract:
- `DecodeState.new(config, ctx, dtype)` is empty; the model's forward mutates it.
  It holds exactly what a future token needs: per layer the raw-KV ring (last W rows,
  row of position p at slot p mod W), the emitted compressed rows and indexer rows
  (capacity ctx // r + 2, like ds4), and the compressor frontiers (kv and score slots
  of the partial window; for r = 4 also the previous complete window in slots 0..r-1).
  Globally: the token ids processed and the logits after the last one.
- Initial frontier values are kv 0 and score -inf, so an empty "previous window" gets
  softmax weight 0 (model.md §2.4).
- `snapshot() -> bytes` and `DecodeState.restore(bytes)` round-trip bit-exactly.

Snapshot layout (version 1, little-endian):
    magic b"DWSTATE\\0" | u32 version | u64 header length | header (UTF-8 JSON) | payload
The header holds {"n_tokens", "ctx", "dtype", "tokens": [ids], "layers": [{"ratio",
"n_comp", "n_index"}], "arrays": [[name, shape], ...]}. The payload is the listed arrays
back to back in the state's dtype, C order: "last_logits" [V] (shape [0] if none), then
per layer l: "l.raw" [min(n_tokens, W) rows in logical order, D]; for r > 0 "l.comp"
[n_comp, D], "l.comp_kv", "l.comp_score" [slots, width]; for r = 4 "l.index" [n_index,
d_I], "l.index_kv", "l.index_score" [8, 2 d_I]. Only live rows are written, so a snapshot
is small for a short context; restore re-creates full-capacity buffers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch

from dwarfstar.shape import OVERLAP_RATIO, ModelConfig

MAGIC = b"DWSTATE\0"
VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Frontier:
    """Compressor slots of the window being filled ([slots, width]; score already holds ape)."""

    kv: torch.Tensor
    score: torch.Tensor

    @classmethod
    def new(cls, ratio: int, width: int, dtype: torch.dtype) -> "Frontier":
        # Overlapping compressors (r = 4) keep the previous window too: 2r slots.
        slots = 2 * ratio if ratio == OVERLAP_RATIO else ratio
        return cls(torch.zeros(slots, width, dtype=dtype), torch.full((slots, width), float("-inf"), dtype=dtype))


@dataclass
class RowStore:
    """Append-only rows with a fixed capacity."""

    rows: torch.Tensor
    n: int = 0

    def append(self, new: torch.Tensor) -> None:
        if self.n + new.shape[0] > self.rows.shape[0]:
            raise RuntimeError(f"compressed-row capacity {self.rows.shape[0]} exceeded: context too long")
        self.rows[self.n:self.n + new.shape[0]] = new
        self.n += new.shape[0]

    def live(self) -> torch.Tensor:
        return self.rows[: self.n]


@dataclass
class LayerState:
    ratio: int
    raw: torch.Tensor                       # [W, D] ring
    comp: RowStore | None = None            # [cap, D]
    comp_frontier: Frontier | None = None
    index: RowStore | None = None           # [cap, d_I]
    index_frontier: Frontier | None = None

    def raw_rows(self, first: int, end: int) -> torch.Tensor:
        """Raw rows of positions [first, end) (must be within the last W), logical order."""
        slots = torch.arange(first, end) % self.raw.shape[0]
        return self.raw[slots]

    def push_raw(self, rows: torch.Tensor, t0: int) -> None:
        """Store the rows of positions t0.. in the ring; only the last W survive."""
        w = self.raw.shape[0]
        keep = rows[-w:]
        first = t0 + rows.shape[0] - keep.shape[0]
        self.raw[torch.arange(first, first + keep.shape[0]) % w] = keep


@dataclass
class DecodeState:
    config: ModelConfig
    ctx: int
    dtype: torch.dtype
    layers: list[LayerState]
    tokens: list[int] = field(default_factory=list)
    last_logits: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @classmethod
    def new(cls, config: ModelConfig, ctx: int, dtype: torch.dtype = torch.float32) -> "DecodeState":
        layers = [new_layer_state(config, r, ctx, dtype) for r in config.compress_ratios]
        return cls(config, ctx, dtype, layers)

    # ---- snapshot -----------------------------------------------------------------------
    def snapshot(self) -> bytes:
        arrays = self._arrays()
        header = {
            "n_tokens": self.n_tokens, "ctx": self.ctx, "dtype": str(self.dtype).removeprefix("torch."),
            "tokens": list(self.tokens),
            "layers": [{"ratio": s.ratio, "n_comp": s.comp.n if s.comp else 0,
                        "n_index": s.index.n if s.index else 0} for s in self.layers],
            "arrays": [[name, list(a.shape)] for name, a in arrays],
        }
        head = json.dumps(header).encode()
        payload = b"".join(a.contiguous().numpy().tobytes() for _, a in arrays)
        return MAGIC + struct.pack("<IQ", VERSION, len(head)) + head + payload

    def _arrays(self) -> list[tuple[str, torch.Tensor]]:
        logits = self.last_logits if self.last_logits is not None else torch.zeros(0)
        out = [("last_logits", logits.to(self.dtype))]
        n_raw = min(self.n_tokens, self.config.window_size)
        for i, s in enumerate(self.layers):
            out.append((f"{i}.raw", s.raw_rows(self.n_tokens - n_raw, self.n_tokens)))
            if s.comp is not None:
                out += [(f"{i}.comp", s.comp.live()), (f"{i}.comp_kv", s.comp_frontier.kv),
                        (f"{i}.comp_score", s.comp_frontier.score)]
            if s.index is not None:
                out += [(f"{i}.index", s.index.live()), (f"{i}.index_kv", s.index_frontier.kv),
                        (f"{i}.index_score", s.index_frontier.score)]
        return out

    @classmethod
    def restore(cls, config: ModelConfig, blob: bytes) -> "DecodeState":
        if blob[: len(MAGIC)] != MAGIC:
            raise ValueError("not a dwarfstar decode-state snapshot (bad magic)")
        version, n_head = struct.unpack_from("<IQ", blob, len(MAGIC))
        if version != VERSION:
            raise ValueError(f"snapshot version {version} is not supported (expected {VERSION})")
        start = len(MAGIC) + 12
        header = json.loads(blob[start:start + n_head])
        dtype = _DTYPES[header["dtype"]]
        if [l["ratio"] for l in header["layers"]] != list(config.compress_ratios):
            raise ValueError("snapshot was taken with a different layer schedule")
        arrays = _read_arrays(blob[start + n_head:], header["arrays"], dtype)
        state = cls.new(config, header["ctx"], dtype)
        state.tokens = list(header["tokens"])
        logits = arrays["last_logits"]
        state.last_logits = logits if logits.numel() else None
        for i, s in enumerate(state.layers):
            s.push_raw(arrays[f"{i}.raw"], state.n_tokens - arrays[f"{i}.raw"].shape[0])
            if s.comp is not None:
                s.comp.append(arrays[f"{i}.comp"])
                s.comp_frontier = Frontier(arrays[f"{i}.comp_kv"], arrays[f"{i}.comp_score"])
            if s.index is not None:
                s.index.append(arrays[f"{i}.index"])
                s.index_frontier = Frontier(arrays[f"{i}.index_kv"], arrays[f"{i}.index_score"])
        return state


def new_layer_state(config: ModelConfig, ratio: int, ctx: int, dtype: torch.dtype) -> LayerState:
    d = config.head_dim
    state = LayerState(ratio, torch.zeros(config.window_size, d, dtype=dtype))
    if ratio > 0:
        cap = ctx // ratio + 2
        width = 2 * d if ratio == OVERLAP_RATIO else d
        state.comp = RowStore(torch.zeros(cap, d, dtype=dtype))
        state.comp_frontier = Frontier.new(ratio, width, dtype)
    if ratio == OVERLAP_RATIO:
        d_i = config.index_head_dim
        state.index = RowStore(torch.zeros(ctx // ratio + 2, d_i, dtype=dtype))
        state.index_frontier = Frontier.new(ratio, 2 * d_i, dtype)
    return state


def _read_arrays(payload: bytes, listing: list, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    item = torch.empty(0, dtype=dtype).element_size()
    for name, shape in listing:
        n = 1
        for s in shape:
            n *= s
        chunk = bytearray(payload[pos:pos + n * item])
        if len(chunk) != n * item:
            raise ValueError(f"snapshot is truncated in array {name}")
        out[name] = torch.frombuffer(chunk, dtype=dtype).reshape(shape).clone() if n else torch.zeros(shape, dtype=dtype)
        pos += n * item
    return out
