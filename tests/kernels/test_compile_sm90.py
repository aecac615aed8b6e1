"""The decode kernels compile for sm_90 (H100/H200) on this machine, without a GPU.

The interpreter tests check what the kernels compute; this checks that Triton's compiler and
its bundled ptxas accept them at the settings in use (tests/kernels/sm90_compile.py lists them:
the kernels changed for the int8-activation path and their production settings), so a
compile-only error surfaces in CI rather than on the device. Run in a subprocess because the
kernel tests' conftest turns on TRITON_INTERPRET, under which nothing is compiled."""

import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build has no bundled ptxas")
def test_decode_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the GPU default (Triton 3.9 warns when unset)
    script = pathlib.Path(__file__).with_name("sm90_compile.py")
    root = pathlib.Path(__file__).parents[2]
    r = subprocess.run([sys.executable, str(script)], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") >= 15, r.stdout
