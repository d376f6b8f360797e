"""The GPU benchmark: splitserve with CUDA graphs, splitserve eager and transformers'
`generate`, on random bf16 weights of SantaCoder's or StarCoder's shape, against the bounds of
the card they run on, all measured in one process.

    python bench/gpu/gpu_bench.py --shape santacoder --out-dir DIR [--deadline S] [--quick]

It reuses the engine benchmark's runners and row schema (splitserve.bench.engine_bench), and adds
to every row:
- `graphs`: whether the decode steps ran as CUDA graph replays (false for transformers, prefill);
- `bound_ms`: decode: (weight bytes + KV bytes attended in a step) / the bandwidth of a large
  device-to-device copy, counting bytes read and written, measured in this run; prefill: the
  forward's FLOPs (matrix products and causal attention) / the rate of a large bf16 matrix
  product measured in this run. `bound` says which.
The document also holds the measured `bandwidth_gb_s`, `matmul_tflop_s`, each decode engine's graph
capture time, and `targets`: the GPU targets (`targets()` below) with the measured values.

Points run in order of importance (the targets' first). Each one is written to the JSON as soon as
it is measured, and a point that would start after --deadline seconds is listed under `skipped`
instead, so a run cut short by the device's command limit still leaves its results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitserve.bench.engine_bench import KEY_BUCKET
from splitserve.bench.engine_bench import SHAPES as ENGINE_SHAPES
from splitserve.bench.engine_runs import (
    Point,
    Repeats,
    SplitserveRunner,
    TransformersRunner,
    alone,
    floor_ms,
    measurement,
    peak_mb,
    random_prompts,
    reset_peak,
    random_model as random_hf_model,
    model_over,
    result_row,
    timed,
)
from splitserve.common.builtin_models import TINY_HF_CONFIG
from splitserve.common.loading import LoadedModel
from splitserve.common.model import ModelWeights
from splitserve.common.model_config import ModelConfig
from splitserve.common.runtime import DTYPE_NAMES, DTYPES
from splitserve.common.tokenizer import TINY_TOKENIZER_PATH, Tokenizer
from splitserve.decode_worker.engine import DecodeEngine

from gpu_plots import label, plot_gpu  # a sibling script: run as one, its folder is on sys.path

STARCODER = dict(
    model_type="gpt_bigcode", vocab_size=49152, n_positions=8192, n_embd=6144, n_layer=40, n_head=48,
    n_inner=24576, multi_query=True, activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
)
TINY = {k: v for k, v in TINY_HF_CONFIG.items() if k not in ("architectures", "torch_dtype")}
SHAPES = {"santacoder": ENGINE_SHAPES["santacoder"], "starcoder": STARCODER, "tiny": TINY}

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


# --- the grids ------------------------------------------------------------------------------

def decode(prompt: int, batch: int, new: int, curve: str, systems: tuple[str, ...]) -> Job:
    return Job(Point("decode", curve, (prompt,) * batch, new), systems)


def prefill(n: int, systems: tuple[str, ...] = ("eager", "transformers")) -> Job:
    return Job(Point("prefill", "prompt_len", (n,), 1), systems)


def plan(shape: str, quick: bool) -> list[Block]:
    """Blocks in order of importance. `key_len` = prompt + new // 2, the mean keys a step attends."""
    if quick:
        return [Block("decode", [decode(496, b, 16, "batch", ALL) for b in (1, 4)]),
                Block("prefill", [prefill(n) for n in (128, 512)])]
    if shape == "starcoder":
        # 31 GB of weights: 256 slots only at 1k keys; the long keys with up to 16 rows.
        n = 16
        batch = [decode(1024 - n // 2, 2**i, n, "batch", ALL if i in (0, 3) else OURS) for i in range(9)]
        keys = [decode(k - n // 2, b, n, "key_len", ALL if b == 1 else OURS)
                for b in (1, 16) for k in (512, 1024, 2048, 4096, 8000)]
        prefills = [prefill(p) for p in (1024, 128, 512, 2048, 4096, 8192)]
        return [Block("decode 1k keys", batch), Block("prefill", prefills), Block("decode long keys", keys)]
    n = 32  # santacoder (and tiny, for a dry run on the CPU)
    batch = [decode(1024 - n // 2, 2**i, n, "batch", ALL) for i in range(9)]
    keys = [decode(k - n // 2, b, n, "key_len", ALL if b == 1 else OURS)
            for b in (1, 64, 256) for k in (512, 1024, 2000)]
    return [Block("decode", batch + keys), Block("prefill", [prefill(p) for p in (1024, 128, 256, 512, 2048)])]


# --- the card's limits ------------------------------------------------------------------------

def copy_bandwidth(device: torch.device, nbytes: int, repeats: Repeats) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
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
    embedding tables only at B rows, which the bound leaves out)."""
    tensors = [t for layer in w.layers for t in layer] + [w.normf_w, w.normf_b, w.lm_head_t]
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


# --- the model -------------------------------------------------------------------------------

def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """transformers' model of the shape with random weights, and splitserve's `LoadedModel` over
    the very same tensors (as the engine benchmark makes them)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = random_hf_model(SHAPES[shape], device, dtype).eval()
    # Only shapes matter to the timings: random token ids, the tiny tokenizer standing in.
    return hf, model_over(hf, Path(f"{shape}-shape"), Tokenizer.from_file(TINY_TOKENIZER_PATH), device, dtype)


# --- runners -----------------------------------------------------------------------------------

class GraphRunner(SplitserveRunner):
    """engine_bench's splitserve runner, whose decode engine captures CUDA graphs; `graphs(False)`
    runs the same engine (and KV pool) eagerly, on exact shapes."""

    def __init__(self, model: LoadedModel, points: list[Point], key_step: int):
        super().__init__(model, [p for p in points if p.phase == "prefill"])
        decode_points = [p for p in points if p.phase == "decode"]
        self.capture_s = 0.0
        if not decode_points:
            return
        longest = max(p.positions for p in decode_points)
        slot_len = min(-(-longest // KEY_BUCKET) * KEY_BUCKET, model.cfg.n_positions)
        cuda = model.device.type == "cuda"
        start = time.perf_counter()
        self.decode_engine = DecodeEngine(model, max(p.batch_size for p in decode_points), slot_len, KEY_BUCKET,
                                          graphs=cuda, graph_key_step=key_step)
        self.capture_s = time.perf_counter() - start
        self._graphed, self._eager = self.decode_engine.runner, self.decode_engine.make_runner(None)

    def graphs(self, on: bool) -> None:
        self.decode_engine.runner = self._graphed if on else self._eager


def measure_block(block: Block, model: LoadedModel, hf, limits: Limits, repeats: Repeats, args, deadline: float,
                  sink: Sink) -> None:
    if time.monotonic() > deadline:  # not even the engine: capturing graphs takes seconds
        for job in block.jobs:
            for system in job.systems:
                sink.skip(system, job.point)
        return
    points = [j.point for j in block.jobs]
    cuda = model.device.type == "cuda"
    ours = GraphRunner(model, points, args.graph_key_step)
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
            if system == "graphs" and not cuda or system == "transformers" and args.no_transformers:
                continue
            if time.monotonic() > deadline:
                sink.skip(system, point)
                continue
            if shape not in floors:
                floors[shape] = floor_ms(model.weights, *shape, repeats, model.device)
            ms = run_one(system, point, prompts, ours, theirs, repeats)
            bound, kind = limits.bound_ms(model.cfg, point)
            row = result_row("transformers" if system == "transformers" else "splitserve", point, ms, floors[shape],
                             peak_mb(model.device))
            sink.row(dict(row, graphs=system == "graphs" and point.phase == "decode", bound_ms=round(bound, 4),
                          bound=kind))
    del ours  # its KV pool and graphs, before the next block's
    if cuda:
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
    """The JSON document, rewritten after every row."""

    def __init__(self, doc: dict, path: Path):
        self.doc, self.path = doc, path
        doc.update(results=[], skipped=[], engines=[])
        self.save()

    def row(self, row: dict) -> None:
        self.doc["results"].append(row)
        print(f"{row['phase']:8}{row['curve']:10}{label(row):>13} B={row['batch_size']:<4} keys/prompt="
              f"{row['key_len'] if row['phase'] == 'decode' else row['prompt_len']:<5} {row['ms']:9.3f} ms  "
              f"bound {row['bound_ms']:8.3f} ms ({row['ms'] / row['bound_ms']:.2f}x)", flush=True)
        self.save()

    def skip(self, system: str, point: Point) -> None:
        self.doc["skipped"].append(dict(system=system, phase=point.phase, curve=point.curve,
                                        batch_size=point.batch_size, prompt_len=point.prompt_len))
        self.save()

    def engine(self, block: str, runner: GraphRunner) -> None:
        d = runner.decode_engine
        graphs = len(d.runner.shapes) if d.runner.captured else 0
        self.doc["engines"].append(dict(block=block, num_slots=d.num_slots, slot_len=d.slot_len, graphs=graphs,
                                        capture_s=round(runner.capture_s, 2)))
        print(f"{block}: {d.num_slots} slots of {d.slot_len}, {graphs} graphs captured in {runner.capture_s:.1f} s",
              flush=True)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.doc, indent=1) + "\n")


def find(results: list[dict], **match) -> dict | None:
    return next((r for r in results if all(r.get(k) == v for k, v in match.items())), None)


def targets(shape: str, results: list[dict]) -> list[dict]:
    """The GPU targets (H100; the same ratios on H200) with what this run measured."""
    def decode_row(b: int, system: str, graphs: bool):
        return find(results, phase="decode", curve="batch", batch_size=b, system=system, graphs=graphs)

    def target(name: str, value, limit: float, higher_is_better: bool = False) -> dict:
        ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
        return dict(target=name, value=None if value is None else round(value, 4), limit=limit, ok=ok)

    def ratio(row: dict | None):
        return row["ms"] / row["bound_ms"] if row else None

    g1 = decode_row(1, "splitserve", True)
    if shape == "starcoder":
        return [target("decode B=1 1k keys, graphs / bound", ratio(g1), 1.15)]
    if shape != "santacoder":
        return []
    tf1, g256 = decode_row(1, "transformers", False), decode_row(256, "splitserve", True)
    p1024 = find(results, phase="prefill", prompt_len=1024, system="splitserve")
    return [
        target("decode B=1 1k keys, graphs / bound", ratio(g1), 1.3),
        target("decode B=1 1k keys, transformers / graphs", tf1["ms"] / g1["ms"] if tf1 and g1 else None, 5.0, True),
        target("decode B=256 1k keys, graphs ms", g256["ms"] if g256 else None, 3.0),
        target("prefill 1024 tokens / FLOP bound", ratio(p1024), 2.0),
    ]


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((k for k in ("h200", "h100", "a100", "l40s", "l4") if k in name), name.split()[-1])


# --- command line ------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="santacoder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--deadline", type=float, default=480.0, help="start no measurement after this many seconds")
    p.add_argument("--quick", action="store_true", help="two decode and two prefill points, few repeats")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement at least")
    p.add_argument("--min-seconds", type=float, default=0.5, help="more runs until a measurement took this long")
    p.add_argument("--graph-key-step", type=int, default=256, help="key buckets of the graphs: multiples of this")
    p.add_argument("--copy-mib", type=int, default=4096, help="size of the bandwidth-measuring copy")
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the rate-measuring matrix product")
    p.add_argument("--no-transformers", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    deadline = time.monotonic() + args.deadline
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    repeats = Repeats(1 if args.quick else args.repeats, 0.0 if args.quick else args.min_seconds)
    hf, model = random_model(args.shape, device, dtype)
    limits = Limits(copy_bandwidth(device, args.copy_mib * 2**20, repeats),
                    matmul_rate(device, dtype, args.matmul_n, repeats), weight_bytes(model.weights),
                    kv_bytes_per_token(model.cfg, dtype))
    slug = device_slug(device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{slug}-{args.shape}{'-quick' if args.quick else ''}"
    doc = dict(device=f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu",
               model=f"{args.shape}-shape (random weights)", dtype=DTYPE_NAMES[dtype], threads=torch.get_num_threads(),
               torch=torch.__version__, prefill_attention=None, bandwidth_gb_s=round(limits.bandwidth_gb_s, 1),
               matmul_tflop_s=round(limits.matmul_tflop_s, 1), weight_bytes=limits.weight_bytes,
               graph_key_step=args.graph_key_step)
    print(f"{doc['device']}, torch {torch.__version__}: copy {limits.bandwidth_gb_s:.0f} GB/s, "
          f"matmul {limits.matmul_tflop_s:.0f} TFLOP/s, weights {limits.weight_bytes / 2**30:.2f} GiB", flush=True)
    sink = Sink(doc, args.out_dir / f"{stem}.json")
    with torch.inference_mode():
        for block in plan(args.shape, args.quick):
            measure_block(block, model, hf, limits, repeats, args, deadline, sink)
    doc["targets"] = targets(args.shape, doc["results"])
    sink.save()
    for t in doc["targets"]:
        print(f"target {t['target']}: {t['value']} (limit {t['limit']}) {'ok' if t['ok'] else 'MISSED'}")
    print(f"json: {sink.path}\nplot: {plot_gpu(doc, args.out_dir / f'{stem}.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
