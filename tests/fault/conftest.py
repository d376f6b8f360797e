"""Fixtures of the fuzz tests: one small-limit pipeline per module, and good streams running
beside the fuzzing that must arrive whole."""

from __future__ import annotations

import pytest

from cluster import Cluster
from fuzz_support import MAX_CONCURRENT, MAX_TOTAL_TOKENS, GoodTraffic


@pytest.fixture(scope="module")
def fuzzed_cluster(home, tiny_dir):
    with Cluster(home, max_total_tokens=MAX_TOTAL_TOKENS, max_concurrent_requests=MAX_CONCURRENT) as c:
        limit = ("--max-total-tokens", str(MAX_TOTAL_TOKENS))
        c.add_worker("prefill", *limit)
        c.add_worker("decode", "--num-slots", "16", *limit)
        c.wait_registered()
        yield c


@pytest.fixture(scope="module")
def good_traffic(fuzzed_cluster):
    with GoodTraffic(fuzzed_cluster.endpoint) as t:
        yield t
    t.check()
