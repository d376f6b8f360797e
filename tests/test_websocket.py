"""The WebSocket front and its clients on a live gateway: many requests interleaved on one
connection, JSON and MessagePack, cancel messages, and a closed socket cancelling its requests."""

from __future__ import annotations

import asyncio
import threading

import msgspec
import pytest
from websockets.sync.client import connect

from cluster import Cluster, http_json, wait_for
from splitserve.client import AsyncWebSocketClient, Client, UnavailableError, ValidationError, WebSocketClient

PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n",
           "for i in range(10):\n\tprint(i)  # 🐍\n"]


def specs(n: int) -> list[dict]:
    """n requests: greedy and seeded sampled, different prompts and lengths."""
    out = []
    for i in range(n):
        spec = {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 3 + (i * 5) % 11, "ignore_eos": True}
        if i % 2:
            spec.update(temperature=0.9, top_k=40, seed=100 + i)
        out.append(spec)
    return out


@pytest.fixture(scope="module")
def url(pipeline) -> str:
    return pipeline.url.replace("http://", "ws://") + "/ws"


@pytest.fixture(scope="module")
def reference(pipeline) -> list:
    with Client(pipeline.endpoint) as zmq:
        return [zmq.generate(**s) for s in specs(16)]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_16_interleaved_requests_on_one_connection(url, reference, encoding):
    results: list = [None] * 16
    with WebSocketClient(url, encoding=encoding) as ws:
        def run(i: int) -> None:
            stream = ws.stream(**specs(16)[i], details=True, timeout=60)
            results[i] = stream.response()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [(r.text, r.token_ids, r.finish_reason) for r in results] == \
        [(r.text, r.token_ids, r.finish_reason) for r in reference]
    assert all(len(r.details.tokens) == len(r.token_ids) and r.details.tokens[0].logprob < 0 for r in results)


async def test_async_client_interleaves_and_cancels(pipeline, url, reference):
    cancelled = pipeline.metric("splitserve_requests_total", route="/ws", outcome="cancelled")
    async with AsyncWebSocketClient(url) as ws:
        results = await asyncio.gather(*(ws.generate(**s, timeout=60) for s in specs(16)))
        assert [r.token_ids for r in results] == [r.token_ids for r in reference]
        async with ws.stream(PROMPTS[0], max_new_tokens=1500, ignore_eos=True) as stream:
            async for event in stream:
                if event.index == 2:
                    break
        # the connection goes on serving after a cancel
        assert (await ws.generate(**specs(1)[0])).token_ids == reference[0].token_ids
    wait_for(lambda: pipeline.metric("splitserve_requests_total", route="/ws", outcome="cancelled") == cancelled + 1,
             30, "the gateway to cancel the request")
    in_flight_is_zero(pipeline)


def text(message: dict) -> str:
    """A JSON text frame (bytes would go as a binary frame, read as MessagePack)."""
    return msgspec.json.encode(message).decode()


def test_json_protocol_by_hand(url, reference):
    spec = specs(1)[0]
    with connect(url) as ws:
        ws.send(text({"type": "generate", "id": "a", "prompt": spec["prompt"],
                      "parameters": {"max_new_tokens": spec["max_new_tokens"], "ignore_eos": True}}))
        replies = []
        while not replies or replies[-1]["finish_reason"] is None:
            frame = ws.recv()
            assert isinstance(frame, str)  # a JSON request is answered in JSON text
            replies.append(msgspec.json.decode(frame))
        assert all(r["type"] == "tokens" and r["id"] == "a" for r in replies)
        assert [t["token_id"] for r in replies for t in r["tokens"]] == reference[0].token_ids
        assert replies[0]["prompt_tokens"] > 0 and replies[-1]["finish_reason"] == "length"

        ws.send(msgspec.msgpack.encode({"type": "generate", "id": "b", "prompt": PROMPTS[1],
                                        "parameters": {"max_new_tokens": 1500, "ignore_eos": True}}))
        first = msgspec.msgpack.decode(ws.recv())  # MessagePack in, MessagePack out
        assert first["id"] == "b" and first["tokens"]
        ws.send(text({"type": "cancel", "id": "b"}))
        last = first
        while last["finish_reason"] is None:
            frame = ws.recv()
            last = msgspec.msgpack.decode(frame) if isinstance(frame, bytes) else msgspec.json.decode(frame)
        assert last["finish_reason"] == "cancelled"

        ws.send('{"type": "generate", "id": "c", "parameters": {"max_new_tokenz": 3}}')
        error = msgspec.json.decode(ws.recv())
        assert (error["type"], error["id"], error["error_type"]) == ("error", "c", "validation")
        assert "max_new_tokenz" in error["message"]
        ws.send("{not json")
        assert msgspec.json.decode(ws.recv())["id"] == ""
        ws.send(text({"type": "generate", "id": "d", "prompt": "x", "parameters": {"top_n_tokens": 9}}))
        error = msgspec.json.decode(ws.recv())
        assert (error["id"], error["error_type"]) == ("d", "validation") and "top_n_tokens" in error["message"]


async def test_errors_reach_the_clients_as_exceptions(url):
    with WebSocketClient(url) as ws, pytest.raises(ValidationError, match="max_total_tokens"):
        ws.generate("x", max_new_tokens=10**6)
    client = await AsyncWebSocketClient.connect(url, encoding="json")
    try:
        with pytest.raises(ValidationError, match="top_n_tokens"):
            await client.generate("x", top_n_tokens=9)
    finally:
        await client.close()
    with pytest.raises(UnavailableError):
        WebSocketClient(url.replace("/ws", "/nowhere"))


def test_closing_the_socket_cancels_its_requests(pipeline, url):
    cancelled = pipeline.metric("splitserve_requests_total", route="/ws", outcome="cancelled")
    with connect(url) as ws:
        for i in range(3):
            ws.send(msgspec.msgpack.encode({"type": "generate", "id": str(i), "prompt": PROMPTS[i],
                                            "parameters": {"max_new_tokens": 1500, "ignore_eos": True}}))
        started = set()
        while len(started) < 3:
            started.add(msgspec.msgpack.decode(ws.recv())["id"])
    wait_for(lambda: pipeline.metric("splitserve_requests_total", route="/ws", outcome="cancelled") == cancelled + 3,
             30, "the gateway to cancel the closed socket's requests")
    in_flight_is_zero(pipeline)


def in_flight_is_zero(c: Cluster) -> None:
    wait_for(lambda: c.metric("splitserve_requests_in_flight") == 0, 30, "no request in flight")


def test_requests_after_the_connection_died_fail_at_once_then_connect_again(home, tiny_dir):
    """Whether a request starts before or after the reader sees the close, it fails with
    UnavailableError, not after its own timeout; once a gateway listens again, the next request
    reaches it over a new connection (this one has no workers: it refuses as such)."""
    with Cluster(home, heartbeat_timeout=0.5) as c:  # no workers: a short settle before "no prefill worker"
        ws_url = c.url.replace("http", "ws") + "/ws"

        def restart() -> None:
            c.start_gateway()
            wait_for(lambda: http_json(c.port, "/health"), 60, "the HTTP front")

        wait_for(lambda: http_json(c.port, "/health"), 60, "the HTTP front")
        with WebSocketClient(ws_url) as client:
            c.gateway.kill()
            c.gateway.wait()
            for _ in range(2):  # the second surely after the close was seen
                with pytest.raises(UnavailableError):
                    client.generate("def f():", max_new_tokens=2, timeout=600)
            restart()
            with pytest.raises(UnavailableError, match="no prefill worker"):
                client.generate("def f():", max_new_tokens=2, timeout=600)

        async def run_async() -> None:
            async with AsyncWebSocketClient(ws_url) as client:
                c.gateway.kill()
                c.gateway.wait()
                for _ in range(2):
                    with pytest.raises(UnavailableError):
                        await client.generate("def f():", max_new_tokens=2, timeout=600)
                restart()
                with pytest.raises(UnavailableError, match="no prefill worker"):
                    await client.generate("def f():", max_new_tokens=2, timeout=600)

        asyncio.run(asyncio.wait_for(run_async(), 120))


def test_frames_are_not_compressed_even_when_the_client_offers_it(url):
    """A browser offers permessage-deflate; deflating every token's small frame would cost the
    frontend more CPU per token than the bytes save, so the server declines it."""
    with connect(url, compression="deflate") as ws:  # websockets' default offer, as a browser's
        assert ws.protocol.extensions == []
        ws.send(msgspec.json.encode({"type": "generate", "id": "a", "prompt": "x",
                                     "parameters": {"max_new_tokens": 2}}).decode())
        reply = msgspec.json.decode(ws.recv())
        assert reply["id"] == "a" and reply["type"] == "tokens"
