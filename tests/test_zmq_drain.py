"""DrainedSocket: every message reaches the handler, through bursts longer than one read's share
and through replies sent from the handler (a send may take in the descriptor's signal of a
message that arrived meanwhile, which must still be read). The decoding handlers (`messages`,
`router_messages`) drop a malformed frame and outlive a handler that raises."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from splitserve.common import protocol as P
from splitserve.common.zmq_util import free_port
from splitserve.gateway.zmq_drain import BURST, DrainedSocket, messages, router_messages

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


def step(rid: str) -> bytes:
    return P.encode(P.StepTokens([P.StepEntry(rid, P.Token(0, 7, "x"))]))


async def test_a_malformed_frame_or_a_failing_handler_costs_only_its_own_message():
    ctx = zmq.asyncio.Context()
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    got: list = []
    malformed: list[bytes] = []

    def handle(*args) -> None:  # (message) from the PULL socket, (identity, message) from the ROUTER
        if args[-1].entries[0].id == "boom":
            raise RuntimeError("boom")
        got.append((len(args), args[-1].entries[0].id))

    pull, router = ctx.socket(zmq.PULL), ctx.socket(zmq.ROUTER)
    pull.bind(endpoints[0])
    router.bind(endpoints[1])
    servers = [DrainedSocket(pull, messages(P.WorkerToFrontend, "token", handle)),
               DrainedSocket(router, router_messages(P.WorkerToFrontend, "test", handle,
                                                     lambda identity, e: malformed.append(identity)), multipart=True)]
    serving = [asyncio.create_task(s.serve()) for s in servers]
    push, dealer = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"me")
    push.connect(endpoints[0])
    dealer.connect(endpoints[1])
    try:
        for sock in (push, dealer):
            for frame in (b"\xc1 not msgpack", P.encode(P.Heartbeat()), step("boom"), step("a")):
                await sock.send(frame)
        async with asyncio.timeout(DEADLINE_S):
            while len(got) < 2:
                await asyncio.sleep(0.01)
        # a frame of another kind is as malformed as one that is not msgpack
        assert sorted(got) == [(1, "a"), (2, "a")] and malformed == [b"me", b"me"]
    finally:
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        for sock in (push, dealer, pull, router):
            sock.close(0)
        ctx.term()
