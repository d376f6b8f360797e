"""GLM-4.5, GLM-4.5-Air and GLM-4.6 (`glm4_moe`): grouped-query attention with q/k/v biases
(`attention_bias`), q/k norms where `use_qk_norm` says so, rotary embeddings on the first half of
each head (`partial_rotary_factor`) in halves (not GLM-4's interleaved pairs), and DeepSeek-V3's
routing (deepseek_v3.py: sigmoid scores, the router's per-expert bias, `n_group` groups) over
`n_routed_experts` experts with shared ones beside; the first `first_k_dense_replace` layers are
dense. The multi-token-prediction layer is left in the files."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import Experts, ModelConfig
from .deepseek_v2 import EXPERTS
from .deepseek_v3 import v3_routing
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped

__all__ = ["EXPERTS", "LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "glm4_moe"
# transformers' Glm4MoeConfig defaults
DEFAULTS = {"vocab_size": 151552, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "moe_intermediate_size": 1408,
            "num_experts_per_tok": 8, "n_shared_experts": 1, "n_routed_experts": 128, "routed_scaling_factor": 1.0,
            "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True, "use_qk_norm": False}
PARTIAL_ROTARY = 0.5  # transformers' default where a config names none


def config(raw: dict) -> ModelConfig:
    get = lambda name: _field(raw, DEFAULTS, name)  # noqa: E731
    cfg = llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=get("attention_bias"), out_bias=False,
                       qk_norm=bool(get("use_qk_norm")), partial_rotary=PARTIAL_ROTARY)
    count, first = int(get("n_routed_experts") or 0), int(get("first_k_dense_replace"))
    sparse = tuple(count > 0 and i >= first for i in range(cfg.n_layer))
    if not any(sparse):
        return cfg
    inner = int(get("moe_intermediate_size"))
    experts = Experts(count, int(get("num_experts_per_tok")), inner, bool(get("norm_topk_prob")), sparse,
                      scale=float(get("routed_scaling_factor")), shared=inner * int(get("n_shared_experts") or 0),
                      **v3_routing(raw, DEFAULTS))
    return replace(cfg, experts=experts.check(cfg.n_embd))
