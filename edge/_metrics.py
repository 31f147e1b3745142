"""The daemon's Prometheus metrics (``GET /metrics``), in a registry of its own.

    tandem_edge_requests_total{plan, ran, outcome}   plan chosen; where the result came from
                                                      (cloud | local | fallback | spool);
                                                      outcome ok | error | spooled
    tandem_edge_latency_seconds{plan, ran}            end-to-end time in the daemon (histogram)
    tandem_edge_offload_ratio                         answered by the cloud / answered
    tandem_edge_fallbacks_total{reason}               offloads finished locally from the frontier
    tandem_edge_plans_total{plan}                     decisions per plan (auto and forced)
    tandem_edge_decision_seconds                      planner time per decision (summary)
    tandem_edge_spool_requests{state}                 spool rows (pending | done | delivered)
    tandem_edge_uplink_bps, tandem_edge_rtt_seconds, tandem_edge_cloud_queue_seconds
                                                      link estimates
    tandem_edge_link_measured{what}                   1 once rtt / uplink were measured
    tandem_edge_probes_total{result}                  idle link probes: answered | unanswered
    tandem_edge_cloud_available                       1 while offloading is possible
    tandem_edge_api_errors_total{status}              4xx/5xx answers of the local API
    tandem_edge_rollouts_total{result}                assignments applied | refused | failed
    tandem_edge_cascade_requests_total{path}          cascade requests by path: small (the
                                                      small model was sure) | escalated (the
                                                      cloud answered) | fallback (escalation
                                                      failed) | skipped (no time or no cloud)
    tandem_edge_cascade_latency_seconds{path}         end-to-end time per path (histogram)
    tandem_edge_escalation_ratio                      escalated by the rule / cascade requests
    tandem_edge_cascade_agreement_rows_total{agree}   escalated rows the cloud answered, by
                                                      whether the small model's top-1 agreed
    tandem_edge_cascade_agreement                     agreeing / compared escalated rows
    tandem_edge_bundle_info{model, version, digest}   the bundle being served
    tandem_edge_backend_info{part, backend}           which backend runs each part

prometheus-client is imported when the daemon starts (the ``edge`` extra).
"""

from __future__ import annotations

from typing import Any

from tandem.protocol.lazy import require

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        prom = require("prometheus_client", "edge")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("tandem_edge_requests_total", "Requests answered",
                                     ["plan", "ran", "outcome"], registry=r)
        self.latency = prom.Histogram("tandem_edge_latency_seconds",
                                      "End-to-end request time in the daemon", ["plan", "ran"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.offload_ratio = prom.Gauge("tandem_edge_offload_ratio",
                                        "Share of answered requests the cloud computed",
                                        registry=r)
        self.fallbacks = prom.Counter("tandem_edge_fallbacks_total",
                                      "Offloads finished locally from the frontier", ["reason"],
                                      registry=r)
        self.plans = prom.Counter("tandem_edge_plans_total", "Planner decisions", ["plan"],
                                  registry=r)
        self.decision = prom.Summary("tandem_edge_decision_seconds", "Planner time per decision",
                                     registry=r)
        self.spool = prom.Gauge("tandem_edge_spool_requests", "Spool rows by state", ["state"],
                                registry=r)
        self.uplink = prom.Gauge("tandem_edge_uplink_bps", "Estimated link bandwidth (bit/s)",
                                 registry=r)
        self.rtt = prom.Gauge("tandem_edge_rtt_seconds", "Estimated round trip to the cloud",
                              registry=r)
        self.queue = prom.Gauge("tandem_edge_cloud_queue_seconds",
                                "Estimated queue time in the cloud", registry=r)
        self.measured = prom.Gauge("tandem_edge_link_measured",
                                   "1 once the estimate is measured (0: prior)", ["what"],
                                   registry=r)
        self.probes = prom.Counter("tandem_edge_probes_total",
                                   "Link probes sent while idle or degraded, by result",
                                   ["result"], registry=r)
        self.available = prom.Gauge("tandem_edge_cloud_available",
                                    "1 while offloading is possible", registry=r)
        self.api_errors = prom.Counter("tandem_edge_api_errors_total",
                                       "Local API error answers", ["status"], registry=r)
        self.rollouts = prom.Counter("tandem_edge_rollouts_total", "Bundle assignments",
                                     ["result"], registry=r)
        self.bundle = prom.Gauge("tandem_edge_bundle_info", "The bundle being served",
                                 ["model", "version", "digest"], registry=r)
        self.backend = prom.Gauge("tandem_edge_backend_info", "Backend running each part",
                                  ["part", "backend"], registry=r)
        self.cascade_requests = prom.Counter(
            "tandem_edge_cascade_requests_total", "Cascade requests by path", ["path"],
            registry=r)
        self.cascade_latency = prom.Histogram(
            "tandem_edge_cascade_latency_seconds", "Cascade request time per path", ["path"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.escalation_ratio = prom.Gauge(
            "tandem_edge_escalation_ratio", "Share of cascade requests the rule escalated",
            registry=r)
        self.agreement_rows = prom.Counter(
            "tandem_edge_cascade_agreement_rows_total",
            "Escalated rows answered by the cloud, by small/large top-1 agreement", ["agree"],
            registry=r)
        self.agreement_ratio = prom.Gauge(
            "tandem_edge_cascade_agreement",
            "Share of escalated rows on which the small and large models agree", registry=r)
        self._cascaded = 0
        self._escalated = 0
        self._agreed = 0
        self._compared = 0
        self._answered = 0
        self._cloud = 0
        self._children: dict[tuple, Any] = {}  # labelled children, looked up once

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def answered(self, plan: str, ran: str, seconds: float) -> None:
        self._child(self.requests, plan, ran, "ok").inc()
        self._child(self.latency, plan, ran).observe(seconds)
        self._answered += 1
        if ran == "cloud":
            self._cloud += 1
        self.offload_ratio.set(self._cloud / self._answered)

    def cascaded(self, path: str, escalated: bool, seconds: float) -> None:
        """A cascade request answered through ``path`` (small | escalated | fallback |
        skipped); ``escalated``: its rule escalated it."""
        self._child(self.cascade_requests, path).inc()
        self._child(self.cascade_latency, path).observe(seconds)
        self._cascaded += 1
        self._escalated += bool(escalated)
        self.escalation_ratio.set(self._escalated / self._cascaded)

    def agreement(self, agreed: int, disagreed: int) -> None:
        """Escalated rows the cloud answered: on how many the small model's top-1 agreed."""
        if agreed:
            self._child(self.agreement_rows, "yes").inc(agreed)
        if disagreed:
            self._child(self.agreement_rows, "no").inc(disagreed)
        self._agreed += agreed
        self._compared += agreed + disagreed
        if self._compared:
            self.agreement_ratio.set(self._agreed / self._compared)

    def decided(self, plan: str, seconds: float) -> None:
        self.decision.observe(seconds)
        self._child(self.plans, plan).inc()

    def failed(self, plan: str, ran: str) -> None:
        self._child(self.requests, plan, ran, "error").inc()

    def link(self, snapshot: dict[str, Any]) -> None:
        self.uplink.set(snapshot["uplink_bps"])
        self.rtt.set(snapshot["rtt_ms"] / 1e3)
        self.queue.set(snapshot["cloud_queue_ms"] / 1e3)
        self.measured.labels("rtt").set(1 if snapshot["rtt_measured"] else 0)
        self.measured.labels("uplink").set(1 if snapshot["uplink_measured"] else 0)
        self.available.set(1 if snapshot["available"] else 0)

    def serving(self, model: str, version: str, digest: str, parts: dict[str, str]) -> None:
        self.bundle.clear()
        self.bundle.labels(model, version, digest).set(1)
        self.backend.clear()
        for part, kind in parts.items():
            self.backend.labels(part, kind).set(1)

    def exposition(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
