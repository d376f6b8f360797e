"""The building blocks every family's forward is made of: norms, activations, rotary position
embeddings. Plain functions; numerics as transformers' (the reference) computes them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .model_config import ModelConfig, Rope


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": _gelu_tanh, "gelu": F.gelu, "relu": F.relu, "silu": F.silu,
}


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm where there is a bias (GPTBigCode, StarCoder2), RMSNorm where there is none."""
    if bias is not None:
        return torch.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return torch.rms_norm(x, (x.shape[-1],), weight, eps)


# ---- rotary position embeddings ---------------------------------------------------------------


def inv_freq(rope: Rope, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """The rotary frequencies [dim / 2] (float32) of `rope`, and the scale of cos and sin (YaRN's
    attention factor; 1 otherwise), computed as transformers computes them."""
    base, factor = rope.theta, rope.factor
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope.rope_type == "dynamic" and max_positions > rope.original_max_positions:
        # NTK scaling at the longest length served (rope_tables uses it past the pretraining length)
        base *= (factor * max_positions / rope.original_max_positions - (factor - 1)) ** (dim / (dim - 2))
    freqs = 1.0 / (base**exponents)  # [dim / 2]
    if rope.rope_type == "linear":
        return freqs / factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(freqs, rope), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim, exponents)
    if rope.rope_type == "longrope":
        return _longrope(rope, exponents, max_positions)
    return freqs, 1.0


def _longrope(rope: Rope, exponents: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, float]:
    # Each frequency divided by its own factor: the long ones where the model serves past its
    # pretraining length (rope_tables keeps the short ones within it), the short ones otherwise.
    # cos and sin are scaled at every position alike, by the extension's factor.
    old = rope.original_max_positions
    factors = torch.tensor(rope.long_factor if max_positions > old else rope.short_factor, dtype=torch.float32)
    if rope.attention_factor is not None:
        scale = rope.attention_factor
    else:
        scale = 1.0 if rope.factor <= 1 else math.sqrt(1 + math.log(rope.factor) / math.log(old))
    return 1.0 / (factors * rope.theta**exponents), scale


def _llama3(freqs: torch.Tensor, rope: Rope) -> torch.Tensor:
    # Long wavelengths are divided by the factor, short ones kept, the band between interpolated.
    old = rope.original_max_positions
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / rope.factor, freqs)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: Rope, dim: int, exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    if rope.attention_factor is not None:
        scale = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        scale = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        scale = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # high frequencies keep their rotation, low ones are interpolated
    pos_freqs = rope.theta**exponents
    freqs = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return freqs, float(scale)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_tables(cfg: ModelConfig, dtype: torch.dtype, device,
                rope: Rope | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin [n_positions, P / 2] of every position (P the rotary width, cfg.rope_dim), in the
    compute dtype (transformers computes them in float32 and casts before use), of `rope` (default:
    cfg.rope); None for a model without rotary embeddings. LongRoPE served past its pretraining
    length has [2 * n_positions, P / 2]: the rows of a long prompt follow (long_rope_prompt)."""
    rope = rope or cfg.rope
    if rope is None:
        return None
    positions = torch.arange(cfg.n_positions, dtype=torch.float32)[:, None]
    freqs, scale = inv_freq(rope, cfg.rope_dim, cfg.n_positions)
    angles = positions * freqs[None, :]  # [P, D / 2]
    if rope.rope_type in ("dynamic", "longrope") and cfg.n_positions > rope.original_max_positions:
        # transformers picks these frequencies for each forward from that forward's length, which a
        # KV cache cannot follow: keys cached earlier keep theirs. Within the pretraining length,
        # where the two agree, that length's frequencies; past it dynamic NTK's at the longest
        # length served (as vLLM does) and longrope's long factors. A longrope request growing past
        # the pretraining length thus goes on as transformers' own cached generation does. A prompt
        # longer than it transformers turns all with the long factors: the second half's rows.
        plain, _ = inv_freq(rope, cfg.rope_dim, rope.original_max_positions)
        within = positions < rope.original_max_positions
        mixed = torch.where(within, positions * plain[None, :], angles)
        angles = torch.cat([mixed, angles]) if rope.rope_type == "longrope" else mixed
    return (angles.cos() * scale).to(device, dtype), (angles.sin() * scale).to(device, dtype)


def query_scales(cfg: ModelConfig, dtype: torch.dtype, device) -> torch.Tensor | None:
    """[n_positions]: each position's query multiplier under Llama 4's attention temperature
    (Rope.llama4_scaling_beta), as transformers computes it; None without one."""
    if cfg.rope is None or not cfg.rope.llama4_scaling_beta:
        return None
    positions = torch.arange(cfg.n_positions)
    scales = 1 + cfg.rope.llama4_scaling_beta * torch.log(1 + torch.floor(positions / cfg.rope.original_max_positions))
    return scales.to(device, dtype)


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of x's last dimension, which transformers' rotate_half convention pairs."""
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of x [..., heads, D] at the positions of cos, sin [..., 1, P / 2]: its
    first P values turned, the rest (partial rotary embeddings) as they are."""
    p = 2 * cos.shape[-1]
    out = torch.empty_like(x)
    rotate_halves(*halves(x[..., :p]), cos, sin, *halves(out[..., :p]))
    if p < x.shape[-1]:
        out[..., p:] = x[..., p:]
    return out


def rotate_halves(x1: torch.Tensor, x2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, o1: torch.Tensor,
                  o2: torch.Tensor) -> None:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) into (o1, o2): a decode step passes views it
    keeps, so that rotating makes no views per layer."""
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
