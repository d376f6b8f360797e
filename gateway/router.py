"""The router: the worker link and the frontend link on one asyncio loop, around the books
(router_core.py). It sees per-request events only; tokens go from workers to frontends."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import zmq
import zmq.asyncio

from splitserve.common import protocol as P
from splitserve.common.builtin_models import resolve_model
from splitserve.common.curve import guard_clients
from splitserve.common.model_config import load_model_config
from splitserve.common.service_config import derive_limits
from splitserve.common.tokenizer import Tokenizer
from splitserve.common.zmq_util import bind_endpoint, make_socket, tcp_endpoint

from .options import RouterOptions
from .router_core import Frontend, RouterCore
from .workers import Expectations, Worker, WorkerRegistry
from .zmq_drain import DrainedSocket, router_messages

log = logging.getLogger(__name__)


class Router:
    def __init__(self, opts: RouterOptions, ctx: zmq.asyncio.Context):
        self.opts, self.ctx = opts, ctx
        # the config and the tokenizer: a router never reads the weights
        path = resolve_model(opts.model.model, opts.model.home, revision=opts.model.revision, weights=False)
        cfg = load_model_config(path)
        fingerprint = cfg.fingerprint(Tokenizer.from_dir(path).vocab_size)
        self.limits = derive_limits(opts.limits, cfg.n_positions)
        self.registry = WorkerRegistry(Expectations(fingerprint, self.limits.max_total_tokens),
                                       opts.link.heartbeat_timeout, opts.kv_transport)
        curve = opts.link.curve
        self.zap = guard_clients(ctx, curve) if curve is not None else None  # before the sockets bind
        self.worker_sock = make_socket(ctx, zmq.ROUTER, P.MAX_CONTROL_BYTES, curve=curve)
        # A restarted worker reuses its link's name: the new connection takes it over.
        self.worker_sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.frontend_sock = make_socket(ctx, zmq.ROUTER, P.MAX_CONTROL_BYTES, curve=curve)
        self.frontend_sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.worker_port = bind_endpoint(self.worker_sock, opts.host, opts.worker_port)
        self.frontend_port = bind_endpoint(self.frontend_sock, opts.host, opts.frontend_port)
        self.workers_link = DrainedSocket(self.worker_sock,
                                          router_messages(P.WorkerToGateway, "worker", self._on_worker), multipart=True)
        self.frontends_link = DrainedSocket(self.frontend_sock,
                                            router_messages(P.FrontendToRouter, "frontend", self._on_frontend),
                                            multipart=True)
        self.core = RouterCore(self.registry, self._send_worker, self._send_frontend, opts.max_concurrent_requests,
                               opts.link.heartbeat_timeout, fingerprint, opts.worker_restart_timeout)
        self.instance = secrets.token_hex(8)  # tells a frontend whether this is the router it joined
        self._drain_until = 0.0  # time.monotonic() at which a drain's workers hand back what they hold

    @property
    def worker_endpoint(self) -> str:
        return tcp_endpoint(self.opts.host, self.worker_port)

    @property
    def frontend_endpoint(self) -> str:
        return tcp_endpoint(self.opts.host, self.frontend_port)

    def _send_worker(self, worker: Worker, msg) -> None:
        self._to_worker(worker.identity, msg)

    def _to_worker(self, identity: bytes, msg) -> None:
        _send(self.workers_link, identity, msg)

    def _send_frontend(self, front: Frontend, msg) -> None:
        self._to_frontend(front.identity, msg)

    def _to_frontend(self, identity: bytes, msg) -> None:
        _send(self.frontends_link, identity, msg)

    def loops(self) -> list:
        return [self.workers_link.serve(), self.frontends_link.serve(), self._tick_loop()]

    def close(self) -> None:
        self.worker_sock.close(0)
        self.frontend_sock.close(0)
        if self.zap is not None:
            self.zap.stop()

    def drain(self, timeout_s: float) -> None:
        """Admit nothing more, and tell every worker to finish what it holds (for up to `timeout_s`)
        and exit; what a worker has not finished by then it hands back."""
        self.core.draining = True
        self._drain_until = time.monotonic() + timeout_s
        for worker in list(self.registry.workers.values()):
            self._send_worker(worker, P.Drain(timeout_s))
        self._tell_frontends()

    def _tell_frontends(self) -> None:
        for front in list(self.core.frontends.values()):
            self._send_frontend(front, self.core.fleet(front))

    # ---- workers --------------------------------------------------------------------------------

    def _on_worker(self, identity: bytes, msg) -> None:
        if isinstance(msg, P.Register):
            reason = self.registry.register(identity, msg)
            self._to_worker(identity, P.Registered(not reason, reason, self.opts.link.heartbeat_s))
            if not reason:
                self.core.registered(self.registry.workers[msg.worker_id], msg.holding)
                self._tell_frontends()
                if self.core.draining:  # one that joins a drain (started again just before it) drains too
                    self._to_worker(identity, P.Drain(max(0.0, self._drain_until - time.monotonic())))
            return
        worker = self.registry.seen(identity, msg.draining if isinstance(msg, P.Heartbeat) else None)
        if worker is None and isinstance(msg, P.Heartbeat):
            # A worker of an earlier router process (or one expired as silent) is still beating.
            self._to_worker(identity, P.Reregister())
        elif isinstance(msg, P.Goodbye):
            if worker is not None:
                log.info("%s worker %s drained and left", worker.info.role, worker.id)
                self.core.worker_left(self.registry.remove(worker), "shut down")
                self._tell_frontends()
        elif worker is not None and not isinstance(msg, P.Heartbeat):
            self.core.on_worker(worker, msg)

    # ---- frontends ----------------------------------------------------------------------------

    def _on_frontend(self, identity: bytes, msg) -> None:
        if isinstance(msg, P.Hello):
            reason = self.core.hello(identity, msg)
            if reason:
                log.error("refused frontend %s: %s", msg.frontend_id, reason)
            welcome = P.Welcome(not reason, reason, self.instance, self.opts.link.heartbeat_s)
            self._to_frontend(identity, welcome)
            if not reason:
                self._tell_frontends()  # the list of client ports changed
            return
        front = self.core.seen_frontend(identity)
        if front is None:
            # a frontend of an earlier router process, or one expired as silent: it says hello again
            self._to_frontend(identity, P.Reregister())
        else:
            self.core.on_frontend(front, msg)

    # ---- time ---------------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        interval = self.opts.link.heartbeat_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - last > 2 * interval:  # this loop itself was stalled: that was not the peers' silence
                self.registry.forgive(now - last - interval)
                for front in self.core.frontends.values():
                    front.last_seen += now - last - interval
            last = now
            for worker in list(self.registry.workers.values()):
                # The load tells a draining worker whether work routed to it is still on its way,
                # once the router knows it drains (it routes nothing more there from then on).
                beat = P.Heartbeat(len(worker.assigned) if worker.info.role == "decode" else worker.queued_tokens,
                                   worker.draining)
                self._send_worker(worker, beat)
            try:
                self.core.tick()
            except Exception:
                log.exception("router tick failed")
            self._tell_frontends()  # also the frontends' heartbeat


def _send(link: DrainedSocket, identity: bytes, msg) -> None:
    """Never blocks: a ROUTER socket drops what a peer that stopped reading has no room for, and
    the peer's heartbeat timeout deals with it; the books go on for everyone else."""
    try:
        link.send_multipart([identity, P.encode(msg)])
    except zmq.ZMQError as e:
        log.debug("could not send a %s: %s", type(msg).__name__, e)
