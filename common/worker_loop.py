"""What the prefill and the decode worker share: registration over the gateway link, the poll
loop, heartbeats, draining, metrics and closing. A worker fills in its own
sockets, messages and work (the methods that raise NotImplementedError)."""

from __future__ import annotations

import logging
import os
import signal
import time

import zmq

from . import protocol as P
from .heap import freeze_startup_heap
from .kv_transport import gpu_uuids
from .loading import LoadedModel
from .metrics_http import WorkerMetrics
from .params import Limits
from .runtime import DTYPE_NAMES
from .service_config import WorkerOptions
from .worker_link import DRAIN_GRACE_S, GatewayLink, pid_namespace

log = logging.getLogger(__name__)

EXIT_HUNG = 3  # the exit status of a worker its watchdog found hung


class WorkerLoop:
    role: P.Role

    def __init__(self, opts: WorkerOptions, model: LoadedModel, limits: Limits):
        self.opts, self.model, self.limits = opts, model, limits
        self.ctx = zmq.Context()
        self.draining = False
        self.drain_started = 0.0
        self.drain_deadline = float("inf")
        self.link: GatewayLink | None = None  # connected by start(), once the worker's own sockets exist
        # last: its HTTP server answers /health (which reads the fields above) from here on
        self.metrics = WorkerMetrics(self.role, opts.metrics_port, self.health, opts.host)

    def start(self, kv_transports: list[P.Transport], capacity: int, kv_endpoint: str = "",
              kv_public_key: str = "", prefix_blocks: int = 0, prefix_block_tokens: int = 0) -> None:
        """Register with the gateway: what this worker can do and hold."""
        o, m = self.opts, self.model
        register = P.Register(
            role=self.role, worker_id=o.worker_id, protocol=P.PROTOCOL_VERSION, host_id=o.host_id,
            gpu_uuids=gpu_uuids(), device=str(m.device), kv_endpoint=kv_endpoint, kv_transports=kv_transports,
            capacity=capacity, model_fingerprint=m.fingerprint(), dtype=DTYPE_NAMES[m.dtype],
            slot_len=self.limits.max_total_tokens, pid=os.getpid(), pid_namespace=pid_namespace(),
            kv_public_key=kv_public_key, prefix_blocks=prefix_blocks, prefix_block_tokens=prefix_block_tokens,
        )
        # Start-up's garbage goes before the Register does: the router counts this worker's silence
        # from it, and a full collection of a heap with PyTorch in it is slow on busy cores (found
        # in a storm on an overloaded machine: a worker started again went silent for 2.4 s right
        # after it registered, and was dropped).
        freeze_startup_heap()
        self.link = GatewayLink(self.ctx, o.gateway, register, self.holding, o.link.heartbeat_s,
                                o.link.heartbeat_timeout, curve=o.link.curve, watchdog_s=o.watchdog_timeout,
                                on_hung=self._hung)

    # ---- what each worker fills in ---------------------------------------------------------

    def sockets(self) -> list[zmq.Socket]:
        """The worker's own sockets to poll besides the gateway link."""
        raise NotImplementedError

    def sockets_version(self) -> object:
        """Changes whenever `sockets()` would return other sockets."""
        return None

    def on_gateway(self, msg) -> None:
        """A message from the gateway (Drain is handled here)."""
        raise NotImplementedError

    def on_socket(self, sock: zmq.Socket) -> None:
        raise NotImplementedError

    def busy(self) -> bool:
        """Work is waiting: poll without sleeping."""
        raise NotImplementedError

    def load(self) -> int:
        """What the heartbeat reports: prefill, queued prompt tokens; decode, active slots."""
        raise NotImplementedError

    def idle(self) -> bool:
        """Nothing queued, running or held for the gateway's requests."""
        raise NotImplementedError

    def housekeeping(self) -> None:
        """Periodic: deadlines, timeouts, gauges. Runs every loop turn."""
        raise NotImplementedError

    def work(self) -> None:
        """One unit of work: a prefill batch or a decode step."""
        raise NotImplementedError

    def holding(self) -> list[P.Held]:
        """The requests held here, for a (re)registration: a restarted router adopts them."""
        raise NotImplementedError

    def end_unfinished(self) -> None:
        """The drain timed out: hand back what is left (Finished "shutdown"), for the gateway to
        resume elsewhere."""
        raise NotImplementedError

    def health(self) -> dict:
        # the probe's HTTP server runs from __init__: the worker's own state exists once it started
        started = self.link is not None
        return {"role": self.role, "registered": started and self.link.registered,
                "draining": self.draining} | (self.details() if started else {"starting": True})

    def details(self) -> dict:
        """What /health adds for this kind of worker once it has started."""
        return {}

    def _hung(self, seconds: float) -> None:
        """The beat thread found a unit of work running past --watchdog-timeout: exit, as SGLang's
        watchdog does. A process stuck in a kernel or a collective keeps its memory, and its health
        and metrics endpoints answer from their own thread: alive it would never be started again
        (by serve, or a Kubernetes liveness probe). Its requests resume elsewhere, as for any death;
        a SIGKILL's leftovers (a staging file) are swept as for one."""
        log.critical("a %s has run for %.1f s, past --watchdog-timeout %g s: taken for hung, exiting",
                     "prefill batch" if self.role == "prefill" else "decode step", seconds,
                     self.opts.watchdog_timeout)
        os._exit(EXIT_HUNG)

    def close_own(self) -> None:
        """Close what the worker opened itself."""

    # ---- the loop ---------------------------------------------------------------------------

    def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.start_drain(self.opts.link.drain_timeout))
        link = self.link
        poller, polled = zmq.Poller(), None
        try:
            while not (self.draining and self._drained()):
                if link.refused:
                    return 1
                if polled != (link.generation, self.sockets_version()):
                    poller, polled = self._poller(), (link.generation, self.sockets_version())
                wait_ms = 0 if self.busy() else int(self.opts.link.heartbeat_s * 500)
                for sock, _ in poller.poll(wait_ms):
                    if sock is link.sock:
                        for msg in link.receive():
                            if isinstance(msg, P.Drain):
                                self.start_drain(msg.timeout_s)
                            else:
                                self.on_gateway(msg)
                    else:
                        self.on_socket(sock)
                link.tick(self.load(), self.draining)
                if self.draining and time.monotonic() > self.drain_deadline:
                    self.end_unfinished()
                self.housekeeping()
                with link.working():
                    self.work()
            link.goodbye()
            return 0
        finally:
            self.close()

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (self.link.sock, *self.sockets()):
            poller.register(sock, zmq.POLLIN)
        return poller

    def start_drain(self, timeout_s: float) -> None:
        if not self.draining:
            log.info("draining: finishing what is queued and running (up to %.0f s)", timeout_s)
            self.draining = True
            self.drain_started = time.monotonic()
            self.drain_deadline = self.drain_started + timeout_s

    def _drained(self) -> bool:
        """Nothing held here, and nothing more on its way from the gateway (or out of time)."""
        return self.idle() and (self.link.nothing_on_the_way(self.drain_started)
                                or time.monotonic() > self.drain_deadline + DRAIN_GRACE_S)

    def close(self) -> None:
        self.close_own()
        if self.link is not None:
            self.link.close()
        self.metrics.close()
        self.ctx.term()
