"""GPTBigCode forward passes as plain functions over a tuple of weight tensors.

No `nn.Module` on the call path: module `__call__` hooks and attribute
lookups cost more than the matrix products of a small model's decode step. Shapes:
T packed prompt tokens, B decode rows, E = n_embd, H heads, KVH key/value heads (1 for
multi-query), D head dim, S slots, L slot length, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .attention import PrefillAttention
from .model_config import ModelConfig


class Layer(NamedTuple):
    """Linear weights are held transposed ([in, out] views of the checkpoint's [out, in]), so
    `torch.addmm(b, x, w_t)` is F.linear(x, w, b) without the per-call transpose and wrapper."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_wt: torch.Tensor  # [E, E + 2*KVH*D], columns ordered q heads | k heads | v heads
    qkv_b: torch.Tensor
    proj_wt: torch.Tensor  # [E, E]
    proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc_wt: torch.Tensor  # [E, n_inner]
    fc_b: torch.Tensor
    out_wt: torch.Tensor  # [n_inner, E]
    out_b: torch.Tensor


class ModelWeights(NamedTuple):
    cfg: ModelConfig
    wte: torch.Tensor  # [V, E]
    wpe: torch.Tensor  # [n_positions, E]
    layers: tuple[Layer, ...]
    lnf_w: torch.Tensor
    lnf_b: torch.Tensor
    lm_head_t: torch.Tensor  # [E, V]; a view of wte when tied
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


def prepare_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> ModelWeights:
    """Turn loader names (`h.0.attn.c_attn.weight`, ...) into the tuples the forward uses."""
    layers = []
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        layers.append(
            Layer(
                weights[p + "ln_1.weight"],
                weights[p + "ln_1.bias"],
                _heads_first_qkv(weights[p + "attn.c_attn.weight"], cfg).t(),
                _heads_first_qkv(weights[p + "attn.c_attn.bias"], cfg),
                weights[p + "attn.c_proj.weight"].t(),
                weights[p + "attn.c_proj.bias"],
                weights[p + "ln_2.weight"],
                weights[p + "ln_2.bias"],
                weights[p + "mlp.c_fc.weight"].t(),
                weights[p + "mlp.c_fc.bias"],
                weights[p + "mlp.c_proj.weight"].t(),
                weights[p + "mlp.c_proj.bias"],
            )
        )
    wte = weights["wte.weight"]
    return ModelWeights(
        cfg=cfg,
        wte=wte,
        wpe=weights["wpe.weight"],
        layers=tuple(layers),
        lnf_w=weights["ln_f.weight"],
        lnf_b=weights["ln_f.bias"],
        lm_head_t=(wte if cfg.tie_word_embeddings else weights["lm_head.weight"]).t(),
        act=ACT_FNS[cfg.activation],
        upcast_softmax=wte.dtype != torch.float32,
    )


def prefill(
    w: ModelWeights,
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
    cfg = w.cfg
    e, kvd, kvh, d, eps = cfg.n_embd, cfg.kv_dim, cfg.kv_heads, cfg.head_dim, cfg.layer_norm_epsilon
    t = input_ids.shape[0]
    seq_ends = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    cu_seqlens = F.pad(seq_ends, (1, 0)).to(input_ids.device, torch.int32)  # [B+1]
    max_seqlen = max(seqlens)
    h = torch.embedding(w.wte, input_ids) + torch.embedding(w.wpe, positions)  # [T, E]
    for i, (ln1_w, ln1_b, qkv_wt, qkv_b, proj_wt, proj_b, ln2_w, ln2_b, fc_wt, fc_b, out_wt, out_b) in enumerate(
        w.layers
    ):
        x = torch.layer_norm(h, (e,), ln1_w, ln1_b, eps)
        qkv = torch.addmm(qkv_b, x, qkv_wt)  # [T, E + 2*KVH*D]
        q = qkv[:, :e].view(t, cfg.n_head, d)
        k = qkv[:, e : e + kvd].view(t, kvh, d)
        v = qkv[:, e + kvd :].view(t, kvh, d)
        if kv_out is not None:
            kv_out[i, :, :t] = qkv[:, e:].view(t, 2, kvh, d).transpose(0, 1)
        a = attn(q, k, v, cu_seqlens, seqlens, max_seqlen, cfg.attn_scale)  # [T, H, D]
        h = h + torch.addmm(proj_b, a.reshape(t, e), proj_wt)
        x = torch.layer_norm(h, (e,), ln2_w, ln2_b, eps)
        h = h + torch.addmm(out_b, w.act(torch.addmm(fc_b, x, fc_wt)), out_wt)
    # Gather before ln_f and the LM head, so unwanted positions cost nothing there.
    h = h[cu_seqlens[1:].long() - 1 if logit_index is None else logit_index]  # [B or R, E]
    h = torch.layer_norm(h, (e,), w.lnf_w, w.lnf_b, eps)
    return torch.mm(h, w.lm_head_t)


# Decode attention over fewer scores than this runs on one CPU thread: MKL's batched GEMM and the
# softmax would split even a batch-1 step's few thousand scores across threads, and their fork
# and join cost more than the work (ATen's elementwise ops stop splitting at this size too).
SERIAL_ATTENTION_SCORES = 32768


class DecodeBuffers(NamedTuple):
    """What one decode shape (B rows, key_len keys) reads and writes: views of the KV pool, and
    views of a scratch buffer (`decode_scratch`) that the step's ops write into with `out=`.
    They depend only on (B, key_len), so a caller keeps them across steps: a step then makes no
    views per layer and allocates little (fresh [B, V] logits each step would be new pages from
    the OS on CPU, where glibc maps allocations that large, and a page fault per page)."""

    write: list[torch.Tensor]  # per layer [2, S*KVH*L, D]: new K/V land at write_index
    keys_t: list[torch.Tensor]  # per layer [B*KVH, D, key_len], transposed views for q @ kᵀ
    values: list[torch.Tensor]  # per layer [B*KVH, key_len, D]
    h: torch.Tensor  # [B, E], the residual stream
    qkv: torch.Tensor  # [B, E + 2*KVH*D]
    q: torch.Tensor | None  # [B*KVH, G, D], a view of qkv; None where it cannot be one (KVH > 1)
    new_kv: torch.Tensor | None  # [2, B*KVH, D], a view of qkv; likewise
    scores: torch.Tensor  # [B*KVH, G, key_len]
    attn: torch.Tensor  # [B*KVH, G, D]
    attn_rows: torch.Tensor  # [B, E]: attn's memory
    inner: torch.Tensor  # [B, n_inner]
    out: torch.Tensor  # [B, E]: each sublayer's output before it joins h
    logits: torch.Tensor  # [B, V]


def _scratch_widths(cfg: ModelConfig, slot_len: int) -> tuple[int, ...]:
    """Elements per row of each scratch piece, in DecodeBuffers' order from h on (q, new_kv and
    attn_rows are views of other pieces)."""
    e = cfg.n_embd
    return e, e + 2 * cfg.kv_dim, cfg.n_head * slot_len, e, cfg.n_inner, e, cfg.vocab_size


def decode_scratch(cfg: ModelConfig, kv: torch.Tensor) -> torch.Tensor:
    """One flat buffer holding a decode step's intermediates at the pool's largest shape (every
    slot, whole slots). kv: the pool [n_layer, 2, S, KVH, L, D]."""
    s, length = kv.shape[2], kv.shape[4]
    return torch.empty(sum(_aligned(s * w) for w in _scratch_widths(cfg, length)), dtype=kv.dtype, device=kv.device)


def _aligned(n: int) -> int:
    # Each piece starts on a 256-byte boundary or better, as vector loads and cuBLAS prefer.
    return -(-n // 128) * 128


def decode_buffers(cfg: ModelConfig, kv: torch.Tensor, scratch: torch.Tensor, b: int, key_len: int) -> DecodeBuffers:
    """kv: the pool [n_layer, 2, S, KVH, L, D]; scratch: from decode_scratch for that pool."""
    _, _, s, kvh, length, d = kv.shape
    write = [layer.view(2, s * kvh * length, d) for layer in kv]
    keys_t = [layer[0, :b, :, :key_len].view(b * kvh, key_len, d).transpose(1, 2) for layer in kv]
    values = [layer[1, :b, :, :key_len].view(b * kvh, key_len, d) for layer in kv]
    e, g = cfg.n_embd, cfg.n_head // kvh
    shapes = ((b, e), (b, e + 2 * cfg.kv_dim), (b * kvh, g, key_len), (b * kvh, g, d), (b, cfg.n_inner), (b, e),
              (b, cfg.vocab_size))
    pieces, start = [], 0
    for width, shape in zip(_scratch_widths(cfg, length), shapes):
        pieces.append(scratch[start : start + math.prod(shape)].view(shape))
        start += _aligned(s * width)
    h, qkv, scores, attn, inner, out, logits = pieces
    q, new_kv = split_qkv(qkv, cfg) if kvh == 1 else (None, None)
    return DecodeBuffers(write, keys_t, values, h, qkv, q, new_kv, scores, attn, attn.view(b, e), inner, out, logits)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [B, E + 2*KVH*D] -> q [B*KVH, G, D] and the new K/V [2, B*KVH, D]: views of qkv for
    multi-query attention, copies otherwise."""
    b, e, kvh, d = qkv.shape[0], cfg.n_embd, cfg.kv_heads, cfg.head_dim
    q = qkv[:, :e].reshape(b * kvh, cfg.n_head // kvh, d)
    new_kv = qkv[:, e:].view(b, 2, kvh * d).transpose(0, 1).reshape(2, b * kvh, d)
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
    write_index: torch.Tensor,  # [B*KVH] from decode_write_index
    mask: torch.Tensor,  # [B*KVH, 1, key_len] additive, from attention.decode_mask
) -> torch.Tensor:
    """One token for each of the first B slots of the pool; returns logits [B, V] (bufs.logits).

    Every op on the hot path is a direct ATen call, most with `out=`: at a small model's batch 1
    the Python wrappers, views and allocations cost as much as the layers' matrix products.
    """
    cfg = w.cfg
    e, eps, scale, upcast = cfg.n_embd, cfg.layer_norm_epsilon, cfg.attn_scale, w.upcast_softmax
    h, qkv, q, new_kv, scores, attn, inner, out = (bufs.h, bufs.qkv, bufs.q, bufs.new_kv, bufs.scores, bufs.attn,
                                                   bufs.inner, bufs.out)
    threads = torch.get_num_threads()
    serial = threads > 1 and scores.is_cpu and scores.numel() < SERIAL_ATTENTION_SCORES
    torch.add(torch.embedding(w.wte, input_ids), torch.embedding(w.wpe, positions), out=h)  # [B, E]
    try:
        for (ln1_w, ln1_b, qkv_wt, qkv_b, proj_wt, proj_b, ln2_w, ln2_b, fc_wt, fc_b, out_wt, out_b), write, keys_t, values in zip(
            w.layers, bufs.write, bufs.keys_t, bufs.values
        ):
            x = torch.layer_norm(h, (e,), ln1_w, ln1_b, eps)
            torch.addmm(qkv_b, x, qkv_wt, out=qkv)  # [B, E + 2*KVH*D]
            if bufs.q is None:
                q, new_kv = split_qkv(qkv, cfg)
            write.index_copy_(1, write_index, new_kv)
            if serial:
                torch.set_num_threads(1)
            torch.baddbmm(mask, q, keys_t, alpha=scale, out=scores)  # [B*KVH, G, key_len]
            if upcast:
                probs = torch.softmax(scores, -1, dtype=torch.float32).to(scores.dtype)
            else:
                probs = torch.softmax(scores, -1)
            torch.bmm(probs, values, out=attn)  # [B*KVH, G, D]
            if serial:
                torch.set_num_threads(threads)
            h.add_(torch.addmm(proj_b, bufs.attn_rows, proj_wt, out=out))
            x = torch.layer_norm(h, (e,), ln2_w, ln2_b, eps)
            h.add_(torch.addmm(out_b, w.act(torch.addmm(fc_b, x, fc_wt, out=inner)), out_wt, out=out))
    finally:  # a failed step must not leave the process on one thread
        if serial:
            torch.set_num_threads(threads)
    x = torch.layer_norm(h, (e,), w.lnf_w, w.lnf_b, eps)
    return torch.mm(x, w.lm_head_t, out=bufs.logits)
