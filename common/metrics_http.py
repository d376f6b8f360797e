"""A worker's /health and /metrics on --metrics-port, for probes and Prometheus."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


# Every piece of memory a worker holds for a request, so that a leak shows on a dashboard.
GAUGES = {
    "prefill": {
        "queued_tokens": "prompt tokens waiting for prefill",
        "handoffs": "KV handoffs waiting for the decode side's release",
        "staging_used_tokens": "staging buffer tokens held by prefilled KV not yet released by decode",
        "staging_tokens": "staging buffer size in tokens",
        "prefix_cache_bytes": "memory the prefix cache holds K/V in",
    },
    "decode": {
        "slots_used": "KV slots in use",
        "slots_total": "KV slots in the pool",
    },
}


class WorkerMetrics:
    """Gauges and histograms of one worker process; served over HTTP when a port is given."""

    def __init__(self, role: str, port: int, health: Callable[[], dict], host: str = "127.0.0.1"):
        self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(f"splitserve_{role}_{name}", help_text, registry=self.registry)
                       for name, help_text in GAUGES[role].items()}
        # prefill: prompts whose prefill a pass finished (a pass with only a piece of a long prompt: none)
        self.batch_size = Histogram(f"splitserve_{role}_batch_size", "requests per batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_tokens = Counter(f"splitserve_{role}_tokens", "tokens processed", registry=self.registry)
        # prefill: KvReady sent -> KvRelease back (the whole handoff); decode: KV received -> in its slot.
        # Labelled by the transport that carried the KV (a nixl handoff retried over tcp counts as tcp).
        self.handoff_seconds = Histogram(f"splitserve_{role}_handoff_seconds", "KV handoff time", ["transport"],
                                         registry=self.registry,
                                         buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0))
        self.handoff_bytes = Counter(f"splitserve_{role}_handoff_bytes", "KV bytes handed off", ["transport"],
                                     registry=self.registry)
        # prefill: prompt tokens looked up in the prefix cache, and found there (not computed)
        self.prefix_tokens = {kind: Counter(f"splitserve_{role}_prefix_{kind}_tokens", f"prompt tokens {kind} in the "
                                            "prefix cache", registry=self.registry) for kind in ("lookup", "hit")}
        self._prefix_counted = {"lookup": 0, "hit": 0}
        self.health = health
        self.server = None
        if port:
            self.server = ThreadingHTTPServer((host, port), self._handler())
            threading.Thread(target=self.server.serve_forever, daemon=True, name="metrics-http").start()

    def set(self, **values: float) -> None:
        for name, value in values.items():
            self.gauges[name].set(value)

    def observe_batch(self, size: int, tokens: int) -> None:
        if size:
            self.batch_size.observe(size)
        self.batch_tokens.inc(tokens)

    def observe_prefix_cache(self, looked_up: int, found: int, nbytes: int) -> None:
        """The cache's running totals of tokens looked up and found, and the bytes it holds."""
        for kind, total in (("lookup", looked_up), ("hit", found)):
            self.prefix_tokens[kind].inc(total - self._prefix_counted[kind])
            self._prefix_counted[kind] = total
        self.set(prefix_cache_bytes=nbytes)

    def observe_handoff(self, nbytes: int, seconds: float, transport: str) -> None:
        self.handoff_bytes.labels(transport).inc(nbytes)
        self.handoff_seconds.labels(transport).observe(seconds)

    def _handler(self):
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/health":
                    status = metrics.health()
                    ok = status.get("registered", True) and not status.get("draining", False)
                    self._reply(200 if ok else 503, "application/json", json.dumps(status).encode())
                elif self.path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
                else:
                    self._reply(404, "application/json", b'{"error": "not found"}')

            def _reply(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # probes every few seconds would flood the log
                pass

        return Handler

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
