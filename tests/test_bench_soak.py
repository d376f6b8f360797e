"""`splitserve bench soak --quick` starts a real pipeline, runs every phase for a moment, writes its
JSON and plot, finds nothing held afterwards, and leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import TEST_THREADS
from test_bench_serve import processes_mentioning


def test_quick_soak(tiny_dir, home, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "soak", "--quick", "--threads", str(TEST_THREADS),
           "--json", str(out), "--plot-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # SPLITSERVE_HOME from `home`
    assert done.returncode == 0, done.stdout + done.stderr
    assert "p99 ITL overloaded / at limit" in done.stdout
    assert not processes_mentioning(str(home)), "a pipeline process outlived the benchmark"

    doc = json.loads(out.read_text())
    assert doc["model"] == "tiny-random" and doc["threads"] == TEST_THREADS
    soak = doc["soak"]
    assert soak["requests"] > 0 and soak["failed"] == 0 and soak["held_after"] == {}
    assert set(soak["rss_growth_pct"]) == {"gateway", "prefill-0", "decode-0"} == set(doc["rss"]["kib"])
    assert len(doc["rss"]["t_s"]) == len(doc["rss"]["kib"]["gateway"]) >= 2
    assert soak["buckets"] and all({"t_s", "requests", "ttft_ms", "itl_ms"} <= set(b) for b in soak["buckets"])
    over = doc["overload"]
    assert over["at_limit"]["admitted_ok"] > 0 and over["at_limit"]["refused"] == 0
    # offered three times what the server admits: some are refused, all with 429 and Retry-After
    assert over["overloaded"]["refused"] > 0 and over["overloaded"]["failed"] == 0
    assert over["overloaded"]["held_after"] == {}
    assert isinstance(over["itl_p99_ratio"], float)
    assert (tmp_path / "soak.png").stat().st_size > 0
