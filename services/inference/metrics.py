"""Worker metrics (`loopline_inference_*`), seconds as the unit, bounded labels."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram

from services.inference.batching import BatchStats

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class InferenceMetrics:
    """Histograms and gauges of one worker; `model` labels are bounded by what it serves."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=registry)

        self.queue = histogram(
            "loopline_inference_queue_seconds", "Time a text waited before its batch ran.", _LATENCY
        )
        self.compute = histogram(
            "loopline_inference_compute_seconds", "Engine time of a batch.", _LATENCY
        )
        self.request = histogram(
            "loopline_inference_request_seconds",
            "ModelInfer time from arrival to answer.",
            _LATENCY,
        )
        self.batch_size = histogram(
            "loopline_inference_batch_size", "Texts per executed batch.", _SIZES
        )
        self.padding = histogram(
            "loopline_inference_padding_waste",
            "Share of a batch's tokens that were padding.",
            (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 0.9),
        )
        self.queue_size = Gauge(
            "loopline_inference_queue_size",
            "Texts queued, all models.",
            registry=registry,
        )
        self.load_seconds = Gauge(
            "loopline_inference_model_load_seconds",
            "Load and warm-up time of a version.",
            ["model", "version"],
            registry=registry,
        )
        self.loaded = Gauge(
            "loopline_inference_loaded_versions", "Versions being served.", registry=registry
        )

    def batch(self, model: str, stats: BatchStats) -> None:
        self.batch_size.labels(model).observe(stats.batch_size)
        self.compute.labels(model).observe(stats.compute_seconds)
        self.queue.labels(model).observe(stats.queue_seconds)
        waste = 1.0 - stats.real_tokens / stats.padded_tokens if stats.padded_tokens else 0.0
        self.padding.labels(model).observe(waste)
