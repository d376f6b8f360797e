"""Mistral: Codestral. Llama's layout without biases, and a sliding window on every layer where
`sliding_window` is set (transformers' default, for a config that leaves it out, is 4096)."""

from __future__ import annotations

from ..model_config import ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, llama_shaped

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "mistral"
DEFAULTS = {"vocab_size": 32000, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "sliding_window": 4096}


def config(raw: dict) -> ModelConfig:
    # A config that writes "sliding_window": null has none; one that leaves it out gets the default.
    window = raw.get("sliding_window", DEFAULTS["sliding_window"])
    layers = int(raw["num_hidden_layers"])
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=False, out_bias=False, windows=(int(window or 0),) * layers)
