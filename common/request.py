"""What an engine is asked to do for one request, and what it reports back per token."""

from __future__ import annotations

from dataclasses import dataclass, field

from .params import Finish, SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized text
    strip_stop: bool = False  # OpenAI strips a matched stop string; TGI keeps it
    ignore_eos: bool = False
    logprobs: bool = False  # logprob of each generated token
    top_n_tokens: int = 0  # alternatives per generated token, at most MAX_TOP_N
    prompt_logprobs: bool = False
    # A resumed request (its worker died or shut down): the last `resumed` prompt ids are the
    # tokens an earlier attempt generated and the client already has; output indices continue
    # from there and `max_new_tokens` counts what is left.
    resumed: int = 0
    cache_prompt: bool = True  # false: the prefill worker computes every prompt token, finding none cached
    # where workers send this request's tokens: the token endpoint of the frontend that owns it
    reply_to: str = ""

    @property
    def wants_details(self) -> bool:
        return self.logprobs or self.top_n_tokens > 0


@dataclass
class TokenEvent:
    """One generated token of one request (index counts generated tokens from 0)."""

    request_id: str
    index: int
    token_id: int
    text: str  # the text this token completes; may be empty while a character or stop string is pending
    finish: Finish = Finish.NONE
    logprob: float | None = None
    top_tokens: list[tuple[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None  # on a request's first event, when asked
