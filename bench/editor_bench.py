"""`splitserve bench editor`: editors typing, each three keystrokes a `/infill` request that cancels
the editor's last one (it closes its connection, as llama.vim's curl and llama.vscode's client do),
against two pipelines side by side: one whose prefill worker keeps its prefix cache (the default)
and one started with `--prefix-cache-mb 0`.

A session: an editor types on at `--cps` characters per second from a line of a file of this
machine's Python standard library. Every `--every` characters it asks for a completion as
llama.vscode does (top_k 40, top_p 0.99, streamed here to see the first token): `input_prefix` the
file from a line chosen once per session, at most `--prefix-tokens` once the phase's text is typed
(within the 3/4 of the cursor's batch that the server keeps, so that it never cuts the prefix's
start); `input_suffix` the file after the text being typed, up to `--suffix-tokens`; `input_extra` a
snippet of two other files, `--snippet-tokens` each, the same all session. About 1,500 prompt tokens
a request.
`--editors` sessions type at once, each started a fraction of a request interval after the last.

Fairness on a shared, noisy machine: both pipelines run through the whole benchmark and the load
alternates between them phase by phase (on off, off on, on off, ...; `--rounds` pairs of
`--phase` seconds), both phases of a round replaying the same sessions. A short untimed warm-up
on each comes first. `others`: cores that processes besides the pipelines and this client took
during a condition's phases; well above 0, the run was noisy.

Reported per condition:
- `ttft_ms`: request sent -> its first token event, over the requests `answered` (their first token
  came before the editor's next request cancelled them) of all `requests` sent.
- `prefill_tokens_per_request`: prompt tokens the prefill worker computed / prompts it prefilled,
  from its /metrics (splitserve_prefill_tokens_total, the batch-size histogram's sum) over the
  phases; `cache_hit_rate`: prompt tokens found in its prefix cache / prompt tokens looked up.
- `prompt_tokens`: the mean tokens_evaluated of the requests answered in full.
Ratios on / off against the targets, and `replay`: `--replay` of the requests sent while the cache
was on, evenly spaced, sent again one at a time with temperature 0 and n_predict 16 to both
pipelines: their answers (content and token ids) must be equal, the cache-on pipeline taking most
of each prompt from its cache (`cached_share`).

`--compare chunk`: the two pipelines' prefill workers prefill a long prompt in pieces of
`--chunk-tokens` (`--prefill-chunk-tokens`) and whole (0), and among the editors' requests a
long prompt comes every `--long-every` seconds (a file of `--long-tokens`, sent whole to TGI's
/generate_stream, none alike, the same on both pipelines): a teammate's editor opening a large
file, an agent sending one. Its figures: the editors' TTFT p90, target 0.5x at most (a request
that comes while a long prompt is prefilled waits for all of it, or for one pass; with a long
prompt every 2 s about one request in ten does, so it is the p90 that shows them: the p99 is high
with no long prompt at all), and the long prompts' own median TTFT (what going second costs
them), 1.25x at most; the replay as above (`on`: in pieces).
`--chunk-tokens` 512 is a quarter of the built-in model's 2,048 positions, as the flag's default
8192 is of Qwen2.5-Coder's 32k.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import sysconfig
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from splitserve.common.config import add_model_args

from .output import add_output_args, num, save
from .presets import resolve_presets
from .serve_bench import CDF_LEVELS, CpuMeter, LocalPipeline, quantiles, summary
from .traffic import _chunks, _until_closed

PREFILL_METRICS = ("splitserve_prefill_tokens_total", "splitserve_prefill_batch_size_sum",
                   "splitserve_prefill_prefix_lookup_tokens_total", "splitserve_prefill_prefix_hit_tokens_total")
N_PREDICT = 16
FINAL_FIELDS = ["stop", "tokens_evaluated", "tokens_cached"]
REPLAY_FIELDS = ["content", "tokens", "tokens_evaluated", "tokens_cached"]
GRACE_S = 10.0  # a session's last request may run this long after its phase
SETTLE_S = 1.0  # the workers publish their counters on housekeeping, a few times a second
WARMUP_S = 3.0

# flag -> (full, quick): a flag given on the command line wins
PRESETS = {"rounds": (3, 1), "phase": (20.0, 2.0), "editors": (4, 2), "replay": (40, 4)}


# --- typing sessions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Session:
    """An editor typing `text[cursor:end]` with `suffix` after it and the prefix from `start`."""

    name: str
    text: str
    start: int
    cursor: int
    end: int
    suffix: str
    extra: tuple[dict, ...]

    def body(self, typed: int) -> dict:
        """llama.vscode's completion request once `typed` characters are in."""
        return {"input_prefix": self.text[self.start:min(self.cursor + typed, self.end)],
                "input_suffix": self.suffix, "input_extra": list(self.extra), "prompt": "", "n_predict": N_PREDICT,
                "top_k": 40, "top_p": 0.99, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
                "t_max_prompt_ms": 500, "t_max_predict_ms": 2500, "stream": True, "response_fields": FINAL_FIELDS}


class Sessions:
    """Typing sessions over the standard library's modules, the same for a given seed."""

    def __init__(self, tokenizer, args: argparse.Namespace):
        self.count = lambda text: len(tokenizer.encode_continuation(text))
        self.args = args
        self.typed = int(args.cps * args.phase) + args.every  # what a phase types, and a little more
        root = Path(sysconfig.get_paths()["stdlib"])
        self.files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 40_000)

    def make(self, seed: int, n: int) -> list[Session]:
        rng = random.Random(seed)
        return [self._session(rng) for _ in range(n)]

    def _session(self, rng: random.Random) -> Session:
        a = self.args
        path, *others = rng.sample(self.files, 3)
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        cursor = rng.randint(len(lines) // 4, len(lines) // 2)  # a line start, with a long file before it
        end = cursor
        while end < len(lines) and len("".join(lines[cursor:end])) < self.typed:
            end += 1
        # the prefix as long as it may be once all is typed; the suffix as long as it may be
        start = self._fit(lines, end, -1, a.prefix_tokens)
        suffix = "".join(lines[end:self._fit(lines, end, 1, a.suffix_tokens)])
        offsets = [len("".join(lines[:i])) for i in (start, cursor, end)]
        return Session(path.name, text, *offsets, suffix, tuple(self._snippet(rng, other) for other in others))

    def longs(self, key: str, duration: float) -> list[str]:
        """The long prompts of a phase (--long-tokens each, at most: a file sent whole), none alike
        and none like another key's."""
        every = self.args.long_every
        rng = random.Random(key)
        texts = []
        for i in range(int(duration / every) if every else 0):
            lines = rng.choice(self.files).read_text(encoding="utf-8").splitlines(keepends=True)
            first = rng.randrange(len(lines) // 2)
            texts.append(f"# {key} {i}\n" + "".join(lines[first:self._fit(lines, first, 1, self.args.long_tokens - 8)]))
        return texts

    def _snippet(self, rng: random.Random, path: Path) -> dict:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        first = rng.randrange(len(lines) // 2)
        end = self._fit(lines, first, 1, self.args.snippet_tokens)
        return {"filename": path.name, "text": "".join(lines[first:end])}

    def _fit(self, lines: list[str], at: int, step: int, budget: int) -> int:
        """How far from line `at` whole lines go within `budget` tokens: backwards (step -1) to the
        first line, forwards (1) to the end (exclusive)."""
        i = at
        while (i > 0 if step < 0 else i < len(lines)):
            span = lines[i - 1:at] if step < 0 else lines[at:i + 1]
            if self.count("".join(span)) > budget:
                break
            i += step
        return i


# --- the editors, over raw HTTP connections ------------------------------------------------------

@dataclass
class Trace:
    body: dict
    sent: float
    first: float | None = None  # the first token event's arrival
    ended: float | None = None  # answered in full, failed, or cancelled by the editor's next request
    final: dict | None = None  # the final event's fields (FINAL_FIELDS), for a request answered in full
    error: str | None = None


def comparison(args: argparse.Namespace) -> tuple[dict[str, tuple[str, ...]], dict[str, float]]:
    """What the two pipelines differ in (--compare): condition -> the prefill worker's flags, the one
    under test first; and the targets, as ratios first / second at most."""
    if args.compare == "chunk":
        flag = "--prefill-chunk-tokens"
        return ({"pieces": (flag, str(args.chunk_tokens)), "whole": (flag, "0")},
                {"ttft_p90": 0.5, "long_ttft_p50": 1.25})
    return {"on": (), "off": ("--prefix-cache-mb", "0")}, {"ttft_p50": 0.35, "prefill_tokens_per_request": 0.2}


async def post_stream(port: int, trace: Trace, path: str = "/infill") -> None:
    """One streamed request (/infill, or TGI's /generate_stream for a long prompt) on a connection
    of its own, closed when the task is cancelled (the server then cancels the request). A client
    this light keeps its own share of the cores small."""
    body = json.dumps(trace.body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode() + body)
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked = chunked or line.lower().startswith(b"transfer-encoding: chunked")
        if status != 200:
            trace.error = f"HTTP {status}"
            return
        async for chunk in _chunks(reader) if chunked else _until_closed(reader):
            if trace.first is None:
                trace.first = time.perf_counter()
            if b'"stop":true' in chunk:
                trace.final = json.loads(chunk[chunk.rindex(b"data: ") + 6:])
            elif b'"error":' in chunk:
                trace.error = chunk[:200].decode(errors="replace")
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
        trace.error = f"{type(e).__name__}: {e}"
    finally:
        trace.ended = time.perf_counter()
        if writer is not None:
            writer.close()


async def type_session(port: int, session: Session, args: argparse.Namespace, offset: float, duration: float,
                       traces: list[Trace]) -> None:
    """Every `every` characters a request, cancelling the one before; the last may finish."""
    interval = args.every / args.cps
    start = time.perf_counter() + offset
    tasks: list[asyncio.Task] = []
    for k in range(max(1, int(duration / interval))):
        await asyncio.sleep(max(0.0, start + k * interval - time.perf_counter()))
        if tasks:
            tasks[-1].cancel()
        trace = Trace(session.body((k + 1) * args.every), time.perf_counter())
        traces.append(trace)
        tasks.append(asyncio.create_task(post_stream(port, trace)))
    await asyncio.wait(tasks[-1:], timeout=GRACE_S)
    tasks[-1].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def send_longs(port: int, texts: list[str], every: float, traces: list[Trace]) -> None:
    """A long prompt every `every` seconds (the first half of that in), each answered in full."""
    start, tasks = time.perf_counter(), []
    for k, text in enumerate(texts):
        await asyncio.sleep(max(0.0, start + (k + 0.5) * every - time.perf_counter()))
        trace = Trace({"inputs": text, "parameters": {"max_new_tokens": N_PREDICT}}, time.perf_counter())
        traces.append(trace)
        tasks.append(asyncio.create_task(post_stream(port, trace, "/generate_stream")))
    if tasks:
        await asyncio.wait(tasks, timeout=GRACE_S)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_phase(port: int, sessions: list[Session], args: argparse.Namespace, duration: float,
              longs: list[str] = ()) -> tuple[list[Trace], list[Trace]]:
    """The editors' requests, and the long prompts' sent meanwhile."""
    async def editors() -> tuple[list[Trace], list[Trace]]:
        traces: list[Trace] = []
        long_traces: list[Trace] = []
        spacing = args.every / args.cps / len(sessions)
        await asyncio.gather(*(type_session(port, s, args, i * spacing, duration, traces)
                               for i, s in enumerate(sessions)),
                             send_longs(port, list(longs), args.long_every, long_traces))
        return traces, long_traces

    try:  # as the gateway does: less of the client's own overhead in the latencies
        from uvloop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    return run_loop(editors())


# --- the two pipelines ---------------------------------------------------------------------------

def prefill_counters(pipeline: LocalPipeline) -> dict[str, float]:
    """PREFILL_METRICS on the pipeline's prefill worker (0 where absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{pipeline.metrics_ports['prefill-0']}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = {name: 0.0 for name in PREFILL_METRICS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] += sample.value
    return found


def post_json(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


@dataclass
class Phase:
    condition: str
    round: int
    traces: list[Trace]
    long_traces: list[Trace]
    counters: dict[str, float]  # PREFILL_METRICS' growth during the phase
    cpu_s: dict[str, float]
    seconds: float

    def row(self) -> dict:
        return {"condition": self.condition, "round": self.round, **_stats(self.traces, [self.counters]),
                **({"long": _long_stats(self.long_traces)} if self.long_traces else {}),
                "cpu_s": self.cpu_s, "seconds": round(self.seconds, 2)}


def measure(args: argparse.Namespace, sessions: Sessions, conditions: dict[str, tuple[str, ...]],
            bar) -> tuple[list[Phase], dict]:
    pipeline_args = argparse.Namespace(**vars(args), prefill_workers=1, decode_workers=1)
    pipelines = {c: LocalPipeline(pipeline_args, args.threads, {"prefill": [], "decode": []}, worker_flags=flags)
                 for c, flags in conditions.items()}
    with ExitStack() as stack:
        for p in pipelines.values():
            # from this thread: a child is signalled when the thread that started it ends (die_with_parent)
            stack.callback(p.stop)
            p.start()
        for c, p in pipelines.items():
            bar.set_postfix_str(f"warm-up, {c}", refresh=True)
            warm = min(WARMUP_S, args.phase)
            run_phase(p.http_port, sessions.make(-1 - args.seed, args.editors), args, warm,
                      sessions.longs(f"warm-up {args.seed} {c}", warm))
        phases = []
        for r in range(args.rounds):
            order = list(conditions) if r % 2 == 0 else list(conditions)[::-1]
            round_sessions = sessions.make(args.seed * 1000 + r, args.editors)
            longs = sessions.longs(f"{args.seed} {r}", args.phase)
            for c in order:
                bar.set_postfix_str(f"round {r + 1}, {c}", refresh=True)
                phases.append(one_phase(pipelines, c, r, round_sessions, longs, args))
                bar.update()
        bar.set_postfix_str("replay", refresh=True)
        replay = replay_answers(pipelines, phases, args.replay)
    return phases, replay


def one_phase(pipelines: dict[str, LocalPipeline], condition: str, r: int, sessions: list[Session],
              longs: list[str], args) -> Phase:
    pipeline = pipelines[condition]
    before = prefill_counters(pipeline)
    # both pipelines' processes (the idle one's heartbeats are not noise) and this client
    meter = CpuMeter(lambda: {f"{c} {name}": s for c, p in pipelines.items() for name, s in p.cpu_seconds().items()}
                     | {"client": time.process_time()})
    start = time.perf_counter()
    traces, long_traces = run_phase(pipeline.http_port, sessions, args, args.phase, longs)
    seconds = time.perf_counter() - start
    cpu = meter.spent()
    time.sleep(SETTLE_S)
    after = prefill_counters(pipeline)
    return Phase(condition, r, traces, long_traces, {k: after[k] - before[k] for k in PREFILL_METRICS}, cpu, seconds)


def replay_answers(pipelines: dict[str, LocalPipeline], phases: list[Phase], n: int) -> dict:
    """Requests of the phases of the condition under test again, greedy with a fixed length, on both
    pipelines (`on`: the first; `off`: the second)."""
    names = list(pipelines)
    sent = [t.body for p in phases if p.condition == names[0] for t in p.traces]
    sample = [sent[i * len(sent) // n] for i in range(n)] if sent and n else []
    differing, evaluated, cached = [], 0, 0
    for body in sample:
        body = {k: v for k, v in body.items() if k != "t_max_predict_ms"}  # a time limit would cut anywhere
        body.update(stream=False, temperature=0, n_predict=N_PREDICT, return_tokens=True, response_fields=REPLAY_FIELDS)
        on, off = (post_json(pipelines[c].http_port, "/infill", body) for c in names)
        evaluated, cached = evaluated + on["tokens_evaluated"], cached + on["tokens_cached"]
        if (on["content"], on["tokens"]) != (off["content"], off["tokens"]):
            differing.append({"input_prefix_tail": body["input_prefix"][-80:], "on": on["content"],
                              "off": off["content"]})
    return {"requests": len(sample), "differing": len(differing), "examples": differing[:3],
            "cached_share": round(cached / evaluated, 3) if evaluated else 0.0}


# --- results -------------------------------------------------------------------------------------

def _stats(traces: list[Trace], counters: list[dict[str, float]]) -> dict:
    answered = [t for t in traces if t.first is not None]
    finals = [t.final for t in traces if t.final is not None]
    total = {k: sum(c[k] for c in counters) for k in PREFILL_METRICS}
    prompts = total["splitserve_prefill_batch_size_sum"]
    lookup = total["splitserve_prefill_prefix_lookup_tokens_total"]
    return {
        "requests": len(traces), "answered": len(answered), "errors": sum(t.error is not None for t in traces),
        "ttft_ms": summary([1e3 * (t.first - t.sent) for t in answered]),
        "ttft_p50_bounds_ms": ttft_p50_bounds(traces),
        "prefilled": int(prompts),
        "prefill_tokens_per_request": round(total["splitserve_prefill_tokens_total"] / prompts, 1) if prompts else None,
        "cache_hit_rate": round(total["splitserve_prefill_prefix_hit_tokens_total"] / lookup, 3) if lookup else 0.0,
        "prompt_tokens": round(sum(f["tokens_evaluated"] for f in finals) / len(finals), 1) if finals else None,
    }


def ttft_p50_bounds(traces: list[Trace]) -> list[float | None]:
    """The median TTFT of all requests sent, as far as it is known: a request cancelled before its
    first token would have had it later than it lived (the lower bound counts its lifetime, the
    upper bound infinity: None when that is the median)."""
    if not traces:
        return [None, None]
    known = [1e3 * ((t.first or t.ended) - t.sent) for t in traces]
    high = statistics.median_high([1e3 * (t.first - t.sent) if t.first else math.inf for t in traces])
    return [round(statistics.median_low(known), 1), round(high, 1) if math.isfinite(high) else None]


def _long_stats(traces: list[Trace]) -> dict:
    """The long prompts', each meant to be answered in full (no editor cancels them)."""
    answered = [1e3 * (t.first - t.sent) for t in traces if t.first is not None]
    return {"requests": len(traces), "answered": len(answered), "errors": sum(t.error is not None for t in traces),
            "ttft_ms": summary(answered), "ttft_cdf_ms": quantiles(answered, CDF_LEVELS)}


def conditions(phases: list[Phase], names: list[str]) -> dict:
    out = {}
    for c in names:
        mine = [p for p in phases if p.condition == c]
        traces = [t for p in mine for t in p.traces]
        longs = [t for p in mine for t in p.long_traces]
        seconds = sum(p.seconds for p in mine)
        out[c] = {**_stats(traces, [p.counters for p in mine]),
                  "ttft_cdf_ms": quantiles([1e3 * (t.first - t.sent) for t in traces if t.first is not None],
                                           CDF_LEVELS),
                  **({"long": _long_stats(longs)} if longs else {}),
                  "others": round(sum(p.cpu_s["others"] for p in mine) / seconds, 2) if seconds else None}
    return out


def ratios(by: dict, targets: dict[str, float]) -> dict:
    """The targets' ratios, the condition under test over the other."""
    on, off = by.values()
    pairs = {
        # at most: on's median at its highest over off's at its lowest, whatever cancelled requests hide
        "ttft_p50": lambda s, low: s["ttft_p50_bounds_ms"][1 - low],
        "ttft_p90": lambda s, low: s["ttft_ms"]["p90"],  # of the answered requests
        "prefill_tokens_per_request": lambda s, low: s["prefill_tokens_per_request"],
        "long_ttft_p50": lambda s, low: s.get("long", {}).get("ttft_ms", {}).get("p50"),
    }
    out = {}
    for k in targets:
        a, b = pairs[k](on, False), pairs[k](off, True)
        out[k] = round(a / b, 3) if a is not None and b else None
    return out


def format_table(doc: dict) -> str:
    line = "{:<7}{:>9}{:>10}{:>16}{:>10}{:>10}{:>10}{:>17}{:>10}{:>9}{:>8}"
    names = list(doc["conditions"])
    lines = [line.format(doc["compare"], "requests", "answered", "ttft_p50_all", "ttft_p50", "ttft_p90", "ttft_p99",
                         "prefill_tok/req", "hit_rate", "prompt", "others")]
    for c, s in doc["conditions"].items():
        low, high = s["ttft_p50_bounds_ms"]
        bounds = f"{num(low)}-{'inf' if high is None else num(high)}"
        lines.append(line.format(c, s["requests"], s["answered"], bounds,
                                 *(num(s["ttft_ms"][q]) for q in ("p50", "p90", "p99")),
                                 num(s["prefill_tokens_per_request"]), f"{s['cache_hit_rate']:.3f}",
                                 num(s["prompt_tokens"]), num(s["others"])))
    for c, s in doc["conditions"].items():
        if "long" in s:
            long = s["long"]
            lines.append(f"{c}: long prompts {long['answered']} of {long['requests']} answered, TTFT p50 / p90 / p99 "
                         + " / ".join(num(long["ttft_ms"][q]) for q in ("p50", "p90", "p99")))
    lines.append(f"\n{' / '.join(names):<28}ratio  target")
    for k, v in doc["ratios"].items():
        target = doc["targets"][k]
        lines.append(f"{k:<28}{num(v):>5}  <= {target}  {'met' if v is not None and v <= target else 'MISSED'}")
    rp = doc["replay"]
    lines.append(f"\nreplayed greedy on both: {rp['requests']} requests, {rp['differing']} answers differing, "
                 f"{rp['cached_share']:.0%} of the prompt tokens cached on the {names[0]} pipeline")
    return "\n".join(lines) + ("\n(ms; ttft_p50_all: the median over all requests sent, between bounds when requests "
                               "cancelled before their first token hide it; ttft_p50..p99: over the answered ones; "
                               "ttft_p50 ratio: on's upper bound / off's lower bound; prompt: mean prompt tokens; "
                               "others: cores busy with other processes, noise when well above 0)")


# --- command line --------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)  # --threads: per worker (0: one per core, split between a pipeline's two workers)
    p.add_argument("--quick", action="store_true", help="one round of short phases, two editors (a smoke run)")
    p.add_argument("--compare", choices=["cache", "chunk"], default="cache",
                   help="what the two pipelines differ in: cache, the prefix cache on and off; chunk, long prompts "
                        "prefilled in pieces of --chunk-tokens (--prefill-chunk-tokens) and whole, with a long "
                        "prompt sent every --long-every seconds among the editors' requests")
    p.add_argument("--chunk-tokens", type=int, default=512, help="--compare chunk: the pieces' size")
    p.add_argument("--long-every", type=float,
                   help="seconds between long prompts (TGI /generate_stream; default: 2 with --compare chunk, "
                        "else none)")
    p.add_argument("--long-tokens", type=int, default=1800, help="a long prompt's tokens, at most")
    p.add_argument("--rounds", type=int, help="pairs of phases, one on each pipeline (default 3)")
    p.add_argument("--phase", type=float, help="seconds of typing per phase (default 20)")
    p.add_argument("--editors", type=int, help="sessions typing at once (default 4)")
    p.add_argument("--replay", type=int, help="requests replayed greedy on both pipelines (default 40)")
    p.add_argument("--cps", type=float, default=8.0, help="characters typed per second")
    p.add_argument("--every", type=int, default=3, help="a request every this many characters")
    p.add_argument("--prefix-tokens", type=int, default=740,
                   help="input_prefix once a phase's text is typed, at most (tokens; the server keeps up to 768)")
    p.add_argument("--suffix-tokens", type=int, default=256, help="input_suffix, at most (tokens)")
    p.add_argument("--snippet-tokens", type=int, default=280, help="each of the two input_extra snippets (tokens)")
    p.add_argument("--num-slots", type=int, default=16, help="KV slots of each decode worker")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.long_every is None:
        args.long_every = 2.0 if args.compare == "chunk" else 0.0
    return resolve_presets(args, PRESETS, workers=2)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from splitserve.common.builtin_models import resolve_model
    from splitserve.common.runtime import resolve_device
    from splitserve.common.tokenizer import Tokenizer

    from .editor_plots import plot_editor  # matplotlib only when a benchmark runs
    from .engine_runs import describe_device

    args = resolve(args)
    names, targets = comparison(args)
    model_dir = resolve_model(args.model, args.home, progress=False, revision=args.revision)
    sessions = Sessions(Tokenizer.from_dir(model_dir), args)
    bar = tqdm(total=2 * args.rounds, desc="bench editor", unit="phase", file=sys.stderr)
    try:
        phases, replay = measure(args, sessions, names, bar)
    finally:
        bar.close()
    by = conditions(phases, list(names))
    config = {k: getattr(args, k) for k in (*PRESETS, "cps", "every", "prefix_tokens", "suffix_tokens",
                                            "snippet_tokens", "num_slots", "seed", "long_every", "long_tokens")}
    doc = {"device": describe_device(resolve_device(args.device), args.threads), "model": args.model,
           "threads": args.threads, "compare": args.compare, "flags": names,
           "config": {**config, "n_predict": N_PREDICT}, "cdf_levels": CDF_LEVELS,
           "conditions": by, "ratios": ratios(by, targets), "targets": targets, "replay": replay,
           "phases": [p.row() for p in phases]}
    print(format_table(doc))
    stem = "editor" if args.compare == "cache" else f"editor-{args.compare}"
    save(doc, args.json, args.plot_dir, f"{stem}-cpu-{Path(args.model).name}", plot_editor)
    errors = sum(s["errors"] + s.get("long", {}).get("errors", 0) for s in by.values())
    return 1 if errors or replay["differing"] else 0
