"""Start real splitserve processes on 127.0.0.1 for tests, and stop them without leftovers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from polling import wait_for
from splitserve.bench.server_state import http_json
from splitserve.bench.traffic import PROMPTS
from splitserve.client import Client
from splitserve.common.child_process import die_with_parent
from splitserve.common.params import SamplingParams
from splitserve.common.request import GenerateRequest
from splitserve.common.zmq_util import free_port
from splitserve.engine import Engine, EngineOptions

START_TIMEOUT_S = 120.0


def metric_at(port: int, name: str, **labels: str) -> float:
    """The samples of `name` with `labels` in the /metrics on `port`, summed (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def free_ports_in_a_row(n: int) -> int:
    """The first of n consecutive ports free now."""
    for _ in range(100):
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first + 1, first + n):
                    held.enter_context(socket.create_server(("127.0.0.1", port)))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no {n} free ports in a row")


def child_pid(parent: int, part: str) -> int | None:
    """The child process of `parent` whose command line holds `part`, if there is one."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            if ppid == parent and part in open(f"/proc/{pid}/cmdline").read():
                return int(pid)
    return None


@contextlib.contextmanager
def serve_process(home, *flags: str) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """`splitserve serve` on tiny-random with `flags` (its ports chosen here unless given), once
    ready -> (the process, the lines it printed by then); killed at the end if it still runs."""
    env = dict(os.environ, SPLITSERVE_HOME=str(home), PYTHONUNBUFFERED="1", SPLITSERVE_LOG_LEVEL="WARNING")
    ports = {"--zmq-port": str(free_port()), "--worker-port": "0", "--port": "0"}
    argv = [*(x for flag, port in ports.items() if flag not in flags for x in (flag, port)), "--threads", "2", *flags]
    serve = subprocess.Popen([sys.executable, "-m", "splitserve.cli", "serve", "--model", "tiny-random", *argv],
                             env=env, stdout=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        wait_for(lambda: lines.append(serve.stdout.readline()) or "ZMQ clients" in lines[-1], 180,
                 "serve to be ready", interval=0)
        yield serve, lines
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def http_port(lines: list[str]) -> int:
    """The HTTP port in serve's ready message."""
    return int(next(line for line in lines if "HTTP" in line).split("127.0.0.1:")[1].split()[0])


def spawn(home: Path, command: str, *args: str) -> subprocess.Popen:
    """`splitserve <command> <args>` with one PyTorch thread."""
    # SPLITSERVE_PORT=0: a gateway started without --port takes any free HTTP port, not the default one
    env = dict(os.environ, SPLITSERVE_HOME=str(home), PYTHONUNBUFFERED="1",
               SPLITSERVE_LOG_LEVEL=os.environ.get("SPLITSERVE_LOG_LEVEL", "WARNING"), SPLITSERVE_PORT="0")
    cmd = [sys.executable, "-m", "splitserve.cli", command, "--threads", "1", *args]
    # SIGKILL when the test process exits, however: a test failing before its cleanup leaves no server
    return subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent(signal.SIGKILL))


class Cluster:
    """A gateway and workers as separate processes, each with one PyTorch thread."""

    def __init__(self, home: Path, model: str = "tiny-random", heartbeat_timeout: float = 2.0, **gateway_flags):
        self.home, self.model = home, model
        self.zmq_port, self.worker_port = free_port(), free_port()
        self.port = gateway_flags.pop("port", None) or free_port()  # HTTP and WebSocket
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, dict] = {}  # worker id -> {"proc", "metrics_port", "role"}
        self.heartbeat_timeout = heartbeat_timeout
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in gateway_flags.items()]
        self._gateway_argv = ["--zmq-port", str(self.zmq_port), "--worker-port", str(self.worker_port),
                              "--port", str(self.port), "--heartbeat-timeout", str(heartbeat_timeout), *flags]
        self.start_gateway()

    def start_gateway(self) -> None:
        """The gateway, on its ports (again, after a test killed it: as its supervisor would)."""
        self.gateway = self._spawn("gateway", *self._gateway_argv)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.zmq_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, worker_id: str | None = None, **labels: str) -> float:
        """A sample of the gateway's /metrics, or a worker's (see metric_at), e.g.
        metric("splitserve_requests_total", route="/ws")."""
        return metric_at(self.port if worker_id is None else self.workers[worker_id]["metrics_port"], name, **labels)

    def _spawn(self, command: str, *args: str) -> subprocess.Popen:
        proc = spawn(self.home, command, "--model", self.model, *args)
        self.procs.append(proc)
        return proc

    def add_worker(self, role: str, *args: str) -> str:
        worker_id = f"{role}-{len(self.workers)}-{os.getpid()}"
        port = free_port()
        proc = self._spawn(role, "--gateway", f"tcp://127.0.0.1:{self.worker_port}", "--worker-id", worker_id,
                           "--metrics-port", str(port), "--heartbeat-timeout", str(self.heartbeat_timeout), *args)
        self.workers[worker_id] = {"proc": proc, "metrics_port": port, "role": role}
        return worker_id

    def start_pipeline(self, num_slots: int, *worker_args: str) -> None:
        """One prefill and one decode worker (`worker_args` to both), registered and seen by the
        gateway's HTTP front."""
        self.add_worker("prefill", *worker_args)
        self.add_worker("decode", "--num-slots", str(num_slots), *worker_args)
        self.wait_registered()
        wait_for(lambda: (http_json(self.port, "/health") or {}).get("status") == "ok", START_TIMEOUT_S,
                 "the gateway to see its workers")

    def health(self, worker_id: str) -> dict | None:
        return http_json(self.workers[worker_id]["metrics_port"], "/health")

    def wait_registered(self, *wids: str) -> None:
        for worker_id in wids or list(self.workers):
            wait_for(lambda: (self.health(worker_id) or {}).get("registered"), START_TIMEOUT_S, f"{worker_id} to register")

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Every decode slot free, every prefill staging region released (on workers still running)."""

        def idle() -> bool:
            for worker_id, w in self.workers.items():
                if w["proc"].poll() is not None:  # killed or stopped by the test
                    continue
                h = self.health(worker_id) or {}
                if w["role"] == "decode" and h.get("slots_used") != 0:
                    return False
                if w["role"] == "prefill" and (h.get("staging_free_tokens") != h.get("staging_tokens")
                                               or h.get("handoffs") != 0 or h.get("queued_tokens") != 0):
                    return False
            return True

        wait_for(idle, timeout, "workers to be idle")

    def stop(self) -> None:
        """SIGTERM (workers drain and remove their staging files), SIGKILL what lingers. Workers
        first: a draining worker exits once its gateway confirms nothing more is on its way."""
        workers = [w["proc"] for w in self.workers.values()]
        for group in (workers, [p for p in self.procs if p not in workers]):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class SplitCluster(Cluster):
    """A router, `frontends` frontend processes sharing one HTTP port (each its own ZMQ port) and
    workers, each a process of its own."""

    def __init__(self, home: Path, frontends: int = 2, model: str = "tiny-random", heartbeat_timeout: float = 2.0,
                 *flags: str):
        """`flags`: given to the router and to every frontend (e.g. the CURVE ones)."""
        self.home, self.model, self.heartbeat_timeout, self.flags = home, model, heartbeat_timeout, flags
        self.procs, self.workers = [], {}
        self.worker_port, self.frontend_port, self.router_port, self.port = (free_port() for _ in range(4))
        self.router = self.start_router()
        self.frontends: list[tuple[subprocess.Popen, int]] = []  # (process, its ZMQ port)
        self.frontend_metrics_ports: list[int] = []  # each frontend's own /health and /metrics
        for _ in range(frontends):
            self.add_frontend()
        self.zmq_port = self.frontends[0][1]

    def start_router(self) -> subprocess.Popen:
        self.router = self._spawn("router", "--worker-port", str(self.worker_port), "--frontend-port",
                                  str(self.frontend_port), "--metrics-port", str(self.router_port),
                                  "--heartbeat-timeout", str(self.heartbeat_timeout), *self.flags)
        return self.router

    def add_frontend(self) -> int:
        zmq_port, metrics_port = free_port(), free_port()
        proc = self._spawn("frontend", "--router", f"tcp://127.0.0.1:{self.frontend_port}", "--port", str(self.port),
                           "--zmq-port", str(zmq_port), "--metrics-port", str(metrics_port),
                           "--heartbeat-timeout", str(self.heartbeat_timeout), *self.flags)
        self.frontends.append((proc, zmq_port))
        self.frontend_metrics_ports.append(metrics_port)
        return zmq_port

    @property
    def endpoints(self) -> list[str]:
        return [f"tcp://127.0.0.1:{port}" for proc, port in self.frontends if proc.poll() is None]

    def router_state(self, path: str = "/health") -> dict:
        return http_json(self.router_port, path) or {}

    def metric(self, name: str, worker_id: str | None = None, **labels: str) -> float:
        """As Cluster.metric; without a worker, the router's /metrics."""
        if worker_id is not None:
            return super().metric(name, worker_id, **labels)
        return metric_at(self.router_port, name, **labels)

    def start_pipeline(self, num_slots: int, *worker_args: str) -> None:
        self.add_worker("prefill", *worker_args)
        self.add_worker("decode", "--num-slots", str(num_slots), *worker_args)
        self.wait_ready()

    def wait_ready(self) -> None:
        """Every worker registered, and the router sees them and every live frontend."""
        self.wait_registered()
        want = sum(p.poll() is None for p, _ in self.frontends)
        wait_for(lambda: self.router_state().get("status") == "ok" and self.router_state().get("frontends") == want,
                 START_TIMEOUT_S, "the router to see its workers and frontends")


# ---- what a served pipeline answers, and what the in-process engine does -------------------------


def request_specs(n: int) -> list[dict]:
    """n requests: greedy and seeded sampled, different prompts and lengths."""
    specs = []
    for i in range(n):
        spec = {"prompt": PROMPTS[i % len(PROMPTS)] * (1 + i % 3), "max_new_tokens": 4 + (i * 7) % 13,
                "ignore_eos": True}
        if i % 3 == 1:
            spec.update(temperature=0.8, top_k=50, seed=1000 + i)
        elif i % 3 == 2:
            spec.update(temperature=1.1, top_p=0.9, seed=2000 + i)
        specs.append(spec)
    return specs


def offline(lm, specs: list[dict]) -> list[list[int]]:
    """What the in-process Engine (`splitserve generate`) gives for the same requests."""
    requests = []
    for i, s in enumerate(specs):
        sampled = "seed" in s
        sp = SamplingParams(temperature=s.get("temperature", 1.0), top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0),
                            seed=s.get("seed", 0), do_sample=sampled)
        requests.append(GenerateRequest(f"r{i}", tuple(lm.tokenizer.encode(s["prompt"])), s["max_new_tokens"], sp,
                                        ignore_eos=True))

    engine = Engine(lm, EngineOptions(num_slots=16))
    return [r.token_ids for r in engine.generate(requests)]


def stream_all(endpoint: str, specs: list[dict]) -> list[list[int]]:
    """All requests at once over one client connection, each streamed on its own thread."""
    results: list = [None] * len(specs)
    with Client(endpoint) as client:
        def one(i: int) -> None:
            results[i] = [ev.token_id for ev in client.stream(**specs[i], timeout=120)]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results
