"""A child Python process joined to the test by a ZMQ PAIR socket: the other side of a handoff."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

import zmq


@contextmanager
def pair_child(code: str, *args: str, timeout_s: float = 20.0) -> Iterator[zmq.Socket]:
    """Run `code` as `python -c code PORT *args` and yield the PAIR socket it is to connect to at
    127.0.0.1:PORT. An empty message tells the child to finish; it must then exit with 0."""
    sock = zmq.Context.instance().socket(zmq.PAIR)
    # PAIR blocks sends until a peer connects: time out rather than hang if the child dies.
    timeout_ms = int(timeout_s * 1000)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    child = subprocess.Popen([sys.executable, "-c", code, str(port), *args])
    try:
        yield sock
        sock.send(b"")
        assert child.wait(timeout=timeout_s) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        sock.close()
