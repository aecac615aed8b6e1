"""GGUFFile against files written by gguf-py's GGUFWriter (independent writer), and corrupt files.

Round trips are exact: metadata values compare with ==, floats are compared after the
same float32/float64 rounding the writer applied, tensor bytes byte for byte.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFValueType as V
from hypothesis import HealthCheck, given, settings, strategies as st

from dwarfstar.gguf.reader import GGUFError, GGUFFile

from gguf_helpers import patch, random_blocks, tensor_info_offset

# key -> (value, GGUF type, array element type): every value type, arrays of each, nesting.
METADATA = {
    "t.u8": (200, V.UINT8, None), "t.i8": (-100, V.INT8, None),
    "t.u16": (60000, V.UINT16, None), "t.i16": (-30000, V.INT16, None),
    "t.u32": (4_000_000_000, V.UINT32, None), "t.i32": (-2_000_000_000, V.INT32, None),
    "t.f32": (1.5, V.FLOAT32, None), "t.bool": (True, V.BOOL, None),
    "t.str": ("DeepSeek ｜ V4 ▁ \u00e9", V.STRING, None),
    "t.u64": (2**63 + 5, V.UINT64, None), "t.i64": (-(2**62), V.INT64, None),
    "t.f64": (0.1, V.FLOAT64, None),
    "a.u8": ([0, 255, 7], V.ARRAY, V.UINT8), "a.i16": ([-1, 2], V.ARRAY, V.INT16),
    "a.u32": ([0, 4, 128], V.ARRAY, V.UINT32), "a.i32": ([-5, 7], V.ARRAY, V.INT32),
    "a.f32": ([10.0, 0.5], V.ARRAY, V.FLOAT32), "a.f64": ([0.1, -2.0], V.ARRAY, V.FLOAT64),
    "a.bool": ([True, False, True], V.ARRAY, V.BOOL), "a.u64": ([1, 2**64 - 1], V.ARRAY, V.UINT64),
    "a.str": (["Ġt", "", "<｜User｜>", "a b"], V.ARRAY, V.STRING),
    "a.nested": ([[1, 2], [3, 4, 5]], V.ARRAY, V.ARRAY),
}


def _write(path, metadata=METADATA, tensors=(), alignment=None):
    w = gguf.GGUFWriter(str(path), "deepseek4")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype, sub) in metadata.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, array, raw_dtype in tensors:
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensors(rng):
    """(name, array, raw_dtype) with odd byte sizes so padding matters; quantised as byte rows."""
    q4 = random_blocks(T.Q4_K, 6, rng).reshape(3, 2 * 144)
    return [
        ("f32.odd", rng.standard_normal(3).astype(np.float32), None),
        ("f16.mat", rng.standard_normal((5, 7)).astype(np.float16), None),
        ("i32.ids", rng.integers(0, 8, (9, 2)).astype(np.int32), None),
        ("q4k.experts", q4, T.Q4_K),
    ]


def _expected_value(value, vtype, sub):
    if vtype == V.FLOAT32 or sub == V.FLOAT32:
        return np.asarray(value, dtype=np.float32).tolist()
    return value


def test_round_trip_metadata_and_tensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = _tensors(rng)
    path = _write(tmp_path / "rt.gguf", tensors=tensors)
    with GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == 32
        assert f.metadata["general.architecture"] == "deepseek4"
        for key, (value, vtype, sub) in METADATA.items():
            assert f.metadata[key] == _expected_value(value, vtype, sub), key
            assert f.metadata_types[key] == (vtype, sub), key
        assert list(f.tensors) == [t[0] for t in tensors]
        for name, array, raw_dtype in tensors:
            info = f.tensors[name]
            want_bytes = array.tobytes()
            assert info.n_bytes == len(want_bytes)
            assert f.raw(name).tobytes() == want_bytes
            assert bytes(f.raw_torch(name).numpy()) == want_bytes
            assert (info.offset - f.data_start) % 32 == 0
        info = f.tensors["f16.mat"]
        assert info.ne == (7, 5) and info.shape == (5, 7) and info.ggml_type == T.F16
        assert f.tensors["q4k.experts"].ne == (512, 3) and f.tensors["q4k.experts"].ggml_type == T.Q4_K


def test_agrees_with_gguf_reader_on_tensor_directory(tmp_path):
    path = _write(tmp_path / "dir.gguf", tensors=_tensors(np.random.default_rng(1)))
    oracle = gguf.GGUFReader(str(path))
    with GGUFFile(path) as f:
        for t in oracle.tensors:
            info = f.tensors[t.name]
            assert info.ne == tuple(int(n) for n in t.shape)
            assert info.ggml_type == t.tensor_type
            assert info.offset == t.data_offset
            assert info.n_bytes == t.n_bytes
        assert len(f.tensors) == len(oracle.tensors)


def test_empty_values(tmp_path):
    # gguf-py cannot write empty arrays/strings (gguf.md §1.5); our writer can.
    from dwarfstar.gguf.writer import Value, write_gguf
    path = write_gguf(tmp_path / "e.gguf", {"e.arr": Value([], V.ARRAY, V.UINT32), "e.str": ""}, [])
    with GGUFFile(path) as f:
        assert f.metadata == {"e.arr": [], "e.str": ""}
        assert f.metadata_types["e.arr"] == (V.ARRAY, V.UINT32) and f.tensors == {}


def test_custom_alignment_is_honoured(tmp_path):
    path = _write(tmp_path / "a64.gguf", tensors=_tensors(np.random.default_rng(2)), alignment=64)
    with GGUFFile(path) as f:
        assert f.alignment == 64 and f.data_start % 64 == 0
        for info in f.tensors.values():
            assert info.offset % 64 == 0
        np.testing.assert_array_equal(f.raw("i32.ids").view(np.int32).reshape(9, 2),
                                      gguf.GGUFReader(str(path)).tensors[2].data)


def test_views_are_zero_copy_and_read_only(tmp_path):
    path = _write(tmp_path / "zc.gguf", tensors=_tensors(np.random.default_rng(3)))
    with GGUFFile(path) as f:
        view = f.raw("f16.mat")
        assert not view.flags.writeable and not view.flags.owndata
        assert f.raw_torch("f16.mat").data_ptr() == view.ctypes.data
        assert f.raw_torch("f16.mat").data_ptr() != f.raw("f16.mat").copy().ctypes.data
    # A view outlives close(): the mapping stays until the last view is gone.
    assert view.view(np.float16).shape == (35,)


def test_missing_tensor_and_closed_file(tmp_path):
    f = GGUFFile(_write(tmp_path / "m.gguf", tensors=_tensors(np.random.default_rng(4))))
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        f.raw("nope")
    f.close()
    with pytest.raises(GGUFError, match="closed"):
        f.raw("f32.odd")


# ---- corrupt files -----------------------------------------------------------------------
@pytest.fixture
def small(tmp_path):
    """A valid two-tensor file and its byte layout landmarks."""
    meta = {"k.a": (1, V.UINT32, None), "k.b": (2, V.UINT32, None)}
    rng = np.random.default_rng(5)
    tensors = [("ta", rng.standard_normal(8).astype(np.float32), None),
               ("tb", random_blocks(T.Q8_0, 2, rng).reshape(1, 68), T.Q8_0)]
    return _write(tmp_path / "small.gguf", metadata=meta, tensors=tensors)


def _error(path) -> str:
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    return str(e.value)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    assert "not a GGUF file" in _error(path)
    path.write_bytes(b"GGUF")
    assert "too small" in _error(path)


def test_missing_file_is_a_gguf_error(tmp_path):
    assert "cannot open" in _error(tmp_path / "absent.gguf")


def test_wrong_version(small):
    patch(small, 4, struct.pack("<I", 2))
    assert "version 2 is not supported" in _error(small)


def test_truncated_header_names_the_byte(small):
    blob = small.read_bytes()
    small.write_bytes(blob[:60])
    msg = _error(small)
    assert "truncated GGUF file at byte" in msg


def test_truncated_data(small):
    blob = small.read_bytes()
    small.write_bytes(blob[:-40])
    msg = _error(small)
    assert "'tb'" in msg and "past end of file" in msg


def test_tensor_offset_past_end(small):
    at = tensor_info_offset(small, "ta") + 4 + 8 + 4
    patch(small, at, struct.pack("<Q", 1 << 40))
    assert "'ta'" in _error(small) and "past end of file" in _error(small)


def test_unknown_quant_type(small):
    patch(small, tensor_info_offset(small, "tb") + 4 + 16, struct.pack("<I", 77))
    assert "'tb'" in _error(small) and "unknown quant type 77" in _error(small)


def test_misaligned_offset(small):
    at = tensor_info_offset(small, "tb") + 4 + 16 + 4
    (offset,) = struct.unpack_from("<Q", small.read_bytes(), at)
    patch(small, at, struct.pack("<Q", offset + 4))
    assert "bad alignment" in _error(small)


def test_bad_alignment_key(tmp_path):
    meta = {"general.alignment": (48, V.UINT32, None)}
    assert "bad alignment" in _error(_write(tmp_path / "al.gguf", metadata=meta))


def test_zero_dims(small):
    patch(small, tensor_info_offset(small, "ta"), struct.pack("<I", 0))
    assert "n_dims=0" in _error(small)


def test_unknown_value_type(small):
    blob = small.read_bytes()
    at = blob.index(b"k.b") + 3
    patch(small, at, struct.pack("<I", 99))
    assert "unknown metadata value type 99" in _error(small) and "'k.b'" in _error(small)


def test_duplicate_key_and_tensor(small):
    blob = small.read_bytes()
    patch(small, blob.index(b"k.b"), b"k.a")
    assert "duplicate metadata key 'k.a'" in _error(small)
    patch(small, blob.index(b"k.b"), b"k.b")
    at = tensor_info_offset(small, "tb") - 2
    patch(small, at, b"ta")
    assert "duplicate tensor 'ta'" in _error(small)


def test_ragged_quant_row(small):
    # ne[0] = 64 -> 40 is not a whole number of Q8_0 blocks.
    patch(small, tensor_info_offset(small, "tb") + 4, struct.pack("<Q", 40))
    assert "'tb'" in _error(small) and "multiple of the Q8_0 block size 32" in _error(small)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000), flips=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_damaged_files_fail_cleanly(small, cut, flips):
    """Any truncation before the last tensor's data ends, or any byte damage, gives GGUFError or a
    valid parse; never another exception."""
    with GGUFFile(small) as f:
        end_of_data = max(t.offset + t.n_bytes for t in f.tensors.values())
    blob = bytearray(small.read_bytes())
    for at, value in flips:
        blob[at % len(blob)] = value
    damaged = small.with_name("damaged.gguf")
    length = cut % (len(blob) + 1)
    damaged.write_bytes(bytes(blob[:length]))
    try:
        GGUFFile(damaged).close()
    except GGUFError:
        return
    assert flips or length >= end_of_data, f"a file cut at byte {length} was accepted"
