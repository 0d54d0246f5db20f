"""Router metrics (`loopline_router_*`), seconds as the unit, bounded labels.

`model` and `variant` come from the experiments and models an operator configured, never from
free caller input: an unknown model name is refused before it is counted, and the label is then
the fixed string "unknown".
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

_LATENCY = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)


class RouterMetrics:
    """Counters and histograms of one router."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "loopline_router_requests",
            "Classified texts by model, variant and gRPC status code.",
            ["model", "variant", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "loopline_router_latency_seconds",
            "Time from receiving a text to answering it.",
            ["model"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.upstream = Histogram(
            "loopline_router_upstream_seconds",
            "Time of the worker call (all tries) for a text.",
            ["model"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.upstream_texts = Histogram(
            "loopline_router_upstream_texts",
            "Texts per worker call; above 1 for single Classify calls merged under load.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.worker_events = Counter(
            "loopline_router_worker_events",
            "Forwarding events: retry (a try moved to another worker), eject, readmit.",
            ["event"],
            registry=registry,
        )
        self.shadows = Counter(
            "loopline_router_shadow_requests",
            "Shadow copies by outcome: ok, failed, skipped (too many in flight).",
            ["model", "outcome"],
            registry=registry,
        )
        self.feedback = Counter(
            "loopline_router_feedback", "Feedback labels accepted.", registry=registry
        )

    def upstream_call(self, model: str, texts: int) -> None:
        """Coalescer callback: one worker call carrying `texts` texts."""
        self.upstream_texts.labels(model).observe(texts)

    def worker_event(self, event: str, endpoint: str) -> None:
        """Balancer callback; the endpoint goes to the log, not into a label (unbounded)."""
        del endpoint
        self.worker_events.labels(event).inc()
