"""What a request may ask for and the limits on it: sampling parameters, seeds, finish reasons and
request limits, each written once here. Imports no torch, so that the wire protocol, the client
library and the gateway stay light.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, Literal

# ---- limits on one request -------------------------------------------------------------------

MAX_TOP_N = 5  # alternatives per generated token (top_n_tokens, OpenAI's logprobs)
MAX_STOP_SEQUENCES = 4  # stop strings, as TGI allows
# Stop token ids a client may give; the server may add its own (a fill-in-the-middle format's end
# tokens) up to STOP_IDS_PER_REQUEST. The decode worker keeps a fixed table of that many per slot,
# beside the model's end-of-sequence ids, so that stop checks are one tensor comparison per step.
MAX_STOP_TOKEN_IDS = 8
STOP_IDS_PER_REQUEST = 16
# Seeds are int64 on the workers and must stay non-negative: [0, 2**63).
SEED_LIMIT = 1 << 63
# Sampling parameters are float32 and int64 tensors on the workers; what does not fit there is
# refused at the front door, where the client hears why, not on a worker mid-batch.
FLOAT32_MAX = 3.4028234663852886e38
MAX_TOP_K = 2**31 - 1
# Token biases one request may give (OpenAI's logit_bias, llama.cpp's): each a (token id, bias) pair;
# a bias is in [-MAX_LOGIT_BIAS_VALUE, MAX_LOGIT_BIAS_VALUE], as OpenAI's, or -inf (llama.cpp's `false`:
# never this token).
MAX_LOGIT_BIAS = 1024
MAX_LOGIT_BIAS_VALUE = 100.0
# A temperature this close to 0 divides logits past float32's range: greedy is its limit.
MIN_TEMPERATURE = 1e-5


class ValidationError(ValueError):
    """A request the server refuses; the message says what was wrong and what the limit is."""


@dataclass(frozen=True)
class Limits:
    """Token limits of a deployment, derived from one place: a KV slot holds max_total_tokens."""

    max_total_tokens: int  # a KV slot's length: prompt + generated tokens
    max_input_tokens: int
    prefill_token_budget: int  # tokens packed into one prefill pass; also the staging size

    @classmethod
    def derive(cls, n_positions: int, max_total_tokens: int = 0, max_input_tokens: int = 0,
               prefill_token_budget: int = 0) -> Limits:
        total = max_total_tokens or n_positions
        if total > n_positions:
            raise ValueError(f"max_total_tokens {total} exceeds the model's {n_positions} positions")
        max_input = max_input_tokens or total - 1
        if not 0 < max_input < total:
            raise ValueError(f"max_input_tokens {max_input} must be below max_total_tokens {total}")
        # A resumed request re-prefills its prompt plus what it generated: up to a whole slot.
        budget = max(prefill_token_budget, total)
        return cls(total, max_input, budget)

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise ValidationError("the prompt is empty: at least one token is needed")
        if prompt_len > self.max_input_tokens:
            raise ValidationError(
                f"the prompt has {prompt_len} tokens; at most {self.max_input_tokens} are allowed (max_input_tokens)"
            )
        if max_new_tokens < 1:
            raise ValidationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens > self.max_total_tokens:
            raise ValidationError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
                f"exceeds max_total_tokens {self.max_total_tokens}"
            )


# ---- why a sequence ended --------------------------------------------------------------------

# What clients and the protocol see. "timeout" and "shutdown" come from workers (a deadline that
# passed; work a draining worker hands back), never from the engines.
FinishReason = Literal["length", "eos_token", "stop_sequence", "cancelled", "timeout", "shutdown", "error"]
# A request that ended with one of these ran to its end; any other reason cut it short.
NORMAL_FINISH: frozenset[FinishReason] = frozenset({"length", "eos_token", "stop_sequence"})


class Finish(IntEnum):
    """The engines' finish codes: ints, because they are computed in tensors. A larger stop code
    outranks LENGTH when both happen at one token."""

    NONE = 0
    LENGTH = 1
    EOS = 2
    STOP_TOKEN = 3
    STOP_STRING = 4
    CANCELLED = 5
    ERROR = 6

    @property
    def reason(self) -> FinishReason | None:
        return _REASONS[self]


_REASONS: dict[Finish, FinishReason | None] = {
    Finish.NONE: None, Finish.LENGTH: "length", Finish.EOS: "eos_token", Finish.STOP_TOKEN: "stop_sequence",
    Finish.STOP_STRING: "stop_sequence", Finish.CANCELLED: "cancelled", Finish.ERROR: "error",
}


# ---- sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; greedy when do_sample is False or temperature == 0."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    typical_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    frequency_penalty: float = 0.0  # 0.0 = off
    seed: int = 0
    do_sample: bool = False
    min_p: float = 0.0  # 0.0 = off
    presence_penalty: float = 0.0  # 0.0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), distinct ids
    # False: the frequency and presence penalties count the answer's tokens only (OpenAI's); the
    # repetition penalty counts the prompt's too either way (as transformers, TGI and vLLM)
    penalize_prompt: bool = True
    # > 0: the penalties count only the last this many tokens, of the prompt and the answer
    # (llama.cpp's repeat_last_n); 0: all of them
    penalty_last_n: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        _check_logit_bias(self.logit_bias)
        if self.penalty_last_n < 0:
            raise ValueError(f"penalty_last_n must be >= 0 (0: every token), got {self.penalty_last_n}")
        if self.penalty_last_n and not self.penalize_prompt:
            raise ValueError("penalty_last_n counts the prompt's tokens too: it needs penalize_prompt")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def of(cls, row: Any) -> SamplingParams:
        """Accept a SamplingParams, a dict or any object with (some of) these attribute names."""
        if isinstance(row, cls):
            return row
        names = [f.name for f in fields(cls)]
        if isinstance(row, dict):
            return cls(**{n: row[n] for n in names if n in row})
        return cls(**{n: getattr(row, n) for n in names if hasattr(row, n)})


def _check_logit_bias(pairs: tuple[tuple[int, float], ...]) -> None:
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {len(pairs)}")
    if len({t for t, _ in pairs}) < len(pairs):
        raise ValueError("logit_bias names a token twice")
    for token, bias in pairs:
        if token < 0:
            raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
        if not (abs(bias) <= MAX_LOGIT_BIAS_VALUE or bias == float("-inf")):
            raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}] "
                             f"or -inf, got {bias} for token {token}")


_M64 = (1 << 64) - 1


def derive_seed(seed: int, index: int) -> int:
    """Seed of choice `index` among a request's n choices: deterministic, 63-bit, non-negative."""
    # splitmix64 of the pair; its finalizer is a bijection of 64 bits.
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


def random_seed() -> int:
    """A fresh seed in [0, SEED_LIMIT) for a sampled request that did not give one."""
    return secrets.randbelow(SEED_LIMIT)
