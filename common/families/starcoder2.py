"""StarCoder2: rotary positions and grouped-query attention as in Llama, but LayerNorm with
biases, a plain gelu MLP (c_fc, c_proj), biases on every projection (`use_bias`), and a sliding
window on every layer where `sliding_window` is set (4,096 in the released checkpoints)."""

from __future__ import annotations

from ..model_config import ModelConfig
from .llama import PREFIX, TOP, _field, llama_shaped

__all__ = ["PREFIX", "TOP", "config"]

MODEL_TYPE = "starcoder2"
LAYER = "layers.{i}."
LAYER_ROLES = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "out": "self_attn.o_proj", "norm2": "post_attention_layernorm", "up": "mlp.c_fc",
               "down": "mlp.c_proj"}
DEFAULTS = {"vocab_size": 49152, "max_position_embeddings": 4096, "norm_epsilon": 1e-5,
            "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True, "use_bias": True}


def config(raw: dict) -> ModelConfig:
    bias = _field(raw, DEFAULTS, "use_bias")
    layers = int(raw["num_hidden_layers"])
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=bias, out_bias=bias, mlp_bias=bias,
                        windows=(int(raw.get("sliding_window") or 0),) * layers, norm="layer", mlp="plain",
                        eps_field="norm_epsilon")
