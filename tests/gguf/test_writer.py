"""GGUF writer: byte-exact round trip against gguf-py's GGUFReader (an independent parser)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFValueType as V
from gguf.quants import quantize

from dwarfstar.gguf.writer import TensorSource, Value, tensor_bytes, write_gguf

META = {
    "general.architecture": "deepseek4",
    "general.name": "",
    "a.u32": 7,
    "a.f32": 0.25,
    "a.bool": True,
    "a.i32_array": [0, 0, 4, 128],
    "a.f32_array": [10.0, 10.0],
    "a.str_array": ["Ġ t", "h e", ""],
    "a.empty_u32_array": Value([], V.ARRAY, V.UINT32),
    "a.u32_array": Value([1, 2, 3], V.ARRAY, V.UINT32),
    "a.u64": Value(2**40, V.UINT64),
    "a.i32": Value(-5, V.INT32),
}
# key -> (value type, element type) the reader must see.
EXPECTED_TYPES = {
    "general.architecture": (V.STRING, None), "general.name": (V.STRING, None),
    "a.u32": (V.UINT32, None), "a.f32": (V.FLOAT32, None), "a.bool": (V.BOOL, None),
    "a.i32_array": (V.ARRAY, V.INT32), "a.f32_array": (V.ARRAY, V.FLOAT32),
    "a.str_array": (V.ARRAY, V.STRING), "a.empty_u32_array": (V.ARRAY, V.UINT32),
    "a.u32_array": (V.ARRAY, V.UINT32), "a.u64": (V.UINT64, None), "a.i32": (V.INT32, None),
}


def _tensors(rng):
    q8 = quantize(rng.standard_normal((3, 64)).astype(np.float32), T.Q8_0)
    q4k = rng.integers(0, 256, size=2 * 144, dtype=np.uint8)
    big = rng.standard_normal((5, 96)).astype(np.float16)
    return [
        TensorSource("f32.weight", (3,), T.F32, np.array([1.0, -2.0, 3.5], dtype=np.float32)),
        TensorSource("f16.weight", (96, 5), T.F16, lambda: (big[:2], big[2:].tobytes())),
        TensorSource("q8.weight", (64, 3), T.Q8_0, q8),
        ("q4k.weight", (256, 2), T.Q4_K, q4k.tobytes()),
        TensorSource("i32.weight", (2, 3), T.I32, np.arange(6, dtype=np.int32).reshape(3, 2)),
    ]


def test_round_trip_metadata_and_bytes(tmp_path):
    rng = np.random.default_rng(1)
    tensors = _tensors(rng)
    path = write_gguf(tmp_path / "t.gguf", META, tensors)
    r = GGUFReader(path)
    # Exactly our keys: nothing auto-added (no second architecture, no general.alignment).
    assert [f.name for f in r.fields.values() if not f.name.startswith("GGUF.")] == list(META)
    for key, (vtype, sub) in EXPECTED_TYPES.items():
        field = r.fields[key]
        assert field.types[0] == vtype, key
        if sub is not None:
            # parts = key length, key, value type, element type, count, ...; read raw so the
            # empty array (for which GGUFReader lists no element type) is checked too.
            assert int(field.parts[3][0]) == sub, key
    assert r.fields["general.name"].contents() == ""
    assert r.fields["a.i32_array"].contents() == [0, 0, 4, 128]
    assert r.fields["a.str_array"].contents() == ["Ġ t", "h e", ""]
    assert r.fields["a.empty_u32_array"].contents() == []
    assert r.fields["a.u64"].contents() == 2**40
    assert r.fields["a.i32"].contents() == -5
    assert r.fields["a.f32"].contents() == 0.25
    by_name = {t.name: t for t in r.tensors}
    assert list(by_name) == [t.name if isinstance(t, TensorSource) else t[0] for t in tensors]
    for src in tensors:
        src = src if isinstance(src, TensorSource) else TensorSource(*src)
        rt = by_name[src.name]
        assert tuple(int(n) for n in rt.shape) == src.ne
        assert rt.tensor_type == src.ggml_type
        assert rt.data_offset % 32 == 0
        want = b"".join(bytes(np.ascontiguousarray(c).view(np.uint8).reshape(-1)) if isinstance(c, np.ndarray)
                        else bytes(c) for c in (src.data() if callable(src.data) else (src.data,)))
        assert np.asarray(rt.data).view(np.uint8).tobytes() == want
    # Each tensor is padded to 32, the last one too.
    last = r.tensors[-1]
    assert path.stat().st_size == last.data_offset + 32


def test_wrong_byte_count_leaves_no_file(tmp_path):
    bad = [TensorSource("x", (4,), T.F32, np.zeros(3, dtype=np.float32))]
    with pytest.raises(ValueError, match="expected 16"):
        write_gguf(tmp_path / "bad.gguf", {"general.architecture": "deepseek4"}, bad)
    assert list(tmp_path.iterdir()) == []


def test_type_errors():
    with pytest.raises(ValueError, match="block"):
        tensor_bytes(T.Q8_0, (33, 2))
    assert tensor_bytes(T.IQ2_XXS, (256, 3)) == 3 * 66
    assert tensor_bytes(T.Q2_K, (512, 2)) == 4 * 84
    with pytest.raises(ValueError, match="explicit element type"):
        write_gguf("unused.gguf", {"k": []}, [])
    with pytest.raises(ValueError, match="UINT32"):
        write_gguf("unused.gguf", {"k": -1}, [])
