"""The splitserve client library: talks to a gateway's ZeroMQ client port; imports no torch.

    with Client("tcp://127.0.0.1:5555") as client:
        print(client.generate("def fib(n):", max_new_tokens=32).text)
        for ev in client.stream("def fib(n):", temperature=0.8):
            print(ev.text, end="")

    async with AsyncClient("tcp://127.0.0.1:5555") as client:
        resp = await client.generate("def fib(n):")
        async for ev in client.stream("def fib(n):"):
            ...

WebSocketClient("ws://127.0.0.1:8080/ws") and AsyncWebSocketClient have the same API over the
gateway's WebSocket, for networks where only HTTP gets through.
"""

from ._core import Details, Response, StreamEvent
from .aio import AsyncClient, AsyncStream
from .errors import (GenerationError, GenerationTimeout, OverloadedError, SplitserveError, UnauthorizedError,
                     UnavailableError, ValidationError)
from .sync import Client, Stream
from .websocket import AsyncWebSocketClient, WebSocketClient

__all__ = [
    "AsyncClient", "AsyncStream", "AsyncWebSocketClient", "Client", "Details", "GenerationError", "GenerationTimeout",
    "OverloadedError", "Response", "SplitserveError", "Stream", "StreamEvent", "UnauthorizedError", "UnavailableError",
    "ValidationError", "WebSocketClient",
]
