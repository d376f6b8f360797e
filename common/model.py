"""GPTBigCode forward passes as plain functions over a tuple of weight tensors.

No `nn.Module` on the call path (the seed's finding 7): module `__call__` hooks and attribute
lookups cost more than the matrix products of a small model's decode step. Shapes:
T packed prompt tokens, B decode rows, E = n_embd, H heads, KVH key/value heads (1 for
multi-query), D head dim, S slots, L slot length, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .attention import PrefillAttention
from .model_config import ModelConfig


class Layer(NamedTuple):
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor  # [E + 2*KVH*D, E], rows ordered q heads | k heads | v heads
    qkv_b: torch.Tensor
    proj_w: torch.Tensor  # [E, E]
    proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc_w: torch.Tensor  # [n_inner, E]
    fc_b: torch.Tensor
    out_w: torch.Tensor  # [E, n_inner]
    out_b: torch.Tensor


class Params(NamedTuple):
    cfg: ModelConfig
    wte: torch.Tensor  # [V, E]
    wpe: torch.Tensor  # [n_positions, E]
    layers: tuple[Layer, ...]
    lnf_w: torch.Tensor
    lnf_b: torch.Tensor
    lm_head: torch.Tensor  # [V, E]; wte itself when tied
    act: Callable[[torch.Tensor], torch.Tensor]
    upcast_softmax: bool  # half precision scores are softmaxed in fp32, as transformers does


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT_FNS = {"gelu_tanh": _gelu_tanh, "gelu": F.gelu, "relu": F.relu}


def _heads_first_qkv(w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Multi-head c_attn interleaves [q_h, k_h, v_h] per head; regroup rows as q | k | v.

    Done once at load so that one split serves multi-query and multi-head alike.
    """
    if cfg.multi_query:
        return w
    h, d = cfg.n_head, cfg.head_dim
    rest = w.shape[1:]
    return w.reshape(h, 3, d, *rest).transpose(0, 1).reshape(3 * h * d, *rest).contiguous()


def prepare_params(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> Params:
    """Turn loader names (`h.0.attn.c_attn.weight`, ...) into the tuples the forward uses."""
    layers = []
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        layers.append(
            Layer(
                weights[p + "ln_1.weight"],
                weights[p + "ln_1.bias"],
                _heads_first_qkv(weights[p + "attn.c_attn.weight"], cfg),
                _heads_first_qkv(weights[p + "attn.c_attn.bias"], cfg),
                weights[p + "attn.c_proj.weight"],
                weights[p + "attn.c_proj.bias"],
                weights[p + "ln_2.weight"],
                weights[p + "ln_2.bias"],
                weights[p + "mlp.c_fc.weight"],
                weights[p + "mlp.c_fc.bias"],
                weights[p + "mlp.c_proj.weight"],
                weights[p + "mlp.c_proj.bias"],
            )
        )
    wte = weights["wte.weight"]
    return Params(
        cfg=cfg,
        wte=wte,
        wpe=weights["wpe.weight"],
        layers=tuple(layers),
        lnf_w=weights["ln_f.weight"],
        lnf_b=weights["ln_f.bias"],
        lm_head=wte if cfg.tie_word_embeddings else weights["lm_head.weight"],
        act=ACT_FNS[cfg.activation],
        upcast_softmax=wte.dtype != torch.float32,
    )


def prefill(
    p: Params,
    input_ids: torch.Tensor,  # [T] int64, prompts packed back to back
    positions: torch.Tensor,  # [T] int64
    seqlens: list[int],
    attn: PrefillAttention,
    kv_out: torch.Tensor | None = None,  # [n_layer, 2, >=T, KVH, D]: each layer's K and V land here
    logit_index: torch.Tensor | None = None,  # [R] packed positions whose logits are wanted
) -> torch.Tensor:
    """Packed causal forward over several prompts.

    Returns logits [B, V] for each prompt's last token, or [R, V] for `logit_index` (prompt
    logprobs ask for every position of some prompts). Other positions never reach the LM head.
    """
    cfg = p.cfg
    e, kvd, kvh, d, eps = cfg.n_embd, cfg.kv_dim, cfg.kv_heads, cfg.head_dim, cfg.layer_norm_epsilon
    t = input_ids.shape[0]
    seq_ends = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    cu_seqlens = F.pad(seq_ends, (1, 0)).to(input_ids.device, torch.int32)  # [B+1]
    max_seqlen = max(seqlens)
    h = F.embedding(input_ids, p.wte) + F.embedding(positions, p.wpe)  # [T, E]
    for i, (ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b) in enumerate(
        p.layers
    ):
        x = F.layer_norm(h, (e,), ln1_w, ln1_b, eps)
        qkv = F.linear(x, qkv_w, qkv_b)  # [T, E + 2*KVH*D]
        q = qkv[:, :e].view(t, cfg.n_head, d)
        k = qkv[:, e : e + kvd].view(t, kvh, d)
        v = qkv[:, e + kvd :].view(t, kvh, d)
        if kv_out is not None:
            kv_out[i, :, :t] = qkv[:, e:].view(t, 2, kvh, d).transpose(0, 1)
        a = attn(q, k, v, cu_seqlens, seqlens, max_seqlen, cfg.attn_scale)  # [T, H, D]
        h = h + F.linear(a.reshape(t, e), proj_w, proj_b)
        x = F.layer_norm(h, (e,), ln2_w, ln2_b, eps)
        h = h + F.linear(p.act(F.linear(x, fc_w, fc_b)), out_w, out_b)
    # Gather before ln_f and the LM head, so unwanted positions cost nothing there.
    h = h[cu_seqlens[1:].long() - 1 if logit_index is None else logit_index]  # [B or R, E]
    h = F.layer_norm(h, (e,), p.lnf_w, p.lnf_b, eps)
    return F.linear(h, p.lm_head)


class DecodeViews(NamedTuple):
    """Per-layer views of the KV pool that one decode shape (B rows, key_len keys) reads and
    writes. They depend only on (B, key_len), so a caller keeps them across steps."""

    write: list[torch.Tensor]  # [2, S*KVH*L, D]: new K/V land at write_index
    keys_t: list[torch.Tensor]  # [B*KVH, D, key_len], transposed views for q @ kᵀ
    values: list[torch.Tensor]  # [B*KVH, key_len, D]


def decode_views(kv: torch.Tensor, b: int, key_len: int) -> DecodeViews:
    """kv: the pool [n_layer, 2, S, KVH, L, D]."""
    _, _, s, kvh, length, d = kv.shape
    write = [layer.view(2, s * kvh * length, d) for layer in kv]
    keys_t = [layer[0, :b, :, :key_len].view(b * kvh, key_len, d).transpose(1, 2) for layer in kv]
    values = [layer[1, :b, :, :key_len].view(b * kvh, key_len, d) for layer in kv]
    return DecodeViews(write, keys_t, values)


def row_offsets(num_slots: int, kv_heads: int, slot_len: int, device) -> torch.Tensor:
    """[S*KVH]: where each (slot, head) row starts in the flat pool; made once per pool."""
    return torch.arange(num_slots * kv_heads, device=device) * slot_len


def decode_write_index(offsets: torch.Tensor, positions: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Flat pool index of each row's (and head's) new K/V: [B*KVH]. Row b is slot b."""
    b = positions.shape[0]
    return offsets[: b * kv_heads] + (positions.repeat_interleave(kv_heads) if kv_heads > 1 else positions)


def decode_step(
    p: Params,
    input_ids: torch.Tensor,  # [B] int64: each row's newest token
    positions: torch.Tensor,  # [B] int64: that token's position (= keys already cached)
    views: DecodeViews,  # of the static pool, for this B and key_len; written in place
    write_index: torch.Tensor,  # [B*KVH] from decode_write_index
    mask: torch.Tensor,  # [B*KVH, 1, key_len] additive, from attention.decode_mask
    logits_out: torch.Tensor | None = None,  # [>=B, V]
) -> torch.Tensor:
    """One token for each of the first B slots of the pool; returns logits [B, V]."""
    cfg = p.cfg
    e, kvh, d, eps = cfg.n_embd, cfg.kv_heads, cfg.head_dim, cfg.layer_norm_epsilon
    b = input_ids.shape[0]
    g = cfg.n_head // kvh
    scale = cfg.attn_scale
    upcast = p.upcast_softmax
    h = F.embedding(input_ids, p.wte) + F.embedding(positions, p.wpe)  # [B, E]
    for (ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b), write, keys_t, values in zip(
        p.layers, views.write, views.keys_t, views.values
    ):
        x = F.layer_norm(h, (e,), ln1_w, ln1_b, eps)
        qkv = F.linear(x, qkv_w, qkv_b)  # [B, E + 2*KVH*D]
        new_kv = qkv[:, e:].view(b, 2, kvh * d).transpose(0, 1).reshape(2, b * kvh, d)  # [2, B*KVH, D]
        write.index_copy_(1, write_index, new_kv)
        q = qkv[:, :e].reshape(b * kvh, g, d)
        scores = torch.baddbmm(mask, q, keys_t, alpha=scale)  # [B*KVH, G, key_len]
        if upcast:
            probs = torch.softmax(scores, -1, dtype=torch.float32).to(scores.dtype)
        else:
            probs = torch.softmax(scores, -1)
        a = torch.bmm(probs, values)  # [B*KVH, G, D]
        h = h + F.linear(a.view(b, e), proj_w, proj_b)
        x = F.layer_norm(h, (e,), ln2_w, ln2_b, eps)
        h = h + F.linear(p.act(F.linear(x, fc_w, fc_b)), out_w, out_b)
    h = F.layer_norm(h, (e,), p.lnf_w, p.lnf_b, eps)
    # Into a buffer kept by the caller: a fresh [B, V] each step would be new pages from the OS
    # (glibc maps allocations this large) and page faults on every step.
    return torch.mm(h, p.lm_head.t(), out=logits_out[:b]) if logits_out is not None else F.linear(h, p.lm_head)
