"""Random raw GGUF blocks for kernel tests and benchmarks.

Contract: `random_raw(ggml_type, shape, generator)` returns uint8 bytes of a tensor of torch
shape (..., N, K) whose every block is valid: random payload bytes (any payload byte pattern
is a legal block in these formats) with the fp16 scale fields overwritten by finite random
values, so no NaN/inf sneaks in from a random exponent. Generated on the generator's device.
"""

from __future__ import annotations

import math

import torch
from gguf import GGMLQuantizationType as T

from dwarfstar.kernels.repack import IQ2_XXS_BYTES, Q2_K_BYTES, Q4_K_BYTES, Q8_0_BYTES
from dwarfstar.shape import QK8_0, QK_K

# ggml type -> (elements per block, bytes per block, byte offsets of the fp16 scale fields)
_LAYOUT = {
    T.Q8_0: (QK8_0, Q8_0_BYTES, (0,)),
    T.IQ2_XXS: (QK_K, IQ2_XXS_BYTES, (0,)),
    T.Q2_K: (QK_K, Q2_K_BYTES, (80, 82)),
    T.Q4_K: (QK_K, Q4_K_BYTES, (0, 2)),
}

# Scale magnitude: keeps dequantised weights O(0.1..1) like real checkpoints.
SCALE_STD = 0.02


def random_raw(ggml_type: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """uint8 [n_bytes]: random valid blocks for a tensor of torch shape (..., N, K)."""
    device = generator.device
    n = math.prod(shape)
    if ggml_type == T.F16:
        w = torch.randn(n, generator=generator, device=device) * 0.5
        return w.half().view(torch.uint8)
    block, nbytes, scale_offsets = _LAYOUT[ggml_type]
    n_blocks = n // block
    raw = torch.randint(0, 256, (n_blocks, nbytes), generator=generator, device=device, dtype=torch.uint8)
    for off in scale_offsets:
        s = (torch.randn(n_blocks, generator=generator, device=device) * SCALE_STD).half()
        raw[:, off : off + 2] = s.view(torch.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)
