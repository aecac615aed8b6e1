"""The production forward: the reference block structure on GPU weights, kernels for the mat-vecs.

Dims: T tokens in a chunk, n HC streams, D hidden, H heads, Dh head dim, V vocab,
K experts per token, E experts, cap compressed-row capacity, k_eff = min(index_topk, cap).

Contract:
- `ForwardModel(config, tensors, numerics, ops)`: `tensors` maps GGUF names to planar
  weights (kernels/repack.py) for every matrix and to float tensors for vectors (F32, the
  compressor `ape`), int64 for `tid2eid`, fp16 for `token_embd`; all on one device.
  `ops` = `PRODUCTION_OPS` (= `TRITON_INT8_OPS`), `TRITON_OPS` (fp32 mat-vecs, the A/B base) or
  `TWIN_OPS` (the kernels' PyTorch twins: the same forward on a CPU, a diagnostic switch for
  tests). Matrices multiplying the same input (`ForwardModel.SHARED_INPUT`) are concatenated
  at load; their entries in `tensors` are replaced by row views of the merged weight (same
  values, no second copy).
- `model.step(state)` is one decode token: reads `state.token`, `state.pos`, writes the
  layer state, `state.logits`, advances `pos` and `ring_pos`. It does no host sync, no
  host-to-device copy and has no data-dependent shapes, so it can be captured in a CUDA
  graph (engine/cuda_engine.py) and replayed for every position.
- `model.prefill(state, tokens)` appends a chunk (host positions): when T > MAX_COLS, Q8_0
  weights multiply int8 codes (kernels/prefill_q8.py, production) and other dense weights are
  dequantised and multiplied with torch.matmul, routed experts are grouped
  by expert (kernels/prefill_moe.py on CUDA), attention runs in query blocks
  (kernels/prefill_attend.py). It leaves `state` as T decode steps would (model.md §4.2).
- Both compute the reference math (model/reference.py) in fp32 with the same rounding
  points; results differ from it by fp32 summation order only — except a chunk's GEMMs on
  CUDA that are not Q8_0 products, whose inputs are rounded to fp16 (fp32 results;
  kernels/prefill_moe.gemm_dtype). With `Ops.q8_matvec` (TRITON_INT8_OPS, production) every
  Q8_0 product takes int8 activations per 32, in decode and chunks alike (the reference's
  `Numerics.int8_act`).
The state is a `CudaDecodeState` (engine/cuda_state.py); `pos` is the GPU mirror of
`len(state.tokens)`, which the caller keeps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from dwarfstar.engine.cuda_state import CudaDecodeState, CudaLayerState
from dwarfstar.kernels.attend import attend_decode
from dwarfstar.kernels.compress import compress_pool, emit_row
from dwarfstar.kernels.glue import norm_rope as glue_norm_rope
from dwarfstar.kernels.glue import rms_norm as glue_rms_norm
from dwarfstar.kernels.glue import rope as glue_rope
from dwarfstar.kernels.glue import rope_table
from dwarfstar.kernels.glue import swiglu as glue_swiglu
from dwarfstar.kernels.hc import hc_head_split, hc_head_split_ref, hc_post, hc_post_ref, hc_split, hc_split_norm
from dwarfstar.kernels.hc import hc_split_norm_gram, hc_split_ref
from dwarfstar.kernels.hc import hc_weighted_sum, hc_weighted_sum_ref
from dwarfstar.kernels.matvec import MAX_COLS, expert_matvec, expert_matvec_ref, matvec, matvec_ref
from dwarfstar.kernels.matvec import cat_planar, matvec_split_k, split_planar
from dwarfstar.kernels.matvec_int8 import expert_matvec_q8, expert_matvec_q8_ref, matvec_q8, matvec_q8_ref
from dwarfstar.kernels.moe import QBLOCK, moe_down_parts, moe_down_ref, moe_gate_up, moe_gate_up_ref, quantize_act
from dwarfstar.kernels.prefill_attend import attend_chunk, attend_dtype
from dwarfstar.kernels.prefill_moe import gemm_dtype, matmul_f32, prefill_moe
from dwarfstar.kernels.prefill_q8 import gemm_q8, gemm_q8_ref
from dwarfstar.kernels.prefill_sparse import attend_prefill
from dwarfstar.kernels.repack import Planar, PlanarF16, PlanarQ8_0, dequantize_planar, select_experts
from dwarfstar.kernels.rounding import hadamard_round, index_round, kv_round, stable_topk
from dwarfstar.kernels.rounding import index_scores as index_scores_kernel
from dwarfstar.kernels.route import route as route_kernel
from dwarfstar.kernels.topk import select_topk
from dwarfstar.model.attention import _attend
from dwarfstar.model.moe import ROUTE_SUM_FLOOR, swiglu
from dwarfstar.model.moe import stable_topk as sort_topk
from dwarfstar.model.numerics import Numerics, _hadamard_matrix, fp8_sim, half_round, rms_norm
from dwarfstar.model.numerics import int8_round as numerics_int8_round
from dwarfstar.model.rope import apply_rope, rope_frequencies
from dwarfstar.shape import OVERLAP_RATIO, QK_K, ModelConfig


# Bytes of one head block of the chunk indexer's [T, heads, N_c] fp32 products.
INDEX_SCORE_BYTES = 512 << 20


def int8_round(a: torch.Tensor) -> torch.Tensor:
    """The activations the int8 kernels multiply (numerics.int8_round: int8 per 32 inputs, back
    to float32), for chunks: on CUDA through the quantiser kernel (the same integers and scales,
    one launch instead of a dozen torch ops)."""
    if a.is_cuda and a.dim() == 2 and a.shape[-1] % QK_K == 0:
        words, scale, _ = quantize_act(a.contiguous())
        q = words.view(torch.int8).view(*scale.shape, QBLOCK).float()
        return (q * scale[..., None]).view(a.shape)
    return numerics_int8_round(a.float())


def _q8_dense(w: Planar, x: torch.Tensor, xq=None) -> torch.Tensor:
    return matvec_q8(w, xq or quantize_act(x))


def _q8_grouped(w: Planar, ids: torch.Tensor, x: torch.Tensor, xq=None) -> torch.Tensor:
    return expert_matvec_q8(w, ids, xq or quantize_act(x))


def _q8_chunk(w: Planar, x: torch.Tensor) -> torch.Tensor:
    return gemm_q8(w, quantize_act(x))


def _experts_fp32(expert_mv: Callable) -> Callable:
    """Routed experts of decode through fp32 expert mat-vecs (no activation rounding)."""

    def moe(w1, w3, w2, x, ids, wts, limit):
        ids = ids[0]
        xs = x.expand(ids.shape[0], -1).contiguous()                          # [K, D]
        mid = swiglu(expert_mv(w1, ids, xs), expert_mv(w3, ids, xs), limit) * wts[0][:, None]
        return expert_mv(w2, ids, mid.contiguous()).sum(0, keepdim=True)
    return moe


def _experts_int8(gate_up: Callable, down: Callable) -> Callable:
    """Routed experts of decode through kernels/moe.py: int8 activations, two launches."""

    def moe(w1, w3, w2, x, ids, wts, limit, **xq):
        # xq: the int8 form of x, when its producer wrote one (kernels/moe.py moe_gate_up).
        return down(w2, gate_up(w1, w3, x, ids, wts, limit, **xq), ids)
    return moe


@dataclass(frozen=True)
class Ops:
    """Kernel entry points: Triton launchers, or their twins (diagnostic CPU runs).

    `moe(w1, w3, w2, x [1, D], ids int32 [1, K], wts [1, K], limit[, xq=]) -> [1, D]` is the
    routed-expert sum of one decode token, or its partials [1, P, D] (kernels/moe.py
    moe_down_parts) that hc_post sums.
    """

    matvec: Callable
    expert_matvec: Callable
    hc_split: Callable
    moe: Callable
    moe_int8: bool      # whether `moe` rounds expert inputs to int8 (prefill then does too)
    glue: bool = False  # RMS norm and RoPE through kernels/glue.py (else the reference functions)
    # Decode-step kernels in use, a subset of FUSED_PARTS: "compress" (kernels/compress.py),
    # "route" (kernels/route.py), "index" (indexer rounding, scores and top-k); they need glue.
    fused: frozenset = frozenset()
    # Q8_0 projections with int8 activations per 32 (the rounding point ds4's CUDA decode has
    # too): decode mat-vecs (x [T <= MAX_COLS, K] -> [T, N]; kernels/matvec_int8.py), the grouped
    # out-a by slot, and chunk GEMMs on the same codes (kernels/prefill_q8.py; x [T, G*K] for a
    # [N, K] or [G, N, K] weight). None: fp32 mat-vecs and fp16 chunk GEMMs for every format.
    q8_matvec: Callable | None = None
    q8_expert_matvec: Callable | None = None
    q8_gemm: Callable | None = None
    # Decode: hc_post also writes per-program Gram partials of its output's n streams, and the
    # next HC split + norm computes both RMS norms from them (kernels/hc.py hc_split_norm_gram:
    # the row read once by D / 256 programs instead of three passes by one). fp32 order only;
    # production: 7.70 -> 7.43 ms per 2K step on the H200 (bench/decode_variants.py, docs/PERF.md).
    hc_gram: bool = False


# The fp32-mat-vec set (production until the int8 set passed its gate): all three fused parts.
# "route" was off after an H200 bisect put 4 steps of the greedy GPU test over the bound with
# it; after its rework (libdevice softplus, exact int64 selection keys) the same steps went over
# with it off too, at routing near-ties of the reference (tests/cuda/test_cuda_gpu.py reports
# the margins), so it is on again.
TRITON_OPS = Ops(matvec, expert_matvec, hc_split, _experts_int8(moe_gate_up, moe_down_parts), True, True,
                 frozenset({"compress", "route", "index"}))
# Production: the Q8_0 products with int8 activations (ds4's decode rounding point), in decode
# and in chunks (kernels/prefill_q8.py on the same codes, so the two compute one function), and
# the HC norms from hc_post's Gram partials. On the H200: 8.71 -> 7.75 ms per 2K step for the
# int8 products, 7.70 -> 7.43 for the Gram partials; 16K prefill ~3,000 tok/s. Its GPU gate
# holds it as close to the float64 int8 oracle as the float32 oracle is
# (tests/cuda/test_cuda_gpu.py, docs/PERF.md).
TRITON_INT8_OPS = dataclasses.replace(TRITON_OPS, q8_matvec=_q8_dense, q8_expert_matvec=_q8_grouped,
                                      q8_gemm=_q8_chunk, hc_gram=True)
PRODUCTION_OPS = TRITON_INT8_OPS
# Decode, ratio-4 layers: the attention rows' compressor on its own branch (level 3) beside the
# indexer's compressor, instead of before it on the same branch (bench/decode_variants.py A/B).
ATTN_COMPRESSOR_BRANCH = True
# Decode: this token's KV row on its own branch (level 4) beside the query heads' projection,
# instead of on the main stream before it (bench/decode_variants.py A/B).
KV_ROW_BRANCH = True
# Decode: hc_post also writes the next sublayer's (or the head's) HC mix partials, so the mix
# mat-vec is no launch of its own on the critical path (bench/decode_variants.py A/B).
HC_MIX_IN_POST = True
# Decode with the fused indexer: the compressors' branch forks before the query projections
# (forward.compress_step) instead of after q_a and its norm (A/B).
EARLY_COMPRESSORS = True
# Decode: q_b takes q_a's raw row and norms and rounds it per program (matvec_q8(norm=)) instead
# of a norm launch between the two projections (A/B).
Q_NORM_IN_QB = True
# Decode: the attention sublayer's HC Sinkhorn branch (level 2) is joined with the attention's
# branches rather than at hc_post (A/B).
COMB_JOIN_AT_ATTENTION = True
TWIN_OPS = Ops(matvec_ref, expert_matvec_ref, hc_split_ref, _experts_fp32(expert_matvec_ref), False)
# Twins of the mat-vecs with the Triton glue (CPU interpreter checks of the glue wiring).
TWIN_GLUE_OPS = Ops(matvec_ref, expert_matvec_ref, hc_split_ref, _experts_fp32(expert_matvec_ref), False, True)
# The fused decode kernels on top (as TRITON_OPS and production have them).
FUSED_PARTS = frozenset({"compress", "route", "index"})
TWIN_FUSED_OPS = Ops(matvec_ref, expert_matvec_ref, hc_split_ref, _experts_fp32(expert_matvec_ref), False, True,
                     FUSED_PARTS)
# Twins of TRITON_OPS's numerics (int8 routed-expert activations only), for CPU checks.
TWIN_INT8_OPS = Ops(matvec_ref, expert_matvec_ref, hc_split_ref, _experts_int8(moe_gate_up_ref, moe_down_ref),
                    True)
# Twins of the production numerics (TRITON_INT8_OPS: int8 activations for the Q8_0 products too).
TWIN_INT8_DENSE_OPS = dataclasses.replace(TWIN_INT8_OPS, q8_matvec=matvec_q8_ref, q8_expert_matvec=expert_matvec_q8_ref,
                                          q8_gemm=gemm_q8_ref)


class HcPartials(NamedTuple):
    """What decode's hc_post wrote beside its output y (the HC rows): per-program sums of squares
    and Gram partials of y's streams, and with mix_fn (the next HC weight) that mix's split-K
    partials (else None)."""
    y: torch.Tensor
    ss: torch.Tensor
    gram: torch.Tensor
    mix_fn: Planar | None
    mix: torch.Tensor | None


def _compressor(w: dict, prefix: str = "") -> tuple:
    """A layer's compressor weights (kv, gate, ape, norm): the attention rows' one, or with
    prefix "indexer_" the indexer's."""
    return tuple(w[f"{prefix}compressor_{part}"] for part in ("wkv", "wgate", "ape", "norm"))


def _grouped(p: Planar, groups: int) -> Planar:
    """[G*R, K] planar weight viewed as G stacked [R, K] matrices (expert axis = group)."""
    return type(p)(*(f.view(groups, f.shape[0] // groups, *f.shape[1:]) for f in
                     (getattr(p, n) for n in p.__dataclass_fields__)))


@dataclass(frozen=True)
class Layer:
    """One block's weights by official field name, plus its schedule facts."""

    w: dict
    ratio: int
    is_hash: bool
    swiglu_limit: float
    omega: torch.Tensor          # float64 [d_r/2] RoPE frequencies, on the device


class ForwardModel:
    # Dense matrices of a layer that multiply the same input: concatenated along N at load
    # (per planar type and K) so decode runs each group as one mat-vec launch (`proj_part`).
    # Attention's h: q_a and kv. Compressed layers' h: both compressors' kv and gate, the
    # indexer's weights. The FFN's h: shared-expert gate and up.
    SHARED_INPUT = (("wq_a", "wkv"),
                    ("compressor_wkv", "compressor_wgate", "indexer_compressor_wkv", "indexer_compressor_wgate",
                     "indexer_weights_proj"),
                    ("shared_w1", "shared_w3"))

    def __init__(self, config: ModelConfig, tensors: dict, numerics: str = "official", ops: Ops = PRODUCTION_OPS):
        from dwarfstar.model.weights import _GGUF_OF_FIELD

        self.config = config
        self.t = tensors
        self.numerics = Numerics.of(numerics)
        self.ops = ops
        self.int8_experts = ops.moe_int8
        self.device = tensors["output_norm.weight"].device
        self.layers = []
        # One frequency vector per kind of layer (r = 0 and r > 0), shared, so RoPE tables are too.
        omegas = {}
        # id(omega) -> (cos, sin) [n, d_r/2] tables; outgrown tables stay referenced in
        # _old_tables because captured graphs may read them.
        self._rope_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._old_tables: list = []
        # id(part view) -> (merged weight, first row, end row); the last merged mat-vec result.
        self._part_of: dict[int, tuple[Planar, int, int]] = {}
        self._last_merged: tuple | None = None
        # Decode runs independent branches of a sublayer on side streams (`on_branch`): level 0
        # (compressors + indexer, shared expert), 1 (the indexer's query; from a level-0 branch
        # when the compressors fork after q_a), 2 (the HC split's post and Sinkhorn matrix, joined
        # with the attention's branches or at hc_post), 3 (the attention rows' compressor beside
        # the indexer's, from level 0) and 4 (this token's KV row beside the query heads) fork
        # from the main stream unless said; none off CUDA.
        n_levels = 5 if self.device.type == "cuda" else 0
        self._branches = [torch.cuda.Stream(self.device) for _ in range(n_levels)]
        self._forked = [False] * n_levels
        # id(x) -> (x, its int8 form) written by x's producer kernel (hc_split_norm, the glue
        # RMS norm and SwiGLU) for x's int8-activation products; emptied per block.
        self._quantized: dict[int, tuple] = {}
        # What the last decode hc_post wrote beside its output (Ops.hc_gram; HcPartials).
        self._hc_partials: HcPartials | None = None
        # Inputs of the HC split's post + Sinkhorn launch on branch level 2, held until hc_post joins it.
        self._hc_comb_inputs: tuple | None = None
        for i in range(config.n_layers):
            r = config.compress_ratios[i]
            w = {f: tensors[f"blk.{i}.{g}"] for f, g in _GGUF_OF_FIELD.items() if f"blk.{i}.{g}" in tensors}
            w["wo_a_grouped"] = _grouped(w["wo_a"], config.o_groups)
            if (r > 0) not in omegas:
                omegas[r > 0] = rope_frequencies(config, r).to(self.device)
            omega = omegas[r > 0]
            self._merge_shared_input(i, w)
            self.layers.append(Layer(w, r, config.is_hash_layer(i), config.swiglu_limits[i], omega))
        self.hadamard = _hadamard_matrix(config.index_head_dim).to(self.device, torch.float32)
        self.group_ids = torch.arange(config.o_groups, dtype=torch.int32, device=self.device)

    def _merge_shared_input(self, i: int, w: dict) -> None:
        """Concatenate layer i's SHARED_INPUT groups (same planar type and K) into one weight.

        The parts become row views of the merged weight, in `w` and in `self.t` under their
        GGUF names, so the originals are freed (one layer's group is duplicated transiently)
        and every other reader (prefill, the reference oracle, byte counts) sees the same
        tensors as before."""
        from dwarfstar.model.weights import _GGUF_OF_FIELD

        for group in self.SHARED_INPUT:
            kinds: dict[tuple, list[str]] = {}
            for f in group:
                if f in w and not isinstance(w[f], torch.Tensor) and len(w[f].shape) == 2:
                    kinds.setdefault((type(w[f]), w[f].shape[1]), []).append(f)
            for fields in kinds.values():
                if len(fields) < 2:
                    continue
                sizes = [w[f].shape[0] for f in fields]
                merged = cat_planar([w[f] for f in fields])
                r0 = 0
                for f, view, n in zip(fields, split_planar(merged, sizes), sizes):
                    w[f] = self.t[f"blk.{i}.{_GGUF_OF_FIELD[f]}"] = view
                    self._part_of[id(view)] = (merged, r0, r0 + n)
                    r0 += n

    # ---- primitives -------------------------------------------------------------------
    def on_branch(self, fn: Callable, *args, level: int = 0):
        """fn(*args) on the branch stream of `level`, after all work queued so far on the
        current stream (the forking stream; __init__ lists which one each level forks from);
        `join_branch(level)` on that current stream before its result is used. Decode's small
        kernels leave most of the GPU idle one at a time: the shared expert next to the routed
        ones, the compressors + indexer next to the query heads (within that the indexer's query
        and the two compressors side by side, and the KV row), and the HC split's Sinkhorn next
        to its sublayer overlap instead (as parallel branches of the captured graph).

        Memory: tensors made here are used by the forking stream only after the join, and the
        next fork waits for the forking stream, so the allocator's per-stream reuse of their
        blocks is ordered after their last use; inputs are held by the caller until the join.
        """
        if not self._branches:
            return fn(*args)
        stream = self._branches[level]
        stream.wait_stream(torch.cuda.current_stream())
        self._forked[level] = True
        with torch.cuda.stream(stream):
            return fn(*args)

    def join_branch(self, level: int = 0) -> None:
        """The current stream waits for the branch of `level`, if one was forked since the last
        join (a wait on a stream with no work in this capture would not be part of the graph)."""
        if self._branches and self._forked[level]:
            torch.cuda.current_stream().wait_stream(self._branches[level])
            self._forked[level] = False

    def drop_cached_activations(self) -> None:
        """Forget the activations kept between calls (`_last_merged`, `_quantized`, `_hc_partials`):
        after a dropped session's graph capture they point into its private memory pool and keep
        it alive. Each is refilled by the next forward and matched by identity, so no result changes."""
        self._last_merged = None
        self._quantized.clear()
        self._hc_partials = None

    def reserve_positions(self, n: int) -> None:
        """RoPE tables for positions < n (call before capturing a step that reaches them)."""
        if not self.ops.glue:
            return
        for layer in self.layers:
            key = id(layer.omega)
            have = self._rope_tables.get(key)
            if have is None or have[0].shape[0] < n:
                if have is not None:
                    self._old_tables.append(have)
                self._rope_tables[key] = rope_table(layer.omega, max(n, 4096))

    def norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if self.ops.glue:
            return glue_rms_norm(x, weight, self.config.norm_eps)
        return rms_norm(x, weight, self.config.norm_eps)

    def rope(self, x, positions, omega, inverse: bool = False) -> torch.Tensor:
        if self.ops.glue:
            cos, sin = self._rope_tables[id(omega)]
            return glue_rope(x, positions, cos, sin, inverse)
        return apply_rope(x, positions, omega, inverse)

    def quantized(self, x: torch.Tensor):
        """The int8 form (`quantize_act`) that x's producer wrote beside x, or None."""
        q = self._quantized.get(id(x))
        return q[1] if q is not None and q[0] is x else None

    def _writes_int8(self, y_rows: int, width: int, consumer: Planar) -> bool:
        """Whether a glue producer of a decode activation [y_rows, width] should also write its
        int8 form: the consumer takes int8 activations (so its rows, and width, are whole
        super-blocks)."""
        return self.ops.glue and y_rows <= MAX_COLS and self._int8_act(consumer)

    def _int8_act(self, w: Planar) -> bool:
        """Whether this weight's products take int8 activations (Ops.q8_matvec). The Triton forms
        quantise whole 256-input super-blocks (kernels/moe.quantize_act): K % 256 == 0, as every
        Q8_0 product of Flash; other K (tiny test models) keep the fp32 mat-vec, as the
        reference's `matvec_input` does."""
        return self.ops.q8_matvec is not None and isinstance(w, PlanarQ8_0) and w.shape[-1] % QK_K == 0

    def proj(self, w: Planar, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ W^T -> [T, N]: mat-vec kernel for decode, dequantise + matmul for chunks."""
        q8 = self._int8_act(w)
        if x.shape[0] <= MAX_COLS:
            xq = self.quantized(x) if q8 else None
            if xq is not None:
                return self.ops.q8_matvec(w, x, xq=xq)
            return (self.ops.q8_matvec if q8 else self.ops.matvec)(w, x.contiguous())
        if q8:
            return self.ops.q8_gemm(w, x.contiguous())
        # Chunks: fp16 tensor-core GEMM on CUDA (fp32 results), fp32 elsewhere (prefill_moe.py).
        dt = gemm_dtype(w, x.device)
        return matmul_f32(x, dequantize_planar(w, dt), dt)

    def proj_part(self, w: Planar, x: torch.Tensor) -> torch.Tensor:
        """proj(w, x) where w may be part of a weight merged at load (_merge_shared_input): the
        merged projection runs once per x (the last result is kept, keyed by the merged weight
        and the x object, which it holds) and each part is a column slice of it. Chunks
        (T > MAX_COLS) project each part on its own: launches do not matter there, and the
        GEMM precision is chosen per weight (prefill_moe.gemm_dtype)."""
        part = self._part_of.get(id(w))
        if part is None or x.shape[0] > MAX_COLS:
            return self.proj(w, x)
        merged, r0, r1 = part
        last = self._last_merged
        if last is None or last[0] is not merged or last[1] is not x:
            last = self._last_merged = (merged, x, self.proj(merged, x))
        return last[2][:, r0:r1]

    def norm_rope(self, x, weight, positions, omega) -> torch.Tensor:
        """rope(norm(x, weight)): one launch with the glue kernels (query heads, the KV row)."""
        if self.ops.glue:
            cos, sin = self._rope_tables[id(omega)]
            return glue_norm_rope(x, weight, self.config.norm_eps, positions, cos, sin)
        return self.rope(self.norm(x, weight), positions, omega)

    def kv_row(self, kv, weight, positions, omega) -> torch.Tensor:
        """The KV row [T, Dh] from its projection: norm, RoPE, then the cache's rounding."""
        return self.kv_rounding(self.norm_rope(kv, weight, positions, omega))

    def kv_rounding(self, row: torch.Tensor) -> torch.Tensor:
        n_nope = self.config.nope_head_dim
        if self.ops.glue and (self.numerics.fp8_kv or self.numerics.half_cache):
            return kv_round(row, n_nope, self.numerics.fp8_kv, self.numerics.half_cache)
        if self.numerics.fp8_kv:
            row = torch.cat([fp8_sim(row[..., :n_nope]), row[..., n_nope:]], -1)
        return half_round(row) if self.numerics.half_cache else row

    def index_rounding(self, v: torch.Tensor, is_cached: bool) -> torch.Tensor:
        half = is_cached and self.numerics.half_cache
        if "index" in self.ops.fused and (self.numerics.fp4_indexer or half):
            return index_round(v, self.hadamard, self.numerics.fp4_indexer, half)
        if self.numerics.fp4_indexer:
            v = hadamard_round(v, self.hadamard)
        return half_round(v) if (is_cached and self.numerics.half_cache) else v

    # ---- mHC --------------------------------------------------------------------------
    def hc_pre(self, x, fn, scale, base, norm_weight):
        """-> (the sublayer input norm(sum_i pre_i x_i, norm_weight) [T, D], post, m)."""
        c = self.config
        t, n, _ = x.shape
        rows = x.reshape(t, -1)                                      # [T, n D]
        if t <= MAX_COLS:
            # The HC RMS norm folded into hc_split: the mat-vec reads the raw rows and hc_split
            # scales the mix by rsqrt(mean(rows^2) + eps) (one launch and a 64 KB pass fewer).
            mix = self.hc_mix(fn, x)                                 # [(S,) T, (2+n)n]
            _, gram = self._row_partials(x)
            if self.ops.hc_split is hc_split and self.ops.glue:
                # The weighted sum and the sublayer's RMS norm in the same launch; with int8
                # activations also h's int8 form, which h's products then take (`quantized`).
                quantize = self.ops.q8_matvec is not None and c.dim % QK_K == 0
                split = (c.hc_sinkhorn_iters, c.hc_eps, rows, c.norm_eps, norm_weight)
                if gram is not None:
                    # post and m are used only by this sublayer's hc_post: their launch (the
                    # Sinkhorn iterations, the longest program) runs beside the sublayer.
                    post, m = self.on_branch(hc_split_norm_gram, mix, scale, base, n, *split, gram, False, "comb",
                                             level=2)
                    self._hc_comb_inputs = (mix, gram)
                    h_part = hc_split_norm_gram(mix, scale, base, n, *split, gram, quantize=quantize, parts="h")
                    out = (h_part[0], post, m, *h_part[1:])
                else:
                    out = hc_split_norm(mix, scale, base, n, *split, quantize=quantize)
                if not quantize:
                    return out
                h, post, m, hq = out
                self._quantized[id(h)] = (h, hq)
                return h, post, m
            pre, post, m = self.ops.hc_split(mix, scale, base, n, c.hc_sinkhorn_iters, c.hc_eps, rows, c.norm_eps)
        else:
            # Chunks keep the norm first: their dense projection may run in fp16, where the raw
            # residual rows could overflow.
            mix = self.proj(fn, self.norm(rows, None))
            pre, post, m = self.ops.hc_split(mix, scale, base, n, c.hc_sinkhorn_iters, c.hc_eps)
        return self.norm(self.hc_sum(x, pre), norm_weight), post, m

    def hc_mix(self, fn: Planar, x: torch.Tensor) -> torch.Tensor:
        """The HC mat-vec of T <= MAX_COLS streams x [T, n, D] (their raw rows): the partials
        hc_post wrote for fn, if it did; with the Triton mat-vec, split-K partials [S, T, M] (few
        rows, K = n D: one program per row block starves the GPU), which hc_split /
        hc_head_split sum; else the [T, M] product."""
        last = self._hc_partials
        if last is not None and last.y is x and last.mix_fn is fn:
            return last.mix
        rows = x.reshape(x.shape[0], -1)
        if self.ops.matvec is matvec:
            return matvec_split_k(fn, rows)
        return self.proj(fn, rows)

    def hc_post(self, f, x, post, m, f_add=None, next_fn: Planar | None = None):
        """f: the sublayer output [T, D] or its partials [T, P, D]; f_add [T, D] added to it;
        next_fn: the HC weight of the mix that will read the result (the next sublayer's or the
        head's), whose mix partials decode's hc_post then writes too (HC_MIX_IN_POST)."""
        self.join_branch(level=2)
        self._hc_comb_inputs = None
        if self.ops.hc_gram and self.ops.glue and self.ops.hc_split is hc_split and x.shape[0] <= MAX_COLS:
            # The fused mix is the split-K mat-vec's function (fp32 partials over column blocks),
            # so only where that mat-vec is the one in use.
            fuse = HC_MIX_IN_POST and isinstance(next_fn, PlanarF16) and self.ops.matvec is matvec
            out = hc_post(f, x, post, m, f_add, sumsq=True, gram=True, mix_fn=next_fn if fuse else None)
            self._hc_partials = HcPartials(*out[:3], next_fn if fuse else None, out[3] if fuse else None)
            return out[0]
        return (hc_post if self.ops.glue else hc_post_ref)(f, x, post, m, f_add)

    def _row_partials(self, x):
        """(sums of squares, Gram partials) hc_post wrote for these HC rows, or Nones."""
        last = self._hc_partials
        return (last.ss, last.gram) if last is not None and last.y is x else (None, None)

    def hc_sum(self, x, weights):
        """sum_i weights[t, i] x[t, i]: [T, n, D] -> [T, D]."""
        return (hc_weighted_sum if self.ops.glue else hc_weighted_sum_ref)(x, weights)

    # ---- whole model ------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.t["token_embd.weight"][tokens].float()                       # [T, D]
        return e[:, None, :].expand(-1, self.config.hc_mult, -1).contiguous()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        c, t = self.config, x.shape[0]
        rows = x.reshape(t, -1)
        scale, base = self.t["output_hc_scale.weight"], self.t["output_hc_base.weight"]
        if t <= MAX_COLS:
            # Sigmoid weights with the HC RMS norm folded in (as hc_pre), one launch.
            mix = self.hc_mix(self.t["output_hc_fn.weight"], x)
            ss, _ = self._row_partials(x)
            if ss is not None:
                wts = hc_head_split(mix, scale, base, c.hc_eps, rows, c.norm_eps, ss=ss)
            else:
                split = hc_head_split if self.ops.glue else hc_head_split_ref
                wts = split(mix, scale, base, c.hc_eps, rows, c.norm_eps)
        else:
            mix = self.proj(self.t["output_hc_fn.weight"], self.norm(rows, None))
            wts = torch.sigmoid(scale[0] * mix + base) + c.hc_eps
        u, out = self.hc_sum(x, wts.contiguous()), self.t["output.weight"]
        if self._writes_int8(t, u.shape[-1], out):
            # The norm also writes the output projection's int8 form (no quantiser launch).
            y, yq = glue_rms_norm(u, self.t["output_norm.weight"], c.norm_eps, quantize=True)
            self._quantized[id(y)] = (y, yq)
        else:
            y = self.norm(u, self.t["output_norm.weight"])
        return self.proj(out, y)                                              # [T, V]

    def block(self, x, tokens, positions, layer: Layer, s: CudaLayerState, state, chunk_t0, next_fn=None):
        """One layer; next_fn: the HC weight of the mix after it (the next layer's or the head's)."""
        w = layer.w
        self._quantized.clear()
        h, post, m = self.hc_pre(x, w["hc_attn_fn"], w["hc_attn_scale"], w["hc_attn_base"], w["attn_norm"])
        f = self.attention(h, positions, layer, s, state, chunk_t0)
        x = self.hc_post(f, x, post, m, next_fn=w["hc_ffn_fn"])
        h, post, m = self.hc_pre(x, w["hc_ffn_fn"], w["hc_ffn_scale"], w["hc_ffn_base"], w["ffn_norm"])
        if chunk_t0 is None:
            routed, shared = self.moe_step(h, tokens, layer)
            return self.hc_post(routed, x, post, m, shared, next_fn=next_fn)
        return self.hc_post(self.moe_chunk(h, tokens, layer), x, post, m, next_fn=next_fn)

    def _next_fns(self) -> list:
        """Per layer, the HC weight of the mix that reads its output: the next layer's attention
        one, the head's after the last."""
        return [layer.w["hc_attn_fn"] for layer in self.layers[1:]] + [self.t["output_hc_fn.weight"]]

    def step(self, state: CudaDecodeState) -> None:
        """One graph-safe decode step for `state.token` at `state.pos`."""
        x = self.embed(state.token)                                            # [1, n, D]
        for layer, s, next_fn in zip(self.layers, state.layers, self._next_fns()):
            x = self.block(x, state.token, state.pos, layer, s, state, None, next_fn)
        state.logits.copy_(self.head(x)[0])
        w = self.config.window_size
        state.ring_pos.index_copy_(0, state.pos % w, state.pos)
        state.pos.add_(1)

    def prefill(self, state: CudaDecodeState, tokens: list[int]) -> None:
        t0, t = state.n_tokens, len(tokens)
        self.reserve_positions(t0 + t)
        ids = torch.tensor(tokens, dtype=torch.int64)
        if self.device.type == "cuda":
            # Pinned + non_blocking: the upload does not wait for the stream to drain.
            ids = ids.pin_memory().to(self.device, non_blocking=True)
        else:
            ids = ids.to(self.device)
        positions = torch.arange(t0, t0 + t, device=self.device)
        x = self.embed(ids)
        for layer, s, next_fn in zip(self.layers, state.layers, self._next_fns()):
            x = self.block(x, ids, positions, layer, s, state, t0, next_fn)
        state.logits.copy_(self.head(x[-1:])[0])
        w = self.config.window_size
        keep = positions[-w:]
        state.ring_pos.index_copy_(0, keep % w, keep)
        state.pos.fill_(t0 + t)
        state.tokens.extend(tokens)
        state.has_logits = True

    # ---- attention (model.md §2.3) ---------------------------------------------------
    def attention(self, h, positions, layer: Layer, s: CudaLayerState, state, chunk_t0):
        c, w = self.config, layer.w
        t, n_heads, d = h.shape[0], c.n_heads, c.head_dim
        # Decode with the fused indexer: the compressors need h only, so their branch forks
        # before the query projections (the indexer's query joins it once qr exists).
        early = chunk_t0 is None and self.ops.glue and layer.ratio > 0 and "index" in self.ops.fused \
            and EARLY_COMPRESSORS
        if early:
            index_wts = self.on_branch(self.compress_step, h, positions, layer, s)
        qa = self.proj_part(w["wq_a"], h)
        step = chunk_t0 is None and self.ops.glue
        # Decode: q_b norms and rounds q_a's row itself (matvec_q8(norm=)), so no norm launch sits
        # between the two projections; the indexer's query makes its own qr on its branch.
        fold_q = step and Q_NORM_IN_QB and t == 1 and self.ops.q8_matvec is _q8_dense \
            and self._int8_act(w["wq_b"]) and (early or layer.ratio == 0)
        qr = None if fold_q else self.q_rows(qa, w, w["wq_b"])
        kv_in = self.proj_part(w["wkv"], h)
        # Decode: this token's KV row (norm, RoPE, rounding) is read only by the attention, so it
        # is made beside the query heads' projection; kv_in stays referenced until the join.
        kv_args = (kv_in, w["kv_norm"], positions, layer.omega)
        kv = self.on_branch(self.kv_row, *kv_args, level=4) if step and KV_ROW_BRANCH else self.kv_row(*kv_args)
        comp = idx = None
        if early:
            comp = s.comp
            if layer.ratio == OVERLAP_RATIO:
                q_index = (self.on_branch(self.index_query_from_qa, qa, positions, w, layer.omega, level=1) if fold_q
                           else self.on_branch(self.index_query, qr, positions, w, layer.omega, level=1))
                idx = self.on_branch(self.select_rows_step, q_index, index_wts, positions, s)
        elif step and layer.ratio > 0:
            # Decode: the compressors and the indexer run first (rows emitted at pos are visible
            # to pos), on the branch stream while the query heads are projected.
            comp, idx = self.on_branch(self.compressed_keys, h, qr, positions, layer, s, None, True)
        q = matvec_q8(w["wq_b"], None, norm=(qa, w["q_norm"], c.norm_eps)) if fold_q else self.proj(w["wq_b"], qr)
        q = self.norm_rope(q.view(t, n_heads, d), None, positions, layer.omega)
        if step:
            self.join_branch()
            self.join_branch(level=4)
            if COMB_JOIN_AT_ATTENTION:
                # The HC split's post + Sinkhorn too (long done by now): so the attention sublayer's
                # hc_post has no cross-stream wait and keeps its programmatic (PDL) launch.
                self.join_branch(level=2)
            # kernels/attend.py reads the ring, this token's row and the compressed rows in place
            # (no key concatenation, no mask tensors) and writes this token's ring slot.
            args = (q[0], s.raw, state.ring_pos, kv, positions, comp, idx, layer.ratio, w["attn_sink"])
            # Every key row went through kv_rounding: fp16 numbers under the cache's half rounding.
            fp16 = self.numerics.half_cache
            if self._writes_int8(t, c.n_heads * d // c.o_groups, w["wo_a_grouped"]):
                # The combine also applies the inverse RoPE and writes out-a's int8 form.
                o, oq = attend_decode(*args, inv_rope=self._rope_tables[id(layer.omega)], quantize=True, keys_fp16=fp16)
                return self.out_proj(o[None].reshape(t, c.o_groups, -1), w, oq)
            o = self.rope(attend_decode(*args, keys_fp16=fp16)[None], positions, layer.omega, inverse=True)
            return self.out_proj(o.reshape(t, c.o_groups, -1), w)
        if chunk_t0 is not None:
            return self.attention_chunk(h, qr, q, kv, positions, layer, s, state, chunk_t0)

        # Raw window: ring rows held before this chunk, then the chunk's own rows.
        keys = torch.cat([s.raw, kv])
        key_pos = torch.cat([state.ring_pos, positions])
        win = c.window_size
        mask = ((key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - win)
                & (key_pos[None, :] >= 0))
        keep = positions[-win:]
        s.raw.index_copy_(0, keep % win, kv[-win:])
        if layer.ratio > 0:
            comp, comp_mask = self.compressed_keys(h, qr, positions, layer, s, chunk_t0)
            keys, mask = torch.cat([keys, comp]), torch.cat([mask, comp_mask], 1)

        o = _attend(q, keys, mask, w["attn_sink"])
        o = self.rope(o, positions, layer.omega, inverse=True)
        return self.out_proj(o.reshape(t, c.o_groups, -1), w)

    def attention_chunk(self, h, qr, q, kv, positions, layer: Layer, s: CudaLayerState, state, chunk_t0):
        """Prefill attention over the ring rows held before the chunk, the chunk's window band and
        the compressed rows: kernels/prefill_sparse.py with fp16 products (CUDA), else the query
        blocks of kernels/prefill_attend.py (bounded logits)."""
        c, w, t = self.config, layer.w, q.shape[0]
        ring, win = s.raw.clone(), c.window_size
        keep = positions[-win:]
        s.raw.index_copy_(0, keep % win, kv[-win:])
        comp = comp_mask = idx = None
        dtype = attend_dtype(q.device)
        if dtype != torch.float32:
            # CUDA, fp16 products: kernels/prefill_sparse.py in one launch, compressed rows by
            # index (ratio 4) or every emitted row (ratio 128), visibility derived in the kernel.
            # fp32 (CPU) keeps _attend's numerics through the query blocks below.
            if layer.ratio > 0:
                comp, idx = self.compressed_keys(h, qr, positions, layer, s, chunk_t0, as_indices=True)
            o = attend_prefill(q, kv, ring, state.ring_pos, positions, comp, idx, layer.ratio, w["attn_sink"],
                               win, dtype)
        else:
            if layer.ratio > 0:
                comp, comp_mask = self.compressed_keys(h, qr, positions, layer, s, chunk_t0)
            # Ratio-4 masks keep at most index_topk compressed rows per query: gathered per query.
            comp_k = c.index_topk if layer.ratio == OVERLAP_RATIO else None
            o = attend_chunk(q, kv, ring, state.ring_pos, positions, comp, comp_mask, w["attn_sink"], win,
                             dtype, comp_k=comp_k)
        o = self.rope(o, positions, layer.omega, inverse=True)
        return self.out_proj(o.reshape(t, c.o_groups, -1), w)

    def out_proj(self, o: torch.Tensor, w: dict, oq=None) -> torch.Tensor:
        """Grouped out-a (one [R_o, H*Dh/G] matrix per group) then out-b; oq: o's int8 form (the
        attention combine wrote it, decode)."""
        t, g, _ = o.shape
        q8 = self._int8_act(w["wo_a_grouped"])
        if t == 1:
            if oq is not None:
                oq = tuple(a.view(g, -1) for a in oq)        # [1, H Dh] -> one row per group
                y = self.ops.q8_expert_matvec(w["wo_a_grouped"], self.group_ids, o[0], xq=oq)
            else:
                mv = self.ops.q8_expert_matvec if q8 else self.ops.expert_matvec
                y = mv(w["wo_a_grouped"], self.group_ids, o[0].contiguous())
            y = y.reshape(1, -1)
        elif q8:
            y = self.ops.q8_gemm(w["wo_a_grouped"], o.reshape(t, -1).contiguous())
        else:
            dt = gemm_dtype(w["wo_a_grouped"], o.device)
            wo_a = dequantize_planar(w["wo_a_grouped"], dt)                    # [G, R_o, H*Dh/G]
            if dt == torch.float32:
                y = torch.einsum("tgi,goi->tgo", o, wo_a).reshape(t, -1)
            else:
                y = matmul_f32(o.transpose(0, 1), wo_a, dt).transpose(0, 1).reshape(t, -1)
        return self.proj(w["wo_b"], y)

    def compressed_keys(self, h, qr, positions, layer: Layer, s: CudaLayerState, chunk_t0,
                        as_indices: bool = False):
        """Run the compressors, -> (rows [N_c, Dh], mask [T, N_c]) the queries may attend to.

        `as_indices` (decode through kernels/attend.py, chunks through kernels/prefill_sparse.py):
        -> (rows [cap | N_c, Dh], the selected row indices [k_eff] (decode) or [T, index_topk]
        (chunk), or None for every row); the kernels derive visibility from the positions.
        """
        c, w, r = self.config, layer.w, layer.ratio
        q_index = None
        if chunk_t0 is None and r == OVERLAP_RATIO and "index" in self.ops.fused:
            # Decode: the indexer's query heads (their mat-vec, RoPE and rounding) depend on qr
            # only, so they run beside the compressors, on a branch of this branch.
            q_index = self.on_branch(self.index_query, qr, positions, w, layer.omega, level=1)
        comp = _compressor(w)
        args = (h, positions, chunk_t0, s.comp_kv, s.comp_score, s.comp, comp, r, layer.omega, self.kv_rounding)
        if q_index is not None and ATTN_COMPRESSOR_BRANCH:
            # ... and the attention rows' compressor beside the indexer's. Both slice the merged
            # mat-vec (proj_part), made here first so that both branches read it after it.
            self.proj_part(comp[0], h)
            self.on_branch(self.compress, *args, True, level=3)
        else:
            self.compress(*args, kv_rows=True)
        if as_indices and r != OVERLAP_RATIO:
            return s.comp, None
        if chunk_t0 is None:
            cap = s.comp.shape[0]
            rows, n_c = s.comp, cap
        else:
            n_c = (chunk_t0 + h.shape[0]) // r
            rows = s.comp[:n_c]
        # The rows emitted before each query; kernels/attend.py with the fused (-inf masked)
        # scores needs none of it.
        visible = None
        if not (as_indices and chunk_t0 is None and "index" in self.ops.fused):
            visible = torch.arange(n_c, device=h.device)[None, :] < ((positions + 1) // r)[:, None]   # [T, N_c]
        if r != OVERLAP_RATIO:
            return rows, visible
        idx_w = _compressor(w, "indexer_")
        self.compress(h, positions, chunk_t0, s.index_kv, s.index_score, s.index, idx_w, r, layer.omega,
                      lambda v: self.index_rounding(v, is_cached=True))
        if chunk_t0 is not None and n_c <= c.index_topk:
            return rows, None if as_indices else visible
        if q_index is not None:
            self.join_branch(level=1)
            self.join_branch(level=3)
            score = self.index_scores_step(q_index, self.proj_part(w["indexer_weights_proj"], h), positions, s.index)
        else:
            score = self.index_scores(qr, h, positions, s.index[:n_c], w, layer.omega)
            score = score.masked_fill(~visible, float("-inf"))
        if chunk_t0 is not None:
            top = sort_topk(score, c.index_topk)                               # [T, k]
            if as_indices:
                return rows, top
            chosen = torch.zeros_like(visible).scatter_(1, top, True)
            return rows, chosen & visible
        # Decode: gather the k_eff best rows; when fewer are visible all of them are among
        # the k_eff (finite scores beat -inf), the same set the reference keeps.
        # kernels/topk.py returns the same set in index order; the attention does not depend on it.
        topk = select_topk if "index" in self.ops.fused else stable_topk
        top = topk(score, min(c.index_topk, n_c))                              # [1, k_eff]
        if as_indices:
            return rows, top[0]
        return rows.index_select(0, top[0]), visible.gather(1, top)

    def compress_step(self, h, positions, layer: Layer, s: CudaLayerState):
        """Decode, on branch level 0 (fused indexer): both compressors of this token (the
        attention rows' one on level 3 beside the indexer's on ratio-4 layers) -> the indexer's
        head weights (a view of the merged mat-vec, which it keeps alive) on ratio-4 layers, else
        None. `select_rows_step` then finishes the indexer on the same branch."""
        w, r = layer.w, layer.ratio
        comp = _compressor(w)
        args = (h, positions, None, s.comp_kv, s.comp_score, s.comp, comp, r, layer.omega, self.kv_rounding)
        if r != OVERLAP_RATIO:
            self.compress(*args, kv_rows=True)
            return None
        # The merged mat-vec (compressors and indexer weights) first, so both branches slice it.
        index_wts = self.proj_part(w["indexer_weights_proj"], h)
        if ATTN_COMPRESSOR_BRANCH:
            self.on_branch(self.compress, *args, True, level=3)
        else:
            self.compress(*args, kv_rows=True)
        idx_w = _compressor(w, "indexer_")
        self.compress(h, positions, None, s.index_kv, s.index_score, s.index, idx_w, r, layer.omega,
                      lambda v: self.index_rounding(v, is_cached=True))
        return index_wts

    def select_rows_step(self, q_index, index_wts, pos, s: CudaLayerState) -> torch.Tensor:
        """Decode, on branch level 0 after `compress_step`: the indexer's top-k row indices
        [k_eff] over every allocated row, once its query (level 1) and the attention rows
        (level 3) are done."""
        c = self.config
        self.join_branch(level=1)
        self.join_branch(level=3)
        score = self.index_scores_step(q_index, index_wts, pos, s.index)
        return select_topk(score, min(c.index_topk, s.comp.shape[0]))[0]

    def index_scores(self, qr, h, positions, rows, w, omega) -> torch.Tensor:
        c = self.config
        d_i, n_h = c.index_head_dim, c.index_n_heads
        q = self.proj(w["indexer_wq_b"], qr).view(-1, n_h, d_i)               # [T, H_I, d_I]
        q = self.index_rounding(self.rope(q, positions, omega), is_cached=False)
        wts = self.proj(w["indexer_weights_proj"], h) / math.sqrt(d_i * n_h)   # [T, H_I]
        # Head blocks keep the [T, heads, N_c] products under INDEX_SCORE_BYTES (a chunk of
        # 2048 at 128K context would need 17 GB at once); one block when it fits (decode).
        n_blk = max(1, min(n_h, INDEX_SCORE_BYTES // max(1, 4 * q.shape[0] * rows.shape[0])))
        score = None
        for h0 in range(0, n_h, n_blk):
            part = torch.einsum("th,thc->tc", wts[:, h0:h0 + n_blk],
                                torch.relu(torch.einsum("thd,cd->thc", q[:, h0:h0 + n_blk], rows)))
            score = part if score is None else score + part
        return score

    def q_rows(self, qa, w, consumer: Planar) -> torch.Tensor:
        """qr = rms_norm(qa, q_norm) [T, q_lora], with its int8 form beside it (`quantized`) where
        `consumer`, the product that reads it (q_b, or the indexer's query alone), takes one."""
        if self._writes_int8(qa.shape[0], qa.shape[-1], consumer):
            qr, qq = glue_rms_norm(qa, w["q_norm"], self.config.norm_eps, quantize=True)
            self._quantized[id(qr)] = (qr, qq)
            return qr
        return self.norm(qa, w["q_norm"])

    def index_query_from_qa(self, qa, pos, w, omega) -> torch.Tensor:
        """`index_query` from q_a's raw row (decode with Q_NORM_IN_QB: qr is made here)."""
        return self.index_query(self.q_rows(qa, w, w["indexer_wq_b"]), pos, w, omega)

    def index_query(self, qr, pos, w, omega) -> torch.Tensor:
        """Decode: the indexer's rounded query heads [H_I, d_I] from qr [1, q_lora]."""
        c = self.config
        q = self.proj(w["indexer_wq_b"], qr).view(1, c.index_n_heads, c.index_head_dim)
        return self.index_rounding(self.rope(q, pos, omega), is_cached=False).view(c.index_n_heads, -1)

    def index_scores_step(self, q, wts, pos, rows) -> torch.Tensor:
        """Decode, kernels/rounding.py: scores [1, cap] of all rows, -inf past the visible ones,
        for the query heads `index_query` made and the head weights wts [1, H_I]."""
        c = self.config
        return index_scores_kernel(q, wts.view(c.index_n_heads).contiguous(), rows, pos, OVERLAP_RATIO,
                                   math.sqrt(c.index_head_dim * c.index_n_heads))

    # ---- compressor (model.md §2.4) --------------------------------------------------
    def compress(self, h, positions, chunk_t0, kv_f, score_f, rows, params, r, omega, finish,
                 kv_rows: bool = False):
        wkv, wgate, ape, norm = params
        a = self.proj_part(wkv, h)                                             # [T, coff*c]
        if chunk_t0 is None and "compress" in self.ops.fused:
            # kernels/compress.py: slot write + pool over channel blocks, then norm + RoPE + KV
            # rounding + append in the emit; indexer rows are normed + RoPE'd by the pool launch
            # (one program) because their rounding (`finish`) comes before the append.
            cos, sin = self._rope_tables[id(omega)]
            z, nm, eps = self.proj_part(wgate, h), self.numerics, self.config.norm_eps
            if kv_rows:
                pooled = compress_pool(a, z, ape, positions, kv_f, score_f, None, None, None, eps, r)
                emit_row(pooled, rows, positions, r, self.config.nope_head_dim, nm.fp8_kv, nm.half_cache,
                         norm, cos, sin, eps)
            else:
                row = compress_pool(a, z, ape, positions, kv_f, score_f, norm, cos, sin, eps, r)
                emit_row(finish(row), rows, positions, r)
            return
        z = self.proj_part(wgate, h) + ape[positions % r]
        if chunk_t0 is None:
            self._compress_step(a, z, positions, kv_f, score_f, rows, norm, r, omega, finish)
        else:
            self._compress_chunk(a, z, chunk_t0, kv_f, score_f, rows, norm, r, omega, finish)

    def _pool(self, kv, score, norm, starts, omega, finish):
        """Per-channel softmax pooling of candidate rows [n_w, cand, c] -> finished rows [n_w, c]."""
        # Softmax over the candidates as the last dim: over dim 1 torch picks its strided
        # "spatial" kernel, measured 33 µs per call at [1, 128, 512] on H200 (62 calls a step).
        pooled = (torch.softmax(score.transpose(1, 2), -1) * kv.transpose(1, 2)).sum(-1)
        return finish(self.rope(self.norm(pooled, norm), starts, omega))

    def _compress_step(self, a, z, pos, kv_f, score_f, rows, norm, r, omega, finish):
        """One token, graph-safe: always pool, write the row only where the window completes."""
        ov = r == OVERLAP_RATIO
        width = norm.shape[0]
        slot = pos % r + (r if ov else 0)
        kv_f.index_copy_(0, slot, a)
        score_f.index_copy_(0, slot, z)
        if ov:
            kv = torch.cat([kv_f[:r, :width], kv_f[r:, width:]])
            score = torch.cat([score_f[:r, :width], score_f[r:, width:]])
        else:
            kv, score = kv_f, score_f
        # A window still holding -inf scores pools to NaN; that row is never written.
        row = self._pool(kv[None], score[None], norm, pos + 1 - r, omega, finish)     # [1, c]
        emit = ((pos + 1) % r == 0)[:, None]                                   # [1, 1]
        idx = ((pos + 1) // r - 1).clamp_min(0)
        rows.index_copy_(0, idx, torch.where(emit, row, rows.index_select(0, idx)))
        if ov:
            kv_f[:r].copy_(torch.where(emit, kv_f[r:], kv_f[:r]))
            score_f[:r].copy_(torch.where(emit, score_f[r:], score_f[:r]))

    def _compress_chunk(self, a, z, t0, kv_f, score_f, rows, norm, r, omega, finish):
        """T tokens at once with host positions; the frontier ends as the per-token loop leaves it."""
        ov = r == OVERLAP_RATIO
        width, t_end, dev = norm.shape[0], t0 + a.shape[0], a.device
        ws = t0 - t0 % r
        base = ws - (r if ov else 0)
        # Positions base..t0-1 live in the frontier: previous window in slots 0..r-1 (r = 4),
        # the current partial window in slots (r +) p mod r — slots 0..t0-base-1 in order.
        # Index tensors are built on the device (no host-to-device upload in the chunk loop).
        seq_kv = torch.cat([kv_f[:t0 - base], a])
        seq_sc = torch.cat([score_f[:t0 - base], z])
        e0 = t0 + (-(t0 + 1)) % r                                              # first window end >= t0
        n_w = (t_end - 1 - e0) // r + 1 if e0 < t_end else 0
        if n_w:
            e_last = e0 + (n_w - 1) * r
            starts = torch.arange(e0 + 1 - r, e_last + 2 - r, r, device=dev)           # [n_w]
            idx = (starts - base)[:, None] + torch.arange(r, device=dev)[None, :]        # [n_w, r]
            if ov:
                kv = torch.cat([seq_kv[idx - r][..., :width], seq_kv[idx][..., width:]], 1)
                sc = torch.cat([seq_sc[idx - r][..., :width], seq_sc[idx][..., width:]], 1)
            else:
                kv, sc = seq_kv[idx], seq_sc[idx]
            first = (e0 + 1) // r - 1
            rows[first:first + n_w] = self._pool(kv, sc, norm, starts, omega, finish)
            if ov:
                kv_f[:r] = seq_kv[e_last + 1 - r - base:e_last + 1 - base]
                score_f[:r] = seq_sc[e_last + 1 - r - base:e_last + 1 - base]
        # The last (up to r) positions into their slots, one scatter each.
        p0 = max(t0, t_end - r)
        slots = torch.arange(p0, t_end, device=dev) % r + (r if ov else 0)
        kv_f.index_copy_(0, slots, seq_kv[p0 - base:t_end - base])
        score_f.index_copy_(0, slots, seq_sc[p0 - base:t_end - base])

    # ---- MoE (model.md §2.6) ----------------------------------------------------------
    def route(self, x, tokens, layer: Layer, topk: Callable):
        c, w = self.config, layer.w
        scores = torch.sqrt(F.softplus(self.proj(w["gate"], x)))              # [T, E]
        if layer.is_hash:
            sel = w["tid2eid"][tokens]
        else:
            sel = topk(scores + w["gate_bias"], c.n_activated_experts)
        wts = scores.gather(1, sel)
        if c.norm_topk_prob:
            wts = wts / wts.sum(-1, keepdim=True).clamp_min(ROUTE_SUM_FLOOR)
        return sel, wts * c.route_scale

    def shared(self, x, layer: Layer):
        w = layer.w
        g, v = self.proj_part(w["shared_w1"], x), self.proj_part(w["shared_w3"], x)
        if self._writes_int8(x.shape[0], g.shape[-1], w["shared_w2"]):
            mid, mq = glue_swiglu(g, v, layer.swiglu_limit, quantize=True)
            self._quantized[id(mid)] = (mid, mq)
        else:
            act = glue_swiglu if self.ops.glue and x.shape[0] <= MAX_COLS else swiglu
            mid = act(g, v, layer.swiglu_limit)
        return self.proj(w["shared_w2"], mid)

    def moe_step(self, x, tokens, layer: Layer):
        """Decode: the K selected experts (ops.moe), no host sync -> (routed [1, D] or its
        partials [1, P, D], shared expert [1, D]); hc_post adds them up."""
        c, w = self.config, layer.w
        if "route" in self.ops.fused:
            # kernels/route.py: scores, selection (or the hash table), weights in one launch.
            ids, wts = route_kernel(self.proj(w["gate"], x), tokens, None if layer.is_hash else w["gate_bias"],
                                    w.get("tid2eid"), c.n_activated_experts, c.norm_topk_prob, c.route_scale)
        else:
            sel, wts = self.route(x, tokens, layer, stable_topk)
            ids, wts = sel.to(torch.int32), wts.float().contiguous()           # [1, K]
        shared = self.on_branch(self.shared, x, layer)
        xq = self.quantized(x)
        y = self.ops.moe(w["w1"], w["w3"], w["w2"], x.contiguous(), ids, wts, layer.swiglu_limit,
                         **({"xq": xq} if xq is not None else {}))
        self.join_branch()
        return y, shared

    def moe_chunk(self, x, tokens, layer: Layer):
        """Prefill: (token, slot) pairs grouped by expert. On the GPU kernels/prefill_moe.py
        (each used expert dequantised once to fp16, one batched GEMM per batch of experts, one
        host sync per layer); elsewhere one dequantised fp32 expert at a time (the same function).

        The expert inputs get decode's rounding points (int8 per 32, `int8_round`) unless
        the ops are the fp32-expert ones, so prefill and decode compute the same function.
        """
        w = layer.w
        sel, wts = self.route(x, tokens, layer, sort_topk)
        act = int8_round if self.int8_experts else (lambda a: a)
        if x.is_cuda:
            y = prefill_moe(w["w1"], w["w3"], w["w2"], x, sel, wts.float(), layer.swiglu_limit, act,
                            gemm_dtype(w["w1"], x.device))
            return y + self.shared(x, layer)
        out = torch.zeros_like(x)
        xq = act(x)
        flat = sel.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.config.n_routed_experts).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            rows, slot = pairs // sel.shape[1], pairs % sel.shape[1]
            h = xq[rows]
            e_t = torch.full((1,), e, device=x.device)
            w1, w3, w2 = (dequantize_planar(select_experts(w[f], e_t))[0] for f in ("w1", "w3", "w2"))
            mid = act(swiglu(h @ w1.T, h @ w3.T, layer.swiglu_limit) * wts[rows, slot, None])
            out.index_add_(0, rows, mid @ w2.T)
        return out + self.shared(x, layer)
