"""The decode kernels compile for sm_90 (H100/H200) on this machine, without a GPU.

The interpreter tests check what the kernels compute; this checks that Triton's compiler and
its bundled ptxas accept them (tests/kernels/sm90_compile.py): the int8-path and HC kernels at
their Flash settings, and every specialisation a tiny decode step and prefill launch under the
interpreter (record_launches.py), with the fp32-mat-vec and the production ops, PDL-aware
kernels also in their PDL form. So a compile-only error surfaces in CI
rather than on the device. Subprocesses: recording needs TRITON_INTERPRET=1, compiling needs it
unset (the kernel tests' conftest sets it in this process)."""

import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
HERE = pathlib.Path(__file__).parent


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build has no bundled ptxas")
def test_decode_kernels_compile_for_sm90(tmp_path):
    root = HERE.parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the GPU default (Triton 3.9 warns when unset)
    specs = tmp_path / "launches.json"
    r = subprocess.run([sys.executable, str(HERE / "record_launches.py"), str(specs)], env=env | {"TRITON_INTERPRET": "1"},
                       cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, str(HERE / "sm90_compile.py"), str(specs)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") >= 15 + 40, r.stdout
