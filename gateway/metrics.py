"""A frontend's Prometheus metrics: each request's latencies and outcome by front end (route),
and the streams it holds, read from its core when scraped. The router's books (queue, workers,
reservations) are in router_metrics.py; the gateway process serves both on one /metrics.

Worker-side numbers (prefill and decode batch sizes, KV slots in use) are on each worker's own
`/metrics` (`--metrics-port`).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from splitserve.common import protocol as P
from splitserve.common.params import NORMAL_FINISH

from .frontend_core import FrontendCore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

# Finish reasons of a request that ran to its end; any other (cancelled, shutdown) cut it short
# and comes with no token of its own.


class GatewayMetrics:
    def __init__(self, core: FrontendCore):
        # A registry of its own, so that several gateways in one process (tests) don't collide.
        self.registry = CollectorRegistry()
        r = self.registry
        # route: the HTTP path, "/ws" or "zmq"; outcome: ok, cancelled, shutdown, or the error type
        self.requests = Counter("splitserve_requests", "requests by route and outcome", ["route", "outcome"],
                                registry=r)
        self.ttft = Histogram("splitserve_time_to_first_token_seconds", "arrival to first token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("splitserve_time_per_output_token_seconds", "mean time between a finished request's "
                              "tokens after the first", ["route"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("splitserve_request_duration_seconds", "arrival to last token of finished requests",
                             ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "prompt tokens of admitted requests", ["route"],
                                     registry=r)
        self.generated_tokens = Counter("splitserve_generated_tokens", "tokens sent to clients (counted as each request ends)", ["route"],
                                        registry=r)
        r.register(_StreamsCollector(core))
        self._routes: dict[str, RouteMetrics] = {}

    def meter(self, route: str) -> Meter:
        found = self._routes.get(route)
        if found is None:
            found = self._routes[route] = RouteMetrics(self, route)
        return Meter(found)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RouteMetrics:
    """One route's labelled children, looked up once: `labels()` per reply would cost a lock and a
    dict lookup for every token batch."""

    def __init__(self, m: GatewayMetrics, route: str):
        self.metrics, self.route = m, route
        self.ttft, self.tpot, self.e2e = (h.labels(route) for h in (m.ttft, m.tpot, m.e2e))
        self.prompt_tokens, self.generated_tokens = m.prompt_tokens.labels(route), m.generated_tokens.labels(route)


class Meter:
    """One request's clock: fed every reply the request gets (a batch of tokens at a time), it
    records its outcome once."""

    __slots__ = ("m", "start", "first", "tokens", "done")

    def __init__(self, route: RouteMetrics):
        self.m = route
        self.start = time.monotonic()
        self.first: float | None = None
        self.tokens = 0
        self.done = False

    def observe(self, out: P.TokenBatch | P.Error) -> None:
        if self.done:
            return
        if isinstance(out, P.Error):
            self.finish(out.error_type)
            return
        m = self.m
        if out.prompt_tokens:
            m.prompt_tokens.inc(out.prompt_tokens)
        n = len(out.tokens)
        if n:
            if self.first is None:
                self.first = time.monotonic()
                m.ttft.observe(self.first - self.start)
            self.tokens += n
        if out.finish_reason is not None:
            self.finish("ok" if out.finish_reason in NORMAL_FINISH else out.finish_reason)

    def finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        m = self.m
        m.metrics.requests.labels(m.route, outcome).inc()
        if self.tokens:  # counted once a request ends, not per token: a counter update costs a lock
            m.generated_tokens.inc(self.tokens)
        if outcome == "ok":
            end = time.monotonic()
            m.e2e.observe(end - self.start)
            if self.first is not None and self.tokens > 1:
                m.tpot.observe((end - self.first) / (self.tokens - 1))


class _StreamsCollector:
    """Read at scrape time, so it can never drift from the core's own state."""

    def __init__(self, core: FrontendCore):
        self.core = core

    def collect(self):
        yield GaugeMetricFamily("splitserve_frontend_streams", "requests this frontend streams", value=self.core.live())
