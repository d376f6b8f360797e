"""The device pass's benchmark measurements (bench/gpu/device_pass.py runs them): splitserve with
CUDA graphs, splitserve eager and transformers' `generate`, on random weights of a model's shape,
against the bounds of the card they run on, all measured in one process.

It reuses the engine benchmark's runners and row schema (splitserve.bench.engine_runs), and adds
to every row:
- `graphs`: whether the decode steps ran as CUDA graph replays (on the CPU: as their twin, the same
  padded steps run eagerly with capture=False); false for transformers and prefill;
- `bound_ms`: decode: (weight bytes + KV bytes attended in a step) / the bandwidth of a large
  device-to-device copy, counting bytes read and written, measured in this run; prefill: the
  forward's FLOPs (matrix products and causal attention) / the rate of a large matrix product
  measured in this run. `bound` says which.
The document also holds the measured `bandwidth_gb_s`, `matmul_tflop_s`, each decode engine's graph
capture time, and `targets`: what the stage judges (device_pass.py) with the measured values.

Points run in the order given (the targets' first). Each row is written to the JSON document as
soon as it is measured, and a point that would start after the deadline is listed under `skipped`
instead, so a run cut short still leaves its results.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from splitserve.bench.engine_bench import KEY_BUCKET
from splitserve.bench.engine_runs import (
    Point,
    Repeats,
    SplitserveRunner,
    TransformersRunner,
    alone,
    floor_ms,
    measurement,
    model_over,
    peak_mb,
    random_model as random_hf_model,
    random_prompts,
    reset_peak,
    result_row,
    timed,
)
from splitserve.common.loading import LoadedModel
from splitserve.common.model import ModelWeights
from splitserve.common.model_config import ModelConfig
from splitserve.common.tokenizer import TINY_TOKENIZER_PATH, Tokenizer
from splitserve.decode_worker.engine import DecodeEngine
from splitserve.decode_worker.step_runner import StepRunner

from gpu_plots import label  # a sibling script: run as one, its folder is on sys.path

ALL = ("graphs", "eager", "transformers")
OURS = ("graphs", "eager")


@dataclass(frozen=True)
class Job:
    point: Point
    systems: tuple[str, ...]


@dataclass
class Block:
    """Points that share one engine: decode points one KV pool sized for the largest of them."""

    name: str
    jobs: list[Job] = field(default_factory=list)


def decode(prompt: int, batch: int, new: int, systems: tuple[str, ...], curve: str = "batch") -> Job:
    return Job(Point("decode", curve, (prompt,) * batch, new), systems)


def prefill(n: int, systems: tuple[str, ...] = ("eager", "transformers")) -> Job:
    return Job(Point("prefill", "prompt_len", (n,), 1), systems)


# --- the card's limits ------------------------------------------------------------------------

def copy_bandwidth(device: torch.device, nbytes: int, repeats: Repeats) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(repeats.take(lambda: timed(lambda: dst.copy_(src), device)))
    return 2 * nbytes / seconds / 1e9


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: Repeats) -> float:
    """TFLOP/s of an n x n x n matrix product on random data."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    seconds = statistics.median(repeats.take(lambda: timed(lambda: a @ b, device)))
    return 2 * n**3 / seconds / 1e12


def weight_bytes(w: ModelWeights) -> int:
    """Bytes a decode step reads of the weights: every layer, the final norm and the LM head (the
    embedding tables only at B rows, which the bound leaves out). Latent attention's kv_up_wt is
    prefill's view of what k_up and v_up hold: counted once, as them."""
    tensors = [t for layer in w.layers for t in layer._replace(kv_up_wt=None)] + [w.normf_w, w.normf_b, w.lm_head_t]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.n_layer * 2 * cfg.kv_dim * torch.finfo(dtype).bits // 8


def prefill_flops(cfg: ModelConfig, lens: tuple[int, ...]) -> float:
    """Matrix products on every token, the LM head on one per prompt, causal attention."""
    e, i, q, kv = cfg.n_embd, cfg.n_inner, cfg.q_dim, cfg.kv_dim
    mlp = (3 if cfg.mlp == "gated" else 2) * e * i
    per_token = cfg.n_layer * (e * (q + 2 * kv) + q * e + mlp)
    attention = sum(cfg.n_layer * 2 * 2 * q * n * (n + 1) / 2 for n in lens)  # q @ kᵀ, p @ v
    return 2 * per_token * sum(lens) + 2 * len(lens) * e * cfg.vocab_size + attention


@dataclass(frozen=True)
class Limits:
    bandwidth_gb_s: float
    matmul_tflop_s: float
    weight_bytes: int
    kv_bytes_per_token: int

    def bound_ms(self, cfg: ModelConfig, point: Point) -> tuple[float, str]:
        if point.phase == "decode":
            read = self.weight_bytes + point.batch_size * point.key_len * self.kv_bytes_per_token
            return 1e3 * read / (self.bandwidth_gb_s * 1e9), "bandwidth"
        return 1e3 * prefill_flops(cfg, point.lens) / (self.matmul_tflop_s * 1e12), "flops"


def measure_limits(model: LoadedModel, copy_bytes: int, matmul_n: int, repeats: Repeats) -> Limits:
    device, dtype = model.device, model.dtype
    limits = Limits(copy_bandwidth(device, copy_bytes, repeats), matmul_rate(device, dtype, matmul_n, repeats),
                    weight_bytes(model.weights), kv_bytes_per_token(model.cfg, dtype))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the copy's buffers, before the engines allocate
    return limits


# --- the model -------------------------------------------------------------------------------

def random_model(fields: dict, name: str, device: torch.device, dtype: torch.dtype):
    """transformers' model of a shape (config.json fields) with random weights, and splitserve's
    `LoadedModel` over the very same tensors (as the engine benchmark makes them)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = random_hf_model(fields, device, dtype).eval()
    # Only shapes matter to the timings: random token ids, the tiny tokenizer standing in.
    return hf, model_over(hf, Path(f"{name}-shape"), Tokenizer.from_file(TINY_TOKENIZER_PATH), device, dtype)


# --- runners -----------------------------------------------------------------------------------

class GraphRunner(SplitserveRunner):
    """engine_bench's splitserve runner, whose decode engine captures CUDA graphs (on the CPU it
    runs their twin: the same padded steps at the same buckets, eagerly); `graphs(False)` runs the
    same engine (and KV pool) eagerly, on exact shapes."""

    def __init__(self, model: LoadedModel, points: list[Point], key_step: int):
        super().__init__(model, [p for p in points if p.phase == "prefill"])
        decode_points = [p for p in points if p.phase == "decode"]
        self.capture_s, self.capture_error = 0.0, ""
        if not decode_points:
            return
        longest = max(p.positions for p in decode_points)
        slot_len = min(-(-longest // KEY_BUCKET) * KEY_BUCKET, model.cfg.n_positions)
        cuda = model.device.type == "cuda"
        slots = max(p.batch_size for p in decode_points)
        start = time.perf_counter()
        try:
            d = DecodeEngine(model, slots, slot_len, KEY_BUCKET, graphs=cuda, graph_key_step=key_step)
        except Exception as e:  # the eager numbers are worth having all the same
            if not cuda:
                raise
            self.capture_error = f"{type(e).__name__}: {e}"
            d = DecodeEngine(model, slots, slot_len, KEY_BUCKET)
        self.capture_s = time.perf_counter() - start
        self.decode_engine = d
        if self.capture_error:
            self.graphed = None
        else:
            self.graphed = d.runner if cuda else StepRunner.graphs(model.weights, d.kv.layers, d.tokens, d.positions,
                                                                    key_step, capture=False, slot_len=d.slot_len)
        self.eager = d.make_runner(None)

    def graphs(self, on: bool) -> None:
        self.decode_engine.runner = self.graphed if on else self.eager

    def reset(self) -> None:
        """After a failed measurement: every slot free again for the next."""
        if self.decode_engine is not None:
            for slot in list(self.decode_engine.requests):
                self.decode_engine.release(slot)


def measure_block(block: Block, model: LoadedModel, hf, limits: Limits, repeats: Repeats, key_step: int,
                  deadline: float, sink: Sink) -> None:
    """Every job's systems, in order; `deadline` (time.monotonic()) is the last moment to start one."""
    if time.monotonic() > deadline:  # not even the engine: capturing graphs takes seconds
        for job in block.jobs:
            for system in job.systems:
                sink.skip(system, job.point)
        return
    points = [j.point for j in block.jobs]
    ours = GraphRunner(model, points, key_step)
    if ours.decode_engine is not None:
        sink.engine(block.name, ours)
    if ours.prefill_engine is not None:
        sink.doc["prefill_attention"] = ours.prefill_engine.attn_name
    theirs = TransformersRunner(hf, (model.cfg.eos_token_ids or (0,))[0], model.device)
    floors: dict[tuple[int, int], float] = {}
    for job in block.jobs:
        point = job.point
        prompts = random_prompts(point.lens, model.cfg.vocab_size, model.device)
        shape = (sum(point.lens) if point.phase == "prefill" else point.batch_size, point.batch_size)
        for system in job.systems:
            if time.monotonic() > deadline:
                sink.skip(system, point)
                continue
            if system == "graphs" and ours.graphed is None:
                sink.skip(system, point, "capture failed")
                continue
            try:  # one failure costs its own row, not the rest of the run
                if shape not in floors:
                    floors[shape] = floor_ms(model.weights, *shape, repeats, model.device)
                ms = run_one(system, point, prompts, ours, theirs, repeats)
            except Exception as e:
                sink.fail(system, point, f"{type(e).__name__}: {e}")
                ours.reset()
                continue
            bound, kind = limits.bound_ms(model.cfg, point)
            row = result_row("transformers" if system == "transformers" else "splitserve", point, ms, floors[shape],
                             peak_mb(model.device))
            sink.row(dict(row, graphs=system == "graphs" and point.phase == "decode", bound_ms=round(bound, 4),
                          bound=kind))
    del ours  # its KV pool and graphs, before the next block's
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def run_one(system: str, point: Point, prompts: list[torch.Tensor], ours: GraphRunner,
            theirs: TransformersRunner, repeats: Repeats) -> float:
    """One system alone: on a dedicated GPU there are no neighbours' spells to interleave against."""
    reset_peak(prompts[0].device)
    if system != "transformers" and point.phase == "decode":
        ours.graphs(system == "graphs")
    return alone(measurement(theirs if system == "transformers" else ours, point, prompts), repeats)


# --- results ---------------------------------------------------------------------------------

class Sink:
    """The JSON document, rewritten after every row with `targets(rows)` recomputed; `on_row` sees
    each row, and each point skipped or failed (with its `status`), as it comes (device_pass.py's
    JSON lines)."""

    def __init__(self, doc: dict, path: Path, targets: Callable[[list[dict]], list[dict]],
                 on_row: Callable[[dict], None] = lambda row: None):
        self.doc, self.path, self.targets, self.on_row = doc, path, targets, on_row
        doc.update(results=[], skipped=[], failed=[], engines=[], targets=targets([]))
        self.save()

    def row(self, row: dict) -> None:
        self.doc["results"].append(row)
        print(f"{row['phase']:8}{row['curve']:10}{label(row):>13} B={row['batch_size']:<4} keys/prompt="
              f"{row['key_len'] if row['phase'] == 'decode' else row['prompt_len']:<5} {row['ms']:9.3f} ms  "
              f"bound {row['bound_ms']:8.3f} ms ({row['ms'] / row['bound_ms']:.2f}x)", flush=True)
        self.on_row(row)
        self.save()

    def skip(self, system: str, point: Point, reason: str = "deadline") -> None:
        self._left_out("skipped", system, point, reason)

    def fail(self, system: str, point: Point, error: str) -> None:
        print(f"{point.phase} B={point.batch_size} {system} failed: {error}", flush=True)
        self._left_out("failed", system, point, error)

    def _left_out(self, key: str, system: str, point: Point, reason: str) -> None:
        entry = dict(system=system, phase=point.phase, curve=point.curve, batch_size=point.batch_size,
                     prompt_len=point.prompt_len, reason=reason[:600])
        self.doc[key].append(entry)
        self.on_row(dict(entry, status=key))
        self.save()

    def engine(self, block: str, runner: GraphRunner) -> None:
        d = runner.decode_engine
        graphs = len(runner.graphed.shapes) if runner.graphed is not None and runner.graphed.captured else 0
        self.doc["engines"].append(dict(block=block, num_slots=d.num_slots, slot_len=d.slot_len, graphs=graphs,
                                        capture_s=round(runner.capture_s, 2), capture_error=runner.capture_error))
        print(f"{block}: {d.num_slots} slots of {d.slot_len}, {graphs} graphs captured in {runner.capture_s:.1f} s"
              f"{'; capture failed: ' + runner.capture_error if runner.capture_error else ''}", flush=True)
        self.save()

    def save(self) -> None:
        self.doc["targets"] = self.targets(self.doc["results"])
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        tmp.replace(self.path)  # a run killed mid-write leaves the previous document whole


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((k for k in ("h200", "h100", "a100", "l40s", "l4") if k in name), name.split()[-1])
