"""Llama: CodeLlama, DeepSeek-Coder. Rotary positions, RMSNorm, grouped-query attention, a SwiGLU
MLP; optional biases (`attention_bias`, `mlp_bias`). The layout every Llama-shaped family shares
(Mistral, Qwen2, Qwen3) is read here."""

from __future__ import annotations

from ..model_config import ACTIVATIONS, ModelConfig, ModelConfigError, Rope

MODEL_TYPE = "llama"
PREFIX = "model."
TOP = {"embed": "embed_tokens", "positions": None, "final_norm": "norm"}
LAYER = "layers.{i}."
LAYER_ROLES = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm", "out": "self_attn.o_proj",
               "norm2": "post_attention_layernorm", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
               "down": "mlp.down_proj"}

# transformers' LlamaConfig defaults, for fields a config.json leaves out
DEFAULTS = {"vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def config(raw: dict) -> ModelConfig:
    bias = _field(raw, DEFAULTS, "attention_bias")
    return llama_shaped(raw, DEFAULTS, MODEL_TYPE, qkv_bias=bias, out_bias=bias,
                        mlp_bias=_field(raw, DEFAULTS, "mlp_bias"))


def llama_shaped(raw: dict, defaults: dict, model_type: str, *, qkv_bias: bool, out_bias: bool, mlp_bias: bool = False,
                 qk_norm: bool = False, windows: tuple[int, ...] | None = None, norm: str = "rms", mlp: str = "gated",
                 eps_field: str = "rms_norm_eps", partial_rotary: float | None = None, head_dim: int | None = None,
                 rope: dict | None = None) -> ModelConfig:
    """The config of a Llama-shaped family; what differs between them comes as arguments.
    partial_rotary: the default share of each head that rotary embeddings turn, for a family whose
    heads may turn in part (`partial_rotary_factor`); None where whole heads turn.
    head_dim: the head width of a config without the field (transformers' default for the family; a
    `head_dim` written as null means hidden_size / heads). rope: the rotary parameters of a config
    that names none."""
    if head_dim is not None:
        raw = {"head_dim": head_dim} | raw
    if rope is not None and not (raw.get("rope_parameters") or raw.get("rope_scaling")):
        raw = raw | {"rope_parameters": rope}
    get = lambda name: _field(raw, defaults, name)  # noqa: E731
    hidden, heads, layers = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_hidden_layers"])
    head_dim = int(get("head_dim") or hidden // heads)
    activation = get("hidden_act")
    if activation not in ACTIVATIONS:
        raise ModelConfigError(f"unsupported hidden_act {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    rope = rope_of(raw, int(get("max_position_embeddings")), head_dim, partial_rotary)
    positions = int(get("max_position_embeddings"))
    if rope.rope_type == "dynamic":  # extends the model past the length it was trained at
        positions = int(positions * rope.factor)
    return ModelConfig(
        model_type=model_type, vocab_size=int(get("vocab_size")), n_positions=positions, n_embd=hidden,
        n_layer=layers, n_head=heads, kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim,
        n_inner=int(raw["intermediate_size"]), norm=norm, layer_norm_epsilon=float(get(eps_field)), mlp=mlp,
        activation=ACTIVATIONS[activation], qkv_bias=bool(qkv_bias), out_bias=bool(out_bias), mlp_bias=bool(mlp_bias),
        qk_norm=qk_norm, rope=rope, windows=windows or (0,) * layers,
        tie_word_embeddings=bool(get("tie_word_embeddings")),
    )


def _field(raw: dict, defaults: dict, name: str):
    """A config field, or transformers' default for it (transformers writes every field it has into
    config.json, but older and hand-made configs leave some out)."""
    value = raw.get(name)
    return defaults.get(name) if value is None else value


def rope_of(raw: dict, max_positions: int, head_dim: int, partial: float | None = None) -> Rope:
    """Rotary parameters from `rope_parameters` (configs written by transformers 5) or `rope_theta`
    and `rope_scaling` (earlier ones); both say the same. partial: as llama_shaped's partial_rotary."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ModelConfigError(f"unsupported rope_type {rope_type!r}: splitserve computes {', '.join(ROPE_TYPES)}")
    share = params.get("partial_rotary_factor") or raw.get("partial_rotary_factor")
    if partial is None and float(share or 1.0) != 1.0:
        raise ModelConfigError(f"partial rotary embeddings (partial_rotary_factor {share}) are not supported for "
                               f"{raw.get('model_type')!r}")
    dim = int(head_dim * float(share or partial or 1.0))  # as transformers rounds it
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise ModelConfigError(f"partial_rotary_factor {share} turns {dim} of each head's {head_dim} values: "
                               "a positive even number up to the head is needed")
    # transformers' dynamic scaling always counts from max_position_embeddings
    original = max_positions if rope_type == "dynamic" else int(
        params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings") or max_positions)
    optional = {key: params[key] for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                                             "attention_factor", "mscale", "mscale_all_dim", "truncate")
                if params.get(key) is not None}
    if params.get("llama_4_scaling_beta"):
        optional["llama4_scaling_beta"] = float(params["llama_4_scaling_beta"])
    factor = float(params.get("factor") or 1.0)
    if rope_type == "longrope":
        optional |= _longrope_factors(params, dim)
        # the extension's factor, which scales cos and sin, from the lengths where the config names none
        factor = float(params.get("factor") or max_positions / original)
    return Rope(rope_type, theta, factor, original, dim=0 if dim == head_dim else dim, **optional)


def _longrope_factors(params: dict, dim: int) -> dict:
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = params.get(key)
        if not isinstance(value, list) or len(value) != dim // 2 or \
                not all(isinstance(x, (int, float)) and x > 0 for x in value):
            raise ModelConfigError(f"longrope's {key} must list {dim // 2} positive numbers, one per rotary frequency")
        factors[key] = tuple(float(x) for x in value)
    return factors


def sliding_windows(raw: dict, defaults: dict, layers: int) -> tuple[int, ...]:
    """Qwen2 and Qwen3: `layer_types` says which layers attend a sliding window; configs without it
    slide from layer `max_window_layers` on, when `use_sliding_window` is set (transformers' rule)."""
    window = _field(raw, defaults, "sliding_window") if _field(raw, defaults, "use_sliding_window") else None
    types = raw.get("layer_types") or [
        "sliding_attention" if window is not None and i >= int(_field(raw, defaults, "max_window_layers"))
        else "full_attention" for i in range(layers)]
    return windows_of(types, int(window or 0))


def every_nth_full(layers: int, n: int) -> list[str]:
    """Layer types with every n-th layer (counting from 1) attending every key and the others a
    window: Gemma 2's and 3's default, and gpt-oss's."""
    return ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]


def windows_of(types: list[str], window: int) -> tuple[int, ...]:
    """Each layer's window from its `layer_types` entry: `window` for a sliding one, 0 (every key) else."""
    return tuple(window if t == "sliding_attention" else 0 for t in types)
