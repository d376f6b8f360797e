"""`splitserve bench editor --quick` starts two pipelines (prefix cache on and off), types on both,
replays requests greedy on both, writes its JSON and plot, and leaves no process behind. The
targets are not checked here: a few seconds on a shared machine say little about them."""

from __future__ import annotations

import subprocess
import sys

from bench_support import run_quick_bench
from conftest import TEST_THREADS


def test_quick_editor_bench(tiny_dir, home, tmp_path):
    doc = run_quick_bench("editor", home, tmp_path, "prefill_tokens_per_request", timeout=120)
    assert doc["model"] == "tiny-random" and doc["threads"] == TEST_THREADS
    on, off = doc["conditions"]["on"], doc["conditions"]["off"]
    for c in (on, off):  # the same sessions typed on both: as many requests, of the same prompts
        assert c["requests"] == on["requests"] > 0 and c["errors"] == 0 and c["prefilled"] > 0
        assert c["prompt_tokens"] is None or 1000 < c["prompt_tokens"] < 1800  # None: none answered in full
    assert off["cache_hit_rate"] == 0 and off["prefill_tokens_per_request"] > 1000
    assert 0 < on["cache_hit_rate"] < 1 and on["prefill_tokens_per_request"] < off["prefill_tokens_per_request"]
    assert [p["condition"] for p in doc["phases"]] == ["on", "off"]
    replay = doc["replay"]
    assert replay["requests"] == 4 and replay["differing"] == 0 and replay["cached_share"] > 0.5
    assert set(doc["ratios"]) == set(doc["targets"]) == {"ttft_p50", "prefill_tokens_per_request"}
    assert (tmp_path / "editor.png").stat().st_size > 0


def test_quick_editor_bench_with_long_prompts_in_pieces_and_whole(tiny_dir, home, tmp_path):
    doc = run_quick_bench("editor", home, tmp_path, "long_ttft_p50", 120, "--compare", "chunk", "--chunk-tokens", "64")
    assert doc["compare"] == "chunk" and doc["flags"] == {"pieces": ["--prefill-chunk-tokens", "64"],
                                                          "whole": ["--prefill-chunk-tokens", "0"]}
    for c in doc["conditions"].values():  # every long prompt answered on both, none failing
        assert c["errors"] == 0 and c["long"]["requests"] == c["long"]["answered"] >= 1 and c["long"]["errors"] == 0
    assert doc["replay"]["differing"] == 0
    assert set(doc["ratios"]) == set(doc["targets"]) == {"ttft_p90", "long_ttft_p50"}
    assert (tmp_path / "editor.png").stat().st_size > 0


def test_the_command_loads_without_torch():
    code = "import sys, splitserve.bench.editor_bench; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
