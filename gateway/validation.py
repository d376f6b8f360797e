"""Turn what a client asked for into a GenerateRequest, or say clearly what is wrong."""

from __future__ import annotations

from splitserve.common import protocol as P
from splitserve.common.limits import Limits, ValidationError
from splitserve.common.request import GenerateRequest
from splitserve.common.sampling import MAX_TOP_N, SamplingParams, random_seed
from splitserve.common.tokenizer import Tokenizer

MAX_STOP_SEQUENCES = 4
MAX_STOP_TOKEN_IDS = 8


def tokenize_prompt(msg: P.Generate, tokenizer: Tokenizer) -> list[int]:
    if msg.prompt_ids is not None:
        vocab = tokenizer.vocab_size
        bad = [t for t in msg.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValidationError(f"prompt_ids must be in [0, {vocab}); got {bad[:3]}")
        return list(msg.prompt_ids)
    if msg.prompt is None:
        raise ValidationError("give a prompt (text) or prompt_ids")
    return tokenizer.encode(msg.prompt)


def sampling_params(p: P.GenerateParams) -> SamplingParams:
    # As TGI does: a sampled request without a seed gets one, so its output is reproducible
    # from the seed reported back (and a resumed request continues identically).
    seed = p.seed if p.seed is not None else (random_seed() if p.do_sample else 0)
    try:
        return SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
                              repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
                              seed=seed, do_sample=p.do_sample)
    except ValueError as e:
        raise ValidationError(str(e)) from None


def build_request(rid: str, msg: P.Generate, tokenizer: Tokenizer, limits: Limits) -> GenerateRequest:
    p = msg.params
    ids = tokenize_prompt(msg, tokenizer)
    if p.truncate is not None:
        if p.truncate < 1:
            raise ValidationError(f"truncate must be at least 1, got {p.truncate}")
        ids = ids[-p.truncate :]
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise ValidationError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(p.stop)}")
    if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValidationError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed, got {len(p.stop_token_ids)}")
    if not 0 <= p.top_n_tokens <= MAX_TOP_N:
        raise ValidationError(f"top_n_tokens must be in [0, {MAX_TOP_N}], got {p.top_n_tokens}")
    limits.check(len(ids), p.max_new_tokens)
    return GenerateRequest(
        id=rid, prompt_ids=tuple(ids), max_new_tokens=p.max_new_tokens, sampling=sampling_params(p),
        stop_token_ids=tuple(p.stop_token_ids), stop=tuple(p.stop), strip_stop=p.strip_stop,
        ignore_eos=p.ignore_eos, logprobs=p.logprobs, top_n_tokens=p.top_n_tokens,
        prompt_logprobs=p.prompt_logprobs,
    )
