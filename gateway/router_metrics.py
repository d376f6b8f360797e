"""The router's Prometheus metrics: the queue, the frontends, the workers and the reservations,
read from its books when scraped, so that they can never drift from its own state."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from .router_core import RouterCore


class RouterCollector:
    def __init__(self, core: RouterCore):
        self.core = core

    def collect(self):
        core = self.core
        yield GaugeMetricFamily("splitserve_requests_in_flight", "requests admitted and not yet answered in full",
                                value=core.live())
        yield GaugeMetricFamily("splitserve_requests_waiting", "admitted requests waiting for a free decode slot",
                                value=len(core.waiting))
        yield GaugeMetricFamily("splitserve_frontends", "frontends joined to the router", value=len(core.frontends))
        workers = GaugeMetricFamily("splitserve_workers", "registered workers", labels=["role"])
        reserved = GaugeMetricFamily("splitserve_decode_slots_reserved", "decode slots reserved by the router",
                                     labels=["worker"])
        capacity = GaugeMetricFamily("splitserve_decode_slots", "decode slots a worker has", labels=["worker"])
        queued = GaugeMetricFamily("splitserve_prefill_queued_tokens",
                                   "prompt tokens sent and not yet prefilled and handed off", labels=["worker"])
        for role in ("prefill", "decode"):
            workers.add_metric([role], len(core.registry.of_role(role, routable=False)))
        for w in core.registry.workers.values():
            if w.info.role == "decode":
                reserved.add_metric([w.id], len(w.assigned))
                capacity.add_metric([w.id], w.info.capacity)
            else:
                queued.add_metric([w.id], w.queued_tokens)
        yield from (workers, reserved, capacity, queued)
