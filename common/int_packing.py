"""Integers packed into int32s as AWQ, GPTQ and compressed-tensors store quantized weights: 32 / bits
values a word, the first in the lowest bits (each format its own order, offset and dimension:
awq.py, gptq.py, compressed.py)."""

from __future__ import annotations

import torch


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 [R, C] with 32 / bits values a word along `dim` (0: rows, 1: columns) -> those values,
    unsigned, in order along that dimension: [R * 32 / bits, C] or [R, C * 32 / bits]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(dim + 1) >> shifts.view((-1, 1) if dim == 0 else (1, 1, -1))) & ((1 << bits) - 1)
    return values.flatten(dim, dim + 1)  # [R, per, C] or [R, C, per] -> that dimension times per
