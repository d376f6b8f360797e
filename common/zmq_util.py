"""ZeroMQ plumbing shared by every process: bounded sockets, endpoints, free ports."""

from __future__ import annotations

import random
import socket

import zmq

from .curve import CurveKeys, secure


def make_socket(ctx: zmq.Context, kind: int, max_bytes: int, identity: bytes | None = None,
                curve: CurveKeys | None = None) -> zmq.Socket:
    """`curve`: encrypt and authenticate this socket's connections (see curve.py)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    # A peer that sends more than this is disconnected by ZMQ before we read a byte of it.
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if curve is not None:
        secure(sock, curve)
    return sock


def tcp_endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


def bind_endpoint(sock: zmq.Socket, host: str, port: int) -> int:
    """Bind to host:port (port 0: any free port); returns the port bound."""
    if port:
        sock.bind(tcp_endpoint(host, port))
        return port
    return sock.bind_to_random_port(f"tcp://{host}")


FIXED_PORTS_FROM = 10_000  # free_port's ports start here (below: well-known and commonly registered ones)
_handed_out: set[int] = set()  # a process never gets one twice (the kernel's own choices rotate likewise)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for another process to bind. It is chosen below the kernel's ephemeral
    range: the kernel hands ports of that range to every bind to port 0 and every outgoing
    connection, so a port taken from it could be handed to another socket before its process
    binds it (tests start many processes that bind port 0)."""
    low = _ephemeral_low()
    if low > FIXED_PORTS_FROM + 1000:
        for port in random.sample(range(FIXED_PORTS_FROM, low), 200):
            if port in _handed_out:  # free again, perhaps, but maybe not yet bound by whoever got it
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default
