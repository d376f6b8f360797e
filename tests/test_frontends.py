"""A router and several frontend processes: tokens go from the workers straight to the frontend
that owns each request; a frontend's death costs only its own clients' requests; a router restart
does not stop the streams already on live workers; a frontend joins at run time."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import pytest
import websockets

from cluster import (START_TIMEOUT_S, Cluster, SplitCluster, child_pid, free_ports_in_a_row, http_port, metric_at,
                     offline, request_specs, serve_process, stream_all, wait_for)
from polling import async_wait_for
from conftest import load_cpu
from splitserve.bench.server_state import http_json
from splitserve.client import (AsyncClient, AsyncWebSocketClient, Client, SplitserveError, UnavailableError,
                               WebSocketClient)
from splitserve.common.zmq_util import free_port


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_cpu(tiny_dir)


@pytest.fixture(scope="module")
def split(home, tiny_dir):
    with SplitCluster(home, frontends=2) as c:
        c.start_pipeline(16)
        yield c


def sse_tokens(port: int, spec: dict) -> list[int]:
    body = {"inputs": spec["prompt"], "parameters": {"max_new_tokens": spec["max_new_tokens"], "details": True,
                                                     **{k: v for k, v in spec.items() if k not in ("prompt", "max_new_tokens")}}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return [t["id"] for t in json.load(r)["details"]["tokens"]]


def frontend_requests(metrics_port: int) -> float:
    """ZMQ requests a frontend answered in full, from its own /metrics."""
    return metric_at(metrics_port, "splitserve_requests_total", route="zmq", outcome="ok")


def test_every_front_end_of_two_frontends_matches_offline(split, lm):
    specs = request_specs(12)
    want = offline(lm, specs)
    # ZMQ: one client spread over both frontends' ports, as /info lists them
    info = http_json(split.port, "/info")
    assert sorted(info["zmq_endpoints"]) == sorted(split.endpoints)
    assert stream_all(info["zmq_endpoints"], specs) == want
    # HTTP: both frontends serve the one port; the kernel spreads the connections
    assert [sse_tokens(split.port, s) for s in specs] == want
    # each frontend's own --metrics-port counts its own requests alone (the shared port reaches either)
    before = [frontend_requests(p) for p in split.frontend_metrics_ports]
    for i, (proc, port) in enumerate(split.frontends):
        for _ in range(i + 1):
            assert Client(f"tcp://127.0.0.1:{port}").generate("def f(x):", max_new_tokens=3).token_ids
    assert [frontend_requests(p) - b for p, b in zip(split.frontend_metrics_ports, before)] == [1, 2]
    assert all(http_json(p, "/health")["status"] == "ok" for p in split.frontend_metrics_ports)
    split.wait_idle()
    assert split.metric("splitserve_decode_slots_reserved") == 0


async def around_a_dead_frontend(endpoints: list[str]) -> list[str]:
    """Eight requests one after the other; -> each one's outcome ("ok" or the error's class)."""
    outcomes = []
    async with AsyncClient(endpoints) as client:
        for _ in range(8):
            try:
                await client.generate("def f(x):", max_new_tokens=3, timeout=30)
                outcomes.append("ok")
            except SplitserveError as e:
                outcomes.append(type(e).__name__)
    return outcomes


def test_a_dead_frontend_frees_its_slots_and_the_other_streams_on(home, tiny_dir, lm):
    with SplitCluster(home, frontends=2) as c:
        c.start_pipeline(16)
        doomed, survivor = c.endpoints
        specs = request_specs(6)
        for s in specs:
            s["max_new_tokens"] = 200
        started = threading.Event()
        ended: list = []

        def doomed_streams() -> None:
            with Client(doomed) as client:  # no timeout: only the lost connection can end them
                streams = [client.stream(**s) for s in specs]
                next(iter(streams[0]))
                started.set()
                for st in streams:
                    try:
                        list(st)
                    except SplitserveError as e:
                        ended.append(e)

        t = threading.Thread(target=doomed_streams, daemon=True)
        t.start()
        assert started.wait(60)
        wait_for(lambda: c.metric("splitserve_decode_slots_reserved") >= len(specs), 30, "the doomed streams to run")
        c.frontends[0][0].send_signal(signal.SIGKILL)
        # its clients learn it at once (the connection closes), not at a timeout or never: every
        # stream has ended (one that finished first would end well)
        t.join(30)
        assert not t.is_alive() and ended
        assert all(isinstance(e, UnavailableError) and f"the connection to {doomed} was lost" in str(e) for e in ended)
        # a client given both endpoints sends around the dead one: a request sent there before the
        # failed connect was seen goes to the other
        outcomes = asyncio.run(around_a_dead_frontend([doomed, survivor]))
        assert outcomes == ["ok"] * 8, outcomes
        # the survivor's clients are served meanwhile, exactly
        short = request_specs(4)
        assert stream_all([survivor], short) == offline(lm, short)
        # the dead frontend's reservations are freed by the router (heartbeat), and its workers' slots
        wait_for(lambda: c.metric("splitserve_decode_slots_reserved") == 0, 30, "the dead frontend's slots to be freed")
        wait_for(lambda: c.router_state().get("frontends") == 1, 30, "the router to forget the dead frontend")
        c.wait_idle()
        # a new frontend joins at run time and serves
        port = c.add_frontend()
        wait_for(lambda: c.router_state().get("frontends") == 2, 60, "the new frontend to join")
        wait_for(lambda: (http_json(c.port, "/health") or {}).get("status") == "ok", 60, "the frontends' health")
        assert stream_all([f"tcp://127.0.0.1:{port}"], short) == offline(lm, short)


LONG = 400  # tokens: still streaming when their frontend dies


def streamed_answer(stream, started: list[int]):
    """A stream's response; `started` gets a 1 at its first token."""
    with stream:
        next(stream)
        started.append(1)
        return stream.response()


async def streamed_answer_async(stream, started: list[int]):
    async with stream:
        await stream.__anext__()
        started.append(1)
        return await stream.response()


async def streams_through_a_frontend_death(c: SplitCluster, specs: list[dict]) -> tuple[list, float]:
    """Each spec streamed twice by a ZMQ client and an AsyncClient given both frontends (a request
    goes to the one with the fewer in flight: half of them, each spec's once, to the first) and
    once by a WebSocketClient and an AsyncWebSocketClient connected while the first frontend was
    the only one; it is SIGKILLed once every stream has a token. -> (the answers, ZMQ's then the
    WebSockets', the number of streams the first frontend had when it died)."""
    url = f"ws://127.0.0.1:{c.port}/ws"
    ws_sync, ws_async = WebSocketClient(url), await AsyncWebSocketClient.connect(url)
    c.add_frontend()
    await asyncio.to_thread(c.wait_ready)
    started: list[int] = []
    loop = asyncio.get_running_loop()
    with Client(c.endpoints) as zmq_sync, ws_sync, ThreadPoolExecutor(3 * len(specs)) as threads:
        async with AsyncClient(c.endpoints) as zmq_async, ws_async:
            twice = [*specs, *specs]
            runs = [*(loop.run_in_executor(threads, streamed_answer, zmq_sync.stream(**s), started) for s in twice),
                    *(streamed_answer_async(zmq_async.stream(**s), started) for s in twice),
                    *(loop.run_in_executor(threads, streamed_answer, ws_sync.stream(**s), started) for s in specs),
                    *(streamed_answer_async(ws_async.stream(**s), started) for s in specs)]
            answers = asyncio.gather(*runs)
            await async_wait_for(lambda: len(started) == len(runs), 60, "every stream's first token")
            streaming = metric_at(c.frontend_metrics_ports[0], "splitserve_frontend_streams")
            c.frontends[0][0].send_signal(signal.SIGKILL)
            return await asyncio.wait_for(answers, 120), streaming


def test_the_client_libraries_resume_the_streams_of_a_dead_frontend_at_another(home, tiny_dir):
    """A frontend dies (SIGKILL) while it streams requests of the client libraries: each goes on
    at another frontend after the tokens its client has (ZMQ: to the client's other endpoint;
    WebSocket: over a new connection to the shared port), and every answer, text and tokens, is
    the undisturbed one: greedy, seeded, and sampled with the seed the gateway chose."""
    specs = [{"prompt": "def f(x):", "max_new_tokens": LONG, "ignore_eos": True, "details": True},
             {"prompt": "import os\n", "max_new_tokens": LONG, "ignore_eos": True, "details": True,
              "temperature": 0.8, "top_k": 50, "seed": 7},
             {"prompt": "class A:", "max_new_tokens": LONG, "ignore_eos": True, "details": True,
              "temperature": 1.0}]  # its seed the gateway's
    with SplitCluster(home, frontends=1) as c:
        c.start_pipeline(32)
        answers, streaming = asyncio.run(streams_through_a_frontend_death(c, specs))
        # half of the ZMQ streams and all of the WebSocket ones were on the frontend that died
        assert streaming == 2 * len(specs) + 2 * len(specs)
        sent = [*specs, *specs, *specs, *specs, *specs, *specs]
        assert [len(a.token_ids) for a in answers] == [LONG] * len(sent)
        undisturbed = [dict(s, seed=a.details.seed) if "temperature" in s else s for s, a in zip(sent, answers)]
        with Client(c.endpoints) as client, ThreadPoolExecutor(len(undisturbed)) as threads:  # together: quicker
            again = list(threads.map(lambda s: client.generate(**s, timeout=60), undisturbed))
        assert [(a.text, a.token_ids) for a in answers] == [(a.text, a.token_ids) for a in again]
        assert len({a.details.seed for a in answers[2::3]}) == len(sent) // 3  # each its own seed
        wait_for(lambda: c.metric("splitserve_decode_slots_reserved") == 0, 30, "the dead frontend's slots to be freed")
        c.wait_idle()


def test_a_zmq_client_resumes_the_streams_of_a_frozen_frontend_at_another(home, tiny_dir, lm):
    """A frontend that stops answering (SIGSTOP: its process, sockets and all) is found by the ZMQ
    client's heartbeats within 3 s: its streams go on at the other frontend, whole and exact."""
    with SplitCluster(home, frontends=2) as c:
        c.start_pipeline(16)
        specs = [dict(s, max_new_tokens=LONG) for s in request_specs(4)]
        want = offline(lm, specs)
        frozen = c.frontends[0][0]
        try:
            with Client(c.endpoints) as client:  # requests 0 and 2 on the first frontend, 1 and 3 on the other
                streams = [iter(client.stream(**s, timeout=60)) for s in specs]
                firsts = [next(s).token_id for s in streams]
                frozen.send_signal(signal.SIGSTOP)
                whole = [[first, *(ev.token_id for ev in s)] for first, s in zip(firsts, streams)]
        finally:
            frozen.send_signal(signal.SIGCONT)
        assert whole == want
        wait_for(lambda: c.metric("splitserve_decode_slots_reserved") == 0, 30, "the frozen frontend's slots to be freed")


async def through_a_frozen_frontend(port: int, frontend_metrics: list[int], frozen_pid: int,
                                    spec: dict) -> tuple[list, float]:
    """Long streams of WebSocket clients, sync and async, at least one of each on the first of two
    frontends sharing `port` (their /metrics on `frontend_metrics`), which is SIGSTOPped once every
    stream has a token -> (their answers, how many the first streamed then). (The kernel chooses
    the frontend of a new connection: a client is opened for the first until a request of its is
    answered there.)"""
    url = f"ws://127.0.0.1:{port}/ws"

    def answered() -> list[float]:
        return [metric_at(p, "splitserve_requests_total", route="/ws", outcome="ok") for p in frontend_metrics]

    clients: list[WebSocketClient | AsyncWebSocketClient] = []
    try:
        for make in (partial(asyncio.to_thread, WebSocketClient, url), partial(AsyncWebSocketClient.connect, url)):
            for _ in range(30):
                before = answered()
                clients.append(client := await make())
                if isinstance(client, WebSocketClient):
                    await asyncio.to_thread(client.generate, "def f(x):", max_new_tokens=1)
                else:
                    await client.generate("def f(x):", max_new_tokens=1)
                await async_wait_for(lambda: sum(answered()) > sum(before), 10, "the probe to be counted")
                if answered()[0] > before[0]:
                    break
        started: list[int] = []
        runs = [asyncio.to_thread(streamed_answer, c.stream(**spec), started) if isinstance(c, WebSocketClient)
                else streamed_answer_async(c.stream(**spec), started) for c in clients]
        answers = asyncio.gather(*runs)
        await async_wait_for(lambda: len(started) == len(runs), 60, "every stream's first token")
        streaming = metric_at(frontend_metrics[0], "splitserve_frontend_streams")
        os.kill(frozen_pid, signal.SIGSTOP)
        # the pings find it in 4-5 s, not the websockets library's 50 s
        return await asyncio.wait_for(answers, 30), streaming
    finally:
        for c in clients:
            await (asyncio.to_thread(c.close) if isinstance(c, WebSocketClient) else c.close())


FROZEN_SPEC = {"prompt": "def f(x):", "max_new_tokens": 1500, "ignore_eos": True}  # still streaming when frozen


def test_websocket_clients_resume_the_streams_of_a_frozen_frontend_at_another(home, tiny_dir, lm, monkeypatch,
                                                                              caplog):
    """A frontend that stops answering (SIGSTOP) is found by the WebSocket clients' pings within
    4-5 s, not the websockets library's 50, and their streams on it go on over new connections,
    whole and exact. A new connection may reach the frozen frontend's listening socket, which
    shares the port and holds it unanswered: the try is given up after TRY_TIMEOUT_S and made
    again, which the kernel may give to the other (before: it waited out open_timeout, 10 s, and
    the requests ended with an error). Tries of 0.5 s here: each reaches the frozen one or not as
    the kernel's hash falls, and 3 s tries would leave a run of three misses (1 in 8) no time.
    The caller's log gets no error: the websockets library's about the failed pings is the client's."""
    import splitserve.client.websocket as ws_client

    monkeypatch.setattr(ws_client, "TRY_TIMEOUT_S", 0.5)
    with SplitCluster(home, frontends=2) as c:
        c.start_pipeline(16)
        frozen = c.frontends[0][0]
        try:
            answers, streaming = asyncio.run(through_a_frozen_frontend(c.port, c.frontend_metrics_ports, frozen.pid,
                                                                       FROZEN_SPEC))
        finally:
            frozen.send_signal(signal.SIGCONT)
        assert streaming >= 2
        assert [a.token_ids for a in answers] == offline(lm, [FROZEN_SPEC]) * len(answers)
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        wait_for(lambda: c.metric("splitserve_decode_slots_reserved") == 0, 30, "the frozen frontend's slots to be freed")


def test_streams_keep_flowing_while_the_router_restarts(home, tiny_dir, lm):
    with SplitCluster(home, frontends=1) as c:
        c.start_pipeline(16)
        specs = request_specs(4)
        for s in specs:
            s["max_new_tokens"] = 120
        want = offline(lm, specs)
        results: list = [None] * len(specs)
        first: list[threading.Event] = [threading.Event() for _ in specs]

        with Client(c.endpoints) as client:
            def one(i: int) -> None:
                tokens = []
                for ev in client.stream(**specs[i], timeout=120):
                    tokens.append(ev.token_id)
                    first[i].set()
                results[i] = tokens

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
            for t in threads:
                t.start()
            for e in first:
                assert e.wait(60)
            c.router.send_signal(signal.SIGKILL)
            c.router.wait()
            c.start_router()
            for t in threads:
                t.join(120)
        assert results == want
        # the new router has the workers and the frontend again, and nothing left reserved
        wait_for(lambda: c.router_state().get("status") == "ok" and c.router_state().get("frontends") == 1, 60,
                 "workers and the frontend to join the new router")
        wait_for(lambda: c.metric("splitserve_decode_slots_reserved") == 0, 30, "the adopted slots to be freed")
        assert stream_all(c.endpoints, specs) == want


def test_a_new_frontend_answers_what_zmq_clients_sent_before_it_joined_its_router(home, tiny_dir, lm):
    """A frontend serves its ZMQ client port, as HTTP, once the router has told it the fleet's
    state: a request that comes before waits for that (a new frontend, or one started again,
    listens from its start), rather than being refused as "the router is out of reach"."""
    with SplitCluster(home, frontends=1) as c:
        c.start_pipeline(16)
        spec = request_specs(1)[0]
        c.router.send_signal(signal.SIGSTOP)  # the new frontend cannot join it yet
        try:
            port = c.add_frontend()
            wait_for(lambda: (http_json(c.frontend_metrics_ports[-1], "/health") or {}).get("status") == "no router",
                     START_TIMEOUT_S, "the new frontend to start")
            with Client(f"tcp://127.0.0.1:{port}") as client:
                stream = client.stream(**spec, timeout=60)
                time.sleep(0.5)  # at the frontend by now
                c.router.send_signal(signal.SIGCONT)
                answer = [ev.token_id for ev in stream]
        finally:
            c.router.send_signal(signal.SIGCONT)
        assert answer == offline(lm, [spec])[0]


def test_metrics_ports_go_from_the_router_or_gateway_through_frontends_to_workers():
    from splitserve.commands.serve import metrics_ports

    def ports(port: int, frontends: int) -> dict:
        return metrics_ports(argparse.Namespace(metrics_port=port, frontends=frontends, prefill_workers=2,
                                                decode_workers=1))

    assert ports(9000, 1) == {"router": [9000], "frontend": [], "prefill": [9001, 9002], "decode": [9003]}
    assert ports(9000, 3) == {"router": [9000], "frontend": [9001, 9002, 9003], "prefill": [9004, 9005],
                              "decode": [9006]}
    assert ports(0, 3) == {"router": [0], "frontend": [0, 0, 0], "prefill": [0, 0], "decode": [0]}


def test_serve_with_two_frontends_shares_the_http_port_lists_both_zmq_ports_and_drains(home, tiny_dir):
    """... starts again a worker or frontend that dies, and on SIGTERM finishes a stream in flight,
    then exits once its workers have: not after the drain timeout (60 s here), as it did while it
    waited for frontends to exit by themselves."""
    zmq_port, metrics = free_port(), free_ports_in_a_row(5)
    with serve_process(home, "--frontends", "2", "--zmq-port", str(zmq_port), "--drain-timeout", "60",
                       "--metrics-port", str(metrics)) as (serve, lines):
        listed = lines[-1].split("ZMQ clients:")[1].strip().split(", ")
        lines += [serve.stdout.readline(), serve.stdout.readline()]
        assert lines[-1].strip() == (f"/health and /metrics on ports of their own: router {metrics}, frontends "
                                     f"{metrics + 1}-{metrics + 2}, prefill workers {metrics + 3}, decode workers "
                                     f"{metrics + 4}")
        health = [http_json(metrics + i, "/health") for i in range(5)]
        assert health[0]["frontends"] == 2 and health[1]["status"] == health[2]["status"] == "ok"
        assert [h["role"] for h in health[3:]] == ["prefill", "decode"]
        assert sorted(listed) == [f"tcp://127.0.0.1:{zmq_port}", f"tcp://127.0.0.1:{zmq_port + 1}"]
        assert http_json(http_port(lines), "/info")["zmq_endpoints"] == sorted(listed)
        with Client(listed) as client:
            outs = [client.generate("def f(x):", max_new_tokens=4, ignore_eos=True, timeout=60) for _ in range(4)]
        assert len({tuple(o.token_ids) for o in outs}) == 1
        # a worker or frontend that dies is started again: the decode worker and the first frontend,
        # killed, serve again on their own ports (its clients reconnect by themselves)
        for part in ("decode", "frontend-0-"):
            os.kill(wait_for(lambda: child_pid(serve.pid, part), 10, part), signal.SIGKILL)
        with Client(listed[0]) as client:
            def answers() -> bool:
                with contextlib.suppress(SplitserveError):
                    return client.generate("def f(x):", max_new_tokens=4, ignore_eos=True, timeout=5) == outs[0]
                return False

            wait_for(answers, 60, "the decode worker and the frontend to serve again")
        assert http_json(metrics + 4, "/health")["registered"] and http_json(metrics + 1, "/health")["status"] == "ok"
        with Client(listed) as client:
            stream = client.stream("def f(x):", max_new_tokens=300, ignore_eos=True)
            first = next(iter(stream))
            serve.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rest = list(stream)
        assert 1 + len(rest) == 300 and rest[-1].finish_reason == "length" and first.index == 0
        assert serve.wait(timeout=60) == 0
        assert time.monotonic() - signalled < 30


def test_serve_kills_a_frozen_frontend_and_websocket_clients_resume_its_streams(home, tiny_dir, lm):
    """A frontend of serve's that stops answering (SIGSTOP) is found by the WebSocket clients'
    pings within seconds, and their streams on it go on over new connections, whole and exact.
    Serve kills it once the router has been without word from it for three heartbeat timeouts, and
    starts it again: before, it stayed, and the new connections the kernel gave its listening
    socket (the shared port's: half of them) waited on it for good, resumed streams' included."""
    metrics = free_ports_in_a_row(5)  # router, two frontends, two workers
    want = offline(lm, [FROZEN_SPEC])[0]
    with serve_process(home, "--frontends", "2", "--metrics-port", str(metrics)) as (serve, lines):
        port, frozen = http_port(lines), child_pid(serve.pid, "frontend-0-")
        try:
            answers, streaming = asyncio.run(through_a_frozen_frontend(port, [metrics + 1, metrics + 2], frozen,
                                                                       FROZEN_SPEC))
            assert streaming >= 2 and [a.token_ids for a in answers] == [want] * len(answers)
            wait_for(lambda: not os.path.exists(f"/proc/{frozen}"), 30, "serve to kill the frozen frontend")
        finally:
            with contextlib.suppress(ProcessLookupError):  # a stopped process ignores its parent's death
                os.kill(frozen, signal.SIGCONT)
        wait_for(lambda: child_pid(serve.pid, "frontend-0-") not in (None, frozen), 30, "the frontend to start again")
        wait_for(lambda: (http_json(metrics + 1, "/health") or {}).get("status") == "ok", 60, "it to serve")
        short = dict(FROZEN_SPEC, max_new_tokens=8)
        for _ in range(8):  # new connections: each reaches a live frontend
            assert sse_tokens(port, short) == want[:8]


async def sse_stream(port: int, spec: dict, tokens: list[int]) -> None:
    """TGI's /generate_stream, greedy, its token ids appended to `tokens` as they come (an error
    event as it is, last)."""
    body = {"inputs": spec["prompt"], "parameters": {"max_new_tokens": spec["max_new_tokens"], "details": False}}
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", f"http://127.0.0.1:{port}/generate_stream", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    tokens.append(event["token"]["id"] if "token" in event else event)


async def drain_a_frontend(c: SplitCluster, spec: dict, second_signal: bool) -> tuple[list, list]:
    """Streams over ZMQ, WebSocket and HTTP on the cluster's only frontend, which is SIGTERMed once
    each has tokens; -> (what each stream gave: its token ids or its error, what a new request sent
    during the drain got over ZMQ and over the busy WebSocket). `second_signal`: SIGTERM it again then.
    A WebSocket with no request running is closed at once (1012), while the streams still run."""
    proc, _ = c.frontends[-1]
    ws_url = f"ws://127.0.0.1:{c.port}/ws"
    async with AsyncClient(c.endpoints) as zmq_client, AsyncWebSocketClient(ws_url) as ws_client, \
            websockets.connect(ws_url) as idle:
        got: list[list[int]] = [[], [], []]

        async def streamed(client, tokens: list[int]) -> None:
            async for ev in client.stream(**spec):
                tokens.append(ev.token_id)

        async def outcome(run) -> object:
            try:
                await run
            except SplitserveError as e:
                return e
            return None

        runs = [asyncio.ensure_future(outcome(r)) for r in
                (streamed(zmq_client, got[0]), streamed(ws_client, got[1]), sse_stream(c.port, spec, got[2]))]
        await async_wait_for(lambda: all(len(g) >= 5 for g in got), 60, "every stream's first tokens")
        proc.send_signal(signal.SIGTERM)
        await async_wait_for(lambda: (http_json(c.frontend_metrics_ports[-1], "/health") or {}).get("status")
                             == "draining", 10, "/health to say draining")
        await asyncio.wait_for(idle.wait_closed(), 10)
        assert idle.close_code == 1012 and not any(r.done() for r in runs)
        # refused, each waits for its connection to the frontend to end, to go over a new one
        refused = [asyncio.ensure_future(outcome(client.generate("def g():", max_new_tokens=2)))
                   for client in (zmq_client, ws_client)]
        with pytest.raises(httpx.ConnectError):  # no frontend listens on the port any more
            httpx.post(f"http://127.0.0.1:{c.port}/generate", json={"inputs": "def g():"}, timeout=10)
        if second_signal:
            proc.send_signal(signal.SIGTERM)
        ends = await asyncio.gather(*runs)
        refused = await asyncio.gather(*refused)
    return [e or g for e, g in zip(ends, got)], refused


async def streams_through_a_restart(c: Cluster, spec: dict) -> list:
    """`spec` streamed by each client library given the gateway's one endpoint (its ZMQ port, its
    URL); once every stream has a token the gateway is SIGKILLed and, a second later, started
    again on its ports, as its supervisor would. -> their responses."""
    url = f"ws://127.0.0.1:{c.port}/ws"
    started: list[int] = []
    loop = asyncio.get_running_loop()
    with Client(c.endpoint) as zmq_sync, WebSocketClient(url) as ws_sync, ThreadPoolExecutor(2) as threads:
        async with AsyncClient(c.endpoint) as zmq_async, await AsyncWebSocketClient.connect(url) as ws_async:
            runs = [*(loop.run_in_executor(threads, streamed_answer, client.stream(**spec), started)
                      for client in (zmq_sync, ws_sync)),
                    *(streamed_answer_async(client.stream(**spec), started) for client in (zmq_async, ws_async))]
            answers = asyncio.gather(*runs)
            await async_wait_for(lambda: len(started) == len(runs), 60, "every stream's first token")
            c.gateway.kill()
            await asyncio.to_thread(c.gateway.wait)
            await asyncio.sleep(1.0)
            c.start_gateway()
            return await asyncio.wait_for(answers, 120)


def test_clients_of_a_lone_gateway_go_on_when_it_is_started_again(home, tiny_dir, lm):
    """The gateway (one router and frontend: a client has its one endpoint) dies while it streams,
    and its supervisor starts it again on its ports: the stream of every client library goes on
    there after the tokens it has, exact. Before, their tries to connect again gave up within a
    quarter of a second, and the streams failed."""
    spec = {"prompt": "def f(x):", "max_new_tokens": 400, "ignore_eos": True, "timeout": 60}
    with Cluster(home) as c:
        c.start_pipeline(8)
        answers = asyncio.run(streams_through_a_restart(c, spec))
        assert [a.token_ids for a in answers] == offline(lm, [spec]) * 4
        c.wait_idle()


def test_a_stream_closed_while_its_websocket_is_made_again_is_not_sent_again(home, tiny_dir):
    """The sync WebSocket client makes a lost connection again (here for seconds: nothing
    listens) while its caller closes a stream it carried: the request is not sent again over the
    new connection, which its cancel, queued before that connection was there, would never reach
    (before, it ran there to its end, read by nobody)."""
    long = {"prompt": "def f(x):", "max_new_tokens": 1500, "ignore_eos": True, "timeout": 120}
    with Cluster(home) as c:
        c.start_pipeline(8)
        decode = next(w for w, info in c.workers.items() if info["role"] == "decode")
        with WebSocketClient(f"ws://127.0.0.1:{c.port}/ws") as client:
            stream = client.stream(**long)
            next(iter(stream))
            wait_for(lambda: c.health(decode)["admitted"] == 1, 30, "the decode worker to take it")
            c.gateway.kill()
            c.gateway.wait()
            time.sleep(0.5)  # the client is making its connection again, and nothing listens
            stream.close()
            c.start_gateway()
            wait_for(lambda: (http_json(c.port, "/health") or {}).get("status") == "ok", 60, "the workers")
            assert len(client.generate("def g():", max_new_tokens=4, ignore_eos=True, timeout=60).token_ids) == 4
            # the short one only (the long one, sent again, would have gone first over the connection)
            assert c.health(decode)["admitted"] == 2


def test_a_frontend_drains_on_sigterm_and_ends_the_drain_on_a_second(home, tiny_dir, lm):
    """SIGTERM: the streams in flight over ZMQ, WebSocket and HTTP finish whole while new requests
    are refused (a new HTTP connection goes to the port's other frontends, here none) and /health
    says draining, and an idle WebSocket is closed (its client connects again for its next
    request: here to a new frontend); the frontend exits once they have, not at its drain timeout
    (60 s). A second SIGTERM ends the drain at once: what still runs ends with UnavailableError,
    its slots freed."""
    with SplitCluster(home, 1, "tiny-random", 2.0, "--drain-timeout", "60") as c:
        c.start_pipeline(16)
        spec = {"prompt": "def f(x):", "max_new_tokens": 300, "ignore_eos": True}
        want = offline(lm, [spec])[0]
        reconnecting = WebSocketClient(f"ws://127.0.0.1:{c.port}/ws")  # idle through the drain
        answers, refused = asyncio.run(drain_a_frontend(c, spec, second_signal=False))
        signalled_exit = time.monotonic()
        assert answers == [want] * 3
        # refused, they waited to go over a new connection, which none could make: no frontend listens
        assert all(isinstance(e, UnavailableError) for e in refused), refused
        assert "could not be made" in str(refused[0]) and "cannot connect" in str(refused[1]), refused
        assert c.frontends[-1][0].wait(timeout=30) == 0 and time.monotonic() - signalled_exit < 10
        wait_for(lambda: c.router_state().get("frontends") == 0, 30, "the router to forget the frontend")
        with pytest.raises(UnavailableError, match="cannot connect"):  # its frontend closed it; none listens
            reconnecting.generate("def g():", max_new_tokens=2)

        # a new frontend, asked twice to stop: its streams end at the second signal
        c.add_frontend()
        c.wait_ready()
        wait_for(lambda: http_json(c.port, "/health"), 30, "its HTTP port")
        # the WebSocket client connects again, to it
        assert len(reconnecting.generate("def g():", max_new_tokens=3, ignore_eos=True).token_ids) == 3
        reconnecting.close()
        spec["max_new_tokens"] = 1900  # seconds of work: still running at the second signal
        answers, refused = asyncio.run(drain_a_frontend(c, spec, second_signal=True))
        assert all(isinstance(a, UnavailableError) and "shut down before the request finished" in str(a)
                   for a in answers[:2]), answers
        assert answers[2][-1]["error_type"] == "unavailable" and len(answers[2]) < spec["max_new_tokens"]
        assert "could not be made" in str(refused[0]) and "cannot connect" in str(refused[1]), refused
        assert c.frontends[-1][0].wait(timeout=30) == 0
        # the router heard the cancels: no reservation waits for the heartbeat timeout
        wait_for(lambda: c.metric("splitserve_decode_slots_reserved") == 0, 10, "the slots to be freed")
        c.wait_idle()


def test_clients_send_around_a_frontend_that_drains(home, tiny_dir, lm):
    """A frontend shutting down refuses new requests as `draining` and closes each WebSocket once
    none of its requests runs. The ZMQ client given both frontends sends such a request to the
    other one, and the next ones there straight; the WebSocket client sends it over a new
    connection at once, which reaches the other frontend, while its stream on the draining
    frontend goes on over the old one (both WebSocket clients). Their streams there finish whole,
    and no request fails. The router's /info lists the draining frontend no more."""
    loop = asyncio.new_event_loop()  # the AsyncWebSocketClient's
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    async def streamed(client, spec: dict) -> list[int]:
        return [ev.token_id async for ev in client.stream(**spec)]

    with SplitCluster(home, frontends=1) as c:
        c.start_pipeline(16)
        url = f"ws://127.0.0.1:{c.port}/ws"
        # on the first frontend, the only one yet
        ws, aws = WebSocketClient(url), on_loop(AsyncWebSocketClient.connect(url))
        c.add_frontend()
        c.wait_ready()
        long = {"prompt": "def f(x):", "max_new_tokens": 1500, "ignore_eos": True}  # seconds: running throughout
        short = request_specs(6)
        want = offline(lm, [long, *short])
        with Client(c.endpoints) as client, Client(c.endpoints[0]) as on_first, Client(c.endpoints[1]) as on_second, ws:
            # a ZMQ stream on each frontend and the WebSocket's, then SIGTERM the first frontend
            streams = [iter(on_first.stream(**long)), iter(on_second.stream(**long)), iter(ws.stream(**long))]
            firsts = [next(s).token_id for s in streams]
            async_long = asyncio.run_coroutine_threadsafe(streamed(aws, long), loop)
            wait_for(lambda: metric_at(c.frontend_metrics_ports[0], "splitserve_frontend_streams") == 3, 10,
                     "the AsyncWebSocketClient's stream")
            drain_the_first(c)
            # refused on the draining frontend, they go over a new connection at once (the WebSocket's
            # retires), answered while both long streams still run there
            ws_answers = [ws.generate(**s, timeout=60).token_ids for s in short[:2]]
            ws_answers += [on_loop(aws.generate(**s, timeout=60)).token_ids for s in short[:2]]
            assert metric_at(c.frontend_metrics_ports[0], "splitserve_frontend_streams") == 3
            wait_for(lambda: c.router_state("/info").get("zmq_endpoints") == c.endpoints[1:], 10, "/info to drop it")
            answers = [client.generate(**s, timeout=60).token_ids for s in short]
            # the first short request went to the draining frontend (both connections made by
            # now, and equally loaded: the first one first), which refused it; the other frontend
            # answered it and every one after it
            refused = metric_at(c.frontend_metrics_ports[0], "splitserve_requests_total", route="zmq",
                                outcome="unavailable")
            whole = [[first, *(ev.token_id for ev in s)] for first, s in zip(firsts, streams)]
            whole.append(async_long.result(60))
        on_loop(aws.close())
        loop.call_soon_threadsafe(loop.stop)
        assert answers == want[1:] and whole == [want[0]] * 4 and ws_answers == want[1:3] * 2
        assert refused == 1 and frontend_requests(c.frontend_metrics_ports[1]) == 1 + len(short)
        assert metric_at(c.frontend_metrics_ports[1], "splitserve_requests_total", route="/ws", outcome="ok") == 4
        assert c.frontends[0][0].wait(timeout=30) == 0


class ServiceProxy:
    """A load balancer in front of frontends' ZMQ ports, as a Kubernetes Service is: each new
    connection goes to the first of `ports` that is ready and accepts it, byte for byte, until
    either side closes. `ready(i)`: whether `ports[i]` may take new connections (a Service's
    readiness probe, on a frontend's /health: not while it drains); None: every port is."""

    def __init__(self, ports: list[int], ready: Callable[[int], bool] | None = None):
        self.ports, self.ready = ports, ready
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            for i, port in enumerate(self.ports):
                if self.ready is not None and not self.ready(i):
                    continue
                with contextlib.suppress(OSError):
                    upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
                    break
            else:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def drain_the_first(c: SplitCluster) -> None:
    c.frontends[0][0].send_signal(signal.SIGTERM)
    wait_for(lambda: (http_json(c.frontend_metrics_ports[0], "/health") or {}).get("status") == "draining",
             10, "the first frontend to drain")


def still_streaming_on_the_first(c: SplitCluster) -> None:
    assert c.frontends[0][0].poll() is None, "answered only once the draining frontend had exited"
    assert metric_at(c.frontend_metrics_ports[0], "splitserve_frontend_streams") == 1


def around_a_drain(c: SplitCluster, endpoint: str, long: dict, short: list[dict]) -> tuple[list[int], list[list[int]]]:
    """A stream of `long` on the first frontend, which is SIGTERMed once it has a token; then the
    `short` requests, answered (asserted) while the first frontend still streams `long`.
    -> (the long answer, the short ones), by the ZMQ client."""
    with Client(endpoint) as client:
        stream = iter(client.stream(**long))
        first = next(stream).token_id
        drain_the_first(c)
        answers = [client.generate(**s, timeout=60).token_ids for s in short]
        still_streaming_on_the_first(c)
        return [first, *(ev.token_id for ev in stream)], answers


async def around_a_drain_async(c: SplitCluster, endpoint: str, long: dict, short: list[dict]) \
        -> tuple[list[int], list[list[int]]]:
    """As around_a_drain, by the AsyncClient."""
    async with AsyncClient(endpoint) as client:
        stream = client.stream(**long)
        first = (await stream.__anext__()).token_id
        await asyncio.to_thread(drain_the_first, c)
        answers = [(await client.generate(**s, timeout=60)).token_ids for s in short]
        still_streaming_on_the_first(c)
        return [first, *[ev.token_id async for ev in stream]], answers


@pytest.mark.parametrize("asynchronous", [False, True], ids=["Client", "AsyncClient"])
def test_a_client_behind_a_load_balancer_sends_what_a_draining_frontend_refused_to_the_next(home, tiny_dir, lm,
                                                                                             asynchronous):
    """Through one endpoint (a load balancer, as a Kubernetes Service is), a ZMQ client's request
    that a draining frontend refuses goes over a second connection, which reaches another frontend,
    as do the next ones: no error, no wait for the draining frontend's streams, while its stream
    there finishes whole."""
    with SplitCluster(home, frontends=2) as c:
        c.start_pipeline(16)
        # to the first frontend while it is ready (not once it drains: /health says so)
        proxy = ServiceProxy([port for _, port in c.frontends], lambda i: (http_json(
            c.frontend_metrics_ports[i], "/health") or {}).get("status") == "ok")
        long = {"prompt": "def f(x):", "max_new_tokens": 1500, "ignore_eos": True}  # seconds of work
        short = request_specs(2)
        want = offline(lm, [long, *short])
        try:
            endpoint = f"tcp://127.0.0.1:{proxy.port}"
            whole, answers = asyncio.run(around_a_drain_async(c, endpoint, long, short)) if asynchronous \
                else around_a_drain(c, endpoint, long, short)
        finally:
            proxy.close()
        assert whole == want[0] and answers == want[1:]
        assert frontend_requests(c.frontend_metrics_ports[1]) == len(short)


def test_a_client_behind_a_load_balancer_resumes_what_a_dead_frontend_streamed_at_the_next(home, tiny_dir, lm):
    """Through one endpoint (a load balancer), a ZMQ client's stream whose frontend dies goes on
    over the connection made anew, which reaches another frontend: the whole answer, no error."""
    with SplitCluster(home, frontends=2) as c:
        c.start_pipeline(16)
        proxy = ServiceProxy([port for _, port in c.frontends])  # to the first frontend while it listens
        long = {"prompt": "def f(x):", "max_new_tokens": 600, "ignore_eos": True}
        try:
            with Client(f"tcp://127.0.0.1:{proxy.port}") as client:
                stream = iter(client.stream(**long, timeout=60))
                first = next(stream).token_id
                c.frontends[0][0].send_signal(signal.SIGKILL)
                whole = [first, *(ev.token_id for ev in stream)]
        finally:
            proxy.close()
        assert whole == offline(lm, [long])[0]
        assert frontend_requests(c.frontend_metrics_ports[1]) == 1


def test_serve_drains_a_worker_started_again_that_registers_during_its_drain(home, tiny_dir):
    """A decode worker that died is started again; if serve is stopped before the new one has
    registered, the router tells it to drain as it registers, and serve exits at once, not when
    the drain timeout (60 s here) and its grace have run out."""
    with serve_process(home, "--drain-timeout", "60") as (serve, _):
        os.kill(wait_for(lambda: child_pid(serve.pid, "decode"), 10, "the decode worker"), signal.SIGKILL)
        restarted = wait_for(lambda: child_pid(serve.pid, "-r1"), 30, "the decode worker to start again", interval=0.01)
        os.kill(restarted, signal.SIGSTOP)  # held before it registers ...
        serve.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(1.0)  # ... until serve's drain has begun
        os.kill(restarted, signal.SIGCONT)
        assert serve.wait(timeout=50) == 0 and time.monotonic() - signalled < 30
