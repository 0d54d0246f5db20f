"""The monitor's statistics as Prometheus gauges (`loopline_monitor_*`), set by each check.

Labels are bounded by what is served: `model` and `version` come from the records the monitor
folded, `variant` from configured experiments. Dashboards read these (deploy/grafana).
"""

from __future__ import annotations

import math

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from services.monitor.state import Totals


class MonitorMetrics:
    """Gauges of the last check, per model version."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("model", "version")) -> Gauge:
            return Gauge(name, doc, list(labels), registry=registry)

        self.requests = gauge("loopline_monitor_requests", "Requests in the check's window.")
        self.request_rate = gauge("loopline_monitor_request_rate", "Requests per second.")
        self.accuracy = gauge("loopline_monitor_live_accuracy", "Live accuracy from feedback.")
        self.labelled = gauge("loopline_monitor_labelled", "Requests with a feedback label.")
        self.confidence = gauge("loopline_monitor_mean_confidence", "Mean top probability.")
        self.unknown = gauge("loopline_monitor_unknown_token_share", "Mean unknown-token share.")
        self.latency = gauge(
            "loopline_monitor_latency_seconds",
            "Worker latency percentile (queue + compute).",
            ("model", "version", "quantile"),
        )
        self.label_share = gauge(
            "loopline_monitor_label_share", "Predicted-label share.", ("model", "version", "label")
        )
        self.drifted = gauge("loopline_monitor_drifted", "1 when the last drift check drifted.")
        self.drift_streak = gauge(
            "loopline_monitor_drift_streak", "Drifted checks in a row (the alert fires at K)."
        )
        self.firing = Gauge(
            "loopline_monitor_alerts_firing", "Alerts firing, by rule.", ["rule"], registry=registry
        )

    def observe(self, model: str, version: str, totals: Totals, seconds: float) -> None:
        """Set the traffic gauges of one version from its window totals."""
        self.requests.labels(model, version).set(totals.requests)
        self.request_rate.labels(model, version).set(totals.requests / max(seconds, 1e-9))
        self.labelled.labels(model, version).set(totals.labelled)
        _set(self.accuracy.labels(model, version), totals.accuracy())
        _set(self.confidence.labels(model, version), totals.mean_confidence())
        _set(self.unknown.labels(model, version), totals.mean_unknown_share())
        if totals.requests:
            for q in (0.5, 0.95, 0.99):
                seconds_q = totals.latency_percentile(q) / 1000
                self.latency.labels(model, version, str(q)).set(seconds_q)
        for label, share in totals.label_shares().items():
            self.label_share.labels(model, version, label).set(share)

    def drift(self, model: str, version: str, drifted: bool, streak: int) -> None:
        self.drifted.labels(model, version).set(1.0 if drifted else 0.0)
        self.drift_streak.labels(model, version).set(streak)


def _set(gauge: Gauge, value: float) -> None:
    # NaN (no labels yet) is a valid Prometheus value, but dashboards read it better as absent.
    if not math.isnan(value):
        gauge.set(value)
