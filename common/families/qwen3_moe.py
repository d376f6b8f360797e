"""Qwen3-MoE: Qwen3-Coder-30B-A3B (-480B-A35B has the same layout, but no single GPU holds it and a
worker does not shard a model). Qwen3's attention (q/k norms, a head dimension of its own) with a
mixture of experts for the MLP: a router (`mlp.gate`) picks `num_experts_per_tok` of
`num_experts` SwiGLU experts for each token and weights their outputs, renormalized over the
chosen ones where `norm_topk_prob` is set. A layer named in `mlp_only_layers`, or off every
`decoder_sparse_step`-th, keeps a dense MLP of `intermediate_size`; a sliding window, where
`use_sliding_window` is set, covers every layer."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import Experts, ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped

__all__ = ["EXPERTS", "LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "qwen3_moe"
# a sparse layer's tensors after LAYER: the router's, and expert j's gated MLP
EXPERTS = {"router": "mlp.gate", "gate": "mlp.experts.{j}.gate_proj", "up": "mlp.experts.{j}.up_proj",
           "down": "mlp.experts.{j}.down_proj"}
DEFAULTS = {"vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
            "sliding_window": 4096, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
            "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False}


def config(raw: dict) -> ModelConfig:
    get = lambda name: _field(raw, DEFAULTS, name)  # noqa: E731
    bias = get("attention_bias")
    layers = int(raw["num_hidden_layers"])
    window = int(get("sliding_window") or 0) if get("use_sliding_window") else 0
    cfg = llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=bias, out_bias=bias, qk_norm=True,
                       windows=(window,) * layers)
    # transformers 5 writes the expert count as num_local_experts
    count = int(raw.get("num_experts") or raw.get("num_local_experts") or DEFAULTS["num_experts"])
    step, dense = int(get("decoder_sparse_step")), set(raw.get("mlp_only_layers") or ())
    sparse = tuple(count > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers))
    if not any(sparse):
        return cfg
    experts = Experts(count, int(get("num_experts_per_tok")), int(get("moe_intermediate_size")),
                      bool(get("norm_topk_prob")), sparse)
    return replace(cfg, experts=experts.check(cfg.n_embd))
