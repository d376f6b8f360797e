"""The engine benchmark runs end to end: `splitserve bench engine --quick` on the tiny model writes
its JSON and plot (the device pass's benchmark stages run on the CPU in test_device_pass.py)."""

from __future__ import annotations

import json
import subprocess
import sys

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

