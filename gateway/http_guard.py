"""The HTTP front's gates, ASGI middlewares that refuse a request before any route reads it.

HttpGuard: a request that lacks the API key on a protected path (401), or whose body is past the
limit (413), so that an unauthenticated or oversized client costs no parsing and no more memory
than the limit. WebSocket connections pass through: /ws checks its key itself (websocket.py).

LoadShed: a generation request the core would refuse anyway (overloaded, draining, no workers).
Under overload refusals are most of the traffic; read, parsed, validated and tokenized first, each
would take CPU from the admitted requests' tokens. The core refuses in the same order, before it
validates.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api_errors import ApiError
from .auth import OPEN_PATHS, UNAUTHORIZED, ApiKey, admits, bearer

Refuse = Callable[[str, ApiError], Response]  # (path, error) -> the response in that API's shape


class HttpGuard:
    def __init__(self, app: ASGIApp, api_key: ApiKey | None, max_body_bytes: int, refuse: Refuse):
        self.app, self.api_key, self.max_body_bytes, self.refuse = app, api_key, max_body_bytes, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path not in OPEN_PATHS and not admits(self.api_key, bearer(_header(scope, b"authorization"))):
            response = self.refuse(path, ApiError("unauthorized", UNAUTHORIZED))
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        if _declared_length(scope) > self.max_body_bytes:
            await self._too_large(path, scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:  # the client left while sending
            return
        if len(body) > self.max_body_bytes:
            await self._too_large(path, scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or as much as is past the limit; None on a disconnect."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes or not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        e = ApiError("payload_too_large", f"the request body is larger than {self.max_body_bytes} bytes")
        await self.refuse(path, e)(scope, receive, send)


GENERATE_PATHS = frozenset({"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions",
                            "/infill"})


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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _declared_length(scope: Scope) -> int:
    try:
        return int(_header(scope, b"content-length") or 0)
    except ValueError:  # the HTTP parser refuses such a request before us; 0 lets the body count decide
        return 0


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` with the body already read given back first; after it, the client's own messages
    (a route waits on them for the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
