"""GLM-4: GLM-4-9B-0414, GLM-4-32B-0414 (`glm4`), and GLM-4-9B in transformers' format (`glm`).
Llama's layout with q/k/v biases (`attention_bias`), gate/up in one projection (`gate_up_proj`,
rows gate | up), and rotary embeddings that turn the first half of each head
(`partial_rotary_factor`) in interleaved pairs (loading reorders those rows into halves). GLM-4-0414
adds sandwich norms: each sublayer's output RMS-normalized before it joins the residual stream."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import ModelConfig
from .llama import PREFIX, TOP, _field, llama_shaped

__all__ = ["PREFIX", "TOP", "config"]

MODEL_TYPE = "glm4"
LAYER = "layers.{i}."
LAYER_ROLES = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "out": "self_attn.o_proj", "attn_out_norm": "post_self_attn_layernorm",
               "norm2": "post_attention_layernorm", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj",
               "mlp_out_norm": "post_mlp_layernorm"}
# transformers' Glm4Config defaults (GlmConfig's alike)
DEFAULTS = {"vocab_size": 151552, "max_position_embeddings": 131072, "rms_norm_eps": 1.5625e-7, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": True}
PARTIAL_ROTARY = 0.5  # transformers' default where a config names none


def config(raw: dict, model_type: str = MODEL_TYPE, sandwich_norms: bool = True) -> ModelConfig:
    cfg = llama_shaped(raw, DEFAULTS, model_type, qkv_bias=_field(raw, DEFAULTS, "attention_bias"), out_bias=False,
                       partial_rotary=PARTIAL_ROTARY, head_dim=128)
    return replace(cfg, rope=replace(cfg.rope, interleaved=True), sandwich_norms=sandwich_norms)
