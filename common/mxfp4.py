"""MXFP4, the format gpt-oss's released checkpoints hold their experts in: blocks of 32 4-bit floats
(e2m1: ±0, 0.5, 1, 1.5, 2, 3, 4, 6; two a byte, the low nibble first) sharing one power-of-two scale
(a byte, biased by 127). Loading turns them into the serving dtype: the forward computes in it."""

from __future__ import annotations

import torch

# the 16 codes' values: the sign in the high bit
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., G, 16] uint8 and scales [..., G] uint8 -> [..., G * 32] of dtype: a row of G
    blocks becomes its G * 32 values (as transformers dequantizes them: each value times 2^(scale - 127))."""
    codes = torch.tensor(E2M1, dtype=dtype, device=blocks.device)
    values = torch.stack((codes[(blocks & 0x0F).int()], codes[(blocks >> 4).int()]), -1)  # [..., G, 16, 2]
    exponents = (scales.int() - 127)[..., None]  # [..., G, 1]
    return torch.ldexp(values.flatten(-2), exponents).to(dtype).flatten(-2)
