"""Gemma 3 (text): Gemma 3 1B and 270M (`gemma3_text`), and the text model of the larger, multimodal
checkpoints (common/families/gemma3.py). Gemma 2's layout with q/k RMSNorms, no caps by default,
a window on five layers in six, and two rotary embeddings: the windowed layers turn at their own
base frequency (`rope_local_base_freq`, 10,000), the others at `rope_theta` (1,000,000) with the
config's scaling (linear x8 in the 4B-27B models)."""

from __future__ import annotations

from ..model_config import ModelConfig, ModelConfigError
from .gemma2 import LAYER, LAYER_ROLES, PREFIX, TOP, gemma2_shaped
from .llama import rope_of

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "gemma3_text"
# transformers' Gemma3TextConfig defaults: the multimodal checkpoints' text_config leaves many out
DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True, "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096}
CAPS = {"attn_logit_softcapping": None, "final_logit_softcapping": None}
THETAS = {"full_attention": ("rope_theta", 1e6), "sliding_attention": ("rope_local_base_freq", 1e4)}


def config(raw: dict) -> ModelConfig:
    raw = DEFAULTS | raw
    if raw.get("use_bidirectional_attention"):
        raise ModelConfigError("Gemma 3 with bidirectional attention (an embedding model) is not supported")
    params = raw.get("rope_parameters") or {}
    if "full_attention" not in params:  # configs before transformers 5: the scaling is the full layers'
        params = {"full_attention": dict(raw.get("rope_scaling") or params), "sliding_attention": {}}
    ropes = {}
    for kind, (field, theta) in THETAS.items():
        p = {"rope_type": "default"} | (params.get(kind) or {})
        ropes[kind] = p | {"rope_theta": p.get("rope_theta") or raw.get(field) or theta}
    head_dim, positions = int(raw["head_dim"]), int(raw["max_position_embeddings"])
    raw = raw | {"rope_parameters": ropes["full_attention"], "rope_scaling": None, "rope_theta": None}
    local = rope_of({"rope_parameters": ropes["sliding_attention"]}, positions, head_dim)
    return gemma2_shaped(raw, DEFAULTS, MODEL_TYPE, CAPS, pattern=int(raw.get("sliding_window_pattern") or 6),
                         qk_norm=True, local_rope=local)
