"""`splitserve bench gateway --quick` starts a router, one then two frontends and synthetic
workers, streams over every transport, writes its JSON and plot, and leaves no process behind.
The targets are not checked here: a few seconds on a shared machine say little about them."""

from __future__ import annotations

import json
import subprocess
import sys

from bench_support import processes_mentioning


def test_quick_gateway_bench(tiny_dir, home, tmp_path):
    out = tmp_path / "gateway.json"
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "gateway", "--quick", "--json", str(out),
           "--plot-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)  # SPLITSERVE_HOME from `home`
    assert done.returncode == 0, done.stdout + done.stderr
    assert "us/tok" in done.stdout
    assert not processes_mentioning(str(home)), "a router or frontend outlived the benchmark"
    assert not processes_mentioning("", "splitserve.bench.synthetic_workers"), "a synthetic worker outlived the benchmark"

    doc = json.loads(out.read_text())
    assert doc["servers"] == ["router", "frontend-0", "frontend-1"]
    assert [(r["frontends"], r["transport"], r["new_tokens"]) for r in doc["results"]] == [
        (f, t, n) for f in (1, 2) for t in ("sse", "ws", "zmq") for n in (4, 16)]
    for r in doc["results"]:
        assert r["errors"] == 0 and r["requests"] > 0 and r["tokens"] == r["requests"] * r["new_tokens"]
        assert r["us_per_token"]["frontend-0"] > 0 and r["delay_us"]["p50"] is not None
    assert {(s["frontends"], s["transport"], s["process"]) for s in doc["split"]} == {
        (f, t, p) for t in ("sse", "ws", "zmq") for f, procs in ((1, ["router", "frontend-0"]),
                                                                 (2, ["router", "frontend-0", "frontend-1"]))
        for p in procs}
    assert len(doc["checks"]["router_us_per_request"]) == 6 and len(doc["checks"]["frontend_us_per_token"]) == 3
    assert (tmp_path / "gateway.png").stat().st_size > 0


def test_the_command_and_the_synthetic_workers_load_without_torch():
    code = ("import sys, splitserve.bench.gateway_bench, splitserve.bench.synthetic_workers; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
