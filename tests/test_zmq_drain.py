"""DrainedSocket: every message reaches the handler, through bursts longer than one read's share
and through replies sent from the handler (a send may take in the descriptor's signal of a
message that arrived meanwhile, which must still be read)."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from splitserve.common.zmq_util import free_port
from splitserve.gateway.zmq_drain import BURST, DrainedSocket

DEADLINE_S = 20.0


async def test_ping_pong_and_a_burst_all_arrive():
    ctx = zmq.asyncio.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server_sock = ctx.socket(zmq.ROUTER)
    server_sock.bind(endpoint)
    got: list[bytes] = []

    def echo(frames: list[bytes]) -> None:
        got.append(frames[1])
        server.send_multipart([frames[0], b"re:" + frames[1]])

    server = DrainedSocket(server_sock, echo, multipart=True)
    serving = asyncio.create_task(server.serve())
    client = ctx.socket(zmq.DEALER)
    client.connect(endpoint)
    try:
        async with asyncio.timeout(DEADLINE_S):
            for i in range(200):  # each request sent as soon as the reply to the last one came
                await client.send(b"%d" % i)
                assert await client.recv() == b"re:%d" % i
            burst = [b"b%d" % i for i in range(5 * BURST + 3)]
            for m in burst:
                await client.send(m)
            replies = [await client.recv() for _ in burst]
        assert got == [b"%d" % i for i in range(200)] + burst
        assert replies == [b"re:" + m for m in burst]
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        client.close(0)
        server_sock.close(0)
        ctx.term()
