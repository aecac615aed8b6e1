"""Weight binding: shape checks, and per-expert slab dequantisation from a GGUF.

Oracle for the slab path: the whole expert tensor dequantised by gguf/quants.py and
indexed — bit-identical, since one expert is one contiguous run of whole quant blocks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dwarfstar.gguf import synth
from dwarfstar.gguf.quants import dequantize
from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.model import weights as weights_mod
from dwarfstar.model.weights import Weights

from .tiny_hf import random_tensors, tiny_config

CONFIG = dataclasses.replace(synth.TINY, n_layers=2, compress_ratios=(0, 4), swiglu_limits=(10.0, 10.0))


@pytest.mark.parametrize("experts", ["q2", "q4"])
def test_expert_slabs_equal_whole_tensor(tmp_path, monkeypatch, experts):
    path = synth.synthesize(tmp_path / "w.gguf", config=CONFIG, experts=experts, seed=1)
    f = GGUFFile(path)
    w = Weights.from_gguf(f)
    monkeypatch.setattr(weights_mod, "CACHE_LIMIT", 0)
    for field in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        name = f"blk.1.{field}.weight"
        info = f.tensors[name]
        whole = dequantize(f.raw_torch(name), info.ggml_type, info.ne)
        for e in range(CONFIG.n_routed_experts):
            assert torch.equal(w.expert(name, e), whole[e])
    assert w.ints("blk.0.ffn_gate_tid2eid.weight").shape == (CONFIG.vocab_size, CONFIG.n_activated_experts)


def test_from_dict_checks_names_and_shapes():
    config = tiny_config()
    tensors = random_tensors(config)
    Weights.from_dict(config, tensors)
    bad = dict(tensors)
    bad["blk.2.attn_kv.weight"] = bad["blk.2.attn_kv.weight"].T
    with pytest.raises(ValueError, match="attn_kv"):
        Weights.from_dict(config, bad)
    del bad["blk.2.attn_kv.weight"]
    with pytest.raises(KeyError, match="attn_kv"):
        Weights.from_dict(config, bad)
