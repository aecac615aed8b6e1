"""`ds4-gguf` end to end: info report, exit codes, one-line errors, synth delegation.

Run in-process through `main([...])` (capsys) and once as a subprocess, which proves the
console path prints no traceback. Exit codes per cli.md §5.1: 0 would load, 1 refused or
unreadable, 2 usage error.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from dwarfstar.gguf.tool import main
from dwarfstar.gguf.writer import Value

from gguf_helpers import mtp_model, patch, tensor_info_offset, tiny_model

REPO = Path(__file__).resolve().parents[2]


def _info(capsys, *args) -> tuple[int, str, str]:
    rc = main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_reports_a_valid_file(capsys, tiny_path):
    rc, out, err = _info(capsys, tiny_path)
    assert rc == 0 and err == ""
    assert "GGUF v3, alignment 32, " in out and " keys, 116 tensors" in out
    assert "deepseek4.block_count" in out and "UINT32" in out
    # Long arrays are shortened: type, length and the first items only.
    assert "STRING[512]" in out and "(512 items)" in out and "<dummy_200>" not in out
    assert "blk.3.ffn_down_exps.weight" in out and "[256, 256, 8]" in out and "Q2_K" in out
    assert "totals by type:" in out and "total " in out
    assert "validation: accepted" in out and "synthetic: yes" in out
    assert "flash_profile: fail: expected deepseek4.block_count=43" in out
    assert "blk.2    IQ2_XXS/IQ2_XXS/Q2_K" in out


def _cut(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _corrupt(tmp_path: Path, case: str) -> Path:
    """A tiny model with one defect; container defects are patched into the written bytes."""
    path = tmp_path / f"{case}.gguf"
    if case == "not_gguf":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
        return path
    model_kwargs = {
        "wrong_shape": dict(set_tensors={"blk.3.attn_kv.weight": ((256, 64), T.Q8_0)}),
        "wrong_type": dict(set_tensors={"output_norm.weight": ((256,), T.F16)}),
        "missing_tensor": dict(drop_tensors=["blk.1.ffn_norm.weight"]),
        "missing_key": dict(drop_keys=["deepseek4.hash_layer_count"]),
        "wrong_key_type": dict(set_keys={"deepseek4.expert_weights_norm": Value(1, V.UINT8)}),
    }
    tiny_model(path, **model_kwargs.get(case, {}))
    size = path.stat().st_size
    if case == "wrong_version":
        patch(path, 4, struct.pack("<I", 4))
    elif case == "truncated_header":
        _cut(path, 2000)
    elif case == "truncated_data":
        _cut(path, size - 5000)
    elif case == "data_past_eof":
        patch(path, tensor_info_offset(path, "output_norm.weight") + 4 + 8 + 4, struct.pack("<Q", size))
    elif case == "unknown_quant_type":
        patch(path, tensor_info_offset(path, "output_norm.weight") + 4 + 8, struct.pack("<I", 200))
    return path


CORRUPT = {
    "not_gguf": "not a GGUF file",
    "wrong_version": "GGUF version 4 is not supported",
    "truncated_header": "truncated GGUF file at byte",
    "truncated_data": "past end of file",
    "data_past_eof": "tensor 'output_norm.weight': data",
    "unknown_quant_type": "tensor 'output_norm.weight': unknown quant type 200",
    "wrong_shape": "tensor blk.3.attn_kv.weight: has dim[1]=64, expected 128",
    "wrong_type": "tensor output_norm.weight: has type F16, expected type F32",
    "missing_tensor": "required tensor is missing: blk.1.ffn_norm.weight",
    "missing_key": "required metadata key is missing: deepseek4.hash_layer_count",
    "wrong_key_type": "metadata deepseek4.expert_weights_norm: type UINT8 not accepted, expected BOOL",
}


@pytest.mark.parametrize("case", CORRUPT)
def test_info_refuses_with_one_line(capsys, tmp_path, case):
    rc, out, err = _info(capsys, _corrupt(tmp_path, case))
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ds4-gguf: ") and CORRUPT[case] in lines[0], err
    assert "Traceback" not in out + err


def test_refused_file_still_gets_a_report(capsys, tmp_path):
    rc, out, _ = _info(capsys, _corrupt(tmp_path, "wrong_type"))
    assert rc == 1 and "totals by type:" in out and "validation: refused: tensor output_norm.weight" in out


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for case in ("truncated_header", "missing_tensor"):
        proc = subprocess.run([sys.executable, "-m", "dwarfstar.gguf.tool", "info", str(_corrupt(tmp_path, case))],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1 and CORRUPT[case] in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("argv,code", [([], 2), (["info"], 2), (["info", "x.gguf", "--bogus"], 2),
                                       (["frob"], 2), (["--help"], 0), (["synth", "--preset", "huge", "o"], 2),
                                       (["synth", "--preset", "tiny", "--layers", "0", "o"], 2)])
def test_usage(capsys, argv, code):
    assert main(argv) == code
    out, err = capsys.readouterr()
    assert "usage: ds4-gguf" in (out if code == 0 else err)
    if argv[-1:] == ["--bogus"]:
        assert "ds4-gguf: unknown option: --bogus" in err


def test_synth_then_info(capsys, tmp_path):
    out_path = tmp_path / "synth.gguf"
    assert main(["synth", "--preset", "tiny", "--experts", "q4", "--seed", "7", str(out_path)]) == 0
    rc, out, _ = _info(capsys, out_path)
    assert rc == 0 and "validation: accepted" in out and "Q4_K/Q4_K/Q4_K           q4" in out


def test_info_on_mtp_file(capsys, tmp_path, tiny_path):
    mtp = mtp_model(tmp_path / "mtp.gguf")
    rc, out, _ = _info(capsys, mtp, "--main", tiny_path)
    assert rc == 0 and "validation: accepted (MTP file, checked against the main model" in out
    # Without --main the tiny MTP file is measured against Flash and refused.
    rc, out, err = _info(capsys, mtp)
    assert rc == 1 and "validation: refused: metadata deepseek4.expert_count: expected 256" in out


def test_info_on_full_size_flash_layout(capsys, tmp_path):
    # Header of a q4 Flash file over a sparse hole; spec totals (gguf.md §3.4) as the oracle.
    from dwarfstar import shape
    from dwarfstar.gguf import names
    from dwarfstar.text.vocab import real_vocab_metadata
    from gguf_helpers import model_metadata, sparse_model, table

    metadata = model_metadata(shape.FLASH, "DeepSeek V4 Flash", real_vocab_metadata())
    path = sparse_model(tmp_path / "flash-q4.gguf", metadata, table(names.expected_tensors(shape.FLASH), "q4"))
    rc, out, err = _info(capsys, path)
    assert rc == 0 and err == ""
    assert "validation: accepted" in out and "synthetic: no" in out and "flash_profile: pass" in out
    assert "Q4_K        129 tensors    155,826,782,208 bytes" in out
    assert "  total      1328 tensors" in out
    assert out.count("Q4_K/Q4_K/Q4_K           q4") == 43
    assert "STRING[129280]" in out and "(129280 items)" in out
