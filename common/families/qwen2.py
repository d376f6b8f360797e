"""Qwen2: Qwen2.5-Coder. Llama's layout with biases on q, k and v (not on the output projection),
and sliding windows on the layers `layer_types` names when `use_sliding_window` is set."""

from __future__ import annotations

from ..model_config import ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, llama_shaped, sliding_windows

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "qwen2"
DEFAULTS = {"vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
            "max_window_layers": 28}


def config(raw: dict) -> ModelConfig:
    windows = sliding_windows(raw, DEFAULTS, int(raw["num_hidden_layers"]))
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=True, out_bias=False, windows=windows)
