"""`splitserve bench soak --quick` starts a real pipeline, runs every phase for a moment, writes its
JSON and plot, finds nothing held afterwards, and leaves no process behind."""

from __future__ import annotations

from bench_support import run_quick_bench
from conftest import TEST_THREADS


def test_quick_soak(tiny_dir, home, tmp_path):
    doc = run_quick_bench("soak", home, tmp_path, "p99 ITL overloaded / at limit", timeout=120)
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
