"""The prefill workers' prefix cache: blocks found by chained hashes and checked id by id, LRU that
keeps a prefix longer than what extends it; served, the same answers with the cache as without,
prompts routed to where their prefix is cached, and typing-speed cancellation leaving nothing held."""

from __future__ import annotations

import time

import pytest
import torch

from cluster import Cluster, wait_for
from conftest import prompt
from splitserve.client import Client
from splitserve.common.prefix_blocks import block_hashes
from splitserve.prefill_worker.prefix_cache import PrefixCache

B = 4  # tokens per block in the unit tests


def cache(capacity: int) -> PrefixCache:
    return PrefixCache(n_layer=2, kv_heads=1, head_dim=3, block_tokens=B, capacity_blocks=capacity,
                       dtype=torch.float32, device=torch.device("cpu"))


def region(ids, seed: int = 0) -> torch.Tensor:
    """K/V [n_layer, 2, n, KVH, D] that tell tokens apart: each position holds its token id."""
    t = torch.tensor(ids, dtype=torch.float32)[None, None, :, None, None]
    return t.expand(2, 2, len(ids), 1, 3) + seed


def test_hashes_are_chained_and_stable():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2 and a == block_hashes(list(range(10)), 4)
    assert block_hashes([9, *range(1, 10)], 4)[1] != a[1]  # block 1 depends on block 0's ids too
    assert block_hashes(list(range(3)), 4) == []


def test_a_hit_restores_the_prefix_and_leaves_a_token_to_compute():
    c = cache(8)
    ids = tuple(range(100, 112))  # three full blocks
    c.insert(ids, region(ids))
    found = c.lookup(ids)
    assert len(found) == 2  # the third block would leave nothing to compute
    out = torch.zeros(2, 2, 12, 1, 3)
    c.copy_out(found, out)
    assert torch.equal(out[:, :, :8], region(ids)[:, :, :8]) and out[:, :, 8:].eq(0).all()
    longer = ids + (7, 7)
    assert len(c.lookup(longer)) == 3 and c.found == 8 + 12 and c.looked_up == 12 + 14
    assert c.lookup(tuple(range(100, 103)) + (1,) + ids[4:]) == []  # differs in block 0


def test_a_hash_collision_is_not_a_hit():
    c = cache(8)
    ids = tuple(range(8))
    c.insert(ids, region(ids))
    h = block_hashes(ids, B)[0]
    c._blocks[h].ids = (9, 9, 9, 9)  # as if another prompt's block had this hash
    assert c.lookup(ids + (1,)) == []


def test_least_recently_used_blocks_go_first_and_prefixes_outlive_their_extensions():
    c = cache(4)
    a = tuple(range(8))  # two blocks
    b = tuple(range(50, 58))
    c.insert(a, region(a))
    c.insert(b, region(b))  # full
    assert len(c.lookup(a + (0,))) == 2  # a is now the most recent
    c.insert(tuple(range(90, 94)), region(range(90, 94)))  # evicts b's extension, not b's prefix
    assert len(c.lookup(b + (0,))) == 1 and len(c.lookup(a + (0,))) == 2
    assert c.used_blocks == 4


# ---- served ---------------------------------------------------------------------------------------

FILE = prompt(600, 1)  # a "file" several requests share, with different endings


def endings(n: int) -> list[list[int]]:
    return [list(FILE) + list(prompt(5 + i, 100 + i)) for i in range(n)]


def answers(endpoint: str, prompts: list[list[int]], **kw) -> list[list[int]]:
    with Client(endpoint) as client:
        return [client.generate(prompt_ids=p, max_new_tokens=8, ignore_eos=True, **kw).token_ids for p in prompts]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_answers_are_the_same_with_the_cache_as_without(home, tiny_dir, sampled):
    kw = {"temperature": 0.9, "seed": 3} if sampled else {}
    got = {}
    for mb in (0, 64):
        with Cluster(home) as c:
            c.start_pipeline(4, "--prefix-cache-mb", str(mb))
            got[mb] = answers(c.endpoint, endings(4), **kw)
            hits = c.metric("splitserve_prefill_prefix_hit_tokens_total", next(iter(c.workers)))
            assert (hits >= 3 * 576) if mb else hits == 0  # the file's full blocks, after the first request
            c.wait_idle()
    assert got[0] == got[64]


def test_prompts_go_where_their_prefix_is_cached(home, tiny_dir):
    with Cluster(home) as c:
        first = c.add_worker("prefill", "--prefix-cache-mb", "64")
        second = c.add_worker("prefill", "--prefix-cache-mb", "64")
        c.add_worker("decode", "--num-slots", "4")
        c.wait_registered()
        answers(c.endpoint, endings(5))
        hits = {w: c.metric("splitserve_prefill_prefix_hit_tokens_total", w) for w in (first, second)}
        # four of the five found the file where the first was prefilled; the other worker, none
        assert sorted(hits.values()) == [0, 4 * 576]
        c.wait_idle()


PIECES = pytest.mark.parametrize("chunk", ["8192", "16"], ids=["whole", "in-pieces"])  # --prefill-chunk-tokens


@PIECES
def test_typing_speed_requests_each_cancelling_the_last_leave_nothing_held(home, tiny_dir, chunk):
    """An editor sends a request per keystroke and cancels the one before: every request but the
    last is cut short at some stage (queued, prefilling whole or between its pieces, decoding); the
    last is answered in full."""
    with Cluster(home) as c:
        c.start_pipeline(4, "--prefill-chunk-tokens", chunk)
        with Client(c.endpoint) as client:
            stream, text = None, list(FILE)
            for i in range(30):
                text.append(1000 + i)
                if stream is not None:
                    stream.close()  # cancels it, wherever it is
                stream = client.stream(prompt_ids=list(text), max_new_tokens=40, ignore_eos=True, timeout=60)
                if i % 3 == 0:
                    next(stream)  # some get as far as their first token, the rest are cut short sooner
                else:
                    time.sleep(0.02)
            stream.close()
            last = client.generate(prompt_ids=text + [7], max_new_tokens=12, ignore_eos=True, timeout=60)
        assert len(last.token_ids) == 12
        c.wait_idle()
        wait_for(lambda: c.metric("splitserve_requests_in_flight") == 0, 10, "the gateway to hold nothing")


@PIECES
def test_openai_usage_reports_the_cached_prompt_tokens(home, tiny_dir, chunk):
    """Those the prefix cache held, not those an earlier piece of the prompt computed."""
    import httpx

    with Cluster(home) as c:
        c.start_pipeline(4, "--prefill-chunk-tokens", chunk)
        body = {"prompt": list(FILE) + [5], "max_tokens": 2, "temperature": 0}
        usage = [httpx.post(f"{c.url}/v1/completions", json=body, timeout=60).json()["usage"] for _ in range(2)]
        assert [u["prompt_tokens_details"]["cached_tokens"] for u in usage] == [0, 576]
        assert usage[0]["prompt_tokens"] == usage[1]["prompt_tokens"] == 601
