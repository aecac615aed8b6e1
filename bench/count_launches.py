"""Kernel launches per decode step on a CPU: the production ops (PRODUCTION_OPS) under the Triton
interpreter, on a tiny synthetic model with the Flash schedule's layer kinds.

Counts Triton launches (one per `kernel[grid](...)`) and torch compute ops (a TorchDispatchMode:
each non-view aten op outside a Triton launch is one GPU launch on a CUDA device, roughly —
a few composite ops launch more than one kernel). Per layer = (step total - head/embed) /
layers is reported as the step total / layers. The GPU truth is
`bench/cuda_decode_bench.py --profile-ctx`.

  PYTHONPATH=. python3 bench/count_launches.py [--tokens 40] [--fp32] [--prefill 300]

Production's int8 quantiser needs Q8_0 input widths that are multiples of 256, so the tiny model's
q and out-b ranks are widened to 256/128. --fp32 counts TRITON_OPS (fp32 mat-vecs) instead.

With --prefill N it counts one prefill chunk of N tokens (`ForwardModel.prefill`) instead of
the decode step; "copy_" there is mostly device-to-device copies.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

_VIEWS = {"view", "_unsafe_view", "expand", "reshape", "select", "slice", "transpose", "t", "permute",
          "unsqueeze", "squeeze", "as_strided", "alias", "detach", "empty", "empty_like", "lift_fresh",
          "_to_copy_noop", "split", "unbind", "view_as"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_triton and name not in _VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    from triton.runtime import interpreter

    from dwarfstar.engine.cuda_engine import CudaEngine
    from dwarfstar.engine.engine import EngineOptions
    from dwarfstar.gguf.synth import TINY, synthesize
    from dwarfstar.model.forward import PRODUCTION_OPS, TRITON_OPS

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=40, help="prompt length before the counted step")
    p.add_argument("--fp32", action="store_true", help="TRITON_OPS (else PRODUCTION_OPS)")
    p.add_argument("--prefill", type=int, default=0, help="count one prefill chunk of this many tokens")
    args = p.parse_args()
    config = dataclasses.replace(TINY, compress_ratios=(0, 4, 128, 4), n_hash_layers=1, index_topk=4)
    if not args.fp32:
        config = dataclasses.replace(config, q_lora_rank=256, o_lora_rank=128)
    with tempfile.TemporaryDirectory() as d:
        path = synthesize(Path(d) / "tiny.gguf", config=config)
        engine = CudaEngine.load(path, EngineOptions(backend="cuda", ctx=256, numerics="official"),
                                  ops=TRITON_OPS if args.fp32 else PRODUCTION_OPS)
        s = engine.new_session()
        s.sync(list(range(1, args.tokens + 1)))
        mode = Count()
        triton_calls = Counter()
        run = interpreter.InterpretedFunction.run

        def counted(self, *a, **k):
            triton_calls[self.fn.__name__] += 1
            mode.in_triton += 1
            try:
                return run(self, *a, **k)
            finally:
                mode.in_triton -= 1
        interpreter.InterpretedFunction.run = counted
        try:
            with torch.no_grad(), mode:
                if args.prefill:
                    engine.model.prefill(s.state, [1 + i % 50 for i in range(args.prefill)])
                else:
                    engine.model.step(s.state)
        finally:
            interpreter.InterpretedFunction.run = run
    n_layers = config.n_layers
    total_t, total_a = sum(triton_calls.values()), sum(mode.ops.values())
    what = f"one prefill chunk of {args.prefill} tokens" if args.prefill else "one decode step"
    print(f"{what}, {n_layers} layers (ratios {config.compress_ratios}): "
          f"{total_t} Triton + {total_a} torch = {total_t + total_a} launches, "
          f"{(total_t + total_a) / n_layers:.0f} per layer")
    for name, n in (triton_calls + mode.ops).most_common(40):
        print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
