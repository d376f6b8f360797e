"""Refuse generation requests the core would refuse anyway (overloaded, draining, no workers) as
they arrive, an ASGI middleware in front of the routes. Under overload refusals are most of the
traffic; read, parsed, validated and tokenized first, each would take CPU from the admitted
requests' tokens. The core refuses in the same order, before it validates.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .api_errors import ApiError
from .http_guard import Refuse

GENERATE_PATHS = frozenset({"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"})


class LoadShed:
    def __init__(self, app: ASGIApp, rejection: Callable[[], tuple[str, str] | None], refuse: Refuse):
        self.app, self.rejection, self.refuse = app, rejection, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATE_PATHS:
            reject = self.rejection()
            if reject is not None:
                await self.refuse(scope["path"], ApiError(*reject))(scope, receive, send)
                return
        await self.app(scope, receive, send)
