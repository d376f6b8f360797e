"""Replies to ZMQ clients, one message per client connection per loop turn: the replies of every
request a connection has in flight that became ready together (a decode step's tokens) leave as
one Replies message, encoded at once, so a step costs a connection one send, not one per request.
A client asks for this with `Generate.batched_replies`; replies to requests without it go one
message each, as older clients read only one reply per message.

A send fails at once (ROUTER_MANDATORY, NOBLOCK) when the client's connection is gone; `gone`
is then told, so that its requests stop. A client 1,000 messages behind gets nothing more
(dropped, not queued): that client times out rather than stalling every other stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

from splitserve.common import protocol as P

log = logging.getLogger(__name__)


class ZmqReplies:
    """`send`: sends a message's frames at once without blocking, raising zmq.ZMQError when it cannot."""

    def __init__(self, send: Callable[[list[bytes]], None], gone: Callable[[bytes], None]):
        self.send_frames, self.gone = send, gone
        self.pending: dict[bytes, list] = {}  # client identity -> replies not yet sent
        self.flush_scheduled = False

    def send(self, identity: bytes, reply: P.TokenBatch | P.Error, batched: bool = False) -> None:
        """Send now, or (`batched`) with the connection's other replies at the end of this loop turn."""
        if not batched:
            self._send([identity, P.encode(reply)])
            return
        replies = self.pending.get(identity)
        if replies is None:
            replies = self.pending[identity] = []
        replies.append(reply)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        pending, self.pending = self.pending, {}
        for identity, replies in pending.items():
            # one message and one encoding for them all: per reply, a frame of its own cost a send
            # and an encode call each
            self._send([identity, P.encode(P.Replies(replies))])

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.send_frames(frames)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self.gone(frames[0])
            else:
                log.debug("could not reply to a client: %s", e)
