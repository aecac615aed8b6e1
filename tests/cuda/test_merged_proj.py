"""Mat-vecs sharing an input run as one launch: forward.py merges them at load (cat_planar)
and `proj_part` slices the one result. Oracle for the numbers: test_forward_cpu.py (the same
forward vs the reference); here the launch structure and the memory sharing."""

import dataclasses

import pytest
import torch

from dwarfstar.engine.engine import Engine, EngineOptions
from dwarfstar.gguf.synth import TINY, synthesize
from dwarfstar.model.forward import TRITON_OPS, TWIN_GLUE_OPS

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU twin runs (GPU: test_cuda_gpu.py)")

CONFIG = dataclasses.replace(TINY, window_size=8, index_topk=4, compress_ratios=(0, 4, 8, 4), n_hash_layers=1)


def test_merged_groups_one_matvec_each(tmp_path):
    engine = Engine.load(synthesize(tmp_path / "tiny.gguf", config=CONFIG), EngineOptions(backend="cuda", ctx=64))
    model = engine.model
    merged = {id(m): m for m, _, _ in model._part_of.values()}
    # Per layer: attention (q_a + kv) and the shared expert (gate + up); one compressor group per
    # compressed layer (3 of 4 layers), the ratio-4 ones with the indexer's three matrices.
    assert len(merged) == 2 * CONFIG.n_layers + 3
    for layer in model.layers:
        for f in ("wq_a", "wkv", "shared_w1", "shared_w3"):
            m, r0, r1 = model._part_of[id(layer.w[f])]
            # A view of the merged rows, not a copy: same storage, same bits.
            assert getattr(layer.w[f], "qs").data_ptr() == m.qs[r0:r1].data_ptr()
    calls = []
    record = TWIN_GLUE_OPS.matvec

    def matvec(w, x, out=None):
        calls.append(id(w))
        return record(w, x, out)

    # The production decode structure (TRITON_OPS: glue, fused compress and index) on twins.
    model.ops = dataclasses.replace(TWIN_GLUE_OPS, matvec=matvec, fused=TRITON_OPS.fused)
    s = engine.new_session()
    s.sync([1])
    calls.clear()
    s.eval(6)
    names = {id(layer.w[f]): f for layer in model.layers for f in layer.w}
    alone = {names[c] for c in calls if c in model._part_of}
    assert not alone, f"parts projected on their own: {alone}"
    for key in merged:
        assert calls.count(key) == 1, "each merged group: one mat-vec per step"
