"""Qwen3: Qwen2's layout with an RMSNorm over each query and key head before the rotary embedding,
a head dimension of its own (128 by default, whatever hidden_size / heads is), and biases on the
attention projections only where `attention_bias` is set."""

from __future__ import annotations

from ..model_config import ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped, sliding_windows

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "qwen3"
DEFAULTS = {"vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "head_dim": 128, "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
            "sliding_window": 4096, "max_window_layers": 28}


def config(raw: dict) -> ModelConfig:
    bias = _field(raw, DEFAULTS, "attention_bias")
    windows = sliding_windows(raw, DEFAULTS, int(raw["num_hidden_layers"]))
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=bias, out_bias=bias, qk_norm=True, windows=windows)
