"""`splitserve bench serve --quick` starts a real pipeline, loads it and the in-process engine,
writes its JSON and plot, and leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TEST_THREADS

QUANTILE_KEYS = {"p50", "p90", "p99"}


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live splitserve processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        if "splitserve.cli" in args and any(text in a for a in args):
            found.append(" ".join(args))
    return found


def check_row(row: dict) -> None:
    assert row["system"] in ("pipeline", "engine") and row["load"] == "concurrency" and row["rate"] is None
    assert isinstance(row["concurrency"], int) and row["requests"] == 4 and row["failed"] == 0, row
    assert row["prompt_len"] == [64, 64] and row["new_tokens"] == [16, 16]
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert set(row[key]) == QUANTILE_KEYS
        assert 0 < row[key]["p50"] <= row[key]["p90"] <= row[key]["p99"], (key, row[key])
    assert isinstance(row["output_tok_s"], float) and row["output_tok_s"] > 0


def test_quick_serve_bench(tiny_dir, home, tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "serve", "--quick", "--threads", str(TEST_THREADS),
           "--json", str(out), "--plot-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # SPLITSERVE_HOME from `home`
    assert done.returncode == 0, done.stderr
    assert "pipeline / engine" in done.stdout
    assert not processes_mentioning(str(home)), "a pipeline process outlived the benchmark"

    doc = json.loads(out.read_text())
    assert {"device", "model", "threads", "results"} <= set(doc)
    assert doc["model"] == "tiny-random" and doc["threads"] == TEST_THREADS and doc["device"].startswith("cpu")
    assert {(r["system"], r["concurrency"]) for r in doc["results"]} == {
        (s, c) for s in ("pipeline", "engine") for c in (1, 4)}
    for row in doc["results"]:
        check_row(row)
    assert (tmp_path / "serve.png").stat().st_size > 0
