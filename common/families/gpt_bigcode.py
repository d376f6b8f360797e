"""GPTBigCode: SantaCoder, StarCoder. Learned absolute positions, LayerNorm, multi-query (or
multi-head) attention with one fused c_attn projection, a plain gelu MLP, biases everywhere."""

from __future__ import annotations

from ..model_config import ACTIVATIONS, ModelConfig, ModelConfigError

MODEL_TYPE = "gpt_bigcode"
PREFIX = "transformer."
TOP = {"embed": "wte", "positions": "wpe", "final_norm": "ln_f"}
LAYER = "h.{i}."
LAYER_ROLES = {"norm1": "ln_1", "qkv": "attn.c_attn", "out": "attn.c_proj", "norm2": "ln_2", "up": "mlp.c_fc",
               "down": "mlp.c_proj"}


def config(raw: dict) -> ModelConfig:
    if raw.get("add_cross_attention"):
        raise ModelConfigError("GPTBigCode with cross-attention is not supported")
    n_embd, n_head = int(raw["n_embd"]), int(raw["n_head"])
    if n_embd % n_head:
        raise ModelConfigError(f"n_embd ({n_embd}) is not divisible by n_head ({n_head})")
    activation = raw.get("activation_function", "gelu_pytorch_tanh")
    if activation not in ACTIVATIONS:
        raise ModelConfigError(f"unsupported activation_function {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    n_layer = int(raw["n_layer"])
    return ModelConfig(
        model_type=MODEL_TYPE, vocab_size=int(raw["vocab_size"]), n_positions=int(raw["n_positions"]), n_embd=n_embd,
        n_layer=n_layer, n_head=n_head, kv_heads=1 if raw.get("multi_query", True) else n_head,
        head_dim=n_embd // n_head, n_inner=int(raw.get("n_inner") or 4 * n_embd), norm="layer",
        layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)), mlp="plain", activation=ACTIVATIONS[activation],
        qkv_bias=True, out_bias=True, mlp_bias=True, qk_norm=False, rope=None, windows=(0,) * n_layer,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
    )


def regroup_qkv(t, cfg: ModelConfig):
    """A multi-head c_attn interleaves [q_h, k_h, v_h] per head; regroup its rows as q | k | v,
    once at load, so that one split serves multi-query and multi-head alike."""
    if cfg.multi_query:
        return t
    h, d = cfg.n_head, cfg.head_dim
    rest = t.shape[1:]
    return t.reshape(h, 3, d, *rest).transpose(0, 1).reshape(3 * h * d, *rest).contiguous()
