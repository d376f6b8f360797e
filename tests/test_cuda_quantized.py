"""Quantized checkpoints loaded on CUDA (skipped without a GPU; the device pass runs this file):
loading unpacks and dequantizes on the device (docs/gpu.md items 15 and 16), and must give the
weights the CPU gives. Collected in the device image's stand-in too, so it imports no more than
that image holds (no compressed-tensors, none of the cluster helpers)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from quantize_support import awq_quantize, fp8_quantize, gptq_quantize
from splitserve.common.checkpoint import load_weights
from splitserve.common.model_config import load_model_config

# Qwen2-shaped (q/k/v biases, grouped-query), small; every quantized dimension a multiple of 32
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
MADE = {"fp8-blocks": lambda p: fp8_quantize(p, [16, 32]), "awq": lambda p: awq_quantize(p, 32, True, False),
        "gptq-act-order": lambda p: gptq_quantize(p, 4, 32, True, False),
        "gptq-8-bit": lambda p: gptq_quantize(p, 8, -1, False, True)}


def qwen2_checkpoint(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **SHAPE), dtype=torch.float32).save_pretrained(path)
    return path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(MADE))
def test_quantized_weights_dequantize_on_cuda_as_on_the_cpu(tmp_path, kind, record_property):
    """The same bf16 weights as on the CPU, bit for bit: elementwise float32 arithmetic, then one
    rounding."""
    path = qwen2_checkpoint(tmp_path / kind)
    MADE[kind](path)
    cfg = load_model_config(path)
    cpu = load_weights(path, cfg, torch.bfloat16, "cpu")
    start = time.perf_counter()
    cuda = load_weights(path, cfg, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    record_property("load_s", round(time.perf_counter() - start, 3))
    for name, weight in cpu.items():
        torch.testing.assert_close(cuda[name].cpu(), weight, rtol=0, atol=0, msg=name)
