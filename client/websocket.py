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
from collections.abc import Collection
from functools import partial

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


def _generate_frame(binary: bool, msg: Generate) -> bytes | str:
    return _frame(P.WsGenerate.of(msg), binary)


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


def _again(routes: Routes, close_code: int | None) -> dict[str, bytes | str]:
    """At a connection's end, the requests it carried to send over a new one: those refused as
    `draining` (held) and every one unanswered when its frontend closed it as it shut down (which
    it does once none of them runs): they never started; and, once, any other (its frontend took
    it or not: the client gets one answer either way; one that streamed goes on after the tokens
    it has), as the ZMQ clients do."""
    held = dict(routes.take_held(0))
    return routes.unanswered() if close_code == P.WS_RESTART else held | routes.lost_once()


class WebSocketClient(SyncClientBase):
    """A connection to a gateway's /ws, usable from many threads at once. A reader thread hands each
    reply to its request; a writer thread sends, so that a stream dropped anywhere (its __del__
    cancels it) never sends on the socket itself. The requests a lost connection carried go over
    a new one at once: as often as a frontend shutting down says they never started (it refuses
    them as `draining`, or closes the connection with WS_RESTART), else once (see _again); the
    others end with UnavailableError, and the next request connects again."""

    def __init__(self, url: str, api_key: str | None = None, *, encoding: str = "msgpack",
                 open_timeout: float = 10.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._binary = _check_encoding(encoding)
        self._url, self._api_key = url, api_key
        self._connect_options = dict(open_timeout=open_timeout, max_size=max_message_bytes, compression=None,
                                     proxy=None)
        self._routes: Routes[queue.SimpleQueue] = Routes(encode=partial(_generate_frame, self._binary))
        self._lock = threading.Lock()  # the routes and the connection, shared by callers and the threads
        self._closed = False
        self._stack: contextlib.ExitStack | None = None  # holds the connection
        self._connect()

    def _connect(self) -> None:
        """A connection and its reader and writer threads, which hold it and its outbox: the threads
        of a lost one never touch the next."""
        stack = contextlib.ExitStack()
        try:
            conn = stack.enter_context(connect(self._url, **self._connect_options))
        except (OSError, WebSocketException, TimeoutError) as e:
            raise UnavailableError(f"cannot connect to {self._url}: {e}") from e
        if self._stack is not None:
            self._stack.close()  # the lost connection's
        self._stack, self._outbox, self._lost = stack, queue.SimpleQueue(), False
        self._threads = [threading.Thread(target=f, args=(conn, self._outbox), daemon=True,
                                          name=f"splitserve-ws-{f.__name__.strip('_')}") for f in (self._read, self._write)]
        for t in self._threads:
            t.start()

    def _start(self, msg: Generate, inbox: queue.SimpleQueue) -> None:
        # the caller holds the lock, so the reader's end cannot slip between the check and the route
        if self._lost:
            try:
                self._connect()
            except UnavailableError as e:
                inbox.put(Error(msg.id, "unavailable", str(e)))
                return
        frame = _generate_frame(self._binary, msg)
        self._routes.add(msg, inbox, frame)
        self._outbox.put(frame)

    def _cancel(self, request_id: str) -> None:
        # only a queue put: this runs from __del__ too, maybe while this thread holds the lock
        self._outbox.put(("cancel", request_id))

    def _read(self, conn, outbox: queue.SimpleQueue) -> None:
        try:
            for frame in conn:
                msg = _decode(frame)
                if msg is not None:
                    self._deliver(msg)
        except (OSError, WebSocketException):
            pass
        finally:
            # Under the lock, so that no request routed to the next connection is ended here: the
            # requests that go again go over a new connection, the others end.
            closed = Error("", "unavailable", CONNECTION_LOST)
            with self._lock:
                self._lost = True
                again = {} if self._closed else _again(self._routes, conn.close_code)
                for inbox in self._routes.deliver(closed, keep=again):
                    inbox.put(closed)
                if again:
                    self._send_again(again)
            outbox.put(None)

    def _send_again(self, frames: dict[str, bytes | str]) -> None:
        try:
            self._connect()
        except UnavailableError as e:
            failed = Error("", "unavailable", str(e))
            for inbox in self._routes.deliver(failed):
                inbox.put(failed)
            return
        for frame in frames.values():
            self._outbox.put(frame)

    def _deliver(self, msg) -> None:
        with self._lock:
            inboxes = self._routes.deliver(msg, 0)  # a refusal as `draining` is held: see _read's end
        for inbox in inboxes:
            inbox.put(msg)

    def _write(self, conn, outbox: queue.SimpleQueue) -> None:
        while (item := outbox.get()) is not None:
            if isinstance(item, tuple):
                with self._lock:
                    running = self._routes.pop(item[1]) is not None
                if not running:  # it has already ended
                    continue
                item = _frame(P.WsCancel(item[1]), self._binary)
            try:
                conn.send(item)
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
    or `async with AsyncWebSocketClient(url) as client`. Connections come and go as for
    WebSocketClient; a request waits in a new connection's outbox while it is made."""

    def __init__(self, url: str, api_key: str | None = None, *, encoding: str = "msgpack",
                 open_timeout: float = 10.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._url, self._api_key = url, api_key
        self._binary = _check_encoding(encoding)
        self._connect_options = dict(open_timeout=open_timeout, max_size=max_message_bytes, compression=None,
                                     proxy=None)
        self._routes: Routes[asyncio.Queue] = Routes(encode=partial(_generate_frame, self._binary))
        self._conn = None  # the current connection
        self._outbox: asyncio.Queue = asyncio.Queue()  # the current connection's
        self._tasks: list[asyncio.Task] = []  # one per connection, while it lasts
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._lost = False  # the connection is gone: the next request connects again

    @classmethod
    async def connect(cls, url: str, api_key: str | None = None, **options) -> AsyncWebSocketClient:
        client = cls(url, api_key, **options)
        await client._open()
        return client

    async def _open(self) -> None:
        """The first connection: failing to make it is the caller's error."""
        self._loop = asyncio.get_running_loop()
        conn = await self._connect()
        self._tasks = [self._loop.create_task(self._serve(conn, self._outbox))]

    async def _connect(self):
        try:
            self._conn = await aconnect(self._url, **self._connect_options)
        except (OSError, WebSocketException, TimeoutError) as e:
            raise UnavailableError(f"cannot connect to {self._url}: {e}") from e
        return self._conn

    def _check_open(self) -> None:
        super()._check_open()
        if self._loop is None:
            raise UnavailableError("the client is not connected")

    def _start(self, msg: Generate, inbox: asyncio.Queue) -> None:
        if self._lost:
            self._new_connection()
        frame = _generate_frame(self._binary, msg)
        self._routes.add(msg, inbox, frame)
        self._outbox.put_nowait(frame)

    def _new_connection(self) -> None:
        self._lost = False
        self._outbox = asyncio.Queue()
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(self._loop.create_task(self._reconnect(self._outbox)))

    def _cancel(self, request_id: str) -> None:
        if self._routes.pop(request_id) is not None and not self._closed:  # else it has already ended
            self._outbox.put_nowait(_frame(P.WsCancel(request_id), self._binary))

    async def _reconnect(self, outbox: asyncio.Queue) -> None:
        try:
            conn = await self._connect()
        except UnavailableError as e:
            self._end_all(str(e))  # the requests that waited for it
            return
        except asyncio.CancelledError:  # closed meanwhile
            self._end_all(CONNECTION_LOST)
            raise
        await self._serve(conn, outbox)

    async def _serve(self, conn, outbox: asyncio.Queue) -> None:
        """Read one connection's replies while its writer sends; when it is lost, its requests end."""
        writer = asyncio.create_task(self._write(conn, outbox))
        try:
            async for frame in conn:
                msg = _decode(frame)
                if msg is not None:
                    for inbox in self._routes.deliver(msg, 0):  # a refusal as `draining` is held
                        inbox.put_nowait(msg)
        except (OSError, WebSocketException):
            pass
        finally:
            writer.cancel()
            # the requests that go again go over a new connection, the others end
            again = {} if self._closed else _again(self._routes, conn.close_code)
            self._end_all(CONNECTION_LOST, keep=again)
            if again:
                self._new_connection()
                for frame in again.values():
                    self._outbox.put_nowait(frame)

    def _end_all(self, message: str, keep: Collection[str] = ()) -> None:
        """The connection is gone, or could not be made: its requests (but those to `keep`) end,
        and the next request connects again."""
        self._lost = True
        closed = Error("", "unavailable", message)
        for inbox in self._routes.deliver(closed, keep=keep):
            inbox.put_nowait(closed)

    async def _write(self, conn, outbox: asyncio.Queue) -> None:
        while True:
            frame = await outbox.get()
            try:
                await conn.send(frame)
            except (OSError, WebSocketException):
                return

    async def _release(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def __aenter__(self) -> AsyncWebSocketClient:
        if self._loop is None:
            await self._open()
        return self
