"""compressed-tensors checkpoints, as llm-compressor writes them and RedHatAI releases code models
(`quantization_config` quant_method "compressed-tensors", status compressed): each projection's
weight [O, I] as values with a `weight_scale` (one, one an output row, one a group of `group_size`
input columns, or float8's one a block) and, where asymmetric, a `weight_zero_point`:
- pack-quantized (W4A16, W8A16): 4-bit or 8-bit integers packed into `weight_packed` int32
  [O, I * bits / 32], element i of a row at bits i * bits, stored plus 2^(bits - 1); the zero
  points packed alike along the output rows; `weight_shape` [O, I];
- int-quantized (W8A8): the weight itself int8;
- float-quantized (FP8, FP8-dynamic): the weight itself float8 e4m3.
Loading dequantizes them into the serving dtype, (q - z) * s; activations are not quantized (the
forward computes in that dtype), so a W8A8 checkpoint answers as its weights' dense model."""

from __future__ import annotations

import torch

from . import int_packing
from .model_config import WeightQuant

PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")  # beside "x.weight", or for it


def _scale_shape(out: int, inputs: int, quant: WeightQuant) -> tuple[int, ...]:
    if quant.strategy == "channel":
        return out, 1
    if quant.strategy == "group":
        return out, -(-inputs // quant.group)
    if quant.strategy == "block":
        return -(-out // quant.block[0]), -(-inputs // quant.block[1])
    return (1,)


def part_shapes(out: int, inputs: int, quant: WeightQuant) -> dict[str, tuple[int, ...]]:
    """The stored shape of each part of a weight [out, inputs] (the weight itself, where not packed,
    is checked as any weight is)."""
    scale = _scale_shape(out, inputs, quant)
    shapes = {"weight_scale": scale}
    if quant.packed:
        shapes |= {"weight_packed": (out, -(-inputs * quant.bits // 32)), "weight_shape": (2,)}
    packed_rows = quant.packed and quant.strategy in ("channel", "group")
    shapes["weight_zero_point"] = (-(-out * quant.bits // 32), scale[1]) if packed_rows else scale
    return shapes


def unpack(packed: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    """int32 packed along `dim` (element i at bits i * bits, stored plus 2^(bits - 1)) -> the first
    `length` signed values along it."""
    values = int_packing.unpack(packed, bits, dim)
    return values.narrow(dim, 0, length) - (1 << (bits - 1))


def _expand(t: torch.Tensor, out: int, inputs: int, quant: WeightQuant) -> torch.Tensor:
    """A scale's or zero point's values over the weight's [out, inputs] (broadcastable)."""
    if quant.strategy == "group":
        return t.repeat_interleave(quant.group, 1)[:, :inputs]
    if quant.strategy == "block":
        return t.repeat_interleave(quant.block[0], 0)[:out].repeat_interleave(quant.block[1], 1)[:, :inputs]
    return t if quant.strategy == "channel" else t.reshape(())


def dequantize(stored: torch.Tensor, parts: dict[str, torch.Tensor], quant: WeightQuant,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight [O, I] of dtype, computed in float32, from `stored` (weight_packed, or the weight
    itself) and its parts."""
    if quant.packed:
        out, inputs = (int(n) for n in parts["weight_shape"].tolist())
        q = unpack(stored, quant.bits, 1, inputs).float()
    else:
        q = stored.float()
        out, inputs = q.shape
    w = q
    if "weight_zero_point" in parts:
        zero = parts["weight_zero_point"]
        if quant.packed and quant.strategy in ("channel", "group"):  # packed along the output rows
            zero = unpack(zero, quant.bits, 0, out)
        w = w - _expand(zero.float(), out, inputs, quant)
    return (w * _expand(parts["weight_scale"].float(), out, inputs, quant)).to(dtype)


def optional(quant: WeightQuant) -> tuple[str, ...]:
    """The parts a weight may lack: a symmetric one's zero points (older checkpoints store zeros)."""
    return () if quant.zero_point else ("weight_zero_point",)


def main(quant: WeightQuant) -> str:
    """The part stored in the weight's place: weight_packed, or the weight itself (int8, float8)."""
    return "weight_packed" if quant.packed else "weight"


def packs(out: int, inputs: int, quant: WeightQuant) -> bool:
    """Whether a weight [out, inputs] packs: any does (a row's last word is padded)."""
    return True


def in_place(quant: WeightQuant) -> tuple[str, ...]:
    """The safetensors dtypes of weights stored quantized in their own place."""
    return () if quant.packed else ("F8_E4M3",) if quant.floats else ("I8",)
