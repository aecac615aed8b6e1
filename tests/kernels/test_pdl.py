"""The PDL contract of kernels/pdl.py, checked on the source (no GPU needed).

PDL lets a kernel start before the one ahead of it in the stream has finished, so a kernel
launched with it must not touch memory before `wait_for_inputs(PDL)`: here every Triton kernel
with a PDL parameter has that call as its first statement, and every launch of it passes
`**pdl.launch(grid)` with its own grid (so PDL and launch_pdl always agree). The decode kernels must all take part;
the prefill-only ones are listed. That the PDL=True forms compile for sm_90 is
test_compile_sm90.py's job; what PDL saves is bench/pdl_bench.py's and decode_variants.py's.
"""

import ast
import pathlib

from dwarfstar.kernels import pdl

KERNELS = pathlib.Path(pdl.__file__).parent
PREFILL_ONLY = {"_dequant_kernel", "_gemm_q8_kernel", "_prefill_sparse_kernel"}


def _jit_kernels(tree):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                ast.unparse(d).endswith("jit") for d in node.decorator_list):
            yield node


def _first_statement(fn: ast.FunctionDef) -> ast.stmt:
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):     # docstring
        body = body[1:]
    return body[0]


def _launches(tree, name):
    """Calls `name[grid](...)` in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == name:
            yield node


def test_every_pdl_kernel_waits_first_and_launches_through_pdl():
    seen = set()
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in _jit_kernels(tree):
            params = [a.arg for a in fn.args.args]
            if fn.name in PREFILL_ONLY:
                assert "PDL" not in params, f"{fn.name}: listed as prefill-only but takes PDL"
                continue
            assert "PDL" in params, f"{path.name}:{fn.name} is not PDL-aware (or add it to PREFILL_ONLY)"
            assert ast.unparse(_first_statement(fn)) == "wait_for_inputs(PDL)", \
                f"{path.name}:{fn.name}: wait_for_inputs(PDL) must come before any memory access"
            launches = list(_launches(tree, fn.name))
            assert launches, f"{fn.name}: no launch site in {path.name}"
            for call in launches:
                spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
                grid = ast.unparse(call.func.slice)
                assert spread == [f"pdl.launch({grid})"], f"{fn.name} launched without **pdl.launch({grid}) ({path.name})"
                assert not {"PDL", "launch_pdl"} & {k.arg for k in call.keywords}
            seen.add(fn.name)
    assert len(seen) >= 21, seen


def test_launch_is_plain_without_pdl_hardware(monkeypatch):
    """No GPU, an older one, or the interpreter: PDL stays off even when ENABLED."""
    monkeypatch.setattr(pdl, "_CAPABLE", False)
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.launch((4, 2)) == {"PDL": False}
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert pdl.launch((4, 2)) == {"PDL": False}


def test_launch_on_a_capable_gpu(monkeypatch):
    monkeypatch.setattr(pdl, "_CAPABLE", True)
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.launch((4, 2)) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(pdl, "MAX_PROGRAMS", 8)
    assert pdl.launch((4, 2)) == {"PDL": True, "launch_pdl": True}
    assert pdl.launch((3, 3)) == {"PDL": False}           # 9 programs: over MAX_PROGRAMS
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert pdl.launch((4, 2)) == {"PDL": False}
