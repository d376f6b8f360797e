"""The options of the router, the frontends and the gateway (a router with one frontend in one
process), built once from their CLI flags (environment variables as defaults); light to import,
so that `--help` and the commands that write deployments need none of the server. Each flag is
declared once, in the function for the side that uses it."""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

from splitserve.common.config import ModelOptions, add_model_args, model_options
from splitserve.common.protocol import TransportChoice
from splitserve.common.service_config import (
    DEFAULT_FRONTEND_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_WORKER_PORT,
    DEFAULT_ZMQ_PORT,
    WILDCARD_HOSTS,
    LimitOptions,
    LinkOptions,
    add_host_arg,
    add_kv_transport_arg,
    add_limit_args,
    add_link_args,
    flags_argv,
    limit_options,
    link_options,
)

from .auth import ApiKey, add_api_key_args, api_key_option

env = os.environ.get


@dataclass(frozen=True)
class RouterOptions:
    model: ModelOptions
    limits: LimitOptions
    link: LinkOptions  # CURVE: the worker and frontend links' server keys
    host: str
    worker_port: int
    frontend_port: int
    kv_transport: TransportChoice
    max_concurrent_requests: int  # for the whole gateway: the router admits
    metrics_port: int  # /health, /metrics and /info of the router alone (0: off)
    worker_restart_timeout: float  # how long work waits for a role's last worker to come back (0: the settle time)


@dataclass(frozen=True)
class FrontendOptions:
    model: ModelOptions
    limits: LimitOptions
    link: LinkOptions  # CURVE: the router's key pair, which workers and the router trust
    host: str
    advertise_host: str  # the address workers dial for its token endpoint
    port: int  # HTTP and WebSocket, shared by every frontend (SO_REUSEPORT)
    zmq_port: int
    token_port: int  # where workers push its requests' tokens (0: any free)
    router: str  # the router's frontend endpoint, tcp://HOST:PORT
    max_connections: int  # HTTP and WebSocket, of this frontend
    api_key: ApiKey | None  # required of HTTP, WebSocket and ZMQ clients when set (auth.py)
    frontend_id: str = ""  # unique name (default: a random one)
    metrics_port: int = 0  # /health and /metrics of this frontend alone (0: off)


@dataclass(frozen=True)
class GatewayOptions:
    """`splitserve gateway`: a router and one frontend in one process."""

    router: RouterOptions
    frontend: FrontendOptions


# ---- flags, each declared once ------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_limit_args(p)
    add_link_args(p, server=True)
    add_host_arg(p)


def _add_router_flags(p: argparse.ArgumentParser, frontend_port: int) -> None:
    p.add_argument("--worker-port", type=int, default=int(env("SPLITSERVE_WORKER_PORT", str(DEFAULT_WORKER_PORT))),
                   help="where workers register (0: any free)")
    p.add_argument("--frontend-port", type=int, default=int(env("SPLITSERVE_FRONTEND_PORT", str(frontend_port))),
                   help="where frontends join the router (0: any free)")
    add_kv_transport_arg(p)
    p.add_argument("--max-concurrent-requests", type=int, default=int(env("SPLITSERVE_MAX_CONCURRENT", "512")),
                   help="requests in flight over all frontends (running or waiting); beyond it, an overload error")
    p.add_argument("--worker-restart-timeout", type=float,
                   default=float(env("SPLITSERVE_WORKER_RESTART_TIMEOUT", "0")),
                   help="once a role has lost its last worker, how long the requests it was running (and those "
                        "waiting for a decode slot) wait for a worker of that role to register, started again "
                        "by serve or Kubernetes, before they fail; new requests are refused meanwhile. Give more "
                        "than the model takes to load (0: twice --heartbeat-timeout, enough for the built-in one)")


def _add_frontend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--advertise-host", default=env("SPLITSERVE_ADVERTISE_HOST", ""),
                   help="the address workers dial to send tokens here (default: --host)")
    p.add_argument("--port", type=int, default=int(env("SPLITSERVE_PORT", str(DEFAULT_HTTP_PORT))),
                   help="HTTP and WebSocket port (frontends on one host share it)")
    p.add_argument("--zmq-port", type=int, default=int(env("SPLITSERVE_ZMQ_PORT", str(DEFAULT_ZMQ_PORT))),
                   help="the client library's port (0: any free)")
    p.add_argument("--token-port", type=int, default=int(env("SPLITSERVE_TOKEN_PORT", "0")),
                   help="where workers send this frontend's tokens (0: any free)")
    p.add_argument("--max-connections", type=int, default=int(env("SPLITSERVE_MAX_CONNECTIONS", "1024")),
                   help="open HTTP and WebSocket connections per frontend; a request on one more gets 503 and its "
                        "connection closed")
    add_api_key_args(p)


def add_metrics_port_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--metrics-port", type=int, default=int(env("SPLITSERVE_METRICS_PORT", "0")), help=help)


def add_router_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    _add_router_flags(p, DEFAULT_FRONTEND_PORT)
    add_metrics_port_arg(p, "serve the router's /health, /metrics and /info on this port (0: off)")


def add_frontend_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    _add_frontend_flags(p)
    p.add_argument("--router", default=env("SPLITSERVE_ROUTER", f"tcp://127.0.0.1:{DEFAULT_FRONTEND_PORT}"),
                   help="the router's frontend endpoint")
    p.add_argument("--frontend-id", default="", help="unique name (default: a random one)")
    add_metrics_port_arg(p, "serve this frontend's own /health and /metrics on this port (0: off); the shared "
                            "--port reaches whichever frontend the kernel chose")


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    # the gateway's own frontend joins its router over loopback: any free port unless given
    _add_router_flags(p, 0)
    _add_frontend_flags(p)


# ---- options ------------------------------------------------------------------------------------


def _advertised(ns: argparse.Namespace) -> str:
    if not ns.advertise_host and ns.host in WILDCARD_HOSTS:
        # Workers would be told to dial 0.0.0.0, which reaches only themselves.
        raise ValueError(f"--host {ns.host} binds every interface; give --advertise-host, the address workers dial")
    return ns.advertise_host or ns.host


def router_options(ns: argparse.Namespace) -> RouterOptions:
    return RouterOptions(model_options(ns), limit_options(ns), link_options(ns), ns.host, ns.worker_port,
                         ns.frontend_port, ns.kv_transport, ns.max_concurrent_requests, getattr(ns, "metrics_port", 0),
                         ns.worker_restart_timeout)


def frontend_options(ns: argparse.Namespace, router: str | None = None) -> FrontendOptions:
    return FrontendOptions(model_options(ns), limit_options(ns), link_options(ns), ns.host, _advertised(ns), ns.port,
                           ns.zmq_port, ns.token_port, router or ns.router, ns.max_connections, api_key_option(ns),
                           getattr(ns, "frontend_id", ""), getattr(ns, "metrics_port", 0))


def gateway_options(ns: argparse.Namespace) -> GatewayOptions:
    # the frontend's router endpoint is known once the router has bound (Gateway fills it in)
    return GatewayOptions(router_options(ns), frontend_options(ns, router="-"))


@functools.cache
def _parser(kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"splitserve {kind}")
    {"gateway": add_gateway_args, "router": add_router_args, "frontend": add_frontend_args}[kind](parser)
    return parser


def gateway_argv(values: Mapping[str, object]) -> list[str]:
    """The flags of `splitserve gateway` that set `values` (by destination), the rest at defaults."""
    return flags_argv(_parser("gateway"), values)


def router_argv(values: Mapping[str, object]) -> list[str]:
    return flags_argv(_parser("router"), values)


def frontend_argv(values: Mapping[str, object]) -> list[str]:
    return flags_argv(_parser("frontend"), values)


def frontend_flag_names() -> frozenset[str]:
    """The destinations of every flag `splitserve frontend` takes."""
    return frozenset(a.dest for a in _parser("frontend")._actions if a.option_strings and a.dest != "help")
