"""Phi-3: Phi-3 and Phi-3.5 mini/medium, Phi-4, Phi-4-mini. Llama's layout with q/k/v in one
projection (`qkv_proj`, rows q | k | v) and gate/up in another (`gate_up_proj`, rows gate | up), a
sliding window on every layer where `sliding_window` is set (Phi-3-mini-4k: 2,047), rotary
embeddings that may turn part of each head (`partial_rotary_factor`, Phi-4-mini's 0.75), and the
128k-context checkpoints' LongRoPE ("longrope", older configs "su" or "yarn"), whose short factors
hold within the pretraining length and long ones past it (common/blocks.py rope_tables)."""

from __future__ import annotations

from ..model_config import ModelConfig
from .llama import PREFIX, TOP, _field, llama_shaped

__all__ = ["PREFIX", "TOP", "config"]

MODEL_TYPE = "phi3"
LAYER = "layers.{i}."
LAYER_ROLES = {"norm1": "input_layernorm", "qkv": "self_attn.qkv_proj", "out": "self_attn.o_proj",
               "norm2": "post_attention_layernorm", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}
# transformers' Phi3Config defaults
DEFAULTS = {"vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False}


def config(raw: dict) -> ModelConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    if params and (params.get("rope_type") or params.get("type")) in ("su", "yarn"):  # Phi-3's names for LongRoPE
        raw = raw | {"rope_scaling": None, "rope_parameters": params | {"rope_type": "longrope", "type": None}}
    window = int(_field(raw, DEFAULTS, "sliding_window") or 0)
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=False, out_bias=False,
                        windows=(window,) * int(raw["num_hidden_layers"]), partial_rotary=1.0)
