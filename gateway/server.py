"""The gateway process: the worker link, the ZMQ client front and the HTTP/WebSocket front on one
asyncio (uvloop) loop."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
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

from splitserve.common.protocol import OUTPUT_SUFFIX

from .api_context import ApiContext
from .auth import UNAUTHORIZED, admits
from .chat_template import load_chat_template
from .core import GatewayCore
from .frontdoor import FrontDoor
from .http_app import HttpServer, build_app
from .metrics import GatewayMetrics
from .options import GatewayOptions
from .workers import Expectations, Worker, WorkerRegistry
from .zmq_replies import ZmqReplies

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, opts: GatewayOptions):
        self.opts = opts
        path = resolve_model(opts.model.model, opts.model.home)
        cfg = load_model_config(path)
        self.tokenizer = Tokenizer.from_dir(path)
        self.limits = derive_limits(opts.limits, cfg.n_positions)
        want = Expectations(cfg.fingerprint(self.tokenizer.vocab_size), self.limits.max_total_tokens)
        self.registry = WorkerRegistry(want, opts.link.heartbeat_timeout, opts.kv_transport)
        self.ctx = zmq.asyncio.Context()
        curve = opts.link.curve
        self.zap = guard_clients(self.ctx, curve) if curve is not None else None  # before the socket binds
        self.worker_sock = make_socket(self.ctx, zmq.ROUTER, P.MAX_CONTROL_BYTES, curve=curve)
        # A restarted worker reuses its output socket's name: the new connection takes it over.
        self.worker_sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.front = make_socket(self.ctx, zmq.ROUTER, P.MAX_CONTROL_BYTES)
        # A reply to a client whose connection closed fails (EHOSTUNREACH) instead of vanishing:
        # that is how the gateway learns the client is gone and stops its requests.
        self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.worker_port = bind_endpoint(self.worker_sock, opts.host, opts.worker_port)
        self.zmq_port = bind_endpoint(self.front, opts.host, opts.zmq_port)
        self.replies = ZmqReplies(self.front, self._client_gone)
        self.core = GatewayCore(self.tokenizer, self.limits, self.registry, self._send_worker,
                                opts.max_concurrent_requests)
        # Every front end submits through the door, which meters each request.
        self.door = FrontDoor(self.core, GatewayMetrics(self.core))
        api = ApiContext(self.door, self.tokenizer, self.limits, opts.model.model, load_chat_template(path),
                         opts.api_key)
        self.http = HttpServer(build_app(api), opts.host, opts.port, opts.max_connections)
        self.client_ids: dict[tuple[bytes, str], str] = {}  # (client identity, its id) -> gateway id
        self.instance = secrets.token_hex(8)  # tells workers whether they talk to the gateway they registered with
        self._stop = asyncio.Event()

    @property
    def worker_endpoint(self) -> str:
        return tcp_endpoint(self.opts.host, self.worker_port)

    @property
    def zmq_endpoint(self) -> str:
        return tcp_endpoint(self.opts.host, self.zmq_port)

    @property
    def http_url(self) -> str:
        host = f"[{self.opts.host}]" if ":" in self.opts.host else self.opts.host
        return f"http://{host}:{self.http.port}"

    def _send_worker(self, worker: Worker, msg) -> None:
        self.worker_sock.send_multipart([worker.identity, P.encode(msg)])

    # ---- loops ----------------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [asyncio.create_task(c) for c in (self._worker_loop(), self._front_loop(), self._tick_loop())]
        http = asyncio.create_task(self.http.serve())
        try:
            await self._stop.wait()
        finally:
            await self.http.stop(http)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.worker_sock.close(0)
            self.front.close(0)
            if self.zap is not None:
                self.zap.stop()
            self.ctx.term()

    def stop(self) -> None:
        self._stop.set()

    def drain(self, timeout_s: float) -> None:
        """Admit nothing more, and tell every worker to finish what it holds (for up to `timeout_s`)
        and exit; what a worker has not finished by then it hands back."""
        self.core.draining = True
        for worker in list(self.registry.workers.values()):
            self._send_worker(worker, P.Drain(timeout_s))

    @staticmethod
    async def _incoming(sock: zmq.asyncio.Socket, kinds, port: str):
        """(identity, message) pairs; a malformed frame comes as its DecodeError, already logged."""
        dec = P.decoder(kinds)
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 2:
                continue
            try:
                yield frames[0], P.decode(dec, frames[1])
            except P.DecodeError as e:
                log.warning("dropped a malformed frame on the %s port: %s", port, e)
                yield frames[0], e

    async def _worker_loop(self) -> None:
        async for identity, msg in self._incoming(self.worker_sock, P.WorkerToGateway, "worker"):
            if isinstance(msg, P.DecodeError):
                continue
            try:
                self._on_worker(identity, msg)
            except Exception:  # one bad message must not take the gateway down
                log.exception("failed to handle %s", type(msg).__name__)

    def _on_worker(self, identity: bytes, msg) -> None:
        if isinstance(msg, P.Register):
            reason = self.registry.register(identity, msg)
            self.worker_sock.send_multipart([identity, P.encode(P.Registered(not reason, reason,
                                                                             self.opts.link.heartbeat_s, self.instance))])
            self.core.dispatch()
            return
        worker = self.registry.seen(identity, msg.draining if isinstance(msg, P.Heartbeat) else None)
        if worker is None and identity.endswith(OUTPUT_SUFFIX):
            # A decode worker's output thread sends on a socket of its own, named after it.
            worker = self.registry.workers.get(identity[: -len(OUTPUT_SUFFIX)].decode(errors="replace"))
        elif worker is None and isinstance(msg, P.Heartbeat):
            # A worker of an earlier gateway process (or one expired as silent) is still beating.
            self.worker_sock.send_multipart([identity, P.encode(P.Reregister())])
        if worker is not None and not isinstance(msg, P.Heartbeat):
            self.core.on_worker(worker, msg)

    async def _tick_loop(self) -> None:
        interval = self.opts.link.heartbeat_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - last > 2 * interval:  # this loop itself was stalled: that was not the workers' silence
                self.registry.forgive(now - last - interval)
            last = now
            for worker in list(self.registry.workers.values()):
                # The load tells a draining worker whether work routed to it is still on its way.
                beat = P.Heartbeat(len(worker.assigned) if worker.info.role == "decode" else worker.queued_tokens)
                self.worker_sock.send_multipart([worker.identity, P.encode(beat)])
            try:
                self.core.tick()
            except Exception:
                log.exception("gateway tick failed")

    async def _front_loop(self) -> None:
        async for identity, msg in self._incoming(self.front, P.ClientMessage, "client"):
            if isinstance(msg, P.DecodeError):
                self._reply(identity, P.Error("", "validation", f"malformed message: {msg}"))
                continue
            try:
                if isinstance(msg, P.Generate):
                    self._on_generate(identity, msg)
                else:
                    gid = self.client_ids.pop((identity, msg.id), None)
                    if gid is not None:
                        self.door.cancel(gid)
            except Exception as e:  # one bad request must not end the front for every client
                log.exception("failed to handle a client's %s", type(msg).__name__)
                self._reply(identity, P.Error(msg.id, "generation", f"the gateway could not handle it: {e}"))

    def _on_generate(self, identity: bytes, msg: P.Generate) -> None:
        if not admits(self.opts.api_key, msg.api_key):
            self.door.refuse("zmq", "unauthorized")
            self._reply(identity, P.Error(msg.id, "unauthorized", UNAUTHORIZED))
            return
        key = (identity, msg.id)
        if key in self.client_ids:
            self._reply(identity, P.Error(msg.id, "validation", f"request id {msg.id!r} is already in use"))
            return

        def sink(out) -> None:
            self.replies.send(identity, out, msg.batched_replies)
            if isinstance(out, P.Error) or out.finish_reason is not None:
                self.client_ids.pop(key, None)

        gid = self.door.submit("zmq", msg, sink)
        if gid is not None and self.core.running(gid):
            self.client_ids[key] = gid

    def _reply(self, identity: bytes, msg) -> None:
        self.replies.send(identity, msg)

    def _client_gone(self, identity: bytes) -> None:
        """Its connection closed: nobody reads the rest, so its requests stop and free their slots.
        A cancel's own reply fails the same way and lands here again, so each id is taken once."""
        for key in [key for key in self.client_ids if key[0] == identity]:
            gid = self.client_ids.pop(key, None)
            if gid is not None:
                self.door.cancel(gid)


def run(opts: GatewayOptions) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        gw = Gateway(opts)
        log.info("gateway: clients at %s, HTTP and WebSocket at %s, workers at %s", gw.zmq_endpoint, gw.http_url,
                 gw.worker_endpoint)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, gw.stop)
        await gw.run()

    asyncio.run(main())
    return 0
