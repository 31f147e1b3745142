"""Prometheus metrics of a worker (``GET /metrics``), in a registry of its own so that several
workers in one process (tests) do not share counters. prometheus-client loads when a worker
starts, not on ``import tandem.cloud``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tandem.protocol.lazy import require

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, worker_id: str) -> None:
        prom = require("prometheus_client", "cloud")
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = prom.Counter(
            "tandem_cloud_requests", "Requests answered, by model and status (OK or an error "
            "code name)", ["model", "status", "via"], registry=r)
        self.queue_seconds = prom.Histogram(
            "tandem_cloud_queue_seconds", "Time from arrival to the start of compute",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = prom.Histogram(
            "tandem_cloud_compute_seconds", "Compute time of one batch", ["model", "cut"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = prom.Histogram(
            "tandem_cloud_batch_size", "Requests per batch", ["model", "cut"],
            buckets=_BATCH_BUCKETS, registry=r)
        self.inflight = prom.Gauge(
            "tandem_cloud_inflight", "Requests taken and not yet answered", registry=r)
        self.queue_depth = prom.Gauge(
            "tandem_cloud_queue_depth", "Requests waiting for a batch", registry=r)
        self.link_probes = prom.Counter(
            "tandem_cloud_link_probes", "Link probes of edge daemons (requests without tensors) "
            "answered at once, empty, without compute", registry=r)
        self.duplicates = prom.Counter(
            "tandem_cloud_duplicates", "Requests whose id was seen within the window (answered "
            "again without recompute)", registry=r)
        self.bundles = prom.Gauge(
            "tandem_cloud_bundles", "Bundles in the repository by state", ["state"], registry=r)
        self.loaded_parts = prom.Gauge(
            "tandem_cloud_loaded_parts", "Parts loaded in memory", registry=r)
        self.loaded_bytes = prom.Gauge(
            "tandem_cloud_loaded_bytes", "Estimated memory of the loaded parts", registry=r)
        self.connected = prom.Gauge(
            "tandem_cloud_broker_connected", "1 while connected to the broker", registry=r)
        info = prom.Info("tandem_cloud_worker", "This worker", registry=r)
        info.info({"worker_id": worker_id})

    def watch_serving(self, stats: Callable[[], Any]) -> None:
        """Expose the transport's serve counters (``ServeStats``, read at each scrape):
        undecodable payloads, refused topics, busy, expired before start, duplicates dropped
        while the first copy runs, replies that could not be sent."""
        prom = self._prom
        names = {
            "undecodable": ("tandem_cloud_decode_errors", "Payloads on the request topics "
                            "that did not decode (answered when their id was readable)"),
            "refused": ("tandem_cloud_refused", "Requests refused unanswered (bad topic, a "
                        "reply topic that is not the device's)"),
            "busy": ("tandem_cloud_transport_busy", "Answered RESOURCE_EXHAUSTED by the "
                     "transport's admission"),
            "expired": ("tandem_cloud_transport_expired", "Answered DEADLINE_EXCEEDED by the "
                        "transport before reaching the batcher"),
            "duplicates": ("tandem_cloud_inflight_duplicates", "Copies of a request still "
                           "running, dropped (the first copy's answer is the answer)"),
            "replies_lost": ("tandem_cloud_replies_lost", "Answers that could not be "
                             "published (connection lost)"),
        }

        class _Collector:
            def collect(self):
                current = stats()
                for field, (name, doc) in names.items():
                    family = prom.metrics_core.CounterMetricFamily(name, doc)
                    family.add_metric([], float(getattr(current, field, 0) if current else 0))
                    yield family

            def describe(self):
                return []

        self.registry.register(_Collector())

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST

    def value(self, name: str, labels: dict[str, str] | None = None) -> Any:
        """A sample's current value (tests and the load report)."""
        return self.registry.get_sample_value(name, labels or {})
