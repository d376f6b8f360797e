"""`splitserve bench serve`: the served pipeline (gateway, prefill and decode worker processes,
ZMQ in between) under load, against the in-process `Engine` under the same load.

Loads: C clients each sending requests back to back (`--concurrency`), or Poisson arrivals
(`--rate`). Every load is bounded in time (`--duration`: no request starts after it; requests
still running `--grace` seconds later are cancelled and counted as unfinished) and, with
`--requests`, in count. The i-th request of a load is the same for both systems (seeded random
token ids, lengths uniform in `--prompt-len` and `--new-tokens`, EOS ignored), and no prompt comes
back in another load: the pipeline's prefix cache would answer a later load's prompts from an
earlier one's, which the engine, with no such cache, could not.

What a row means:
- `ttft_ms`: request sent -> its first token. Pipeline: from the client's send (the client's own
  lag behind the Poisson schedule is reported apart, as `send_lag_ms`). Engine: from the
  request's arrival, so the step it waits behind counts, as it does for a server.
- `tpot_ms`: per request, (last token - first token) / (tokens - 1).
- `itl_ms`: every gap between consecutive tokens of a request. `itl_rest_ms`: the same without each
  request's first gap, which in the pipeline is the KV handoff to the decode worker (with 64 new
  tokens, one gap in 63: enough to set the p99 alone); the engine's is its first decode step.
  `short_gap_share`: the share of gaps under 0.1 ms, tokens that arrived in a burst.
- `output_tok_s`: output tokens of finished requests / (last token - start of the load).
- The engine is driven in this process by a loop that admits arrived requests and calls
  `step()`; each TokenEvent is stamped when `step()` returns it. Its PyTorch threads are the decode
  worker's (`--engine-threads` to change it; `--scenario mixed` gives it the workers' total).
- `requests` counts finished requests; `failed` those that errored or were still running at the
  end of the grace period (`errors` says why). `*_cdf_ms` are quantiles at the document's
  `cdf_levels`, for plots. `cpu_s`: CPU seconds each process spent during the load (the client
  is this process), which tells where the cores went, and `others`: what other processes on the
  machine took meanwhile; well above 0, the run was noisy (with `--endpoint`, a server on this
  machine counts among the others).

`--scenario mixed`: long prompts (512-1536 tokens) arriving as a Poisson process while other
requests decode. The engine runs each prefill between two decode steps, stalling every running
stream; the pipeline prefills on another core. Its figure of merit is the p99 ITL, compared at
the same total PyTorch threads: prefill and decode worker one thread each, pinned to a core of
their own, against an engine with two. A stall hits each running stream once, so the share of
stalled gaps is about (streams running) / (tokens per request): the rates, 3 to 6 per second,
span loads where that share is under and over 1%, i.e. where the stalls stay out of the
engine's p99 and where they set it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from splitserve.common.child_process import die_with_parent
from splitserve.common.config import ModelOptions, add_model_args
from splitserve.common.zmq_util import free_port

from .output import save
from .server_state import http_json, log_tails

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
CDF_LEVELS = sorted({i / 100 for i in range(101)} | {0.995, 0.999})
LOAD_SEED_STEP = 7919  # seeds of successive loads' requests lie this far apart (the warm-up's is seed + 1)
SHORT_GAP_MS = 0.1  # a gap this short between two tokens of a stream: they came in a burst
START_TIMEOUT_S = 180.0
EXIT_GRACE_S = 15.0
PROGRESS_EVERY_S = 1.0


# --- the load ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    kind: str  # concurrency | poisson
    concurrency: int | None
    rate: float | None
    duration: float  # no request starts later than this, in seconds from the load's start
    max_requests: int  # 0: as many as the duration allows

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.kind == "concurrency" else f"{self.rate:g} req/s"


@dataclass(frozen=True)
class Job:
    prompt_ids: tuple[int, ...]
    new_tokens: int


class Jobs:
    """The i-th request of a load, the same whichever system asks and in whatever order."""

    def __init__(self, prompt_len: tuple[int, int], new_tokens: tuple[int, int], vocab: int, seed: int):
        self.prompt_len, self.new_tokens, self.vocab, self.seed = prompt_len, new_tokens, vocab, seed

    def for_load(self, k: int) -> Jobs:
        """The requests of the k-th load: prompts of their own."""
        return Jobs(self.prompt_len, self.new_tokens, self.vocab, self.seed + LOAD_SEED_STEP * (k + 1))

    def __getitem__(self, i: int) -> Job:
        rng = random.Random(self.seed * 1_000_003 + i)
        n = rng.randint(*self.prompt_len)
        # id 0 is the tiny model's end-of-text; ignored anyway, but kept out of prompts
        return Job(tuple(rng.randrange(1, self.vocab) for _ in range(n)), rng.randint(*self.new_tokens))


def poisson_arrivals(load: Load, seed: int) -> list[float]:
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(load.rate)
    while t < load.duration and (not load.max_requests or len(arrivals) < load.max_requests):
        arrivals.append(t)
        t += rng.expovariate(load.rate)
    return arrivals


def may_start(load: Load, started: int, elapsed: float) -> bool:
    return elapsed < load.duration and (not load.max_requests or started < load.max_requests)


@dataclass
class Trace:
    job: Job
    sent: float
    times: list[float] = field(default_factory=list)  # each output token's arrival
    error: str | None = None  # why it failed, when known

    @property
    def finished(self) -> bool:
        return self.error is None and len(self.times) == self.job.new_tokens

    def end(self, reason: str | None) -> None:
        """Every request asks for a fixed length with EOS ignored: anything else is a failure."""
        if reason != "length":
            self.error = f"finished by {reason!r}"
        elif len(self.times) != self.job.new_tokens:
            self.error = f"{len(self.times)} tokens of {self.job.new_tokens}"


class Progress:
    """The bar's postfix: finished requests of the run in progress, refreshed now and then."""

    def __init__(self, bar: tqdm, what: str):
        self.bar, self.what, self.done, self.shown = bar, what, 0, 0.0

    def finished_one(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.shown > PROGRESS_EVERY_S:
            self.shown = now
            self.bar.set_postfix_str(f"{self.what}: {self.done} done", refresh=True)


# --- the pipeline, through the client library --------------------------------------------------

async def drive_pipeline(endpoint: str, load: Load, jobs: Jobs, grace: float, seed: int,
                         progress: Progress) -> tuple[list[Trace], float, list[float]]:
    """Traces, the load's start, and how late each Poisson send was behind its schedule."""
    from splitserve.client import AsyncClient

    traces: list[Trace] = []
    lags: list[float] = []
    async with AsyncClient(endpoint) as client:
        start = time.perf_counter()
        hard_end = start + load.duration + grace

        async def request(job: Job) -> None:
            trace = Trace(job, time.perf_counter())
            traces.append(trace)
            try:
                async with client.stream(prompt_ids=list(job.prompt_ids), max_new_tokens=job.new_tokens,
                                         ignore_eos=True, timeout=max(0.1, hard_end - trace.sent)) as stream:
                    async for ev in stream:
                        if ev.token_id is not None:
                            trace.times.append(time.perf_counter())
                    trace.end(stream.finish_reason)
            except Exception as e:  # the run goes on; the request counts as failed
                trace.error = f"{type(e).__name__}: {e}"
            progress.finished_one()

        async def one_client() -> None:
            while may_start(load, len(traces), time.perf_counter() - start):
                await request(jobs[len(traces)])  # `request` takes its index at once, before any await

        async def at(offset: float, i: int) -> None:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            lags.append(time.perf_counter() - start - offset)
            await request(jobs[i])

        if load.kind == "concurrency":
            tasks = [asyncio.create_task(one_client()) for _ in range(load.concurrency)]
        else:
            tasks = [asyncio.create_task(at(t, i)) for i, t in enumerate(poisson_arrivals(load, seed))]
        _, late = await asyncio.wait(tasks, timeout=max(0.0, hard_end + 1.0 - time.perf_counter()))
        for t in late:  # cancelling closes the stream, which cancels the request at the gateway
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    return traces, start, lags


def run_pipeline_load(endpoint: str, load: Load, jobs: Jobs, grace: float, seed: int, progress: Progress):
    try:  # as the gateway does: less of the client's own overhead in the latencies
        from uvloop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    return run_loop(drive_pipeline(endpoint, load, jobs, grace, seed, progress))


# --- the in-process engine -------------------------------------------------------------------

def drive_engine(engine, load: Load, jobs: Jobs, grace: float, seed: int, progress: Progress):
    """The same load through `engine.step()`: arrived requests are submitted before each step."""
    from splitserve.common.request import GenerateRequest

    traces: dict[str, Trace] = {}
    start = time.perf_counter()
    hard_end = start + load.duration + grace
    arrivals = poisson_arrivals(load, seed) if load.kind == "poisson" else []

    def submit(at: float) -> None:
        i = len(traces)
        job = jobs[i]
        engine.submit(GenerateRequest(f"bench-{i}", job.prompt_ids, job.new_tokens, ignore_eos=True))
        traces[f"bench-{i}"] = Trace(job, at)

    if load.kind == "concurrency":
        for _ in range(load.concurrency):
            if may_start(load, len(traces), 0.0):
                submit(start)
    while True:
        now = time.perf_counter()
        while len(traces) < len(arrivals) and start + arrivals[len(traces)] <= now:
            submit(start + arrivals[len(traces)])  # it arrived while the last step ran
        if now > hard_end:
            for rid in traces:
                engine.cancel(rid)
            break
        if not engine.busy:
            if load.kind == "concurrency" or len(traces) == len(arrivals):
                break
            time.sleep(max(0.0, start + arrivals[len(traces)] - now))
            continue
        events = engine.step()
        stamp = time.perf_counter()
        for ev in events:
            trace = traces[ev.request_id]
            if ev.token_id >= 0:
                trace.times.append(stamp)
            if ev.finish:
                trace.end(ev.finish.reason)
                progress.finished_one()
                if load.kind == "concurrency" and may_start(load, len(traces), stamp - start):
                    submit(stamp)  # its client sends the next request at once
    return list(traces.values()), start


def open_engine(opts: ModelOptions, num_slots: int):
    from splitserve.engine import Engine, EngineOptions
    from splitserve.runtime_setup import open_model

    return Engine(open_model(opts, progress=False), EngineOptions(num_slots=num_slots))


# --- the pipeline's processes ------------------------------------------------------------------



class LocalPipeline:
    """A gateway and its workers as separate processes on free ports of 127.0.0.1; their output
    goes to log files, shown when start-up fails or when they logged anything (warnings up)."""

    def __init__(self, args: argparse.Namespace, threads: int, cpus: dict[str, list[str]],
                 gateway_flags: tuple[str, ...] = (), worker_flags: tuple[str, ...] = ()):
        self.args, self.threads, self.cpus = args, threads, cpus
        self.gateway_flags, self.worker_flags = gateway_flags, worker_flags
        self.zmq_port, self.worker_port, self.http_port = free_port(), free_port(), free_port()
        self.log_dir = Path(tempfile.mkdtemp(prefix="splitserve-bench-"))
        self.procs: dict[str, subprocess.Popen] = {}  # name -> process
        self.metrics_ports: dict[str, int] = {}  # worker name -> its /metrics port

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.zmq_port}"

    def _spawn(self, name: str, command: str, *flags: str) -> subprocess.Popen:
        a = self.args
        cmd = [sys.executable, "-m", "splitserve.cli", command, "--model", a.model, "--dtype", a.dtype,
               "--device", a.device, "--home", str(a.home), *(["--revision", a.revision] if a.revision else []), *flags]
        env = dict(os.environ, PYTHONUNBUFFERED="1", SPLITSERVE_LOG_LEVEL="WARNING")
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=die_with_parent())
        self.procs[name] = proc
        return proc

    def cpu_seconds(self) -> dict[str, float]:
        return {name: cpu_seconds(p.pid) for name, p in self.procs.items()}

    def start(self) -> None:
        a = self.args
        # The gateway computes nothing with PyTorch: one thread, on whichever core is free.
        self._spawn("gateway", "gateway", "--threads", "1", "--zmq-port", str(self.zmq_port),
                    "--worker-port", str(self.worker_port), "--port", str(self.http_port), *self.gateway_flags)
        for role, count in (("prefill", a.prefill_workers), ("decode", a.decode_workers)):
            for i in range(count):
                port = free_port()
                self.metrics_ports[f"{role}-{i}"] = port
                flags = ["--gateway", f"tcp://127.0.0.1:{self.worker_port}", "--threads", str(self.threads),
                         "--worker-id", f"{role}-{i}-{os.getpid()}", "--metrics-port", str(port), *self.worker_flags]
                if role == "decode":
                    flags += ["--num-slots", str(a.num_slots)]
                if self.cpus[role]:
                    flags += ["--cpus", self.cpus[role][i]]
                self._spawn(f"{role}-{i}", role, *flags)
        self._wait_registered()

    def _wait_registered(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(self.metrics_ports.values())
        while pending:
            dead = [p for p in self.procs.values() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"the pipeline did not start: {self._why(dead)}")
            pending = [p for p in pending if not (http_json(p, "/health") or {}).get("registered")]
            time.sleep(0.1)

    def _why(self, dead: list[subprocess.Popen]) -> str:
        if not dead:
            return f"workers did not register within {START_TIMEOUT_S:.0f} s\n{self.logs()}"
        return f"`splitserve {dead[0].args[3]}` exited with code {dead[0].returncode}\n{self.logs()}"

    def logs(self) -> str:
        return log_tails(self.log_dir)

    def stop(self) -> None:
        """Workers first, then the gateway: a draining worker exits once its gateway confirms that
        nothing more is on its way, and removes its staging files."""
        from splitserve.commands.serve import remove_ipc_files

        terminate([p for name, p in self.procs.items() if name != "gateway"])
        terminate([p for name, p in self.procs.items() if name == "gateway"])
        remove_ipc_files(os.getpid())  # the worker ids carry this process's pid
        said = self.logs()
        if said:  # a quiet server says nothing at WARNING: anything here deserves a look
            print(f"the pipeline's processes logged:\n{said}", file=sys.stderr)
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LocalPipeline:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def terminate(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, and SIGKILL for what lingers."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cpu_seconds(pid: int) -> float:
    """CPU time of a live process so far (Linux): the sum of its threads' run times, which the
    scheduler keeps in nanoseconds (/proc/PID/task/*/schedstat), where /proc/PID/stat counts 10 ms
    ticks, too coarse for a process that spends a few ms a second. A thread that ended takes its
    time with it: fine for servers, whose threads live as long as they do. Without schedstat, the
    ticks."""
    total, found = 0, False
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
            found = True
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            pass  # a thread that ended meanwhile, or a kernel without schedstat
    if found:
        return total / 1e9
    stat = Path(f"/proc/{pid}/stat").read_text()
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]  # after the command name, which may hold spaces
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all cores have spent on anything but idling, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds that each process of `clock()` has spent since the meter was made, and
    `others`: what the rest of the machine spent meanwhile, which says how noisy the run was."""

    def __init__(self, clock):
        self.clock = lambda: dict(clock(), machine=machine_busy_seconds())
        self.before = self.clock()

    def spent(self) -> dict[str, float]:
        used = {k: v - self.before[k] for k, v in self.clock().items()}
        # /proc counts in clock ticks: a short load can come out a tick below zero
        used["others"] = max(0.0, used.pop("machine") - sum(used.values()))
        return {k: round(v, 2) for k, v in used.items()}


def pin_plan(args: argparse.Namespace, threads: int) -> dict[str, list[str]]:
    """--pin: each worker gets `threads` cores of its own, prefill workers first, wrapping around
    the cores this process may use when there are more threads than cores."""
    if not args.pin:
        return {"prefill": [], "decode": []}
    cores = sorted(os.sched_getaffinity(0))
    plan, k = {}, 0
    for role, count in (("prefill", args.prefill_workers), ("decode", args.decode_workers)):
        plan[role] = []
        for _ in range(count):
            plan[role].append(",".join(str(cores[(k + j) % len(cores)]) for j in range(threads)))
            k += threads
    return plan


# --- metrics -----------------------------------------------------------------------------------

def quantiles(values: list[float], levels) -> list[float]:
    import numpy as np

    return [round(float(v), 4) for v in np.quantile(values, levels)] if values else []


def summary(values_ms: list[float]) -> dict:
    qs = quantiles(values_ms, list(QUANTILES.values()))
    return dict(zip(QUANTILES, qs)) if qs else {k: None for k in QUANTILES}


def result_row(system: str, load: Load, traces: list[Trace], start: float, threads: int) -> dict:
    done = [t for t in traces if t.finished]
    ttft = [1e3 * (t.times[0] - t.sent) for t in done]
    tpot = [1e3 * (t.times[-1] - t.times[0]) / (len(t.times) - 1) for t in done if len(t.times) > 1]
    itl = [1e3 * (b - a) for t in done for a, b in zip(t.times, t.times[1:])]
    itl_rest = [1e3 * (b - a) for t in done for a, b in zip(t.times[1:], t.times[2:])]
    end = max((t.times[-1] for t in done), default=start)
    tokens = sum(len(t.times) for t in done)
    prompt = [len(t.job.prompt_ids) for t in traces]
    new = [t.job.new_tokens for t in traces]
    return dict(
        system=system, load=load.kind, concurrency=load.concurrency, rate=load.rate, requests=len(done),
        failed=len(traces) - len(done), prompt_len=[min(prompt, default=0), max(prompt, default=0)],
        new_tokens=[min(new, default=0), max(new, default=0)], ttft_ms=summary(ttft), tpot_ms=summary(tpot),
        itl_ms=summary(itl), itl_rest_ms=summary(itl_rest),
        short_gap_share=round(sum(g < SHORT_GAP_MS for g in itl) / len(itl), 4) if itl else None,
        output_tok_s=round(tokens / (end - start), 2) if end > start else 0.0,
        duration_s=round(end - start, 3), threads=threads,
        errors=dict(Counter(t.error or "unfinished" for t in traces if not t.finished)),
        ttft_cdf_ms=quantiles(ttft, CDF_LEVELS), itl_cdf_ms=quantiles(itl, CDF_LEVELS),
    )


def ratios(results: list[dict]) -> list[dict]:
    """Pipeline / engine per load point: TTFT p50, p99 ITL, output tokens/s."""
    by = {(r["system"], r["load"], r["concurrency"], r["rate"]): r for r in results}
    out = []
    for (system, *point), pipe in by.items():
        eng = by.get(("engine", *point))
        if system != "pipeline" or eng is None:
            continue
        out.append(dict(load=point[0], concurrency=point[1], rate=point[2],
                        ttft_p50=_ratio(pipe["ttft_ms"]["p50"], eng["ttft_ms"]["p50"]),
                        itl_p99=_ratio(pipe["itl_ms"]["p99"], eng["itl_ms"]["p99"]),
                        itl_rest_p99=_ratio(pipe["itl_rest_ms"]["p99"], eng["itl_rest_ms"]["p99"]),
                        output_tok_s=_ratio(pipe["output_tok_s"], eng["output_tok_s"])))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def format_table(results: list[dict], ratio_rows: list[dict]) -> str:
    head = ("system", "load", "reqs", "fail", "ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "tpot_p99", "itl_p50",
            "itl_p90", "itl_p99", "rest_p99", "<0.1ms", "tok/s", "others")
    line = "{:<9}{:<12}{:>6}{:>5}" + "{:>10}" * 9 + "{:>8}{:>9}{:>8}"
    lines = [line.format(*head)]
    for r in results:
        label = f"c={r['concurrency']}" if r["load"] == "concurrency" else f"{r['rate']:g} req/s"
        ms = [r["ttft_ms"]["p50"], r["ttft_ms"]["p90"], r["ttft_ms"]["p99"], r["tpot_ms"]["p50"], r["tpot_ms"]["p99"],
              r["itl_ms"]["p50"], r["itl_ms"]["p90"], r["itl_ms"]["p99"], r["itl_rest_ms"]["p99"]]
        short = "-" if r["short_gap_share"] is None else f"{100 * r['short_gap_share']:.1f}%"
        lines.append(line.format(r["system"], label, r["requests"], r["failed"], *map(_num, ms), short,
                                 f"{r['output_tok_s']:.0f}", _cores(r)))
    if ratio_rows:
        lines.append("\npipeline / engine    ttft_p50  itl_p99  rest_p99  output_tok_s")
        for q in ratio_rows:
            label = f"c={q['concurrency']}" if q["load"] == "concurrency" else f"{q['rate']:g} req/s"
            lines.append(f"{label:<20}{_num(q['ttft_p50']):>9}{_num(q['itl_p99']):>9}{_num(q['itl_rest_p99']):>10}"
                         f"{_num(q['output_tok_s']):>14}")
    return "\n".join(lines) + ("\n(ms; rest_p99: p99 of the gaps after each request's first; <0.1ms: share of gaps "
                               "that short, tokens in a burst; tok/s: output tokens per second; others: cores busy with "
                               "other processes during the load, noise when well above 0)")


def _cores(row: dict) -> str:
    return f"{row['cpu_s']['others'] / row['duration_s']:.2f}" if row["duration_s"] else "-"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if x < 10 else f"{x:.1f}"


# --- command line ------------------------------------------------------------------------------

def span(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '512:1536' -> (512, 1536), both ends included."""
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: want N or LO:HI with 1 <= LO <= HI")
    return lo, hi


def numbers(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


# flag -> (standard, mixed, quick): a flag given on the command line wins
PRESETS = {
    "concurrency": ([1, 8, 64], None, [1, 4]),
    "rate": (None, [3.0, 4.0, 5.0, 6.0], None),
    "duration": (20.0, 40.0, 10.0),
    "requests": (0, 0, 4),
    "prompt_len": ((64, 64), (512, 1536), (64, 64)),
    "new_tokens": ((64, 64), (64, 128), (16, 16)),
    "pin": (False, True, False),
}


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)  # --threads: per worker (0: the cores split between the workers)
    p.add_argument("--scenario", choices=["standard", "mixed"], default="standard",
                   help="standard: concurrency 1,8,64 of 64-token prompts and 64 new tokens; mixed: Poisson "
                        "arrivals (3-6 per second) of 512-1536-token prompts, 64-128 new tokens, workers pinned")
    p.add_argument("--quick", action="store_true", help="concurrency 1 and 4, 4 requests each (a smoke run)")
    load = p.add_argument_group("load (defaults from --scenario)")
    load.add_argument("--concurrency", type=numbers(int), help="clients sending back to back, e.g. 1,8,64")
    load.add_argument("--rate", type=numbers(float), help="Poisson arrivals per second, e.g. 2,4")
    load.add_argument("--duration", type=float, help="seconds during which requests start, per load point")
    load.add_argument("--requests", type=int, help="at most this many requests per load point (0: no limit)")
    load.add_argument("--grace", type=float, default=30.0,
                      help="seconds after --duration that running requests may take before they are cancelled")
    load.add_argument("--prompt-len", type=span, help="prompt tokens, N or LO:HI (uniform)")
    load.add_argument("--new-tokens", type=span, help="new tokens, N or LO:HI (uniform)")
    load.add_argument("--seed", type=int, default=0)
    srv = p.add_argument_group("server")
    srv.add_argument("--endpoint", help="a running gateway, tcp://HOST:PORT (default: start one here)")
    srv.add_argument("--prefill-workers", type=int, default=1)
    srv.add_argument("--decode-workers", type=int, default=1)
    srv.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                     help="pin each worker to --threads cores of its own (prefill first)")
    srv.add_argument("--num-slots", type=int, default=64, help="KV slots of each decode worker and of the engine")
    srv.add_argument("--engine-threads", type=int, default=0,
                     help="the in-process engine's PyTorch threads (0: the decode worker's; mixed: all workers')")
    srv.add_argument("--no-engine", action="store_true", help="skip the in-process engine")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot-dir", type=Path, default=Path("bench/results"), help="where the PNG goes")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left out from the scenario's presets; a load given on the command line
    replaces the preset loads, of both kinds."""
    column = 2 if args.quick else 1 if args.scenario == "mixed" else 0
    load_given = args.concurrency is not None or args.rate is not None
    for name, values in PRESETS.items():
        if getattr(args, name) is None and not (load_given and name in ("concurrency", "rate")):
            setattr(args, name, values[column])
    if args.quick and args.model == "tiny":
        args.model = "tiny-random"
    workers = args.prefill_workers + args.decode_workers
    if not args.threads:
        args.threads = max(1, len(os.sched_getaffinity(0)) // workers)
    if not args.engine_threads:
        args.engine_threads = args.threads * (workers if args.scenario == "mixed" else 1)
    return args


def loads(args: argparse.Namespace) -> list[Load]:
    points = [Load("concurrency", c, None, args.duration, args.requests) for c in args.concurrency or ()]
    return points + [Load("poisson", None, r, args.duration, args.requests) for r in args.rate or ()]


def warmup_load(points: list[Load]) -> Load:
    """Untimed, before each system's first load: the first calls' allocations, and prefill and
    decode batches up to the largest concurrency."""
    widest = max((p.concurrency or 4 for p in points), default=4)
    return Load("concurrency", widest, None, 30.0, widest)


def measure(args: argparse.Namespace, points: list[Load], jobs: Jobs, warm: Jobs) -> list[dict]:
    """Each load on the pipeline, then at once on the engine: a shared machine's speed drifts by
    tens of percent over minutes, and a ratio is only as good as the time between its two runs."""
    systems = ["pipeline"] + ([] if args.no_engine else ["engine"])
    bar = tqdm(total=len(systems) * len(points), desc="bench serve", unit="load", file=sys.stderr)
    rows: dict[str, list[dict]] = {system: [] for system in systems}
    try:
        with contextlib.ExitStack() as stack:
            runs = {"pipeline": stack.enter_context(pipeline_runs(args, points, warm, bar))}
            if not args.no_engine:
                runs["engine"] = engine_runs(args, points, warm, bar)
            for k, load in enumerate(points):
                for system in systems:
                    rows[system].append(runs[system](load, jobs.for_load(k)))
                    bar.update()
    finally:
        bar.close()
    return [row for system in systems for row in rows[system]]


@contextlib.contextmanager
def pipeline_runs(args, points: list[Load], warm: Jobs, bar: tqdm):
    """A function that runs one load on the pipeline (started here and warmed up) -> its row."""
    with contextlib.ExitStack() as stack:
        if args.endpoint:
            endpoint, servers = args.endpoint, dict  # not our processes: only the client's CPU is known
        else:
            bar.set_postfix_str("starting the pipeline", refresh=True)
            pipeline = stack.enter_context(LocalPipeline(args, args.threads, pin_plan(args, args.threads)))
            endpoint, servers = pipeline.endpoint, pipeline.cpu_seconds
        bar.set_postfix_str("pipeline: warm-up", refresh=True)
        run_pipeline_load(endpoint, warmup_load(points), warm, args.grace, args.seed, Progress(bar, "warm-up"))

        def clock() -> dict[str, float]:
            # Where the CPU goes: the client (this process) competes with the server for the cores.
            return dict(servers(), client=time.process_time())

        def run_load(load: Load, jobs: Jobs) -> dict:
            meter = CpuMeter(clock)
            traces, start, lags = run_pipeline_load(endpoint, load, jobs, args.grace, args.seed,
                                                    Progress(bar, f"pipeline {load.label}"))
            row = result_row("pipeline", load, traces, start, args.threads)
            row["cpu_s"] = meter.spent()
            if lags:
                row["send_lag_ms"] = summary([1e3 * x for x in lags])
            return row

        yield run_load


def engine_runs(args, points: list[Load], warm: Jobs, bar: tqdm):
    """A function that runs one load on the in-process engine (loaded here and warmed up) -> its row."""
    import torch

    opts = ModelOptions(args.model, args.dtype, args.device, args.engine_threads, args.home, args.revision)
    bar.set_postfix_str("engine: loading", refresh=True)
    engine = open_engine(opts, args.num_slots)
    with torch.inference_mode():
        drive_engine(engine, warmup_load(points), warm, args.grace, args.seed, Progress(bar, "warm-up"))

    def run_load(load: Load, jobs: Jobs) -> dict:
        meter = CpuMeter(lambda: {"engine": time.process_time()})
        with torch.inference_mode():
            traces, start = drive_engine(engine, load, jobs, args.grace, args.seed, Progress(bar, f"engine {load.label}"))
        row = result_row("engine", load, traces, start, args.engine_threads)
        row["cpu_s"] = meter.spent()
        return row

    return run_load


def run(args: argparse.Namespace) -> int:
    from splitserve.common.builtin_models import resolve_model
    from splitserve.common.model_config import load_model_config
    from splitserve.common.runtime import resolve_device

    from .engine_runs import describe_device
    from .serve_plots import plot_serve  # matplotlib only when a benchmark runs

    args = resolve(args)
    model_dir = resolve_model(args.model, args.home, progress=False, revision=args.revision)
    vocab = load_model_config(model_dir).vocab_size
    jobs = Jobs(args.prompt_len, args.new_tokens, vocab, args.seed)
    warm = Jobs(args.prompt_len, args.new_tokens, vocab, args.seed + 1)
    points = loads(args)
    results = measure(args, points, jobs, warm)
    ratio_rows = ratios(results)
    doc = {
        "device": describe_device(resolve_device(args.device), args.threads), "model": args.model,
        "threads": args.threads, "engine_threads": args.engine_threads, "scenario": args.scenario,
        "workers": {"prefill": args.prefill_workers, "decode": args.decode_workers},
        "pinned": bool(args.pin) and not args.endpoint, "endpoint": args.endpoint, "cdf_levels": CDF_LEVELS,
        "results": results, "ratios": ratio_rows,
    }
    print(format_table(results, ratio_rows))
    save(doc, args.json, args.plot_dir, f"serve-cpu-{Path(args.model).name}-{args.scenario}", plot_serve)
    return 0
