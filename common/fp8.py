"""FP8 checkpoints as transformers' FineGrainedFP8 writes and Qwen3, Qwen3-Coder, DeepSeek-V3 and
GLM-4.5 release them (`quantization_config` quant_method "fp8", dynamic activations): each linear
weight stored as float8 (e4m3) with its `weight_scale_inv` beside it, one scale per block of
`weight_block_size` [rows, columns] (the last blocks of a row or column may be short), or one for the
whole weight. Loading turns them into the serving dtype: the forward computes in it."""

from __future__ import annotations

import torch

SCALE_SUFFIX = "_scale_inv"  # the scale of "x.weight" is "x.weight_scale_inv"


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor:
    """weight [O, I] float8 and scale [ceil(O / rows), ceil(I / columns)] (or one value) -> [O, I]
    of dtype: each value times its block's scale, in float32, as transformers dequantizes them."""
    values = weight.float()
    if block is None or scale.numel() == 1:
        return (values * scale.float().reshape(())).to(dtype)
    rows, cols = values.shape
    expanded = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (values * expanded).to(dtype)
