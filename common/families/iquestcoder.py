"""IQuest-Coder: IQuest-Coder-V1 (40B). A Llama: transformers runs it with Llama's code, and so do
we; only the config's defaults differ (heads of 128)."""

from __future__ import annotations

from ..model_config import ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "iquestcoder"
# transformers' IQuestCoderConfig defaults
DEFAULTS = {"vocab_size": 76800, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}


def config(raw: dict) -> ModelConfig:
    bias = _field(raw, DEFAULTS, "attention_bias")
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=bias, out_bias=bias,
                        mlp_bias=_field(raw, DEFAULTS, "mlp_bias"), head_dim=128)
