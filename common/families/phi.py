"""Phi: phi-1 (Python code), phi-1.5 and phi-2. Parallel residual branches: the attention and a
plain gelu MLP (`fc1`, `fc2`) both read one LayerNorm's output and join the residual stream
together; biases on every projection and on the LM head; rotary embeddings on part of each head
(`partial_rotary_factor`: 0.5, phi-2's 0.4). Per-head q/k LayerNorms (`qk_layernorm`) are refused."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import ModelConfig, ModelConfigError
from .llama import PREFIX, llama_shaped

__all__ = ["PREFIX", "config"]

MODEL_TYPE = "phi"
TOP = {"embed": "embed_tokens", "positions": None, "final_norm": "final_layernorm"}
LAYER = "layers.{i}."
LAYER_ROLES = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "out": "self_attn.dense", "up": "mlp.fc1", "down": "mlp.fc2"}
# transformers' PhiConfig defaults
DEFAULTS = {"vocab_size": 51200, "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "hidden_act": "gelu_new",
            "tie_word_embeddings": False}
PARTIAL_ROTARY = 0.5  # transformers' default where a config names none


def config(raw: dict) -> ModelConfig:
    if raw.get("qk_layernorm"):
        raise ModelConfigError("Phi with q/k LayerNorms (qk_layernorm) is not supported")
    cfg = llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=True, out_bias=True, mlp_bias=True, norm="layer",
                       mlp="plain", eps_field="layer_norm_eps", partial_rotary=PARTIAL_ROTARY)
    return replace(cfg, parallel_residual=True, lm_head_bias=True)
