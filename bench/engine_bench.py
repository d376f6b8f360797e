"""`splitserve bench engine`: splitserve's engines against transformers' `generate`, on the very
same weight tensors, dtype, device and threads, in one process.

The curves that show where time goes: decode time per step against batch size and against key length, prefill time
against prompt length and batch size (plus a packed mixed batch), each with a floor: the time of
the step's weight matrix products alone, which no implementation can go below.

What a row means:
- decode `ms` is per step. splitserve: N steps of a `DecodeEngine` whose B slots start from random
  KV of the prompt's length (the values don't change the work). transformers:
  (generate(N + 1 new tokens) - generate(1 new token)) / N with its default cache, which leaves
  out its prefill.
- decode `key_len` is the mean number of keys a step attends: prompt_len + new_tokens // 2.
- prefill `ms`: splitserve `PrefillEngine.run` (sampling the first token included); transformers
  `generate(max_new_tokens=1)`, which also computes only the last position's logits. The mixed
  batch is packed for splitserve and left-padded to its longest prompt for transformers; its
  `prompt_len` is the total of its prompts' tokens.
- `floor_ms`: every layer's c_attn, attn c_proj, mlp c_fc and mlp c_proj as one `addmm` each on the
  step's tokens, plus the LM head on one row per sequence.
- `ms` and `floor_ms` are medians: after a warm-up, a point runs rounds of one floor, one
  splitserve and one transformers sample in turn (so that a shared machine's slow spells fall on
  all three alike), at least --repeats rounds and more (up to MAX_RUNS) until --min-seconds have
  passed.
- `peak_mem_mb`: of a system's warm-up and one run, taken before the next system runs. CUDA
  `max_memory_allocated`, reset per measurement. On the CPU the process's peak RSS from
  `getrusage`, weights included: a running maximum, which this resets before each measurement
  through /proc/self/clear_refs where the kernel allows it.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from tqdm import tqdm

from splitserve.common.builtin_models import resolve_model
from splitserve.common.config import add_model_args
from splitserve.common.loading import LoadedModel
from splitserve.common.model import ModelWeights, prepare_weights
from splitserve.common.model_config import model_config_from_dict
from splitserve.common.request import GenerateRequest
from splitserve.common.runtime import DTYPE_NAMES, resolve_device, resolve_dtype, set_threads
from splitserve.common.tokenizer import TINY_TOKENIZER_PATH, Tokenizer
from splitserve.decode_worker.engine import DecodeEngine
from splitserve.prefill_worker.engine import PrefillEngine

from .output import save

MIXED_LENS = (32, 96, 160, 224, 288, 352, 416, 512)
PREFILL_BATCH_PROMPT = 128
MAX_RUNS = 200
KEY_BUCKET = 8
SANTACODER = dict(
    model_type="gpt_bigcode", vocab_size=49280, n_positions=2048, n_embd=2048, n_layer=24, n_head=16,
    multi_query=True, activation_function="gelu_pytorch_tanh", bos_token_id=49152, eos_token_id=49152,
)


@dataclass(frozen=True)
class Sweep:
    batch_sizes: list[int]
    prompt_len: int
    new_tokens: int
    repeats: int
    min_seconds: float
    key_lens: list[int]
    key_batches: list[int]
    prefill_lens: list[int]
    prefill_batches: list[int]


def default_sweep(device: torch.device, quick: bool) -> Sweep:
    if quick:  # under a minute on 2 cores with the tiny model, batch 1 and 64 kept
        return Sweep([1, 8, 64], 64, 8, 1, 0.2, [512], [1], [32, 512], [1, 4])
    gpu = device.type == "cuda"
    return Sweep(
        batch_sizes=[2**i for i in range(9 if gpu else 7)],
        prompt_len=64,
        new_tokens=64,
        repeats=5,
        min_seconds=1.0,
        key_lens=[128, 512, 1024, 1920],
        key_batches=[1, 64 if gpu else 16],
        prefill_lens=[32, 128, 512, 1024],
        prefill_batches=[1, 2, 4, 8],
    )


@dataclass(frozen=True)
class Point:
    """One measurement, made on every system."""

    phase: str  # decode | prefill
    curve: str  # batch | key_len | prompt_len | prefill_batch | mixed
    lens: tuple[int, ...]  # each prompt's length
    new_tokens: int  # decode: steps timed; prefill: 1, the first token
    label: str | None = None

    @property
    def batch_size(self) -> int:
        return len(self.lens)

    @property
    def prompt_len(self) -> int:
        return self.lens[0] if len(set(self.lens)) == 1 else sum(self.lens)

    @property
    def key_len(self) -> int:
        return self.lens[0] + self.new_tokens // 2 if self.phase == "decode" else max(self.lens)

    @property
    def positions(self) -> int:
        """Positions the longest sequence reaches, under transformers' N + 1 new tokens."""
        return max(self.lens) + (self.new_tokens + 1 if self.phase == "decode" else 0)


def plan(sweep: Sweep, n_positions: int) -> list[Point]:
    if sweep.new_tokens < 1 or sweep.repeats < 1:
        raise ValueError("--new-tokens and --repeats must be at least 1")
    n, half = sweep.new_tokens, sweep.new_tokens // 2
    points = [Point("decode", "batch", (sweep.prompt_len,) * b, n) for b in sweep.batch_sizes]
    points += [Point("decode", "key_len", (k - half,) * b, n) for b in sweep.key_batches for k in sweep.key_lens]
    points += [Point("prefill", "prompt_len", (p,), 1) for p in sweep.prefill_lens]
    points += [Point("prefill", "prefill_batch", (PREFILL_BATCH_PROMPT,) * b, 1) for b in sweep.prefill_batches]
    points.append(Point("prefill", "mixed", MIXED_LENS, 1, "mixed-8"))
    for p in points:
        if min(p.lens) < 1 or p.positions > n_positions:
            raise ValueError(f"{p.phase} {p.curve} point with prompts of {max(p.lens)} tokens and {p.new_tokens} "
                             f"new tokens needs {p.positions} positions; the model has {n_positions}")
    return points


# --- timing and memory ---------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Repeats:
    """Runs of one measurement: at least `runs`, and more while they have taken under `seconds`
    (up to MAX_RUNS), so that cheap measurements get enough runs for a steady median on a
    machine that other processes share."""

    runs: int
    seconds: float

    def take(self, run: Callable[[], Any]) -> list:
        values, start = [], time.perf_counter()
        while len(values) < self.runs or (time.perf_counter() - start < self.seconds and len(values) < MAX_RUNS):
            values.append(run())
        return values


class Measurement(NamedTuple):
    """One system's timing of one point, warmed up: `sample()` is one timed run (seconds, or what
    `ms` expects) and `ms(samples)` sums a list of them up as milliseconds."""

    sample: Callable[[], Any]
    ms: Callable[[list], float]


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def timing(fn, device: torch.device) -> Measurement:
    fn()  # warm-up: first-call allocations and lazy initialisation
    return Measurement(lambda: timed(fn, device), median_ms)


def alone(m: Measurement, repeats: Repeats) -> float:
    return m.ms(repeats.take(m.sample))


def interleaved(jobs: dict[str, Measurement], repeats: Repeats) -> dict[str, float]:
    """Rounds of one sample of every job in turn, so that a shared machine's slow and fast spells
    fall on all of them alike (their ratios are what the benchmark reports). -> name: ms."""
    samples: dict[str, list] = {name: [] for name in jobs}

    def one_round() -> None:
        for name, job in jobs.items():
            samples[name].append(job.sample())

    repeats.take(one_round)
    return {name: job.ms(samples[name]) for name, job in jobs.items()}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the RSS high-water mark that getrusage reports (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10  # macOS reports bytes


# --- the weights, shared ---------------------------------------------------------------------

def load_models(path: Path | None, device: torch.device, dtype: torch.dtype):
    """transformers' model, and splitserve's `LoadedModel` over the very same tensors."""
    # transformers is imported here so that `splitserve --help` doesn't pay for it.
    from transformers import GPTBigCodeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if path is None:
        hf, path = random_santacoder(device, dtype), Path("santacoder-shape")
        tokenizer = Tokenizer.from_file(TINY_TOKENIZER_PATH)
    else:
        hf = GPTBigCodeForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = Tokenizer.from_dir(path)
    hf.eval()
    cfg = model_config_from_dict(hf.config.to_dict())
    weights = {name.removeprefix("transformer."): t for name, t in hf.state_dict().items()}
    return hf, LoadedModel(path, cfg, prepare_weights(weights, cfg), tokenizer, device, dtype)


def random_santacoder(device: torch.device, dtype: torch.dtype):
    """SantaCoder's shape with random weights. Only shapes matter to the timings; the benchmark
    feeds random token ids, so the tiny tokenizer stands in."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM
    from transformers.initialization import no_init_weights

    # transformers' own initialisation takes ~20 s on 2 cores; plain normal fills take a few.
    with torch.device(device), no_init_weights():
        model = GPTBigCodeForCausalLM._from_config(GPTBigCodeConfig(**SANTACODER), dtype=dtype)
    model.tie_weights()  # skipped along with the initialisation
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.02)
    return model


def random_prompts(lens: tuple[int, ...], vocab: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(len(lens) * 7919 + sum(lens))
    return [torch.randint(1, vocab, (n,), generator=gen).to(device) for n in lens]


def floor(p: ModelWeights, tokens: int, rows: int, device: torch.device, times: int = 1) -> Measurement:
    """A forward's weight matrix products alone, back to back: each layer's four on `tokens` rows,
    the LM head on `rows` (one per sequence). A sample runs them `times` over, as a decode sample
    runs its steps: one short run alone would find the weights evicted by the other systems."""
    x = torch.randn(tokens, p.cfg.n_embd, dtype=p.wte.dtype, device=device)  # [T, E]
    inner = torch.randn(tokens, p.cfg.n_inner, dtype=p.wte.dtype, device=device)  # [T, n_inner]

    def products():
        for _ in range(times):
            for layer in p.layers:
                torch.addmm(layer.qkv_b, x, layer.qkv_wt)
                torch.addmm(layer.proj_b, x, layer.proj_wt)
                torch.addmm(layer.fc_b, x, layer.fc_wt)
                torch.addmm(layer.out_b, inner, layer.out_wt)
            torch.mm(x[:rows], p.lm_head_t)

    m = timing(products, device)
    return m._replace(ms=lambda runs: m.ms(runs) / times)


def floor_ms(p: ModelWeights, tokens: int, rows: int, repeats: Repeats, device: torch.device) -> float:
    return alone(floor(p, tokens, rows, device), repeats)


# --- the two systems ---------------------------------------------------------------------------

class SplitserveRunner:
    def __init__(self, lm: LoadedModel, points: list[Point]):
        self.lm = lm
        decode = [p for p in points if p.phase == "decode"]
        prefill = [p for p in points if p.phase == "prefill"]
        # One pool for the sweep, as a server has: slots for the largest batch, each as long as
        # the longest sequence; a step reads only its first B slots and its keys up to the bucket.
        longest = max((p.positions for p in decode), default=0)
        slot_len = min(-(-longest // KEY_BUCKET) * KEY_BUCKET, lm.cfg.n_positions)
        self.decode_engine = DecodeEngine(lm, max(p.batch_size for p in decode), slot_len, KEY_BUCKET) if decode else None
        self.prefill_engine = PrefillEngine(lm, max(sum(p.lens) for p in prefill)) if prefill else None

    def decode(self, point: Point, prompts: list[torch.Tensor]) -> Measurement:
        cfg = self.lm.cfg
        # [n_layer, 2, P, KVH, D]: every slot starts from the same random prompt KV
        kv = torch.randn(cfg.n_layer, 2, point.lens[0], cfg.kv_heads, cfg.head_dim, dtype=self.lm.dtype,
                         device=self.lm.device)
        self._decode(prompts, kv, 2)  # warm-up
        n = point.new_tokens
        return Measurement(lambda: self._decode(prompts, kv, n), lambda runs: median_ms(runs) / n)

    def _decode(self, prompts: list[torch.Tensor], kv: torch.Tensor, steps: int) -> float:
        """Admit every prompt (untimed), then time `steps` steps, on the last of which all finish."""
        for i, ids in enumerate(prompts):
            request = GenerateRequest(f"bench-{i}", tuple(ids.tolist()), steps + 1, ignore_eos=True)
            self.decode_engine.admit(request, kv, first_token=int(ids[-1]))
        elapsed = timed(lambda: self._steps(steps), self.lm.device)
        if self.decode_engine.requests:
            raise RuntimeError("decode requests outlived their max_new_tokens")
        return elapsed

    def _steps(self, n: int) -> None:
        for _ in range(n):
            self.decode_engine.step()

    def prefill(self, point: Point, prompts: list[torch.Tensor]) -> Measurement:
        batch = [GenerateRequest(f"bench-{i}", tuple(ids.tolist()), 1, ignore_eos=True)
                 for i, ids in enumerate(prompts)]
        return timing(lambda: self.prefill_engine.run(batch), self.lm.device)


class TransformersRunner:
    def __init__(self, model, pad_id: int, device: torch.device):
        self.model, self.pad_id, self.device = model, pad_id, device

    def decode(self, point: Point, prompts: list[torch.Tensor]) -> Measurement:
        ids, mask = self._left_padded(prompts)  # equal lengths: no padding
        n = point.new_tokens
        self._generate(ids, mask, 2)  # warm-up

        def ms(pairs: list[tuple[float, float]]) -> float:
            full, one = zip(*pairs)
            return (median_ms(full) - median_ms(one)) / n

        # A sample is a pair, so that drift hits both runs alike.
        return Measurement(lambda: (timed(lambda: self._generate(ids, mask, n + 1), self.device),
                                    timed(lambda: self._generate(ids, mask, 1), self.device)), ms)

    def prefill(self, point: Point, prompts: list[torch.Tensor]) -> Measurement:
        ids, mask = self._left_padded(prompts)
        return timing(lambda: self._generate(ids, mask, 1), self.device)

    def _left_padded(self, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=self.device)  # [B, W]
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        return ids, mask

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> None:
        # min_new_tokens = max_new_tokens, so that EOS can't end a row early
        self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=self.pad_id)


# --- the sweep ---------------------------------------------------------------------------------

def measurement(runner, point: Point, prompts: list[torch.Tensor]) -> Measurement:
    """A system's measurement of one point, warmed up."""
    return runner.decode(point, prompts) if point.phase == "decode" else runner.prefill(point, prompts)


def measure(points: list[Point], lm: LoadedModel, runners: dict, repeats: Repeats) -> list[dict]:
    results = []
    bar = tqdm(points, desc="bench engine", unit="point", file=sys.stderr)
    for point in bar:
        bar.set_postfix_str(f"{point.phase} {point.label or point.curve} B={point.batch_size} P={point.prompt_len}")
        prompts = random_prompts(point.lens, lm.cfg.vocab_size, lm.device)
        tokens = sum(point.lens) if point.phase == "prefill" else point.batch_size
        jobs = {"floor": floor(lm.weights, tokens, point.batch_size, lm.device, point.new_tokens)}
        peaks = {}
        for system, runner in runners.items():
            # Each system's memory before the next runs at all: on the CPU the peak is the
            # process's RSS, which keeps what an earlier system's allocator held on to.
            reset_peak(lm.device)
            jobs[system] = measurement(runner, point, prompts)
            jobs[system].sample()  # after the warm-up: one full run
            peaks[system] = peak_mb(lm.device)
        got = interleaved(jobs, repeats)
        floor_time = got.pop("floor")
        results += [result_row(system, point, ms, floor_time, peaks[system]) for system, ms in got.items()]
    return results


def result_row(system: str, point: Point, ms: float, floor: float, mem: float) -> dict:
    row = dict(system=system, phase=point.phase, batch_size=point.batch_size, prompt_len=point.prompt_len,
               key_len=point.key_len, new_tokens=point.new_tokens, ms=round(ms, 4), floor_ms=round(floor, 4),
               peak_mem_mb=round(mem, 1), curve=point.curve)
    if point.label:
        row["label"] = point.label
    return row


def format_table(results: list[dict]) -> str:
    """One line per point, the systems side by side; ratio = transformers_ms / splitserve_ms."""
    points: dict[tuple, dict] = {}
    for r in results:
        key = (r["phase"], r.get("label") or r["curve"], r["batch_size"], r["prompt_len"], r["key_len"],
               r["new_tokens"])
        points.setdefault(key, {"floor": r["floor_ms"]})[r["system"]] = r
    head = ("phase", "curve", "batch", "prompt", "keys", "new", "floor_ms", "splitserve_ms", "transformers_ms",
            "ratio", "ss_mem_mb", "tf_mem_mb")
    lines = ["{:<8}{:<14}{:>6}{:>7}{:>6}{:>5}{:>10}{:>15}{:>17}{:>7}{:>11}{:>11}".format(*head)]
    for key, got in points.items():
        ss, tf = got.get("splitserve"), got.get("transformers")
        ratio = f"{tf['ms'] / ss['ms']:.2f}" if ss and tf else "-"
        lines.append("{:<8}{:<14}{:>6}{:>7}{:>6}{:>5}{:>10.3f}{:>15}{:>17}{:>7}{:>11}{:>11}".format(
            *key, got["floor"], _ms(ss), _ms(tf), ratio, _mem(ss), _mem(tf)))
    return "\n".join(lines)


def _ms(row: dict | None) -> str:
    return f"{row['ms']:.3f}" if row else "-"


def _mem(row: dict | None) -> str:
    return f"{row['peak_mem_mb']:.0f}" if row else "-"


def describe_device(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({threads} threads, {cpu_model()})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --- command line ------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)  # --threads 0 (the default) means every core this process may use
    p.add_argument("--shape", choices=["santacoder"], default=None,
                   help="random weights of this model's shape instead of --model's checkpoint")
    p.add_argument("--quick", action="store_true", help="a small sweep with few repeats (under a minute, tiny model)")
    sweep = p.add_argument_group("sweep (defaults depend on --quick and the device)")
    sweep.add_argument("--batch-sizes", type=int_list, help="decode batch sizes, e.g. 1,2,4")
    sweep.add_argument("--prompt-len", type=int, help="decode prompt length of the batch curve (default 64)")
    sweep.add_argument("--new-tokens", type=int, help="decode steps timed per measurement (default 64)")
    sweep.add_argument("--repeats", type=int, help="timed runs per measurement at least; the median is reported")
    sweep.add_argument("--min-seconds", type=float, help="more runs, up to %d, until a measurement has taken this long"
                       % MAX_RUNS)
    sweep.add_argument("--key-lens", type=int_list, help="mean key lengths of the key-length curve ('' skips it)")
    sweep.add_argument("--key-batches", type=int_list, help="batch sizes of the key-length curve")
    sweep.add_argument("--prefill-lens", type=int_list, help="batch-1 prefill prompt lengths ('' skips them)")
    sweep.add_argument("--prefill-batches", type=int_list,
                       help=f"prefill batch sizes of {PREFILL_BATCH_PROMPT}-token prompts ('' skips them)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot-dir", type=Path, default=Path("bench/results"), help="where the PNG goes")


def sweep_from_args(args: argparse.Namespace, device: torch.device) -> Sweep:
    given = {f.name: getattr(args, f.name) for f in fields(Sweep) if getattr(args, f.name) is not None}
    return replace(default_sweep(device, args.quick), **given)


def run(args: argparse.Namespace) -> int:
    from .plots import plot_engine  # matplotlib only when a benchmark runs

    threads = args.threads or all_cores()
    set_threads(threads)
    device = resolve_device(args.device)
    path = None if args.shape else resolve_model(args.model, args.home)
    dtype = resolve_dtype(args.dtype, device, path)
    sweep = sweep_from_args(args, device)
    hf, lm = load_models(path, device, dtype)
    points = plan(sweep, lm.cfg.n_positions)
    repeats = Repeats(sweep.repeats, sweep.min_seconds)
    runners = {"splitserve": SplitserveRunner(lm, points)}
    if not args.no_transformers:
        runners["transformers"] = TransformersRunner(hf, lm.cfg.eos_token_id or 0, device)
    with torch.inference_mode():
        results = measure(points, lm, runners, repeats)
    model_name = f"{args.shape}-shape (random weights)" if args.shape else args.model
    doc = {"device": describe_device(device, threads), "model": model_name, "dtype": DTYPE_NAMES[dtype],
           "threads": threads, "results": results}
    print(format_table(results))
    save(doc, args.json, args.plot_dir, f"engine-{device.type}-{args.shape or Path(args.model).name}", plot_engine)
    return 0
