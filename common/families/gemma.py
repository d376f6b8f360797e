"""Gemma: CodeGemma 2B/7B. Llama's layout with three differences: the embeddings are scaled by
sqrt(hidden_size) on the way in (the tied LM head reads them unscaled), every RMSNorm multiplies by
1 + weight (its weights are stored less one: loading adds the one, so that a half-precision model
rounds 1 + weight once where transformers keeps it in fp32, a difference the size of the norm's
own output rounding), and the gated MLP takes the tanh approximation of gelu (old configs say
"gelu" and mean it, as transformers reads them)."""

from __future__ import annotations

import math
from dataclasses import replace

from ..model_config import ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "gemma"
DEFAULTS = {"vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh", "head_dim": 256, "tie_word_embeddings": True, "attention_bias": False}


def config(raw: dict) -> ModelConfig:
    act = raw.get("hidden_activation") or _field(raw, DEFAULTS, "hidden_act")
    raw = raw | {"hidden_act": "gelu_pytorch_tanh" if act == "gelu" else act}
    bias = _field(raw, DEFAULTS, "attention_bias")
    cfg = llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=bias, out_bias=bias)
    return replace(cfg, embed_scale=math.sqrt(cfg.n_embd), norm_offset=1.0)
