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
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from functools import partial

import msgspec
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed, InvalidMessage, WebSocketException
from websockets.sync.client import connect

from splitserve.common import protocol as P
from splitserve.common.protocol import Error, Generate, TokenBatch

from ._core import HEARTBEAT_IVL_S, HEARTBEAT_TIMEOUT_S, MAX_MESSAGE_BYTES, RECONNECT_WAIT_S, Routes
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
# A connection refused or cut as it is made is tried again after these waits (the last again and
# again for up to RECONNECT_WAIT_S when it is to carry requests resumed after a connection was lost)
CONNECT_RETRIES_S = (0.05, 0.2)
# A try to make one that has no answer after this long is given up for a new one (see _Tries):
# a peer silent that long is taken for gone, as by the heartbeats
TRY_TIMEOUT_S = HEARTBEAT_TIMEOUT_S


class _LostIsNoError(logging.Filter):
    """The sync websockets connection logs "keepalive ping failed" as an error, with a traceback,
    when its pings find the peer gone and it closes the connection: the client's own business (the
    requests go on over a new connection, or end with an error of their own), not the caller's log's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionClosed))


_connection_log = logging.getLogger("splitserve.client.websocket")
_connection_log.addFilter(_LostIsNoError())


def _connect_options(max_message_bytes: int) -> dict:
    # Pings as often as the ZMQ clients' heartbeats: a frontend that stops answering (frozen, its
    # host gone) is found within seconds, and its requests go on over a new connection (see
    # _again). A connection the pings find dead is closed after close_timeout: 1 s, not the
    # library's 10 (a live peer answers a close at once). With the library's defaults, 50 s.
    return dict(max_size=max_message_bytes, compression=None, proxy=None, ping_interval=HEARTBEAT_IVL_S,
                ping_timeout=HEARTBEAT_TIMEOUT_S, close_timeout=HEARTBEAT_IVL_S, logger=_connection_log)


class _Tries:
    """The tries to make one connection, all within open_timeout. The frontends of a host share its
    port, and the kernel gives each new connection to one of their listening sockets: one whose
    frontend has just died refuses or cuts it, one whose frontend is frozen holds it unanswered. A
    new try, from another local port, may reach another: so each try has at most TRY_TIMEOUT_S,
    and one refused or cut is made again after a short wait. A connection for requests resumed
    after theirs was lost (`patient`) is tried for up to RECONNECT_WAIT_S, as long as a frontend
    starting again takes: the ZMQ clients' resumed requests wait as long."""

    def __init__(self, url: str, open_timeout: float, patient: bool = False):
        now = time.monotonic()
        self.url, self.waits = url, iter(CONNECT_RETRIES_S)
        self.patient_until = now + (RECONNECT_WAIT_S if patient else 0.0)
        self.deadline = max(now + open_timeout, self.patient_until)

    def timeout(self) -> float:
        """The next try's open_timeout."""
        return max(0.0, min(TRY_TIMEOUT_S, self.deadline - time.monotonic()))

    def wait_after(self, e: Exception) -> float:
        """How long to wait for the next try after a try failed with `e`; UnavailableError when none is left."""
        if isinstance(e, TimeoutError):
            wait = 0.0
        elif isinstance(e, (OSError, InvalidMessage, ConnectionClosed)):
            # refused, or cut (the sync client says ConnectionClosed for a reset before its request went)
            wait = next(self.waits, CONNECT_RETRIES_S[-1] if time.monotonic() < self.patient_until else None)
        else:
            wait = None
        if wait is None or time.monotonic() + wait >= self.deadline:
            raise UnavailableError(f"cannot connect to {self.url}: {e}") from e
        return wait


def _again(routes: Routes, close_code: int | None) -> dict[str, bytes | str]:
    """At a connection's end, the requests it carried to send over a new one: those refused as
    `draining` (held) and every one unanswered when its frontend closed it as it shut down (which
    it does once none of them runs): they never started; and, once, any other (its frontend took
    it or not: the client gets one answer either way; one that streamed goes on after the tokens
    it has), as the ZMQ clients do."""
    held = dict(routes.take_held(0))
    return routes.unanswered() if close_code == P.WS_RESTART else held | routes.lost_once()


class _Connection:
    """One of a client's WebSocket connections: the requests it carries, and its outbox (frames to
    send; the sync client's writer also takes ("cancel", id), sent if that request runs here, and
    None: stop). A connection whose frontend shuts down (it refused a request as `draining`)
    retires: its streams finish, and new requests go over a new connection, which reaches another
    frontend (the draining one no longer listens), rather than wait for them."""

    def __init__(self, binary: bool, outbox):
        self.routes: Routes = Routes(encode=partial(_generate_frame, binary))
        self.outbox = outbox
        self.ws = None  # the websocket, once made
        self.lost = False  # closed, or never made
        self.retiring = False
        self.close: Callable[[], None] = lambda: None  # the sync client's: closes the websocket
        self.threads: list[threading.Thread] = []  # the sync client's reader and writer

    @property
    def takes_new(self) -> bool:
        return not (self.lost or self.retiring)

    def end(self, message: str, keep: Collection[str] = ()) -> None:
        """This connection is gone, or could not be made: its requests (but those to `keep`) end."""
        self.lost = True
        closed = Error("", "unavailable", message)
        for inbox in self.routes.deliver(closed, keep=keep):
            inbox.put_nowait(closed)


class WebSocketClient(SyncClientBase):
    """A connection to a gateway's /ws, usable from many threads at once. A reader thread hands each
    reply to its request; a writer thread sends, so that a stream dropped anywhere (its __del__
    cancels it) never sends on the socket itself. The requests a lost connection carried go over
    a new one at once: as often as a frontend shutting down says they never started (it refuses
    them as `draining`, or closes the connection with WS_RESTART), else once (see _again); the
    others end with UnavailableError, and the next request connects again. A connection whose
    frontend shuts down retires (see _Connection)."""

    def __init__(self, url: str, api_key: str | None = None, *, encoding: str = "msgpack",
                 open_timeout: float = 10.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._binary = _check_encoding(encoding)
        self._url, self._api_key, self._open_timeout = url, api_key, open_timeout
        self._connect_options = _connect_options(max_message_bytes)
        self._lock = threading.Lock()  # the connections and their routes, shared by callers and the threads
        self._closed = False
        self._conns: list[_Connection] = []  # open, the newest (where new requests go) last
        # cancelled, and the cancel not sent yet: such a request that goes to another connection
        # meanwhile (one made after the cancel was queued, which that never reaches) is dropped
        self._cancels: set[str] = set()
        c = _Connection(self._binary, queue.SimpleQueue())  # the first: failing to make it is the caller's error
        c.ws, c.close = self._make(_Tries(url, open_timeout))
        self._conns.append(c)
        self._run(c)

    def _make(self, tries: _Tries):
        """A websocket made within `tries`, and what closes it."""
        while True:
            stack = contextlib.ExitStack()
            try:
                return stack.enter_context(connect(self._url, open_timeout=tries.timeout(), **self._connect_options)), \
                    stack.close
            except (OSError, WebSocketException) as e:
                wait = tries.wait_after(e)
                if self._closed:
                    raise UnavailableError(CONNECTION_LOST) from e
                time.sleep(wait)

    def _run(self, c: _Connection) -> None:
        """Start the reader and the writer of `c`, made."""
        c.threads = [threading.Thread(target=f, args=(c,), daemon=True, name=f"splitserve-ws-{f.__name__.strip('_')}")
                     for f in (self._read, self._write)]
        for t in c.threads:
            t.start()

    def _current(self, patient: bool = False) -> _Connection:
        """Where a new request goes: the newest connection, or a new one when it takes none. A
        thread of its own makes a new one (for up to RECONNECT_WAIT_S when `patient`), not the
        caller, who holds the lock that the other connections' readers need meanwhile: their
        streams go on, and close() does not wait for it. Its requests wait in its outbox."""
        if self._conns and self._conns[-1].takes_new:
            return self._conns[-1]
        c = _Connection(self._binary, queue.SimpleQueue())
        self._conns.append(c)
        tries = _Tries(self._url, self._open_timeout, patient)
        threading.Thread(target=self._connect, args=(c, tries), daemon=True, name="splitserve-ws-connect").start()
        return c

    def _connect(self, c: _Connection, tries: _Tries) -> None:
        try:
            ws, close = self._make(tries)
        except Exception as e:  # UnavailableError, or anything else: in this thread, its requests' end
            message = str(e) if isinstance(e, UnavailableError) else f"cannot connect to {self._url}: {e!r}"
            with self._lock:
                if not c.lost:  # else the client closed meanwhile, which ended its requests
                    self._lost(c, message)
            return
        with self._lock:
            made = not c.lost
            if made:
                c.ws, c.close = ws, close
                self._run(c)
        if not made:
            close()

    def _lost(self, c: _Connection, message: str, keep: Collection[str] = ()) -> None:
        """`c` is gone, or could not be made: it ends (see _Connection.end), and leaves the
        client. The caller holds the lock."""
        c.end(message, keep)
        self._conns.remove(c)
        # a cancel queued here is never taken from the outbox: forgotten if its request has ended
        self._cancels.difference_update([rid for rid in list(self._cancels)
                                         if rid not in c.routes and not any(rid in o.routes for o in self._conns)])

    def _start(self, msg: Generate, inbox: queue.SimpleQueue) -> None:
        # the caller holds the lock, so a reader's end cannot slip between the choice and the route
        c = self._current()
        frame = _generate_frame(self._binary, msg)
        c.routes.add(msg, inbox, frame)
        c.outbox.put(frame)

    def _cancel(self, request_id: str) -> None:
        # only a set's add and queue puts: this runs from __del__ too, maybe while this thread holds
        # the lock; the writer of the connection that carries the request sends the cancel
        self._cancels.add(request_id)
        for c in list(self._conns):
            c.outbox.put(("cancel", request_id))

    def _read(self, c: _Connection) -> None:
        try:
            for frame in c.ws:
                msg = _decode(frame)
                if msg is not None:
                    self._deliver(c, msg)
        except (OSError, WebSocketException):
            pass
        finally:
            # Under the lock, so that no request is routed to this connection meanwhile: the
            # requests that go again go over another connection, the others end.
            with self._lock:
                again = {} if self._closed else _again(c.routes, c.ws.close_code)
                self._lost(c, CONNECTION_LOST, keep=again)
                self._elsewhere(c, again, patient=True)
            c.outbox.put(None)
            c.close()

    def _deliver(self, c: _Connection, msg) -> None:
        with self._lock:
            inboxes = c.routes.deliver(msg, 0)  # a refusal as `draining` is held: it goes elsewhere
            if isinstance(msg, Error) and msg.draining and not self._closed:
                c.retiring = True
                self._elsewhere(c, dict(c.routes.take_held(0)))
        for inbox in inboxes:
            inbox.put(msg)

    def _elsewhere(self, c: _Connection, frames: dict[str, bytes | str], patient: bool = False) -> None:
        """Send requests of `c` (id -> Generate frame) over the connection that new requests take;
        they end if none can be made (`patient`: within RECONNECT_WAIT_S, `c` having been lost)."""
        if not frames:
            return
        target = self._current(patient)
        for rid, frame in frames.items():
            if rid in self._cancels:  # cancelled meanwhile (target may be newer than its cancel): dropped
                self._cancels.discard(rid)
                c.routes.pop(rid)
                continue
            target.routes.take_over(c.routes.hand_over(rid), frame)
            target.outbox.put(frame)

    def _write(self, c: _Connection) -> None:
        while (item := c.outbox.get()) is not None:
            if isinstance(item, tuple):
                with self._lock:
                    running = c.routes.pop(item[1]) is not None
                    if running or not any(item[1] in o.routes for o in self._conns):
                        self._cancels.discard(item[1])  # sent now, or it has ended
                if not running:  # it has already ended, or runs over another connection
                    continue
                item = _frame(P.WsCancel(item[1]), self._binary)
            try:
                c.ws.send(item)
            except (OSError, WebSocketException):
                return

    def close(self) -> None:
        """Close the connections; requests still running fail with UnavailableError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = [c for c in self._conns if c.ws is not None]
            for c in [c for c in self._conns if c.ws is None]:  # being made: given up
                self._lost(c, CONNECTION_LOST)
        for c in conns:
            c.outbox.put(None)
            c.close()  # its reader ends, and ends its requests
        for c in conns:
            for t in c.threads:
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
        self._url, self._api_key, self._open_timeout = url, api_key, open_timeout
        self._binary = _check_encoding(encoding)
        self._connect_options = _connect_options(max_message_bytes)
        self._conns: list[_Connection] = []  # the newest (where new requests go) last; lost ones until the next
        self._tasks: list[asyncio.Task] = []  # one per connection, while it lasts
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @classmethod
    async def connect(cls, url: str, api_key: str | None = None, **options) -> AsyncWebSocketClient:
        client = cls(url, api_key, **options)
        await client._open()
        return client

    async def _open(self) -> None:
        """The first connection: failing to make it is the caller's error."""
        self._loop = asyncio.get_running_loop()
        c = _Connection(self._binary, asyncio.Queue())
        c.ws = await self._connect()
        self._conns.append(c)
        self._tasks.append(self._loop.create_task(self._serve(c)))

    async def _connect(self, patient: bool = False):
        tries = _Tries(self._url, self._open_timeout, patient)
        while True:
            try:
                return await aconnect(self._url, open_timeout=tries.timeout(), **self._connect_options)
            except (OSError, WebSocketException) as e:
                await asyncio.sleep(tries.wait_after(e))

    def _check_open(self) -> None:
        super()._check_open()
        if self._loop is None:
            raise UnavailableError("the client is not connected")

    def _current(self, patient: bool = False) -> _Connection:
        """Where a new request goes: the newest connection, or a new one (being made) when it takes none."""
        if self._conns and self._conns[-1].takes_new:
            return self._conns[-1]
        c = _Connection(self._binary, asyncio.Queue())
        self._conns = [*(other for other in self._conns if not other.lost), c]
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(self._loop.create_task(self._reconnect(c, patient)))
        return c

    def _start(self, msg: Generate, inbox: asyncio.Queue) -> None:
        c = self._current()
        frame = _generate_frame(self._binary, msg)
        c.routes.add(msg, inbox, frame)
        c.outbox.put_nowait(frame)

    def _cancel(self, request_id: str) -> None:
        for c in self._conns:
            if c.routes.pop(request_id) is not None:  # else it has already ended, or runs elsewhere
                if not self._closed:
                    c.outbox.put_nowait(_frame(P.WsCancel(request_id), self._binary))
                return

    async def _reconnect(self, c: _Connection, patient: bool) -> None:
        try:
            c.ws = await self._connect(patient)
        except UnavailableError as e:
            c.end(str(e))  # the requests that waited for it
            return
        except asyncio.CancelledError:  # closed meanwhile
            c.end(CONNECTION_LOST)
            raise
        await self._serve(c)

    async def _serve(self, c: _Connection) -> None:
        """Read one connection's replies while its writer sends; when it is lost, its requests go
        again (see _again) or end."""
        writer = asyncio.create_task(self._write(c))
        try:
            async for frame in c.ws:
                msg = _decode(frame)
                if msg is not None:
                    self._deliver(c, msg)
        except (OSError, WebSocketException):
            pass
        finally:
            writer.cancel()
            again = {} if self._closed else _again(c.routes, c.ws.close_code)
            c.end(CONNECTION_LOST, keep=again)
            self._elsewhere(c, again, patient=True)

    def _deliver(self, c: _Connection, msg) -> None:
        for inbox in c.routes.deliver(msg, 0):  # a refusal as `draining` is held: it goes elsewhere
            inbox.put_nowait(msg)
        if isinstance(msg, Error) and msg.draining and not self._closed:
            c.retiring = True
            self._elsewhere(c, dict(c.routes.take_held(0)))

    def _elsewhere(self, c: _Connection, frames: dict[str, bytes | str], patient: bool = False) -> None:
        """Send requests of `c` (id -> Generate frame) over the connection that new requests take
        (`patient`: made within RECONNECT_WAIT_S, `c` having been lost)."""
        if not frames:
            return
        target = self._current(patient)
        for rid, frame in frames.items():
            target.routes.take_over(c.routes.hand_over(rid), frame)
            target.outbox.put_nowait(frame)

    async def _write(self, c: _Connection) -> None:
        while True:
            frame = await c.outbox.get()
            try:
                await c.ws.send(frame)
            except (OSError, WebSocketException):
                return

    async def _release(self) -> None:
        for c in self._conns:
            if c.ws is not None:
                await c.ws.close()

    async def __aenter__(self) -> AsyncWebSocketClient:
        if self._loop is None:
            await self._open()
        return self
