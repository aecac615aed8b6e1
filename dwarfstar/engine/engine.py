"""Load a model once and hand out sessions (docs/INTERFACES.md).

Contract:
- `Engine.load(path, EngineOptions(...))` opens the GGUF (memory-mapped), validates it
  (gguf/validate.py: the Flash profile for real files, generic checks for synthetic
  ones), builds the tokenizer from the same metadata and binds the weights. Tensors
  are dequantised on use, routed experts one expert at a time.
- `engine.config` (ModelConfig), `engine.tokenizer`, `engine.options`,
  `engine.new_session(ctx=None)` -> Session with its own decode state.
- `options.mtp` names the separate MTP GGUF; it is validated against the main model
  and exposed as `engine.mtp` (model/mtp.py), else None.
The "reference" backend lives here; backend "cuda" is engine/cuda_engine.py (same
interface). The engine never sees text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dwarfstar.engine.session import Session
from dwarfstar.model.reference import ReferenceModel
from dwarfstar.model.weights import Weights

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Default prefill chunk of the reference backend (tokens).
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "reference"
    ctx: int = 4096
    # "official" = FP8/FP4/f16 rounding points on (ds4, official model); "exact" = off.
    numerics: str = "official"
    # torch intra-op threads; 0 keeps torch's default.
    threads: int = 0
    # Activation and decode-state dtype of the reference path.
    dtype: str = "float32"
    # Tokens per prefill chunk; None = the backend's default (PREFILL_CHUNK below, or
    # cuda_engine.PREFILL_CHUNK: larger GEMMs amortise the per-layer weight dequantisation).
    prefill_chunk: int | None = None
    mtp: str | None = None
    # Backend "cuda" only: no file, random valid Flash-shaped weights made on the GPU
    # (benchmarks): expert types "q2" | "q4", the first `dummy_layers` layers (None = all).
    dummy_weights: bool = False
    dummy_experts: str = "q2"
    dummy_layers: int | None = None
    # Backend "cuda" on a GPU only: run a throwaway prefill + decode step at load so the first
    # prompt finds every kernel loaded (CudaEngine.warm_up); off: `--no-warmup`.
    warmup: bool = True


class Engine:
    def __init__(self, options: EngineOptions, gguf_file, config, tokenizer, model: ReferenceModel, mtp=None):
        self.options = options
        self.gguf = gguf_file
        self.config = config
        self.tokenizer = tokenizer
        self.model = model
        self.mtp = mtp

    @classmethod
    def load(cls, path: str | Path, options: EngineOptions = EngineOptions()) -> "Engine":
        from dwarfstar.gguf.reader import GGUFFile
        from dwarfstar.gguf.validate import validate
        from dwarfstar.text.tokenizer import Tokenizer

        if options.dummy_weights and options.backend != "cuda":
            raise ValueError("dummy_weights needs backend 'cuda'")
        if options.backend == "cuda":
            from dwarfstar.engine.cuda_engine import CudaEngine

            return CudaEngine.load(path, options)
        if options.backend != "reference":
            raise ValueError(f"backend {options.backend!r} is not available in this engine (only 'reference')")
        if options.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {options.dtype!r}")
        if options.threads > 0:
            torch.set_num_threads(options.threads)
        gguf_file = GGUFFile(path)
        config = validate(gguf_file)
        tokenizer = Tokenizer.from_metadata(gguf_file.metadata)
        weights = Weights.from_gguf(gguf_file, config)
        model = ReferenceModel(weights, options.numerics, _DTYPES[options.dtype])
        mtp = _load_mtp(options.mtp, config, model) if options.mtp else None
        return cls(options, gguf_file, config, tokenizer, model, mtp)

    def new_session(self, ctx: int | None = None) -> Session:
        return Session(self.model, ctx or self.options.ctx, self.options.prefill_chunk or PREFILL_CHUNK)


def _load_mtp(path: str, config, model: ReferenceModel):
    from dwarfstar.gguf.reader import GGUFFile
    from dwarfstar.gguf.validate import validate_mtp
    from dwarfstar.model.mtp import MTPBlock

    f = GGUFFile(path)
    validate_mtp(f, config)
    return MTPBlock(Weights.from_gguf(f, config, mtp=True), model)
