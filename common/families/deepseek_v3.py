"""DeepSeek-V3: DeepSeek-V2's latent attention with V3's routing (Moonlight-16B-A3B; DeepSeek-V3,
R1 and Kimi K2 have the layout but fit no single GPU). Each of `n_routed_experts` experts is scored
by a sigmoid of its router logit; the choice adds the router's per-expert bias
(`e_score_correction_bias`) and keeps the `topk_group` of `n_group` groups whose best two experts
score most (`noaux_tc`); the chosen experts' unbiased scores, renormalized where `norm_topk_prob`,
times `routed_scaling_factor`, weight them. The first `first_k_dense_replace` layers are dense; the
multi-token-prediction layer is left in the files."""

from __future__ import annotations

from ..model_config import ModelConfig, ModelConfigError
from .deepseek_v2 import EXPERTS, LAYER, LAYER_ROLES, PREFIX, TOP, latent_moe
from .llama import _field

__all__ = ["EXPERTS", "LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "deepseek_v3"
# transformers' DeepseekV3Config defaults
DEFAULTS = {"vocab_size": 129280, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "first_k_dense_replace": 3,
            "kv_lora_rank": 512, "n_routed_experts": 256, "n_shared_experts": 1, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
            "moe_intermediate_size": 2048, "q_lora_rank": 1536, "n_group": 8, "topk_group": 4,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid"}


def config(raw: dict) -> ModelConfig:
    get = lambda name: _field(raw, DEFAULTS, name)  # noqa: E731
    if get("scoring_func") != "sigmoid" or get("topk_method") != "noaux_tc":
        raise ModelConfigError(f"{MODEL_TYPE} routes with a sigmoid and noaux_tc; this config says "
                               f"{get('scoring_func')}, {get('topk_method')}")
    layers, first = int(raw["num_hidden_layers"]), int(get("first_k_dense_replace"))
    return latent_moe(raw, DEFAULTS, MODEL_TYPE, tuple(i >= first for i in range(layers)), **v3_routing(raw, DEFAULTS))


def v3_routing(raw: dict, defaults: dict) -> dict:
    """DeepSeek-V3's routing (noaux_tc) as Experts' fields."""
    groups = (int(_field(raw, defaults, "n_group")), int(_field(raw, defaults, "topk_group")))
    return dict(groups=groups, group_score="top2", sigmoid=True, router_bias=True)
