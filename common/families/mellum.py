"""Mellum: JetBrains' code-completion models. Qwen3-MoE's layers (q/k norms, a softmax router over
`num_experts` SwiGLU experts, renormalized where `norm_topk_prob`) with the dense or sparse MLP of
each layer named by `mlp_layer_types`, a sliding window on the layers `layer_types` names, and
rotary embeddings per layer type (`rope_parameters`: the windowed layers' own base, as Gemma 3's).
The multi-token-prediction layers (`mtp.*`) are left in the files: splitserve decodes one token a
step."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import Experts, ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped, rope_of, windows_of
from .qwen3_moe import EXPERTS

__all__ = ["EXPERTS", "LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "mellum"
# transformers' MellumConfig defaults
DEFAULTS = {"vocab_size": 98304, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "sliding_window": 1024, "head_dim": 128,
            "moe_intermediate_size": 896, "num_experts_per_tok": 8, "num_experts": 64, "norm_topk_prob": True}
ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}


def config(raw: dict) -> ModelConfig:
    get = lambda name: _field(raw, DEFAULTS, name)  # noqa: E731
    layers, window = int(raw["num_hidden_layers"]), int(get("sliding_window") or 0)
    types = raw.get("layer_types") or ["full_attention"] * layers
    local = tuple(t == "sliding_attention" for t in types)
    ropes = raw.get("rope_parameters") or ROPE
    bias = get("attention_bias")
    cfg = llama_shaped(raw | {"rope_parameters": ropes["full_attention"], "rope_scaling": None}, DEFAULTS, MODEL_TYPE,
                       qkv_bias=bias, out_bias=bias, qk_norm=True,
                       windows=windows_of(types, window))
    if any(local):
        local_rope = rope_of({"rope_parameters": ropes["sliding_attention"]}, cfg.n_positions, cfg.head_dim)
        cfg = replace(cfg, local_rope=local_rope, local_layers=local)
    count = int(raw.get("num_experts") or raw.get("num_local_experts") or DEFAULTS["num_experts"])
    sparse = tuple(t == "sparse" for t in raw.get("mlp_layer_types") or ["sparse"] * layers)
    if not any(sparse):
        return cfg
    experts = Experts(count, int(get("num_experts_per_tok")), int(get("moe_intermediate_size")),
                      bool(get("norm_topk_prob")), sparse)
    return replace(cfg, experts=experts.check(cfg.n_embd))
