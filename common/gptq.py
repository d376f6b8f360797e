"""GPTQ checkpoints as AutoGPTQ and GPTQModel write them and Qwen releases them
(Qwen2.5-Coder-*-Instruct-GPTQ-Int4 and -Int8): `quantization_config` quant_method "gptq", 4-bit or
8-bit weights in groups of `group_size` input columns (-1: one group), each group with a scale and a
zero point. A linear layer's weight [O, I] is stored as `qweight` int32 [I * bits / 32, O] (32 / bits
values an int32, along the input rows, the first in the lowest bits), `qzeros` int32
[I / G, O * bits / 32] (along the output columns), `scales` [I / G, O] and `g_idx` int32 [I], each
input row's group (act-order checkpoints, `desc_act`, put rows in other groups than row // G).
AutoGPTQ's format ("gptq") stores each zero one less than it is; GPTQModel's "gptq_v2" as it is.
Loading dequantizes into the serving dtype: (q - z) * s, row by row with its group's."""

from __future__ import annotations

import torch

from .int_packing import unpack
from .model_config import WeightQuant

PARTS = ("qweight", "qzeros", "scales", "g_idx")  # what a quantized "x.weight" is stored as: "x.qweight", ...


def part_shapes(out: int, inputs: int, quant: WeightQuant) -> dict[str, tuple[int, ...]]:
    """The stored shape of each part of a weight [out, inputs]."""
    per_word, groups = 32 // quant.bits, -(-inputs // quant.group) if quant.group else 1
    return {"qweight": (inputs // per_word, out), "qzeros": (groups, out // per_word), "scales": (groups, out),
            "g_idx": (inputs,)}


def dequantize(qweight: torch.Tensor, parts: dict[str, torch.Tensor], quant: WeightQuant,
               dtype: torch.dtype) -> torch.Tensor:
    """qweight [I * bits / 32, O] and parts' qzeros, scales and (where stored) g_idx -> the weight
    [O, I] of dtype, computed in float32."""
    q = unpack(qweight, quant.bits, 0).float()  # [I, O]
    inputs = q.shape[0]
    zeros = unpack(parts["qzeros"], quant.bits, 1).float() + float(quant.zeros_minus_one)  # [groups, O]
    if "g_idx" in parts:
        rows = parts["g_idx"].long()
    else:
        rows = torch.arange(inputs, device=q.device) // quant.group if quant.group else torch.zeros(
            inputs, dtype=torch.long, device=q.device)
    return ((q - zeros[rows]) * parts["scales"].float()[rows]).T.contiguous().to(dtype)


def optional(quant: WeightQuant) -> tuple[str, ...]:
    """The parts a weight may lack: g_idx (without it, row i is in group i // G)."""
    return ("g_idx",)


def main(quant: WeightQuant) -> str:
    """The part stored in the weight's place."""
    return "qweight"


def packs(out: int, inputs: int, quant: WeightQuant) -> bool:
    """Whether a weight [out, inputs] packs into whole int32s: rows and zeros' columns 32 / bits a word."""
    return out % (32 // quant.bits) == 0 and inputs % (32 // quant.bits) == 0


def in_place(quant: WeightQuant) -> tuple[str, ...]:
    """The safetensors dtypes of weights stored quantized in their own place."""
    return ()
