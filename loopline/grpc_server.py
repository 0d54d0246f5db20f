"""The gRPC server bootstrap every service runs: interceptor, health, reflection, drain on SIGTERM.

A service's `main.py` builds its servicers and calls

    await serve(settings, register, name="inference", on_shutdown=[records.flush])

where `register(server)` adds the servicers and returns their full service names (for health and
reflection). Tests use `running(...)`, which starts the same server on the configured (usually
ephemeral) port and stops it without signals.

With `tls_cert_file` and `tls_key_file` set, the gRPC port speaks TLS only (server authentication;
clients verify the certificate). The metrics endpoint stays plain HTTP, meant for a private scrape.

Shutdown order, on SIGTERM/SIGINT or `GrpcServer.stop()`:
1. every health status turns NOT_SERVING (Watch streams see it; load balancers move away),
2. the server stops accepting calls and lets in-flight ones finish within the grace period,
3. the `on_shutdown` callbacks run in order (flush records, close clients),
4. the metrics endpoint closes and `serve` returns.
A second signal during the drain cancels the remaining calls at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loopline.errors import ErrorInterceptor, LooplineError
from loopline.logging import configure_logging, get_logger
from loopline.metrics import (
    RequestMetrics,
    request_metrics,
    start_metrics_server,
    stop_metrics_server,
)
from loopline.settings import ServiceSettings, SettingsError, env_var_name, load_settings

__all__ = [
    "GrpcServer",
    "Register",
    "ShutdownCallback",
    "run_service",
    "running",
    "serve",
    "server_credentials",
    "server_options",
]

log = get_logger(__name__)

S = TypeVar("S", bound=ServiceSettings)

Register = Callable[[grpc.aio.Server], Iterable[str]]
ShutdownCallback = Callable[[], Awaitable[None]]

OVERALL = health.OVERALL_HEALTH  # "" : the status of the server as a whole
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments for every Loopline server."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Ping idle connections so a peer that vanished (a killed router pod) is noticed.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client keepalive pings every 10 s; the 5 min default answers GOAWAY to them.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        # SO_REUSEPORT (grpc's default on Linux) lets a second server share a busy port silently.
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' certificate and key files, or None for plaintext.

    The pair is loaded once through `ssl` first: grpc reports an unreadable PEM or a key that
    does not match the certificate only as a failed handshake, long after a "serving" log line.
    """
    cert_file, key_file = settings.tls_cert_file, settings.tls_key_file
    if cert_file is None or key_file is None:
        return None  # the settings allow both or neither
    try:
        # An encrypted key would make OpenSSL prompt on the terminal; an empty password fails it.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=b"")
        pair = (key_file.read_bytes(), cert_file.read_bytes())
    except (OSError, ssl.SSLError) as err:
        names = " and ".join(
            env_var_name(type(settings), f) for f in ("tls_cert_file", "tls_key_file")
        )
        raise RuntimeError(
            f"cannot use the TLS certificate {cert_file} with the key {key_file} ({err}); "
            f"check {names}: a PEM certificate chain and its unencrypted PEM private key"
        ) from err
    return grpc.ssl_server_credentials([pair])


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """One grpc.aio server with the error interceptor, health, reflection and metrics endpoint."""

    def __init__(
        self,
        settings: ServiceSettings,
        register: Register,
        *,
        name: str,
        on_shutdown: Sequence[ShutdownCallback] = (),
        metrics: RequestMetrics | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        step_timeout: float = 30.0,
    ) -> None:
        self.settings = settings
        # A shutdown step (or grpc's own stop) that hangs must not keep the process alive until
        # the orchestrator's SIGKILL: each gets this long, then is abandoned with an error log.
        self.step_timeout = step_timeout
        self.name = name
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.service_names: tuple[str, ...] = ()
        self._register = register
        self._on_shutdown = tuple(on_shutdown)
        self._metrics = metrics if metrics is not None else request_metrics()
        # The error interceptor comes first (outermost): what later ones raise, such as the
        # refusals of `loopline.auth.TokenAuth`, becomes a status and a metric like any error.
        self._server = grpc.aio.server(
            interceptors=[ErrorInterceptor(name, self._metrics), *interceptors],
            options=server_options(settings),
        )
        self._stopping: asyncio.Future[None] | None = None

    async def start(self, *, serving: bool = True) -> int:
        """Add the servicers, bind, start and return the bound port.

        Health reports SERVING for the server and each service, unless `serving=False`: a service
        that is not ready yet (a model loading) calls `set_serving(True)` when it is.
        """
        self.service_names = tuple(self._register(self._server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = self._bind()
        # Before the gRPC server starts: a busy metrics port must not leave it running, orphaned.
        self.metrics_port = start_metrics_server(
            self.settings.metrics_port, self.settings.host, registry=self._metrics.registry
        )
        await self._server.start()
        for service in (OVERALL, *self.service_names):
            await self.set_serving(serving, service)
        log.info("serving", extra=self._describe())
        return self.port

    def _bind(self) -> int:
        address = _address(self.settings.host, self.settings.port)
        credentials = server_credentials(self.settings)
        try:
            if credentials is None:
                port = int(self._server.add_insecure_port(address))
            else:
                port = int(self._server.add_secure_port(address, credentials))
        except RuntimeError as err:
            raise RuntimeError(f"cannot listen on {address}: {err}; is the port in use?") from err
        if port == 0:  # older grpc reports a failed bind this way instead of raising
            raise RuntimeError(f"cannot listen on {address}; is the port in use?")
        return port

    def _describe(self) -> dict[str, object]:
        return {
            "service": self.name,
            "host": self.settings.host,
            "port": self.port,
            "tls": self.settings.tls_cert_file is not None,
            "metrics_port": self.metrics_port,
            "services": list(self.service_names),
        }

    async def set_serving(self, serving: bool, service: str = OVERALL) -> None:
        """Report `service` (default: the whole server) as SERVING or NOT_SERVING."""
        await self.health.set(service, SERVING if serving else NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop (see the module docstring); safe to call more than once or concurrently.

        `grace` defaults to `settings.grace_period_seconds`.
        """
        if self._stopping is None:
            seconds = self.settings.grace_period_seconds if grace is None else grace
            self._stopping = asyncio.ensure_future(self._shutdown(seconds))
        # shield: a caller cancelled while waiting must not cancel the drain for everyone else.
        await asyncio.shield(self._stopping)

    async def cancel_calls(self) -> None:
        """Cancel every in-flight call now (the second-signal path of a drain in progress)."""
        await self._server.stop(0)

    async def _shutdown(self, grace: float) -> None:
        log.info("draining", extra={"service": self.name, "grace_seconds": grace})
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self._server.stop(grace), grace + self.step_timeout)
        except TimeoutError:
            log.error(
                "the gRPC server did not stop within its grace period; going on",
                extra={"service": self.name, "grace_seconds": grace},
            )
        log.info("calls drained", extra={"service": self.name})
        for callback in self._on_shutdown:
            await _run_callback(callback, self.step_timeout)
        if self.metrics_port is not None:
            # shutdown() waits for the HTTP server's poll loop (up to 0.5 s): not on the event loop.
            await asyncio.to_thread(stop_metrics_server, self.metrics_port)
        log.info("stopped", extra={"service": self.name})

    async def run_until_signal(self, ready: asyncio.Event | None = None) -> None:
        """Wait for SIGTERM or SIGINT (`ready` is set once the handlers are in place), then stop."""
        stop_requested = asyncio.Event()
        with _signal_handlers(self, stop_requested):
            if ready is not None:
                ready.set()
            await stop_requested.wait()
            await self.stop()

    async def wait_for_termination(self) -> None:
        """Return once the server has stopped (by `stop` or otherwise)."""
        await self._server.wait_for_termination()


async def _run_callback(callback: ShutdownCallback, timeout: float) -> None:
    # One failing or hanging callback (a flush to a dead Redis) must not skip the others.
    try:
        await asyncio.wait_for(callback(), timeout)
    except TimeoutError:
        log.error(
            "shutdown step did not finish in time; skipped",
            extra={"callback": repr(callback), "timeout_seconds": timeout},
        )
    except Exception:
        log.exception("shutdown callback failed", extra={"callback": repr(callback)})


async def serve(
    settings: ServiceSettings,
    register: Register,
    *,
    name: str,
    on_shutdown: Sequence[ShutdownCallback] = (),
    ready: asyncio.Event | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> None:
    """Run a server until SIGTERM or SIGINT, then drain it and return (exit status 0).

    `ready` is set once the server accepts calls and reports SERVING. A service that must flip
    its health itself (SERVING only once a model is loaded) uses `GrpcServer` directly.
    `interceptors` run inside the error interceptor, in order (authorization, for one).
    """
    server = GrpcServer(
        settings, register, name=name, on_shutdown=on_shutdown, interceptors=interceptors
    )
    await server.start()
    await server.run_until_signal(ready)


@contextlib.contextmanager
def _signal_handlers(server: GrpcServer, stop_requested: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    background: set[asyncio.Task[None]] = set()  # keep a reference so the task is not collected

    def on_signal(signum: signal.Signals) -> None:
        if not stop_requested.is_set():
            log.info("received %s; draining", signum.name)
            stop_requested.set()
            return
        log.warning("received %s again; cancelling in-flight calls", signum.name)
        task = loop.create_task(server.cancel_calls())
        background.add(task)
        task.add_done_callback(background.discard)

    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


@contextlib.asynccontextmanager
async def running(
    settings: ServiceSettings,
    register: Register,
    *,
    name: str = "test",
    on_shutdown: Sequence[ShutdownCallback] = (),
    metrics: RequestMetrics | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> AsyncIterator[GrpcServer]:
    """Start a server (use `port=0` for an ephemeral port) and stop it on exit, without signals.

    The body may call `server.stop()` itself to exercise the drain; on exit any remaining calls are
    cancelled at once.
    """
    server = GrpcServer(
        settings,
        register,
        name=name,
        on_shutdown=on_shutdown,
        metrics=metrics,
        interceptors=interceptors,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0)


def run_service(
    settings_cls: type[S], serve_with: Callable[[S], Coroutine[Any, Any, None]], **overrides: Any
) -> None:
    """Every service's `main()`: settings, logging, then `serve_with(settings)` until SIGTERM.

    What an operator can fix ends the process with one line instead of a traceback: bad
    settings (one line per variable) and a refused start such as an unknown model source exit 2,
    a port in use or unusable TLS files (`RuntimeError` from `GrpcServer.start`) exit 1.
    """
    try:
        settings = load_settings(settings_cls, **overrides)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        asyncio.run(serve_with(settings))
    except LooplineError as err:
        log.error("failed to start: %s", err.message, extra={"details": err.details})
        raise SystemExit(2) from None
    except SettingsError as err:  # settings built inside the service, e.g. discovery sources
        log.error("failed to start: %s", err)
        raise SystemExit(2) from None
    except RuntimeError as err:
        log.error("failed to start: %s", err)
        raise SystemExit(1) from None
