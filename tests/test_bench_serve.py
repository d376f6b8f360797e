"""`splitserve bench serve --quick` starts a real pipeline, loads it and the in-process engine,
writes its JSON and plot, and leaves no process behind."""

from __future__ import annotations

from bench_support import run_quick_bench
from conftest import TEST_THREADS

QUANTILE_KEYS = {"p50", "p90", "p99"}


def check_row(row: dict) -> None:
    assert row["system"] in ("pipeline", "engine") and row["load"] == "concurrency" and row["rate"] is None
    assert isinstance(row["concurrency"], int) and row["requests"] == 4 and row["failed"] == 0, row
    assert row["prompt_len"] == [64, 64] and row["new_tokens"] == [16, 16]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "itl_rest_ms"):
        assert set(row[key]) == QUANTILE_KEYS
        assert 0 < row[key]["p50"] <= row[key]["p90"] <= row[key]["p99"], (key, row[key])
    assert 0 <= row["short_gap_share"] <= 1
    assert isinstance(row["output_tok_s"], float) and row["output_tok_s"] > 0


def test_quick_serve_bench(tiny_dir, home, tmp_path):
    doc = run_quick_bench("serve", home, tmp_path, "pipeline / engine", timeout=60)
    assert {"device", "model", "threads", "results"} <= set(doc)
    assert doc["model"] == "tiny-random" and doc["threads"] == TEST_THREADS and doc["device"].startswith("cpu")
    assert {(r["system"], r["concurrency"]) for r in doc["results"]} == {
        (s, c) for s in ("pipeline", "engine") for c in (1, 4)}
    for row in doc["results"]:
        check_row(row)
    assert (tmp_path / "serve.png").stat().st_size > 0
