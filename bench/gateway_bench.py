"""`splitserve bench gateway`: what relaying tokens costs the router and the frontends, with no
model in the way.

A router and `--frontends` frontend processes (1 and 2 by default, one fleet each) run in front
of synthetic prefill and decode workers (synthetic_workers.py: processes of their own that speak
the real worker protocol, make a token per request every `--step-ms` and import no torch).
`--concurrency` clients of one transport stream requests back to back for `--duration` seconds,
each of `--new-tokens` tokens: TGI server-sent events (`/generate_stream`, details false; the
frontends share the HTTP port), the WebSocket (`/ws`, one connection per client) or the ZMQ
client library (one `AsyncClient` spread over every frontend's port).

Reported per transport and request length, over the measured window (the first request sent to
the last token received):
- `tokens_per_s`: tokens relayed to the clients.
- `us_per_token`: CPU (user + system, from /proc/PID/stat) each measured server process spent in
  the window per token relayed (a frontend's: per token of all frontends, so the frontends' sum is
  the gateway's whole cost). `servers` lists the processes measured.
- `delay_us`: per token, its arrival at the client minus its send stamp at the synthetic worker
  (one host, one clock): what the frontend, the sockets and the client's own reading add.
- `split`: per fleet, transport and process, CPU per request and per token, solved from the request
  lengths (e.g. 64 x 20 against 64 x 200 tokens): what admitting and answering a request costs
  apart from what each of its tokens does. The router's per-token part should be nil: it sees
  no token.
- `idle_cpu_per_s`: each server process's CPU per second with the fleet up and no load (heartbeats,
  timers), measured for `--idle` seconds before the loads.
- `checks`: the router's CPU per request at long against short requests, its idle CPU over each
  window taken out (heartbeats are neither per request nor per token, and fewer, longer requests
  would otherwise each carry more of them), and per transport the
  two frontends' CPU per token together against one frontend's (1.0: the work divides, at no
  cost of its own). Together, because the kernel spreads HTTP connections over the frontends
  unevenly and no client knows which frontend holds its connection. From the two, what a
  frontend pays per decode step whatever the step holds (`wake_us`) and per token (`token_us`):
  a second frontend pays the wake again for half the tokens; `wake_budget_us`, the wake at which
  two frontends would stay within 10% of one.
- `wake_floor_us`: what an idle process on this machine spends to take in one message per step
  and nothing else, over ZMQ (two threads wake: ZMQ's I/O thread, then the loop's) and over a
  plain TCP stream (one), measured before the fleets start (wake_floor.py): the floor under
  `wake_us`.
- `--repeat N` runs every fleet N times, in turn (1, 2, 1, 2, ...); `results` then holds each
  point's median (the rows of every run are in `runs`): on shared cores one run's CPU figures
  move by 10-20%.
- `cpu_s`: every process's CPU in the window (`client` is this process; `others`: the rest of the
  machine, which says how noisy the run was).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from splitserve.common.child_process import die_with_parent
from splitserve.common.zmq_util import free_port

from .gateway_clients import open_connections
from .output import save
from .serve_bench import CpuMeter, cpu_seconds, summary, terminate
from .server_state import http_json, log_tails
from .wake_floor import measure as measure_wake

TRANSPORTS = ("sse", "ws", "zmq")
# CPU per token the gateway should spend at 64 streams x 200 tokens (issue 16), by transport
TARGETS_US = {"sse": 20.0, "ws": 12.0, "zmq": 12.0}
START_TIMEOUT_S = 60.0
HOST = "127.0.0.1"


@dataclass
class Tally:
    """What the clients of one load point saw."""

    requests: int = 0
    tokens: int = 0
    delays_us: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Fleet:
    """A router, `frontends` frontends sharing one HTTP port and the synthetic workers, as processes
    on free ports of 127.0.0.1."""

    def __init__(self, args: argparse.Namespace, fingerprint: str, max_total_tokens: int, epoch_us: int,
                 frontends: int):
        self.http_port, self.worker_port, self.frontend_port, self.router_http = (free_port() for _ in range(4))
        self.zmq_ports = [free_port() for _ in range(frontends)]
        self.idle_s = args.idle
        self.log_dir = Path(tempfile.mkdtemp(prefix="splitserve-bench-gateway-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.idle_per_s: dict[str, float] = {}
        common = ["--model", args.model, "--home", str(args.home), "--threads", "1",
                  *(["--revision", args.revision] if args.revision else [])]
        self.commands = {"router": ["-m", "splitserve.cli", "router", *common, "--worker-port", str(self.worker_port),
                                    "--frontend-port", str(self.frontend_port), "--metrics-port", str(self.router_http),
                                    "--max-concurrent-requests", str(4 * args.concurrency + 64)]}
        for i, zmq_port in enumerate(self.zmq_ports):
            self.commands[f"frontend-{i}"] = ["-m", "splitserve.cli", "frontend", *common, "--router",
                                              f"tcp://{HOST}:{self.frontend_port}", "--port", str(self.http_port),
                                              "--zmq-port", str(zmq_port)]
        worker = ["-m", "splitserve.bench.synthetic_workers", "--gateway", f"tcp://{HOST}:{self.worker_port}",
                  "--fingerprint", fingerprint, "--max-total-tokens", str(max_total_tokens), "--step-ms",
                  str(args.step_ms), "--epoch-us", str(epoch_us)]
        self.commands |= {"prefill": [*worker, "--role", "prefill"], "decode": [*worker, "--role", "decode"]}

    @property
    def servers(self) -> dict[str, int]:
        """The processes whose CPU per token is the benchmark's point, by name -> pid."""
        return {name: p.pid for name, p in self.procs.items() if name == "router" or name.startswith("frontend")}

    @property
    def zmq_endpoints(self) -> list[str]:
        return [f"tcp://{HOST}:{port}" for port in self.zmq_ports]

    def cpu_seconds(self) -> dict[str, float]:
        return {name: cpu_seconds(p.pid) for name, p in self.procs.items()}

    def __enter__(self) -> Fleet:
        env = dict(os.environ, PYTHONUNBUFFERED="1", SPLITSERVE_LOG_LEVEL="WARNING")
        try:
            for name, cmd in self.commands.items():
                with open(self.log_dir / f"{name}.log", "wb") as log:
                    self.procs[name] = subprocess.Popen([sys.executable, *cmd], env=env, stdout=log,
                                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                        preexec_fn=die_with_parent())
            self._wait_ready()
            before = self.cpu_seconds()
            time.sleep(self.idle_s)
            after = self.cpu_seconds()
            self.idle_per_s = {name: round((after[name] - before[name]) / self.idle_s, 6) for name in self.servers}
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        router = http_json(self.router_http, "/health") or {}
        return router.get("status") == "ok" and router.get("frontends") == len(self.zmq_ports) \
            and (http_json(self.http_port, "/health") or {}).get("status") == "ok"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            dead = [name for name, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{dead[0]} exited" if dead else f"not ready within {START_TIMEOUT_S:.0f} s"
                raise RuntimeError(f"the router, frontends and synthetic workers did not start: {why}\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        return log_tails(self.log_dir)

    def __exit__(self, *exc) -> None:
        terminate([p for name, p in self.procs.items() if name not in self.servers])
        terminate([p for name, p in self.procs.items() if name in self.servers])
        said = self.logs()
        if said:  # at WARNING, a quiet run says nothing: anything here deserves a look
            print(f"the router, frontends and synthetic workers logged:\n{said}", file=sys.stderr)
        for path in self.log_dir.glob("*.log"):
            path.unlink()
        self.log_dir.rmdir()


# --- one load point ------------------------------------------------------------------------------

async def drive(fleet: Fleet, transport: str, concurrency: int, new_tokens: int, duration: float,
                ws_encoding: str, epoch_us: int, tally: Tally, clock) -> tuple[dict, float]:
    """Every client sends requests back to back until `duration` has passed; `tally` counts as they
    go. Connections open before the window and close after it. -> (CPU seconds spent by each
    process of `clock()`, seconds) over the window."""
    now_us = time.time_ns

    def on_text(text: str) -> None:
        tally.delays_us.append(now_us() // 1000 - epoch_us - int(text))

    async def one_client(conn) -> None:
        while time.monotonic() < end:
            try:
                tokens = await conn.generate(new_tokens, on_text)
                tally.tokens += tokens
            except Exception as e:  # Failed, a connection's or the client library's error: the run goes on
                tally.errors.append(f"{type(e).__name__}: {e}")
            tally.requests += 1

    async with AsyncExitStack() as stack:
        conns = await open_connections(stack, transport, concurrency, (HOST, fleet.http_port), fleet.zmq_endpoints,
                                       ws_encoding)
        meter, start = CpuMeter(clock), time.perf_counter()
        end = time.monotonic() + duration
        await asyncio.gather(*(one_client(c) for c in conns))
        return meter.spent(), time.perf_counter() - start


def run_point(fleet: Fleet, transport: str, concurrency: int, new_tokens: int, duration: float, args,
              epoch_us: int, bar: tqdm | None) -> dict:
    try:
        from uvloop import run as run_loop  # as the gateway does: less of the client's own overhead
    except ImportError:
        run_loop = asyncio.run
    tally = Tally()

    async def with_progress() -> tuple[dict, float]:
        async def show() -> None:
            while bar is not None:
                bar.set_postfix_str(f"{transport} {concurrency}x{new_tokens}: {tally.tokens} tokens", refresh=True)
                await asyncio.sleep(0.5)

        shower = asyncio.create_task(show())
        try:
            return await drive(fleet, transport, concurrency, new_tokens, duration, args.ws_encoding, epoch_us, tally,
                               lambda: dict(fleet.cpu_seconds(), client=time.process_time()))
        finally:
            shower.cancel()

    cpu, seconds = run_loop(with_progress())
    tokens = max(tally.tokens, 1)
    return {
        "frontends": len(fleet.zmq_ports), "transport": transport, "concurrency": concurrency, "new_tokens": new_tokens, "requests": tally.requests,
        "tokens": tally.tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tally.tokens / seconds, 1),
        "us_per_token": {name: round(1e6 * cpu[name] / tokens, 2) for name in fleet.servers},
        "delay_us": summary(tally.delays_us), "cpu_s": cpu, "idle_cpu_per_s": fleet.idle_per_s,
        "errors": len(tally.errors),
        "error_examples": sorted(set(tally.errors))[:3],
    }


# --- analysis ------------------------------------------------------------------------------------

def medians(runs: list[dict]) -> list[dict]:
    """One row per load point: the median of each figure over the runs (errors: their sum)."""
    import statistics

    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 6) if values else None

    keys = ("frontends", "transport", "concurrency", "new_tokens")
    rows = []
    for point in dict.fromkeys(tuple(r[k] for k in keys) for r in runs):
        mine = [r for r in runs if tuple(r[k] for k in keys) == point]
        rows.append({**dict(zip(keys, point)),
                     **{k: median([r[k] for r in mine]) for k in ("requests", "tokens", "seconds", "tokens_per_s")},
                     **{k: {name: median([r[k][name] for r in mine]) for name in mine[0][k]}
                        for k in ("us_per_token", "delay_us", "cpu_s", "idle_cpu_per_s")},
                     "errors": sum(r["errors"] for r in mine),
                     "error_examples": sorted({e for r in mine for e in r["error_examples"]})[:3],
                     "runs": len(mine)})
    return rows


def split(results: list[dict]) -> list[dict]:
    """Per fleet, transport and server process: CPU = a * requests + b * tokens, fitted over the
    request lengths (exact for two), as µs per request (a) and µs per token (b)."""
    import numpy as np

    rows = []
    for frontends, transport in dict.fromkeys((r["frontends"], r["transport"]) for r in results):
        mine = [r for r in results if (r["frontends"], r["transport"]) == (frontends, transport) and r["tokens"]]
        if len({r["new_tokens"] for r in mine}) < 2:
            continue
        a = np.array([[r["requests"], r["tokens"]] for r in mine], dtype=float)
        for name in mine[0]["us_per_token"]:
            cpu = np.array([r["cpu_s"][name] for r in mine]) * 1e6
            (per_request, per_token), *_ = np.linalg.lstsq(a, cpu, rcond=None)
            rows.append({"frontends": frontends, "transport": transport, "process": name,
                         "us_per_request": round(float(per_request), 1), "us_per_token": round(float(per_token), 2)})
    return rows


def checks(results: list[dict], c: int, n: int, step_ms: float) -> dict:
    """The issue's targets, from the runs at `c` clients and `n` tokens (and the shorter requests beside them):
    the router's CPU per request at long and short requests (it should not grow with tokens), and
    per transport the CPU per token of two frontends together against one frontend's.

    What a second frontend adds is solved as well. Each decode step reaches each frontend as one
    message, so a frontend's CPU per step is `wake` (waking for the step's message, whatever it
    holds: the kernel, ZMQ's I/O thread, the event loop) plus `token` for each of the step's tokens it
    relays: one frontend pays wake + T * token per step of T tokens, two together 2 * wake + T * token."""
    out: dict = {"router_us_per_request": [], "frontend_us_per_token": []}
    for frontends, transport in dict.fromkeys((r["frontends"], r["transport"]) for r in results):
        mine = {r["new_tokens"]: r for r in results
                if (r["frontends"], r["transport"], r["concurrency"]) == (frontends, transport, c) and r["requests"]}
        if len(mine) >= 2:
            short, long = mine[min(mine)], mine[max(mine)]
            per_request = {n: 1e6 * (r["cpu_s"]["router"] - r["idle_cpu_per_s"]["router"] * r["seconds"]) / r["requests"]
                           for n, r in ((min(mine), short), (max(mine), long))}
            out["router_us_per_request"].append({
                "frontends": frontends, "transport": transport,
                **{f"{n}_tokens": round(v, 1) for n, v in per_request.items()},
                "ratio": round(per_request[max(mine)] / per_request[min(mine)], 3)})
    for transport in dict.fromkeys(r["transport"] for r in results):
        at = {r["frontends"]: r for r in results if (r["transport"], r["concurrency"], r["new_tokens"]) == (transport, c, n)}
        if 1 in at and 2 in at:
            one = at[1]["us_per_token"]["frontend-0"]
            two = at[2]["us_per_token"]["frontend-0"] + at[2]["us_per_token"]["frontend-1"]
            per_step = at[2]["tokens_per_s"] * step_ms / 1e3  # tokens a decode step makes
            wake = (two - one) * per_step
            token = one - wake / per_step
            out["frontend_us_per_token"].append({"transport": transport, "one": one, "two_together": round(two, 3),
                                                 "ratio": round(two / one, 3), "tokens_per_step": round(per_step, 1),
                                                 "wake_us": round(wake, 1), "token_us": round(token, 2),
                                                 # (2 w + T t) / (w + T t) <= 1.1 while w <= T t / 9
                                                 "wake_budget_us": round(per_step * token / 9, 1)})
    return out


def format_table(doc: dict) -> str:
    lines = [f"{'fronts':>6} {'transport':<9} {'load':>9} {'requests':>8} {'tokens/s':>9} "
             + " ".join(f"{name + ' us/tok':>18}" for name in doc["servers"])
             + f" {'delay p50 us':>12} {'p99 us':>8} {'target':>7} {'errors':>6}"]
    for r in doc["results"]:
        target = doc["targets_us"].get(r["transport"]) if r["new_tokens"] == doc["target_load"]["new_tokens"] \
            and r["concurrency"] == doc["target_load"]["concurrency"] else None
        cpu = r["us_per_token"]
        lines.append(f"{r['frontends']:>6} {r['transport']:<9} {r['concurrency']:>4}x{r['new_tokens']:<4} "
                     f"{r['requests']:>8} {r['tokens_per_s']:>9.0f} "
                     + " ".join(f"{_num(cpu.get(name), '.1f'):>18}" for name in doc["servers"])
                     + f" {_num(r['delay_us']['p50']):>12} {_num(r['delay_us']['p99']):>8} "
                     f"{'' if target is None else f'<= {target:g}':>7} {r['errors']:>6}")
    if doc["split"]:
        lines += ["", f"{'fronts':>6} {'transport':<9} {'process':<11} {'us/request':>10} {'us/token':>9}"]
        lines += [f"{s['frontends']:>6} {s['transport']:<9} {s['process']:<11} {s['us_per_request']:>10.0f} "
                  f"{s['us_per_token']:>9.1f}" for s in doc["split"]]
    idle = {r["frontends"]: r["idle_cpu_per_s"] for r in doc["results"]}
    for frontends, rates in idle.items():
        lines.append(f"idle, {frontends} frontend(s): " + ", ".join(f"{name} {1e3 * v:.2f} ms/s" for name, v in rates.items()))
    for row in doc["checks"]["router_us_per_request"]:
        lines.append(f"router, {row['frontends']} frontend(s), {row['transport']}: CPU per request at long/short "
                     f"requests {row['ratio']:.2f}x, idle CPU taken out (target within 10%)")
    for row in doc["checks"]["frontend_us_per_token"]:
        lines.append(f"frontends, {row['transport']}: two together at {row['ratio']:.2f}x one's CPU per token "
                     f"(target within 10%); a frontend's CPU per decode step: {row['wake_us']:.0f} µs to wake + "
                     f"{row['token_us']:.1f} µs per token; within 10% takes a wake under {row['wake_budget_us']:.0f} µs")
    floor = doc["wake_floor_us"]
    lines.append(f"an idle process taking one message every {doc['step_ms']:g} ms: {floor['zmq']:.0f} µs of CPU per "
                 f"message over ZMQ, {floor['tcp']:.0f} µs over a plain TCP stream (the floor under a wake)")
    return "\n".join(lines)


def _num(x, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


# --- the command ---------------------------------------------------------------------------------

def numbers(kind):
    def parse(text: str) -> list:
        return [kind(x) for x in text.split(",") if x]

    return parse


def add_args(p: argparse.ArgumentParser) -> None:
    from splitserve.common.config import add_model_args

    add_model_args(p)  # the gateway's tokenizer and limits; no weights are loaded
    p.set_defaults(model="tiny-random")
    p.add_argument("--transports", type=numbers(str), default=list(TRANSPORTS), help="of sse, ws, zmq")
    p.add_argument("--frontends", type=numbers(int), default=[1, 2], help="frontend counts, one fleet each")
    p.add_argument("--concurrency", type=int, default=64, help="clients streaming at once")
    p.add_argument("--new-tokens", type=numbers(int), default=[20, 200],
                   help="tokens per request, one load point each (two or more give the per-request/per-token split)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds during which requests start, per point")
    p.add_argument("--warmup", type=float, default=1.0, help="untimed seconds of load before each transport")
    p.add_argument("--idle", type=float, default=3.0, help="seconds of each fleet's idle CPU, measured before its loads")
    p.add_argument("--repeat", type=int, default=1, help="run every fleet this many times, in turn; report medians")
    p.add_argument("--step-ms", type=float, default=5.0, help="the synthetic decode worker's time per step")
    p.add_argument("--ws-encoding", choices=["msgpack", "json"], default="msgpack")
    p.add_argument("--quick", action="store_true", help="8 clients, 4 and 16 tokens, half a second each (a smoke run)")
    p.add_argument("--json", type=Path, help="write the results here (e.g. bench/results/gateway-cpu.json)")
    p.add_argument("--plot-dir", type=Path, default=Path("bench/results"), help="where the PNG goes")


def run(args: argparse.Namespace) -> int:
    from splitserve.common.builtin_models import resolve_model
    from splitserve.common.model_config import load_model_config
    from splitserve.common.params import Limits
    from splitserve.common.tokenizer import Tokenizer

    from .gateway_plots import plot_gateway

    if args.quick:
        args.concurrency, args.new_tokens, args.duration, args.warmup, args.idle = 8, [4, 16], 0.5, 0.3, 0.3
    bad = set(args.transports) - set(TRANSPORTS)
    if bad:
        raise SystemExit(f"--transports: unknown {', '.join(sorted(bad))} (choose from {', '.join(TRANSPORTS)})")
    path = resolve_model(args.model, args.home, progress=False, revision=args.revision)
    cfg = load_model_config(path)
    fingerprint = cfg.fingerprint(Tokenizer.from_dir(path).vocab_size)
    epoch_us = time.time_ns() // 1000
    points = [(t, n) for t in args.transports for n in args.new_tokens]
    runs, servers = [], []
    repeat = 1 if args.quick else max(1, args.repeat)
    bar = tqdm(total=len(points) * len(args.frontends) * repeat, desc="bench gateway", unit="point", file=sys.stderr)
    try:
        floor = {}
        for transport in ("zmq", "tcp"):
            bar.set_postfix_str(f"an idle process's wake over {transport}", refresh=True)
            floor[transport] = measure_wake(transport, args.step_ms, 30 if args.quick else 1000)
        for rep in range(repeat):
            for frontends in args.frontends:
                bar.set_postfix_str(f"starting a router and {frontends} frontend(s)", refresh=True)
                with Fleet(args, fingerprint, Limits.derive(cfg.n_positions).max_total_tokens, epoch_us,
                           frontends) as fleet:
                    servers += [name for name in fleet.servers if name not in servers]
                    for i, (transport, new_tokens) in enumerate(points):
                        if i == 0 or points[i - 1][0] != transport:  # connections and code paths warmed per transport
                            run_point(fleet, transport, args.concurrency, min(args.new_tokens), args.warmup, args,
                                      epoch_us, bar)
                        runs.append({**run_point(fleet, transport, args.concurrency, new_tokens, args.duration, args,
                                                 epoch_us, bar), "repeat": rep})
                        bar.update()
    finally:
        bar.close()
    results = medians(runs)
    target_load = {"concurrency": 64, "new_tokens": 200}
    doc = {
        "model": args.model, "cpus": len(os.sched_getaffinity(0)), "step_ms": args.step_ms,
        "concurrency": args.concurrency, "duration_s": args.duration, "ws_encoding": args.ws_encoding,
        "servers": servers, "targets_us": TARGETS_US, "target_load": target_load,
        "repeat": repeat, "wake_floor_us": floor, "results": results, "runs": runs, "split": split(results),
        "checks": checks(results, args.concurrency, max(args.new_tokens), args.step_ms),
    }
    print(format_table(doc))
    save(doc, args.json, args.plot_dir, "gateway-cpu", plot_gateway)
    return 0 if not any(r["errors"] for r in results) else 1
