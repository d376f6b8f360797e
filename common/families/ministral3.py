"""Ministral 3: the text model of Ministral 3 and Devstral Small 2 (their checkpoints are multimodal,
common/families/mistral3.py). Mistral's layout with YaRN and Llama 4's attention temperature: the
queries at position p are multiplied by 1 + beta * log(1 + floor(p / original_max_position_embeddings))
(`llama_4_scaling_beta`), 1 within the pretraining length."""

from __future__ import annotations

from ..model_config import ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, llama_shaped

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "ministral3"
# transformers' Ministral3Config defaults, the rotary ones for a config that names none
DEFAULTS = {"vocab_size": 131072, "max_position_embeddings": 262144, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False}
ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}


def config(raw: dict) -> ModelConfig:
    raw = {"num_key_value_heads": 8} | raw  # transformers' default; a null means one per query head
    window = int(raw.get("sliding_window") or 0)
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=False, out_bias=False,
                        windows=(window,) * int(raw["num_hidden_layers"]), head_dim=128, rope=ROPE)
