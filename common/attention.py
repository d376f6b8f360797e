"""Attention kernels: packed variable-length causal prefill, and decode over a static KV pool.

Prefill picks, once, the fastest kernel the process has: the `flash-attn` package's
varlen kernel, PyTorch's bundled FlashAttention varlen op on CUDA, else SDPA per prompt (CPU, and
heads wider than FlashAttention takes).
Decode always uses batched matmuls over the pool's contiguous slot prefix: the G query heads of
each key/value head make one row block, so `q @ kᵀ` is one batched GEMM per layer and the cache
is read in place, without repeating K/V per query head.

A sliding window of W keys (StarCoder2, Mistral, some Qwen layers) lets a token at position p
attend keys p - W + 1 ... p; window 0 means every earlier key. Attention sinks (gpt-oss): each
query head's softmax also counts a learned logit of its own that has no value.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

class Packed(NamedTuple):
    """Prompts packed back to back for one prefill: the queries are the tokens computed now, the keys
    those plus each prompt's cached prefix before them (`past`), so a prompt's queries sit at the
    end of its keys (bottom-right causal alignment)."""

    cu_q: torch.Tensor  # int32 [B+1], where each prompt's queries start in the packed q
    cu_k: torch.Tensor  # int32 [B+1], where its keys start in the packed k, v
    seqlens_q: list[int]
    seqlens_k: list[int]
    max_q: int
    max_k: int


def packing(seqlens: list[int], past: list[int] | None, device) -> Packed:
    """Prompts of `seqlens` new tokens, each after `past` cached ones (None: none)."""
    lens_k = seqlens if past is None else [n + p for n, p in zip(seqlens, past)]

    def cumulative(lens: list[int]) -> torch.Tensor:
        return F.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0), (1, 0)).to(device, torch.int32)

    cu_q = cumulative(seqlens)
    return Packed(cu_q, cu_q if past is None else cumulative(lens_k), seqlens, lens_k, max(seqlens), max(lens_k))


# (q [Tq, H, D], k [Tk, KVH, D], v [Tk, KVH, D], Packed, scale, window, softcap=, sinks=) -> [Tq, H, D]
# softcap: scores s become softcap * tanh(s / softcap) before the mask (Gemma 2); 0: none. sinks:
# [H] fp32, each head's sink logit; None: none. Only kernels that take them are passed them.
PrefillAttention = Callable[..., torch.Tensor]


def sink_softmax(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The softmax of scores [..., K] with one more logit per row, sinks [..., 1] (fp32), that has
    no value: the keys' weights [..., K] in fp32, summing to less than 1. The plain softmax scaled
    by each row's share without the sink, sigmoid(lse - sink), its log-sum-exp read off the largest
    score and weight (lse = max s - log max p): three times faster on the CPU than a logsumexp."""
    s = scores.float()
    probs = torch.softmax(s, -1)
    lse = s.amax(-1, keepdim=True).sub_(probs.amax(-1, keepdim=True).log_())
    return probs.mul_(torch.sigmoid(lse.sub_(sinks)))


def sdpa_prefill(q, k, v, packed: Packed, scale: float, window: int = 0, softcap: float = 0.0,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One causal SDPA call per prompt: the CPU twin of the varlen kernels."""
    out = torch.empty_like(q)  # [Tq, H, D]
    heads = q.shape[1]
    eager = bool(softcap) or sinks is not None
    q_start = k_start = 0
    for n, m in zip(packed.seqlens_q, packed.seqlens_k):
        plain = n == m and not 0 < window < n  # causal from the top left is causal from the bottom right
        # 4-D with K/V repeated for every query head of a group (a view for multi-query): on the
        # CPU this takes SDPA's fused kernel, several times faster than its enable_gqa path.
        qh = q[q_start : q_start + n].transpose(0, 1)[None]  # [1, H, n, D]
        kh, vh = _per_query_head(k[k_start : k_start + m], heads), _per_query_head(v[k_start : k_start + m], heads)
        mask = None if plain and not eager else causal_mask(n, m, window, q.device)
        if eager:
            o = _eager(qh, kh, vh, mask, scale, softcap, sinks)
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=plain, scale=scale)  # [1, H, n, D]
        out[q_start : q_start + n] = o[0].transpose(0, 1)
        q_start, k_start = q_start + n, k_start + m
    return out


def _eager(q, k, v, allowed: torch.Tensor, scale: float, softcap: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention with capped scores or sinks, which SDPA has no form of: q [1, H, n, D], k and v
    [1, H, m, D], allowed [n, m] -> [1, H, n, D]. The scores are made whole, as transformers' eager
    kernel does."""
    scores = torch.matmul(q, k.transpose(-1, -2))  # [1, H, n, m]
    scores = capped(scores.mul_(scale), softcap)
    scores.masked_fill_(~allowed, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, -1, dtype=torch.float32)
    else:
        probs = sink_softmax(scores, sinks.view(1, -1, 1, 1))
    return torch.matmul(probs.to(q.dtype), v)


def capped(x: torch.Tensor, softcap: float) -> torch.Tensor:
    """x as softcap * tanh(x / softcap), in place (Gemma 2's scores and logits); as it is for 0."""
    return x.div_(softcap).tanh_().mul_(softcap) if softcap else x


def _per_query_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[n, KVH, D] -> [1, H, n, D]: each key/value head repeated for the G query heads it serves."""
    n, kv_heads, d = x.shape
    x = x.transpose(0, 1)[:, None].expand(kv_heads, heads // kv_heads, n, d)  # [KVH, G, n, D]
    return x.reshape(1, heads, n, d) if kv_heads > 1 else x.view(1, heads, n, d)


def causal_mask(n: int, m: int, window: int, device) -> torch.Tensor:
    """[n, m] bool, True where query i (the last n of m positions) may attend key j: j <= its
    position and, with a window, its position - j < window."""
    distance = torch.arange(m - n, m, device=device)[:, None] - torch.arange(m, device=device)[None, :]
    allowed = distance >= 0
    return allowed & (distance < window) if window else allowed


def _flash_attn_prefill() -> PrefillAttention | None:
    try:
        from flash_attn import flash_attn_varlen_func  # pyright: ignore[reportMissingImports]  # optional, CUDA only
    except ImportError:
        return None

    def prefill(q, k, v, packed: Packed, scale, window=0, softcap=0.0, sinks=None):
        # flash-attn takes fewer K/V heads than query heads natively (MQA/GQA), and aligns causal
        # attention to the bottom right when a prompt has more keys than queries (a cached prefix).
        out = flash_attn_varlen_func(
            q, k, v, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, softmax_scale=scale, causal=True,
            window_size=(window - 1 if window else -1, 0), softcap=softcap, return_attn_probs=sinks is not None,
        )
        if sinks is None:
            return out
        # the kernel's softmax without the sink, whose share of each row's weight is then taken off:
        # sum_j e^(s_j) / (sum_j e^(s_j) + e^sink) = sigmoid(lse - sink)
        out, lse = out[0], out[1]  # [Tq, H, D], [H, Tq] fp32
        return out * torch.sigmoid(lse - sinks[:, None]).t()[:, :, None].to(out.dtype)

    return prefill


def _torch_varlen_prefill() -> PrefillAttention | None:
    """PyTorch's bundled FlashAttention-2 varlen kernel. Its public wrapper's signature moved
    between releases (2.10: `is_causal` and no `scale`; 2.11: keyword `scale` and `window_size`;
    `enable_gqa` only from 2.12, which refuses fewer K/V heads without it). Where the wrapper takes
    `enable_gqa` it is used; otherwise the op every version wraps, called as 2.10 to 2.13 all call
    it, whose kernel takes multi-query K/V as they are: K/V are never expanded to every head."""
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters:

        def prefill(q, k, v, packed: Packed, scale, window=0):
            return varlen_attn(q, k, v, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, scale=scale,
                               window_size=(window - 1 if window else -1, 0), enable_gqa=k.shape[1] != q.shape[1])

        return prefill

    def prefill(q, k, v, packed: Packed, scale, window=0):
        # (q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask) -> (out, lse, ...)
        return torch.ops.aten._flash_attention_forward(q, k, v, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k,
                                                       0.0, True, False, scale=scale,
                                                       window_size_left=window - 1 if window else -1,
                                                       window_size_right=0)[0]

    return prefill


# The FlashAttention kernels take heads up to this wide; a config's wider heads go to SDPA.
FLASH_MAX_HEAD_DIM = 256


def choose_prefill_attention(device: torch.device, head_dim: int, softcap: bool = False,
                             sinks: bool = False) -> tuple[str, PrefillAttention]:
    """softcap, sinks: the model caps its attention scores or has attention sinks, which PyTorch's
    bundled kernel cannot take (the flash-attn package can; without it, SDPA's twin computes the
    scores whole)."""
    if device.type == "cuda" and head_dim <= FLASH_MAX_HEAD_DIM:
        kernels = (("flash-attn varlen", _flash_attn_prefill), ("torch varlen", _torch_varlen_prefill))
        for name, make in kernels[:1] if softcap or sinks else kernels:
            fn = make()
            if fn is not None:
                log.info("prefill attention: %s", name)
                return name, fn
    log.info("prefill attention: sdpa per prompt")
    return "sdpa", sdpa_prefill


def decode_mask(positions: torch.Tensor, key_len: int, kv_heads: int, dtype: torch.dtype,
                key_index: torch.Tensor | None = None, window: int = 0, ring: int = 0) -> torch.Tensor:
    """Additive mask hiding each row's keys past its own position (the key bucket's tail) and, with
    a window, those W or more positions back. With a ring (model.kv_rings) the keys are its N =
    min(key_len, ring) entries, entry j holding the newest position p' <= p with p' = j (mod ring):
    one not yet written (j > p) or W or more back is hidden.

    positions [B] -> [B * KVH, 1, N]. key_index: a cached arange of at least key_len.
    """
    n = min(key_len, ring) if ring else key_len
    if key_index is None:
        key_index = torch.arange(n, device=positions.device)
    keys, at = key_index[:n], positions[:, None, None]
    hidden = keys > at  # [B, 1, N]
    if ring:
        if ring > window:  # else every written entry is within the window
            hidden |= torch.remainder(at - keys, ring) >= window
    elif window:
        hidden |= keys <= at - window
    mask = torch.zeros(hidden.shape, dtype=dtype, device=positions.device).masked_fill_(hidden, float("-inf"))
    return mask.repeat_interleave(kv_heads, 0) if kv_heads > 1 else mask


def decode_masks(positions: torch.Tensor, key_len: int, kv_heads: int, dtype: torch.dtype, key_index: torch.Tensor,
                 windows: tuple[int, ...], rings: tuple[int, ...]) -> list[torch.Tensor]:
    """decode_mask for each layer's window and ring, each distinct pair made once."""
    layers = list(zip(windows, rings))
    made = {pair: decode_mask(positions, key_len, kv_heads, dtype, key_index, *pair) for pair in set(layers)}
    return [made[pair] for pair in layers]
