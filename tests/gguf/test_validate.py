"""validate / validate_mtp / summary on tiny files with one injected deviation each.

Oracles: the spec (gguf.md §3.4 tensor counts and bytes per type of the published q2
file; §5.2 rules) and files built from the names table independently of validate.py.
A full-size Flash file is written sparse (header + a hole), so the strict profile is
exercised on the real 1,328-tensor layout without 80 GB of disk.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from dwarfstar import shape
from dwarfstar.gguf import names
from dwarfstar.gguf.reader import GGUFError, GGUFFile
from dwarfstar.gguf.synth import synthesize
from dwarfstar.gguf.validate import FLASH_TENSOR_COUNT, routed_label, summary, validate, validate_mtp
from dwarfstar.gguf.writer import Value, write_gguf
from dwarfstar.text.vocab import real_vocab_metadata

from gguf_helpers import TINY, mtp_model as _mtp, model_metadata, sparse_model, table, tiny_model

FLASH_NAME = "DeepSeek V4 Flash"
# gguf.md §3.4, q2 file: type -> (tensors, bytes unpadded).
FLASH_Q2_BY_TYPE = {
    "F16": (359, 2_191_345_664), "F32": (492, 1_845_596), "Q8_0": (345, 6_598_885_376),
    "IQ2_XXS": (86, 47_613_739_008), "Q2_K": (43, 30_299_652_096), "I32": (3, 9_308_160),
}


def _same_config(got: shape.ModelConfig, want: shape.ModelConfig) -> bool:
    """Field by field; floats within 1e-6 relative because the file stores them as float32."""
    for field in dataclasses.fields(shape.ModelConfig):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(b, float):
            if not math.isclose(a, b, rel_tol=1e-6):
                return False
        elif a != b:
            return False
    return True


def _refused(path) -> str:
    with GGUFFile(path) as f, pytest.raises(GGUFError) as e:
        validate(f)
    return str(e.value)


def test_tiny_synthetic_accepted(tiny_path):
    with GGUFFile(tiny_path) as f:
        assert _same_config(validate(f), TINY)
        s = summary(f)
    assert s.is_synthetic and s.n_tensors == len(names.expected_tensors(TINY))
    assert s.routed_types == {f"blk.{i}.": ("IQ2_XXS", "IQ2_XXS", "Q2_K") for i in range(4)}


@pytest.mark.parametrize("experts", ["q2", "q4"])
def test_generator_output_accepted(tmp_path, experts):
    path = synthesize(tmp_path / "s.gguf", "tiny", experts=experts, seed=3)
    with GGUFFile(path) as f:
        config = validate(f)
        labels = {routed_label(t) for t in summary(f).routed_types.values()}
    assert config.n_layers == 4 and labels == {experts}


@pytest.fixture(scope="module")
def flash_vocab():
    return real_vocab_metadata()


def test_flash_layout_accepted_strictly(tmp_path, flash_vocab):
    expected = names.expected_tensors(shape.FLASH)
    assert len(expected) == FLASH_TENSOR_COUNT
    path = sparse_model(tmp_path / "flash.gguf", model_metadata(shape.FLASH, FLASH_NAME, flash_vocab),
                        table(expected, "q2"))
    with GGUFFile(path) as f:
        assert _same_config(validate(f), shape.FLASH)
        s = summary(f)
    assert not s.is_synthetic
    assert s.by_type == FLASH_Q2_BY_TYPE
    assert {routed_label(t) for t in s.routed_types.values()} == {"q2"} and len(s.routed_types) == 43


def test_flash_claim_with_wrong_value_names_the_key(tmp_path, flash_vocab):
    metadata = model_metadata(shape.FLASH, FLASH_NAME, flash_vocab)
    metadata["deepseek4.expert_weights_scale"] = 2.0
    path = sparse_model(tmp_path / "f.gguf", metadata, table(names.expected_tensors(shape.FLASH)))
    msg = _refused(path)
    assert "expected deepseek4.expert_weights_scale=1.5 for DeepSeek4 Flash, got 2.0" in msg


def test_flash_claim_with_moved_special_token(tmp_path, flash_vocab):
    vocab = dict(flash_vocab)
    tokens = list(vocab["tokenizer.ggml.tokens"])
    tokens[128821], tokens[128822] = tokens[128822], tokens[128821]
    vocab["tokenizer.ggml.tokens"] = tokens
    path = sparse_model(tmp_path / "f.gguf", model_metadata(shape.FLASH, FLASH_NAME, vocab),
                        table(names.expected_tensors(shape.FLASH)))
    assert "expected token '<think>' at id 128821 for DeepSeek4 Flash, got id 128822" in _refused(path)


def test_unmarked_tiny_file_refused_naming_first_difference(tmp_path):
    msg = _refused(tiny_model(tmp_path / "t.gguf", name=FLASH_NAME))
    assert "expected deepseek4.block_count=43 for DeepSeek4 Flash, got 4" in msg


W1 = "blk.1.ffn_gate_exps.weight"
CASES = {
    "missing_key": (dict(drop_keys=["deepseek4.expert_count"]),
                    "required metadata key is missing: deepseek4.expert_count"),
    "wrong_key_type": (dict(set_keys={"deepseek4.block_count": Value(4, V.INT32)}),
                       "metadata deepseek4.block_count: type INT32 not accepted, expected UINT32"),
    "wrong_array_type": (dict(set_keys={"deepseek4.swiglu_clamp_exp": Value([10] * 4, V.ARRAY, V.INT32)}),
                         "deepseek4.swiglu_clamp_exp: type ARRAY of INT32 not accepted"),
    "architecture": (dict(set_keys={"general.architecture": "llama"}),
                     "expected general.architecture=deepseek4, got 'llama'"),
    "inconsistent": (dict(set_keys={"deepseek4.attention.value_length": 64}),
                     "deepseek4.attention.value_length: expected 128"),
    "ratio": (dict(set_keys={"deepseek4.attention.compress_ratios": [0, 0, 4, 16]}),
              "compression ratio at layer 3: got 16"),
    "missing_tensor": (dict(drop_tensors=["blk.2.indexer.proj.weight"]),
                       "required tensor is missing: blk.2.indexer.proj.weight"),
    "extra_tensor": (dict(extra_tensors=[("blk.0.indexer.proj.weight", (256, 4), T.F16)]),
                     "unexpected tensor: blk.0.indexer.proj.weight"),
    "wrong_shape": (dict(set_tensors={"blk.3.attn_kv.weight": ((256, 64), T.Q8_0)}),
                    "tensor blk.3.attn_kv.weight: has dim[1]=64, expected 128"),
    "wrong_ndims": (dict(set_tensors={"output_hc_scale.weight": ((1, 1), T.F32)}),
                    "tensor output_hc_scale.weight: has 2 dims [1, 1], expected 1 dims [1]"),
    "wrong_type": (dict(set_tensors={"blk.0.attn_norm.weight": ((256,), T.F16)}),
                   "tensor blk.0.attn_norm.weight: has type F16, expected type F32"),
    "vocab_vs_embedding": (dict(set_tensors={"token_embd.weight": ((256, 500), T.F16)}),
                           "tensor token_embd.weight: has dim[1]=500, expected 512"),
    "routed_type": (dict(set_tensors={W1: ((256, 256, 8), T.Q8_0)}),
                    f"tensor {W1}: has type Q8_0, expected a routed expert quant type IQ2_XXS or Q2_K or Q4_K"),
    "gate_up_differ": (dict(set_tensors={W1: ((256, 256, 8), T.Q4_K)}),
                       "blk.1.ffn_up_exps.weight: routed gate/up experts use different quant types (Q4_K vs IQ2_XXS)"),
    "tid2eid_range": (dict(data={"blk.0.ffn_gate_tid2eid.weight": np.full(2 * 512, 8, "<i4").tobytes()}),
                      "tensor blk.0.ffn_gate_tid2eid.weight: expert ids must lie in [0, 8), found [8, 8]"),
}


@pytest.mark.parametrize("case", CASES)
def test_single_deviation_refused(tmp_path, case):
    kwargs, message = CASES[case]
    assert message in _refused(tiny_model(tmp_path / f"{case}.gguf", **kwargs))


def test_down_type_may_differ_and_hash_layer_bias_optional(tmp_path):
    path = tiny_model(tmp_path / "mixed.gguf",
                      set_tensors={"blk.2.ffn_down_exps.weight": ((256, 256, 8), T.Q4_K)},
                      extra_tensors=[("blk.0.exp_probs_b.bias", (8,), T.F32)])
    with GGUFFile(path) as f:
        validate(f)
        assert routed_label(summary(f).routed_types["blk.2."]) == "mixed"


def _vocab_case(tmp_path, edit) -> str:
    vocab = model_metadata(TINY, "x")
    tokens, types = list(vocab["tokenizer.ggml.tokens"]), list(vocab["tokenizer.ggml.token_type"])
    edit(tokens, types)
    return _refused(tiny_model(tmp_path / "v.gguf", set_keys={
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": Value(types, V.ARRAY, V.INT32)}))


def test_tokenizer_rules(tmp_path):
    think = shape.THINK_OPEN

    def drop_think(tokens, types):
        tokens[tokens.index(think)] = "<thinking_not>"
    assert f"required special token {think!r} is missing" in _vocab_case(tmp_path, drop_think)

    def substring(tokens, types):
        tokens[-1], types[-1] = "<think", 4
    assert "added token '<think' (id 511) is a substring of added token '<think>'" in _vocab_case(tmp_path, substring)

    def normal_special(tokens, types):
        types[tokens.index(think)] = 1
    assert f"special token {think!r} (id" in _vocab_case(tmp_path, normal_special)

    def short_types(tokens, types):
        types.pop()
    assert "tokenizer.ggml.token_type: has 511 entries, expected 512" in _vocab_case(tmp_path, short_types)


def test_tokenizer_array_types(tmp_path):
    msg = _refused(tiny_model(tmp_path / "tt.gguf", drop_keys=["tokenizer.ggml.token_type"]))
    assert "tokenizer.ggml.token_type: expected an ARRAY of INT32, got missing" in msg
    msg = _refused(tiny_model(tmp_path / "m.gguf", set_keys={"tokenizer.ggml.merges": [1, 2]}))
    assert "tokenizer.ggml.merges: expected an ARRAY of STRING, got ARRAY of INT32" in msg
    msg = _refused(tiny_model(tmp_path / "n.gguf", set_keys={"deepseek4.vocab_size": 600},
                              set_tensors={"token_embd.weight": ((256, 600), T.F16),
                                           "output.weight": ((256, 600), T.Q8_0),
                                           "blk.0.ffn_gate_tid2eid.weight": ((2, 600), T.I32)}))
    assert "tokenizer.ggml.tokens: has 512 tokens, expected deepseek4.vocab_size=600" in msg


# ---- MTP --------------------------------------------------------------------------------
def _mtp_refused(path) -> str:
    with GGUFFile(path) as f, pytest.raises(GGUFError) as e:
        validate_mtp(f, TINY)
    return str(e.value)


def test_mtp_accepted_with_f32_widening(tmp_path):
    assert len(names.expected_mtp_tensors(shape.FLASH)) == 32
    path = _mtp(tmp_path / "mtp.gguf", retype={"mtp.0.hc_attn_fn.weight": T.F32, "mtp.0.ffn_gate_inp.weight": T.F32})
    with GGUFFile(path) as f:
        validate_mtp(f, TINY)


def test_mtp_refusals(tmp_path):
    assert "expected general.architecture=deepseek4_mtp_support, got 'deepseek4'" in _mtp_refused(
        _mtp(tmp_path / "a.gguf", arch=shape.ARCH))
    assert "deepseek4.expert_count: expected 8 (the main model's), got 256" in _mtp_refused(
        _mtp(tmp_path / "b.gguf", expert_count=256))
    assert "required tensor is missing: mtp.0.exp_probs_b.bias" in _mtp_refused(
        _mtp(tmp_path / "c.gguf", drop=["mtp.0.exp_probs_b.bias"]))
    assert "tensor mtp.0.attn_norm.weight: has type F16, expected type F32" in _mtp_refused(
        _mtp(tmp_path / "d.gguf", retype={"mtp.0.attn_norm.weight": T.F16}))
