"""The gateway's processes: `splitserve gateway` (a router and one frontend on one asyncio loop,
joined over loopback as separate processes would be), `splitserve router` and `splitserve
frontend`; and the router's own small HTTP server (/health, /metrics, /info)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace

import zmq.asyncio
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from splitserve.common.heap import freeze_startup_heap
from splitserve.common.zmq_util import tcp_endpoint

from .frontend import Frontend
from .http_app import HttpServer, Json
from .options import FrontendOptions, GatewayOptions, RouterOptions
from .router import Router
from .router_metrics import RouterCollector

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, opts: GatewayOptions):
        self.opts = opts
        self.ctx = zmq.asyncio.Context()
        self.router = Router(opts.router, self.ctx)
        loopback = tcp_endpoint("127.0.0.1" if ":" not in opts.router.host else "::1", self.router.frontend_port)
        self.frontend = Frontend(replace(opts.frontend, router=loopback), self.ctx, guard=False, reuse_port=False)
        # one /metrics for both: the frontend's requests and the router's books
        self.frontend.door.metrics.registry.register(RouterCollector(self.router.core))
        self.registry = self.router.registry

    @property
    def worker_endpoint(self) -> str:
        return self.router.worker_endpoint

    @property
    def zmq_endpoint(self) -> str:
        return self.frontend.zmq_endpoint

    @property
    def http_url(self) -> str:
        return self.frontend.http_url

    async def run(self) -> None:
        freeze_startup_heap()
        tasks = [asyncio.create_task(c) for c in (*self.frontend.loops(), *self.router.loops())]
        try:
            await self.frontend.stopping.wait()
        finally:
            await self.frontend.close(tasks[: len(tasks) - 3])
            await _end(tasks, self.router)

    def stop(self) -> None:
        """As Frontend.stop: the frontend drains, then both stop."""
        self.frontend.stop()

    def drain(self, timeout_s: float) -> None:
        self.router.drain(timeout_s)


class RouterServer:
    """The router alone in its process (`splitserve router`, and `serve` with several frontends)."""

    def __init__(self, opts: RouterOptions):
        self.ctx = zmq.asyncio.Context()
        self.router = Router(opts, self.ctx)
        self.registry = self.router.registry
        self.http = HttpServer(router_app(self.router, opts.model.model), opts.host, opts.metrics_port, 64) \
            if opts.metrics_port else None
        self._stop = asyncio.Event()

    @property
    def worker_endpoint(self) -> str:
        return self.router.worker_endpoint

    async def run(self) -> None:
        freeze_startup_heap()
        tasks = [asyncio.create_task(c) for c in self.router.loops()]
        served = asyncio.create_task(self.http.serve()) if self.http else None
        try:
            await self._stop.wait()
        finally:
            if self.http is not None:
                await self.http.stop(served)
            await _end(tasks, self.router)

    def stop(self) -> None:
        self._stop.set()

    def drain(self, timeout_s: float) -> None:
        self.router.drain(timeout_s)


async def _end(tasks: list[asyncio.Task], router: Router) -> None:
    """Cancel what still runs, then close the router and the sockets' context."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    router.close()
    router.ctx.term()


def router_app(router: Router, model_id: str) -> FastAPI:
    """The router's /health, /metrics and /info (`--metrics-port`)."""
    app = FastAPI(title="splitserve router", docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry()
    registry.register(RouterCollector(router.core))

    @app.get("/health")
    async def health() -> Json:
        core = router.core
        counts = {f"{role}_workers": len(core.registry.of_role(role)) for role in ("prefill", "decode")}
        ok = all(counts.values()) and not core.draining
        status = "ok" if ok else ("draining" if core.draining else "no workers")
        return Json({"status": status, **counts, "frontends": len(core.frontends)}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info")
    async def info() -> Json:
        core = router.core
        return Json({"model_id": model_id, "max_concurrent_requests": core.max_concurrent,
                     "zmq_endpoints": core.client_endpoints(),
                     "frontends": sorted(core.frontends)})

    return app


def _serve(main) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
    return 0


async def _run_until_stopped(server: Gateway | RouterServer | Frontend) -> None:
    """Serve until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    await server.run()


def run_gateway(opts: GatewayOptions) -> int:
    async def main() -> None:
        gw = Gateway(opts)
        log.info("gateway: clients at %s, HTTP and WebSocket at %s, workers at %s", gw.zmq_endpoint, gw.http_url,
                 gw.worker_endpoint)
        await _run_until_stopped(gw)

    return _serve(main)


def run_router(opts: RouterOptions) -> int:
    async def main() -> None:
        server = RouterServer(opts)
        log.info("router: workers at %s, frontends at %s%s", server.worker_endpoint, server.router.frontend_endpoint,
                 f", /health and /metrics on port {server.http.port}" if server.http else "")
        await _run_until_stopped(server)

    return _serve(main)


def run_frontend(opts: FrontendOptions) -> int:
    async def main() -> None:
        frontend = Frontend(opts, zmq.asyncio.Context())
        log.info("frontend %s: clients at %s, HTTP and WebSocket at %s, tokens at %s, router at %s", frontend.id,
                 frontend.zmq_endpoint, frontend.http_url, frontend.token_endpoint, opts.router)
        await _run_until_stopped(frontend)
        if frontend.refused:
            raise SystemExit(1)

    return _serve(main)
