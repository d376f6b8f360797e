"""DeepSeek-V2: DeepSeek-Coder-V2-Lite (16B, 2.4B active; DeepSeek-Coder-V2's 236B has the same
layout but fits no single GPU, and a worker does not shard a model).

Multi-head latent attention (`kv_lora_rank`, `q_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`,
`v_head_dim`; model_config.Latent): the cache holds one compressed K/V vector and one rotary key
per token. Rotary embeddings (YaRN in the published checkpoints, whose `mscale_all_dim` scales the
softmax too) turn interleaved pairs; loading reorders those rows into the halves the shared forward
rotates.

DeepSeekMoE: after the first `first_k_dense_replace` layers (dense MLPs of `intermediate_size`),
every `moe_layer_freq`-th layer has `n_routed_experts` SwiGLU experts of `moe_intermediate_size`,
`num_experts_per_tok` of them chosen by a softmax router (among all, or among the `topk_group` best
of `n_group` groups for `group_limited_greedy`), their weights renormalized where `norm_topk_prob`
is set (as DeepSeek's own code and vLLM do; transformers ignores the field) and multiplied by
`routed_scaling_factor`; `n_shared_experts` more experts, one MLP, take every token.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..model_config import Experts, Latent, ModelConfig, ModelConfigError
from .llama import PREFIX, TOP, _field, llama_shaped

__all__ = ["EXPERTS", "LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "deepseek_v2"
LAYER = "layers.{i}."
LAYER_ROLES = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "q_a": "self_attn.q_a_proj",
               "q_a_norm": "self_attn.q_a_layernorm", "q_b": "self_attn.q_b_proj",
               "kv_a": "self_attn.kv_a_proj_with_mqa", "kv_a_norm": "self_attn.kv_a_layernorm",
               "kv_b": "self_attn.kv_b_proj", "out": "self_attn.o_proj", "norm2": "post_attention_layernorm",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
EXPERTS = {"router": "mlp.gate", "gate": "mlp.experts.{j}.gate_proj", "up": "mlp.experts.{j}.up_proj",
           "down": "mlp.experts.{j}.down_proj", "shared_gate": "mlp.shared_experts.gate_proj",
           "shared_up": "mlp.shared_experts.up_proj", "shared_down": "mlp.shared_experts.down_proj"}
# transformers' DeepseekV2Config defaults
DEFAULTS = {"vocab_size": 102400, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "first_k_dense_replace": 0,
            "kv_lora_rank": 512, "n_routed_experts": 64, "n_shared_experts": 2, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "routed_scaling_factor": 1.0, "topk_method": "greedy",
            "norm_topk_prob": False, "moe_intermediate_size": 1407, "moe_layer_freq": 1, "scoring_func": "softmax",
            "q_lora_rank": 1536}
TOPK_METHODS = ("greedy", "group_limited_greedy")


def config(raw: dict) -> ModelConfig:
    get = lambda name: _field(raw, DEFAULTS, name)  # noqa: E731
    if get("scoring_func") != "softmax" or get("topk_method") not in TOPK_METHODS:
        raise ModelConfigError(f"{MODEL_TYPE} routes with a softmax, {' or '.join(TOPK_METHODS)}; this config says "
                               f"{get('scoring_func')}, {get('topk_method')}")
    layers, first, every = int(raw["num_hidden_layers"]), int(get("first_k_dense_replace")), int(get("moe_layer_freq"))
    groups = None
    if get("topk_method") == "group_limited_greedy":
        groups = (int(raw.get("n_group") or 1), int(raw.get("topk_group") or 1))
    return latent_moe(raw, DEFAULTS, MODEL_TYPE, tuple(i >= first and i % every == 0 for i in range(layers)),
                      groups=groups)


def latent_moe(raw: dict, defaults: dict, model_type: str, sparse: tuple[bool, ...], *,
               groups: tuple[int, int] | None, **routing) -> ModelConfig:
    """The config of a family with DeepSeek's latent attention and experts in the `sparse` layers
    (DeepSeek-V2 and V3, GLM-4.7-Flash); `routing`: Experts' scoring fields beyond the shared ones.
    The rotary pairs are interleaved unless `rope_interleave` says otherwise."""
    get = lambda name: _field(raw, defaults, name)  # noqa: E731
    for field in ("attention_bias", "mlp_bias"):  # no published checkpoint sets them
        if get(field):
            raise ModelConfigError(f"{model_type} with {field} is not supported")
    # Llama's fields, then the attention's shape of its own: one cached "head" of half the vector
    cfg = llama_shaped(raw, defaults, model_type, qkv_bias=False, out_bias=False)
    rope = cfg.rope
    if rope.rope_type == "dynamic":
        raise ModelConfigError(f"{model_type} with dynamic rotary scaling is not supported")
    nope, rope_dim = int(get("qk_nope_head_dim")), int(get("qk_rope_head_dim"))
    kv_rank = int(get("kv_lora_rank"))
    if rope_dim % 2 or kv_rank % 2:  # rotated in halves; the cached vector split in halves
        raise ModelConfigError(f"qk_rope_head_dim {rope_dim} and kv_lora_rank {kv_rank} must be even")
    scale = (nope + rope_dim) ** -0.5
    if rope.rope_type != "default" and rope.mscale_all_dim and rope.factor > 1:  # YaRN's on the softmax
        scale *= (0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0) ** 2
    # an explicit null means no compression of the queries (DeepSeek-V2-Lite)
    q_rank = int(raw["q_lora_rank"] or 0) if "q_lora_rank" in raw else int(defaults["q_lora_rank"] or 0)
    latent = Latent(kv_rank=kv_rank, q_rank=q_rank, nope_dim=nope, rope_dim=rope_dim,
                    v_dim=int(get("v_head_dim")))
    interleaved = raw.get("rope_interleave") is not False
    cfg = replace(cfg, kv_heads=1, head_dim=(kv_rank + rope_dim) // 2, latent=latent, softmax_scale=scale,
                  rope=replace(rope, interleaved=interleaved))
    count = int(get("n_routed_experts") or 0)
    sparse = tuple(count > 0 and s for s in sparse)
    if not any(sparse):
        return cfg
    if raw.get("num_experts_per_tok") is None:
        raise ModelConfigError("config.json lacks the field 'num_experts_per_tok'")
    inner = int(get("moe_intermediate_size"))
    experts = Experts(count, int(raw["num_experts_per_tok"]), inner, bool(get("norm_topk_prob")), sparse,
                      scale=float(get("routed_scaling_factor")), shared=inner * int(get("n_shared_experts") or 0),
                      groups=groups, **routing)
    return replace(cfg, experts=experts.check(cfg.n_embd))
