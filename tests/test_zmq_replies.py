"""A frontend's ZMQ replies: a client that asks for batched replies gets those ready together as
one Replies message; one that does not (an older client) gets one reply per message."""

from __future__ import annotations

import asyncio

import zmq

from splitserve.client._core import decode_replies
from splitserve.common import protocol as P
from splitserve.gateway.zmq_replies import ZmqReplies


class RecordingSocket:
    def __init__(self, fail: bool = False):
        self.sent: list[list[bytes]] = []
        self.fail = fail

    def send_multipart(self, frames):
        self.sent.append(frames)
        if self.fail:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)


def batch(rid: str, index: int) -> P.TokenBatch:
    return P.TokenBatch(rid, [P.Token(index, 7, "x")])


async def test_replies_ready_together_leave_as_one_message_per_client():
    sock = RecordingSocket()
    replies = ZmqReplies(sock.send_multipart, lambda identity: None)
    for rid in ("a", "b", "c"):
        replies.send(b"one", batch(rid, 0), batched=True)
    replies.send(b"two", batch("d", 0), batched=True)
    replies.send(b"old", batch("e", 0))  # an older client: at once, alone
    replies.send(b"old", batch("f", 0))
    assert sock.sent == [[b"old", P.encode(batch("e", 0))], [b"old", P.encode(batch("f", 0))]]
    await asyncio.sleep(0)  # the end of the loop turn
    assert sock.sent[2:] == [[b"one", P.encode(P.Replies([batch(r, 0) for r in "abc"]))],
                             [b"two", P.encode(P.Replies([batch("d", 0)]))]]
    replies.send(b"one", batch("a", 1), batched=True)  # the next step: a message of its own
    await asyncio.sleep(0)
    assert sock.sent[4:] == [[b"one", P.encode(P.Replies([batch("a", 1)]))]]
    assert decode_replies(sock.sent[2][1:]) == [batch(r, 0) for r in "abc"]


async def test_a_client_whose_connection_is_gone_is_reported_once_per_message():
    gone: list[bytes] = []
    replies = ZmqReplies(RecordingSocket(fail=True).send_multipart, gone.append)
    replies.send(b"one", batch("a", 0), batched=True)
    replies.send(b"one", batch("b", 0), batched=True)
    await asyncio.sleep(0)
    assert gone == [b"one"]
