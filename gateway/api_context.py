"""What the HTTP and WebSocket routes share: the way into the core, the tokenizer, the limits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, TypeVar

from starlette.requests import Request

from splitserve.common.fim import Fim, find_fim
from splitserve.common.params import Limits
from splitserve.common.tokenizer import Tokenizer

from . import off_loop
from .auth import ApiKey
from .frontdoor import FrontDoor

T = TypeVar("T")


@dataclass
class ApiContext:
    door: FrontDoor
    tokenizer: Tokenizer
    limits: Limits
    model_id: str  # the name clients see: --model as given
    chat_template: str | None
    api_key: ApiKey | None = None  # required of clients when set
    started: int = field(default_factory=lambda: int(time.time()))
    fim: Fim | None = field(init=False)  # the tokenizer's fill-in-the-middle layout, if it has one

    def __post_init__(self):
        self.fim = find_fim(self.tokenizer)
        # Per-token strings for details and logprobs: the same few thousand ids recur.
        self.piece = lru_cache(maxsize=65536)(self._piece)
        self.is_special = lru_cache(maxsize=65536)(self._is_special)

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _is_special(self, token_id: int) -> bool:
        return self._piece(token_id) != "" and self.tokenizer.decode([token_id], skip_special_tokens=True) == ""

    async def prepare(self, request: Request, build: Callable[..., T], *args) -> T:
        """build(*args), a request's validation and tokenization: on the tokenizer thread when its
        body is long (off_loop), or of a length not given (chunked)."""
        size = int(request.headers.get("content-length", off_loop.LONG_TEXT + 1))
        return await off_loop.start(build, *args) if off_loop.is_long(size) else build(*args)

    @property
    def core(self):
        return self.door.core
