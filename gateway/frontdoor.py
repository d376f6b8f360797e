"""How every front end (ZMQ, HTTP, WebSocket) reaches the frontend's core: each request it
submits is metered from arrival to its last reply, and cancelling one records why it ended."""

from __future__ import annotations

import asyncio

from splitserve.common import protocol as P

from .frontend_core import FrontendCore, Sink
from .metrics import GatewayMetrics, Meter


class FrontDoor:
    def __init__(self, core: FrontendCore, metrics: GatewayMetrics):
        self.core, self.metrics = core, metrics
        self._meters: dict[str, Meter] = {}  # gateway id -> the meter of a request still running
        self.draining = asyncio.Event()  # the frontend is shutting down (its WebSockets close once idle)

    def drain(self) -> None:
        """Refuse new requests from now on; those running go on."""
        self.core.draining = True
        self.draining.set()

    def submit(self, route: str, msg: P.Generate, sink: Sink, fork_of: str | None = None,
               dispatch: bool = True) -> str | None:
        """As FrontendCore.submit; `route` labels the request's metrics."""
        meter = self.metrics.meter(route)
        gid: str | None = None

        def metered(out) -> None:
            meter.observe(out)
            if meter.done and gid is not None:
                self._meters.pop(gid, None)
            sink(out)

        gid = self.core.submit(msg.id, msg, metered, fork_of, dispatch)
        if gid is not None and not meter.done:
            self._meters[gid] = meter
        return gid

    def rejection(self) -> tuple[str, str] | None:
        """(error type, message) of the refusal a request arriving now would get, or None."""
        return self.core.rejection()

    def refuse(self, route: str, error_type: str) -> None:
        """Count a request refused before it reached the core (e.g. without the API key)."""
        self.metrics.requests.labels(route, error_type).inc()

    def cancel(self, gid: str, reason: str | None = None, outcome: str = "cancelled") -> None:
        """The client went away or asked to stop; `reason` is sent to it as the finish reason.
        `outcome` labels the request's metrics: "ok" where a front end stops a request because
        its answer is complete (/infill's n_indent and t_max_predict_ms)."""
        meter = self._meters.pop(gid, None)
        if meter is not None:
            meter.finish(outcome)
        self.core.cancel(gid, reason)

    def dispatch(self) -> None:
        """Start what was submitted with `dispatch=False`."""
        self.core.dispatch()
