"""The benchmarks run end to end: `splitserve bench engine --quick` on the tiny model, and the device
benchmark script on the CPU; each writes its JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TEST_THREADS

ROW_TYPES = {"system": str, "phase": str, "batch_size": int, "prompt_len": int, "key_len": int, "new_tokens": int,
             "ms": float, "floor_ms": float, "peak_mem_mb": float}


def test_quick_engine_bench_writes_json_and_plot(tiny_dir, tmp_path):
    out = tmp_path / "x.json"
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "engine", "--quick", "--model", "tiny-random",
           "--threads", str(TEST_THREADS), "--json", str(out), "--plot-dir", str(tmp_path), "--batch-sizes", "1,2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # SPLITSERVE_HOME from `home`
    assert done.returncode == 0, done.stderr
    assert "ratio" in done.stdout

    doc = json.loads(out.read_text())
    assert set(doc) == {"device", "model", "dtype", "threads", "results"}
    assert doc["device"].startswith("cpu (1 threads") and doc["dtype"] == "float32" and doc["threads"] == 1
    for row in doc["results"]:
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["system"] in ("splitserve", "transformers") and row["phase"] in ("decode", "prefill")
        assert row["ms"] > 0 and row["floor_ms"] > 0 and row["peak_mem_mb"] > 0

    decode = {(r["system"], r["batch_size"]) for r in doc["results"] if r["phase"] == "decode"}
    assert {(s, b) for s in ("splitserve", "transformers") for b in (1, 2)} <= decode
    mixed = [r for r in doc["results"] if r.get("label") == "mixed-8"]
    assert len(mixed) == 2 and all(r["prompt_len"] == 2080 and r["batch_size"] == 8 for r in mixed)
    assert (tmp_path / "x.png").stat().st_size > 0


def test_device_benchmark_script_runs_on_the_cpu(tmp_path):
    """bench/gpu/gpu_bench.py only ever runs on a lent GPU machine; on the CPU it must still run
    end to end, so that the scripts a device session relies on cannot rot unnoticed."""
    script = Path(__file__).parents[1] / "bench" / "gpu" / "gpu_bench.py"
    cmd = [sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--quick",
           "--copy-mib", "16", "--matmul-n", "256", "--out-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(TEST_THREADS))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr

    doc = json.loads((tmp_path / "gpu-cpu-tiny-quick.json").read_text())
    assert {r["system"] for r in doc["results"]} == {"splitserve", "transformers"}
    assert {r["phase"] for r in doc["results"]} == {"decode", "prefill"}
    assert all(r["ms"] > 0 and r["bound_ms"] > 0 for r in doc["results"]) and "targets" in doc
    assert (tmp_path / "gpu-cpu-tiny-quick.png").stat().st_size > 0
