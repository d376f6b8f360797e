"""`splitserve serve`: the gateway in this process and N prefill + M decode worker processes.
With `--frontends K` above 1 this process runs the router alone and K frontend processes share
the HTTP port (each its own ZMQ client port: --zmq-port + i).

Waits until every worker has registered, prints where to connect, starts again any worker or
frontend that dies while it runs, and on Ctrl-C or SIGTERM drains: the gateway stops admitting,
workers finish what they hold (up to --drain-timeout) and exit, and every child is gone before
this process returns.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import takewhile
from typing import TYPE_CHECKING

from splitserve.common.child_process import die_with_parent
from splitserve.common.builtin_models import resolve_model
from splitserve.common.curve import load_keypair
from splitserve.common.hub import is_repo_id
from splitserve.common.service_config import WILDCARD_HOSTS, add_engine_args, worker_argv, worker_flag_names
from splitserve.common.zmq_util import free_port
from splitserve.gateway.options import (
    add_gateway_args,
    add_metrics_port_arg,
    frontend_argv,
    frontend_flag_names,
    gateway_options,
    router_options,
)
from splitserve.logs import setup_logging

if TYPE_CHECKING:
    from splitserve.gateway.server import Gateway, RouterServer

log = logging.getLogger("splitserve.serve")

READY_TIMEOUT_S = 600.0
EXIT_GRACE_S = 10.0
# A child that dies while serve runs is started again after RESTART_DELAY_S, doubled for each
# exit in a row that came within STABLE_S of its start (up to MAX_RESTART_DELAY_S): a crash loop
# (a bad GPU, say) costs little, and one crash is mended at once.
RESTART_DELAY_S, MAX_RESTART_DELAY_S, STABLE_S = 1.0, 60.0, 60.0
WATCH_INTERVAL_S = 0.5
# A frontend the router has not heard from for this many heartbeat timeouts, while its process
# runs, is hung (see Supervisor.kill_hung)
HUNG_AFTER_TIMEOUTS = 3


def add_args(p: argparse.ArgumentParser) -> None:
    add_gateway_args(p)
    add_engine_args(p)
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--frontends", type=int, default=default_frontends(),
                   help="frontend processes sharing the HTTP port (default: 1 below 8 cores, else cores // 8, at "
                        "most 8)")
    add_metrics_port_arg(p, "/health and /metrics of every process on a port of its own, from this one up (0: off): "
                            "the router (the gateway, with one frontend), each frontend, each prefill worker, each "
                            "decode worker; the shared --port reaches whichever frontend the kernel chose")


def default_frontends(cores: int | None = None) -> int:
    """One frontend relays tens of thousands of tokens per second on one core; past 8 cores, the
    workers' tokens can outrun it."""
    cores = cores or os.cpu_count() or 1
    return 1 if cores < 8 else min(8, cores // 8)


def curve_worker_flags(secret_file: str) -> dict[str, str]:
    """The local workers use the gateway's own key pair, which the gateway always lets in."""
    public, _ = load_keypair(secret_file)
    return {"curve_secret_file": secret_file, "curve_server_key": public.decode()}


def child_name(kind: str, index: int, restarts: int) -> str:
    """A worker's or frontend's id: a process started again is a new one to the router, which let
    go of the one that died (its requests resumed elsewhere, or ended)."""
    return f"{kind}-{index}-{os.getpid()}" + (f"-r{restarts}" if restarts else "")


def worker_command(args: argparse.Namespace, role: str, index: int, gateway: str, threads: int, device: str,
                   restarts: int = 0) -> list[str]:
    """Every flag of serve's that a worker takes too (model, limits, link, engine, ...) passes on;
    the gateway, the threads, the device (see worker_devices), the worker's name, metrics port and
    CURVE keys are set here."""
    names = worker_flag_names(role)
    values = {name: value for name, value in vars(args).items() if name in names}
    values |= {"gateway": gateway, "threads": threads, "device": device, "worker_id": child_name(role, index, restarts),
               "metrics_port": metrics_ports(args)[role][index]}
    if args.curve_secret_file:
        values |= curve_worker_flags(args.curve_secret_file)
    return [sys.executable, "-m", "splitserve.cli", role, *worker_argv(role, values)]


def visible_gpus() -> int:
    """How many CUDA devices the workers will see, known without PyTorch (which this process does
    not load): CUDA_VISIBLE_DEVICES's list when it is set, else the /dev/nvidiaN files (a container
    has those of its own GPUs only)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        # CUDA stops at the first entry that is not a device ("-1" hides them all)
        return len(list(takewhile(lambda d: d.strip() and not d.strip().startswith("-"), listed.split(","))))
    return len(glob.glob("/dev/nvidia[0-9]*"))


def worker_devices(flag: str, gpus: int, workers: int) -> list[str]:
    """Each worker's --device (prefill workers first). `auto` spreads them over the GPUs, one each
    while there are enough (before, every worker took the first GPU, and the others idled): the
    k-th gets `auto:k`, the CPU should PyTorch find no GPU after all. Any other flag is every
    worker's."""
    if flag == "auto" and gpus:
        return [f"auto:{k % gpus}" for k in range(workers)]
    return [flag] * workers


def next_in_turn(workers: list[tuple[str, bool, bool]]) -> list[int]:
    """Which of `workers` (--device, started, registered) to start now: at once, but those sharing
    a GPU one after another, each once the one before it there has registered. It has its memory
    by then, and the next one sizes its KV pool (and prefix cache) from what is left; started
    together, each would count the same free memory as its own."""
    gpu = lambda device: device.startswith(("cuda", "auto:"))  # noqa: E731
    busy = {device for device, started, registered in workers if gpu(device) and started and not registered}
    start = []
    for k, (device, started, _) in enumerate(workers):
        if not started and device not in busy:
            start.append(k)
            if gpu(device):
                busy.add(device)
    return start


def threads_per_worker(total: int, workers: int) -> int:
    """Split the cores so that processes sharing the machine don't oversubscribe it."""
    return max(1, (total or os.cpu_count() or 1) // max(1, workers))


def frontend_zmq_ports(first: int, count: int, taken: set[int]) -> list[int]:
    """`first`, `first + 1`, ... skipping the router's own ports (the defaults, 5555 and 5556,
    are neighbours); 0 stays 0 (any free port)."""
    if not first:
        return [0] * count
    ports, port = [], first
    while len(ports) < count:
        if port not in taken:
            ports.append(port)
        port += 1
    return ports


def metrics_ports(args: argparse.Namespace) -> dict[str, list[int]]:
    """--metrics-port P: its own /health and /metrics port for every process, in order from P: the
    router (with one frontend, the gateway: both in one process), each frontend when there are
    several, each prefill worker, each decode worker. All 0 when off."""
    counts = {"router": 1, "frontend": args.frontends if args.frontends > 1 else 0,
              "prefill": args.prefill_workers, "decode": args.decode_workers}
    ports, port = {}, args.metrics_port
    for kind, count in counts.items():
        ports[kind] = list(range(port, port + count)) if args.metrics_port else [0] * count
        port += count
    return ports


def _metrics_line(args: argparse.Namespace) -> str:
    """The ready message's line for --metrics-port, or nothing."""
    if not args.metrics_port:
        return ""
    named = {"router": "router" if args.frontends > 1 else "gateway", "frontend": "frontends",
             "prefill": "prefill workers", "decode": "decode workers"}
    spans = [f"{named[kind]} {ports[0]}" + (f"-{ports[-1]}" if len(ports) > 1 else "")
             for kind, ports in metrics_ports(args).items() if ports]
    return "\n  /health and /metrics on ports of their own: " + ", ".join(spans)


def frontend_command(args: argparse.Namespace, index: int, router: str, zmq_port: int, restarts: int = 0) -> list[str]:
    """Every flag of serve's that a frontend takes passes on; its router, name, client port and
    metrics port are set here."""
    names = frontend_flag_names()
    values = {name: value for name, value in vars(args).items() if name in names}
    values |= {"router": router, "frontend_id": child_name("frontend", index, restarts), "zmq_port": zmq_port,
               "metrics_port": metrics_ports(args)["frontend"][index]}
    return [sys.executable, "-m", "splitserve.cli", "frontend", *frontend_argv(values)]


@dataclass
class Child:
    """A process serve started, and how to start it again should it die."""

    name: str  # for the log: "decode worker 0", "frontend 1"
    argv: Callable[[int], list[str]]  # its command line, given how many times it was started again
    router_id: Callable[[int], str] | None = None  # the id it has at the router, likewise
    device: str = ""  # a worker's --device (see worker_devices)
    proc: subprocess.Popen | None = None  # None until started (see next_in_turn)
    started: float = 0.0
    restarts: int = 0
    quick_exits: int = 0  # exits in a row, each within STABLE_S of its start
    due: float = 0.0  # once it has died: when to start it again
    heard: float = 0.0  # when the router last heard from it (monotonic), once it has

    def start(self) -> Child:
        # A session of its own: a terminal's Ctrl-C reaches `serve`, which drains it.
        self.proc = subprocess.Popen(self.argv(self.restarts), preexec_fn=die_with_parent(), start_new_session=True)
        self.started, self.heard = time.monotonic(), 0.0
        return self


class Supervisor:
    def __init__(self, args: argparse.Namespace, gw: Gateway | RouterServer):
        self.args, self.gw = args, gw
        self.workers: list[Child] = []
        self.frontends: list[Child] = []  # with --frontends > 1: processes of their own
        self.stopping = False

    @property
    def children(self) -> list[subprocess.Popen]:
        return [c.proc for c in self.workers + self.frontends if c.proc is not None]

    def start_workers(self) -> None:
        a = self.args
        threads = threads_per_worker(a.threads, a.prefill_workers + a.decode_workers)
        devices = iter(worker_devices(a.device, visible_gpus(), a.prefill_workers + a.decode_workers))
        for role, count in (("prefill", a.prefill_workers), ("decode", a.decode_workers)):
            for i in range(count):
                device = next(devices)
                argv = partial(worker_command, a, role, i, self.gw.worker_endpoint, threads, device)
                self.workers.append(Child(f"{role} worker {i}", argv, partial(child_name, role, i), device))
        self.start_in_turn()
        if a.frontends > 1:
            router = self.gw.router
            ports = frontend_zmq_ports(a.zmq_port, a.frontends, {router.worker_port, router.frontend_port})
            for i, port in enumerate(ports):
                argv = partial(frontend_command, a, i, router.frontend_endpoint, port)
                self.frontends.append(Child(f"frontend {i}", argv, partial(child_name, "frontend", i)).start())

    async def watch(self) -> None:
        """Until serve stops: start again each child that exits, after a pause that grows while it
        keeps dying. Meanwhile the router resumes a dead worker's requests on the others (or ends
        them), and a dead frontend's clients reconnect to its ZMQ port, which it takes again.
        A hung frontend is killed first (see kill_hung)."""
        while not self.stopping:
            now = time.monotonic()
            for child in self.frontends:
                self.kill_hung(child, now)
            for child in self.workers + self.frontends:
                if child.proc.poll() is None:
                    continue
                if not child.due:
                    ran = now - child.started
                    child.quick_exits = child.quick_exits + 1 if ran < STABLE_S else 0
                    delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** max(0, child.quick_exits - 1))
                    child.due = now + delay
                    log.error("%s exited (code %s) after %.0f s: starting it again in %.0f s", child.name,
                              child.proc.returncode, ran, delay)
                elif now >= child.due:
                    child.due, child.restarts = 0.0, child.restarts + 1
                    child.start()
                    log.info("%s started again (restart %d)", child.name, child.restarts)
            await asyncio.sleep(WATCH_INTERVAL_S)

    def kill_hung(self, frontend: Child, now: float) -> None:
        """Kill a frontend the router has long been without word from (it let it go, and its
        requests, after one heartbeat timeout) while its process runs: it is hung (stopped,
        deadlocked), and its listening socket still takes its share of the HTTP port's new
        connections, which would wait on it for good. Killed, it is started again as one that died,
        and the connections queued on it are refused, so that clients connect again, to a live one.
        (Workers are left be: the router resumes a silent one's requests elsewhere and takes it
        back when it answers again, and one hung past its --watchdog-timeout exits by itself.)"""
        front = self.gw.router.core.frontends.get(frontend.router_id(frontend.restarts))
        if front is not None:
            frontend.heard = front.last_seen
        elif frontend.heard and now - frontend.heard > HUNG_AFTER_TIMEOUTS * self.args.heartbeat_timeout \
                and frontend.proc.poll() is None:
            log.error("%s has been silent for %.0f s: killing it", frontend.name, now - frontend.heard)
            frontend.proc.kill()
            frontend.heard = 0.0

    def start_in_turn(self) -> None:
        """Start the workers whose turn has come (see next_in_turn)."""
        registered = self.gw.registry.workers
        for k in next_in_turn([(c.device, c.proc is not None, c.router_id(c.restarts) in registered)
                               for c in self.workers]):
            self.workers[k].start()

    async def wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        want = {"prefill": self.args.prefill_workers, "decode": self.args.decode_workers}
        while time.monotonic() < deadline and not self.stopping:
            self.start_in_turn()
            if all(len(self.gw.registry.of_role(r)) >= n for r, n in want.items()) \
                    and len(self.gw.router.core.frontends) >= self.args.frontends:
                return True
            dead = [c for c in self.children if c.poll() is not None]
            if dead:
                log.error("a worker exited during start-up (exit code %s)", dead[0].returncode)
                return False
            await asyncio.sleep(0.1)
        return False

    async def drain(self) -> None:
        """Stop admitting, let workers finish (they exit when drained), then make sure they did, and
        stop the frontends: the workers' last tokens have reached them, and a frontend lets its
        HTTP answers finish before it exits. (Frontends never exit by themselves: waiting for them
        too held every Ctrl-C for the whole drain timeout.)"""
        timeout = self.args.drain_timeout
        self.gw.drain(timeout)
        deadline = time.monotonic() + timeout + EXIT_GRACE_S
        while time.monotonic() < deadline and any(c.proc is not None and c.proc.poll() is None for c in self.workers):
            await asyncio.sleep(0.1)
        self.kill_all()

    def kill_all(self) -> None:
        for c in self.children:
            if c.poll() is None:
                c.terminate()
        for c in self.children:
            try:
                c.wait(timeout=EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        remove_ipc_files(os.getpid())


def remove_ipc_files(serve_pid: int) -> None:
    """Staging files of workers that could not remove their own (killed hard)."""
    for path in glob.glob(f"/dev/shm/splitserve-*-{serve_pid}-*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def run(args: argparse.Namespace) -> int:
    setup_logging("serve")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from splitserve.gateway.server import Gateway, RouterServer  # the server, torch-free but not light

    if args.frontends < 1:
        raise ValueError(f"--frontends must be at least 1, got {args.frontends}")
    if args.frontends > 1 and not args.port:  # the frontends must share one port: choose it here
        args.port = free_port(args.host)
    if args.host in WILDCARD_HOSTS and not args.advertise_host:
        args.advertise_host = "127.0.0.1"  # every process of serve's is on this host
    if is_repo_id(args.model) and not os.path.isdir(args.model):
        # fetched here, once, with its progress: every process started then (and started again) reads
        # that very commit from the cache, offline
        args.revision = resolve_model(args.model, args.home, revision=args.revision).name
        os.environ["HF_HUB_OFFLINE"] = "1"
    gw = Gateway(gateway_options(args)) if args.frontends == 1 else RouterServer(router_options(args))
    sup = Supervisor(args, gw)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        sup.stopping = True
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    gateway_task = asyncio.create_task(gw.run())
    sup.start_workers()
    try:
        if not await sup.wait_ready():
            if not sup.stopping:
                log.error("workers did not become ready")
                return 1
        else:
            http = gw.http_url if args.frontends == 1 else f"http://{args.host}:{args.port}"
            zmq_endpoints = ", ".join(gw.router.core.client_endpoints())
            print(f"splitserve ready: model {args.model}, {args.prefill_workers} prefill + {args.decode_workers} "
                  f"decode workers, {args.frontends} frontend(s)\n  HTTP (TGI, OpenAI) and WebSocket: {http}  "
                  f"(API docs: {http}/docs)\n  ZMQ clients: {zmq_endpoints}\n  workers register at: "
                  f"{gw.worker_endpoint}{_metrics_line(args)}", flush=True)
            watch = asyncio.create_task(sup.watch())
            await stop.wait()
            watch.cancel()
        log.info("shutting down: draining in-flight requests (up to %.0f s)", args.drain_timeout)
        await sup.drain()
        return 0
    finally:
        sup.kill_all()
        gw.stop()
        await gateway_task
