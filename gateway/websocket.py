"""The WebSocket front, /ws: many requests multiplexed by id on one connection, each reply in
the encoding its request came in (a JSON text message or a MessagePack binary one).

    client: {"type": "generate", "id": "a", "prompt": "def f(x):", "parameters": {"max_new_tokens": 8}}
            {"type": "cancel", "id": "a"}
    server: {"type": "tokens", "id": "a", "tokens": [{"index": 0, "token_id": 12, "text": "\\n",
             "logprob": null, "top_tokens": null}], "finish_reason": null, "prompt_tokens": 5, "seed": null,
             "prompt_logprobs": null, "cached_tokens": 0}
            {"type": "error", "id": "a", "error_type": "validation", "message": "..."}

`parameters` takes the ZMQ protocol's GenerateParams fields by name (P.WsGenerate). The
last message of a request has a `finish_reason` or is an error; a cancelled request ends with
finish_reason "cancelled". A message that is not valid is answered with a validation error under
its id, or under id "" (about the connection) when it has none.
Closing the connection cancels its requests. A client that leaves more than OUTBOX_LIMIT_BYTES
of replies unread is closed with code 1013 (try again later) and its requests are cancelled:
the replies would otherwise pile up in the gateway without bound.
When the gateway has an API key, the upgrade carries it (`Authorization: Bearer KEY`, or
`?api_key=KEY` where a browser cannot set headers; a wrong one is refused with 403), or else each
generate message carries it in `api_key` (the client library does); a message without it is
answered with an error of type "unauthorized".
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import msgspec
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from splitserve.common import protocol as P

from .api_context import ApiContext
from .auth import UNAUTHORIZED, ApiKey, admits, bearer
from .frontdoor import FrontDoor
from .replies import RAW_SEND

log = logging.getLogger(__name__)

OUTBOX_LIMIT_BYTES = 8 * 2**20
SLOW_READER_CODE = 1013  # RFC 6455 "try again later"
POLICY_VIOLATION = 1008  # RFC 6455; a wrong API key


_json = msgspec.json.Decoder(P.WsRequest)
_msgpack = msgspec.msgpack.Decoder(P.WsRequest)


_to_msgpack, _to_json = msgspec.msgpack.Encoder(), msgspec.json.Encoder()


def encode(message: msgspec.Struct, binary: bool) -> bytes | str:
    return _to_msgpack.encode(message) if binary else _to_json.encode(message).decode()


def ws_reply(out: P.TokenBatch | P.Error) -> msgspec.Struct:
    """As P.ws_reply, without a dict per token: a reply per request per step is the hot path."""
    if isinstance(out, P.Error):
        return P.ws_reply(out)
    return P.WsTokens(
        id=out.id, finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens, seed=out.seed,
        prompt_logprobs=out.prompt_logprobs, cached_tokens=out.cached_tokens,
        tokens=[P.WsToken(index=t.index, token_id=t.token_id, text=t.text, logprob=t.logprob, top_tokens=t.top_tokens)
                for t in out.tokens])


class _Id(msgspec.Struct):
    id: str = ""


_json_id = msgspec.json.Decoder(_Id)
_msgpack_id = msgspec.msgpack.Decoder(_Id)
# What a frame that fails to decode may raise besides msgspec's own errors: UnicodeDecodeError (a
# ValueError) on a MessagePack string that is not UTF-8, RecursionError past msgspec's depth limit.
MALFORMED = (ValueError, RecursionError)


def read_frame(raw: bytes | str, binary: bool) -> P.WsGenerate | P.WsCancel:
    """The message in a frame; raises one of MALFORMED when there is none."""
    return (_msgpack if binary else _json).decode(raw)


def _id_of(raw: bytes | str, binary: bool) -> str:
    """The id of a message that failed validation, so that only its request fails; "" when it has none."""
    try:
        return (_msgpack_id if binary else _json_id).decode(raw).id
    except MALFORMED:
        return ""


def websocket_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        given = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("api_key")
        if given is not None and not admits(ctx.api_key, given):
            await websocket.close(code=POLICY_VIOLATION)  # before accepting: the upgrade is refused (403)
            return
        await websocket.accept()
        # a connection that showed the key on its upgrade needs it in no message
        await Session(ctx.door, websocket, None if given is not None else ctx.api_key).run()

    return router


class Session:
    """One connection: its requests by the client's ids, and a writer that sends replies in order."""

    def __init__(self, door: FrontDoor, websocket: WebSocket, api_key: ApiKey | None):
        self.door, self.websocket = door, websocket
        self.api_key = api_key  # each generate message must carry it (None: none needs to)
        self.gids: dict[str, str] = {}  # client's id -> gateway id, while running
        # Frames the writer has yet to send; it waits on `wake` only while this is empty, so a
        # frame costs an append, not a queue's bookkeeping and a wake-up each. None: close.
        self.outbox: deque[bytes | str | None] = deque()
        self.wake: asyncio.Future | None = None
        self.backlog = 0  # bytes in the outbox
        self.writer: asyncio.Task | None = None
        self.dropped = False
        self.closing: asyncio.Task | None = None
        self.leaving = False  # its frontend is shutting down: it closes after its last reply

    async def run(self) -> None:
        self.writer = asyncio.create_task(self._write())
        drained = asyncio.create_task(self._leave_when_drained())
        try:
            while True:
                frame = await self.websocket.receive()
                if frame["type"] == "websocket.disconnect":
                    return
                binary = frame.get("bytes") is not None
                raw = frame["bytes"] if binary else frame["text"]
                try:
                    msg = read_frame(raw, binary)
                except MALFORMED as e:
                    self._send(P.Error(_id_of(raw, binary), "validation", f"malformed message: {e}"), binary)
                    continue
                if self.dropped:  # closing: what a slow reader still sends is not taken
                    continue
                if isinstance(msg, P.WsGenerate):
                    self._generate(msg, binary)
                else:
                    self._cancel(msg.id)
        except WebSocketDisconnect:
            return
        finally:
            for gid in list(self.gids.values()):
                self.door.cancel(gid)
            self.gids.clear()
            self.writer.cancel()
            drained.cancel()

    async def _leave_when_drained(self) -> None:
        await self.door.draining.wait()
        self._leave_if_idle()

    def _leave_if_idle(self) -> None:
        """Once its frontend is shutting down, the connection closes as soon as its requests have
        ended, after their last replies: the client connects again, and reaches another frontend.
        (Those still running hold it open; a new request meanwhile is refused.)"""
        if not self.gids and self.door.draining.is_set() and not self.leaving:
            self.leaving = True
            self._push(None)

    def _generate(self, ws_msg: P.WsGenerate, binary: bool) -> None:
        rid = ws_msg.id
        if not admits(self.api_key, ws_msg.api_key):
            self.door.refuse("/ws", "unauthorized")
            self._send(P.Error(rid, "unauthorized", UNAUTHORIZED), binary)
            return
        if rid in self.gids:
            self._send(P.Error(rid, "validation", f"request id {rid!r} is already in use"), binary)
            return
        msg = ws_msg.generate()

        def sink(out) -> None:
            self._send(out, binary)
            if isinstance(out, P.Error) or out.finish_reason is not None:
                self.gids.pop(rid, None)
                self._leave_if_idle()

        gid = self.door.submit("/ws", msg, sink)
        if gid is not None and self.door.core.running(gid):
            self.gids[rid] = gid

    def _cancel(self, rid: str) -> None:
        gid = self.gids.pop(rid, None)
        if gid is not None:
            self.door.cancel(gid, reason="cancelled")

    def _send(self, out, binary: bool) -> None:
        if self.dropped or self.leaving:
            return
        frame = encode(ws_reply(out), binary)
        self.backlog += len(frame)
        if self.backlog > OUTBOX_LIMIT_BYTES:
            self._drop_slow_reader()
            return
        self._push(frame)

    def _push(self, frame: bytes | str | None) -> None:
        self.outbox.append(frame)
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    def _drop_slow_reader(self) -> None:
        log.warning("a WebSocket client left %d bytes of replies unread: closing it", self.backlog)
        self.dropped = True
        for gid in list(self.gids.values()):
            self.door.cancel(gid)
        self.gids.clear()
        self.writer.cancel()  # it is stuck in a send that the client does not read
        self.outbox.clear()  # the unread replies go now
        self.closing = asyncio.get_running_loop().create_task(
            self._close(SLOW_READER_CODE, "replies left unread past the limit"))

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.websocket.close(code, reason)
        except (WebSocketDisconnect, RuntimeError) as e:  # already closed: the reader ends the session
            log.debug("websocket close failed: %s", e)

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        # Frames go through the server's own send: Starlette's adds a state check and each
        # middleware's wrapper a coroutine hop, per frame. The accept and the close still take
        # Starlette's path, so its state stays right.
        send = self.websocket.scope.get(RAW_SEND, self.websocket.send)
        while True:
            while not self.outbox:
                self.wake = loop.create_future()
                await self.wake
            frame = self.outbox.popleft()
            if frame is None:  # every reply before it has gone
                await self._close(P.WS_RESTART, "the frontend is shutting down")
                return
            self.backlog -= len(frame)
            try:
                await send({"type": "websocket.send", "bytes": frame} if isinstance(frame, bytes)
                           else {"type": "websocket.send", "text": frame})
            # closed under us (uvicorn raises ClientDisconnected, an OSError): the reader ends the session
            except (OSError, WebSocketDisconnect, RuntimeError) as e:
                log.debug("websocket send failed: %s", e)
                return
