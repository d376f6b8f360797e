"""A request's output text, token by token: incremental detokenization, then stop strings.

Deterministic, so a second process can replay a token it did not emit (the decode worker
replays the first token, which the prefill worker already sent) and arrive at the same state.
A resumed request replays the tokens its earlier attempt generated the same way, so its text
(held-back characters, a stop string spanning the break) continues as if nothing happened.
"""

from __future__ import annotations

from .params import Finish
from .request import GenerateRequest, TokenEvent
from .stopping import StopStringMatcher
from .tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, request: GenerateRequest):
        self.request = request
        original_prompt = request.prompt_ids[:len(request.prompt_ids) - request.resumed]
        self.detok = IncrementalDetokenizer(tokenizer, original_prompt, skip_special_tokens=True)
        self.stops = StopStringMatcher(request.stop, request.strip_stop)
        self.index = 0
        self.done = False
        self.slot: int | None = None  # the decode slot holding its KV, once admitted
        for token in request.prompt_ids[len(original_prompt):]:
            self.event(token, Finish.NONE)

    def event(self, token: int, finish: int, logprob=None, top=None) -> TokenEvent:
        """The event for the next token; a stop string in the text overrides `finish` (a Finish
        code, or its int as an engine's step reports it). A token that ends the answer as an
        end-of-sequence or stop token adds no text: a fill-in-the-middle format's end tokens
        (`<|fim_pad|>`, `<file_sep>`, ...) are plain added tokens that would otherwise show."""
        finish = Finish(finish) if finish else Finish.NONE
        if finish in (Finish.EOS, Finish.STOP_TOKEN):
            text, matched = "", False
        else:
            text, matched = self.stops.feed(self.detok.add([token]))
        if matched:
            finish = Finish.STOP_STRING
        elif finish:
            text += self.stops.feed(self.detok.flush())[0] + self.stops.flush()
        ev = TokenEvent(self.request.id, self.index, token, text, finish, logprob, top)
        self.index += 1
        self.done = finish != Finish.NONE
        return ev


def first_token_finish(request: GenerateRequest, token: int, eos: tuple[int, ...]) -> Finish:
    """Token-level stop checks for the token sampled at prefill; `eos`: the model's end ids."""
    if not request.ignore_eos and token in eos:
        return Finish.EOS
    if token in request.stop_token_ids:
        return Finish.STOP_TOKEN
    return Finish.LENGTH if request.max_new_tokens <= 1 else Finish.NONE
