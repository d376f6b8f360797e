"""Gemma 2: Gemma 2 2B/9B/27B. Gemma's layout (scaled embeddings, norms multiplying by 1 + weight,
a gelu-tanh gated MLP) with sandwich norms (each sublayer's output normalized before it joins the
residual stream: `post_attention_layernorm` and `post_feedforward_layernorm`; the MLP's input norm
is `pre_feedforward_layernorm`), attention scores scaled by `query_pre_attn_scalar`^-0.5 and
capped (`attn_logit_softcapping`), logits capped (`final_logit_softcapping`), and a sliding window on
the layers `layer_types` names (every other one from the first where a config has none)."""

from __future__ import annotations

import math
from dataclasses import replace

from ..model_config import ModelConfig, Rope
from .llama import PREFIX, TOP, _field, every_nth_full, llama_shaped, windows_of

__all__ = ["PREFIX", "TOP", "config"]

MODEL_TYPE = "gemma2"
LAYER = "layers.{i}."
LAYER_ROLES = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm", "out": "self_attn.o_proj",
               "attn_out_norm": "post_attention_layernorm", "norm2": "pre_feedforward_layernorm",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
               "mlp_out_norm": "post_feedforward_layernorm"}
# transformers' Gemma2Config defaults
DEFAULTS = {"vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh", "head_dim": 256, "tie_word_embeddings": True, "attention_bias": False,
            "query_pre_attn_scalar": 256, "sliding_window": 4096}
CAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


def config(raw: dict) -> ModelConfig:
    return gemma2_shaped(raw, DEFAULTS, MODEL_TYPE, CAPS, pattern=2)


def gemma2_shaped(raw: dict, defaults: dict, model_type: str, caps: dict[str, float | None], *, pattern: int,
                  qk_norm: bool = False, local_rope: Rope | None = None) -> ModelConfig:
    """The config of Gemma 2 and its successors; `caps`: the softcaps' defaults for a config without
    their fields (one writing null has none), `pattern`: one layer in this many attends without a
    window where a config has no `layer_types`, `local_rope`: the windowed layers' own rotary
    embeddings (Gemma 3)."""
    get = lambda name: _field(raw, defaults, name)  # noqa: E731
    raw = raw | {"hidden_act": raw.get("hidden_activation") or get("hidden_act")}
    layers, window = int(raw["num_hidden_layers"]), int(get("sliding_window") or 0)
    types = raw.get("layer_types") or every_nth_full(layers, pattern)
    local = tuple(t == "sliding_attention" for t in types)
    bias = get("attention_bias")
    cfg = llama_shaped(raw, defaults, model_type, qkv_bias=bias, out_bias=bias, qk_norm=qk_norm,
                       windows=windows_of(types, window))
    capped = {name: float(raw.get(name, default) or 0.0) for name, default in caps.items()}
    return replace(cfg, embed_scale=math.sqrt(cfg.n_embd), norm_offset=1.0, sandwich_norms=True,
                   softmax_scale=float(get("query_pre_attn_scalar")) ** -0.5,
                   attn_softcap=capped["attn_logit_softcapping"], logits_softcap=capped["final_logit_softcapping"],
                   local_rope=local_rope, local_layers=local if local_rope else ())
