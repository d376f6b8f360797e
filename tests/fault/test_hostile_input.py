"""Pickles, oversized messages and frames nested past the decoders' depth on every socket a splitserve cluster listens on: the gateway's
ZMQ front, its worker port, the decode worker's KV port, the HTTP routes and the WebSocket. Each is
refused (a typed error, a 4xx, a dropped frame or connection) and nothing is ever unpickled: the
pickles here would create a directory if anything loaded them. Every process keeps serving."""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
import time

import httpx
import msgspec
import pytest
import zmq
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cluster import Cluster
from splitserve.client import AsyncClient, Client, ValidationError, WebSocketClient
from splitserve.common import protocol as P

PROMPT = "def fibonacci(n):\n    "
TOO_BIG = P.MAX_CONTROL_BYTES + 1
HTTP_ROUTES = ("/generate", "/generate_stream", "/", "/v1/completions", "/v1/chat/completions", "/infill")


class Boom:
    """Unpickling this makes a directory: proof, if it ever exists, that something unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def cluster(home, tiny_dir):
    with Cluster(home) as c:
        c.start_pipeline(8)
        yield c


@pytest.fixture()
def pickles(tmp_path) -> tuple[list[bytes], str]:
    marker = str(tmp_path / "unpickled")
    payloads = [pickle.dumps(Boom(marker), protocol=p) for p in (0, 2, pickle.HIGHEST_PROTOCOL)]
    payloads.append(pickle.dumps({"kind": "Generate", "id": "x", "prompt": PROMPT}))
    payloads.append(pickle.dumps(P.Generate("x", PROMPT)))  # a real message, pickled instead of packed
    return payloads, marker


def test_pickles_are_refused_everywhere(cluster, pickles):
    payloads, marker = pickles
    ctx = zmq.Context()
    try:
        front = dealer(ctx, cluster.endpoint)
        for p in payloads:
            front.send(p)
        for _ in payloads:  # each is answered with a typed error about the connection
            assert front.poll(30_000), "no answer from the client front"
            error = P.decode(P.decoder(P.GatewayToClient), front.recv_multipart()[0])
            assert isinstance(error, P.Error) and error.error_type == "validation" and error.id == ""
        for endpoint in (f"tcp://127.0.0.1:{cluster.worker_port}", kv_endpoint(cluster)):  # dropped, unanswered
            sock = dealer(ctx, endpoint)
            for p in payloads:
                sock.send(p)
                sock.send_multipart([p, p])
        with httpx.Client(base_url=cluster.url, timeout=60) as http:
            for route in HTTP_ROUTES:
                for content_type in ("application/json", "application/octet-stream", "application/python-pickle"):
                    for p in payloads:
                        r = http.post(route, content=p, headers={"Content-Type": content_type})
                        assert r.status_code in (400, 422), (route, content_type, r.status_code, r.text)
                        assert "error" in r.json()
        with connect(ws_url(cluster)) as ws:
            for p in payloads:
                ws.send(p)  # binary: taken as MessagePack
                reply = msgspec.msgpack.decode(ws.recv(timeout=30))
                assert reply["type"] == "error" and reply["error_type"] == "validation"
            ws.send(payloads[0].decode("latin-1"))  # protocol 0 is text: taken as JSON
            assert msgspec.json.decode(ws.recv(timeout=30))["error_type"] == "validation"
        still_serving(cluster)
        assert not os.path.exists(marker)
    finally:
        ctx.destroy(linger=0)


def test_frames_nested_past_the_decoders_depth_are_dropped(cluster):
    # {"k": {"k": ... null}} 100,000 deep, as MessagePack (no encoder writes it): where a field is
    # untyped (the KV link's staging description) the decoder recurses into it
    deep = b"\x81\xa1k" * 100_000 + b"\xc0"
    pack = msgspec.msgpack.encode
    payloads = [b"\x91" * 100_000 + b"\xc0", b"\x93" + pack("KvStaging") + pack("prefill-x") + deep,
                b"\x95" + pack("Generate") + pack("x") + pack("p") + b"\xc0\x91" + deep]
    ctx = zmq.Context()
    try:
        front = dealer(ctx, cluster.endpoint)
        for p in payloads:
            front.send(p)
            assert front.poll(30_000), "no answer from the client front"
            error = P.decode(P.decoder(P.GatewayToClient), front.recv_multipart()[0])
            assert isinstance(error, P.Error) and error.error_type == "validation"
        for endpoint in (f"tcp://127.0.0.1:{cluster.worker_port}", kv_endpoint(cluster)):
            sock = dealer(ctx, endpoint)
            for p in payloads:
                sock.send(p)
        with connect(ws_url(cluster)) as ws:
            for p in payloads:
                ws.send(p)
                assert msgspec.msgpack.decode(ws.recv(timeout=30))["error_type"] == "validation"
        still_serving(cluster)
    finally:
        ctx.destroy(linger=0)


def test_oversized_messages_are_refused_everywhere(cluster):
    big = b"x" * TOO_BIG
    ctx = zmq.Context()
    try:
        # ZMQ drops the connection of a peer that sends past ZMQ_MAXMSGSIZE before the gateway reads it
        for endpoint in (cluster.endpoint, f"tcp://127.0.0.1:{cluster.worker_port}", kv_endpoint(cluster)):
            dealer(ctx, endpoint).send(big)
        with httpx.Client(base_url=cluster.url, timeout=60) as http:
            r = http.post("/generate", content=big, headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"

            def chunks():  # no Content-Length: the limit counts what arrives
                for _ in range(TOO_BIG // 2**20 + 1):
                    yield b" " * 2**20

            r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        # The whole message: the server refuses it from its frame's header and closes without reading
        # the rest, so the client, still sending, may meet the close (1009) or a reset.
        with pytest.raises((ConnectionClosed, OSError)):
            with connect(ws_url(cluster), max_size=None) as ws:
                ws.send(big)
                ws.recv(timeout=30)
        # Only the header of such a frame, as a client may send it (masked, 64-bit length): the close
        # code comes back, since nothing is left unread.
        with connect(ws_url(cluster)) as ws:
            ws.socket.sendall(struct.pack("!BBQ", 0x82, 0x80 | 127, TOO_BIG) + os.urandom(4))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd.code == 1009  # message too big
        still_serving(cluster)
    finally:
        ctx.destroy(linger=0)


def test_a_huge_prompt_is_refused_while_the_other_streams_flow(cluster):
    """A 2 MB prompt keeps the tokenizer busy for most of a second, on the frontend's tokenizer
    thread: its event loop streams on meanwhile (in the loop it stopped every stream for as long).
    Over TGI, OpenAI and ZMQ, each refused as too long, while a stream over ZMQ runs beside it."""
    huge = "a" * 2_000_000

    async def tgi(http: httpx.AsyncClient, _) -> None:
        r = await http.post("/generate", json={"inputs": huge})
        assert r.status_code == 422 and "at most 2047 are allowed" in r.json()["error"], r.text

    async def openai(http: httpx.AsyncClient, _) -> None:
        r = await http.post("/v1/completions", json={"prompt": huge, "max_tokens": 4})
        assert r.status_code == 400 and "at most 2047 are allowed" in r.json()["error"]["message"], r.text

    async def over_zmq(_, client: AsyncClient) -> None:
        with pytest.raises(ValidationError, match="at most 2047 are allowed"):
            await client.generate(huge, max_new_tokens=4)

    async def beside(send) -> tuple[list[float], float, float]:
        """(the stream's token times, when the huge request went, when its answer came): the stream
        is long enough to outlast the answer, and cancelled 8 tokens after it."""
        stamps: list[float] = []
        answered = asyncio.Event()
        async with AsyncClient(cluster.endpoint) as client, httpx.AsyncClient(base_url=cluster.url, timeout=60) as http:

            async def stream() -> None:
                after = 0
                async with client.stream(PROMPT, max_new_tokens=2000, ignore_eos=True) as events:
                    async for _ in events:
                        stamps.append(time.perf_counter())
                        after += answered.is_set()
                        if after == 8:
                            return  # still flowing after the answer; leaving the block cancels it

            streaming = asyncio.create_task(stream())
            while len(stamps) < 8:  # flowing
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            await send(http, client)
            end = time.perf_counter()
            answered.set()
            await streaming
        return stamps, start, end

    for send in (tgi, openai, over_zmq):
        # a loop held by the tokenizer stops the stream every time; a stall of the shared machine's
        # (once 0.56 s in a whole run of the suite here, where gaps are 0.05 s) does not come twice
        for attempt in (1, 2):
            stamps, start, end = asyncio.run(beside(send))
            assert stamps[-1] > end, f"{send.__name__}: the stream ended before the huge request's answer"
            gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b > start and a < end]
            if max(gaps) < (end - start) / 4:
                break
            assert attempt == 1, f"{send.__name__}: a gap of {max(gaps):.3f} s in {end - start:.3f} s, twice"
    still_serving(cluster)


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def kv_endpoint(cluster: Cluster) -> str:
    decode = next(w for w, info in cluster.workers.items() if info["role"] == "decode")
    return cluster.health(decode)["kv_endpoint"]


def ws_url(cluster: Cluster) -> str:
    return cluster.url.replace("http://", "ws://") + "/ws"


def still_serving(cluster: Cluster) -> None:
    """Every process alive, and a request served on every front end."""
    assert all(p.poll() is None for p in cluster.procs)
    with Client(cluster.endpoint) as client:
        assert len(client.generate(PROMPT, max_new_tokens=4, ignore_eos=True).token_ids) == 4
    with WebSocketClient(ws_url(cluster)) as ws:
        assert len(ws.generate(PROMPT, max_new_tokens=4, ignore_eos=True).token_ids) == 4
    r = httpx.post(f"{cluster.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}, timeout=60)
    assert r.status_code == 200
