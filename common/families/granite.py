"""Granite: IBM Granite 3.x (dense). Llama's layout with four multipliers from config.json: the
embeddings times `embedding_multiplier` on the way in, each attention and MLP output times
`residual_multiplier` as it joins the residual stream, the attention scores times
`attention_multiplier` (in place of 1 / sqrt(head_dim)), the logits divided by `logits_scaling`.
The code models Granite-Code 3B/8B are `llama` checkpoints and 20B/34B `gpt_bigcode` ones."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "granite"
# transformers' GraniteConfig defaults
DEFAULTS = {"vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "embedding_multiplier": 1.0,
            "logits_scaling": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 1.0}


def config(raw: dict) -> ModelConfig:
    get = lambda name: _field(raw, DEFAULTS, name)  # noqa: E731
    bias = get("attention_bias")
    cfg = llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=bias, out_bias=bias, mlp_bias=get("mlp_bias"))
    return replace(cfg, embed_scale=float(get("embedding_multiplier")),
                   residual_scale=float(get("residual_multiplier")),
                   softmax_scale=float(get("attention_multiplier")), logits_scale=float(get("logits_scaling")))
