"""kernels/route.py (Triton; the CPU interpreter without a GPU) vs its torch twin."""

import pytest
import torch

from dwarfstar.kernels.route import route, route_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("e,k,is_hash,norm", [(256, 6, False, True), (8, 2, False, False), (16, 6, True, True)])
def test_route_matches_twin(e, k, is_hash, norm):
    g = torch.Generator(device=DEV).manual_seed(e + k)
    bias = None if is_hash else torch.randn(e, generator=g, device=DEV) * 0.1
    tid2eid = torch.stack([torch.randperm(e, generator=g, device=DEV)[:k] for _ in range(10)])
    for trial in range(4):
        # Logits across softplus's regimes: very negative (log1p branch), around 0, above 20.
        logits = torch.randn(1, e, generator=g, device=DEV) * (3, 10, 30, 1)[trial]
        if not is_hash and trial == 3:
            bias = torch.zeros(e, device=DEV)
            logits[0, 1::2] = logits[0, 0::2]          # equal scores: ties -> lower id
        token = torch.tensor([trial], device=DEV)
        ids, wts = route(logits, token, bias, tid2eid, k, norm, 1.5)
        ids_t, wts_t = route_ref(logits, token, bias, tid2eid, k, norm, 1.5)
        # Random logits leave no near-ties other than the exact ones made above: same ids, same order.
        assert torch.equal(ids, ids_t), trial
        # softplus/sqrt to a few ulp and the K-sum order: relative 1e-6.
        assert ((wts - wts_t).abs() <= 1e-6 * wts_t.abs() + 1e-30).all(), trial
