"""Seed-OSS: ByteDance Seed-OSS-36B. Llama's layout with q/k/v biases (`attention_bias`, on by
default), the attention output's bias apart (`attention_out_bias`), and optional MLP biases."""

from __future__ import annotations

from ..model_config import ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "seed_oss"
# transformers' SeedOssConfig defaults
DEFAULTS = {"vocab_size": 155136, "max_position_embeddings": 524288, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": True, "attention_out_bias": False, "mlp_bias": False}


def config(raw: dict) -> ModelConfig:
    get = lambda name: _field(raw, DEFAULTS, name)  # noqa: E731
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=get("attention_bias"), out_bias=get("attention_out_bias"),
                        mlp_bias=get("mlp_bias"), head_dim=128)
