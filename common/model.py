"""Every family's forward pass, as plain functions over one weights structure.

No `nn.Module` on the call path: module `__call__` hooks and attribute lookups cost more than the
matrix products of a small model's decode step. A family (common/families/) decides which blocks a
layer has: LayerNorm or RMSNorm, learned positions or rotary ones, multi-query, grouped-query or
multi-head attention with an optional sliding window, q/k norms, a plain or a gated MLP, biases.
Shapes: T packed prompt tokens, B decode rows, E = n_embd, H query heads, KVH key/value heads,
G = H / KVH, D head dim, Q = H * D, KV = KVH * D, I the MLP width, S slots, L slot length,
V vocabulary, P the rotary width (cfg.rope_dim: D, or the part partial rotary embeddings turn),
X experts (k of them per token) of width I. Latent attention (DeepSeek-V2): R the
compressed K/V width, P the rotary part's, W = R + P the cached vector's, Dn and Dv the per-head key
(without positions) and value widths; its cache is one head (KVH = 1) of D = W / 2 in each plane,
the vector's first half as "keys", its second as "values".
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from .attention import PrefillAttention, capped, packing, sink_softmax
from .blocks import ACTIVATION_FNS, halves, norm, query_scales, rope_tables, rotate, rotate_halves
from .families import layer_tensors, top_tensors
from .model_config import ModelConfig


class Layer(NamedTuple):
    """Linear weights are held transposed ([in, out] views of the checkpoint's [out, in]), so
    `torch.addmm(b, x, w_t)` is F.linear(x, w, b) without the per-call transpose and wrapper.
    A bias or norm a family does not have is None."""

    norm1_w: torch.Tensor
    norm1_b: torch.Tensor | None  # LayerNorm's; RMSNorm has none
    qkv_wt: torch.Tensor  # [E, Q + 2*KV], columns q heads | k heads | v heads
    qkv_b: torch.Tensor | None
    q_norm_w: torch.Tensor | None  # [D], RMSNorm over each query head (Qwen3)
    k_norm_w: torch.Tensor | None
    out_wt: torch.Tensor  # [Q, E]; latent attention [H*Dv, E]
    out_b: torch.Tensor | None
    norm2_w: torch.Tensor | None  # None with parallel residual branches (the MLP reads norm1's output)
    norm2_b: torch.Tensor | None
    up_wt: torch.Tensor | None  # [E, I], or [E, 2*I] with columns gate | up for a gated MLP; None: experts
    up_b: torch.Tensor | None
    down_wt: torch.Tensor | None  # [I, E]
    down_b: torch.Tensor | None
    window: int  # attend only the last `window` keys; 0: every key
    local_rope: bool  # its rotary embeddings are cfg.local_rope's (ModelWeights.local_cos)
    # a mixture of experts in place of the MLP (cfg.experts), else None
    router_wt: torch.Tensor | None = None  # [E, X]
    router_bias: torch.Tensor | None = None  # [X], added to the scores for the choice (cfg.experts.router_bias)
    experts_up: torch.Tensor | None = None  # [X, E, 2*I], each expert's columns gate | up
    experts_down: torch.Tensor | None = None  # [X, I, E]
    # the router's and the experts' biases where cfg.experts.biased: [X], [X, 2*I], [X, E]
    router_b: torch.Tensor | None = None
    experts_up_b: torch.Tensor | None = None
    experts_down_b: torch.Tensor | None = None
    sinks: torch.Tensor | None = None  # [KVH, G, 1] fp32: each query head's sink logit (cfg.attn_sinks)
    # latent attention (cfg.latent), else None; qkv_wt is then [E, Qin + R + P], columns the queries'
    # projection [H*(Dn+P)] (or their compression [q_rank]) | the compressed K/V | the rotary key
    q_up_wt: torch.Tensor | None = None  # [q_rank, H*(Dn+P)]: the queries from their compression
    q_down_norm_w: torch.Tensor | None = None  # [q_rank]
    kv_norm_w: torch.Tensor | None = None  # [R]
    # each head's key and value up-projections, views of one tensor: [R, H*(Dn+Dv)] as prefill expands
    # the cached vectors with them, and per head as decode folds them into its queries and outputs
    # ([H, Dn, R], [H, R, Dv])
    kv_up_wt: torch.Tensor | None = None
    k_up: torch.Tensor | None = None
    v_up: torch.Tensor | None = None
    # sandwich norms (cfg.sandwich_norms), else None: the attention's and the MLP's outputs normalized
    # before they join the residual stream
    attn_out_norm_w: torch.Tensor | None = None
    attn_out_norm_b: torch.Tensor | None = None
    mlp_out_norm_w: torch.Tensor | None = None
    mlp_out_norm_b: torch.Tensor | None = None


class ModelWeights(NamedTuple):
    cfg: ModelConfig
    wte: torch.Tensor  # [V, E]
    wpe: torch.Tensor | None  # [n_positions, E], learned positions (GPTBigCode)
    layers: tuple[Layer, ...]
    normf_w: torch.Tensor
    normf_b: torch.Tensor | None
    lm_head_t: torch.Tensor  # [E, V]; a view of wte when tied
    lm_head_b: torch.Tensor | None  # [V]
    act: Callable[[torch.Tensor], torch.Tensor]
    upcast_softmax: bool  # half precision scores are softmaxed in fp32, as transformers does
    rope_cos: torch.Tensor | None  # [n_positions, P / 2], rotary embeddings (LongRoPE: see rope_tables)
    rope_sin: torch.Tensor | None
    local_cos: torch.Tensor | None  # the same of cfg.local_rope, for the layers with local_rope
    local_sin: torch.Tensor | None
    q_scales: torch.Tensor | None  # [n_positions]: each position's query multiplier (Llama 4's temperature)
    # the embeddings' multiplier as the weights' dtype rounds it (transformers multiplies by a
    # tensor of that dtype); None: 1
    embed_scale: float | None = None


def prepare_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> ModelWeights:
    """Turn a checkpoint's tensors (names less the family's prefix) into what the forward uses:
    q/k/v and gate/up fused, experts stacked, linear weights transposed, rotary tables made, and
    Granite's residual and logits multipliers folded into the weights that make those outputs (the
    forward then has no multiply of its own for them). Takes the tensors out of `weights` as it
    goes, so that each one is freed once its fused copy is made: loading never holds the model
    twice."""
    get = weights.pop
    layers = []
    for i in range(cfg.n_layer):
        t = _residual_scaled(layer_tensors(get, cfg, i), cfg.residual_scale)
        up, down = t.get("up", (None, None)), t.get("down", (None, None))
        attn_out_norm, mlp_out_norm = t.get("attn_out_norm", (None, None)), t.get("mlp_out_norm", (None, None))
        n1, n2, qn, kn = (_offset(n, cfg) for n in (t["norm1"][0], t["norm2"][0], t["q_norm"], t["k_norm"]))
        layers.append(Layer(
            n1, t["norm1"][1], t["qkv"][0].t(), t["qkv"][1], qn, kn, t["out"][0].t(), t["out"][1],
            n2, t["norm2"][1], _t(up[0]), up[1], _t(down[0]), down[1], cfg.windows[i],
            cfg.local_rope is not None and cfg.local_layers[i],
            router_wt=_router(t.get("router"), cfg), router_bias=_float(t.get("router_bias")),
            experts_up=t["experts_up"].transpose(1, 2) if "experts_up" in t else None,
            experts_down=t["experts_down"].transpose(1, 2) if "experts_down" in t else None,
            router_b=t.get("router_b"), experts_up_b=t.get("experts_up_b"), experts_down_b=t.get("experts_down_b"),
            sinks=None if t["sinks"] is None else t["sinks"].float().view(cfg.kv_heads, -1, 1),
            attn_out_norm_w=_offset(attn_out_norm[0], cfg), attn_out_norm_b=attn_out_norm[1],
            mlp_out_norm_w=_offset(mlp_out_norm[0], cfg), mlp_out_norm_b=mlp_out_norm[1],
            **_latent_weights(t, cfg),
        ))
    if cfg.experts is not None:
        check_grouped_mm(layers[0].norm1_w.device, layers[0].norm1_w.dtype)
    top = top_tensors(get, cfg)
    wte = top["embed"]
    tables = rope_tables(cfg, wte.dtype, wte.device)
    local = rope_tables(cfg, wte.dtype, wte.device, cfg.local_rope) if cfg.local_rope else (None, None)
    scale = None if cfg.embed_scale == 1 else torch.tensor(cfg.embed_scale, dtype=wte.dtype).item()
    # logits / s: the final norm's output (its weight and bias) / s, whether or not the head is tied
    normf_w, normf_b, head_b = _offset(top["final_norm"][0], cfg), top["final_norm"][1], top["lm_head_bias"]
    if cfg.logits_scale != 1:  # the head's bias, where it has one, likewise
        normf_w, normf_b, head_b = (None if t is None else t / cfg.logits_scale for t in (normf_w, normf_b, head_b))
    return ModelWeights(
        cfg=cfg, wte=wte, wpe=top["positions"], layers=tuple(layers), normf_w=normf_w, normf_b=normf_b,
        lm_head_t=top["lm_head"].t(), lm_head_b=head_b, act=ACTIVATION_FNS[cfg.activation],
        upcast_softmax=wte.dtype != torch.float32,
        rope_cos=tables[0] if tables else None, rope_sin=tables[1] if tables else None, local_cos=local[0],
        local_sin=local[1], q_scales=query_scales(cfg, wte.dtype, wte.device), embed_scale=scale,
    )


def _residual_scaled(t: dict, scale: float) -> dict:
    """A layer's tensors with the projections whose outputs join the residual stream (attention
    output, MLP or experts down, biases included) times `scale`."""
    if scale == 1:
        return t
    scaled = {role: (t[role][0] * scale, None if t[role][1] is None else t[role][1] * scale)
              for role in ("out", "down") if role in t}
    if "experts_down" in t:
        scaled["experts_down"] = t["experts_down"] * scale
    return t | scaled


def _latent_weights(t: dict, cfg: ModelConfig) -> dict:
    """A layer's latent-attention fields from its tensors (families.layer_tensors), if it has them."""
    if cfg.latent is None:
        return {}
    lat = cfg.latent
    kv_up = t["kv_up"].view(cfg.n_head, lat.nope_dim + lat.v_dim, lat.kv_rank)  # [H, Dn + Dv, R]
    return dict(q_up_wt=_t(t["q_up"]), q_down_norm_w=t["q_down_norm"], kv_norm_w=t["kv_norm"],
                kv_up_wt=t["kv_up"].t(), k_up=kv_up[:, : lat.nope_dim], v_up=kv_up[:, lat.nope_dim :].transpose(1, 2))


def _offset(norm: torch.Tensor | None, cfg: ModelConfig) -> torch.Tensor | None:
    """An RMSNorm's weight as torch.rms_norm multiplies by it: Gemma stores it less one."""
    return norm if norm is None or not cfg.norm_offset else norm + cfg.norm_offset


def _float(b: torch.Tensor | None) -> torch.Tensor | None:
    # the router's choice bias stays fp32, as transformers keeps it: the scores it shifts are fp32
    return None if b is None else b.float()


def _router(w: torch.Tensor | None, cfg: ModelConfig) -> torch.Tensor | None:
    """The router's weight, transposed; fp32 for a sigmoid router (DeepSeek-V3's), whose logits
    transformers computes in fp32 (a near tie between two experts then breaks as it does)."""
    if w is None:
        return None
    return w.t().float() if cfg.experts.sigmoid else w.t()


def _t(w: torch.Tensor | None) -> torch.Tensor | None:
    return None if w is None else w.t()


def check_grouped_mm(device: torch.device, dtype: torch.dtype) -> None:
    """Mixtures of experts run on torch._grouped_mm; say plainly where this PyTorch has none for
    the device and dtype (on CUDA it wants a recent GPU and bfloat16)."""
    x = torch.zeros(8, 8, device=device, dtype=dtype)
    w = torch.zeros(2, 8, 8, device=device, dtype=dtype).transpose(1, 2)  # laid out as experts_up is
    try:
        torch._grouped_mm(x, w, offs=torch.tensor([4, 8], device=device, dtype=torch.int32))
    except RuntimeError as e:
        raise RuntimeError(f"mixture-of-experts layers need torch._grouped_mm, which this PyTorch lacks for {dtype} "
                           f"on {device}: {e}") from None


def _at(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of rotary tables [n_positions, P/2] at positions [N]: [N, 1, P/2] each."""
    return cos[positions][:, None], sin[positions][:, None]


def joining(x: torch.Tensor, norm_w: torch.Tensor | None, norm_b: torch.Tensor | None, eps: float) -> torch.Tensor:
    """A sublayer's output as it joins the residual stream: normalized first where the family has
    sandwich norms (norm_w; else None)."""
    return x if norm_w is None else norm(x, norm_w, norm_b, eps)


def linear(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mm(x, wt, out=out) if b is None else torch.addmm(b, x, wt, out=out)


def mlp(w: ModelWeights, layer: Layer, x: torch.Tensor, up: torch.Tensor | None = None,
        inner: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, E] -> [N, E]; `up` [N, I or 2*I], `inner` [N, I] and `out` [N, E]: buffers to write.
    A mixture of experts with shared experts adds their MLP (up_wt, down_wt) to the routed one."""
    if layer.router_wt is not None:
        routed = experts(w, layer, x, out)
        return routed if layer.up_wt is None else routed.add_(_dense(w, layer, x))
    return _dense(w, layer, x, up, inner, out)


def _dense(w: ModelWeights, layer: Layer, x: torch.Tensor, up: torch.Tensor | None = None,
           inner: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    hidden = linear(x, layer.up_wt, layer.up_b, out=up)
    if w.cfg.mlp == "gated":
        n = layer.down_wt.shape[0]
        hidden = torch.mul(w.act(hidden[:, :n]), hidden[:, n:], out=inner)
    else:
        hidden = w.act(hidden)
    return linear(hidden, layer.down_wt, layer.down_b, out=out)


def experts(w: ModelWeights, layer: Layer, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A mixture of experts: x [N, E] -> [N, E], each row the sum of its k chosen experts' gated
    MLPs weighted by the router. The N*k (row, expert) pairs are sorted by expert, and each
    expert's run of rows goes through its weights in one grouped matrix product: no host sync and
    shapes fixed by N, so a decode step captures into a CUDA graph as a dense one does; no expert's
    weights are read for rows that did not choose it."""
    moe = w.cfg.experts
    n, k, inner = x.shape[0], moe.per_token, moe.inner
    logits = linear(x if x.dtype == layer.router_wt.dtype else x.float(), layer.router_wt, layer.router_b)  # [N, X]
    probs = torch.sigmoid(logits.float()) if moe.sigmoid else torch.softmax(logits, -1, dtype=torch.float32)
    if moe.groups is None and layer.router_bias is None:
        weights, chosen = torch.topk(probs, k)  # [N, k]
    else:  # chosen by the biased scores among each row's best groups, weighted by the scores
        choice = probs if layer.router_bias is None else probs + layer.router_bias
        if moe.groups is not None:
            groups, kept = moe.groups
            by_group = choice.view(n, groups, -1)
            score = by_group.amax(-1) if moe.group_score == "max" else by_group.topk(2).values.sum(-1)  # [N, groups]
            best = torch.topk(score, kept).indices  # [N, kept]
            in_best = torch.zeros(n, groups, dtype=torch.bool, device=x.device).scatter_(1, best, True)
            choice = choice.masked_fill(~in_best.repeat_interleave(moe.count // groups, 1), float("-inf"))
        chosen = torch.topk(choice, k).indices
        weights = probs.gather(1, chosen)
    if moe.norm_top:
        weights = weights / weights.sum(-1, keepdim=True)
    if moe.scale != 1.0:
        weights = weights * moe.scale
    by_expert, order = torch.sort(chosen.view(-1), stable=True)  # [N*k]
    # [X]: where each expert's run of pairs ends
    ends = torch.searchsorted(by_expert, torch.arange(moe.count, device=x.device), right=True).to(torch.int32)
    rows = torch.index_select(x, 0, order // k)  # [N*k, E]
    gate_up = torch._grouped_mm(rows, layer.experts_up, offs=ends)  # [N*k, 2*I]
    if layer.experts_up_b is not None:  # each pair's expert's bias
        gate_up += torch.index_select(layer.experts_up_b, 0, by_expert)
    if moe.clamp:  # gpt-oss's clamped SwiGLU
        gate, up = gate_up[:, :inner].clamp(max=moe.clamp), gate_up[:, inner:].clamp(-moe.clamp, moe.clamp)
        hidden = gate * torch.sigmoid(gate * moe.alpha) * (up + 1)
    else:
        hidden = w.act(gate_up[:, :inner]) * gate_up[:, inner:]  # [N*k, I]
    by_pair = torch._grouped_mm(hidden, layer.experts_down, offs=ends)  # [N*k, E]
    if layer.experts_down_b is not None:
        by_pair += torch.index_select(layer.experts_down_b, 0, by_expert)
    # back to (row, choice) order, then each row's k outputs weighted and summed
    by_row = torch.empty_like(by_pair).index_copy_(0, order, by_pair).view(n, k, -1)  # [N, k, E]
    summed = None if out is None else out.view(n, 1, -1)
    return torch.bmm(weights.to(x.dtype)[:, None], by_row, out=summed).view(n, -1)


# DeepSeek's RMSNorms over the compressed queries and K/V keep their class's epsilon, not the config's
LATENT_NORM_EPS = 1e-6


def latent_qk(w: ModelWeights, layer: Layer, x: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent attention's queries and cache entries for x [N, E], at the positions of cos, sin
    [N, 1, P/2]: q [N, H, Dn + P], each head's query with its rotary part rotated, and k [N, 1, W],
    the normalized compressed K/V and the rotated rotary key: what the cache holds (in halves)."""
    lat, n, heads = w.cfg.latent, x.shape[0], w.cfg.n_head
    r, p, nope = lat.kv_rank, lat.rope_dim, lat.nope_dim
    proj = linear(x, layer.qkv_wt, layer.qkv_b)  # [N, Qin + R + P]
    q_in = proj[:, : -(r + p)]
    if layer.q_up_wt is not None:
        q_in = torch.mm(torch.rms_norm(q_in, (lat.q_rank,), layer.q_down_norm_w, LATENT_NORM_EPS), layer.q_up_wt)
    q_in = q_in.view(n, heads, nope + p)  # [N, H, Dn + P]
    q, k = torch.empty_like(q_in), x.new_empty(n, 1, r + p)
    q[:, :, :nope] = q_in[:, :, :nope]
    rotate_halves(*halves(q_in[:, :, nope:]), cos, sin, *halves(q[:, :, nope:]))
    kv = proj[:, -(r + p) :]  # [N, R + P]
    k[:, 0, :r] = torch.rms_norm(kv[:, :r], (r,), layer.kv_norm_w, LATENT_NORM_EPS)
    rotate_halves(*halves(kv[:, None, r:]), cos, sin, *halves(k[:, :, r:]))
    return q, k


def latent_absorb(w: ModelWeights, layer: Layer, q: torch.Tensor, out: torch.Tensor) -> None:
    """Decode: the queries q [B, H, Dn + P] over the cached vectors themselves, into out [B, H, W]:
    each head's part without positions through its key up-projection (so that a step never
    expands the cache per head), its rotary part as it is."""
    r, nope = w.cfg.latent.kv_rank, w.cfg.latent.nope_dim
    out[:, :, :r] = torch.bmm(q[:, :, :nope].transpose(0, 1), layer.k_up).transpose(0, 1)  # [B, H, R]
    out[:, :, r:] = q[:, :, nope:]


def latent_expand(w: ModelWeights, layer: Layer, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill: the cached vectors [K, 1, W] expanded into each head's keys [K, H, Dn + P] (its
    up-projection of the vector, the shared rotary key) and values [K, H, Dn + P] (its other
    up-projection, zero-padded to the keys' width, the one width the varlen kernels take): a
    prompt's many queries then attend over heads of Dn + P, not the vector's W, and FlashAttention
    takes them."""
    lat, k_len, heads = w.cfg.latent, vectors.shape[0], w.cfg.n_head
    r, nope, width = lat.kv_rank, lat.nope_dim, lat.nope_dim + lat.rope_dim
    kv = torch.mm(vectors[:, 0, :r], layer.kv_up_wt).view(k_len, heads, nope + lat.v_dim)  # [K, H, Dn + Dv]
    k = vectors.new_empty(k_len, heads, width)
    k[:, :, :nope] = kv[:, :, :nope]
    k[:, :, nope:] = vectors[:, :, r:]
    v = kv[:, :, nope:] if lat.v_dim == width else torch.nn.functional.pad(kv[:, :, nope:], (0, width - lat.v_dim))
    return k, v


def latent_out(w: ModelWeights, layer: Layer, a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode: a [B, H, W], each head's weighted sum of the cached vectors -> [B, E], its
    compressed part through the head's value up-projection, then the output projection."""
    v = torch.bmm(a[:, :, : w.cfg.latent.kv_rank].transpose(0, 1), layer.v_up)  # [H, B, Dv]
    return linear(v.transpose(0, 1).reshape(a.shape[0], -1), layer.out_wt, layer.out_b, out=out)


def prefill(
    w: ModelWeights,
    input_ids: torch.Tensor,  # [T] int64, prompts packed back to back
    positions: torch.Tensor,  # [T] int64
    seqlens: list[int],
    attn: PrefillAttention,
    kv_out: torch.Tensor | None = None,  # [n_layer, 2, >=K, KVH, D]: each layer's K and V land here
    logit_index: torch.Tensor | None = None,  # [R] packed positions whose logits are wanted
    past: list[int] | None = None,  # per prompt, the tokens of a cached prefix whose K/V are in kv_out
    rope_rows: torch.Tensor | None = None,  # [T] rows of the rotary tables, where not `positions` (long_rope_prompt)
) -> torch.Tensor:
    """Packed causal forward over several prompts' new tokens (`seqlens` of them each).

    A prompt with a cached prefix has its `past` tokens' K/V at the start of its region of
    kv_out already (the regions packed back to back, K = sum of past + seqlens tokens); its new
    tokens' positions count them, and their K/V land after them. Returns logits [B, V] for each
    prompt's last token, or [R, V] for `logit_index` (prompt logprobs ask for every position of
    some prompts). Other positions never reach the LM head.
    """
    cfg = w.cfg
    q_dim, kv_dim, kvh, d, eps = cfg.q_dim, cfg.kv_dim, cfg.kv_heads, cfg.head_dim, cfg.layer_norm_epsilon
    t = input_ids.shape[0]
    packed = packing(seqlens, past if past and any(past) else None, input_ids.device)
    if packed.cu_k is not packed.cu_q:
        if kv_out is None:
            raise ValueError("a cached prefix's K/V are read from kv_out")
        # [T]: where each new token's K/V go in kv_out, after its prompt's cached prefix
        dest = torch.cat([torch.arange(s + p, s + p + n) for s, p, n in zip(packed.cu_k.tolist(), past, seqlens)])
        dest, keys = dest.to(input_ids.device), sum(packed.seqlens_k)
    h = torch.embedding(w.wte, input_ids)  # [T, E]
    if w.embed_scale is not None:
        h = h * w.embed_scale
    if w.wpe is not None:
        h = h + torch.embedding(w.wpe, positions)
    rope = w.rope_cos is not None
    if rope:
        cos, sin = _at(w.rope_cos, w.rope_sin, positions if rope_rows is None else rope_rows)  # [T, 1, P/2]
        ropes = ((cos, sin), _at(w.local_cos, w.local_sin, positions) if w.local_cos is not None else (cos, sin))
        q_scales = None if w.q_scales is None else w.q_scales[positions][:, None, None]  # [T, 1, 1]
    softcap = {"softcap": cfg.attn_softcap} if cfg.attn_softcap else {}  # the kernels that cannot cap take none
    for i, layer in enumerate(w.layers):
        x = norm(h, layer.norm1_w, layer.norm1_b, eps)
        if layer.k_up is not None:  # latent attention: the cache's planes hold the vector's halves
            q, vectors = latent_qk(w, layer, x, cos, sin)  # [T, H, Dn + P], [T, 1, W]
            k, v = vectors[..., :d], vectors[..., d:]
        else:
            qkv = linear(x, layer.qkv_wt, layer.qkv_b)  # [T, Q + 2*KV]
            q = qkv[:, :q_dim].view(t, cfg.n_head, d)
            k = qkv[:, q_dim : q_dim + kv_dim].view(t, kvh, d)
            v = qkv[:, q_dim + kv_dim :].view(t, kvh, d)
            if layer.q_norm_w is not None:
                q, k = torch.rms_norm(q, (d,), layer.q_norm_w, eps), torch.rms_norm(k, (d,), layer.k_norm_w, eps)
            if rope:
                c, s = ropes[layer.local_rope]
                q, k = rotate(q, c, s), rotate(k, c, s)
                if q_scales is not None:
                    q = q * q_scales
        if packed.cu_k is not packed.cu_q:  # the prompts' keys: cached prefixes and new tokens together
            kv_out[i, 0].index_copy_(0, dest, k)
            kv_out[i, 1].index_copy_(0, dest, v)
            k, v = kv_out[i, 0, :keys], kv_out[i, 1, :keys]  # [K, KVH, D]
        elif kv_out is not None:
            kv_out[i, 0, :t] = k
            kv_out[i, 1, :t] = v
        if layer.k_up is not None:  # every key's vector, expanded into heads
            k, v = latent_expand(w, layer, vectors if packed.cu_k is packed.cu_q else torch.cat((k, v), -1))
        sinks = {} if layer.sinks is None else {"sinks": layer.sinks.view(-1)}
        a = attn(q, k, v, packed, cfg.attn_scale, layer.window, **softcap, **sinks)  # [T, H, D] (latent: Dn + P)
        if layer.k_up is not None:
            v_dim = cfg.latent.v_dim
            o = linear(a[:, :, :v_dim].reshape(t, cfg.n_head * v_dim), layer.out_wt, layer.out_b)
        else:
            o = linear(a.reshape(t, q_dim), layer.out_wt, layer.out_b)
        h = h + joining(o, layer.attn_out_norm_w, layer.attn_out_norm_b, eps)
        o = mlp(w, layer, x if layer.norm2_w is None else norm(h, layer.norm2_w, layer.norm2_b, eps))
        h = h + joining(o, layer.mlp_out_norm_w, layer.mlp_out_norm_b, eps)
    # Gather before the final norm and the LM head, so unwanted positions cost nothing there.
    h = h[packed.cu_q[1:].long() - 1 if logit_index is None else logit_index]  # [B or R, E]
    return capped(linear(norm(h, w.normf_w, w.normf_b, eps), w.lm_head_t, w.lm_head_b), cfg.logits_softcap)


# Decode attention over fewer scores than this runs on one CPU thread: MKL's batched GEMM and the
# softmax would split even a batch-1 step's few thousand scores across threads, and their fork
# and join cost more than the work (ATen's elementwise ops stop splitting at this size too).
SERIAL_ATTENTION_SCORES = 32768


class RopeViews(NamedTuple):
    """Where a decode step reads q, k and v from qkv and writes them rotated, made once per shape.
    The first P values of each head turn, the rest are copied (partial rotary embeddings)."""

    q_heads: torch.Tensor  # qkv's q [B, H, D]: q/k norms normalize it and k_heads in place
    k_heads: torch.Tensor  # qkv's k [B, KVH, D]
    q: tuple[torch.Tensor, torch.Tensor]  # qkv's q [B, H, P] in halves
    k: tuple[torch.Tensor, torch.Tensor]  # qkv's k [B, KVH, P] in halves
    q_out: tuple[torch.Tensor, torch.Tensor]  # the rotated q buffer, as [B, H, P], in halves
    k_out: tuple[torch.Tensor, torch.Tensor]  # new_kv[0] as [B, KVH, P], in halves
    # (from qkv, to the buffers) as they are: v [B, KVH, D]; q's and k's values past P, if any
    copies: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class DecodeBuffers(NamedTuple):
    """What one decode shape (B rows, key_len keys) reads and writes: views of the KV pool, and
    views of a scratch buffer (`decode_scratch`) that the step's ops write into with `out=`.
    They depend only on (B, key_len), so a caller keeps them across steps: a step then makes no
    views per layer and allocates little (fresh [B, V] logits each step would be new pages from
    the OS on CPU, where glibc maps allocations that large, and a page fault per page)."""

    write: list[torch.Tensor]  # per layer [2, S*KVH*L, D]: new K/V land at write_index
    # per layer over its keys N: key_len, or a windowed layer's ring where that is shorter (kv_rings)
    keys_t: list[torch.Tensor]  # per layer [B*KVH, D, N], transposed views for q @ kᵀ
    values: list[torch.Tensor]  # per layer [B*KVH, N, D]
    h: torch.Tensor  # [B, E], the residual stream
    qkv: torch.Tensor  # [B, Q + 2*KV]
    # [B*KVH, G, D] and the new K/V [2, B*KVH, D]: with rotary embeddings, buffers they are rotated
    # into; without, views of qkv where those can be (multi-query), else None (split per layer).
    # Latent attention: q [B, H, W], a buffer; new_kv unused (the new vectors are written whole).
    q: torch.Tensor | None
    new_kv: torch.Tensor | None
    scores: list[torch.Tensor]  # per layer [B*KVH, G, N], views of one piece of the scratch buffer
    attn: torch.Tensor  # [B*KVH, G, D]; latent attention: [B, H, W]
    attn_rows: torch.Tensor  # [B, Q]: attn's memory
    up: torch.Tensor  # [B, I] or [B, 2*I]
    inner: torch.Tensor  # [B, I]: a gated MLP's product
    out: torch.Tensor  # [B, E]: each sublayer's output before it joins h
    logits: torch.Tensor  # [B, V]
    rope: RopeViews | None  # with rotary embeddings


def _scratch_widths(cfg: ModelConfig, slot_len: int) -> tuple[int, ...]:
    """Elements per row of each scratch piece: h, qkv, rotated q, new K/V, scores, attn, up, inner,
    out, logits."""
    e, q, kv, i = cfg.n_embd, cfg.q_dim, cfg.kv_dim, cfg.n_inner
    heads = cfg.n_head * cfg.decode_width  # q and attn: latent attention's span both planes
    gated = cfg.mlp == "gated"
    return (e, q + 2 * kv, heads, 2 * kv, cfg.n_head * slot_len, heads, (2 if gated else 1) * i, i if gated else 0, e,
            cfg.vocab_size)


def pool_shape(kv: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(slots, the most keys a layer's slot holds) of a pool given per layer [2, S, KVH, L, D]."""
    return kv[0].shape[1], max(layer.shape[3] for layer in kv)


def decode_scratch(cfg: ModelConfig, kv: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat buffer holding a decode step's intermediates at the pool's largest shape (every
    slot, its longest layer's keys). kv: the pool per layer [2, S, KVH, L, D] (L its own)."""
    s, length = pool_shape(kv)
    return torch.empty(sum(_aligned(s * w) for w in _scratch_widths(cfg, length)), dtype=kv[0].dtype,
                       device=kv[0].device)


def _aligned(n: int) -> int:
    # Each piece starts on a 256-byte boundary or better, as vector loads and cuBLAS prefer.
    return -(-n // 128) * 128


def kv_rings(windows: tuple[int, ...], slot_len: int) -> tuple[int, ...]:
    """Per layer, the ring a windowed layer keeps its keys in: the window rounded up to the key
    bucket (8), where that is shorter than the slot; 0 (keys at their positions) for the rest.
    Position p's K/V sits at p % ring, so the step reads a ring's keys however long the row has
    grown, as transformers' sliding cache does."""
    return tuple(ring if window and (ring := -(-window // 8) * 8) < slot_len else 0 for window in windows)


def layer_keys(rings: tuple[int, ...], slot_len: int) -> tuple[int, ...]:
    """Keys a slot of the pool holds in each layer: a windowed layer its ring (StarCoder2: 4,096 on
    every layer; gpt-oss: 128 on every other one), whatever the slot's length; the others the
    slot's length."""
    return tuple(ring or slot_len for ring in rings)


def decode_buffers(cfg: ModelConfig, kv: Sequence[torch.Tensor], scratch: torch.Tensor, b: int, key_len: int,
                   rings: tuple[int, ...] | None = None) -> DecodeBuffers:
    """kv: the pool per layer [2, S, KVH, L, D], each layer's L its own (a pool tensor
    [n_layer, 2, S, KVH, L, D] of whole slots is such a sequence); scratch: from decode_scratch for
    that pool; rings: kv_rings for the pool's slot length (by default the longest L)."""
    _, kvh, _, d = kv[0].shape[1:]
    s, length = pool_shape(kv)
    rings = kv_rings(cfg.windows, length) if rings is None else rings
    lens = [min(key_len, ring) if ring else key_len for ring in rings]  # N per layer
    write = [layer.view(2, s * kvh * layer.shape[3], d) for layer in kv]
    keys_t = [layer[0, :b, :, :n].view(b * kvh, n, d).transpose(1, 2) for layer, n in zip(kv, lens)]
    values = [layer[1, :b, :, :n].view(b * kvh, n, d) for layer, n in zip(kv, lens)]
    e, g, i, span = cfg.n_embd, cfg.n_head // kvh, cfg.n_inner, cfg.decode_width
    shapes = ((b, e), (b, cfg.q_dim + 2 * cfg.kv_dim), (b * kvh, g, span), (2, b * kvh, d), (b * kvh * g * max(lens),),
              (b * kvh, g, span), (b, (2 if cfg.mlp == "gated" else 1) * i), (b, i if cfg.mlp == "gated" else 0),
              (b, e), (b, cfg.vocab_size))
    pieces, start = [], 0
    for width, shape in zip(_scratch_widths(cfg, length), shapes):
        pieces.append(scratch[start : start + math.prod(shape)].view(shape))
        start += _aligned(s * width)
    h, qkv, q_rot, new_kv, flat_scores, attn, up, inner, out, logits = pieces
    scores = [flat_scores[: b * kvh * g * n].view(b * kvh, g, n) for n in lens]
    rope = None
    if cfg.latent is not None:  # latent_absorb writes the queries into it
        q = q_rot
    elif cfg.rope is not None:
        q_dim, kv_dim, heads = cfg.q_dim, cfg.kv_dim, cfg.n_head
        p = cfg.rope_dim
        q_in, k_in = qkv[:, :q_dim].view(b, heads, d), qkv[:, q_dim : q_dim + kv_dim].view(b, kvh, d)
        q_out, k_out = q_rot.view(b, heads, d), new_kv[0].view(b, kvh, d)
        copies = ((qkv[:, q_dim + kv_dim :].view(b, kvh, d), new_kv[1].view(b, kvh, d)),)
        if p < d:
            copies += ((q_in[..., p:], q_out[..., p:]), (k_in[..., p:], k_out[..., p:]))
        rope = RopeViews(q_in, k_in, halves(q_in[..., :p]), halves(k_in[..., :p]), halves(q_out[..., :p]),
                         halves(k_out[..., :p]), copies)
        q = q_rot
    elif kvh == 1:
        q, new_kv = split_qkv(qkv, cfg)
    else:
        q = new_kv = None
    return DecodeBuffers(write, keys_t, values, h, qkv, q, new_kv, scores, attn, attn.view(b, -1), up, inner, out,
                         logits, rope)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [B, Q + 2*KV] -> q [B*KVH, G, D] and the new K/V [2, B*KVH, D]: views of qkv for
    multi-query attention, copies otherwise."""
    b, q_dim, kvh, d = qkv.shape[0], cfg.q_dim, cfg.kv_heads, cfg.head_dim
    q = qkv[:, :q_dim].reshape(b * kvh, cfg.n_head // kvh, d)
    new_kv = qkv[:, q_dim:].view(b, 2, kvh * d).transpose(0, 1).reshape(2, b * kvh, d)
    return q, new_kv


def row_offsets(num_slots: int, kv_heads: int, slot_len: int, device) -> torch.Tensor:
    """[S*KVH]: where each (slot, head) row starts in the flat pool; made once per pool."""
    return torch.arange(num_slots * kv_heads, device=device) * slot_len


def decode_write_index(offsets: torch.Tensor, positions: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Flat pool index of each row's (and head's) new K/V: [B*KVH]. Row b is slot b."""
    b = positions.shape[0]
    return offsets[: b * kv_heads] + (positions.repeat_interleave(kv_heads) if kv_heads > 1 else positions)


def decode_step(
    w: ModelWeights,
    input_ids: torch.Tensor,  # [B] int64: each row's newest token
    positions: torch.Tensor,  # [B] int64: that token's position (= keys already cached)
    bufs: DecodeBuffers,  # for this B and key_len; the pool is written in place
    write_index: list[torch.Tensor],  # per layer [B*KVH] from decode_write_index (a ring's own)
    masks: list[torch.Tensor],  # per layer [B*KVH, 1, N] additive, from attention.decode_masks
) -> torch.Tensor:
    """One token for each of the first B slots of the pool; returns logits [B, V] (bufs.logits).

    Every op on the hot path is a direct ATen call, most with `out=`: at a small model's batch 1
    the Python wrappers, views and allocations cost as much as the layers' matrix products.
    """
    cfg = w.cfg
    eps, scale, upcast, softcap = cfg.layer_norm_epsilon, cfg.attn_scale, w.upcast_softmax, cfg.attn_softcap
    b, d = input_ids.shape[0], cfg.head_dim
    h, qkv, q, new_kv, attn, out = bufs.h, bufs.qkv, bufs.q, bufs.new_kv, bufs.attn, bufs.out
    threads = torch.get_num_threads()
    parallel, serial = threads > 1 and h.is_cpu, False
    torch.index_select(w.wte, 0, input_ids, out=h)  # [B, E]
    if w.embed_scale is not None:
        h.mul_(w.embed_scale)
    rope = bufs.rope
    if w.rope_cos is not None:
        cos, sin = _at(w.rope_cos, w.rope_sin, positions)  # [B, 1, P/2]
        ropes = ((cos, sin), _at(w.local_cos, w.local_sin, positions) if w.local_cos is not None else (cos, sin))
        q_scales = None if w.q_scales is None else w.q_scales[positions][:, None]  # [B, 1]
    elif w.wpe is not None:
        h.add_(torch.embedding(w.wpe, positions))
    try:
        for layer, write, index, keys_t, values, scores, mask in zip(w.layers, bufs.write, write_index, bufs.keys_t,
                                                                     bufs.values, bufs.scores, masks):
            x = norm(h, layer.norm1_w, layer.norm1_b, eps)
            latent = layer.k_up is not None
            if latent:  # the new vector's halves go to the two planes
                q_heads, vectors = latent_qk(w, layer, x, cos, sin)  # [B, H, Dn + P], [B, 1, W]
                latent_absorb(w, layer, q_heads, q)
                write.index_copy_(1, index, vectors.view(b, 2, d).transpose(0, 1))
            else:
                linear(x, layer.qkv_wt, layer.qkv_b, out=qkv)  # [B, Q + 2*KV]
                if rope is not None:
                    if layer.q_norm_w is not None:  # in place, where the views below read q and k
                        rope.q_heads.copy_(torch.rms_norm(rope.q_heads, (d,), layer.q_norm_w, eps))
                        rope.k_heads.copy_(torch.rms_norm(rope.k_heads, (d,), layer.k_norm_w, eps))
                    c, s = ropes[layer.local_rope]
                    rotate_halves(*rope.q, c, s, *rope.q_out)
                    rotate_halves(*rope.k, c, s, *rope.k_out)
                    for source, dest in rope.copies:
                        dest.copy_(source)
                    if q_scales is not None:
                        q.view(b, -1).mul_(q_scales)
                elif bufs.q is None:
                    q, new_kv = split_qkv(qkv, cfg)
                write.index_copy_(1, index, new_kv)
            serial = parallel and scores.numel() < SERIAL_ATTENTION_SCORES
            if serial:
                torch.set_num_threads(1)
            if latent:  # the query against the whole vector, plane by plane
                torch.baddbmm(mask, q[:, :, :d], keys_t, alpha=scale, out=scores)  # [B, H, N]
                scores.baddbmm_(q[:, :, d:], values.transpose(1, 2), alpha=scale)
            elif softcap:  # capped before the mask
                capped(torch.bmm(q, keys_t, out=scores).mul_(scale), softcap).add_(mask)
            else:
                torch.baddbmm(mask, q, keys_t, alpha=scale, out=scores)  # [B*KVH, G, N]
            if layer.sinks is not None:  # [B, KVH, G, N] against each head's sink
                probs = sink_softmax(scores.view(b, *layer.sinks.shape[:2], -1), layer.sinks)
                probs = probs.view(scores.shape).to(scores.dtype)
            elif upcast:
                probs = torch.softmax(scores, -1, dtype=torch.float32).to(scores.dtype)
            else:
                probs = torch.softmax(scores, -1)
            if latent:  # the weighted vectors [B, H, W], plane by plane
                torch.bmm(probs, keys_t.transpose(1, 2), out=attn[:, :, :d])
                torch.bmm(probs, values, out=attn[:, :, d:])
            else:
                torch.bmm(probs, values, out=attn)  # [B*KVH, G, D]
            if serial:
                torch.set_num_threads(threads)
            if latent:
                o = latent_out(w, layer, attn, out=out)
            else:
                o = linear(bufs.attn_rows, layer.out_wt, layer.out_b, out=out)
            h.add_(joining(o, layer.attn_out_norm_w, layer.attn_out_norm_b, eps))
            if layer.norm2_w is not None:  # else the MLP reads norm1's output too (parallel residual)
                x = norm(h, layer.norm2_w, layer.norm2_b, eps)
            o = mlp(w, layer, x, up=bufs.up, inner=bufs.inner, out=out)
            h.add_(joining(o, layer.mlp_out_norm_w, layer.mlp_out_norm_b, eps))
    finally:  # a failed step must not leave the process on one thread
        if serial:
            torch.set_num_threads(threads)
    logits = linear(norm(h, w.normf_w, w.normf_b, eps), w.lm_head_t, w.lm_head_b, out=bufs.logits)
    return capped(logits, cfg.logits_softcap)
