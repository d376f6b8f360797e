"""The device pass: one command that checks and times splitserve's GPU paths on a freshly lent
machine in under 5 minutes (docs/gpu.md). Run it through the wrapper, which installs what the
machine lacks first:

    bash bench/gpu/device_pass.sh [--stages setup,correctness,santacoder,qwen7b] [flags below]

Stages, in this order, each in a process of its own under a time limit, so that one that overruns
or breaks the CUDA context costs only itself:

- setup: the environment (versions, the GPU, the prefill kernels' signatures) and the imports
  every later stage needs, as records;
- correctness: the CUDA checks in tests/ (graph capture and replay against the eager twin and, in
  fp32, the exact path; one host sync per graphed step; the prefill kernels against SDPA on packed
  bf16 batches, multi-query and grouped-query, with and without a window; the two-process KV
  handoff of a 1,024-token region) and their CPU twins, one record per test with its numbers;
- santacoder: SantaCoder's shape, bf16, random weights: decode at batch 1, 8, 64 and 256 with
  1,024 keys, CUDA graphs and eager, transformers at batch 1 and 8; prefill of 1,024 tokens (and
  512, 2,048); the copy bandwidth and matmul rate of the card, measured in the same process;
  issue 19's targets;
- qwen7b: Qwen2.5-Coder-7B's shape at batch 1 and 16 with graphs (then eager), against the bound,
  when enough of the budget is left.

Everything lands in --out-dir as it happens: device-pass.jsonl (one JSON record per item: the
stage, the item, its status and numbers), gpu-<card>-<shape>.json (each benchmark, rewritten
after every row, targets included) and its plot, summary.json; the wrapper adds the output as
device-pass.log. A stage killed at its limit leaves every record it wrote. The summary, printed
last, says which stages to rerun.

`--device cpu --tiny` runs every stage on the tiny shapes (tests/test_device_pass.py): checks that
need CUDA report skipped, and the graphs run as their CPU twin (the same padded steps, eagerly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("setup", "correctness", "santacoder", "qwen7b")
# Each stage's time limit (seconds) and the least it is started with, out of --budget.
LIMIT_S = {"setup": 45, "correctness": 120, "santacoder": 150, "qwen7b": 120}
LEAST_S = {"setup": 10, "correctness": 30, "santacoder": 60, "qwen7b": 45}
END_S = 10  # of the budget, kept for the plots and the summary
GRACE_S = 20  # a benchmark stage starts no point in its last GRACE_S seconds
JSONL, SUMMARY = "device-pass.jsonl", "summary.json"

# What the correctness stage runs (pytest node ids), most telling first. The tests skip what needs
# CUDA on the CPU, where the twins run: the padded steps eagerly, the handoff over shm.
CORRECTNESS = (
    "tests/test_cuda_graphs.py::test_every_shape_is_captured_largest_first_in_one_pool",
    "tests/test_cuda_graphs.py::test_graph_replay_gives_the_eager_tokens",
    "tests/test_cuda_graphs.py::test_graphs_give_the_exact_paths_tokens_in_fp32",
    "tests/test_cuda_graphs.py::test_a_decode_step_syncs_with_the_host_once",
    "tests/test_cuda_graphs.py::test_padded_logits_equal_the_exact_ones",
    "tests/test_cuda_graphs.py::test_padded_static_step_gives_the_exact_steps_tokens",
    "tests/test_cuda.py",
    "tests/test_kv_transport.py::test_cuda_ipc_handoff_between_processes",
    "tests/test_kv_release.py",
    "tests/test_cuda_quantized.py",
)
# Imported by the stages (tests included) beyond PyTorch and transformers: the setup stage names
# any missing, before a later stage fails on it.
IMPORTS = ("msgspec", "zmq", "matplotlib", "pytest", "splitserve.engine", "splitserve.bench.engine_runs",
           "splitserve.common.kv_transport")


class Log:
    """device-pass.jsonl: one record per line, appended and flushed as it comes, so a process
    killed at any moment leaves every record before it."""

    def __init__(self, path: Path, t0: float):
        self.path, self.t0 = path, t0

    def record(self, stage: str, item: str, status: str, **numbers) -> dict:
        rec = dict(t=round(time.time() - self.t0, 2), stage=stage, item=item, status=status, **numbers)
        with self.path.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        return rec

    def read(self) -> list[dict]:
        records = []
        for line in self.path.read_text().splitlines() if self.path.exists() else ():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short: the summary goes on without it
                pass
        return records


# --- the parent: stages under their limits, then the summary ----------------------------------

def orchestrate(args: argparse.Namespace) -> int:
    t0 = float(os.environ.get("DEVICE_PASS_T0") or time.time())  # the wrapper's start: setup counts
    os.environ["DEVICE_PASS_T0"] = str(t0)  # the stages' records count from it too
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(args.out_dir / JSONL, t0)
    first = len(log.read())  # records of an earlier pass into the same folder are not this one's
    for stage in args.stages:
        left = t0 + args.budget - END_S - time.time()
        limit = min(args.limit.get(stage, LIMIT_S[stage]), left)
        if limit < min(LEAST_S[stage], args.limit.get(stage, LEAST_S[stage])):
            log.record(stage, "stage", "skipped", reason=f"{max(left, 0):.0f} s of the budget left")
            continue
        print(f"=== {stage}: at most {limit:.0f} s", flush=True)
        start = time.time()
        rc = run_stage(stage, limit, args)
        status = "killed" if rc is None else "ok" if rc == 0 else "failed"
        log.record(stage, "stage", status, rc=rc, seconds=round(time.time() - start, 1), limit_s=round(limit))
    records = log.read()[first:]
    plots(args.out_dir, records)
    summary = summarize(records, args.out_dir, args.device)
    (args.out_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary), flush=True)
    return 0 if summary["clean"] else 1


def run_stage(stage: str, limit: float, args: argparse.Namespace) -> int | None:
    """The stage's own process, killed (with what it started) at `limit` seconds: -> its exit
    status, or None when killed."""
    from splitserve.common.child_process import die_with_parent

    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", stage, "--device", args.device,
           "--out-dir", str(args.out_dir), "--threads", str(args.threads), "--graph-key-step", str(args.graph_key_step),
           "--deadline", str(max(limit - GRACE_S, limit / 2))] + (["--tiny"] if args.tiny else [])
    arm = die_with_parent(9)

    def own_group_dying_with_parent() -> None:
        # Its own process group, so the kill reaches the processes it starts (the handoff's child);
        # dying with this process, so none outlives a pass killed from outside.
        os.setpgid(0, 0)  # Popen(process_group=0) from Python 3.11 only
        arm()

    child = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=own_group_dying_with_parent)
    try:
        return child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"=== {stage}: killed at its limit of {limit:.0f} s", flush=True)
        try:
            os.killpg(child.pid, 9)
        except ProcessLookupError:  # it ended in between
            pass
        child.wait()
        return None


def plots(out_dir: Path, records: list[dict]) -> None:
    """A plot of each benchmark document this pass wrote, also of a stage killed midway."""
    docs = {r["doc"] for r in records if r["item"] == "document"}
    if not docs:
        return
    from gpu_plots import plot_gpu

    for name in sorted(docs):
        try:
            doc = json.loads((out_dir / name).read_text())
            print(f"plot: {plot_gpu(doc, (out_dir / name).with_suffix('.png'))}", flush=True)
        except Exception as e:  # a plot is worth less than the summary after it
            print(f"plot of {name} failed: {e!r}", flush=True)


def summarize(records: list[dict], out_dir: Path, device_flag: str) -> dict:
    stages = {r["stage"]: r for r in records if r["item"] == "stage"}
    env = next((r for r in records if r["item"] == "env"), {})
    tests = [r for r in records if r["stage"] == "correctness" and r["item"].startswith("tests/")]
    counts = {s: sum(r["status"] == s for r in tests) for s in ("passed", "failed", "error", "skipped")}
    failed = [dict(stage=r["stage"], item=r["item"], reason=r.get("reason", ""))
              for r in records if r["status"] in ("failed", "error") and r["item"] != "stage"]
    targets, rows, docs = [], {}, []
    for r in records:
        if r["item"] == "document":
            try:
                doc = json.loads((out_dir / r["doc"]).read_text())
            except (OSError, ValueError) as e:
                failed.append(dict(stage=r["stage"], item=r["doc"], reason=repr(e)))
                continue
            docs.append(doc)
            targets += [dict(t, stage=r["stage"]) for t in doc.get("targets", [])]
            rows[r["stage"]] = dict(measured=len(doc["results"]), skipped=len(doc["skipped"]),
                                    failed=len(doc.get("failed", ())))
    rerun = [s for s, r in stages.items() if s != "setup" and (r["status"] != "ok" or any(f["stage"] == s for f in failed))]
    device = env.get("device_name") or env.get("device") or next((d["device"] for d in docs), device_flag)
    return dict(
        device=device, torch=env.get("torch") or next((d["torch"] for d in docs), None),
        seconds=max((r["t"] for r in records), default=0),
        stages={s: dict(status=r["status"], seconds=r.get("seconds"), reason=r.get("reason")) for s, r in stages.items()},
        correctness=counts, rows=rows, failed=failed,
        targets=targets, rerun=["setup", *rerun] if rerun else [],
        clean=all(r["status"] == "ok" for r in stages.values()) and not failed,
    )


def format_summary(s: dict) -> str:
    torch = f", torch {s['torch']}" if s["torch"] else ""
    lines = [f"== device pass: {s['device']}{torch}, {s['seconds']:.0f} s =="]
    for stage, st in s["stages"].items():
        extra = ""
        if stage == "correctness" and st["status"] != "skipped":
            extra = ", ".join(f"{n} {k}" for k, n in s["correctness"].items())
        elif stage in s["rows"]:
            extra = ", ".join(f"{n} {k}" for k, n in s["rows"][stage].items())
        seconds = f"{st['seconds']:6.1f} s" if st["seconds"] is not None else st.get("reason") or ""
        lines.append(f"  {stage:12} {st['status']:8} {seconds}  {extra}".rstrip())
    for f in s["failed"]:
        lines.append(f"  FAILED {f['item']}: {f['reason'][:300]}")
    if s["targets"]:
        lines.append("targets:")
    for t in s["targets"]:
        verdict = "not measured" if t["value"] is None else "info" if t["ok"] is None else "met" if t["ok"] else "MISSED"
        limit = "" if t["limit"] is None else f" ({'>=' if t['higher_is_better'] else '<='} {t['limit']})"
        lines.append(f"  {verdict:12} {t['stage']:11} {t['target']}: {t['value']}{limit}")
    if s["rerun"]:
        lines.append(f"rerun: bash bench/gpu/device_pass.sh --stages {','.join(s['rerun'])}")
    return "\n".join(lines)


# --- the stages, each in its own process ----------------------------------------------------

def stage_setup(args: argparse.Namespace, log: Log) -> int:
    import importlib
    import importlib.metadata
    import inspect
    import platform
    import shutil

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device(args.device)
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=cuda, device=str(device), threads=torch.get_num_threads())
    if device.type == "cuda":
        if not cuda:
            log.record("setup", "env", "failed", reason="--device cuda, but CUDA is not available", **info)
            return 1
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    try:
        from torch.nn.attention.varlen import varlen_attn

        info["varlen_attn"] = str(inspect.signature(varlen_attn))
    except ImportError as e:
        info["varlen_attn"] = f"missing: {e}"
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    info["flash_attention_forward"] = str(op.default._schema) if op is not None else None
    from splitserve.common.attention import choose_prefill_attention

    info["prefill_attention"] = choose_prefill_attention(device, head_dim=128)[0]  # what most families' heads get
    for name in ("transformers", "flash-attn", "triton", "numpy", "msgspec", "pyzmq", "matplotlib", "pytest"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    log.record("setup", "env", "ok", **info)
    print(json.dumps(info, indent=1), flush=True)
    missing = []
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name}: {e}")
    log.record("setup", "imports", "failed" if missing else "passed", reason="; ".join(missing), modules=list(IMPORTS))
    return 1 if missing else 0


class Recorder:
    """A pytest plugin: one record per test as it finishes, its `record_property` numbers with it."""

    def __init__(self, log: Log):
        self.log = log

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "call" and report.passed:
            return
        if report.skipped:
            status, reason = "skipped", report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        elif report.failed:
            status = "failed" if report.when == "call" else "error"
            errors = [line[1:].strip() for line in report.longreprtext.splitlines() if line.startswith("E ")]
            reason = " | ".join(errors)[:600] or report.longreprtext[-600:]
        else:
            status, reason = "passed", ""
        self.log.record("correctness", report.nodeid, status, seconds=round(report.duration, 3), phase=report.when,
                        reason=reason.removeprefix("Skipped: "), **dict(report.user_properties))

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.log.record("correctness", report.nodeid or "collection", "error", reason=report.longreprtext[-600:])


def stage_correctness(args: argparse.Namespace, log: Log) -> int:
    import tempfile

    import pytest

    # Numbers reach the records through record_property; -rs lists the skip reasons in the log. A
    # base folder of its own, so that a pass run from inside a test session leaves that one's alone.
    basetemp = tempfile.mkdtemp(prefix="device-pass-pytest-")
    return int(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", "-o", "timeout=90", f"--basetemp={basetemp}",
                            *CORRECTNESS], plugins=[Recorder(log)]))


@dataclass(frozen=True)
class Bench:
    shape: str  # engine_bench's SHAPES, or "tiny"
    tiny: str  # the shape under --tiny
    blocks: Callable  # (tiny: bool) -> [Block]
    targets: Callable  # (rows) -> [target]


def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def target(name: str, value: float | None, limit: float | None = None, higher_is_better: bool = False) -> dict:
    """limit None: a number to read, judged by nobody."""
    ok = None if value is None or limit is None else value >= limit if higher_is_better else value <= limit
    return dict(target=name, value=None if value is None else round(value, 4), limit=limit,
                higher_is_better=higher_is_better, ok=ok)


def decode_row(rows: list[dict], batch: int, system: str, graphs: bool = False) -> dict | None:
    return find(rows, phase="decode", batch_size=batch, system=system, graphs=graphs)


def to_bound(row: dict | None) -> float | None:
    return row["ms"] / row["bound_ms"] if row else None


def ratio(slow: dict | None, fast: dict | None) -> float | None:
    return slow["ms"] / fast["ms"] if slow and fast else None


def santacoder_blocks(tiny: bool) -> list:
    from gpu_bench import ALL, OURS, Block, decode, prefill

    # prompt + new // 2 = the mean keys a step attends: 1,024
    prompt, new, lens = (120, 8, (128, 64)) if tiny else (1024 - 16, 32, (1024, 512, 2048))
    jobs = [decode(prompt, b, new, ALL if b in (1, 8) else OURS) for b in (1, 256, 8, 64)]
    return [Block("decode", jobs), Block("prefill", [prefill(n) for n in lens])]


def santacoder_targets(rows: list[dict]) -> list[dict]:
    """Issue 19's, for the H100 (the same ratios hold on the H200)."""
    g1 = decode_row(rows, 1, "splitserve", graphs=True)
    prefill = min((r for r in rows if r["phase"] == "prefill" and r["system"] == "splitserve"),
                  key=lambda r: abs(r["prompt_len"] - 1024), default=None)
    return [
        target("decode B=1, graphs / bandwidth bound", to_bound(g1), 1.3),
        target("decode B=1, eager / graphs", ratio(decode_row(rows, 1, "splitserve"), g1), 3.0, True),
        target("decode B=1, transformers / graphs", ratio(decode_row(rows, 1, "transformers"), g1), 5.0, True),
        target("decode B=256, graphs ms per step", (decode_row(rows, 256, "splitserve", True) or {}).get("ms"), 3.0),
        target(f"prefill {prefill['prompt_len'] if prefill else 1024} tokens / FLOP bound", to_bound(prefill), 2.0),
    ]


def qwen7b_blocks(tiny: bool) -> list:
    from gpu_bench import Block, decode, prefill

    prompt, new, n = (120, 8, 128) if tiny else (1024 - 16, 32, 1024)
    jobs = [decode(prompt, b, new, (system,)) for system in ("graphs", "eager") for b in (1, 16)]
    return [Block("decode", jobs), Block("prefill", [prefill(n, ("eager",))])]


def qwen7b_targets(rows: list[dict]) -> list[dict]:
    g1, g16 = decode_row(rows, 1, "splitserve", True), decode_row(rows, 16, "splitserve", True)
    prefill = find(rows, phase="prefill", system="splitserve")
    return [target("decode B=1, graphs / bandwidth bound", to_bound(g1)),
            target("decode B=16, graphs / bandwidth bound", to_bound(g16)),
            target("decode B=1, eager / graphs", ratio(decode_row(rows, 1, "splitserve"), g1)),
            target("prefill / FLOP bound", to_bound(prefill))]


BENCHES = {"santacoder": Bench("santacoder", "tiny", santacoder_blocks, santacoder_targets),
           "qwen7b": Bench("qwen2.5-coder-7b", "llama-tiny", qwen7b_blocks, qwen7b_targets)}


def stage_bench(stage: str, args: argparse.Namespace, log: Log) -> int:
    import torch
    import transformers

    from gpu_bench import device_slug, measure_block, measure_limits, random_model, Sink
    from splitserve.bench.engine_bench import SHAPES
    from splitserve.bench.engine_runs import Repeats
    from splitserve.common.builtin_models import TINY_HF_CONFIG
    from splitserve.common.runtime import DTYPE_NAMES

    deadline = time.monotonic() + args.deadline
    bench = BENCHES[stage]
    shape = bench.tiny if args.tiny else bench.shape
    shapes = dict(SHAPES, tiny={k: v for k, v in TINY_HF_CONFIG.items() if k not in ("architectures", "torch_dtype")})
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = Repeats(3, 0.3) if cuda else Repeats(1, 0.0)
    start = time.perf_counter()
    hf, model = random_model(shapes[shape], shape, device, dtype)
    log.record(stage, "model", "ok", shape=shape, dtype=DTYPE_NAMES[dtype], seconds=round(time.perf_counter() - start, 1))
    limits = measure_limits(model, (4 << 30) if cuda else (16 << 20), 8192 if cuda else 256, repeats)
    log.record(stage, "limits", "measured", bandwidth_gb_s=round(limits.bandwidth_gb_s, 1),
               matmul_tflop_s=round(limits.matmul_tflop_s, 1), weight_bytes=limits.weight_bytes,
               kv_bytes_per_token=limits.kv_bytes_per_token)
    name = f"gpu-{device_slug(device)}-{shape}.json"
    doc = dict(device=f"{device} ({torch.cuda.get_device_name(device)})" if cuda else "cpu",
               model=f"{shape}-shape (random weights)", dtype=DTYPE_NAMES[dtype], threads=torch.get_num_threads(),
               torch=torch.__version__, transformers=transformers.__version__,
               graphs="CUDA graphs" if cuda else "the CPU twin (capture=False)", prefill_attention=None,
               bandwidth_gb_s=round(limits.bandwidth_gb_s, 1), matmul_tflop_s=round(limits.matmul_tflop_s, 1),
               weight_bytes=limits.weight_bytes, graph_key_step=args.graph_key_step)

    def on_row(row: dict) -> None:
        what = row["system"]
        if row["phase"] == "decode" and what == "splitserve":
            what = "graphs" if row["graphs"] else "eager"
        if "status" in row:  # skipped or failed
            log.record(stage, f"{row['phase']} B={row['batch_size']} {what}", row["status"], reason=row["reason"])
            return
        at = f"keys={row['key_len']}" if row["phase"] == "decode" else f"prompt={row['prompt_len']}"
        log.record(stage, f"{row['phase']} B={row['batch_size']} {at} {what}", "measured", ms=row["ms"],
                   bound_ms=row["bound_ms"], floor_ms=row["floor_ms"], peak_mem_mb=row["peak_mem_mb"])

    def targets(rows: list[dict]) -> list[dict]:  # judged on a GPU only: on the CPU the numbers alone
        return bench.targets(rows) if cuda else [dict(t, ok=None) for t in bench.targets(rows)]

    sink = Sink(doc, args.out_dir / name, targets, on_row)
    log.record(stage, "document", "ok", doc=name)
    with torch.inference_mode():
        for block in bench.blocks(args.tiny):
            measure_block(block, model, hf, limits, repeats, args.graph_key_step, deadline, sink)
            if block.name == "decode" and doc["engines"]:
                engine = doc["engines"][-1]
                log.record(stage, "capture", "failed" if engine["capture_error"] else "ok", reason=engine["capture_error"],
                           **{k: v for k, v in engine.items() if k != "capture_error"})
    for t in doc["targets"]:
        status = "not measured" if t["value"] is None else "info" if t["ok"] is None else "met" if t["ok"] else "missed"
        log.record(stage, f"target: {t['target']}", status, value=t["value"], limit=t["limit"])
    return 0


# --- command line ------------------------------------------------------------------------------

def stage_list(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(unknown)}; the stages: {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]  # always in their order


def limits(text: str) -> tuple[str, float]:
    stage, _, seconds = text.partition("=")
    if stage not in STAGES or not seconds:
        raise argparse.ArgumentTypeError(f"--limit takes STAGE=SECONDS, with a stage of {', '.join(STAGES)}")
    return stage, float(seconds)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=stage_list, default=list(STAGES), help="comma-separated, of " + ",".join(STAGES))
    p.add_argument("--device", default="cuda", help="cuda (the default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for the benchmark stages (a CPU rehearsal)")
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT") or "/tmp/device-pass"))
    p.add_argument("--budget", type=float, default=285.0,
                   help="seconds for the whole pass, from $DEVICE_PASS_T0 (the wrapper's start) if set")
    p.add_argument("--limit", type=limits, action="append", default=[], metavar="STAGE=SECONDS",
                   help="a stage's time limit instead of its default (%s)" % LIMIT_S)
    p.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads of each stage (0: PyTorch's default)")
    p.add_argument("--graph-key-step", type=int, default=256, help="the graphs' key buckets: multiples of this")
    p.add_argument("--run-stage", choices=STAGES, help=argparse.SUPPRESS)  # the parent's way to start a stage
    p.add_argument("--deadline", type=float, default=1e9, help=argparse.SUPPRESS)  # a stage's last start, seconds
    args = p.parse_args(argv)
    args.limit = dict(args.limit)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out_dir = args.out_dir.resolve()
    if args.run_stage is None:
        return orchestrate(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    log = Log(args.out_dir / JSONL, float(os.environ.get("DEVICE_PASS_T0") or time.time()))
    stage = args.run_stage
    try:
        if stage == "setup":
            return stage_setup(args, log)
        if stage == "correctness":
            return stage_correctness(args, log)
        return stage_bench(stage, args, log)
    except Exception as e:
        log.record(stage, "crash", "error", reason=f"{type(e).__name__}: {e}"[:600])
        raise


if __name__ == "__main__":
    sys.exit(main())
