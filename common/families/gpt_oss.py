"""gpt-oss: OpenAI's gpt-oss-20b and -120b. Llama's attention with biases, a learned sink logit per
query head (`self_attn.sinks`), a sliding window on every other layer from the first
(`layer_types`) and YaRN; every MLP a mixture of experts: a biased router whose chosen logits are
softmaxed, experts with biases and a clamped SwiGLU (`swiglu_limit`, `swiglu_alpha`), their
tensors stacked in the checkpoint (gate_up [X, E, 2*I], columns gate and up interleaved). The
released checkpoints hold the experts in MXFP4 (`quantization_config`), which loading dequantizes
into the serving dtype (common/mxfp4.py); every other tensor is stored as it is."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import Experts, ModelConfig
from .llama import LAYER, PREFIX, TOP, _field, every_nth_full, llama_shaped, windows_of

__all__ = ["EXPERTS", "LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "gpt_oss"
QUANTIZED = ("mxfp4",)  # the quant_method of a quantization_config this family reads
LAYER_ROLES = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "out": "self_attn.o_proj", "sinks": "self_attn.sinks", "norm2": "post_attention_layernorm"}
# the router (weight and bias) and the stacked experts, whose biases are named `{name}_bias`
EXPERTS = {"router": "mlp.router", "stacked_gate_up": "mlp.experts.gate_up_proj",
           "stacked_down": "mlp.experts.down_proj"}
# transformers' GptOssConfig defaults, the rotary ones for a config that names none
DEFAULTS = {"vocab_size": 201088, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": True, "sliding_window": 128, "num_local_experts": 128,
            "num_experts_per_tok": 4, "swiglu_limit": 7.0, "swiglu_alpha": 1.702}
ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096}


def config(raw: dict) -> ModelConfig:
    get = lambda name: _field(raw, DEFAULTS, name)  # noqa: E731
    raw = {"rope_theta": ROPE["rope_theta"]} | raw  # the class's base where rope_parameters names none
    layers, window = int(raw["num_hidden_layers"]), int(get("sliding_window") or 0)
    types = raw.get("layer_types") or every_nth_full(layers, 2)
    bias = get("attention_bias")
    cfg = llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=bias, out_bias=bias, windows=windows_of(types, window),
                       head_dim=64, rope=ROPE)
    experts = Experts(int(raw.get("num_experts") or get("num_local_experts")), int(get("num_experts_per_tok")),
                      cfg.n_inner, True, (True,) * layers, biased=True, clamp=float(get("swiglu_limit")),
                      alpha=float(get("swiglu_alpha")),
                      mxfp4=(raw.get("quantization_config") or {}).get("quant_method") == "mxfp4")
    return replace(cfg, experts=experts.check(cfg.n_embd), attn_sinks=True)
