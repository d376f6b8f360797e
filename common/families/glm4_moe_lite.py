"""GLM-4.7-Flash (`glm4_moe_lite`, 30B with 3B active): DeepSeek-V3's latent attention and routing
(common/families/deepseek_v3.py) with one shared expert, dense or sparse MLPs per layer
(`mlp_layer_types`: the first dense), and rotary pairs interleaved unless `rope_interleave` is off."""

from __future__ import annotations

from ..model_config import ModelConfig
from .deepseek_v2 import EXPERTS, LAYER, LAYER_ROLES, PREFIX, TOP, latent_moe
from .deepseek_v3 import v3_routing

__all__ = ["EXPERTS", "LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "glm4_moe_lite"
# transformers' Glm4MoeLiteConfig defaults
DEFAULTS = {"vocab_size": 154880, "max_position_embeddings": 202752, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "kv_lora_rank": 512,
            "n_routed_experts": 64, "n_shared_experts": 1, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64,
            "v_head_dim": 256, "routed_scaling_factor": 1.8, "norm_topk_prob": True, "moe_intermediate_size": 1536,
            "q_lora_rank": 768, "n_group": 1, "topk_group": 1}


def config(raw: dict) -> ModelConfig:
    layers = int(raw["num_hidden_layers"])
    types = raw.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1)
    return latent_moe(raw, DEFAULTS, MODEL_TYPE, tuple(t == "sparse" for t in types), **v3_routing(raw, DEFAULTS))
