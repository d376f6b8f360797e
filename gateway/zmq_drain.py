"""A busy ZMQ socket served on the asyncio loop without a future per message.

zmq.asyncio makes a future for every receive and every send, arms the loop's reader on the
socket's descriptor and checks the socket's events each time: ~50-100 µs of Python per message
on this machine's cores. A frontend's token socket gets a message per decode step per decode
worker, and its client port sends one per step per client connection: costs per step, which a
second frontend paid again for half the tokens. Here the descriptor wakes the loop once for
whatever arrived meanwhile, the messages are read without blocking and handed to `handle` as they
come, and sends go out at once, without blocking.

ZMQ's descriptor signals changes of the socket's state, and any operation on the socket may take
in such a change: after a send, a message that arrived meanwhile may no longer wake the loop, so
every send is followed by a look at the socket's events (once per loop turn). Nothing else may
use the socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio

from splitserve.common import protocol as P

log = logging.getLogger(__name__)

# Messages read per wake-up before the loop's other work (HTTP, other sockets) gets a turn.
BURST = 64


class DrainedSocket:
    """`handle` gets each message: a zmq.Frame (not copied), or with `multipart` its frames as
    bytes. It must not raise."""

    def __init__(self, sock: zmq.Socket, handle: Callable, multipart: bool = False):
        self.raw = zmq.Socket.shadow(sock.underlying)
        self.handle, self.multipart = handle, multipart
        self.loop: asyncio.AbstractEventLoop | None = None
        self._check_scheduled = False

    async def serve(self) -> None:
        """Read until cancelled."""
        self.loop = asyncio.get_running_loop()
        fd = self.raw.getsockopt(zmq.FD)
        self.loop.add_reader(fd, self._drain)
        try:
            self._drain()  # what came before the reader was armed
            await self.loop.create_future()
        finally:
            self.loop.remove_reader(fd)
            self.loop = None  # a send from now on (at shutdown) schedules no more reads

    def send_multipart(self, frames: list[bytes]) -> None:
        """At once, without blocking; raises zmq.ZMQError (zmq.Again when the peer's queue is full)."""
        try:
            self.raw.send_multipart(frames, zmq.NOBLOCK)
        finally:
            if not self._check_scheduled and self.loop is not None:
                self._check_scheduled = True
                self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._check_scheduled = False
        if self.loop is None:  # stopped serving: the socket may be closed already
            return
        raw, handle = self.raw, self.handle
        for _ in range(BURST):
            # reading EVENTS also re-arms the descriptor, so a message that comes later wakes the loop
            if not raw.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                msg = raw.recv_multipart(zmq.NOBLOCK) if self.multipart else raw.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(msg)
        if not self._check_scheduled:  # more may be waiting: back after the loop's other callbacks
            self._check_scheduled = True
            self.loop.call_soon(self._drain)


def messages(kinds, port: str, handle: Callable[[object], None]) -> Callable[[zmq.Frame], None]:
    """A DrainedSocket's handler (single frames) for messages of `kinds`, each to `handle`. A
    malformed frame is logged and dropped; a failing `handle` is logged and takes nothing down."""
    receive = _decoding(kinds, port, handle)
    return lambda frame: receive(frame.buffer)


def router_messages(kinds, port: str, handle: Callable[[bytes, object], None],
                    malformed: Callable[[bytes, P.DecodeError], None] | None = None) -> Callable[[list[bytes]], None]:
    """A DrainedSocket's handler (multipart) for a ROUTER socket's messages of `kinds`: (identity,
    message) to `handle`. As `messages`, and a malformed frame goes to `malformed` (identity, error)
    when given."""
    receive = _decoding(kinds, port, handle, malformed)

    def on_frames(frames: list[bytes]) -> None:
        if len(frames) >= 2:
            receive(frames[1], frames[0])

    return on_frames


def _decoding(kinds, port: str, handle: Callable, malformed: Callable | None = None) -> Callable:
    """(data, *sender) -> `handle(*sender, message)`, or `malformed(*sender, error)`."""
    dec = P.decoder(kinds)

    def receive(data, *sender) -> None:
        try:
            msg = P.decode(dec, data)
        except P.DecodeError as e:
            log.warning("dropped a malformed frame on the %s port: %s", port, e)
            if malformed is not None:
                malformed(*sender, e)
            return
        try:
            handle(*sender, msg)
        except Exception:  # one bad message must not take the process down
            log.exception("failed to handle a %s message %s", port, type(msg).__name__)

    return receive
