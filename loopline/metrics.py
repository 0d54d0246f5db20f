"""Prometheus metrics every service shares, and the /metrics endpoint.

Names carry the `loopline_` prefix and seconds as the unit. Labels stay bounded: `service` is a
fixed name, `method` a full gRPC method of a registered servicer (unknown methods are never
observed), `kind` an `ErrorKind` value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

__all__ = [
    "DURATION_BUCKETS",
    "RequestMetrics",
    "request_metrics",
    "start_metrics_server",
    "stop_metrics_server",
]

# From 1 ms (a cached lookup) to 30 s (a large batch on a cold CPU worker).
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class RequestMetrics:
    """Duration and failures of RPCs by service and method, in one registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.duration = Histogram(
            "loopline_request_duration_seconds",
            "Time from the start of an RPC to its last response, in seconds.",
            ["service", "method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "loopline_request_failures",
            "RPCs that ended in an error, by error kind.",
            ["service", "method", "kind"],
            registry=registry,
        )

    def observer(self, service: str, method: str) -> Callable[[float, str | None], None]:
        """What records one finished RPC of `method`: `(seconds, failure)`, the failure being
        the error kind or None on success. The duration series is looked up once, here."""
        duration = self.duration.labels(service, method)
        failures = self.failures

        def observe(seconds: float, failure: str | None) -> None:
            duration.observe(seconds)
            if failure is not None:
                failures.labels(service, method, failure).inc()

        return observe


@functools.cache
def request_metrics() -> RequestMetrics:
    """The process-wide metrics in the default registry (created on first use, then shared)."""
    return RequestMetrics(REGISTRY)


# prometheus_client returns the server but keeps no handle; we keep one so a service can stop it.
_servers: dict[int, WSGIServer] = {}


def start_metrics_server(
    port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> int | None:
    """Serve /metrics on `addr:port` from a daemon thread; port 0 disables it and returns None."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr, registry=registry)
    bound = int(server.server_port)
    _servers[bound] = server
    return bound


def stop_metrics_server(port: int) -> None:
    """Stop the /metrics server started on `port`; a no-op if none runs there."""
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()
