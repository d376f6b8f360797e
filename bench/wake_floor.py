"""The floor under a frontend's cost per decode step: what an idle process on this machine spends
to take in one small message per step and do nothing with it.

A frontend wakes for every step's message. Over ZMQ (PUSH to PULL, as a worker's tokens reach a
frontend) two threads wake per message: ZMQ's I/O thread reads the socket, then signals the event
loop's thread. Over a plain TCP stream that the event loop reads itself, one does. The receiver is
a process of its own running uvloop, as a frontend does; its CPU (all its threads) is read from its
own clock over `messages` messages, after a few untimed ones.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time

import zmq

from splitserve.common import protocol as P
from splitserve.common.zmq_util import make_socket

UNTIMED = 10  # messages before the clock starts: connections made, code paths warm
HEADER = 4  # a TCP frame's length, little-endian


def measure(transport: str, step_ms: float, messages: int, size: int = 1024, timeout_s: float = 30.0) -> float:
    """CPU µs the receiving process spends per message ("zmq" or "tcp"), one message of `size` bytes
    every `step_ms`."""
    mp = multiprocessing.get_context("spawn")
    ours, theirs = mp.Pipe()
    proc = mp.Process(target=_receive, args=(transport, messages, theirs), daemon=True)
    proc.start()
    try:
        if not ours.poll(timeout_s):
            raise RuntimeError(f"the {transport} receiver did not start")
        send, close = _sender(transport, ours.recv())
        payload = bytes(size)
        try:
            for _ in range(UNTIMED + messages):
                send(payload)
                time.sleep(step_ms / 1e3)
            if not ours.poll(timeout_s):
                raise RuntimeError(f"the {transport} receiver did not answer")
            return round(ours.recv(), 1)
        finally:
            close()
    finally:
        proc.kill()
        proc.join()


def _sender(transport: str, port: int):
    if transport == "zmq":
        ctx = zmq.Context()
        sock = make_socket(ctx, zmq.PUSH, P.MAX_CONTROL_BYTES)
        sock.connect(f"tcp://127.0.0.1:{port}")

        def close() -> None:
            sock.close(0)
            ctx.term()

        return sock.send, close
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return (lambda payload: conn.sendall(len(payload).to_bytes(HEADER, "little") + payload)), conn.close


def _receive(transport: str, messages: int, conn) -> None:
    import uvloop

    uvloop.run(_serve(transport, messages, conn))


async def _serve(transport: str, messages: int, conn) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    seen, started = 0, 0.0

    def took_one() -> None:
        nonlocal seen, started
        seen += 1
        if seen == UNTIMED:
            started = time.process_time()
        elif seen == UNTIMED + messages and not done.done():
            done.set_result(1e6 * (time.process_time() - started) / messages)

    if transport == "zmq":
        sock = make_socket(zmq.Context.instance(), zmq.PULL, P.MAX_CONTROL_BYTES)  # as a frontend's token port
        conn.send(sock.bind_to_random_port("tcp://127.0.0.1"))

        def drain() -> None:  # as gateway/zmq_drain.py reads a frontend's token socket
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                sock.recv(zmq.NOBLOCK, copy=False)
                took_one()

        loop.add_reader(sock.getsockopt(zmq.FD), drain)
        drain()
    else:
        server = await loop.create_server(lambda: _Frames(took_one), "127.0.0.1", 0)
        conn.send(server.sockets[0].getsockname()[1])
    conn.send(await done)


class _Frames(asyncio.Protocol):
    """Length-prefixed frames off a TCP stream: `took_one` per whole frame."""

    def __init__(self, took_one):
        self.took_one, self.buf = took_one, bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= HEADER:
            end = HEADER + int.from_bytes(self.buf[:HEADER], "little")
            if len(self.buf) < end:
                return
            del self.buf[:end]
            self.took_one()
