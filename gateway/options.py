"""The gateway's options, built once from its CLI flags (environment variables as defaults); light
to import, so that `--help` and the commands that write deployments need none of the server."""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

from splitserve.common.config import ModelOptions, add_model_args, model_options
from splitserve.common.protocol import TransportChoice
from splitserve.common.service_config import (
    DEFAULT_HTTP_PORT,
    DEFAULT_WORKER_PORT,
    DEFAULT_ZMQ_PORT,
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


@dataclass(frozen=True)
class GatewayOptions:
    model: ModelOptions
    limits: LimitOptions
    link: LinkOptions
    host: str
    port: int  # HTTP and WebSocket
    zmq_port: int
    worker_port: int
    kv_transport: TransportChoice
    max_concurrent_requests: int
    max_connections: int  # HTTP and WebSocket
    api_key: ApiKey | None  # required of HTTP, WebSocket and ZMQ clients when set (auth.py)


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    add_model_args(p)
    add_limit_args(p)
    add_link_args(p, server=True)
    add_host_arg(p)
    p.add_argument("--port", type=int, default=int(env("SPLITSERVE_PORT", str(DEFAULT_HTTP_PORT))),
                   help="HTTP and WebSocket port")
    p.add_argument("--zmq-port", type=int, default=int(env("SPLITSERVE_ZMQ_PORT", str(DEFAULT_ZMQ_PORT))),
                   help="the client library's port (0: any free)")
    p.add_argument("--worker-port", type=int, default=int(env("SPLITSERVE_WORKER_PORT", str(DEFAULT_WORKER_PORT))),
                   help="where workers register (0: any free)")
    add_kv_transport_arg(p)
    p.add_argument("--max-concurrent-requests", type=int, default=int(env("SPLITSERVE_MAX_CONCURRENT", "512")),
                   help="requests in flight (running or waiting); beyond it, an overload error")
    p.add_argument("--max-connections", type=int, default=int(env("SPLITSERVE_MAX_CONNECTIONS", "1024")),
                   help="open HTTP and WebSocket connections; a request on one more gets 503 and its connection closed")
    add_api_key_args(p)


def gateway_options(ns: argparse.Namespace) -> GatewayOptions:
    return GatewayOptions(model_options(ns), limit_options(ns), link_options(ns), ns.host, ns.port, ns.zmq_port,
                          ns.worker_port, ns.kv_transport, ns.max_concurrent_requests, ns.max_connections,
                          api_key_option(ns))


@functools.cache
def gateway_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve gateway")
    add_gateway_args(parser)
    return parser


def gateway_argv(values: Mapping[str, object]) -> list[str]:
    """The flags of `splitserve gateway` that set `values` (by destination), the rest at defaults."""
    return flags_argv(gateway_parser(), values)
