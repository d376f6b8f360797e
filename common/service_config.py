"""Typed options of the service processes, built once from CLI flags (env vars as defaults).

The flag names are shared by every process kind so that a deployment reads the same way
everywhere: --host, --port, --zmq-port, --worker-port, --advertise-host, --host-id,
--kv-transport, --device, --threads, --metrics-port.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import get_args

from .config import ModelOptions, add_model_args, model_options
from .curve import CurveKeys, load_keypair, load_public_key, load_public_keys, require_curve
from .params import Limits
from .prefix_blocks import DEFAULT_BLOCK_TOKENS
from .protocol import TransportChoice

DEFAULT_ZMQ_PORT = 5555
DEFAULT_WORKER_PORT = 5556
DEFAULT_HTTP_PORT = 8080
DEFAULT_FRONTEND_PORT = 5557  # the router's port for frontends


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SPLITSERVE_{name}", default)


def default_host_id() -> str:
    """Which machine this process is on: KV moves through memory only between equal host ids."""
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


@dataclass(frozen=True)
class LimitOptions:
    max_total_tokens: int
    max_input_tokens: int
    prefill_token_budget: int


def add_limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-total-tokens", type=int, default=int(_env("MAX_TOTAL_TOKENS", "0")),
                   help="prompt + generated tokens per request, the KV slot length (0: the model's positions)")
    p.add_argument("--max-input-tokens", type=int, default=int(_env("MAX_INPUT_TOKENS", "0")),
                   help="longest prompt (0: max-total-tokens - 1)")
    p.add_argument("--prefill-token-budget", type=int, default=int(_env("PREFILL_TOKEN_BUDGET", "0")),
                   help="tokens packed into one prefill pass (at least max-total-tokens)")


def limit_options(ns: argparse.Namespace) -> LimitOptions:
    return LimitOptions(ns.max_total_tokens, ns.max_input_tokens, ns.prefill_token_budget)


def derive_limits(opts: LimitOptions, n_positions: int) -> Limits:
    return Limits.derive(n_positions, opts.max_total_tokens, opts.max_input_tokens, opts.prefill_token_budget)


def add_host_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address")


def add_kv_transport_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-transport", default=_env("KV_TRANSPORT", "auto"), choices=get_args(TransportChoice),
                   help="how KV moves from prefill to decode workers: auto chooses the fastest that works "
                        "between the two (across hosts nixl where both workers have NIXL and CURVE is off, else "
                        "tcp); a transport named here that cannot work between them is refused")


# The NIXL wheels, by the CUDA major version their UCX was built for (both run on the CPU too).
NIXL_WHEELS = ("nixl_cu13", "nixl_cu12")
NIXL_MISSING = ("--kv-transport nixl needs NIXL, which is not installed: pip install 'splitserve[nixl-cu13]' "
                "(CPU, or CUDA 13) or 'splitserve[nixl-cu12]' (CUDA 12)")
NIXL_UNENCRYPTED = ("--kv-transport nixl moves KV unencrypted, and --curve-secret-file asks for encrypted worker and "
                    "KV links: use --kv-transport tcp (encrypted under CURVE) or auto, or leave CURVE off")


def nixl_modules() -> list[str]:
    """The NIXL wheels installed (found without importing them, which loads UCX)."""
    return [name for name in NIXL_WHEELS if importlib.util.find_spec(name) is not None]


def check_kv_transport(flag: str, curve: bool, needs_library: bool) -> None:
    """Refuse a --kv-transport that cannot work here: nixl under CURVE (NIXL does not encrypt) or,
    where this process moves KV itself (`needs_library`), without NIXL installed."""
    if flag == "nixl" and curve:
        raise ValueError(NIXL_UNENCRYPTED)
    if flag == "nixl" and needs_library and not nixl_modules():
        raise ValueError(NIXL_MISSING)


@dataclass(frozen=True)
class LinkOptions:
    heartbeat_s: float
    heartbeat_timeout: float
    drain_timeout: float
    curve: CurveKeys | None = None  # CURVE on the worker link (gateway: server, worker: client)


def add_link_args(p: argparse.ArgumentParser, server: bool) -> None:
    """`server`: the gateway's side of the worker link; else a worker's."""
    p.add_argument("--heartbeat-interval", type=float, default=float(_env("HEARTBEAT_INTERVAL", "0.5")))
    p.add_argument("--heartbeat-timeout", type=float, default=float(_env("HEARTBEAT_TIMEOUT", "2.0")),
                   help="a peer silent for this long is considered gone")
    p.add_argument("--drain-timeout", type=float, default=float(_env("DRAIN_TIMEOUT", "30")),
                   help="on SIGTERM, how long in-flight requests may run before they are ended")
    p.add_argument("--curve-secret-file", default=_env("CURVE_SECRET_FILE", ""),
                   help="encrypt and authenticate the worker link with CURVE: this process's NAME.key_secret "
                        "(from `splitserve keygen`)")
    if server:
        p.add_argument("--curve-clients", default=_env("CURVE_CLIENTS", ""),
                       help="with --curve-secret-file: a directory of the public keys (*.key) of the workers "
                            "let in (default: any worker that knows this gateway's public key)")
    else:
        p.add_argument("--curve-server-key", default=_env("CURVE_SERVER_KEY", ""),
                       help="with --curve-secret-file: the gateway's public key, its NAME.key file or Z85 text "
                            "(written --curve-server-key=TEXT, since the text may begin with '-')")
    p.set_defaults(link_server=server)


def link_options(ns: argparse.Namespace) -> LinkOptions:
    curve = _curve_keys(ns)
    # the gateway moves no KV: it routes for workers that may have NIXL where it does not
    check_kv_transport(getattr(ns, "kv_transport", "auto"), curve is not None, needs_library=not ns.link_server)
    return LinkOptions(ns.heartbeat_interval, ns.heartbeat_timeout, ns.drain_timeout, curve)


def _curve_keys(ns: argparse.Namespace) -> CurveKeys | None:
    trusted = ns.curve_clients if ns.link_server else ns.curve_server_key
    flag = "--curve-clients" if ns.link_server else "--curve-server-key"
    if not ns.curve_secret_file:
        if trusted:
            raise ValueError(f"{flag} needs --curve-secret-file")
        return None
    require_curve()
    public, secret = load_keypair(ns.curve_secret_file)
    if ns.link_server:
        return CurveKeys(public, secret, clients=load_public_keys(trusted) if trusted else None)
    if not trusted:
        raise ValueError("--curve-secret-file needs --curve-server-key: the gateway's public key")
    return CurveKeys(public, secret, server=load_public_key(trusted))


@dataclass(frozen=True)
class WorkerOptions:
    role: str  # prefill | decode
    model: ModelOptions
    limits: LimitOptions
    link: LinkOptions
    gateway: str  # the gateway's worker endpoint, tcp://HOST:PORT
    host: str  # bind address of this worker's own sockets
    advertise_host: str  # the address peers dial
    host_id: str
    kv_transport: TransportChoice
    kv_port: int  # decode: the KV endpoint's port (0: any free)
    metrics_port: int  # /health and /metrics (0: off)
    worker_id: str
    num_slots: int  # decode: most KV slots
    kv_cache_memory_mb: int  # decode: memory budget for the pool (0: no limit besides num_slots)
    key_bucket: int  # decode: key lengths rounded up to a multiple of this
    staging_tokens: int  # prefill: staging buffer size (0: twice the prefill budget)
    prefix_cache_mb: int  # prefill: memory for the prefix cache (0: off; -1: 1 GiB on CPU, up to 8 GiB on a GPU)
    prefix_block_tokens: int  # prefill: tokens per prefix-cache block
    prefill_chunk_tokens: int  # prefill: most prompt tokens a pass computes, longer prompts in pieces (0: whole)
    cpus: tuple[int, ...]  # CPU affinity (empty: any)
    cuda_graphs: bool  # decode: replay captured graphs (CUDA only)
    graph_key_step: int  # decode: key-length bucket under graphs
    watchdog_timeout: float  # a unit of work running longer is taken for a hang


def add_worker_args(p: argparse.ArgumentParser, role: str) -> None:
    add_model_args(p)
    add_limit_args(p)
    add_link_args(p, server=False)
    p.add_argument("--gateway", default=_env("GATEWAY", f"tcp://127.0.0.1:{DEFAULT_WORKER_PORT}"),
                   help="the gateway's worker endpoint")
    add_host_arg(p)
    p.add_argument("--advertise-host", default=_env("ADVERTISE_HOST", ""),
                   help="address other processes should dial (default: --host)")
    p.add_argument("--host-id", default=_env("HOST_ID", ""), help="which machine this is (default: /etc/machine-id)")
    add_kv_transport_arg(p)
    p.add_argument("--kv-port", type=int, default=int(_env("KV_PORT", "0")), help="decode: KV endpoint port (0: any)")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "0")),
                   help="serve /health and /metrics on this port (0: off)")
    p.add_argument("--worker-id", default="", help="unique name (default: ROLE-HOST-PID)")
    p.add_argument("--cpus", default=_env("CPUS", ""), help="pin this process to these CPUs, e.g. 0 or 2-3,6")
    add_engine_args(p)
    p.set_defaults(role=role)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """How the workers' engines are sized and run (`serve` takes them too, for its workers)."""
    p.add_argument("--num-slots", type=int, default=int(_env("NUM_SLOTS", "0")),
                   help="decode: KV slots of --max-total-tokens each (0: as many as fit in --kv-cache-memory-mb, "
                        "at most 256 on CUDA, 64 on CPU)")
    p.add_argument("--kv-cache-memory-mb", type=int, default=int(_env("KV_CACHE_MEMORY_MB", "0")),
                   help="decode: memory for the KV pool (0: 80%% of what the GPU has free once the model is loaded, "
                        "50%% of the host's free memory on CPU)")
    p.add_argument("--key-bucket", type=int, default=8, help="decode: key length rounding (a multiple of 8)")
    p.add_argument("--staging-tokens", type=int, default=0, help="prefill: staging buffer tokens (0: twice the budget)")
    p.add_argument("--prefix-cache-mb", type=int, default=int(_env("PREFIX_CACHE_MB", "-1")),
                   help="prefill: memory for the K/V of recent prompts, which later prompts that start alike reuse "
                        "(0: off; -1: 1024 on the CPU, on a GPU up to 8192 of what the model and staging leave free)")
    p.add_argument("--prefix-block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS,
                   help="prefill: the prefix cache keeps and finds prompts in blocks of this many tokens")
    p.add_argument("--prefill-chunk-tokens", type=int, default=int(_env("PREFILL_CHUNK_TOKENS", "8192")),
                   help="prefill: the most prompt tokens one prefill pass computes of prompts prefilled whole: a "
                        "longer prompt is prefilled in pieces over several passes, taking what the others leave "
                        "of each pass (at least a quarter of it), so that one long file does not hold up the "
                        "first token of every prompt behind it; a second one, needing less than the first has "
                        "left, may go in pieces beside it, taking three quarters of their part (0: every prompt "
                        "in one pass, as is always a prompt whose prompt logprobs were asked for)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="decode: CUDA graphs at power-of-two batch sizes (ignored on CPU)")
    p.add_argument("--graph-key-step", type=int, default=256, help="decode: key-length bucket under CUDA graphs")
    p.add_argument("--watchdog-timeout", type=float, default=float(_env("WATCHDOG_TIMEOUT", "300")),
                   help="a prefill batch or decode step running longer than this is taken for a hang: the worker "
                        "exits (serve starts it again) and its requests resume elsewhere; until then it keeps "
                        "its heartbeats going, however much longer than --heartbeat-timeout it computes (0: no "
                        "limit)")


WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", "*"}


def worker_options(ns: argparse.Namespace) -> WorkerOptions:
    if not ns.advertise_host and ns.host in WILDCARD_HOSTS:
        # Peers would be told to dial 0.0.0.0, which reaches only themselves.
        raise ValueError(f"--host {ns.host} binds every interface; give --advertise-host, the address peers dial")
    if ns.prefill_chunk_tokens < 0:
        raise ValueError(f"--prefill-chunk-tokens {ns.prefill_chunk_tokens}: give 0 (off) or a number of tokens")
    host_id = ns.host_id or default_host_id()
    worker_id = ns.worker_id or f"{ns.role}-{socket.gethostname()}-{os.getpid()}"
    return WorkerOptions(
        role=ns.role, model=model_options(ns), limits=limit_options(ns), link=link_options(ns), gateway=ns.gateway,
        host=ns.host, advertise_host=ns.advertise_host or ns.host, host_id=host_id, kv_transport=ns.kv_transport,
        kv_port=ns.kv_port, metrics_port=ns.metrics_port, worker_id=worker_id, num_slots=ns.num_slots,
        kv_cache_memory_mb=ns.kv_cache_memory_mb, key_bucket=ns.key_bucket, staging_tokens=ns.staging_tokens,
        prefix_cache_mb=ns.prefix_cache_mb, prefix_block_tokens=ns.prefix_block_tokens,
        prefill_chunk_tokens=ns.prefill_chunk_tokens, cpus=parse_cpus(ns.cpus), cuda_graphs=ns.cuda_graphs,
        graph_key_step=ns.graph_key_step, watchdog_timeout=ns.watchdog_timeout,
    )


@functools.cache
def worker_parser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"splitserve {role}")
    add_worker_args(parser, role)
    return parser


def worker_argv(role: str, values: Mapping[str, object]) -> list[str]:
    """The flags of `splitserve ROLE` that set `values` (flag destinations, e.g. num_slots), every
    other flag keeping its default: how `serve` starts its workers and `deploy compose` writes them."""
    return flags_argv(worker_parser(role), values)


def flags_argv(parser: argparse.ArgumentParser, values: Mapping[str, object]) -> list[str]:
    """Command-line words that make `parser` parse `values` (by destination) into its namespace."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for dest, value in values.items():
        action = actions[dest]
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
            continue
        text = str(value)
        # `--flag=TEXT` where TEXT begins with '-' (Z85 keys may): argparse would take it for a flag
        argv += [f"{flag}={text}"] if text.startswith("-") else [flag, text]
    return argv


def worker_flag_names(role: str) -> frozenset[str]:
    """The destinations of every flag `splitserve ROLE` takes."""
    return frozenset(a.dest for a in worker_parser(role)._actions if a.option_strings and a.dest != "help")


def parse_cpus(spec: str) -> tuple[int, ...]:
    """'0,2-3' -> (0, 2, 3)."""
    cpus: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)
