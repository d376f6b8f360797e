"""The streaming clients of `splitserve bench gateway`, one kind per transport: TGI server-sent
events (`/generate_stream`, details false), the WebSocket (`/ws`) and the ZMQ client library
(`AsyncClient`). Each runs one request to its end and hands every token's text (its send stamp,
see synthetic_workers.py) to a callback as it arrives.

The SSE client speaks just enough HTTP/1.1 over a kept-alive asyncio stream (chunked transfer,
as uvicorn streams) to cost far less per token than a general HTTP client would: on a machine of
few cores the client competes with the gateway for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack

import msgspec

OnText = Callable[[str], None]
PROMPT = "def fibonacci(n):\n    "


class Failed(RuntimeError):
    """A request that did not end with its tokens in full."""


class _SseToken(msgspec.Struct):
    text: str


class _SseEvent(msgspec.Struct):
    token: _SseToken | None = None
    generated_text: str | None = None
    error: str | None = None


_sse_event = msgspec.json.Decoder(_SseEvent)


class SseConnection:
    """One kept-alive HTTP connection, one streamed request at a time."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def generate(self, new_tokens: int, on_text: OnText) -> int:
        """Tokens received; Failed unless the stream ended normally."""
        body = msgspec.json.encode({"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "details": False}})
        self.writer.write(b"POST /generate_stream HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (self.host.encode(), len(body), body))
        status = await self.reader.readline()
        while await self.reader.readline() not in (b"\r\n", b""):
            pass  # headers: uvicorn streams chunked
        if b" 200 " not in status:
            raise Failed(f"HTTP {status.decode(errors='replace').strip()}")
        received, ended, pending = 0, False, b""
        while True:
            size = int((await self.reader.readline()).strip() or b"0", 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            pending += chunk[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                e = _sse_event.decode(event[len(b"data: "):])
                if e.error is not None:
                    raise Failed(e.error)
                on_text(e.token.text)
                received += 1
                ended = e.generated_text is not None
        if not ended:
            raise Failed(f"the stream ended after {received} tokens without its generated text")
        return received

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WsConnection:
    """One WebSocket connection of the client library, one request at a time."""

    def __init__(self, url: str, encoding: str):
        self.url, self.encoding = url, encoding
        self.client = None

    async def connect(self) -> None:
        from splitserve.client.websocket import AsyncWebSocketClient

        self.client = await AsyncWebSocketClient.connect(self.url, encoding=self.encoding)

    async def generate(self, new_tokens: int, on_text: OnText) -> int:
        return await _stream(self.client, new_tokens, on_text)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


class ZmqConnection:
    """A share of one AsyncClient: the library multiplexes every request over one connection."""

    def __init__(self, client):
        self.client = client

    async def connect(self) -> None:
        pass  # the client connects as it is made

    async def generate(self, new_tokens: int, on_text: OnText) -> int:
        return await _stream(self.client, new_tokens, on_text)

    async def close(self) -> None:
        pass


async def _stream(client, new_tokens: int, on_text: OnText) -> int:
    received = 0
    async with client.stream(PROMPT, max_new_tokens=new_tokens, ignore_eos=True) as stream:
        async for ev in stream:
            if ev.token_id is not None:
                on_text(ev.text)
                received += 1
    if stream.finish_reason != "length":
        raise Failed(f"finished by {stream.finish_reason!r} after {received} tokens")
    return received


async def open_connections(stack: AsyncExitStack, transport: str, count: int, http: tuple[str, int],
                           zmq: list[str], ws_encoding: str) -> list:
    """`count` connections of one transport, open, and closed with `stack`."""
    if transport == "sse":
        conns = [SseConnection(*http) for _ in range(count)]
    elif transport == "ws":
        conns = [WsConnection(f"ws://{http[0]}:{http[1]}/ws", ws_encoding) for _ in range(count)]
    else:
        from splitserve.client import AsyncClient

        client = await stack.enter_async_context(AsyncClient(zmq))
        conns = [ZmqConnection(client) for _ in range(count)]
    for c in conns:
        stack.push_async_callback(c.close)
    await asyncio.gather(*(c.connect() for c in conns))
    return conns
