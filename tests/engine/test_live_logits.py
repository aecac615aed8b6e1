"""generate.live_logits: the generation loop picks from the session's own logits tensor when
the session exposes one (the CUDA session's GPU row), and from `logits()` otherwise."""

import torch

from dwarfstar.engine.sampling import SamplingParams, sample
from dwarfstar.generate import Picker, generate, live_logits


class _Session:
    """Scripted logits per step; `device` = whether it offers device_logits (then logits() fails,
    so a copy to the host would be caught)."""

    def __init__(self, rows, device):
        self.rows, self.step, self.evaluated = rows, 0, []
        if device:
            self.device_logits = lambda: self.rows[self.step]

    def logits(self):
        if hasattr(self, "device_logits"):
            raise AssertionError("host copy requested although device logits exist")
        return self.rows[self.step].clone()

    def eval(self, token):
        self.evaluated.append(token)
        self.step += 1


def _rows(n, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=g) for _ in range(n)]


def test_generate_reads_device_logits_and_matches_the_host_path():
    rows = _rows(6)
    on_device = _Session(rows, device=True)
    on_host = _Session(rows, device=False)
    assert live_logits(on_device) is rows[0]
    got = list(generate(on_device, Picker(SamplingParams(temperature=0.0)), 6, eos_id=-1))
    want = list(generate(on_host, Picker(SamplingParams(temperature=0.0)), 6, eos_id=-1))
    assert got == want == [int(r.argmax()) for r in rows]


def test_seeded_sampling_same_tokens_from_either_accessor():
    rows = _rows(8, seed=1)
    params = SamplingParams(temperature=0.9, top_p=0.8, min_p=0.02, seed=11)
    a = list(generate(_Session(rows, True), Picker(params), 8, eos_id=-1))
    b = list(generate(_Session(rows, False), Picker(params), 8, eos_id=-1))
    assert a == b and len(a) == 8
