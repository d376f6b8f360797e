"""Workers die, drain or lose their gateway mid-generation: no client loses or repeats a token.

Every check compares against an undisturbed run of the same requests on the same cluster, for
greedy and seeded sampled requests alike (tiny-random, fp32: exact equality holds).
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from cluster import Cluster, http_json, wait_for
from splitserve.client import Client, GenerationError, UnavailableError

HEARTBEAT_TIMEOUT = 1.0
# The gateway checks for silence once per heartbeat interval (0.5 s) and the resumed request is
# prefilled again before its next token: allow for both on two slow, shared cores.
NOTICE_MARGIN_S = 4.0
LONG = 600  # tokens: far more than are generated before the worker is stopped
REQUESTS = [
    ("def fibonacci(n):\n    ", {}),
    ("import os\n\nclass Config:", {"temperature": 0.9, "seed": 7}),
    ("for i in range(10):", {"top_k": 20, "seed": 1234}),
    ("x = [", {"temperature": 1.3, "top_p": 0.9, "seed": 42, "stop": ["\n\n\n\n"]}),
]


def _timed(stream, out: list) -> None:
    """Collect (arrival time, event) of a stream, or its error."""
    try:
        for event in stream:
            out.append((time.monotonic(), event))
    except Exception as e:  # noqa: BLE001 - recorded for the test to assert on
        out.append((time.monotonic(), e))


def _start(client: Client) -> list[tuple[threading.Thread, list]]:
    running = []
    for prompt, options in REQUESTS:
        out: list = []
        stream = client.stream(prompt, max_new_tokens=LONG, ignore_eos=True, timeout=180, **options)
        thread = threading.Thread(target=_timed, args=(stream, out), daemon=True)
        thread.start()
        running.append((thread, out))
    return running


def _texts(running) -> list[tuple[list[int], str]]:
    results = []
    for thread, out in running:
        thread.join(timeout=180)
        events = [e for _, e in out]
        assert not [e for e in events if isinstance(e, Exception)], events[-1]
        assert [e.index for e in events if e.token_id is not None] == list(range(len(events)))
        results.append(([e.token_id for e in events], "".join(e.text for e in events)))
    return results


def _undisturbed(client: Client):
    return _texts(_start(client))


def _wait_for_tokens(running, n: int) -> None:
    wait_for(lambda: all(len(out) >= n for _, out in running), 60, f"{n} tokens on every stream")


def _worst_gap_after(running, t0: float) -> float:
    """The longest wait for a stream's next token after t0."""
    gaps = []
    for _, out in running:
        before = [t for t, _ in out if t <= t0]
        after = [t for t, _ in out if t > t0]
        if before and after:
            gaps.append(after[0] - t0)
    return max(gaps, default=0.0)


def _cluster(home, decode_workers: int, prefill_workers: int = 1, *decode_args: str, **gateway_flags):
    c = Cluster(home, heartbeat_timeout=HEARTBEAT_TIMEOUT, **gateway_flags)
    for _ in range(prefill_workers):
        c.add_worker("prefill")
    decodes = [c.add_worker("decode", "--num-slots", "4", *decode_args) for _ in range(decode_workers)]
    try:
        c.wait_registered()
    except BaseException:
        c.stop()
        raise
    return c, decodes


def test_decode_worker_killed_mid_generation_resumes_elsewhere(home, tiny_dir):
    c, (first, second) = _cluster(home, 2)
    with c, Client(c.endpoint) as client:
        expected = _undisturbed(client)
        running = _start(client)  # alternates between the two decode workers
        _wait_for_tokens(running, 5)
        killed_at = time.monotonic()
        c.workers[first]["proc"].send_signal(signal.SIGKILL)
        assert _texts(running) == expected
        assert _worst_gap_after(running, killed_at) < HEARTBEAT_TIMEOUT + NOTICE_MARGIN_S
        c.wait_idle()

        # With no decode worker left, running requests end with a clear error and new ones get
        # "unavailable" (HTTP 503) until a decode worker registers again.
        running = _start(client)
        _wait_for_tokens(running, 2)
        c.workers[second]["proc"].send_signal(signal.SIGKILL)
        for thread, out in running:
            thread.join(timeout=60)
            assert isinstance(out[-1][1], GenerationError) and "no worker is left" in str(out[-1][1])
        with pytest.raises(UnavailableError):
            client.generate("def f():", max_new_tokens=2)
        assert http_json(c.port, "/health")["decode_workers"] == 0
        c.wait_registered(c.add_worker("decode", "--num-slots", "4"))
        wait_for(lambda: http_json(c.port, "/health").get("decode_workers") == 1, 30, "the new decode worker")
        assert _undisturbed(client) == expected


def test_the_last_decode_worker_s_requests_wait_for_one_started_again_within_the_restart_timeout(home, tiny_dir):
    """--worker-restart-timeout: the lone decode worker dies and another registers in its place long
    after the settle time (two heartbeat timeouts), as one loading a large model would: the requests
    it was running resume on the new one, whole and equal to the undisturbed run (without the flag
    they end with "no worker is left to resume it", as above)."""
    c, (decode,) = _cluster(home, 1, worker_restart_timeout=60)
    with c, Client(c.endpoint) as client:
        expected = _undisturbed(client)
        running = _start(client)
        _wait_for_tokens(running, 5)
        c.workers[decode]["proc"].send_signal(signal.SIGKILL)
        wait_for(lambda: http_json(c.port, "/health").get("decode_workers") == 0, 30, "the router to drop it")
        time.sleep(3 * HEARTBEAT_TIMEOUT)  # the point: no decode worker for longer than the settle time
        c.wait_registered(c.add_worker("decode", "--num-slots", "4"))
        assert _texts(running) == expected
        c.wait_idle()


def test_kv_handed_to_a_decode_worker_found_dead_frees_its_staging_then(home, tiny_dir):
    """A prefill worker lets go of the KV it handed to a decode worker that never took it (frozen,
    then found dead) once the router finds out (its Cancel), not at the handoff timeout (30 s): its
    staging serves other prompts again, and a drain is not held up. The requests resume on the
    other decode worker, exactly."""
    c, (frozen, _) = _cluster(home, 2)
    prefill = next(w for w, info in c.workers.items() if info["role"] == "prefill")
    with c, Client(c.endpoint) as client:
        expected = _undisturbed(client)
        c.workers[frozen]["proc"].send_signal(signal.SIGSTOP)
        try:
            running = _start(client)  # alternates between the two: some KV goes to the frozen one
            wait_for(lambda: (c.health(prefill) or {}).get("handoffs", 0) >= 1, 30, "KV handed to the frozen worker")
            assert _texts(running) == expected
            health = {}

            def freed() -> bool:
                health.update(c.health(prefill) or {})
                return health.get("handoffs") == 0 and health.get("staging_free_tokens") == health.get("staging_tokens")

            wait_for(freed, NOTICE_MARGIN_S, "the frozen worker's staging to come free")
        finally:
            c.workers[frozen]["proc"].send_signal(signal.SIGKILL)


def test_an_event_stream_whose_worker_is_lost_for_good_ends_with_an_error_event(home, tiny_dir):
    c, (decode,) = _cluster(home, 1)
    with c:
        wait_for(lambda: (http_json(c.port, "/health") or {}).get("status") == "ok", 30, "the HTTP front")
        with httpx.stream("POST", f"{c.url}/generate_stream", timeout=60,
                          json={"inputs": "def f(x):", "parameters": {"max_new_tokens": LONG}}) as sse:
            events = (json.loads(line[5:]) for line in sse.iter_lines() if line.startswith("data:"))
            assert next(events)["token"]  # the stream has started: what goes wrong now is an event of it
            c.workers[decode]["proc"].send_signal(signal.SIGKILL)
            *_, last = events
    assert sse.status_code == 200 and last["error_type"] == "generation" and "no worker is left" in last["error"]


def test_prefill_worker_lost_with_queued_work_is_resent(home, tiny_dir):
    c, _ = _cluster(home, 1, prefill_workers=2)
    with c, Client(c.endpoint) as client:
        expected = _undisturbed(client)
        frozen = next(w for w, info in c.workers.items() if info["role"] == "prefill")
        proc = c.workers[frozen]["proc"]
        proc.send_signal(signal.SIGSTOP)  # queued work sits there until the gateway gives up on it
        try:
            running = _start(client)
            assert _texts(running) == expected
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        c.wait_idle()


def test_draining_decode_worker_hands_unfinished_work_to_another(home, tiny_dir):
    c, (first, _) = _cluster(home, 2, 1, "--drain-timeout", "0.5")
    with c, Client(c.endpoint) as client:
        expected = _undisturbed(client)
        running = _start(client)
        _wait_for_tokens(running, 5)
        c.workers[first]["proc"].send_signal(signal.SIGTERM)
        assert _texts(running) == expected
        assert c.workers[first]["proc"].wait(timeout=30) == 0
        c.wait_idle()


def test_gateway_restart_frees_the_work_it_routed(home, tiny_dir):
    c, (decode,) = _cluster(home, 1)
    with c:
        with Client(c.endpoint) as client:
            running = [client.stream(prompt, max_new_tokens=1800, ignore_eos=True) for prompt, _ in REQUESTS]
            for stream in running:
                next(iter(stream))
            # the first token comes from the prefill worker, straight to the frontend: the decode
            # worker takes the request a moment later
            wait_for(lambda: c.health(decode)["slots_used"] > 0, 30, "the decode worker to hold the requests")
            c.gateway.send_signal(signal.SIGKILL)
            c.gateway.wait()
        c.start_gateway()
        wait_for(lambda: (http_json(c.port, "/health") or {}).get("status") == "ok", 60,
                 "the workers to register with the new gateway")
        c.wait_idle()  # the slots the old gateway's requests held are free
        with Client(c.endpoint) as client:
            assert len(client.generate("def f(x):", max_new_tokens=5, ignore_eos=True, timeout=60).token_ids) == 5
