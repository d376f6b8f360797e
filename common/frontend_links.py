"""A worker's token links: one PUSH socket per frontend that its requests name (reply_to), so
tokens go straight to the process that owns the client and never through the router."""

from __future__ import annotations

import logging
import time

import zmq

from . import protocol as P
from .curve import CurveKeys
from .zmq_util import make_socket

log = logging.getLogger(__name__)

IDLE_CLOSE_S = 300.0  # a link unused this long is closed (its frontend may be gone for good)


class FrontendLinks:
    """Owned by one thread (ZMQ sockets are not thread-safe): the prefill loop or the decode
    worker's output thread. `curve`: the worker link's keys; frontends serve with the router's."""

    def __init__(self, ctx: zmq.Context, curve: CurveKeys | None = None):
        self.ctx, self.curve = ctx, curve
        self.socks: dict[str, zmq.Socket] = {}
        self.used: dict[str, float] = {}
        self._swept = time.monotonic()

    def send(self, endpoint: str, msg) -> None:
        """NOBLOCK: a frontend thousands of messages behind (or gone) loses tokens rather than
        stalling every other frontend's; its clients time out, its requests are cancelled."""
        sock = self.socks.get(endpoint)
        if sock is None:
            sock = self.socks[endpoint] = make_socket(self.ctx, zmq.PUSH, P.MAX_CONTROL_BYTES, curve=self.curve)
            sock.connect(endpoint)
        try:
            sock.send(P.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("the frontend at %s is not reading; dropped a %s", endpoint, type(msg).__name__)
        now = time.monotonic()
        self.used[endpoint] = now
        if now - self._swept > IDLE_CLOSE_S:
            self._swept = now
            for old in [e for e, t in self.used.items() if now - t > IDLE_CLOSE_S]:
                self.socks.pop(old).close(0)
                del self.used[old]

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(0)
        self.socks.clear()
