"""Programmatic dependent launch (PDL) for the decode kernels: the next kernel in a stream is
launched while the current one finishes, and waits on the device instead of in the launch queue.

Contract: a kernel with a `PDL: tl.constexpr` parameter calls `wait_for_inputs(PDL)` as its
first statement (before any load or store; tests/kernels/test_pdl.py checks this), so it
reads and writes nothing until the kernel before it in the stream has completed and its
writes are visible (griddepcontrol.wait), and then lets its own successor launch. Its launcher
passes `**launch(grid)`: {"PDL": True, "launch_pdl": True} when ENABLED on a GPU that has PDL
(sm_90 and later, not under the interpreter) and the grid has at most MAX_PROGRAMS programs,
else {"PDL": False} (the kernel is unchanged).
Because every PDL kernel waits first, a chain of them keeps stream order: each one completes
only after its predecessor did. Kernels without the parameter (torch's, the NVRTC expert
kernel) launch as before.

Why: on the H200 a kernel boundary inside a CUDA graph costs ~1.2 µs with plain launches and
~0.75 µs with PDL (bench/pdl_bench.py), and a decode step has ~1,400 launches. But a
1,056-program kernel that waited before loading anything got slower with PDL (2.5 -> 3.0 µs):
its early-resident programs only wait. Hence MAX_PROGRAMS; in the whole decode step every grid
gained alike (bench/decode_variants.py on the H200: 7.70 ms per 2K step plain, 7.18 with PDL on
every grid, 7.21 at most 264 programs), so production has no cap.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = True
MAX_PROGRAMS: int | None = None     # None: every grid


# Whether this process launches on a GPU with PDL; asked on the first launch with ENABLED (not
# at import: the device query would initialise CUDA in every process that imports the kernels).
_CAPABLE: bool | None = None


def _capable() -> bool:
    global _CAPABLE
    if _CAPABLE is None:
        _CAPABLE = (os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.cuda.is_available()
                    and torch.cuda.get_device_capability() >= (9, 0))
    return _CAPABLE


def launch(grid: tuple) -> dict:
    """Keyword arguments for a PDL-aware kernel's launch on `grid` (module contract)."""
    on = ENABLED and _capable() and (MAX_PROGRAMS is None or math.prod(grid) <= MAX_PROGRAMS)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
