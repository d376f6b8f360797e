"""The blocking client: safe to share between threads, many requests over one connection."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from operator import methodcaller

import zmq

from splitserve.common.protocol import Cancel, Error, Generate, encode

from ._core import (HELD_RETRY_MS, MAX_MESSAGE_BYTES, Response, Routes, StreamBase, dealer, decode_replies, endpoints,
                    new_generate)
from .errors import UnavailableError


class _Mailbox:
    """Commands for the IO thread, from any thread.

    A SimpleQueue plus a socket pair to wake the thread's poller, rather than an inproc zmq
    socket: both are safe to use from several threads at once and from `__del__` (a dropped
    stream cancels its request), which a zmq socket is not."""

    def __init__(self):
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wake, self._waker = socket.socketpair()
        self.wake.setblocking(False)
        self._waker.setblocking(False)

    def put(self, command: methodcaller) -> None:
        self._commands.put(command)
        try:
            self._waker.send(b"\0")
        except OSError:  # full: a wake-up is already pending; closed: the client is gone
            pass

    def take_all(self) -> list[methodcaller]:
        # read the wake-ups before the queue, so that a command put meanwhile wakes the poller again
        try:
            while self.wake.recv(4096):
                pass
        except BlockingIOError:
            pass
        commands = []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def close(self) -> None:
        self.wake.close()
        self._waker.close()


class _IOLoop:
    """The IO thread: the only code that touches the DEALER sockets (one per endpoint, and the
    spare: see Routes) and the table of requests."""

    def __init__(self, endpoints: list[str], connect: Callable[[str], tuple[zmq.Socket, zmq.Socket]],
                 mailbox: _Mailbox):
        self._connect = connect
        self._endpoints: list[str] = []  # per connection
        self._socks: list[zmq.Socket] = []
        self._watches: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        self._mailbox = mailbox
        self._routes: Routes[queue.SimpleQueue] = Routes(len(endpoints))
        for endpoint in endpoints:
            self._open(endpoint)
        self._running = True

    def _open(self, endpoint: str) -> None:
        sock, watch = self._connect(endpoint)
        for s, into in ((sock, self._socks), (watch, self._watches)):
            into.append(s)
            self._poller.register(s, zmq.POLLIN)
        self._endpoints.append(endpoint)

    def run(self) -> None:
        poller = self._poller
        wake = self._mailbox.wake.fileno()  # a plain socket comes back from poll() as its fd
        poller.register(wake, zmq.POLLIN)
        try:
            while self._running:
                # requests held for a connection that is up are tried again shortly (Routes.hold)
                for item, _ in poller.poll(HELD_RETRY_MS if self._routes.held_up() else None):
                    if item == wake:
                        for command in self._mailbox.take_all():
                            command(self)
                    elif item in self._watches:
                        self._watched(self._watches.index(item))
                    else:
                        self._receive(self._socks.index(item))
                for connection in self._routes.held_up():
                    for request_id, frame in self._routes.take_held(connection):
                        self._send(request_id, frame, connection)
        finally:
            self._deliver(Error("", "unavailable", "the client was closed"))
            for sock in self._socks + self._watches:
                sock.close(linger=0)

    def _watched(self, connection: int) -> None:
        for event in _waiting(self._watches[connection]):
            down, ended, again = self._routes.watched(connection, event, self._endpoints[connection])
            for inbox in ended:
                inbox.put(down)
            for request_id, frame, target in again:
                self._send(request_id, frame, target)

    def _receive(self, connection: int) -> None:
        for frames in _waiting(self._socks[connection]):
            for msg in decode_replies(frames):
                self._deliver(msg, connection)

    def _deliver(self, msg, connection: int | None = None) -> None:
        again = self._routes.redirect(msg, connection)
        if again is not None:
            if len(self._socks) < self._routes.connections:  # the spare, to open now
                self._open(self._endpoints[0])
            self._send(msg.id, *again)
            return
        for inbox in self._routes.deliver(msg, connection):
            inbox.put(msg)

    def _send(self, request_id: str, frame: bytes, connection: int) -> None:
        try:
            self._socks[connection].send(frame, zmq.NOBLOCK)
        except zmq.Again:
            # not sent now (no connection made, or its queue full): held, rather than block this
            # thread, which every other request needs
            self._routes.hold(request_id, connection)

    # ---- commands (run in this thread, put by _Mailbox) ----

    def start(self, msg: Generate, frame: bytes, inbox: queue.SimpleQueue) -> None:
        self._send(msg.id, frame, self._routes.add(msg, inbox, frame))

    def cancel(self, request_id: str) -> None:
        connection = self._routes.pop(request_id)
        if connection is not None:  # else it has already ended
            self._send(request_id, encode(Cancel(request_id)), connection)

    def stop(self) -> None:
        self._running = False


def _waiting(sock: zmq.Socket) -> Iterator[list[bytes]]:
    """Every message waiting on `sock`, without blocking."""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


class Stream(StreamBase):
    """Iterates one request's StreamEvents. Closing it (`close()`, leaving a `with` block, or
    dropping it, as a `break` out of `for ev in client.stream(...)` does) cancels the request."""

    def __init__(self, msg: Generate, inbox: queue.SimpleQueue, cancel):
        super().__init__(msg, cancel)
        self._inbox = inbox

    def __iter__(self) -> Stream:
        return self

    def __next__(self):
        while not self._ready:
            if self._over:
                raise StopIteration
            self._take(self._receive())
        return self._ready.popleft()

    def _receive(self):
        try:
            return self._inbox.get(timeout=self._remaining())
        except queue.Empty:
            raise self._timed_out() from None

    def response(self) -> Response:
        """Wait for the end of the request; the whole of it, including events already iterated."""
        for _ in self:
            pass
        return self._response()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SyncClientBase:
    """generate/stream for the blocking clients; a subclass sends a request in `_start` and sets
    `_api_key`, `_lock`, `_closed` and `_cancel`."""

    def generate(self, prompt: str | None = None, **options) -> Response:
        """Run one request to its end. Options: see `splitserve.client._core.new_generate`."""
        with self.stream(prompt, **options) as stream:
            return stream.response()

    def stream(self, prompt: str | None = None, **options) -> Stream:
        """Start one request and iterate its tokens as they come. Options as for `generate`."""
        msg = new_generate(prompt, **options)
        msg.api_key = self._api_key
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                raise UnavailableError("the client is closed")
            self._start(msg, inbox)
        return Stream(msg, inbox, self._cancel)


class Client(SyncClientBase):
    """A connection to a gateway's client port, usable from many threads at once; or to several
    (a gateway's frontends each have one), over which requests are spread.

    One background thread owns the sockets (zmq sockets are not thread safe) and hands each reply
    to the request it belongs to."""

    def __init__(self, endpoint: str | Sequence[str], api_key: str | None = None, *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._api_key = api_key
        self._ctx = zmq.Context()
        self._mailbox = _Mailbox()
        found = endpoints(endpoint)
        io = _IOLoop(found, partial(dealer, self._ctx, max_message_bytes=max_message_bytes), self._mailbox)
        self._thread = threading.Thread(target=io.run, name="splitserve-client-io", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()  # orders close() after every start it has to fail
        self._closed = False

    def _start(self, msg: Generate, inbox: queue.SimpleQueue) -> None:
        self._mailbox.put(methodcaller("start", msg, encode(msg), inbox))

    def _cancel(self, request_id: str) -> None:
        self._mailbox.put(methodcaller("cancel", request_id))

    def close(self) -> None:
        """Close the connection; requests still running fail with UnavailableError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._mailbox.put(methodcaller("stop"))
        self._thread.join()
        self._mailbox.close()
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
