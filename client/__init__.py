"""The splitserve client library: talks to a gateway's ZeroMQ client port; imports no torch.

    with Client("tcp://127.0.0.1:5555") as client:
        print(client.generate("def fib(n):", max_new_tokens=32).text)
        for ev in client.stream("def fib(n):", temperature=0.8):
            print(ev.text, end="")

    async with AsyncClient("tcp://127.0.0.1:5555") as client:
        resp = await client.generate("def fib(n):")
        async for ev in client.stream("def fib(n):"):
            ...
"""

from ._core import Details, Response, StreamEvent
from .aio import AsyncClient, AsyncStream
from .errors import (GenerationError, GenerationTimeout, OverloadedError, SplitserveError, UnauthorizedError,
                     UnavailableError, ValidationError)
from .sync import Client, Stream

__all__ = [
    "AsyncClient", "AsyncStream", "Client", "Details", "GenerationError", "GenerationTimeout", "OverloadedError",
    "Response", "SplitserveError", "Stream", "StreamEvent", "UnauthorizedError", "UnavailableError",
    "ValidationError",
]
