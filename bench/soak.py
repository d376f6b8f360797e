"""`splitserve bench soak`: a bounded soak of a pipeline it starts itself on 127.0.0.1 (gateway,
one prefill and one decode worker), with a report of latency and memory over time and of how the
server holds up when offered more than it admits.

Phases, on one pipeline:
1. warm-up (untimed): a burst of the soak's traffic.
2. soak: the mixed traffic of `splitserve.bench.traffic` (ZMQ, WebSocket, TGI and OpenAI, streamed
   or not; requests that end in full, on stop strings, cancelled, or with their client gone
   mid-way), `--concurrency` clients back to back, for `--duration` seconds or `--max-requests`
   requests, whichever comes first. TTFT and ITL of the streamed requests per `--bucket` seconds;
   every process's RSS sampled each second through all phases. Afterwards every KV slot,
   reservation and staging region must come free, as /metrics reports them (`held_after`).
3. at the limit: `--max-concurrent-requests` clients sending TGI streams back to back: the server
   full, nobody turned away. This is the baseline.
4. overload: Poisson arrivals of the same requests at `--overload-factor` times the rate phase 3
   achieved, each arrival a new client that goes away when refused (429, which must carry
   Retry-After). The figure of merit: the p99 ITL of the admitted requests over phase 3's
   (`itl_p99_ratio`, target <= 1.5): refusing the excess must cost the admitted little.
   Phases 3 and 4 alternate `--rounds` times, so that a machine whose other load drifts (a shared
   CPU) weighs on both alike; their client is a raw HTTP one, light enough not to be what saturates.

`rss_growth`: per process, the median RSS over the soak's last tenth against that over its second
tenth (the first tenth is the warm-up of caches and batch shapes). `cpu_s.others`: CPU seconds
that other processes on the machine took during a phase; well above 0, the run was noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from splitserve.common.config import add_model_args

from .output import add_output_args, num, save
from .presets import resolve_presets
from .server_state import rss_kib, wait_all_free
from .serve_bench import CpuMeter, LocalPipeline, span, summary
from .traffic import STREAMED, Clients, Script, Trace, run_all, script, tgi_stream_light

FREE_TIMEOUT_S = 60.0
GRACE_S = 60.0  # past a phase's end, what still runs is cancelled
LIMIT_PROMPT = "def fibonacci(n):\n    "
ITL_TARGET = 1.5

# flag -> (full, quick): a flag given on the command line wins
PRESETS = {
    "duration": (120.0, 3.0),
    "max_requests": (50_000, 150),
    # with room above the soak's clients: a vanished client's requests hold their places until its next reply fails
    "concurrency": (12, 4),
    "max_concurrent_requests": (24, 8),
    "overload_duration": (30.0, 2.0),
    "rounds": (3, 1),
    "bucket": (10.0, 1.0),
}


class RssSampler:
    """Each process's resident memory every `interval` seconds, on a thread of its own."""

    def __init__(self, pids: dict[str, int], start: float, interval: float = 1.0):
        self.pids, self.start, self.interval = pids, start, interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        self.samples.append((time.perf_counter() - self.start, {n: rss_kib(p) for n, p in self.pids.items()}))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def series(self) -> dict:
        return {"t_s": [round(t, 2) for t, _ in self.samples],
                "kib": {n: [s[n] for _, s in self.samples] for n in self.pids}}


# --- the phases -------------------------------------------------------------------------------

async def soak(clients: Clients, args, start: float, on_done) -> list[Trace]:
    scripts = (script(i, args.seed, args.new_tokens) for i in range(args.max_requests))
    return await _bounded(run_all(clients, scripts, args.concurrency, on_done, until=start + args.duration),
                          args.duration)


class LightClients:
    """What run_all needs of a client: one request per script, here a TGI stream on a raw connection."""

    def __init__(self, port: int):
        self.port = port

    async def run(self, job: Script) -> Trace:
        return await tgi_stream_light("127.0.0.1", self.port, job)


async def at_limit(clients, args, job: Script, seconds: float, on_done) -> tuple[list[Trace], float]:
    start = time.perf_counter()
    jobs = (job for _ in range(args.max_requests))
    traces = await _bounded(run_all(clients, jobs, args.max_concurrent_requests, on_done, until=start + seconds),
                            seconds)
    return traces, time.perf_counter() - start


async def overload(clients, args, job: Script, seconds: float, rate: float, seed: int,
                   on_done) -> tuple[list[Trace], float]:
    rng = random.Random(seed)
    start = time.perf_counter()
    arrivals, t = [], rng.expovariate(rate)
    while t < seconds and len(arrivals) < args.max_requests:
        arrivals.append(t)
        t += rng.expovariate(rate)

    async def arrive(offset: float) -> Trace:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        trace = await clients.run(job)
        on_done(trace)
        return trace

    traces = await _bounded(asyncio.gather(*(arrive(a) for a in arrivals)), seconds)
    return traces, time.perf_counter() - start


async def limit_and_overload(args, port: int, job: Script, clock, on_done) -> dict:
    """Phases 3 and 4, alternating; the overload's rate is set by the first at-limit round."""
    clients, rounds = LightClients(port), args.rounds
    runs = {"at_limit": [[], 0.0, {}], "overloaded": [[], 0.0, {}]}  # traces, seconds, CPU seconds
    rate = None
    for r in range(rounds):
        for phase in runs:
            meter = CpuMeter(clock)
            if phase == "at_limit":
                traces, seconds = await at_limit(clients, args, job, args.overload_duration / rounds, on_done)
                if rate is None:
                    rate = args.overload_factor * max(1.0, sum(t.outcome == "ok" for t in traces) / seconds)
            else:
                traces, seconds = await overload(clients, args, job, args.overload_duration / rounds, rate,
                                                 args.seed + r, on_done)
            run = runs[phase]
            run[0] += traces
            run[1] += seconds
            run[2] = {k: round(run[2].get(k, 0.0) + v, 2) for k, v in meter.spent().items()}
    rows = {phase: {**latency_row(traces, seconds), "cpu_s": cpu} for phase, (traces, seconds, cpu) in runs.items()}
    rows["at_limit"]["clients"] = args.max_concurrent_requests
    rows["overloaded"]["offered_req_s"] = round(rate, 2)
    return rows


async def _bounded(work, duration: float):
    """The phase's traces; requests still running GRACE_S after the phase's end are cancelled (their
    clients close their streams) and fail the run: the soak stops by itself, whatever happens."""
    try:
        return await asyncio.wait_for(work, duration + GRACE_S)
    except asyncio.TimeoutError:
        raise RuntimeError(f"requests still running {GRACE_S:.0f} s after the phase's end") from None


# --- metrics ----------------------------------------------------------------------------------

def itl_ms(traces: list[Trace]) -> list[float]:
    return [1e3 * (b - a) for t in traces if t.outcome == "ok" for a, b in zip(t.times, t.times[1:])]


def ttft_ms(traces: list[Trace]) -> list[float]:
    return [1e3 * (t.times[0] - t.sent) for t in traces if t.times]


def buckets(traces: list[Trace], start: float, width: float, duration: float) -> list[dict]:
    """Latency per time bucket of the soak: TTFT by the request's send, ITL by the later token."""
    n = max(1, int(-(-duration // width)))
    ttft, itl, sent = [[] for _ in range(n)], [[] for _ in range(n)], [0] * n
    at = lambda t: min(n - 1, max(0, int((t - start) // width)))  # noqa: E731 - a local index
    for t in traces:
        sent[at(t.sent)] += 1
        if t.times:
            ttft[at(t.sent)].append(1e3 * (t.times[0] - t.sent))
        for a, b in zip(t.times, t.times[1:]):
            itl[at(b)].append(1e3 * (b - a))
    return [{"t_s": round(i * width, 2), "requests": sent[i], "ttft_ms": _p50_p99(ttft[i]), "itl_ms": _p50_p99(itl[i])}
            for i in range(n)]


def _p50_p99(values: list[float]) -> dict:
    s = summary(values)
    return {"p50": s["p50"], "p99": s["p99"]}


def rss_growth(samples: list[tuple[float, dict[str, int]]], duration: float) -> dict[str, float]:
    """Per process: median RSS over the soak's last tenth / over its second tenth - 1, in %."""
    def median(lo: float, hi: float, name: str) -> float:
        window = [s[name] for t, s in samples if lo <= t <= hi]
        if not window:  # a run shorter than the sampling interval: the sample nearest the window
            window = [min(samples, key=lambda ts: abs(ts[0] - (lo + hi) / 2))[1][name]]
        return statistics.median(window)

    names = samples[0][1] if samples else {}
    return {n: round(100 * (median(0.9 * duration, duration, n) / median(0.1 * duration, 0.2 * duration, n) - 1), 2)
            for n in names}


def latency_row(traces: list[Trace], seconds: float) -> dict:
    ok = [t for t in traces if t.outcome == "ok"]
    return {"requests": len(traces), "admitted_ok": len(ok), "refused": sum(t.outcome == "overloaded" for t in traces),
            "failed": sum(t.failed for t in traces), "req_s": round(len(ok) / seconds, 2) if seconds else 0.0,
            "ttft_ms": summary(ttft_ms(ok)), "itl_ms": summary(itl_ms(ok))}


# --- the run ----------------------------------------------------------------------------------

def measure(args) -> dict:
    pipeline = LocalPipeline(args, args.threads, {"prefill": [], "decode": []},
                             ("--max-concurrent-requests", str(args.max_concurrent_requests)))
    bar = tqdm(total=4, desc="bench soak", unit="phase", file=sys.stderr)
    bar.set_postfix_str("starting the pipeline", refresh=True)
    try:
        with pipeline:
            return _phases(args, pipeline, bar)
    finally:
        bar.close()


def _phases(args, pipeline: LocalPipeline, bar: tqdm) -> dict:
    url = f"http://127.0.0.1:{pipeline.http_port}"
    workers = {name: (name.split("-")[0], port) for name, port in pipeline.metrics_ports.items()}
    pids = {name: p.pid for name, p in pipeline.procs.items()}
    clock = lambda: dict(pipeline.cpu_seconds(), client=time.process_time())  # noqa: E731
    job = Script("tgi_stream", "full", LIMIT_PROMPT, args.new_tokens[1], 0, None)
    done = Counter()

    def on_done(trace: Trace) -> None:
        done["n"] += 1
        if done["n"] % 50 == 0:
            bar.set_postfix_str(f"{done['n']} requests", refresh=True)

    async def run() -> dict:
        async with Clients(pipeline.endpoint, url, connections=2 * args.concurrency) as clients:
            warm = [script(i, args.seed + 1, args.new_tokens) for i in range(4 * args.concurrency)]
            await run_all(clients, warm, args.concurrency)
            bar.update()
            start = time.perf_counter()
            with RssSampler(pids, start) as rss:
                meter = CpuMeter(clock)
                traces = await soak(clients, args, start, on_done)
                seconds, cpu = time.perf_counter() - start, meter.spent()
                left = wait_all_free(pipeline.http_port, workers, FREE_TIMEOUT_S)
                rss.sample()  # at rest, everything free
                report = soak_report(args, traces, start, seconds, rss.samples)
                bar.update()
                rows = await limit_and_overload(args, pipeline.http_port, job, clock, on_done)
                rows["overloaded"]["held_after"] = wait_all_free(pipeline.http_port, workers, FREE_TIMEOUT_S)
                bar.update(2)
        base, over = rows["at_limit"]["itl_ms"]["p99"], rows["overloaded"]["itl_ms"]["p99"]
        return {"soak": {**report, "held_after": left, "cpu_s": cpu},
                "overload": {**rows, "itl_p99_ratio": round(over / base, 3) if base and over is not None else None,
                             "target": ITL_TARGET},
                "rss": rss.series()}

    try:  # as the gateway does: less of the client's own overhead in the latencies
        from uvloop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    return run_loop(run())


def soak_report(args, traces: list[Trace], start: float, seconds: float, rss_samples) -> dict:
    streamed = [t for t in traces if t.script.front in STREAMED]
    return {"seconds": round(seconds, 2), "requests": len(traces), "outcomes": dict(Counter(t.outcome for t in traces)),
            "by_front": dict(Counter(t.script.front for t in traces)), "failed": sum(t.failed for t in traces),
            "ttft_ms": summary(ttft_ms(streamed)), "itl_ms": summary(itl_ms(streamed)),
            "buckets": buckets(streamed, start, args.bucket, seconds), "rss_growth_pct": rss_growth(rss_samples, seconds)}


def format_table(doc: dict) -> str:
    s, o = doc["soak"], doc["overload"]
    lines = [f"soak: {s['requests']} requests in {s['seconds']:.0f} s, failed {s['failed']}, "
             f"outcomes {s['outcomes']}",
             f"{'t (s)':>7}{'reqs':>7}{'ttft_p50':>10}{'ttft_p99':>10}{'itl_p50':>10}{'itl_p99':>10}"]
    for b in s["buckets"]:
        lines.append(f"{b['t_s']:>7.0f}{b['requests']:>7}" + "".join(
            f"{num(b[k][q]):>10}" for k in ("ttft_ms", "itl_ms") for q in ("p50", "p99")))
    rss = doc["rss"]
    lines.append(f"\n{'process':<12}{'RSS start':>12}{'RSS end':>12}{'growth':>9}  (MiB; growth: last tenth "
                 "vs second tenth of the soak)")
    for name, series in rss["kib"].items():
        lines.append(f"{name:<12}{series[0] / 1024:>12.1f}{series[-1] / 1024:>12.1f}"
                     f"{s['rss_growth_pct'][name]:>8.2f}%")
    lines.append(f"held after the soak: {s['held_after'] or 'nothing'}")
    lines.append(f"\n{'overload':<12}{'offered/s':>10}{'ok/s':>7}{'ok':>6}{'429':>6}{'fail':>6}{'itl_p50':>10}"
                 f"{'itl_p99':>10}")
    for name, row in (("at limit", o["at_limit"]), ("overloaded", o["overloaded"])):
        offered = row.get("offered_req_s", "-")
        lines.append(f"{name:<12}{offered:>10}{row['req_s']:>7}{row['admitted_ok']:>6}{row['refused']:>6}"
                     f"{row['failed']:>6}{num(row['itl_ms']['p50']):>10}{num(row['itl_ms']['p99']):>10}")
    lines.append(f"p99 ITL overloaded / at limit: {num(o['itl_p99_ratio'])} (target <= {o['target']})")
    others = {phase: f"{row['cpu_s']['others']:.0f}" for phase, row in
              (("soak", s), ("at limit", o["at_limit"]), ("overloaded", o["overloaded"]))}
    return "\n".join(lines) + f"\n(ms; others: CPU seconds other processes took per phase, noise: {others})"


# --- command line -----------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)  # --threads: per worker (0: the cores split between the two workers)
    p.add_argument("--quick", action="store_true", help="a few seconds of each phase (a smoke run)")
    p.add_argument("--duration", type=float, help="seconds of soak traffic (default 120)")
    p.add_argument("--max-requests", type=int, help="at most this many requests per phase (default 50000)")
    p.add_argument("--concurrency", type=int, help="soak clients sending back to back (default 12)")
    p.add_argument("--max-concurrent-requests", type=int,
                   help="the gateway's limit, and the clients of the at-limit phase (default 24)")
    p.add_argument("--overload-duration", type=float,
                   help="seconds of each of the at-limit and overload phases, all rounds together (default 30)")
    p.add_argument("--rounds", type=int, help="times the at-limit and overload phases alternate (default 3)")
    p.add_argument("--overload-factor", type=float, default=3.0,
                   help="overload arrivals per second, as a multiple of the at-limit phase's requests per second")
    p.add_argument("--new-tokens", type=span, default=(8, 32),
                   help="new tokens of soak requests, N or LO:HI (the at-limit and overload requests take HI)")
    p.add_argument("--bucket", type=float, help="seconds per latency bucket (default 10)")
    p.add_argument("--num-slots", type=int, default=32, help="KV slots of the decode worker")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    args.prefill_workers = args.decode_workers = 1  # what LocalPipeline starts
    return resolve_presets(args, PRESETS, workers=2)


def run(args: argparse.Namespace) -> int:
    from splitserve.common.runtime import resolve_device

    from .engine_runs import describe_device
    from .soak_plots import plot_soak  # matplotlib only when a benchmark runs

    args = resolve(args)
    config = {k: getattr(args, k) for k in (*PRESETS, "overload_factor", "num_slots", "seed")}
    config["new_tokens"] = list(args.new_tokens)
    doc = {"device": describe_device(resolve_device(args.device), args.threads), "model": args.model,
           "threads": args.threads, "config": config, **measure(args)}
    print(format_table(doc))
    save(doc, args.json, args.plot_dir, f"soak-cpu-{Path(args.model).name}", plot_soak)
    failed = doc["soak"]["failed"] + doc["overload"]["at_limit"]["failed"] + doc["overload"]["overloaded"]["failed"]
    return 1 if failed or doc["soak"]["held_after"] or doc["overload"]["overloaded"]["held_after"] else 0
