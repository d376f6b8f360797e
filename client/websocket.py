"""WebSocket clients with the ZMQ clients' API, for where only HTTP gets through (browsers' networks,
proxies, load balancers): `WebSocketClient` (blocking, thread-safe) and `AsyncWebSocketClient`.

    with WebSocketClient("ws://127.0.0.1:8080/ws") as client:
        print(client.generate("def fib(n):", max_new_tokens=32).text)
        for ev in client.stream("def fib(n):"):
            print(ev.text, end="")

Requests are multiplexed by id on one connection; messages are MessagePack binary frames, or
JSON text with encoding="json" (the messages: WsGenerate ... WsError in splitserve.common.protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading

import msgspec
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect

from splitserve.common import protocol as P
from splitserve.common.protocol import Error, Generate, TokenBatch

from ._core import MAX_MESSAGE_BYTES, Routes
from .aio import AsyncClientBase
from .errors import UnavailableError
from .sync import SyncClientBase


_json = msgspec.json.Decoder(P.WsReply)
_msgpack = msgspec.msgpack.Decoder(P.WsReply)


def _frame(message: msgspec.Struct, binary: bool) -> bytes | str:
    return msgspec.msgpack.encode(message) if binary else msgspec.json.encode(message).decode()


def _decode(frame: bytes | str) -> TokenBatch | Error | None:
    """The reply in a frame as the ZMQ client's message types, or None for anything malformed."""
    try:
        reply = _msgpack.decode(frame) if isinstance(frame, bytes) else _json.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return P.from_ws_reply(reply)


def _check_encoding(encoding: str) -> bool:
    if encoding not in ("msgpack", "json"):
        raise ValueError(f"encoding must be 'msgpack' or 'json', got {encoding!r}")
    return encoding == "msgpack"


CONNECTION_LOST = "the connection to the gateway closed"


class WebSocketClient(SyncClientBase):
    """A connection to a gateway's /ws, usable from many threads at once. A reader thread hands each
    reply to its request; a writer thread sends, so that a stream dropped anywhere (its __del__
    cancels it) never sends on the socket itself."""

    def __init__(self, url: str, api_key: str | None = None, *, encoding: str = "msgpack",
                 open_timeout: float = 10.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._binary = _check_encoding(encoding)
        self._api_key = api_key
        self._stack = contextlib.ExitStack()
        try:
            self._conn = self._stack.enter_context(connect(url, open_timeout=open_timeout, max_size=max_message_bytes,
                                                           compression=None, proxy=None))
        except (OSError, WebSocketException, TimeoutError) as e:
            raise UnavailableError(f"cannot connect to {url}: {e}") from e
        self._routes: Routes[queue.SimpleQueue] = Routes()
        self._lock = threading.Lock()  # the routes, shared by callers and the two threads
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lost = False  # the connection is gone: later requests fail at once
        self._threads = [threading.Thread(target=f, name=f"splitserve-ws-{f.__name__.strip('_')}", daemon=True)
                         for f in (self._read, self._write)]
        for t in self._threads:
            t.start()

    def _start(self, msg: Generate, inbox: queue.SimpleQueue) -> None:
        # the caller holds the lock, so the reader's end cannot slip between the check and the route
        if self._lost:
            inbox.put(Error(msg.id, "unavailable", CONNECTION_LOST))
            return
        self._routes.add(msg.id, inbox)
        self._outbox.put(_frame(P.WsGenerate.of(msg), self._binary))

    def _cancel(self, request_id: str) -> None:
        # only a queue put: this runs from __del__ too, maybe while this thread holds the lock
        self._outbox.put(("cancel", request_id))

    def _read(self) -> None:
        try:
            for frame in self._conn:
                msg = _decode(frame)
                if msg is not None:
                    self._deliver(msg)
        except (OSError, WebSocketException):
            pass
        finally:
            with self._lock:
                self._lost = True
            self._deliver(Error("", "unavailable", CONNECTION_LOST))
            self._outbox.put(None)

    def _deliver(self, msg) -> None:
        with self._lock:
            inboxes = self._routes.deliver(msg)
        for inbox in inboxes:
            inbox.put(msg)

    def _write(self) -> None:
        while (item := self._outbox.get()) is not None:
            if isinstance(item, tuple):
                with self._lock:
                    running = self._routes.pop(item[1]) is not None
                if not running:  # it has already ended
                    continue
                item = _frame(P.WsCancel(item[1]), self._binary)
            try:
                self._conn.send(item)
            except (OSError, WebSocketException):
                return

    def close(self) -> None:
        """Close the connection; requests still running fail with UnavailableError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._outbox.put(None)
        self._stack.close()
        for t in self._threads:
            t.join()

    def __enter__(self) -> WebSocketClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncWebSocketClient(AsyncClientBase):
    """A connection to a gateway's /ws for asyncio code; `await AsyncWebSocketClient.connect(url)`
    or `async with AsyncWebSocketClient(url) as client`."""

    def __init__(self, url: str, api_key: str | None = None, *, encoding: str = "msgpack",
                 open_timeout: float = 10.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._url, self._api_key = url, api_key
        self._binary = _check_encoding(encoding)
        self._connect_options = dict(open_timeout=open_timeout, max_size=max_message_bytes, compression=None,
                                     proxy=None)
        self._stack = contextlib.AsyncExitStack()
        self._routes: Routes[asyncio.Queue] = Routes()
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._lost = False  # the connection is gone: later requests fail at once

    @classmethod
    async def connect(cls, url: str, api_key: str | None = None, **options) -> AsyncWebSocketClient:
        client = cls(url, api_key, **options)
        await client._open()
        return client

    async def _open(self) -> None:
        try:
            self._conn = await self._stack.enter_async_context(aconnect(self._url, **self._connect_options))
        except (OSError, WebSocketException, TimeoutError) as e:
            raise UnavailableError(f"cannot connect to {self._url}: {e}") from e
        self._loop = asyncio.get_running_loop()
        self._tasks = [self._loop.create_task(self._read()), self._loop.create_task(self._write())]

    def _check_open(self) -> None:
        super()._check_open()
        if self._loop is None:
            raise UnavailableError("the client is not connected")

    def _start(self, msg: Generate, inbox: asyncio.Queue) -> None:
        if self._lost:
            inbox.put_nowait(Error(msg.id, "unavailable", CONNECTION_LOST))
        else:
            self._routes.add(msg.id, inbox)
            self._outbox.put_nowait(_frame(P.WsGenerate.of(msg), self._binary))

    def _cancel(self, request_id: str) -> None:
        if self._routes.pop(request_id) is not None and not self._closed:  # else it has already ended
            self._outbox.put_nowait(_frame(P.WsCancel(request_id), self._binary))

    async def _read(self) -> None:
        try:
            async for frame in self._conn:
                msg = _decode(frame)
                if msg is not None:
                    for inbox in self._routes.deliver(msg):
                        inbox.put_nowait(msg)
        except (OSError, WebSocketException):
            pass
        finally:
            self._lost = True
            closed = Error("", "unavailable", CONNECTION_LOST)
            for inbox in self._routes.deliver(closed):
                inbox.put_nowait(closed)

    async def _write(self) -> None:
        while True:
            frame = await self._outbox.get()
            try:
                await self._conn.send(frame)
            except (OSError, WebSocketException):
                return

    async def _release(self) -> None:
        await self._stack.aclose()

    async def __aenter__(self) -> AsyncWebSocketClient:
        if self._loop is None:
            await self._open()
        return self
