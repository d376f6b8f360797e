"""AWQ checkpoints as AutoAWQ writes them in its GEMM layout and Qwen releases them
(Qwen2.5-Coder-*-Instruct-AWQ): `quantization_config` quant_method "awq", 4-bit weights in groups of
`group_size` input columns, each group with a scale and, with `zero_point`, a zero point. A linear
layer's weight [O, I] is stored as `qweight` int32 [I, O / 8] (eight 4-bit values an int32, along the
output columns, in AWQ's order), `qzeros` int32 [I / G, O / 8] packed alike, and `scales` [I / G, O].
Loading dequantizes them into the serving dtype, (q - z) * s, or (q - 8) * s without zero points:
the forward computes in it, so an AWQ checkpoint takes its dense size in memory."""

from __future__ import annotations

import torch

from . import int_packing
from .model_config import WeightQuant

PARTS = ("qweight", "qzeros", "scales")  # what a quantized "x.weight" is stored as: "x.qweight", ...
# nibble j of an int32 holds output column 8c + ORDER[j]: AutoAWQ's packing, which its GEMM kernel reads
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_NIBBLE_OF_COLUMN = [ORDER.index(k) for k in range(8)]


def part_shapes(out: int, inputs: int, quant: WeightQuant) -> dict[str, tuple[int, ...]]:
    """The stored shape of each part of a weight [out, inputs] (no qzeros without zero points)."""
    groups = -(-inputs // quant.group)
    shapes = {"qweight": (inputs, out // 8), "scales": (groups, out)}
    return shapes | {"qzeros": (groups, out // 8)} if quant.zero_point else shapes


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[R, C / 8] int32 -> [R, C] int32, each value in 0..15, the columns in order."""
    nibbles = int_packing.unpack(packed, 4, 1).view(packed.shape[0], -1, 8)  # nibble j is column 8c + ORDER[j]
    return nibbles[..., _NIBBLE_OF_COLUMN].reshape(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, parts: dict[str, torch.Tensor], quant: WeightQuant,
               dtype: torch.dtype) -> torch.Tensor:
    """qweight [I, O / 8], parts' qzeros [I / G, O / 8] (with zero points) and scales [I / G, O] -> the
    weight [O, I] of dtype, computed in float32."""
    q = unpack(qweight).float()  # [I, O]
    rows, group = q.shape[0], quant.group
    zeros = unpack(parts["qzeros"]).float().repeat_interleave(group, 0)[:rows] if quant.zero_point else 8.0
    return ((q - zeros) * parts["scales"].float().repeat_interleave(group, 0)[:rows]).T.contiguous().to(dtype)


def optional(quant: WeightQuant) -> tuple[str, ...]:
    """The parts a weight may lack."""
    return ()


def main(quant: WeightQuant) -> str:
    """The part stored in the weight's place."""
    return "qweight"


def packs(out: int, inputs: int, quant: WeightQuant) -> bool:
    """Whether a weight [out, inputs] packs into whole int32s: eight output columns a word."""
    return out % 8 == 0


def in_place(quant: WeightQuant) -> tuple[str, ...]:
    """The safetensors dtypes of weights stored quantized in their own place."""
    return ()
