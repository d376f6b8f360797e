"""A worker's link to the gateway's router: register, heartbeat both ways, reconnect after silence.

A router that restarts (or that lost this worker) gets the worker's registration again, with the
requests it holds: the new router rebuilds its books from them, and their tokens, which go to the
frontends directly, keep flowing meanwhile.

The loop beats between units of work; while one runs (a prefill batch or a decode step, which can
take longer than the heartbeat timeout: a long prompt on a CPU), a thread beats for it, up to the
watchdog timeout: past it the work is taken for hung, the beats stop, and `on_hung` is called (a
worker exits: see WorkerLoop)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import msgspec
import zmq

from . import protocol as P
from .curve import CurveKeys
from .zmq_util import make_socket

log = logging.getLogger(__name__)

# A draining worker whose gateway never confirms that nothing more is on its way exits this
# long after its drain timeout.
DRAIN_GRACE_S = 5.0
# How long a leaving worker waits for its Goodbye to go out (a gateway that is gone never takes it:
# it finds the worker silent instead).
GOODBYE_LINGER_MS = 500


def pid_namespace() -> str:
    """Identifies this process's PID namespace: CUDA IPC needs both peers in the same one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return f"pid:{os.getpid()}"


class GatewayLink:
    def __init__(self, ctx: zmq.Context, endpoint: str, register: P.Register, holding: Callable[[], list[P.Held]],
                 heartbeat_s: float, timeout_s: float, curve: CurveKeys | None = None,
                 watchdog_s: float | None = None, on_hung: Callable[[float], None] = lambda seconds: None):
        """`watchdog_s`: None, no beats while working (the loop's own only); 0, beats however long
        a unit of work runs; else beats for up to that long."""
        self.ctx, self.endpoint, self.register, self.holding, self.curve = ctx, endpoint, register, holding, curve
        self.heartbeat_s, self.timeout_s, self.watchdog_s, self.on_hung = heartbeat_s, timeout_s, watchdog_s, on_hung
        self.decoder = P.decoder(P.GatewayToWorker)
        self.sock: zmq.Socket | None = None
        self.generation = 0  # bumped on every reconnect, so pollers know to pick up the new socket
        self.registered = False
        self.refused = ""  # the router's reason, when it refused this worker
        # Work the gateway has routed to this worker that may still be on its way (reservations,
        # prompts not yet handed off), when the gateway said so, and whether it knew then that this
        # worker drains: a draining worker waits for 0 from a gateway that knows.
        self.gateway_load = 0
        self.load_heard_at = 0.0
        self.gateway_knows_draining = False
        self._last_heard = self._last_beat = self._last_tick = 0.0
        self._beat_load, self._beat_draining = 0, False  # what the last heartbeat said
        self._linger_ms = 0  # what is unsent at close is dropped, but a goodbye
        # The socket is the loop's, and, while a unit of work runs (`working_since` set), the beat
        # thread's too: both send under the lock, and the loop touches it otherwise only outside work.
        self._lock = threading.Lock()
        self._working_since: float | None = None
        self._closing = threading.Event()
        self.connect()
        if watchdog_s is not None:
            threading.Thread(target=self._beat_while_working, daemon=True, name="heartbeat").start()

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = make_socket(self.ctx, zmq.DEALER, P.MAX_CONTROL_BYTES, curve=self.curve)
        self.sock.connect(self.endpoint)
        self.generation += 1
        self.registered = False
        self._last_heard = self._last_tick = time.monotonic()
        self._register()

    def _register(self) -> None:
        self.send(msgspec.structs.replace(self.register, holding=self.holding()))

    def send(self, msg, *frames) -> None:
        try:
            with self._lock:
                if frames:
                    self.sock.send_multipart([P.encode(msg), *frames], copy=False, flags=zmq.NOBLOCK)
                else:
                    self.sock.send(P.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("gateway link is backed up; dropped a %s", type(msg).__name__)

    @contextmanager
    def working(self):
        """Around a unit of work: the beat thread beats meanwhile (see the module's docstring)."""
        with self._lock:
            self._working_since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._working_since = None

    def _beat_while_working(self) -> None:
        hung = None  # the start of the unit of work found hung
        while not self._closing.wait(self.heartbeat_s / 2):
            with self._lock:
                now, since = time.monotonic(), self._working_since
                if since is None or since == hung:
                    continue
                if not self.watchdog_s or now - since < self.watchdog_s:
                    if now - self._last_beat >= self.heartbeat_s:
                        try:
                            self.sock.send(P.encode(P.Heartbeat(self._beat_load, self._beat_draining)),
                                           flags=zmq.NOBLOCK)
                            self._last_beat = now
                        except zmq.Again:
                            pass
                    continue
                hung = since
            self.on_hung(now - since)  # outside the lock: it may not return

    def receive(self) -> list:
        """Every message waiting on the link (never blocks); malformed frames are dropped."""
        out = []
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            self._last_heard = time.monotonic()
            try:
                msg = P.decode(self.decoder, frames[0])
            except P.DecodeError as e:
                log.warning("dropped a malformed frame from the gateway: %s", e)
                continue
            if isinstance(msg, P.Registered):
                self._on_registered(msg)
            elif isinstance(msg, P.Reregister):
                log.warning("the gateway does not know this worker (restarted?); registering again")
                self.registered = False
                self._register()
            elif isinstance(msg, P.Heartbeat):
                self.gateway_load, self.load_heard_at = msg.load, self._last_heard
                self.gateway_knows_draining = msg.draining
            else:
                out.append(msg)

    def _on_registered(self, msg: P.Registered) -> None:
        if msg.ok:
            self.registered = True
            log.info("registered with the gateway at %s as %s", self.endpoint, self.register.worker_id)
        else:
            log.error("the gateway refused this worker: %s", msg.reason)
            self.refused = msg.reason

    def tick(self, load: int, draining: bool) -> None:
        """Heartbeat when due; reconnect and register again when the gateway has gone silent."""
        now = time.monotonic()
        if now - self._last_tick > self.timeout_s / 2:  # our own loop was busy: not the gateway's silence
            self._last_heard += now - self._last_tick
        self._last_tick = now
        if now - self._last_heard > self.timeout_s:
            log.warning("no word from the gateway for %.1f s; reconnecting", now - self._last_heard)
            self.connect()
        elif now - self._last_beat >= self.heartbeat_s or draining != self._beat_draining:
            # Every interval, however much else goes out: only a heartbeat tells the load and the
            # drain, and a drain at once (a busy worker that skipped its beats while its other
            # messages flowed kept the router from ever hearing of its drain: it was routed new
            # prompts until its drain timed out, and ended them as it left).
            self.send(P.Heartbeat(load, draining))
            self._last_beat, self._beat_load, self._beat_draining = now, load, draining

    def nothing_on_the_way(self, since: float) -> bool:
        """The gateway, in a heartbeat sent after `since` (the drain's start) and once it knew that
        this worker drains, had nothing more routed to us; or the gateway is gone, and nothing more
        can come. (A heartbeat from before it knew says nothing of what it routes here next: a
        worker that exited on one lost that, which the gateway resumed only after its silence.)"""
        gone = time.monotonic() - self._last_heard > self.timeout_s
        return gone or (self.gateway_knows_draining and self.gateway_load == 0 and self.load_heard_at > since)

    def goodbye(self) -> None:
        """Tell the gateway this worker leaves; close() then lingers to deliver it."""
        self.send(P.Goodbye())
        self._linger_ms = GOODBYE_LINGER_MS

    def close(self) -> None:
        self._closing.set()
        with self._lock:  # the beat thread sends no more
            self._working_since = None
        if self.sock is not None:
            self.sock.close(self._linger_ms)
