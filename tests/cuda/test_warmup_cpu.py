"""The CUDA engine's load-time warm-up (engine/cuda_engine.py `warm_up`, `warmup_chunks`) on a CPU.

The chunk plan is a pure function of the config, checked on Flash and a tiny schedule. On a
CPU the warm-up is a no-op (nothing to load there); forced, it runs on a tiny model and must
leave later sessions bit-identical to an engine that never warmed up.
"""

import dataclasses

import pytest
import torch

from dwarfstar.engine.cuda_engine import PREFILL_CHUNK, TRITON_DIVISIBILITY, CudaEngine, warmup_chunks
from dwarfstar.engine.engine import Engine, EngineOptions
from dwarfstar.gguf.synth import TINY, synthesize
from dwarfstar.kernels.matvec import MAX_COLS
from dwarfstar.model.forward import TWIN_FUSED_OPS, TWIN_OPS, ForwardModel
from dwarfstar.shape import FLASH, OVERLAP_RATIO

# As test_forward_cpu.py: a ratio-4 layer whose indexer selects 4 rows once 20 tokens are held.
CONFIG = dataclasses.replace(TINY, window_size=8, index_topk=4, compress_ratios=(0, 4, 8, 4), n_hash_layers=1)
# The tiny warm-up: [9, 16] (a dense-path chunk of the other Triton kind, then one chunk of 16
# that ends past the indexer's threshold).
CHUNK = 16
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU engine runs (a GPU engine warms up for real)")


def _kind(n: int) -> bool:
    return n % TRITON_DIVISIBILITY == 0


@pytest.mark.parametrize("config", [FLASH, CONFIG], ids=["flash", "tiny"])
@pytest.mark.parametrize("chunk", [PREFILL_CHUNK, 2048, 1000, 512, 16, 9])
def test_warmup_chunks_take_both_attention_paths_at_the_production_length(config, chunk):
    lengths = warmup_chunks(config, chunk)
    rows_after = [sum(lengths[:i + 1]) // OVERLAP_RATIO for i in range(len(lengths))]
    assert len(lengths) >= 2
    # First chunk: a GEMM-path chunk of the other Triton kind, every compressed row attended.
    assert MAX_COLS < lengths[0] and _kind(lengths[0]) != _kind(chunk)
    assert rows_after[0] <= config.index_topk
    # Then the production length, the last chunk only ending past the top-k threshold.
    assert all(n == chunk for n in lengths[1:])
    assert rows_after[-1] > config.index_topk and rows_after[-2] <= config.index_topk


def test_flash_warmup_is_one_production_chunk():
    assert warmup_chunks(FLASH, PREFILL_CHUNK) == [MAX_COLS + 1, PREFILL_CHUNK]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("warmup") / "tiny.gguf", config=CONFIG)


@cpu_only
def test_warm_up_is_a_no_op_on_cpu(model_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the warm-up ran on a CPU engine")

    monkeypatch.setattr(ForwardModel, "prefill", refuse)
    monkeypatch.setattr(ForwardModel, "step", refuse)
    engine = Engine.load(model_path, EngineOptions(backend="cuda", ctx=64))     # warmup on by default
    assert engine.options.warmup and engine.model.device.type == "cpu"
    assert engine.warm_up() is False


def _run(engine, tokens, n_prompt):
    """Logits after a chunked prompt (a dense-path chunk, then a top-k one) and after each decode step."""
    s = engine.new_session()
    s.sync(tokens[:n_prompt])
    out = [s.logits()]
    for t in tokens[n_prompt:]:
        s.eval(t)
        out.append(s.logits())
    return out


@cpu_only
@pytest.mark.parametrize("ops", [TWIN_OPS, pytest.param(TWIN_FUSED_OPS, marks=pytest.mark.slow)],
                         ids=["twins", "glue_fused_interpreter"])
def test_forced_warm_up_leaves_later_sessions_bit_identical(model_path, ops):
    """TWIN_FUSED_OPS runs the glue and fused decode kernels under the interpreter (~25 s; the
    mat-vecs on twins: the Triton ones take minutes there), with the RoPE tables that the
    warm-up may grow."""
    options = EngineOptions(backend="cuda", ctx=64, prefill_chunk=CHUNK)
    plain = CudaEngine.load(model_path, options, ops=ops)
    warmed = CudaEngine.load(model_path, options, ops=ops)
    calls = []
    prefill = warmed.model.prefill
    warmed.model.prefill = lambda state, tokens: (calls.append(len(tokens)), prefill(state, tokens))
    assert warmed.warm_up(force=True)
    del warmed.model.prefill
    assert calls == warmup_chunks(CONFIG, CHUNK) == [9, CHUNK]
    assert warmed.model._last_merged is None and warmed.model._hc_partials is None and not warmed.model._quantized
    # 16 + 5 prompt tokens: chunks ending with 4 compressed rows (all attended), then 5 (top-k).
    tokens = torch.randint(0, CONFIG.vocab_size, (23,), generator=torch.Generator().manual_seed(5)).tolist()
    for a, b in zip(_run(plain, tokens, 21), _run(warmed, tokens, 21)):
        assert torch.equal(a, b)


def test_rope_tables_do_not_depend_on_their_length():
    """The warm-up may grow the forward's RoPE tables (reserve_positions): a longer table must
    hold the same rows."""
    from dwarfstar.kernels.glue import rope_table
    from dwarfstar.model.rope import rope_frequencies

    for ratio in (0, 4):
        omega = rope_frequencies(FLASH, ratio)
        short, long = rope_table(omega, 4096), rope_table(omega, 3 * 4096 + 5)
        assert torch.equal(short[0], long[0][:4096]) and torch.equal(short[1], long[1][:4096])
