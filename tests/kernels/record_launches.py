"""Record every Triton launch of a decode step (and a short prefill) under the interpreter.

Runs a tiny synthetic model (widths that let the int8 candidate run too) through a prefill chunk and
a decode step with the fp32-mat-vec ops (TRITON_OPS) and with production (TRITON_INT8_OPS),
hooking the interpreter's launch
to note, per kernel, its argument types and constexpr values (the specialisation a GPU would
compile). Writes them as JSON to argv[1] for sm90_compile.py. Run with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run under the interpreter (it records, it does not compile)"

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from dwarfstar.engine.cuda_engine import CudaEngine  # noqa: E402
from dwarfstar.engine.engine import EngineOptions  # noqa: E402
from dwarfstar.gguf.synth import TINY, synthesize  # noqa: E402
from dwarfstar.model.forward import TRITON_INT8_OPS, TRITON_OPS  # noqa: E402

POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int8: "*i8",
           torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1"}


def _type(v):
    if isinstance(v, torch.Tensor):
        return POINTER[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no kernel argument type for {type(v).__name__}")


def main() -> None:
    specs: dict[str, dict] = {}
    run = interpreter.InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in params}
        constexprs, types = {}, {}
        for name in names:
            if "constexpr" in str(params[name].annotation):
                constexprs[name] = values[name]
            else:
                types[name] = _type(values[name])
        spec = {"module": self.fn.__module__, "name": self.fn.__name__, "types": types, "constexprs": constexprs,
                "num_warps": kwargs.get("num_warps", 4)}
        specs[json.dumps(spec, sort_keys=True)] = spec
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = record
    config = dataclasses.replace(TINY, window_size=8, index_topk=4, compress_ratios=(0, 4, 128, 4), n_hash_layers=1,
                                 q_lora_rank=256, o_lora_rank=128)
    with tempfile.TemporaryDirectory() as d:
        path = synthesize(Path(d) / "tiny.gguf", config=config)
        # The fp32 mat-vecs, then production (int8 products, hc_post's Gram partials): the
        # kernel specialisations of both.
        for ops in (TRITON_OPS, TRITON_INT8_OPS):
            s = CudaEngine.load(path, EngineOptions(backend="cuda", ctx=64), ops=ops).new_session()
            s.sync(list(range(1, 11)))          # a chunk (> 8 tokens: the GEMM path)
            s.eval(5)
    Path(sys.argv[1]).write_text(json.dumps(list(specs.values())))
    print(f"{len(specs)} kernel specialisations recorded")


if __name__ == "__main__":
    main()
