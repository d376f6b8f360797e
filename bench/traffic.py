"""Mixed client traffic for soak runs and leak tests: every front end (ZMQ, WebSocket, TGI and
OpenAI over HTTP, streamed or not) and every way a request can end (in full, on a stop string,
cancelled by its client, or with its client gone mid-way).

The i-th request is drawn from a seeded generator, so a run is the same mix whatever order its
requests run in. Each request comes back as a Trace: when it was sent, when each token arrived
(for streamed fronts), and how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import httpx
import msgspec

FRONTS = ("zmq", "ws", "tgi", "tgi_stream", "openai", "openai_stream")
ENDINGS = ("full", "stop", "cancel", "disconnect")
STREAMED = frozenset({"zmq", "ws", "tgi_stream", "openai_stream"})
PROMPTS = (
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i in range(10):\n\tprint(i)  # 🐍\n",
    "x = {'a': 1, 'b': [1, 2, 3]}\n",
    "# 变量 and strings\nname = '日本語'\n",
)
STOP = ["e", "\n"]  # frequent in any text: requests asking for them end early
# Outcomes that are not failures: a request that ran to its end, or ended as its client chose.
GOOD = frozenset({"ok", "cancelled", "disconnected"})
# A non-streamed HTTP request whose client gives up: it waits this long per token it would have read.
IMPATIENCE_S = 0.01


@dataclass(frozen=True)
class Script:
    front: str
    ending: str
    prompt: str
    max_new_tokens: int
    read: int  # tokens read before a cancel or a disconnect
    seed: int | None  # sampled when set, greedy otherwise


def script(i: int, seed: int, max_new_tokens: tuple[int, int] = (2, 12), fronts=FRONTS, endings=ENDINGS) -> Script:
    rng = random.Random(seed * 1_000_003 + i)
    ending = rng.choice(endings)
    lo, hi = max_new_tokens
    if ending in ("cancel", "disconnect"):
        lo = hi = 3 * hi  # long enough to be cut short
    return Script(rng.choice(fronts), ending, rng.choice(PROMPTS), rng.randint(lo, hi), rng.randint(0, 3),
                rng.randrange(2**31) if rng.random() < 0.5 else None)


@dataclass
class Trace:
    script: Script
    sent: float
    times: list[float] = field(default_factory=list)  # each token's arrival (streamed fronts)
    outcome: str = ""  # one of GOOD, "overloaded", or what went wrong
    done: float = 0.0

    @property
    def failed(self) -> bool:
        return self.outcome not in GOOD and self.outcome != "overloaded"


class Clients:
    """One connection per front end, shared by every request (`async with Clients(...) as c`);
    requests whose client goes away open a connection of their own."""

    def __init__(self, zmq_endpoint: str, http_url: str, connections: int = 64):
        self.zmq_endpoint, self.http_url = zmq_endpoint, http_url
        self.ws_url = http_url.replace("http://", "ws://", 1) + "/ws"
        self.connections = connections

    async def __aenter__(self) -> Clients:
        from splitserve.client import AsyncClient, AsyncWebSocketClient

        self.stack = contextlib.AsyncExitStack()
        self.zmq = await self.stack.enter_async_context(AsyncClient(self.zmq_endpoint))
        self.ws = await self.stack.enter_async_context(AsyncWebSocketClient(self.ws_url))
        limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
        self.http = await self.stack.enter_async_context(
            httpx.AsyncClient(base_url=self.http_url, timeout=120, limits=limits))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stack.aclose()

    async def run(self, p: Script) -> Trace:
        trace = Trace(p, time.perf_counter())
        try:
            if p.front in ("zmq", "ws"):
                await self._client_stream(p, trace)
            elif p.front.endswith("_stream"):
                await self._http_stream(p, trace)
            else:
                await self._http(p, trace)
        except Exception as e:  # the run goes on; the trace says what happened
            from splitserve.client import OverloadedError

            trace.outcome = "overloaded" if isinstance(e, OverloadedError) else f"{type(e).__name__}: {e}"
        trace.done = time.perf_counter()
        return trace

    # ---- ZMQ and WebSocket: the client library -------------------------------------------------

    async def _client_stream(self, p: Script, trace: Trace) -> None:
        from splitserve.client import AsyncClient, AsyncWebSocketClient

        options = dict(max_new_tokens=p.max_new_tokens, stop=STOP if p.ending == "stop" else None,
                       seed=p.seed, timeout=120)
        if p.ending != "disconnect":
            client = self.zmq if p.front == "zmq" else self.ws
            async with client.stream(p.prompt, **options) as stream:  # leaving it early cancels the request
                await _read(stream, p, trace)
            return
        # A client of its own, closed mid-request without a word: the server must notice (WebSocket)
        # or let the request run out (ZMQ, which cannot tell a client is gone).
        client = AsyncClient(self.zmq_endpoint) if p.front == "zmq" else await AsyncWebSocketClient.connect(self.ws_url)
        try:
            await _read(client.stream(p.prompt, **options), p, trace)
        finally:
            await client.close()

    # ---- HTTP -----------------------------------------------------------------------------------

    async def _http_stream(self, p: Script, trace: Trace) -> None:
        path, body = _http_request(p, stream=True)
        async with self.http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                trace.outcome = _refused(r)
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = msgspec.json.decode(line[6:])
                if "error" in event:
                    trace.outcome = f"error event: {event['error']}"
                    return
                if event.get("token") is not None or event.get("choices"):
                    trace.times.append(time.perf_counter())
                    if p.ending in ("cancel", "disconnect") and len(trace.times) > p.read:
                        trace.outcome = "disconnected"  # leaving the block closes the connection
                        return
        trace.outcome = "ok"

    async def _http(self, p: Script, trace: Trace) -> None:
        path, body = _http_request(p, stream=False)
        if p.ending in ("cancel", "disconnect"):
            # an impatient client: it gives up and closes the connection, unless the answer came first
            try:
                r = await self.http.post(path, json=body, timeout=httpx.Timeout(120, read=IMPATIENCE_S * (1 + p.read)))
            except httpx.ReadTimeout:
                trace.outcome = "disconnected"
                return
        else:
            r = await self.http.post(path, json=body)
        trace.outcome = "ok" if r.status_code == 200 else _refused(r)


async def _read(stream: AsyncIterator, p: Script, trace: Trace) -> None:
    """Read the stream's tokens, or only `p.read` of them when its client leaves early."""
    leaves = p.ending in ("cancel", "disconnect")
    async for ev in stream:
        if ev.token_id is not None:
            trace.times.append(time.perf_counter())
        if ev.finish_reason is not None:
            trace.outcome = "ok" if ev.finish_reason in ("length", "eos_token", "stop_sequence") else ev.finish_reason
            return
        if leaves and len(trace.times) > p.read:
            trace.outcome = "cancelled" if p.ending == "cancel" else "disconnected"
            return
    trace.outcome = trace.outcome or "no finish reason"


def _http_request(p: Script, stream: bool) -> tuple[str, dict]:
    stop = STOP if p.ending == "stop" else None
    if p.front.startswith("tgi"):
        params = {"max_new_tokens": p.max_new_tokens, "stop": stop or [], "details": False}
        if p.seed is not None:
            params.update(do_sample=True, seed=p.seed)
        return ("/generate_stream" if stream else "/generate"), {"inputs": p.prompt, "parameters": params}
    body = {"prompt": p.prompt, "max_tokens": p.max_new_tokens, "stop": stop, "stream": stream,
            "temperature": 0 if p.seed is None else 1.0, "seed": p.seed}
    return "/v1/completions", body


def _refused(r: httpx.Response) -> str:
    if r.status_code == 429:  # an overload must tell the client when to come back
        return "overloaded" if "retry-after" in r.headers else "429 without Retry-After"
    return f"HTTP {r.status_code}: {r.text[:200]}"


async def tgi_stream_light(host: str, port: int, p: Script) -> Trace:
    """One TGI stream (/generate_stream, greedy) on a raw connection of its own. A client this light
    can offer a few hundred requests a second on a small machine without becoming the bottleneck
    of what it measures, as httpx would."""
    trace = Trace(p, time.perf_counter())
    body = msgspec.json.encode({"inputs": p.prompt, "parameters": {"max_new_tokens": p.max_new_tokens,
                                                                     "details": False}})
    head = (f"POST /generate_stream HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head.encode() + body)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 429:
            trace.outcome = "overloaded" if "retry-after" in headers else "429 without Retry-After"
        elif status != 200:
            trace.outcome = f"HTTP {status}"
        else:
            chunked = headers.get("transfer-encoding") == "chunked"
            async for chunk in _chunks(reader) if chunked else _until_closed(reader):
                if b'"error_type":' in chunk:
                    trace.outcome = f"error event: {chunk[:200]!r}"
                    break
                trace.times.extend([time.perf_counter()] * chunk.count(b"data:"))
            trace.outcome = trace.outcome or "ok"
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
        trace.outcome = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    trace.done = time.perf_counter()
    return trace


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The body of a chunked HTTP/1.1 response, chunk by chunk (the server sends one event a chunk)."""
    while size := int((await reader.readline()).split(b";")[0], 16):
        yield (await reader.readexactly(size + 2))[:-2]


async def _until_closed(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while data := await reader.read(65536):
        yield data


async def run_all(clients: Clients, scripts: Iterable[Script], concurrency: int, on_done=None,
                  until: float | None = None) -> list[Trace]:
    """The scripts, `concurrency` at a time: each client takes the next script as soon as its last one
    ended, until the scripts run out or, with `until` (a time.perf_counter() value), time does."""
    traces: list[Trace] = []
    queue = iter(scripts)

    async def worker() -> None:
        for p in queue:
            if until is not None and time.perf_counter() >= until:
                return
            trace = await clients.run(p)
            traces.append(trace)
            if on_done is not None:
                on_done(trace)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return traces
