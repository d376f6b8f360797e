"""ZeroMQ plumbing shared by every process: bounded sockets, endpoints, free ports."""

from __future__ import annotations

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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
