"""The engine benchmark's measurements (see engine_bench.py): the points of a sweep, the two systems
on the same weights, timing and memory, the result rows."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from tqdm import tqdm

from splitserve.common.families import family_of
from splitserve.common.loading import LoadedModel
from splitserve.common.model import ModelWeights, linear, mlp, prepare_weights
from splitserve.common.model_config import model_config_from_dict
from splitserve.common.request import GenerateRequest
from splitserve.common.tokenizer import TINY_TOKENIZER_PATH, Tokenizer
from splitserve.decode_worker.engine import DecodeEngine
from splitserve.prefill_worker.engine import PrefillEngine

from .engine_bench import KEY_BUCKET, MAX_RUNS, MIXED_LENS, PREFILL_BATCH_PROMPT, SHAPES, Sweep

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
    if sweep.mixed:
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

def load_models(path: Path | None, shape: str | None, device: torch.device, dtype: torch.dtype):
    """transformers' model of a checkpoint (or of `shape`, random), and splitserve's `LoadedModel`
    over the very same tensors (q/k/v and gate/up fused into copies of them)."""
    # transformers is imported here so that `splitserve --help` doesn't pay for it.
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if path is None:
        hf, path = random_model(SHAPES[shape], device, dtype), Path(f"{shape}-shape")
        # Only shapes matter to the timings: random token ids, the tiny tokenizer standing in.
        tokenizer = Tokenizer.from_file(TINY_TOKENIZER_PATH)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = Tokenizer.from_dir(path)
    hf.eval()
    return hf, model_over(hf, path, tokenizer, device, dtype)


def model_over(hf, path: Path, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """splitserve's model over the tensors of transformers' `hf`."""
    raw = hf.config.to_dict()
    if "model_type" not in raw:  # to_dict leaves out class attributes in some transformers versions
        raw["model_type"] = hf.config.model_type
    cfg = model_config_from_dict(raw)
    family = family_of(cfg.model_type)
    weights = checkpoint_layout({name.removeprefix(family.PREFIX): t for name, t in hf.state_dict().items()}, family)
    return LoadedModel(path, cfg, prepare_weights(weights, cfg), tokenizer, device, dtype)


def checkpoint_layout(weights: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """transformers 5 holds a mixture as mlp.gate and its experts fused (mlp.experts.gate_up_proj
    [X, 2*I, E], mlp.experts.down_proj [X, E, I]) and saves them one by one under the names
    checkpoints have (the family's EXPERTS), which are what the loader reads: the same tensors
    under those names, as views. A family whose checkpoints stack them as transformers holds them
    (gpt-oss) reads them as they are."""
    out = {}
    one_by_one = "gate" in getattr(family, "EXPERTS", {})
    for name, t in weights.items():
        layer, _, kind = name.partition(".mlp.")  # "layers.{i}", what follows
        if kind not in ("gate.weight", "experts.gate_up_proj", "experts.down_proj") or not one_by_one:
            out[name] = t
            continue
        named = lambda role, j=0: f"{layer}.{family.EXPERTS[role].format(j=j)}.weight"  # noqa: E731
        if kind == "gate.weight":
            out[named("router")] = t
        elif kind == "experts.gate_up_proj":
            i = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[named("gate", j)], out[named("up", j)] = t[j, :i], t[j, i:]
        else:
            out |= {named("down", j): t[j] for j in range(t.shape[0])}
    return out


def random_model(fields: dict, device: torch.device, dtype: torch.dtype):
    """transformers' model of a shape with random weights (N(0, 0.02), norms at 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    # transformers' own initialisation takes ~20 s for SantaCoder on 2 cores; normal fills a few.
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped along with the initialisation
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in tqdm(list(model.named_parameters()), desc="random weights", unit="tensor", leave=False,
                            file=sys.stderr):
            p.normal_(1.0 if p.dim() == 1 and "norm" in name or ".ln_" in name else 0.0, 0.02)
    return model


def random_prompts(lens: tuple[int, ...], vocab: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(len(lens) * 7919 + sum(lens))
    return [torch.randint(1, vocab, (n,), generator=gen).to(device) for n in lens]


def floor(w: ModelWeights, tokens: int, rows: int, device: torch.device, times: int = 1) -> Measurement:
    """A forward's weight matrix products alone, back to back: each layer's four (q/k/v, the
    attention output, the MLP's up or gate/up, its down; latent attention's up-projections too; a
    mixture of experts whole, its router, the products of the experts its rows chose and of the
    shared ones) on `tokens` rows, the LM head on `rows`
    (one per sequence): for decode, the time to read the weights. A sample runs them `times` over,
    as a decode sample runs its steps: one short run alone would find the weights evicted by the
    other systems."""
    cfg = w.cfg
    x = torch.randn(tokens, cfg.n_embd, dtype=w.wte.dtype, device=device)  # [T, E]
    inner = torch.randn(tokens, cfg.n_inner, dtype=w.wte.dtype, device=device)  # [T, I]
    lat = cfg.latent
    if lat is None:
        attn = torch.randn(tokens, cfg.q_dim, dtype=w.wte.dtype, device=device)  # [T, Q]
    else:
        attn = torch.randn(tokens, cfg.n_head * lat.v_dim, dtype=w.wte.dtype, device=device)  # [T, H*Dv]
        q_down = torch.randn(tokens, lat.q_rank, dtype=w.wte.dtype, device=device)  # [T, q_rank]
        per_head = torch.randn(cfg.n_head, tokens, max(lat.nope_dim, lat.kv_rank), dtype=w.wte.dtype, device=device)

    def products():
        for _ in range(times):
            for layer in w.layers:
                linear(x, layer.qkv_wt, layer.qkv_b)
                if layer.k_up is not None:
                    if layer.q_up_wt is not None:
                        torch.mm(q_down, layer.q_up_wt)
                    torch.bmm(per_head[:, :, : lat.nope_dim], layer.k_up)
                    torch.bmm(per_head[:, :, : lat.kv_rank], layer.v_up)
                linear(attn, layer.out_wt, layer.out_b)
                if layer.router_wt is None:
                    linear(x, layer.up_wt, layer.up_b)
                    linear(inner, layer.down_wt, layer.down_b)
                else:
                    mlp(w, layer, x)
            torch.mm(x[:rows], w.lm_head_t)

    m = timing(products, device)
    return m._replace(ms=lambda runs: m.ms(runs) / times)


def floor_ms(w: ModelWeights, tokens: int, rows: int, repeats: Repeats, device: torch.device) -> float:
    return alone(floor(w, tokens, rows, device), repeats)


# --- the two systems ---------------------------------------------------------------------------

class SplitserveRunner:
    def __init__(self, model: LoadedModel, points: list[Point]):
        self.model = model
        decode = [p for p in points if p.phase == "decode"]
        prefill = [p for p in points if p.phase == "prefill"]
        # One pool for the sweep, as a server has: slots for the largest batch, each as long as
        # the longest sequence; a step reads only its first B slots and its keys up to the bucket.
        longest = max((p.positions for p in decode), default=0)
        slot_len = min(-(-longest // KEY_BUCKET) * KEY_BUCKET, model.cfg.n_positions)
        self.decode_engine = DecodeEngine(model, max(p.batch_size for p in decode), slot_len, KEY_BUCKET) if decode else None
        self.prefill_engine = PrefillEngine(model, max(sum(p.lens) for p in prefill)) if prefill else None

    def decode(self, point: Point, prompts: list[torch.Tensor]) -> Measurement:
        cfg = self.model.cfg
        # [n_layer, 2, P, KVH, D]: every slot starts from the same random prompt KV
        kv = torch.randn(cfg.n_layer, 2, point.lens[0], cfg.kv_heads, cfg.head_dim, dtype=self.model.dtype,
                         device=self.model.device)
        self._decode(prompts, kv, 2)  # warm-up
        n = point.new_tokens
        return Measurement(lambda: self._decode(prompts, kv, n), lambda runs: median_ms(runs) / n)

    def _decode(self, prompts: list[torch.Tensor], kv: torch.Tensor, steps: int) -> float:
        """Admit every prompt (untimed), then time `steps` steps, on the last of which all finish."""
        for i, ids in enumerate(prompts):
            request = GenerateRequest(f"bench-{i}", tuple(ids.tolist()), steps + 1, ignore_eos=True)
            self.decode_engine.admit(request, kv, first_token=int(ids[-1]))
        elapsed = timed(lambda: self._steps(steps), self.model.device)
        if self.decode_engine.requests:
            raise RuntimeError("decode requests outlived their max_new_tokens")
        return elapsed

    def _steps(self, n: int) -> None:
        for _ in range(n):
            self.decode_engine.step()

    def prefill(self, point: Point, prompts: list[torch.Tensor]) -> Measurement:
        batch = [GenerateRequest(f"bench-{i}", tuple(ids.tolist()), 1, ignore_eos=True)
                 for i, ids in enumerate(prompts)]
        return timing(lambda: self.prefill_engine.run(batch), self.model.device)


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


def measure(points: list[Point], model: LoadedModel, runners: dict, repeats: Repeats) -> list[dict]:
    results = []
    bar = tqdm(points, desc="bench engine", unit="point", file=sys.stderr)
    for point in bar:
        bar.set_postfix_str(f"{point.phase} {point.label or point.curve} B={point.batch_size} P={point.prompt_len}")
        prompts = random_prompts(point.lens, model.cfg.vocab_size, model.device)
        tokens = sum(point.lens) if point.phase == "prefill" else point.batch_size
        jobs = {"floor": floor(model.weights, tokens, point.batch_size, model.device, point.new_tokens)}
        peaks = {}
        for system, runner in runners.items():
            # Each system's memory before the next runs at all: on the CPU the peak is the
            # process's RSS, which keeps what an earlier system's allocator held on to.
            reset_peak(model.device)
            jobs[system] = measurement(runner, point, prompts)
            jobs[system].sample()  # after the warm-up: one full run
            peaks[system] = peak_mb(model.device)
        got = interleaved(jobs, repeats)
        floor_time = got.pop("floor")
        # A decode time that comes out at or below zero is under that point's noise (transformers'
        # eager prefill of long prompts varies more than the steps after it take): no row, not a
        # negative one.
        results += [result_row(system, point, ms, floor_time, peaks[system]) for system, ms in got.items() if ms > 0]
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


