"""A frontend: the clients' sockets (ZMQ client port, HTTP and WebSocket), the token endpoint that
workers push its requests' tokens to, and its link to the router, on one asyncio loop around its
core (frontend_core.py). Several frontends share one HTTP port (SO_REUSEPORT); each has its own
ZMQ client port, and every frontend's /info lists them all."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import replace
from functools import partial

import zmq
import zmq.asyncio

from splitserve.common import protocol as P
from splitserve.common.builtin_models import resolve_model
from splitserve.common.curve import guard_clients
from splitserve.common.heap import freeze_startup_heap
from splitserve.common.model_config import load_model_config
from splitserve.common.prefix_blocks import block_namespace
from splitserve.common.service_config import derive_limits
from splitserve.common.tokenizer import Tokenizer
from splitserve.common.zmq_util import bind_endpoint, make_socket, tcp_endpoint

from .api_context import ApiContext
from .auth import UNAUTHORIZED, admits
from .chat_template import load_chat_template
from .frontdoor import FrontDoor
from .frontend_core import FrontendCore
from .http_app import HttpServer, build_app, ops_app
from .metrics import GatewayMetrics
from .options import FrontendOptions
from .zmq_drain import DrainedSocket, messages, router_messages
from .zmq_replies import ZmqReplies

log = logging.getLogger(__name__)

OPS_CONNECTIONS = 64  # on --metrics-port: probes and scrapers
DRAIN_POLL_S = 0.05  # how often a draining frontend looks whether its requests have ended
# At close, how long the client and router sockets may take to send what is queued: the last
# replies of a drain, and its cancels (a peer that is reachable takes them at once)
CLOSE_LINGER_MS = 1000


class Frontend:
    """`guard`: start the CURVE allow-list on `ctx` (not when the router in this process did)."""

    def __init__(self, opts: FrontendOptions, ctx: zmq.asyncio.Context, guard: bool = True, reuse_port: bool = True):
        self.opts, self.ctx = opts, ctx
        self.id = opts.frontend_id or f"frontend-{secrets.token_hex(4)}"
        # the config and the tokenizer: a frontend never reads the weights
        path = resolve_model(opts.model.model, opts.model.home, revision=opts.model.revision, weights=False)
        cfg = load_model_config(path)
        self.tokenizer = Tokenizer.from_dir(path)
        self.fingerprint = cfg.fingerprint(self.tokenizer.vocab_size)
        self.limits = derive_limits(opts.limits, cfg.n_positions)
        curve = opts.link.curve
        self.zap = guard_clients(ctx, curve) if curve is not None and guard else None  # before the sockets bind
        # Workers push tokens here with the worker link's keys: this side serves with the router's.
        self.token_sock = make_socket(ctx, zmq.PULL, P.MAX_CONTROL_BYTES, curve=curve)
        self.token_port = bind_endpoint(self.token_sock, opts.host, opts.token_port)
        self.front = make_socket(ctx, zmq.ROUTER, P.MAX_CONTROL_BYTES)
        # A reply to a client whose connection closed fails (EHOSTUNREACH) instead of vanishing:
        # that is how the frontend learns the client is gone and stops its requests.
        self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.zmq_port = bind_endpoint(self.front, opts.host, opts.zmq_port)
        self.front_port = DrainedSocket(self.front, router_messages(P.ClientMessage, "client", self._on_client,
                                                                    self._on_malformed), multipart=True)
        self.replies = ZmqReplies(self.front_port.send_multipart, self._client_gone)
        self.token_endpoint = tcp_endpoint(opts.advertise_host, self.token_port)
        self.core = FrontendCore(self.tokenizer, self.limits, self._send_router, self.token_endpoint,
                                 partial(block_namespace, cfg))
        # Every front end submits through the door, which meters each request.
        self.door = FrontDoor(self.core, GatewayMetrics(self.core))
        api = ApiContext(self.door, self.tokenizer, self.limits, opts.model.model, load_chat_template(path),
                         opts.api_key)
        self.http = HttpServer(build_app(api), opts.host, opts.port, opts.max_connections, reuse_port)
        self.ops = HttpServer(ops_app(api), opts.host, opts.metrics_port, OPS_CONNECTIONS) if opts.metrics_port else None
        self.client_ids: dict[tuple[bytes, str], str] = {}  # (client identity, its id) -> gateway id
        self.router_sock: zmq.asyncio.Socket | None = None
        self.router_id = ""
        self.refused = ""  # the router's reason, when it refused this frontend
        self._router_heard = 0.0
        # set by the router's first Fleet: HTTP and ZMQ clients are served from then on
        self._joined = asyncio.Event()
        self.stopping = asyncio.Event()
        self._drain_until = 0.0  # time.monotonic() at which the drain ends what is still running

    @property
    def zmq_endpoint(self) -> str:
        return tcp_endpoint(self.opts.advertise_host, self.zmq_port)

    @property
    def http_url(self) -> str:
        host = f"[{self.opts.host}]" if ":" in self.opts.host else self.opts.host
        return f"http://{host}:{self.http.port}"

    # ---- loops ----------------------------------------------------------------------------

    def loops(self) -> list:
        """The HTTP server's last (close() stops it first, gracefully)."""
        ops = [self.ops.serve()] if self.ops is not None else []  # from the start: /health says why not ready
        return [self._token_loop(), self._router_loop(), self._front_loop(), self._tick_loop(), *ops,
                self._serve_http()]

    async def _serve_http(self) -> None:
        # Not before the router has told the fleet's state: until then every answer, /health's
        # included, would say "no router" about a router that is one message away.
        await self._joined.wait()
        await self.http.serve()

    async def run(self) -> None:
        """This frontend alone in its process (the gateway runs its loops beside its router's)."""
        freeze_startup_heap()
        tasks = [asyncio.create_task(c) for c in self.loops()]
        try:
            await self.stopping.wait()
        finally:
            await self.close(tasks)
            self.ctx.term()

    def stop(self) -> None:
        """Shut down (SIGTERM, Ctrl-C) once the requests in flight have finished (see _drain); a
        second call ends the drain at once."""
        self._drain_until = 0.0 if self.stopping.is_set() else time.monotonic() + self.opts.link.drain_timeout
        self.stopping.set()

    async def close(self, tasks: list[asyncio.Task]) -> None:
        await self._drain()
        if self._joined.is_set():
            await self.http.stop(tasks[-1])
        else:
            tasks[-1].cancel()
            self.http.socket.close()
        for t in tasks[:-1]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.ops is not None:
            self.ops.socket.close()
        self.token_sock.close(0)
        for sock in (self.front, self.router_sock):
            if sock is not None:
                sock.close(CLOSE_LINGER_MS)
        if self.zap is not None:
            self.zap.stop()

    async def _drain(self) -> None:
        """Refuse new requests (HTTP stops listening, so that the port's other frontends take new
        connections) and let those in flight finish, for up to --drain-timeout; then end the rest
        with an error, which frees their workers' slots at once (the router hears their cancels).
        Tokens, the router and deadlines are served meanwhile: every loop still runs."""
        core = self.core
        self.door.drain()
        self.http.stop_listening()
        if self._joined.is_set():  # the router lists it no more (/info's zmq_endpoints)
            self._send_router(P.Heartbeat(core.live(), True))
        if core.live():
            log.info("draining: %d requests in flight get up to %.0f s to finish", core.live(),
                     self.opts.link.drain_timeout)
        while core.live() and time.monotonic() < self._drain_until:
            await asyncio.sleep(DRAIN_POLL_S)
        if core.live():
            log.warning("ending the %d requests still running", core.live())
            core.end_all("unavailable", "the frontend shut down before the request finished (its --drain-timeout)")

    # ---- tokens -----------------------------------------------------------------------------

    async def _token_loop(self) -> None:
        await DrainedSocket(self.token_sock, messages(P.WorkerToFrontend, "token", self.core.on_tokens)).serve()

    # ---- the router ---------------------------------------------------------------------------

    def _connect_router(self) -> None:
        curve = self.opts.link.curve
        # The frontend dials the router with the router's own key pair, which the router always lets in.
        keys = replace(curve, server=curve.public, clients=None) if curve is not None else None
        self.router_sock = make_socket(self.ctx, zmq.DEALER, P.MAX_CONTROL_BYTES, curve=keys)
        self.router_sock.connect(self.opts.router)
        self._router_heard = time.monotonic()
        self._hello()

    def _hello(self) -> None:
        live = [s.request.id for s in self.core.streams.values() if s.admitted]
        self._send_router(P.Hello(self.id, P.PROTOCOL_VERSION, self.fingerprint, self.token_endpoint,
                                  self.zmq_endpoint, live))

    def _send_router(self, msg) -> None:
        try:
            self.router_sock.send(P.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("the router link is backed up; dropped a %s", type(msg).__name__)

    async def _router_loop(self) -> None:
        dec = P.decoder(P.RouterToFrontend)
        self._connect_router()
        while True:
            frame = await self.router_sock.recv()
            self._router_heard = time.monotonic()
            try:
                msg = P.decode(dec, frame)
            except P.DecodeError as e:
                log.warning("dropped a malformed frame from the router: %s", e)
                continue
            try:
                self._on_router(msg)
            except Exception:
                log.exception("failed to handle the router's %s", type(msg).__name__)

    def _on_router(self, msg) -> None:
        if isinstance(msg, P.Welcome):
            if not msg.ok:
                log.error("the router refused this frontend: %s", msg.reason)
                self.refused = msg.reason
                self.stop()
            elif msg.router_id != self.router_id:
                log.info("joined router %s at %s as %s", msg.router_id, self.opts.router, self.id)
                self.router_id = msg.router_id
        elif isinstance(msg, P.Reregister):
            self._hello()
        else:
            self.core.on_router(msg)
            if isinstance(msg, P.Fleet):
                self._joined.set()

    async def _tick_loop(self) -> None:
        interval, timeout = self.opts.link.heartbeat_s, self.opts.link.heartbeat_timeout
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - last > 2 * interval:  # this loop itself was stalled: that was not the router's silence
                self._router_heard += now - last - interval
            last = now
            if now - self._router_heard > timeout:
                # ZMQ reconnects by itself; a new router process must hear who this is
                log.warning("no word from the router for %.1f s; saying hello again", now - self._router_heard)
                self.core.fleet = None  # refuse new requests until it answers; streams go on
                self._router_heard = now
                self._hello()
            else:
                self._send_router(P.Heartbeat(self.core.live(), self.core.draining))
            try:
                self.core.tick()
            except Exception:
                log.exception("frontend tick failed")

    # ---- ZMQ clients --------------------------------------------------------------------------

    async def _front_loop(self) -> None:
        # As HTTP (_serve_http): a request would be refused as "the router is out of reach" in the
        # moment before the router's first word; clients' requests wait in the socket meanwhile.
        await self._joined.wait()
        await self.front_port.serve()

    def _on_malformed(self, identity: bytes, e: P.DecodeError) -> None:
        self._reply(identity, P.Error("", "validation", f"malformed message: {e}"))

    def _on_client(self, identity: bytes, msg) -> None:
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
