"""The HTTP and WebSocket front: one FastAPI app (TGI, OpenAI, /ws, /health, /metrics) served by
uvicorn on the gateway's own event loop, beside its ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
from importlib.metadata import version

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from splitserve.common import protocol as P

from .api_context import ApiContext
from .api_errors import ApiError, invalid, openai_error, retry_headers, tgi_error
from .http_guard import HttpGuard, LoadShed
from .infill import INFILL_PATH, infill_error, infill_router
from .openai_api import openai_router
from .replies import Json, with_raw_send
from .tgi import tgi_router
from .tokenizer_api import tokenize_router
from .websocket import __doc__ as WEBSOCKET_DOC, websocket_router

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # open connections get this long to finish once the gateway stops
# A request body or WebSocket message is a control message, as on the ZMQ front.
MAX_BODY_BYTES = P.MAX_CONTROL_BYTES
FILES_BESIDES_CONNECTIONS = 256  # ZeroMQ sockets and their connections, logs, model files


def build_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(title="splitserve", version=version("splitserve"), default_response_class=Json,
                  description="TGI-compatible, OpenAI-compatible and llama.cpp-compatible (/infill) HTTP APIs "
                              "of a splitserve gateway.\n\n"
                              "**WebSocket** (not an OpenAPI route): " + WEBSOCKET_DOC)
    app.include_router(tgi_router(ctx))
    app.include_router(openai_router(ctx))
    app.include_router(infill_router(ctx))
    app.include_router(tokenize_router(ctx))
    app.include_router(websocket_router(ctx))
    app.include_router(ops_router(ctx))

    def error_response(path: str, e: ApiError) -> Json:
        # refused before reaching the core; a path that is no route is no request to count
        if not e.metered and path in paths:
            ctx.door.refuse(path, e.error_type)
        shape = openai_error if path.startswith("/v1/") else infill_error if path == INFILL_PATH else tgi_error
        status, body = shape(e)
        return Json(body, status_code=status, headers=retry_headers(e))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Json:
        return error_response(request.url.path, e)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, e: RequestValidationError) -> Json:
        return error_response(request.url.path, invalid(_describe(e), _param(e)))

    @app.exception_handler(HTTPException)
    async def unparsable(request: Request, e: HTTPException) -> Response:
        if e.status_code == 400:  # a body FastAPI could not read as JSON (not UTF-8, say): the API's own error
            return error_response(request.url.path, invalid(f"the request body is not valid JSON ({e.detail})"))
        return await http_exception_handler(request, e)

    paths = frozenset(app.openapi()["paths"])
    app.add_middleware(LoadShed, rejection=ctx.door.rejection, refuse=error_response)  # inside the guard: keys first
    app.add_middleware(HttpGuard, api_key=ctx.api_key, max_body_bytes=MAX_BODY_BYTES, refuse=error_response)
    return app


def ops_router(ctx: ApiContext) -> APIRouter:
    """/health and /metrics: on the API's port, and alone on a frontend's own --metrics-port."""
    router = APIRouter(tags=["Operations"])

    @router.get("/health", summary="200 while prefill and decode workers are registered")
    async def health() -> Json:
        fleet = ctx.core.fleet
        if fleet is None:
            return Json({"status": "no router", "prefill_workers": 0, "decode_workers": 0}, status_code=503)
        counts = {"prefill_workers": fleet.prefill_workers, "decode_workers": fleet.decode_workers}
        draining = fleet.draining or ctx.core.draining
        ok = all(counts.values()) and not draining
        status = "ok" if ok else ("draining" if draining else "no workers")
        return Json({"status": status, **counts}, status_code=200 if ok else 503)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(ctx.door.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router


def ops_app(ctx: ApiContext) -> FastAPI:
    """A frontend's own /health and /metrics (--metrics-port): this frontend's alone, where the
    shared --port reaches whichever frontend the kernel chose for the connection."""
    app = FastAPI(title="splitserve frontend", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=Json)
    app.include_router(ops_router(ctx))
    return app


def _describe(e: RequestValidationError) -> str:
    """Pydantic's errors as one line, e.g. `parameters.temperature`: Input should be a valid number (given 'x')."""
    by_field: dict[str, list[str]] = {}  # field -> the union members it failed, or its one message
    for err in e.errors():
        if err["type"] == "json_invalid":  # no field: the body stops being JSON at character loc[-1]
            return f"the request body is not valid JSON ({err['ctx']['error']} at character {err['loc'][-1]})"
        field = [str(p) for p in err["loc"] if p != "body"]
        # a union's members appear in the location as type names: fold them into one message
        cut = next((i for i, p in enumerate(field) if i > 0 and _is_type_name(p)), None)
        if cut is None:
            given = f" (given {_short(repr(err['input']))})" if err["type"] != "missing" else ""
            by_field[".".join(field) or "body"] = [f"{err['msg']}{given}"]
        else:
            members = by_field.setdefault(".".join(field[:cut]), [])
            if field[cut] not in members:
                members.append(field[cut])
    return "; ".join(f"`{field}`: {found[0] if len(found) == 1 else 'should be one of: ' + ', '.join(found)}"
                     for field, found in by_field.items())


def _short(text: str, limit: int = 200) -> str:
    """A client's value quoted in an error: never the whole of a large body back to it."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_type_name(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "dict", "list")


def _param(e: RequestValidationError) -> str | None:
    errors = e.errors()
    if not errors or errors[0]["type"] == "json_invalid":
        return None
    loc = [str(p) for p in errors[0]["loc"] if p != "body"]
    return loc[0] if loc else None


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # frontends on one host serve one port; the kernel spreads the connections
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot serve HTTP on {host}:{port} (--host, --port): {e.strerror}") from None
    return sock


def _allow_open_files(connections: int) -> None:
    """Raise the soft open-file limit so that the connection limit, not it, is what binds (the
    usual soft limit of 1024 would otherwise fail accept() first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + FILES_BESIDES_CONNECTIONS
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open files are limited to %d, below --max-connections %d + %d", new, connections,
                        FILES_BESIDES_CONNECTIONS)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The gateway's process owns SIGINT/SIGTERM (serve drains on them); uvicorn must not take them.
        yield


class HttpServer:
    """uvicorn on a socket bound at construction, so a taken port fails the start and port 0 works."""

    def __init__(self, app: FastAPI, host: str, port: int, max_connections: int, reuse_port: bool = False):
        self.socket = _bind(host, port, reuse_port)
        self.port = self.socket.getsockname()[1]
        _allow_open_files(max_connections)
        # log_config None: uvicorn's loggers go through the process's own logging setup.
        # limit_concurrency: past it uvicorn answers 503 and closes, so that idle or slow
        # connections cannot take every file descriptor (and with them the ZeroMQ sockets). It
        # counts the asking connection too, hence + 1: max_connections open ones are all served.
        # ws_per_message_deflate off: a browser offers compression by default, and deflating each
        # token's frame (~100-200 bytes) would cost more CPU per token than the bytes it saves.
        config = uvicorn.Config(with_raw_send(app), log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S, ws_max_size=MAX_BODY_BYTES,
                                ws_per_message_deflate=False,
                                limit_concurrency=max_connections + 1)
        self.server = _Server(config)

    async def serve(self) -> None:
        await self.server.serve(sockets=[self.socket])

    def stop_listening(self) -> None:
        """Take no new connection (the port's other frontends get them, SO_REUSEPORT) and close idle
        HTTP ones (a client's next request opens one there); responses and WebSockets go on."""
        for listening in getattr(self.server, "servers", ()):  # uvicorn's, once it has started
            listening.close()
        for connection in list(self.server.server_state.connections):
            if type(connection).__module__.startswith("uvicorn.protocols.http."):
                connection.shutdown()  # closes it now if idle, else after its response

    async def stop(self, task: asyncio.Task) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(task, SHUTDOWN_GRACE_S + 2)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            log.warning("the HTTP server did not stop in time")
        self.socket.close()
