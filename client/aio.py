"""The asyncio client: many concurrent requests over one connection, bound to one event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial

import zmq
import zmq.asyncio

from splitserve.common.protocol import Cancel, Error, Generate, encode

from ._core import (HELD_RETRY_MS, MAX_MESSAGE_BYTES, Response, Routes, StreamBase, dealer, decode_replies, endpoints,
                    new_generate)
from .errors import UnavailableError


class AsyncStream(StreamBase):
    """Iterates one request's StreamEvents with `async for`. Closing it (`close()`/`aclose()`,
    leaving an `async with` block, or dropping it) cancels the request."""

    def __init__(self, msg: Generate, inbox: asyncio.Queue, cancel, cancel_later):
        super().__init__(msg, cancel)
        self._inbox = inbox
        self._cancel_later = cancel_later

    def __del__(self):
        # the garbage collector may run in the middle of the socket's own code, or in another
        # thread: leave the Cancel to the loop
        self._cancel = self._cancel_later
        self.close()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self):
        while not self._ready:
            if self._over:
                raise StopAsyncIteration
            self._take(await self._receive())
        return self._ready.popleft()

    async def _receive(self):
        try:
            return await asyncio.wait_for(self._inbox.get(), self._remaining())
        except asyncio.TimeoutError:
            raise self._timed_out() from None

    async def response(self) -> Response:
        """Wait for the end of the request; the whole of it, including events already iterated."""
        async for _ in self:
            pass
        return self._response()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class AsyncClientBase:
    """generate/stream/close for the asyncio clients, as SyncClientBase is for the blocking ones; a
    subclass sends a request in `_start`, cancels one in `_cancel`, lets go of its connection in
    `_release`, and sets `_api_key`, `_loop`, `_tasks` (its background tasks) and `_closed`."""

    async def generate(self, prompt: str | None = None, **options) -> Response:
        """Run one request to its end. Options: see `splitserve.client._core.new_generate`."""
        async with self.stream(prompt, **options) as stream:
            return await stream.response()

    def stream(self, prompt: str | None = None, **options) -> AsyncStream:
        """Start one request (call it from a coroutine) and iterate its tokens with `async for`."""
        self._check_open()
        msg = new_generate(prompt, **options)
        msg.api_key = self._api_key
        inbox: asyncio.Queue = asyncio.Queue()
        self._start(msg, inbox)
        return AsyncStream(msg, inbox, self._cancel, self._cancel_later)

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the client is closed")

    def _cancel_later(self, request_id: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._cancel, request_id)
        except RuntimeError:  # the loop is closed, and its requests with it
            pass

    async def close(self) -> None:
        """Close the connection; requests still running fail with UnavailableError."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._release()

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncClient(AsyncClientBase):
    """A connection to a gateway's client port for asyncio code, or to several (a gateway's
    frontends each have one), over which requests are spread. One reader task per connection
    hands each reply to the request it belongs to; they start with the first request, on that
    request's loop."""

    def __init__(self, endpoint: str | Sequence[str], api_key: str | None = None, *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._api_key = api_key
        self._ctx = zmq.asyncio.Context()
        self._max_message_bytes = max_message_bytes
        found = endpoints(endpoint)
        self._endpoints: list[str] = []  # per connection
        self._socks: list[zmq.asyncio.Socket] = []
        self._watches: list[zmq.asyncio.Socket] = []
        self._routes: Routes[asyncio.Queue] = Routes(len(found))
        for e in found:
            self._open(e)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []  # a reader and a watcher per connection
        self._closed = False

    def _open(self, endpoint: str) -> None:
        sock, watch = dealer(self._ctx, endpoint, self._max_message_bytes)
        self._socks.append(sock)
        self._watches.append(watch)
        self._endpoints.append(endpoint)

    def _start(self, msg: Generate, inbox: asyncio.Queue) -> None:
        self._start_readers()
        frame = encode(msg)
        self._send(msg.id, frame, self._routes.add(msg, inbox, frame))

    def _start_readers(self) -> None:
        if not self._tasks or any(r.done() for r in self._tasks):  # done: one died; new requests need it
            self._loop = asyncio.get_running_loop()
            for r in self._tasks:
                r.cancel()
            self._tasks = [self._loop.create_task(task(i)) for task in (self._read, self._watch)
                           for i in range(len(self._socks))]

    async def _read(self, connection: int) -> None:
        try:
            while True:
                for msg in decode_replies(await self._socks[connection].recv_multipart()):
                    self._deliver(msg, connection)
                    # A reply already queued on the socket completes the next receive at once, without
                    # passing through the loop: a reader behind by a step would read every reply queued
                    # before any stream ran, and hand each stream two tokens at once, the first late.
                    await asyncio.sleep(0)
        finally:
            self._deliver(Error("", "unavailable", "the client was closed"), connection)

    async def _watch(self, connection: int) -> None:
        while True:
            event = await self._watches[connection].recv_multipart()
            down, ended, again = self._routes.watched(connection, event, self._endpoints[connection])
            for inbox in ended:
                inbox.put_nowait(down)
            for request_id, frame, target in again:
                self._send(request_id, frame, target)

    def _deliver(self, msg, connection: int) -> None:
        again = self._routes.redirect(msg, connection)
        if again is not None:
            if len(self._socks) < self._routes.connections:  # the spare, to open now, with its tasks
                self._open(self._endpoints[0])
                spare = len(self._socks) - 1
                self._tasks += [self._loop.create_task(task(spare)) for task in (self._read, self._watch)]
            self._send(msg.id, *again)
            return
        for inbox in self._routes.deliver(msg, connection):
            inbox.put_nowait(msg)

    def _send(self, request_id: str, frame: bytes, connection: int) -> None:
        # NOBLOCK: queued in order at once, or not at all (Again: no connection made, or a full
        # queue), never later, when the client may have given up on it
        sent = self._socks[connection].send(frame, zmq.NOBLOCK)
        sent.add_done_callback(partial(self._sent, request_id, connection))

    def _sent(self, request_id: str, connection: int, done: asyncio.Future) -> None:
        if done.cancelled() or done.exception() is None:
            return
        if isinstance(done.exception(), zmq.Again):  # not sent: held (or ended, or sent elsewhere, meanwhile)
            if self._routes.hold(request_id, connection) and self._routes.up[connection]:
                # made, but not ready yet or full: again shortly; else once it is made (_watch)
                self._loop.call_later(HELD_RETRY_MS / 1000, self._send_held, connection)
            return
        self._deliver(Error(request_id, "unavailable", f"could not send: {done.exception()}"), connection)

    def _send_held(self, connection: int) -> None:
        if not self._closed and self._routes.up[connection]:
            for request_id, frame in self._routes.take_held(connection):
                self._send(request_id, frame, connection)

    def _cancel(self, request_id: str) -> None:
        connection = self._routes.pop(request_id)
        if connection is not None and not self._closed:  # else it has already ended
            self._send(request_id, encode(Cancel(request_id)), connection)

    async def _release(self) -> None:
        for sock in self._socks + self._watches:
            sock.close(linger=0)
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self
