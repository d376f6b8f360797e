"""`splitserve bench gateway --quick` starts a router, one then two frontends and synthetic
workers, streams over every transport, writes its JSON and plot, and leaves no process behind.
The targets are not checked here: a few seconds on a shared machine say little about them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bench_support import processes_mentioning

from splitserve.bench.gateway_bench import checks
from splitserve.bench.wake_floor import measure


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
    assert doc["wake_floor_us"]["zmq"] > 0 and doc["wake_floor_us"]["tcp"] > 0
    assert "an idle process taking one message" in done.stdout
    assert (tmp_path / "gateway.png").stat().st_size > 0


def test_the_command_and_the_synthetic_workers_load_without_torch():
    code = ("import sys, splitserve.bench.gateway_bench, splitserve.bench.synthetic_workers; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_checks_solve_a_frontends_wake_per_step_and_its_cost_per_token():
    # 64 streams, a step every 5 ms: one frontend wakes for each step (100 µs) and spends 2 µs per token
    def row(frontends: int, per_frontend_us: float) -> dict:
        return {"frontends": frontends, "transport": "zmq", "concurrency": 64, "new_tokens": 200, "requests": 64,
                "tokens_per_s": 64 * 200.0,
                "us_per_token": {f"frontend-{i}": per_frontend_us for i in range(frontends)}}

    one, two = (100 + 64 * 2) / 64, (100 + 32 * 2) / 64  # per token of all tokens, for each frontend
    (got,) = checks([row(1, one), row(2, two)], 64, 200, 5.0)["frontend_us_per_token"]
    assert got["tokens_per_step"] == 64 and got["wake_us"] == 100 and got["token_us"] == 2
    assert got["wake_budget_us"] == round(64 * 2 / 9, 1)  # at that wake, two together are 1.1x one
    assert got["ratio"] == round(2 * two / one, 3)


@pytest.mark.parametrize("transport", ["zmq", "tcp"])
def test_the_wake_floor_counts_every_message_of_a_receiving_process(transport):
    # 20 messages a millisecond apart: the receiver answers only once it has taken them all
    assert measure(transport, step_ms=1.0, messages=20) > 0
