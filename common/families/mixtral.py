"""Mixtral: Mistral's attention with a mixture of experts in every layer: a router
(`block_sparse_moe.gate`) picks `num_experts_per_tok` of `num_local_experts` SwiGLU experts (w1 the
gate, w3 up, w2 down) of `intermediate_size`, their weights renormalized over the chosen ones; a
sliding window on every layer where `sliding_window` is set (none by default)."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import Experts, ModelConfig
from .llama import LAYER, LAYER_ROLES, PREFIX, TOP, _field, llama_shaped

__all__ = ["EXPERTS", "LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "mixtral"
EXPERTS = {"router": "block_sparse_moe.gate", "gate": "block_sparse_moe.experts.{j}.w1",
           "up": "block_sparse_moe.experts.{j}.w3", "down": "block_sparse_moe.experts.{j}.w2"}
DEFAULTS = {"vocab_size": 32000, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "num_experts_per_tok": 2, "num_local_experts": 8}


def config(raw: dict) -> ModelConfig:
    layers = int(raw["num_hidden_layers"])
    cfg = llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=False, out_bias=False,
                       windows=(int(raw.get("sliding_window") or 0),) * layers)
    count = int(raw.get("num_local_experts") or raw.get("num_experts") or DEFAULTS["num_local_experts"])
    experts = Experts(count, int(_field(raw, DEFAULTS, "num_experts_per_tok")), cfg.n_inner, True, (True,) * layers)
    return replace(cfg, experts=experts.check(cfg.n_embd))
