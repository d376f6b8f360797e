"""CWM: Meta's Code World Model (32B). Llama's layout with a sliding window on three layers in four
(`layer_types`; every fourth from the first attends every key) and Llama 3's rotary scaling."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import ModelConfig, eos_ids
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped, windows_of

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "cwm"
# transformers' CwmConfig defaults, the rotary ones for a config that names none
DEFAULTS = {"vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "mlp_bias": False, "sliding_window": 8192}
ROPE = {"rope_type": "llama3", "rope_theta": 1e6, "factor": 16.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192}
EOS = [128001, 128008, 128009]


def config(raw: dict) -> ModelConfig:
    layers, window = int(raw["num_hidden_layers"]), int(_field(raw, DEFAULTS, "sliding_window") or 0)
    types = raw.get("layer_types") or ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(layers)]
    cfg = llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=False, out_bias=False,
                       mlp_bias=_field(raw, DEFAULTS, "mlp_bias"), windows=windows_of(types, window), head_dim=128,
                       rope=ROPE)
    return cfg if raw.get("eos_token_id") is not None else replace(cfg, eos_token_ids=eos_ids(EOS))
