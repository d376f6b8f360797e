"""A storm: `serve` with two frontends, two prefill and two decode workers streams requests of every
client library (ZMQ and WebSocket, sync and async; greedy, seeded and gateway-seeded sampled) while
its processes are killed (SIGKILL), frozen (SIGSTOP) or stopped (SIGTERM: they drain) one after
another: every kind of process, each way. Every answer equals an undisturbed rerun of its request,
none fails, and nothing stays held afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import threading
import time

from cluster import child_pid, free_ports_in_a_row, http_port, serve_process
from polling import wait_for
from splitserve.bench.server_state import http_json, wait_all_free
from splitserve.client import AsyncClient, AsyncWebSocketClient, Client, SplitserveError, WebSocketClient

# One at a time, each once the fleet is whole again: a request can then lose its process only once,
# and two processes of a role are never down together (either would end requests with an error).
# A frozen worker thaws after FROZEN_S (the router has let it go meanwhile, and it registers
# again); a frozen frontend stays frozen until serve kills it. SIGTERM: it drains, and exits.
FAULTS = [("frontend-0-", signal.SIGKILL), ("decode-1-", signal.SIGSTOP), ("prefill-0-", signal.SIGKILL),
          ("frontend-1-", signal.SIGSTOP), ("decode-0-", signal.SIGKILL), ("prefill-1-", signal.SIGSTOP),
          ("frontend-0-", signal.SIGTERM), ("decode-1-", signal.SIGTERM), ("prefill-0-", signal.SIGTERM)]
FROZEN_S = 4.0
# After a kill (or a frontend's freeze), the router has let go of the process within its heartbeat
# timeout (2 s): only then does its count say whether the one serve started in its place is in
GONE_S = 4.0
SETTLE_S = 1.0  # after the fleet is whole again, before the next fault
PROMPTS = ["def fib(n):", "import os\n", "class A:", "for i in range(", "# sort a list\n", "x = [1, 2"]


def requests(seed: int):
    """Requests without end, each its own: greedy, seeded sampled, or sampled with the gateway's seed."""
    rng = random.Random(seed)
    while True:
        spec = {"prompt": rng.choice(PROMPTS) * rng.randint(1, 3), "max_new_tokens": rng.randint(20, 160),
                "ignore_eos": True, "details": True, "timeout": 60}
        kind = rng.random()
        if kind < 0.3:
            spec.update(temperature=0.8, top_k=50, seed=rng.randint(0, 10**6))
        elif kind < 0.5:
            spec.update(temperature=1.0)
        yield spec


def whole(router_metrics: int) -> bool:
    h = http_json(router_metrics, "/health") or {}
    return (h.get("frontends"), h.get("prefill_workers"), h.get("decode_workers")) == (2, 2, 2)


def storm(serve_pid: int, router_metrics: int, done: threading.Event, errors: list[Exception]) -> None:
    """The faults, one after another, each once the fleet is whole again; then `done`."""
    stopped = []
    try:
        for part, sig in FAULTS:
            wait_for(lambda: whole(router_metrics), 60, "the fleet to be whole")
            time.sleep(SETTLE_S)
            pid = wait_for(lambda: child_pid(serve_pid, part), 10, part)
            os.kill(pid, sig)
            if sig == signal.SIGSTOP:
                stopped.append(pid)
            if sig == signal.SIGSTOP and not part.startswith("frontend"):
                time.sleep(FROZEN_S)
                os.kill(pid, signal.SIGCONT)
                continue
            if sig == signal.SIGTERM:
                wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 60, f"{part} to drain and exit")
            time.sleep(GONE_S)
        wait_for(lambda: whole(router_metrics), 60, "the fleet to be whole")
    except Exception as e:  # noqa: BLE001 - the test's thread asserts on it
        errors.append(e)
    finally:
        done.set()
        for pid in stopped:  # should serve have left one stopped (it would ignore serve's end)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def traffic(port: int, endpoints: list[str], done: threading.Event) -> list[tuple[dict, object]]:
    """Two requests at a time from each of the four clients, one after another until the storm is
    over -> (each request, its (token ids, seed) or its error)."""
    answers: list[tuple[dict, object]] = []
    url = f"ws://127.0.0.1:{port}/ws"

    def sync_sender(client, seed: int) -> None:
        for spec in requests(seed):
            if done.is_set():
                return
            try:
                r = client.generate(**spec)
                answers.append((spec, (r.token_ids, r.details.seed)))
            except SplitserveError as e:
                answers.append((spec, e))

    async def async_sender(client, seed: int) -> None:
        for spec in requests(seed):
            if done.is_set():
                return
            try:
                r = await client.generate(**spec)
                answers.append((spec, (r.token_ids, r.details.seed)))
            except SplitserveError as e:
                answers.append((spec, e))

    with Client(endpoints) as zmq_sync, WebSocketClient(url) as ws_sync:
        async with AsyncClient(endpoints) as zmq_async, await AsyncWebSocketClient.connect(url) as ws_async:
            await asyncio.gather(*(asyncio.to_thread(sync_sender, c, seed) for seed, c in
                                   enumerate([zmq_sync, zmq_sync, ws_sync, ws_sync])),
                                 *(async_sender(c, seed) for seed, c in
                                   enumerate([zmq_async, zmq_async, ws_async, ws_async], start=4)))
    return answers


def rerun(endpoints: list[str], answers: list[tuple[dict, object]]) -> list[list[int]]:
    """Each request again, undisturbed (a sampled one with the seed it was given), 32 at a time."""
    out: list[list[int]] = [[] for _ in answers]
    todo = iter(enumerate(answers))
    lock = threading.Lock()

    def sender(client: Client) -> None:
        while True:
            with lock:
                i, (spec, (_, seed)) = next(todo, (None, (None, (None, None))))
            if i is None:
                return
            out[i] = client.generate(**(dict(spec, seed=seed) if "temperature" in spec else spec)).token_ids

    with Client(endpoints) as client:
        threads = [threading.Thread(target=sender, args=(client,)) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return out


def test_every_answer_through_a_storm_of_killed_and_frozen_processes_is_the_undisturbed_one(home, tiny_dir):
    metrics = free_ports_in_a_row(7)  # the router's /health and /metrics, the frontends', the workers'
    with serve_process(home, "--frontends", "2", "--prefill-workers", "2", "--decode-workers", "2",
                       "--metrics-port", str(metrics)) as (serve, lines):
        port = http_port(lines)
        endpoints = http_json(port, "/info")["zmq_endpoints"]
        done, storm_errors = threading.Event(), []
        faults = threading.Thread(target=storm, args=(serve.pid, metrics, done, storm_errors))
        faults.start()
        try:
            answers = asyncio.run(traffic(port, endpoints, done))
        finally:
            done.set()
            faults.join()
        assert not storm_errors
        failed = [(spec, out) for spec, out in answers if isinstance(out, Exception)]
        assert not failed and len(answers) > 100, failed
        assert [ids for _, (ids, _) in answers] == rerun(endpoints, answers)
        workers = {f"{role} {i}": (role, metrics + 3 + i + (2 if role == "decode" else 0))
                   for role in ("prefill", "decode") for i in range(2)}
        assert not wait_all_free(metrics, workers, 30)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        assert not [f for f in os.listdir("/dev/shm") if f"-{serve.pid}-" in f]
