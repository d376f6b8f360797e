"""No leaks: a thousand requests over every front end (ZMQ, WebSocket, TGI and OpenAI, streamed or
not), ending in full, on stop strings, by explicit cancels and by clients that vanish mid-way,
leave every KV slot, reservation and staging region free, as the gateway's and the workers'
/metrics report them; and no process's resident memory grows by 5% or more from the end of the
first tenth of the run to its end. Again with prompts prefilled in pieces of 16 tokens, cut short
between their pieces too."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from cluster import Cluster
from splitserve.bench.server_state import rss_kib, wait_all_free
from splitserve.bench.traffic import ENDINGS, FRONTS, GOOD, Clients, run_all, script

REQUESTS = 1000
CONCURRENCY = 24
SEED = 20240611
MAX_RSS_GROWTH = 0.05
FREE_TIMEOUT_S = 30.0


def run_phase(c: Cluster, first: int, last: int) -> list:
    async def drive():
        async with Clients(c.endpoint, c.url, CONCURRENCY) as clients:
            return await run_all(clients, [script(i, SEED) for i in range(first, last)], CONCURRENCY)

    return asyncio.run(drive())


def assert_all_free(c: Cluster) -> None:
    workers = {worker_id: (w["role"], w["metrics_port"]) for worker_id, w in c.workers.items()}
    left = wait_all_free(c.port, workers, FREE_TIMEOUT_S)
    assert not left, f"still held {FREE_TIMEOUT_S:.0f} s after the last request: {left}"


@pytest.mark.parametrize("chunk", ["8192", "16"], ids=["whole", "in-pieces"])  # --prefill-chunk-tokens
def test_a_thousand_mixed_requests_leave_nothing_held(home, tiny_dir, chunk):
    with Cluster(home) as c:
        c.start_pipeline(32, "--prefill-chunk-tokens", chunk)
        procs = {"gateway": c.gateway, **{worker_id: w["proc"] for worker_id, w in c.workers.items()}}

        # The first tenth warms every path up (batch shapes, connections, caches); memory is then
        # measured against the end of the run.
        traces = run_phase(c, 0, REQUESTS // 10)
        assert_all_free(c)
        before = {name: rss_kib(p.pid) for name, p in procs.items()}
        traces += run_phase(c, REQUESTS // 10, REQUESTS)
        assert_all_free(c)
        after = {name: rss_kib(p.pid) for name, p in procs.items()}

    failed = Counter(t.outcome for t in traces if t.outcome not in GOOD)
    assert not failed, failed.most_common(5)
    assert len(traces) == REQUESTS
    mix = Counter((t.script.front, t.script.ending) for t in traces)
    assert set(mix) == {(f, e) for f in FRONTS for e in ENDINGS}, "the mix lacks some front end or ending"
    ended = Counter(t.outcome for t in traces)
    assert ended["cancelled"] and ended["disconnected"], ended
    grown = {name: f"{before[name]} -> {after[name]} KiB" for name in procs
             if after[name] >= before[name] * (1 + MAX_RSS_GROWTH)}
    assert not grown, f"resident memory grew by {MAX_RSS_GROWTH:.0%} or more: {grown}"
