"""Compile the decode kernels for sm_90 (Hopper) ahead of time, on a machine with no GPU.

The CPU interpreter runs Triton kernels without compiling them, so it misses what only the
compiler rejects (a non-constexpr global read in a kernel, an op with no lowering, a layout
the backend refuses). This compiles, through Triton's own ptxas for an H100/H200 target:
- the kernels listed in `cases()` at the Flash-shape settings production and the candidates use
  (the kernels changed for the int8 path, the HC split from Gram partials, hc_post with the next mix);
- with argv[1] (JSON from record_launches.py), every specialisation a tiny decode step and
  prefill launched under the interpreter, production and int8 ops, PDL-aware kernels also in
  their PDL form (kernels/pdl.py).
Run as a script with TRITON_INTERPRET unset (tests/kernels/test_compile_sm90.py does); prints
one line per kernel and exits non-zero on the first failure.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET (the compiler is what is tested)"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dwarfstar.kernels import attend, glue, hc, matvec_int8, moe, prefill_q8  # noqa: E402

F32, F16, I32, I64, I8 = "*fp32", "*fp16", "*i32", "*i64", "*i8"


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int = 4) -> None:
    """fn's runtime args typed by `types` (pointer/scalar type strings), the rest constexprs."""
    names = fn.arg_names
    if "PDL" in names:
        constexprs = {"PDL": False} | constexprs        # kernels/pdl.py; recorded() adds PDL=True forms
    missing = [n for n in names if n not in types and n not in constexprs]
    assert not missing, f"{fn.__name__}: no type for {missing}"
    sig = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})


def recorded(path: str):
    """The specialisations record_launches.py wrote; for a PDL-aware kernel also its PDL form
    (kernels/pdl.py: the interpreter always launches PDL=False)."""
    for spec in json.loads(open(path).read()):
        fn = getattr(importlib.import_module(spec["module"]), spec["name"])
        label = f"{spec['name']} {spec['constexprs']}"
        yield label, fn, spec["types"], spec["constexprs"], spec["num_warps"]
        if "PDL" in fn.arg_names:
            yield label + " PDL", fn, spec["types"], spec["constexprs"] | {"PDL": True}, spec["num_warps"]


def cases():
    mv = dict(qs_ptr=I32, d_ptr=F16, ids_ptr=I32, xw_ptr=I32, xs_ptr=F32, y_ptr=F32, N="i32", K="i32", nw_ptr=F32,
              eps="fp32")
    for has_ids, b, tiling in ((False, 1, matvec_int8.TILING), (False, 1, matvec_int8.TILING_SHORT_ROWS),
                               (True, 1, matvec_int8.TILING_SLOTS), (False, 4, matvec_int8.TILING)):
        yield "matvec_int8", matvec_int8._q8_i8_kernel, mv, dict(
            HAS_IDS=has_ids, B=b, BP=triton.next_power_of_2(b), BLOCK_N=tiling[0], BLOCK_K=tiling[1], USE_ASM=True,
            NORM=False, KP=1)
    # q_b from q_a's raw row, normed and rounded per program (matvec_q8(norm=)), as decode launches it.
    bn, bk, _ = matvec_int8.TILING_SHORT_ROWS
    yield "matvec_int8 norm", matvec_int8._q8_i8_kernel, dict(mv, xw_ptr=F32), dict(
        HAS_IDS=False, B=1, BP=1, BLOCK_N=bn, BLOCK_K=bk, USE_ASM=True, NORM=True, KP=1024, PDL=True)
    yield "prefill_q8", prefill_q8._gemm_q8_kernel, dict(
        a_ptr=I8, sa_ptr=F32, b_ptr=I8, d_ptr=F16, y_ptr=F32, T="i32", N="i32", K="i32", G="i32"), dict(
        **dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), prefill_q8.TILES[:3])))
    split = dict(mix_ptr=F32, scale_ptr=F32, base_ptr=F32, x_ptr=F32, pre_ptr=F32, post_ptr=F32, m_ptr=F32,
                 w_ptr=F32, h_ptr=F32, eps="fp32", norm_eps="fp32", T="i32", K="i32", hw_ptr=I32, hs_ptr=F32,
                 hq_ptr=I32, ss_ptr=F32)
    post = dict(f_ptr=F32, add_ptr=F32, x_ptr=F32, post_ptr=F32, m_ptr=F32, y_ptr=F32, ss_ptr=F32, gram_ptr=F32,
                fn_ptr=F16, mix_ptr=F32, D="i32")
    # hc_post writing the next sublayer's mix partials (fn read before the PDL wait): a layer's fn
    # (M = 24 padded to 32) after attention (P = 1) and after the MoE (6 routed partials), the head's.
    for p, m, pdl in ((1, 24, False), (6, 24, True), (6, 4, True)):
        yield f"hc_post mix M={m} P={p} PDL={pdl}", hc._hc_post_kernel, post, dict(
            N=4, P=p, HAS_ADD=True, BLOCK_D=hc.HC_MIX_BLOCK_D, SUMSQ=True, GRAM=True, MIX=True, M=m,
            MP=triton.next_power_of_2(m), PDL=pdl)
    for quant in (False, True):
        yield f"hc_split_norm quant={quant} sumsq={quant}", hc._hc_split_kernel, split, dict(
            N=4, M=24, S=32, ITERS=20, FULL=True, HAS_X=True, NORMED=True, BLOCK=1024, QUANT=quant, USE_ASM=True,
            NSS=8 if quant else 0)
        yield f"hc_post sumsq={quant} gram={quant}", hc._hc_post_kernel, post, dict(
            N=4, P=12, HAS_ADD=True, BLOCK_D=hc.HC_BLOCK_D, SUMSQ=quant, GRAM=quant, MIX=False, M=1, MP=1)
        # quant: production's two launches (h with its int8 form; post + Sinkhorn), else both in one.
        for parts in ((True, False), (False, True)) if quant else ((True, True),):
            yield f"hc_split_norm_gram quant={quant} h, comb={parts}", hc._hc_split_gram_kernel, dict(
                mix_ptr=F32, scale_ptr=F32, base_ptr=F32, x_ptr=F32, gram_ptr=F32, pre_ptr=F32, post_ptr=F32,
                m_ptr=F32, w_ptr=F32, h_ptr=F32, eps="fp32", norm_eps="fp32", T="i32", D="i32", hw_ptr=I32,
                hs_ptr=F32, hq_ptr=I32), dict(N=4, M=24, S=32, ITERS=20, G=8, SLICE=hc.GRAM_SLICE,
                                              QUANT=quant and parts[0], USE_ASM=True, H=parts[0], COMB=parts[1],
                                              PDL=quant)
        yield f"rms_norm quant={quant}", glue._rms_norm_kernel, dict(
            x_ptr=F32, w_ptr=F32, y_ptr=F32, D="i32", eps="fp32", qw_ptr=I32, qs_ptr=F32, qq_ptr=I32), dict(
            HAS_W=True, BLOCK=1024, QUANT=quant, USE_ASM=True)
        yield f"swiglu quant={quant}", glue._swiglu_kernel, dict(
            g_ptr=F32, v_ptr=F32, y_ptr=F32, F="i32", limit="fp32", qw_ptr=I32, qs_ptr=F32, qq_ptr=I32), dict(
            HAS_LIMIT=True, BLOCK=1024, QUANT=quant, USE_ASM=True)
        yield f"attend combine rope+quant={quant}", attend._attend_combine_kernel, dict(
            m_ptr=F32, l_ptr=F32, o_ptr=F32, sinks_ptr=F32, out_ptr=F32, H="i32", D="i32", NB="i32", pos_ptr=I64,
            cos_ptr=F32, sin_ptr=F32, qw_ptr=I32, qs_ptr=F32, qq_ptr=I32), dict(
            NB_P2=64, BLOCK_D=attend.COMBINE_D, NP=32, ROPE=quant, QUANT=quant, USE_ASM=True)
    for dot, split, exact in (("ieee", 1, False), ("tf32x3", 1, False), ("tf32x3", 2, False), ("tf32x3", 4, False),
                              ("tf32x3", 4, True)):
        yield f"attend partial, gathered rows, {dot}, QK split {split}, fp16 keys {exact}", \
            attend._attend_partial_kernel, dict(
            q_ptr=F32, raw_ptr=F32, ring_pos_ptr=I64, kv_ptr=F32, pos_ptr=I64, comp_ptr=F32, idx_ptr=I64, m_ptr=F32,
            l_ptr=F32, o_ptr=F32, ratio="i32", H="i32", W="i32", M="i32", sqrt_d="fp32"), dict(
            D=512, HAS_COMP=True, HAS_IDX=True, BLOCK_N=attend.GATHERED_BLOCKS[0], BLOCK_H=attend.GATHERED_BLOCKS[1],
            BLOCK_D=attend.GATHERED_BLOCKS[2], DOT=dot, QK_SPLIT=split, KEYS_TF32=exact)
    yield "quantize_act", moe._quantize_act_kernel, dict(a_ptr=F32, words_ptr=I32, scale_ptr=F32, qsum_ptr=I32,
                                                         n="i32"), dict(USE_ASM=True)


def main() -> int:
    todo = [(*case, 4) for case in cases()]
    if len(sys.argv) > 1:
        todo += list(recorded(sys.argv[1]))
    for name, fn, types, constexprs, num_warps in todo:
        try:
            compile_sm90(fn, types, constexprs, num_warps)
        except Exception as e:  # noqa: BLE001 - report which kernel, then fail
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            return 1
        print(f"ok   {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
