"""Attention kernels: packed variable-length causal prefill, and decode over a static KV pool.

Prefill picks, once, the fastest kernel the process has: the `flash-attn` package's
varlen kernel, PyTorch's bundled FlashAttention varlen op on CUDA, else SDPA per prompt (CPU).
Decode always uses batched matmuls over the pool's contiguous slot prefix: with multi-query
attention `q @ kᵀ` is one batched GEMM per layer and the cache is read in place.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# (q [T, H, D], k [T, KVH, D], v [T, KVH, D], cu_seqlens int32 [B+1], seqlens, max_seqlen, scale)
#   -> [T, H, D]
PrefillAttention = Callable[..., torch.Tensor]


def sdpa_prefill(q, k, v, cu_seqlens, seqlens: list[int], max_seqlen: int, scale: float) -> torch.Tensor:
    """One causal SDPA call per prompt: the CPU twin of the varlen kernels."""
    out = torch.empty_like(q)  # [T, H, D]
    heads = q.shape[1]
    start = 0
    for n in seqlens:
        end = start + n
        # 4-D with K/V expanded to every head (a view): on the CPU this takes SDPA's fused
        # kernel, several times faster than its enable_gqa path for multi-query attention.
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None],  # [1, H, n, D]
            k[start:end].transpose(0, 1)[None].expand(1, heads, n, -1),
            v[start:end].transpose(0, 1)[None].expand(1, heads, n, -1),
            is_causal=True,
            scale=scale,
        )
        out[start:end] = o[0].transpose(0, 1)
        start = end
    return out


def _flash_attn_prefill() -> PrefillAttention | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def prefill(q, k, v, cu_seqlens, seqlens, max_seqlen, scale):
        # flash-attn takes fewer K/V heads than query heads natively (MQA/GQA).
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True
        )

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

        def prefill(q, k, v, cu_seqlens, seqlens, max_seqlen, scale):
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                               window_size=(-1, 0), enable_gqa=k.shape[1] != q.shape[1])

        return prefill

    def prefill(q, k, v, cu_seqlens, seqlens, max_seqlen, scale):
        # (q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask) -> (out, lse, ...)
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                       0.0, True, False, scale=scale)[0]

    return prefill


def choose_prefill_attention(device: torch.device) -> tuple[str, PrefillAttention]:
    if device.type == "cuda":
        for name, make in (("flash-attn varlen", _flash_attn_prefill), ("torch varlen", _torch_varlen_prefill)):
            fn = make()
            if fn is not None:
                log.info("prefill attention: %s", name)
                return name, fn
    log.info("prefill attention: sdpa per prompt")
    return "sdpa", sdpa_prefill


def decode_mask(positions: torch.Tensor, key_len: int, kv_heads: int, dtype: torch.dtype,
                key_index: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask hiding each row's keys past its own position (the key bucket's tail).

    positions [B] -> [B * KVH, 1, key_len]. key_index: a cached arange of at least key_len.
    """
    if key_index is None:
        key_index = torch.arange(key_len, device=positions.device)
    hidden = key_index[:key_len] > positions[:, None, None]  # [B, 1, key_len]
    mask = torch.zeros(hidden.shape, dtype=dtype, device=positions.device).masked_fill_(hidden, float("-inf"))
    return mask.repeat_interleave(kv_heads, 0) if kv_heads > 1 else mask
