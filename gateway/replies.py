"""The HTTP routes' side of the core: requests started together, their replies as one async
iterator, gathered into whole answers, and cancelled when the client goes away."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from splitserve.common import protocol as P
from splitserve.common.params import NORMAL_FINISH

from .api_errors import ApiError
from .frontdoor import FrontDoor


class Replies:
    """Requests submitted together (OpenAI's `n` and prompt lists; one for TGI), their replies
    merged in arrival order as (choice index, TokenBatch). Raises ApiError when a submission is
    refused (the ones before it are cancelled) or a request fails."""

    def __init__(self, door: FrontDoor, route: str, msgs: list[P.Generate], same_prompt: int = 1):
        """`same_prompt`: consecutive requests in groups of this many share a prompt, and so a prefill."""
        self.door = door
        # (choice, reply) in arrival order; the reader waits on `wake` only while this is empty,
        # so a reply costs an append, not a queue's bookkeeping and a wake-up each
        self.ready: deque[tuple[int | None, object]] = deque()
        self.wake: asyncio.Future | None = None
        self.gids: list[str] = []
        self.running: set[int] = set()
        for i, msg in enumerate(msgs):
            fork_of = self.gids[i - i % same_prompt] if i % same_prompt else None
            gid = door.submit(route, msg, lambda out, i=i: self._put(i, out), fork_of, dispatch=False)
            if gid is None:
                # a refusal reaches the sink before submit returns, with nothing else queued since
                # (no await in between): it is the newest item
                refusal = self.ready.pop()[1]
                self.close()
                raise ApiError(refusal.error_type, refusal.message, metered=True)
            self.gids.append(gid)
            self.running.add(i)
        door.dispatch()

    def _put(self, i: int | None, out) -> None:
        self.ready.append((i, out))
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def __aiter__(self) -> AsyncIterator[tuple[int, P.TokenBatch]]:
        ready = self.ready
        while self.running:
            while not ready:
                self.wake = asyncio.get_running_loop().create_future()
                await self.wake
            i, out = ready.popleft()
            if i is None:  # closed while waiting
                return
            if isinstance(out, P.Error):
                self.running.discard(i)
                self.close()
                raise ApiError(out.error_type, out.message, metered=True)
            if out.finish_reason is not None:
                self.running.discard(i)
                if out.finish_reason not in NORMAL_FINISH:
                    self.close()
                    raise ApiError("incomplete_generation", f"the request ended unfinished: {out.finish_reason}",
                                   metered=True)
            yield i, out

    def close(self, outcome: str = "cancelled") -> None:
        """Cancel what is still running; idempotent. `outcome`: as for FrontDoor.cancel."""
        for i in sorted(self.running):
            self.door.cancel(self.gids[i], outcome=outcome)
        if self.running:
            self.running.clear()
            self._put(None, None)


@dataclass
class Answer:
    """One choice's replies, gathered."""

    tokens: list[P.Token] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    seed: int | None = None
    prompt_logprobs: list[float | None] | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache spared computing
    chars: int = 0  # length of the text so far

    def add(self, batch: P.TokenBatch) -> None:
        self.tokens.extend(batch.tokens)
        self.chars += sum(len(t.text) for t in batch.tokens)
        if batch.finish_reason is not None:
            self.finish_reason = batch.finish_reason
        if batch.prompt_tokens:
            self.prompt_tokens = batch.prompt_tokens
        if batch.seed is not None:
            self.seed = batch.seed
        if batch.prompt_logprobs is not None:
            self.prompt_logprobs = batch.prompt_logprobs
        if batch.cached_tokens:
            self.cached_tokens = batch.cached_tokens

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


async def gather(replies: Replies, n: int, request: Request) -> list[Answer]:
    """Every choice to its end; the requests are cancelled if the client disconnects first."""
    answers = [Answer() for _ in range(n)]
    watcher = asyncio.create_task(close_on_disconnect(request.receive, replies))
    try:
        async for i, batch in replies:
            answers[i].add(batch)
    finally:
        watcher.cancel()
        replies.close()
    return answers


async def close_on_disconnect(receive: Receive, replies: Replies) -> None:
    """Close `replies` (cancelling its requests) when the HTTP client goes away; the body has
    been read, so the next ASGI message is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass
    replies.close()


class Json(JSONResponse):
    """JSON as the event streams write it (msgspec): a number that is not finite, such as the -inf
    logprob of an alternative a top-k filter removed, is null, where Python's encoder would fail."""

    def render(self, content) -> bytes:
        return msgspec.json.encode(content)


RAW_SEND = "splitserve.raw_send"  # the scope key under which `with_raw_send` leaves the server's send


def with_raw_send(app: ASGIApp) -> ASGIApp:
    """`app` with the server's own `send` in every scope, for EventStream's events and WebSocket frames."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await app(scope, receive, send)

    return asgi


class EventStream(Response):
    """Server-sent events; the requests behind them are cancelled when the client disconnects
    or the stream ends any other way.

    The response starts with its first event. An ApiError before it (the router refusing what the
    frontend's own check let through, a prefill that failed) leaves `__call__` before anything was
    sent, for the app's handler to answer as an HTTP error in the API's shape, as it would have
    been before the stream; one after it goes out as the event `error_event(e)`.

    The response's start goes through the middlewares' `send` (they learn that the response has
    started), the events through the server's own (`with_raw_send`): each middleware wraps `send`
    in a coroutine of its own, a hop per event per stream for nothing."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], replies: Replies, error_event: Callable[[ApiError], bytes]):
        # no Response.__init__: it would render an empty body and declare its length, 0
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.replies, self.error_event = events, replies, error_event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get(RAW_SEND, send)
        # uvicorn (ASGI 2.3) drops what is sent after a disconnect: the disconnect is heard on receive
        watcher = asyncio.create_task(close_on_disconnect(receive, self.replies))
        events = aiter(self.events)
        try:
            first = await anext(events, None)  # an ApiError here is the app handler's
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                if first is not None:
                    await raw({"type": "http.response.body", "body": first, "more_body": True})
                    async for chunk in events:
                        await raw({"type": "http.response.body", "body": chunk, "more_body": True})
            except ApiError as e:
                await raw({"type": "http.response.body", "body": self.error_event(e), "more_body": True})
            await raw({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # a server whose send raises on a disconnect (ASGI 2.4)
            pass
        finally:
            watcher.cancel()
            self.replies.close()
