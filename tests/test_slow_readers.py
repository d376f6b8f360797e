"""A WebSocket client that stops reading cannot make the gateway buffer its replies without bound:
past the outbox limit its requests are cancelled and the connection is closed (code 1013)."""

from __future__ import annotations

import asyncio

from splitserve.common import protocol as P
from splitserve.gateway import websocket
from splitserve.gateway.websocket import SLOW_READER_CODE, Session


class StalledSocket:
    """A connection whose client never reads: every send waits forever; receive waits for the close."""

    def __init__(self):
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    async def receive(self) -> dict:
        await self.closed.wait()
        return {"type": "websocket.disconnect", "code": self.close_code}

    async def send_text(self, _frame) -> None:
        await asyncio.Event().wait()

    send_bytes = send_text

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.close_code = code
        self.closed.set()


class RecordingDoor:
    def __init__(self):
        self.cancelled: list[str] = []

    def cancel(self, gid: str, reason: str | None = None) -> None:
        self.cancelled.append(gid)


async def test_a_websocket_client_that_stops_reading_is_dropped(monkeypatch):
    monkeypatch.setattr(websocket, "OUTBOX_LIMIT_BYTES", 64 * 1024)
    door, ws = RecordingDoor(), StalledSocket()
    session = Session(door, ws, None)
    running = asyncio.create_task(session.run())
    await asyncio.sleep(0)  # one turn of the loop: the session's writer starts and takes the first send
    session.gids = {"a": "g1", "b": "g2"}  # two requests of this connection are running
    batch = P.TokenBatch("a", [P.Token(0, 1, "x" * 1000, None, None)], None)
    for _ in range(200):  # about 200 kB of replies, none read
        session._send(batch, binary=False)
    await asyncio.wait_for(running, 10)
    assert ws.close_code == SLOW_READER_CODE
    assert sorted(door.cancelled) == ["g1", "g2"]
    assert not session.outbox and session.backlog <= 64 * 1024 + 2000
