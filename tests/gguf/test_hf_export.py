"""GGUF -> transformers export on the tiny synthetic model.

Oracles: our own reader + torch dequantiser (an implementation independent of the gguf-py
path hf_export uses) for every tensor value; transformers itself for the name map (strict
load) and the forward pass.
"""

import dataclasses
import subprocess
import sys

import pytest
import torch

from dwarfstar.gguf import hf_export, names, synth
from dwarfstar.gguf.quants import dequantize
from dwarfstar.gguf.reader import GGUFFile

transformers = pytest.importorskip("transformers", reason="transformers is the test-only oracle (test extra)")

# HCA ratio 8 is how model.md §8 makes HCA emit rows in short tests; 128 is the Flash value.
CONFIGS = {"hca128_q2": (synth.TINY, "q2"),
           "hca8_q4": (dataclasses.replace(synth.TINY, compress_ratios=(0, 0, 4, 8)), "q4")}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    config, experts = CONFIGS[request.param]
    path = synth.synthesize(tmp_path_factory.mktemp("hf") / "m.gguf", config=config, experts=experts, seed=7)
    return path, config, hf_export.export(path)


def test_state_dict_equals_gguf_values(exported):
    path, config, (_, sd) = exported
    f = GGUFFile(path)
    seen = set()
    for name, (spec, ne) in names.expected_tensors(config).items():
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        want = dequantize(f.raw_torch(name), f.tensors[name].ggml_type, ne)
        got = sd[hf_export.hf_key(spec, layer)]
        if spec.field in ("w1", "w3"):
            # gate_up_proj [E, 2F, D]: gate = first F rows of dim 1, up = the last F.
            half = config.moe_inter_dim
            got = got[:, :half] if spec.field == "w1" else got[:, half:]
        if spec.field == "tid2eid":
            assert got.dtype == torch.int64
        # Same block formulas in float32 on the same bits: exact.
        assert torch.equal(got, want.to(got.dtype)), name
        seen.add(hf_export.hf_key(spec, layer))
    assert seen == set(sd)


def test_transformers_loads_and_runs(exported):
    path, config, (hf_config, sd) = exported
    model = transformers.DeepseekV4ForCausalLM(hf_config)
    model.load_state_dict(sd, strict=True)
    model.eval()
    # 24 tokens: CSA (ratio 4) and the ratio-8 HCA already emit compressed rows.
    ids = torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]                       # [T, V]
    assert torch.isfinite(logits).all()
    # Sane spread: per-position std of order 1 (the head keeps the scale), positions differ.
    spread = logits.std(dim=-1)
    assert (spread > 0.1).all() and (spread < 10).all(), spread
    assert logits.std(dim=0).mean() > 0.1
    if config.compress_ratios[-1] == 128:
        return
    # One config suffices for the float64 export (eager experts): it agrees with float32; 1e-4 abs covers fp32 rounding over
    # 4 layers with HF's fp32 RoPE/HC (model.md §8 item 5).
    cfg64, sd64 = hf_export.export(path, torch.float64)
    model64 = transformers.DeepseekV4ForCausalLM(cfg64).to(torch.float64)
    model64.load_state_dict(sd64, strict=True)
    model64.eval()
    with torch.no_grad():
        logits64 = model64(input_ids=ids).logits[0]
    assert (logits64 - logits.double()).abs().max() < 1e-4


def test_config_follows_the_file():
    config = synth.resolve_config("flash", 6)
    hf = hf_export.hf_config(config)
    assert hf.layer_types == ["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                              "heavily_compressed_attention", "compressed_sparse_attention",
                              "heavily_compressed_attention"]
    assert hf.mlp_layer_types == ["hash_moe"] * 3 + ["moe"] * 3
    assert hf.compress_rates == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    assert hf.rope_parameters["main"]["rope_type"] == "default"
    assert hf.rope_parameters["main"]["rope_theta"] == 10000.0
    compress = hf.rope_parameters["compress"]
    assert compress["rope_type"] == "yarn" and compress["attention_factor"] == 1.0
    assert compress["rope_theta"] == 160000.0 and compress["factor"] == 16.0
    assert compress["original_max_position_embeddings"] == 65536
    assert hf.qk_rope_head_dim == 64 and hf._attn_implementation == "eager"
    assert hf_export.hf_config(config, dtype=torch.float64)._experts_implementation == "eager"
    with pytest.raises(ValueError, match="one heavily-compressed ratio"):
        hf_export.hf_config(dataclasses.replace(synth.TINY, n_layers=5, compress_ratios=(0, 0, 4, 8, 128),
                                                swiglu_limits=(10.0,) * 5))


def test_package_never_imports_transformers():
    code = ("import sys, dwarfstar.gguf.hf_export, dwarfstar.gguf.synth, dwarfstar.gguf.writer; "
            "sys.exit('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
