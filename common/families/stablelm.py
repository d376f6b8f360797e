"""StableLM: Stable Code 3B, StableLM 3B-4E1T and StableLM 2 1.6B. Llama's layout with LayerNorms
(with biases) in place of RMSNorms, optional q/k/v biases (`use_qkv_bias`), and rotary embeddings
that turn only the first quarter of each head (`partial_rotary_factor`). StableLM 2 12B's per-head
q/k LayerNorms (`qk_layernorm`) and parallel residual branches (`use_parallel_residual`) are
refused with a clear error."""

from __future__ import annotations

from ..model_config import ModelConfig, ModelConfigError
from .llama import PREFIX, TOP, _field, llama_shaped

__all__ = ["PREFIX", "TOP", "config"]

MODEL_TYPE = "stablelm"
LAYER = "layers.{i}."
LAYER_ROLES = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "out": "self_attn.o_proj", "norm2": "post_attention_layernorm", "gate": "mlp.gate_proj",
               "up": "mlp.up_proj", "down": "mlp.down_proj"}
# transformers' StableLmConfig defaults
DEFAULTS = {"vocab_size": 50304, "max_position_embeddings": 4096, "layer_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "use_qkv_bias": False}
PARTIAL_ROTARY = 0.25  # transformers' default where a config names none


def config(raw: dict) -> ModelConfig:
    for field, what in (("qk_layernorm", "per-head q/k LayerNorms"), ("use_parallel_residual", "parallel residuals")):
        if raw.get(field):
            raise ModelConfigError(f"StableLM with {what} ({field}, StableLM 2 12B) is not supported")
    if raw.get("head_dim") not in (None, int(raw["hidden_size"]) // int(raw["num_attention_heads"])):
        raise ModelConfigError("StableLM's heads are hidden_size / num_attention_heads wide; head_dim says otherwise")
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=_field(raw, DEFAULTS, "use_qkv_bias"), out_bias=False,
                        norm="layer", eps_field="layer_norm_eps", partial_rotary=PARTIAL_ROTARY)
