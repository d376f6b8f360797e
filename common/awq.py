"""AWQ checkpoints as AutoAWQ writes them in its GEMM layout and Qwen releases them
(Qwen2.5-Coder-*-Instruct-AWQ): `quantization_config` quant_method "awq", 4-bit weights in groups of
`group_size` input columns, each group with a scale and, with `zero_point`, a zero point. A linear
layer's weight [O, I] is stored as `qweight` int32 [I, O / 8] (eight 4-bit values an int32, along the
output columns, in AWQ's order), `qzeros` int32 [I / G, O / 8] packed alike, and `scales` [I / G, O].
Loading dequantizes them into the serving dtype, (q - z) * s, or (q - 8) * s without zero points:
the forward computes in it, so an AWQ checkpoint takes its dense size in memory."""

from __future__ import annotations

import torch

PARTS = ("qweight", "qzeros", "scales")  # what a quantized "x.weight" is stored as: "x.qweight", ...
# nibble j of an int32 holds output column 8c + ORDER[j]: AutoAWQ's packing, which its GEMM kernel reads
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_NIBBLE_OF_COLUMN = [ORDER.index(k) for k in range(8)]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[R, C / 8] int32 -> [R, C] int32, each value in 0..15, the columns in order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # [R, C / 8, 8]: nibble j is column 8c + ORDER[j]
    return nibbles[..., _NIBBLE_OF_COLUMN].reshape(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    """qweight [I, O / 8], qzeros [I / G, O / 8] or None, scales [I / G, O] -> the weight [O, I] of dtype,
    computed in float32."""
    q = unpack(qweight).float()  # [I, O]
    rows = q.shape[0]
    zeros = unpack(qzeros).float().repeat_interleave(group, 0)[:rows] if qzeros is not None else 8.0
    return ((q - zeros) * scales.float().repeat_interleave(group, 0)[:rows]).T.contiguous().to(dtype)
