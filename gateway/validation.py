"""Turn what a client asked for into a GenerateRequest, or say clearly what is wrong."""

from __future__ import annotations

import math
from collections.abc import Collection

from pydantic import BaseModel, model_validator

from splitserve.common import protocol as P
from splitserve.common.params import (
    FLOAT32_MAX,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_K,
    MAX_TOP_N,
    MIN_TEMPERATURE,
    STOP_IDS_PER_REQUEST,
    Limits,
    SamplingParams,
    ValidationError,
    random_seed,
)
from splitserve.common.request import GenerateRequest
from splitserve.common.tokenizer import Tokenizer

FLOAT_PARAMS = ("temperature", "top_p", "typical_p", "min_p", "repetition_penalty", "frequency_penalty",
                "presence_penalty")


def check_token_ids(name: str, ids: list[int], vocab: int) -> None:
    if ids and (min(ids) < 0 or max(ids) >= vocab):  # in C: a long prompt's ids are checked in the event loop
        bad = [t for t in ids if not 0 <= t < vocab]
        raise ValidationError(f"{name} must be in [0, {vocab}); got {bad[:3]}")


def tokenize_prompt(msg: P.Generate, tokenizer: Tokenizer) -> list[int]:
    if msg.prompt_ids is not None:
        return list(msg.prompt_ids)
    if msg.prompt is None:
        raise ValidationError("give a prompt (text) or prompt_ids")
    return tokenizer.encode(msg.prompt)


def sampling_params(p: P.GenerateParams) -> SamplingParams:
    # A temperature this close to 0 divides logits past float32's range: greedy is its limit.
    do_sample = p.do_sample and not 0 <= p.temperature < MIN_TEMPERATURE
    # As TGI does: a sampled request without a seed gets one, so its output is reproducible
    # from the seed reported back (and a resumed request continues identically).
    seed = p.seed if p.seed is not None else (random_seed() if do_sample else 0)
    try:
        return SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
                              min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                              frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
                              seed=seed, do_sample=do_sample, logit_bias=tuple(map(tuple, p.logit_bias)),
                              penalize_prompt=p.penalize_prompt, penalty_last_n=p.penalty_last_n)
    except ValueError as e:
        raise ValidationError(str(e)) from None


def require_unicode(data) -> None:
    """Raise ValueError if a string anywhere in decoded JSON is not valid Unicode: Python's JSON
    parser (the HTTP routes') takes a lone surrogate escape such as "\\ud800", which no tokenizer
    or encoder downstream can. Iterative, as the nesting depth is the client's."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode: a \\uD800-\\uDFFF escape needs its pair") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def schema(**constraints) -> dict:
    """JSON-schema constraints of a field, documented only: the route checks them itself."""
    return {"json_schema_extra": constraints}


class UnicodeOnly(BaseModel):
    """A request body whose strings must all be valid Unicode (see require_unicode)."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data):
        require_unicode(data)
        return data


class NullIsUnset(BaseModel):
    """A request body in which null stands for an option left unset, as many clients send it (TGI,
    OpenAI's and llama.cpp's servers all take it so)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ClientBody(UnicodeOnly, NullIsUnset):
    """Both: the Unicode check first (the first base's validator runs first), so a broken string is
    refused even where its value is null."""


def check_numbers(msg: P.Generate, vocab: int) -> None:
    p = msg.params
    for name in FLOAT_PARAMS:
        value = getattr(p, name)
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise ValidationError(f"{name} must be a finite number of at most {FLOAT32_MAX:.4g} in size, got {value}")
    if not 0 <= p.top_k <= MAX_TOP_K:
        raise ValidationError(f"top_k must be in [0, {MAX_TOP_K}], got {p.top_k}")
    check_token_ids("stop_token_ids", p.stop_token_ids, vocab)
    check_token_ids("logit_bias token ids", [t for t, _ in p.logit_bias], vocab)
    if msg.timeout_s is not None and not (math.isfinite(msg.timeout_s) and msg.timeout_s >= 0):
        raise ValidationError(f"timeout_s must be a number of seconds >= 0 (0: none), got {msg.timeout_s}")


def check_stop_token_ids(ids: list[int], server_ids: Collection[int]) -> None:
    """The client's own stop ids are at most MAX_STOP_TOKEN_IDS; the server's (`server_ids`: the
    tokenizer's fill-in-the-middle end tokens, which a FIM prompt's request carries) come on top,
    STOP_IDS_PER_REQUEST in all."""
    own = sum(t not in server_ids for t in ids)
    if own > MAX_STOP_TOKEN_IDS:
        raise ValidationError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed, got {own}")
    if len(ids) > STOP_IDS_PER_REQUEST:
        raise ValidationError(f"at most {STOP_IDS_PER_REQUEST} stop token ids are allowed with the server's own, "
                              f"got {len(ids)}")


def build_request(rid: str, msg: P.Generate, tokenizer: Tokenizer, limits: Limits,
                  server_stop_ids: Collection[int] = (), reply_to: str = "") -> GenerateRequest:
    """`server_stop_ids`: stop ids the server itself adds to some requests (see check_stop_token_ids);
    `reply_to`: the token endpoint of the frontend that streams it."""
    p = msg.params
    check_numbers(msg, tokenizer.vocab_size)
    ids = tokenize_prompt(msg, tokenizer)
    if p.truncate is not None:
        if p.truncate < 1:
            raise ValidationError(f"truncate must be at least 1, got {p.truncate}")
        ids = ids[-p.truncate :]
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise ValidationError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(p.stop)}")
    check_stop_token_ids(p.stop_token_ids, server_stop_ids)
    if not 0 <= p.top_n_tokens <= MAX_TOP_N:
        raise ValidationError(f"top_n_tokens must be in [0, {MAX_TOP_N}], got {p.top_n_tokens}")
    limits.check(len(ids), p.max_new_tokens)
    if msg.prompt_ids is not None:  # after the length: a prompt far too long is refused without a look at each id
        check_token_ids("prompt_ids", ids, tokenizer.vocab_size)
    if msg.resume:
        if len(msg.resume) >= p.max_new_tokens:
            raise ValidationError(f"resume has {len(msg.resume)} tokens: the request has {p.max_new_tokens} "
                                  "(max_new_tokens), so nothing would be left to generate")
        check_token_ids("resume", msg.resume, tokenizer.vocab_size)
    return GenerateRequest(
        id=rid, prompt_ids=tuple(ids), max_new_tokens=p.max_new_tokens, sampling=sampling_params(p),
        stop_token_ids=tuple(p.stop_token_ids), stop=tuple(p.stop), strip_stop=p.strip_stop,
        ignore_eos=p.ignore_eos, logprobs=p.logprobs, top_n_tokens=p.top_n_tokens,
        prompt_logprobs=p.prompt_logprobs, cache_prompt=p.cache_prompt, reply_to=reply_to,
    )
