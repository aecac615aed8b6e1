"""The PDL contract of kernels/pdl.py, checked on the source (no GPU needed).

PDL lets a kernel start before the one ahead of it in the stream has finished, so a kernel
launched with it must not touch memory before `wait_for_inputs(PDL)`: here every Triton kernel
with a PDL parameter has that call as its first statement (or, listed in EARLY_WEIGHTS, reads
only its weights before the wait), and every launch of it passes
`**pdl.launch(grid)` with its own grid (so PDL and launch_pdl always agree). The decode kernels must all take part;
the prefill-only ones are listed. That the PDL=True forms compile for sm_90 is
test_compile_sm90.py's job; what PDL saves is bench/pdl_bench.py's and decode_variants.py's.
"""

import ast
import pathlib

from dwarfstar.kernels import pdl

KERNELS = pathlib.Path(pdl.__file__).parent
PREFILL_ONLY = {"_dequant_kernel", "_gemm_q8_kernel", "_prefill_sparse_kernel"}
# Kernels that read weights before the wait (weights are written once, at load, never by a kernel
# ahead in the stream): (the wait they start with, the wait that ends the early reads, the helper
# calls allowed between them, the pointers those may read).
EARLY_WEIGHTS = {
    "_q8_i8_kernel": ("PDL & HAS_IDS", "PDL & (not HAS_IDS)", {"tl.program_id", "slot_rows", "_q8_tile"},
                      {"qs_ptr", "d_ptr"}),
    # hc_post with the next HC mix: the mix weight's tile (fn, never written) before the wait.
    "_hc_post_kernel": ("PDL & (not MIX)", "PDL & MIX", {"_mix_fn_tile"}, {"fn_ptr"}),
}
# The weight-tile loaders an EARLY_WEIGHTS kernel may call before its wait.
TILE_LOADS = {"_q8_tile", "_mix_fn_tile"}


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


def _check_early_weights(fn: ast.FunctionDef, first: str, last: str, calls: set, weights: set) -> None:
    """fn waits first when `first` holds; otherwise, until its wait on `last`, it only calls
    `calls`, and the tile loads among them (TILE_LOADS) read only `weights`. slot_rows reads ids
    only with HAS_IDS, which is `first`'s case."""
    assert ast.unparse(_first_statement(fn)) == f"wait_for_inputs({first})", fn.name
    body = [ast.unparse(st) for st in fn.body]
    end = body.index(f"wait_for_inputs({last})")
    for st in fn.body[body.index(f"wait_for_inputs({first})") + 1:end]:
        for call in (n for n in ast.walk(st) if isinstance(n, ast.Call)):
            name = ast.unparse(call.func)
            assert name in calls, f"{fn.name}: {name} before the wait"
            read = {n.id for a in call.args for n in ast.walk(a) if isinstance(n, ast.Name) and n.id.endswith("_ptr")}
            assert name not in TILE_LOADS or read <= weights, f"{fn.name} reads {read - weights} before the wait"


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
            if fn.name in EARLY_WEIGHTS:
                _check_early_weights(fn, *EARLY_WEIGHTS[fn.name])
            else:
                assert ast.unparse(_first_statement(fn)) == "wait_for_inputs(PDL)", \
                    f"{path.name}:{fn.name}: wait_for_inputs(PDL) must come before any memory access"
            launches = list(_launches(tree, fn.name))
            assert launches, f"{fn.name}: no launch site in {path.name}"
            for call in launches:
                spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
                grid = ast.unparse(call.func.slice)
                assert spread == [f"pdl.launch({grid})"], \
                    f"{fn.name} launched without **pdl.launch({grid}) ({path.name})"
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
