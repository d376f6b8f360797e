"""Limits on a live gateway: 503 before any worker registers, 429 (with Retry-After) past
--max-concurrent-requests on every front end, and requests cancelled when their client goes away (HTTP, or
a ZMQ connection that closes)."""

from __future__ import annotations

import socket

import httpx
import pytest
import zmq

from cluster import Cluster, http_json, wait_for
from splitserve.client import Client, OverloadedError, WebSocketClient
from splitserve.common import protocol as P

PROMPT = "def fibonacci(n):\n    "
LONG = {"max_new_tokens": 1500}  # tiny-random's greedy text runs this long without an end-of-text


def test_unavailable_overloaded_and_disconnects(home, tiny_dir):
    with Cluster(home, max_concurrent_requests=1) as c, httpx.Client(base_url=c.url, timeout=60) as http:
        # no worker yet: 503, as TGI and OpenAI clients expect of a server that is not ready
        health = wait_for(lambda: http_json(c.port, "/health"), 60, "the HTTP front")
        assert health == {"status": "no workers", "prefill_workers": 0, "decode_workers": 0}
        r = http.post("/generate", json={"inputs": PROMPT})
        assert r.status_code == 503 and r.json() == {"error": "no prefill worker is available",
                                                     "error_type": "unavailable"}
        assert "retry-after" not in r.headers  # only an overload says when to come back
        assert http.post("/v1/completions", json={"prompt": PROMPT}).status_code == 503

        c.start_pipeline(4)

        with Client(c.endpoint) as zmq:
            running = zmq.stream(PROMPT, max_new_tokens=1500, ignore_eos=True, timeout=120)
            next(iter(running))
            r = http.post("/generate", json={"inputs": PROMPT})
            assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
            assert "the limit is 1 (max_concurrent_requests)" in r.json()["error"]
            assert r.headers["retry-after"] == "1"  # seconds, as RFC 9110 has it; clients back off that long
            r = http.post("/generate_stream", json={"inputs": PROMPT})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            r = http.post("/v1/completions", json={"prompt": PROMPT, "stream": True})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            assert r.headers["retry-after"] == "1"
            assert http.post("/v1/completions", json={"prompt": PROMPT}).headers["retry-after"] == "1"
            with WebSocketClient(c.url.replace("http", "ws") + "/ws") as ws, pytest.raises(OverloadedError):
                ws.generate(PROMPT)
            with Client(c.endpoint) as other, pytest.raises(OverloadedError):
                other.generate(PROMPT)
            running.close()
        in_flight_is_zero(c)
        assert c.metric("splitserve_requests_total", route="/generate", outcome="overloaded") == 1
        assert c.metric("splitserve_requests_total", route="zmq", outcome="overloaded") == 1
        assert c.metric("splitserve_requests_total", route="zmq", outcome="cancelled") == 1

        # a stream whose client goes away is cancelled at the gateway
        with httpx.Client(base_url=c.url, timeout=60) as leaving:
            with leaving.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": LONG}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
        wait_for(lambda: c.metric("splitserve_requests_total", route="/generate_stream", outcome="cancelled") == 1,
                 30, "the abandoned stream to be cancelled")
        in_flight_is_zero(c)

        # and so is a plain request whose client gives up waiting
        with httpx.Client(base_url=c.url, timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/generate", json={"inputs": PROMPT, "parameters": LONG})
        wait_for(lambda: c.metric("splitserve_requests_total", route="/generate", outcome="cancelled") == 1,
                 30, "the abandoned request to be cancelled")
        in_flight_is_zero(c)
        # and so is a ZMQ request whose client's connection closes without a Cancel
        gone_client_streams_until_closed(c.endpoint)
        wait_for(lambda: c.metric("splitserve_requests_total", route="zmq", outcome="cancelled") == 2,
                 30, "the vanished ZMQ client's request to be cancelled")
        in_flight_is_zero(c)
        # the one place is free again
        assert http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).status_code == 200


def gone_client_streams_until_closed(endpoint: str) -> None:
    """A bare DEALER: one long request, its first reply, then the socket closes mid-stream."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(P.encode(P.Generate("gone", PROMPT, params=P.GenerateParams(max_new_tokens=1500, ignore_eos=True))))
    assert sock.poll(60_000), "no reply to the request"
    assert isinstance(P.decode(P.decoder(P.GatewayToClient), sock.recv()), P.TokenBatch)
    sock.close(linger=0)
    ctx.term()


def in_flight_is_zero(c: Cluster) -> None:
    wait_for(lambda: c.metric("splitserve_requests_in_flight") == 0, 30, "no request in flight")


def test_connections_past_the_limit_get_503_until_one_closes(home, tiny_dir):
    with Cluster(home, max_connections=2) as c:
        wait_for(lambda: http_json(c.port, "/health"), 60, "the HTTP front")
        idle = [socket.create_connection(("127.0.0.1", c.port)) for _ in range(2)]
        # each call opens a connection of its own; the idle two are accepted in the meantime
        refused = wait_for(lambda: (r := httpx.get(f"{c.url}/metrics")).status_code == 503 and r, 30,
                           "a request past the connection limit to be refused")
        assert refused.headers["connection"] == "close"
        idle.pop().close()  # one idle and the asking one: two, at the limit
        wait_for(lambda: httpx.get(f"{c.url}/metrics").status_code == 200, 30, "a connection to be free again")
        idle.pop().close()


def test_a_refusal_before_a_streams_first_event_is_an_http_error_in_the_apis_shape(home, tiny_dir):
    # The frontend's own check passes (both workers are there); the router then finds that the pair
    # cannot hand KV over (it was told tcp, the decode worker offers shm) and refuses the admission.
    with Cluster(home, kv_transport="tcp") as c, httpx.Client(base_url=c.url, timeout=60) as http:
        c.add_worker("prefill")
        c.add_worker("decode", "--num-slots", "4", "--kv-transport", "shm")
        c.wait_registered()
        wait_for(lambda: (http_json(c.port, "/health") or {}).get("status") == "ok", 60, "the HTTP front")
        r = http.post("/generate_stream", json={"inputs": PROMPT})
        assert r.status_code == 503 and r.json()["error_type"] == "unavailable", r.text
        assert "the decode worker offers shm" in r.json()["error"]
        r = http.post("/v1/completions", json={"prompt": PROMPT, "stream": True})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        assert c.metric("splitserve_requests_total", route="/generate_stream", outcome="unavailable") == 1
