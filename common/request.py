"""What an engine is asked to do for one request, and what it reports back per token."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import SamplingParams

# Why a sequence ended. Codes travel in tensors and on the wire; names reach clients.
FINISH_NONE, FINISH_LENGTH, FINISH_EOS, FINISH_STOP_TOKEN, FINISH_STOP_STRING, FINISH_CANCELLED, FINISH_ERROR = range(7)
FINISH_NAMES = {
    FINISH_NONE: None,
    FINISH_LENGTH: "length",
    FINISH_EOS: "eos_token",
    FINISH_STOP_TOKEN: "stop_sequence",
    FINISH_STOP_STRING: "stop_sequence",
    FINISH_CANCELLED: "cancelled",
    FINISH_ERROR: "error",
}


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
    top_n_tokens: int = 0  # alternatives per generated token, at most 5
    prompt_logprobs: bool = False
    # A resumed request (its worker died or shut down): the last `resumed` prompt ids are the
    # tokens an earlier attempt generated and the client already has; output indices continue
    # from there and `max_new_tokens` counts what is left.
    resumed: int = 0

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
    finish: int = FINISH_NONE
    logprob: float | None = None
    top_tokens: list[tuple[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None  # on a request's first event, when asked
