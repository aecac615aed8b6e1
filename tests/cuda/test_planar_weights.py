"""model/planar_weights.py: the reference on the CUDA engine's planar tensors (CPU, tiny model).

Oracle: the reference engine on the GGUF file itself. The planar tensors come from
`cuda_engine.load_tensors` of that file on the CPU; `dequantize_planar` repeats gguf's float
operations in gguf's order (tests/kernels/test_repack.py), so every weight is the same float
and the same reference code runs the same ops: the logits must be bit-equal ("exact").
Two cases: q2 experts (IQ2_XXS/Q2_K) with cache_limit 0 (every tensor per use, routed experts
one at a time through `select_experts`, as every matrix is on Flash), and q4 experts (Q4_K)
with the default cache limit (the tiny model's tensors then all kept as fp32).
The GPU use at full size is tests/cuda/test_cuda_full.py.
"""

import dataclasses

import pytest
import torch

from dwarfstar.engine.cuda_engine import CudaSession, dummy_tensors, load_tensors
from dwarfstar.engine.engine import Engine, EngineOptions
from dwarfstar.engine.session import Session
from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.gguf.synth import TINY, synthesize
from dwarfstar.kernels.repack import PlanarQ8_0
from dwarfstar.model.planar_weights import PLANAR_CACHE_LIMIT, on_device, planar_weights
from dwarfstar.model.forward import TWIN_INT8_DENSE_OPS, TWIN_INT8_OPS, ForwardModel
from dwarfstar.model.reference import ReferenceModel
from test_cuda_full import ReferenceRun, greedy_agreement

# Window 8 and index top-k 4 so that ring wrap, compressor emits (ratios 4 and 8) and the
# indexer's selection all happen within 20 tokens; layer 0 is hash-routed.
CONFIG = dataclasses.replace(TINY, window_size=8, index_topk=4, compress_ratios=(0, 4, 8, 4), n_hash_layers=1)
N_PROMPT, N_DECODE = 12, 6


def _model(tmp_path_factory, experts):
    return synthesize(tmp_path_factory.mktemp("planar") / f"tiny_{experts}.gguf", config=CONFIG, experts=experts)


@pytest.mark.parametrize("experts,cache_limit", [("q2", 0), ("q4", PLANAR_CACHE_LIMIT)])
def test_reference_on_planar_tensors_equals_reference_on_gguf(tmp_path_factory, experts, cache_limit, tol,
                                                              single_thread):
    model_path = _model(tmp_path_factory, experts)
    tokens = torch.randint(0, CONFIG.vocab_size, (N_PROMPT + N_DECODE,),
                           generator=torch.Generator().manual_seed(11)).tolist()
    gguf_session = Engine.load(model_path, EngineOptions(backend="reference", ctx=64)).new_session()
    tensors = load_tensors(GGUFFile(model_path), "cpu", progress=False)
    assert isinstance(tensors["blk.1.attn_q_a.weight"], PlanarQ8_0)
    weights = planar_weights(CONFIG, tensors, cache_limit)
    with on_device("cpu"):
        planar_session = Session(ReferenceModel(weights), ctx=64)
        planar_session.sync(tokens[:N_PROMPT])
    gguf_session.sync(tokens[:N_PROMPT])
    diffs = [(planar_session.logits() - gguf_session.logits()).abs().max().item()]
    for t in tokens[N_PROMPT:]:
        with on_device("cpu"):
            planar_session.eval(t)
        gguf_session.eval(t)
        diffs.append((planar_session.logits() - gguf_session.logits()).abs().max().item())
    assert max(diffs) <= tol("exact"), diffs
    if cache_limit == 0:
        # Nothing was kept as fp32: every matrix and expert was a per-use temporary.
        assert not weights._cache


@pytest.mark.parametrize("dense", [False, True], ids=["int8-experts", "int8-dense"])
def test_full_size_test_pipeline_on_tiny_dummy_weights(tol, logprob_error, single_thread, dense):
    """test_cuda_full.py's pipeline at tiny size on the CPU: dummy weights made directly in the
    planar layouts (no GGUF), the forward on its int8 twins (the kernels' numerics; dense: also
    the Q8_0 products', TRITON_INT8_OPS) vs the reference on the same tensors with the same
    int8-rounded inputs. Only fp32-vs-float64 order differs, so the "official_numerics" bound
    (one FP8/int8 code may move) and no greedy flip. Dense: every Q8_0 input width a multiple of
    256, as on Flash (narrower ones keep the fp32 mat-vec on both sides)."""
    config = dataclasses.replace(CONFIG, q_lora_rank=256, o_lora_rank=128) if dense else CONFIG
    tensors = dummy_tensors(config, "cpu", "q2", progress=False)
    ops = TWIN_INT8_DENSE_OPS if dense else TWIN_INT8_OPS
    session = CudaSession(ForwardModel(config, tensors, "official", ops), 64, use_graph=False)
    reference = ReferenceModel(planar_weights(config, tensors))
    oracle, plain = (ReferenceRun(reference, 64, int8, device="cpu", dense=dense) for int8 in (True, False))
    prompt = torch.randint(0, config.vocab_size, (N_PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    a = greedy_agreement(session, oracle, plain, prompt, 4, tol("official_numerics"), logprob_error)
    assert not a.over and max(a.errors) <= tol("official_numerics"), a.summary()


def test_planar_weights_checks_names_and_shapes(tmp_path_factory):
    tensors = load_tensors(GGUFFile(_model(tmp_path_factory, "q2")), "cpu", progress=False)
    del tensors["blk.2.ffn_norm.weight"]
    with pytest.raises(KeyError, match="blk.2.ffn_norm.weight"):
        planar_weights(CONFIG, tensors)


def test_on_device_restores_the_default_device():
    before = torch.get_default_device()
    with on_device("meta"):
        assert torch.zeros(3).device.type == "meta"
    assert torch.get_default_device() == before
