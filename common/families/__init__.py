"""The supported model families, one module per family, chosen by config.json's `model_type`.

A family module says how its checkpoints are laid out and read: `config(raw)` reads config.json
into a ModelConfig (with transformers' defaults for the fields a config leaves out), and name
tables map the roles of the shared forward (common/model.py) to the checkpoint's tensor names.
Everything else (shapes, fusing q/k/v and gate/up, the forward itself) is shared.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

from ..model_config import ModelConfig, ModelConfigError
from . import (cwm, deepseek_v2, deepseek_v3, gemma, gemma2, gemma3, gemma3_text, glm, glm4, glm4_moe,
               glm4_moe_lite, gpt_bigcode, gpt_oss, granite, iquestcoder, llama, mellum, ministral3, mistral, mistral3,
               mixtral, phi, phi3, qwen2, qwen3, qwen3_moe, seed_oss, stablelm, starcoder2)

FAMILIES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (cwm, deepseek_v2, deepseek_v3, gemma, gemma2, gemma3,
                                                             gemma3_text, glm, glm4, glm4_moe, glm4_moe_lite,
                                                             gpt_bigcode, gpt_oss, granite, iquestcoder, llama, mellum,
                                                             ministral3, mistral, mistral3, mixtral, phi, phi3, qwen2,
                                                             qwen3, qwen3_moe, seed_oss, stablelm, starcoder2)}
# Each family module has:
#   MODEL_TYPE, config(raw: dict) -> ModelConfig
#   PREFIX: what the base model's tensor names begin with in a checkpoint ("model.", "transformer."),
#   or a tuple of the names it may begin with
#   TOP: {"embed", "positions", "final_norm"} -> name (positions: None without learned positions)
#   LAYER: the name of layer i's tensors, "layers.{i}.", and LAYER_ROLES: role -> name after it, roles
#   among norm1, qkv (fused) or q/k/v, q_norm, k_norm, out, norm2, up (the plain MLP's first
#   projection) or gate/up or gate_up (fused, rows gate | up), down, and attn_out_norm and
#   mlp_out_norm where cfg.sandwich_norms; with latent attention (cfg.latent) q or q_a/q_a_norm/q_b,
#   and kv_a, kv_a_norm, kv_b in place of q/k/v; sinks (a tensor's whole name) where cfg.attn_sinks
# and may have regroup_qkv(weight_or_bias, cfg) for a fused qkv whose rows are not q | k | v, and
# EXPERTS: a mixture-of-experts layer's tensor names after LAYER, the router's ("router"), expert
# j's ("gate", "up", "down" with {j}) or every expert's stacked ("stacked_gate_up" [X, E, 2*I] with
# gate and up columns interleaved, "stacked_down" [X, I, E]: whole names, as gpt-oss stores them)
# and the shared experts' ("shared_gate", "shared_up", "shared_down") where cfg.experts.shared, used
# in place of the MLP roles where cfg.experts says.

MLP_ROLES = ("up", "gate", "gate_up", "down")
# the router's per-expert bias for the choice (cfg.experts.router_bias), beside its weight
ROUTER_BIAS = "e_score_correction_bias"


def family_of(model_type) -> ModuleType:
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelConfigError(f"unsupported model_type {model_type!r}: splitserve runs {', '.join(FAMILIES)} "
                               "checkpoints")
    return family


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward needs: its name in the checkpoint (less PREFIX) -> shape."""
    family = family_of(cfg.model_type)
    e, v = cfg.n_embd, cfg.vocab_size
    shapes = {_name(family.TOP["embed"], "weight"): (v, e)}
    if cfg.rope is None:
        shapes[_name(family.TOP["positions"], "weight")] = (cfg.n_positions, e)
    for i in range(cfg.n_layer):
        prefix = family.LAYER.format(i=i)
        roles = _layer_shapes(cfg, family.LAYER_ROLES)
        if sparse(cfg, i):
            roles = {role: shape for role, shape in roles.items() if role not in MLP_ROLES}
            shapes |= _expert_shapes(cfg, prefix, family.EXPERTS)
        for role in (role for role in family.LAYER_ROLES if role in roles):  # in the checkpoint's order
            out_dim, in_dim, bias = roles[role]
            name = prefix + family.LAYER_ROLES[role]
            shapes[_name(name, "weight")] = (out_dim, in_dim) if in_dim else (out_dim,)
            if bias:
                shapes[_name(name, "bias")] = (out_dim,)
        if cfg.attn_sinks:
            shapes[prefix + family.LAYER_ROLES["sinks"]] = (cfg.n_head,)
    shapes |= _norm_shapes(cfg, family.TOP["final_norm"])
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, e)
    if cfg.lm_head_bias:
        shapes["lm_head.bias"] = (v,)
    return shapes


def _layer_shapes(cfg: ModelConfig, roles: dict[str, str]) -> dict[str, tuple[int, int, bool]]:
    """role -> (output width, input width or 0 for a norm's vector, has a bias)."""
    e, i, q, kv, d = cfg.n_embd, cfg.n_inner, cfg.q_dim, cfg.kv_dim, cfg.head_dim
    layer_norm = cfg.norm == "layer"
    shapes = {"norm1": (e, 0, layer_norm), "out": (e, q, cfg.out_bias), "norm2": (e, 0, layer_norm),
              "up": (i, e, cfg.mlp_bias), "down": (e, i, cfg.mlp_bias)}
    if cfg.latent is not None:
        shapes |= _latent_shapes(cfg)
    elif "qkv" in roles:
        shapes["qkv"] = (q + 2 * kv, e, cfg.qkv_bias)
    else:
        shapes |= {"q": (q, e, cfg.qkv_bias), "k": (kv, e, cfg.qkv_bias), "v": (kv, e, cfg.qkv_bias)}
    if cfg.mlp == "gated":
        shapes["gate"] = (i, e, cfg.mlp_bias)
        shapes["gate_up"] = (2 * i, e, cfg.mlp_bias)
    if cfg.qk_norm:
        shapes |= {"q_norm": (d, 0, False), "k_norm": (d, 0, False)}
    if cfg.sandwich_norms:
        shapes |= {"attn_out_norm": (e, 0, layer_norm), "mlp_out_norm": (e, 0, layer_norm)}
    return shapes


def _latent_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    lat, e, h = cfg.latent, cfg.n_embd, cfg.n_head
    q = h * (lat.nope_dim + lat.rope_dim)
    shapes = {"kv_a": (lat.kv_rank + lat.rope_dim, e, False), "kv_a_norm": (lat.kv_rank, 0, False),
              "kv_b": (h * (lat.nope_dim + lat.v_dim), lat.kv_rank, False), "out": (e, h * lat.v_dim, cfg.out_bias)}
    if lat.q_rank:
        return shapes | {"q_a": (lat.q_rank, e, False), "q_a_norm": (lat.q_rank, 0, False),
                         "q_b": (q, lat.q_rank, False)}
    return shapes | {"q": (q, e, False)}


def sparse(cfg: ModelConfig, i: int) -> bool:
    """Whether layer i's MLP is a mixture of experts."""
    return cfg.experts is not None and cfg.experts.layers[i]


def _expert_shapes(cfg: ModelConfig, prefix: str, names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    x, e, i = cfg.experts.count, cfg.n_embd, cfg.experts.inner
    shapes = {_name(prefix + names["router"], "weight"): (x, e)}
    if cfg.experts.router_bias:
        shapes[_name(prefix + names["router"], ROUTER_BIAS)] = (x,)
    if cfg.experts.biased:
        shapes[_name(prefix + names["router"], "bias")] = (x,)
    if "stacked_gate_up" in names:
        up, down = prefix + names["stacked_gate_up"], prefix + names["stacked_down"]
        if cfg.experts.mxfp4:  # [X, out, in] in blocks of 32 values, 16 bytes, and a scale each
            shapes |= {f"{up}_blocks": (x, 2 * i, e // 32, 16), f"{up}_scales": (x, 2 * i, e // 32),
                       f"{down}_blocks": (x, e, i // 32, 16), f"{down}_scales": (x, e, i // 32)}
        else:
            shapes |= {up: (x, e, 2 * i), down: (x, i, e)}
        if cfg.experts.biased:
            shapes |= {f"{up}_bias": (x, 2 * i), f"{down}_bias": (x, e)}
        return shapes
    for j in range(x):
        for role, shape in (("gate", (i, e)), ("up", (i, e)), ("down", (e, i))):
            shapes[_name(prefix + names[role].format(j=j), "weight")] = shape
    if s := cfg.experts.shared:
        for role, shape in (("shared_gate", (s, e)), ("shared_up", (s, e)), ("shared_down", (e, s))):
            shapes[_name(prefix + names[role], "weight")] = shape
    return shapes


def _norm_shapes(cfg: ModelConfig, name: str) -> dict[str, tuple[int, ...]]:
    shapes = {_name(name, "weight"): (cfg.n_embd,)}
    if cfg.norm == "layer":
        shapes[_name(name, "bias")] = (cfg.n_embd,)
    return shapes


def _name(base: str, kind: str) -> str:
    return f"{base}.{kind}"


Get = Callable[[str], object]  # canonical name -> tensor


def layer_tensors(get: Get, cfg: ModelConfig, i: int) -> dict:
    """Layer i's tensors by role, as the checkpoint stores them ([out, in]); q/k/v fused into qkv
    (rows q | k | v) and gate/up into up (rows gate | up). Missing biases are None. A mixture of
    experts has a router [X, E] and its experts stacked: experts_up [X, 2*I, E] (rows gate | up)
    and experts_down [X, E, I], with router_b [X], experts_up_b [X, 2*I] and experts_down_b [X, E]
    where cfg.experts.biased; up and down only for shared experts. Latent attention: see _latent.
    sinks [H] where cfg.attn_sinks."""
    import torch  # the gateway reads configs through this package, without torch

    family = family_of(cfg.model_type)
    prefix, roles = family.LAYER.format(i=i), family.LAYER_ROLES

    def tensor(role: str, kind: str = "weight"):
        name = _name(prefix + roles[role], kind)
        return get(name) if kind == "weight" or _has_bias(cfg, role) else None

    def fused(parts: tuple[str, ...], kind: str):
        pieces = [tensor(role, kind) for role in parts]
        return None if pieces[0] is None else torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    qkv_parts = ("qkv",) if "qkv" in roles else ("q", "k", "v")
    up_parts = ("gate_up",) if "gate_up" in roles else ("gate", "up") if cfg.mlp == "gated" else ("up",)
    regroup = getattr(family, "regroup_qkv", lambda t, cfg: t)
    mlp = _experts(get, cfg, prefix, family.EXPERTS) if sparse(cfg, i) else {
        "up": (fused(up_parts, "weight"), fused(up_parts, "bias")),
        "down": (tensor("down"), tensor("down", "bias")),
    }
    if cfg.latent is not None:
        attention = _latent(tensor, cfg)
    else:
        qkv = [fused(qkv_parts, kind) for kind in ("weight", "bias")]
        qkv = [t if t is None else regroup(t, cfg) for t in qkv]
        if cfg.rope is not None and cfg.rope.interleaved:  # each q and k head's rotary rows into halves
            d = cfg.head_dim
            starts = [h * d for h in range(cfg.n_head)] + [cfg.q_dim + h * d for h in range(cfg.kv_heads)]
            qkv = [t if t is None else _rotary_halves(t, starts, cfg.rope_dim) for t in qkv]
        attention = {"qkv": tuple(qkv)}
    if cfg.sandwich_norms:
        attention |= {role: (tensor(role), tensor(role, "bias")) for role in ("attn_out_norm", "mlp_out_norm")}
    return mlp | attention | {
        "norm1": (tensor("norm1"), tensor("norm1", "bias")),
        "sinks": get(prefix + roles["sinks"]) if cfg.attn_sinks else None,
        "q_norm": tensor("q_norm") if cfg.qk_norm else None,
        "k_norm": tensor("k_norm") if cfg.qk_norm else None,
        "out": (tensor("out"), tensor("out", "bias")),
        "norm2": (None, None) if cfg.parallel_residual else (tensor("norm2"), tensor("norm2", "bias")),
    }


def _latent(tensor: Callable[..., object], cfg: ModelConfig) -> dict:
    """Latent attention's tensors: qkv [Qin + R + P, E], rows the queries' projection [H*(Dn+P)]
    (or their compression [q_rank]) | the compressed K/V [R] | the rotary key [P]; q_up
    [H*(Dn+P), q_rank] and q_down_norm [q_rank] where queries are compressed, else None; kv_norm
    [R]; kv_up [H*(Dn+Dv), R]. Where the rotary pairs are interleaved (DeepSeek's), the rotary rows
    are put in halves order (_rotary_halves)."""
    import torch

    lat = cfg.latent
    p, per_head = lat.rope_dim, lat.nope_dim + lat.rope_dim
    halves = _rotary_halves if cfg.rope.interleaved else lambda w, starts, p: w  # noqa: E731
    starts = [h * per_head + lat.nope_dim for h in range(cfg.n_head)]  # each head's rotary rows
    q = halves(tensor("q_b") if lat.q_rank else tensor("q"), starts, p)
    kv_a = halves(tensor("kv_a"), [lat.kv_rank], p)
    compressed = bool(lat.q_rank)
    return {"qkv": (torch.cat([tensor("q_a") if compressed else q, kv_a]), None), "q_up": q if compressed else None,
            "q_down_norm": tensor("q_a_norm") if compressed else None, "kv_norm": tensor("kv_a_norm"),
            "kv_up": tensor("kv_b")}


def _rotary_halves(w, starts: list[int], p: int):
    """w's rows (a weight's or a bias's) with each rotary block, P rows from each of `starts`, turned
    from interleaved pairs (x0, x1), (x2, x3)... into the halves the shared forward pairs (even
    ones first). Queries and keys reordered alike, their products are unchanged."""
    import torch

    halves = _evens_then_odds(p)  # [P]
    rows = torch.arange(w.shape[0])
    for start in starts:
        rows[start : start + p] = start + halves
    return w[rows]


def _evens_then_odds(n: int):
    """[n]: 0, 2, 4, ... then 1, 3, 5, ...: the order that puts pairs interleaved in n rows into halves."""
    import torch

    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])


def _experts(get: Get, cfg: ModelConfig, prefix: str, names: dict[str, str]) -> dict:
    """A sparse layer's router and experts, each expert's tensors copied into the stacks one by one
    (with a `get` that hands each tensor over, the checkpoint's copies go as the stacks fill)."""
    import torch

    x, i = cfg.experts.count, cfg.experts.inner
    router = get(_name(prefix + names["router"], "weight"))
    if "stacked_gate_up" in names:
        stacked = _stacked_experts(get, cfg, prefix + names["stacked_gate_up"], prefix + names["stacked_down"],
                                   router.dtype)
    else:
        up = router.new_empty(x, 2 * i, cfg.n_embd)
        down = router.new_empty(x, cfg.n_embd, i)
        for j in range(x):
            name = lambda role: _name(prefix + names[role].format(j=j), "weight")  # noqa: E731
            up[j, :i], up[j, i:], down[j] = get(name("gate")), get(name("up")), get(name("down"))
        stacked = {"experts_up": up, "experts_down": down}
    stacked["router"] = router
    if cfg.experts.biased:
        stacked["router_b"] = get(_name(prefix + names["router"], "bias"))
    if cfg.experts.router_bias:
        stacked["router_bias"] = get(_name(prefix + names["router"], ROUTER_BIAS))
    if not cfg.experts.shared:
        return stacked
    shared = lambda role: get(_name(prefix + names[role], "weight"))  # noqa: E731
    return stacked | {"up": (torch.cat([shared("shared_gate"), shared("shared_up")]), None),
                      "down": (shared("shared_down"), None)}


def _stacked_experts(get: Get, cfg: ModelConfig, up_name: str, down_name: str, dtype) -> dict:
    """Experts stored stacked, [X, in, out] (or MXFP4's [X, out, in] in blocks), gate and up
    interleaved (gpt-oss), as every family's stacks are laid out: [X, out, in] contiguous, rows
    gate | up; MXFP4 dequantized into `dtype`, the serving one."""
    from ..mxfp4 import dequantize

    def out_in(name: str):  # [X, out, in]
        if cfg.experts.mxfp4:
            return dequantize(get(f"{name}_blocks"), get(f"{name}_scales"), dtype)
        return get(name).transpose(1, 2)

    halves = _evens_then_odds(2 * cfg.experts.inner)  # gate rows, then up
    stacked = {"experts_up": out_in(up_name)[:, halves].contiguous(), "experts_down": out_in(down_name).contiguous()}
    if cfg.experts.biased:
        stacked |= {"experts_up_b": get(f"{up_name}_bias")[:, halves], "experts_down_b": get(f"{down_name}_bias")}
    return stacked


def _has_bias(cfg: ModelConfig, role: str) -> bool:
    if role in ("norm1", "norm2", "attn_out_norm", "mlp_out_norm"):
        return cfg.norm == "layer"
    if role in ("qkv", "q", "k", "v"):
        return cfg.qkv_bias
    if role == "out":
        return cfg.out_bias
    return role in ("gate", "up", "gate_up", "down") and cfg.mlp_bias


def top_tensors(get: Get, cfg: ModelConfig) -> dict:
    """The embeddings, the final norm (weight, bias or None) and the LM head [V, E] (the embedding
    when tied) and its bias or None."""
    top = family_of(cfg.model_type).TOP
    embed = get(_name(top["embed"], "weight"))
    final = top["final_norm"]
    return {
        "embed": embed,
        "positions": get(_name(top["positions"], "weight")) if cfg.rope is None else None,
        "final_norm": (get(_name(final, "weight")), get(_name(final, "bias")) if cfg.norm == "layer" else None),
        "lm_head": embed if cfg.tie_word_embeddings else get("lm_head.weight"),
        "lm_head_bias": get("lm_head.bias") if cfg.lm_head_bias else None,
    }
