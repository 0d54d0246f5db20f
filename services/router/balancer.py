"""The router's upstream side: which worker answers, over which channel, and what if it fails.

- One persistent `grpc.aio` channel per endpoint that discovery lists, created when the endpoint
  appears and closed (after in-flight calls finish) when it goes: no per-request connection set-up.
- A request for a `ModelRef` may go to any healthy endpoint with a ready model of that name whose
  version or one of whose aliases is the ref's target. Among those, power of two random choices
  by least outstanding requests: two picked at random, the less busy one wins (Mitzenmacher; what
  Envoy's and Finagle's least-request balancers do). It avoids both the herd that "globally least
  busy" causes across several routers and the blindness of round robin.
- The caller's deadline becomes the gRPC timeout. UNAVAILABLE and RESOURCE_EXHAUSTED (the worker
  is gone, or full) and NOT_FOUND (the worker dropped the version since its last heartbeat) are
  retried once on another endpoint while time remains; every other status is the caller's
  answer, mapped onto `loopline.errors` with the worker's message.
- `eject_after` consecutive transport failures (UNAVAILABLE that the worker did not itself send)
  take an endpoint out of rotation; it is probed with ServerReady every `probe_interval` and
  readmitted on the first success. A worker killed under load thus costs retries, not failures.
- `ensure_loaded` asks workers to load a model through the OIP repository extension and waits
  until discovery shows it ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from loopline.errors import (
    KIND_BY_STATUS,
    KIND_METADATA_KEY,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    ErrorKind,
    FailedPrecondition,
    InternalError,
    InvalidInput,
    LooplineError,
    NotFound,
    NotReady,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
)
from loopline.logging import get_logger
from loopline.oip import grpc_service_pb2 as pb
from loopline.oip import grpc_service_pb2_grpc as pb_grpc
from loopline.workers import WorkerInfo
from services.router import oip
from services.router.discovery import Discovery
from services.router.domain import ModelRef

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "Balancer",
    "EndpointStatus",
    "Health",
    "power_of_two",
    "upstream_error",
]

log = get_logger(__name__)

DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # gRPC's default reconnect backoff grows to 120 s: a worker back after a restart would stay
    # unreachable (and unprobeable) that long. Workers are on a LAN; retry connecting often.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Keepalive pings find a peer that vanished without closing the connection (power loss,
    # partition) before a request waits on it.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
)
# NOT_FOUND too: discovery lags a worker by up to a heartbeat, so a worker that just unloaded a
# version (an alias moved on) may still be listed for it; another worker may well serve it. When
# every worker tried says NOT_FOUND, that is the caller's answer.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}
)
_METADATA_TIMEOUT_S = 5.0

# The exception class each kind is raised as, so callers can `except NotFound` on forwarded errors.
_ERROR_CLASSES: Mapping[ErrorKind, type[LooplineError]] = {
    ErrorKind.INVALID_INPUT: InvalidInput,
    ErrorKind.NOT_FOUND: NotFound,
    ErrorKind.ALREADY_EXISTS: AlreadyExists,
    ErrorKind.FAILED_PRECONDITION: FailedPrecondition,
    ErrorKind.OVERLOADED: Overloaded,
    ErrorKind.DEADLINE: DeadlineExceeded,
    ErrorKind.NOT_READY: NotReady,
    ErrorKind.UNAUTHENTICATED: Unauthenticated,
    ErrorKind.PERMISSION_DENIED: PermissionDenied,
    ErrorKind.CANCELLED: Cancelled,
    ErrorKind.INTERNAL: InternalError,
}

T = TypeVar("T")
EventCallback = Callable[[str, str], None]
ChannelFactory = Callable[[str], Any]


def power_of_two(candidates: Sequence[T], load: Callable[[T], int], rng: random.Random) -> T:
    """Two distinct candidates at random; the one with the lower `load` (the first on a tie)."""
    if len(candidates) == 1:
        return candidates[0]
    first, second = rng.sample(range(len(candidates)), 2)
    a, b = candidates[first], candidates[second]
    return a if load(a) <= load(b) else b


class Health:
    """Consecutive transport failures of one endpoint, and whether they ejected it."""

    def __init__(self, eject_after: int) -> None:
        if eject_after < 1:
            raise ValueError(f"eject_after must be at least 1, got {eject_after}")
        self.eject_after = eject_after
        self.failures = 0
        self.ejected = False

    def failure(self) -> bool:
        """Count a transport failure; True when this one ejects the endpoint."""
        self.failures += 1
        if not self.ejected and self.failures >= self.eject_after:
            self.ejected = True
            return True
        return False

    def success(self) -> None:
        """The endpoint answered: the run of failures is over (readmission is the probe's job)."""
        self.failures = 0

    def readmit(self) -> bool:
        """A probe succeeded; True when the endpoint was ejected until now."""
        was_ejected, self.ejected, self.failures = self.ejected, False, 0
        return was_ejected


@dataclass(frozen=True)
class EndpointStatus:
    """What the balancer knows of one endpoint (for metrics, admin views and tests)."""

    endpoint: str
    outstanding: int
    failures: int
    ejected: bool


@dataclass(eq=False)
class _Upstream:
    address: str
    channel: Any
    stub: Any
    health: Health
    outstanding: int = 0
    probe: asyncio.Task[None] | None = field(default=None, repr=False)


class _RetryableError(Exception):
    """A failed attempt another endpoint may succeed at (carries the status when there is one)."""

    def __init__(self, address: str, error: grpc.aio.AioRpcError | None, message: str) -> None:
        super().__init__(message)
        self.address = address
        self.error = error
        self.message = message


class Balancer:
    """Endpoints from a `Discovery`, persistent channels to them, and forwarding with retries.

    `start()` starts the discovery and `close()` stops it: the balancer owns the one it is given.
    `on_event(kind, endpoint)` hears "retry", "eject" and "readmit" (for metrics); `rng` makes the
    choices reproducible; `channel_factory(address)` replaces `grpc.aio.insecure_channel` (tests,
    TLS). `default_timeout` bounds calls whose caller set no deadline.
    """

    def __init__(
        self,
        discovery: Discovery,
        *,
        max_attempts: int = 2,
        eject_after: int = 3,
        probe_interval: float = 1.0,
        default_timeout: float = 30.0,
        channel_options: Sequence[tuple[str, Any]] = DEFAULT_CHANNEL_OPTIONS,
        admin_token: str | None = None,
        rng: random.Random | None = None,
        on_event: EventCallback | None = None,
        channel_factory: ChannelFactory | None = None,
        drain_seconds: float = 30.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.discovery = discovery
        self.max_attempts = max_attempts
        self.eject_after = eject_after
        self.probe_interval = probe_interval
        self.default_timeout = default_timeout
        self.admin_token = admin_token
        self.drain_seconds = drain_seconds
        self._rng = rng or random.Random()
        self._on_event = on_event
        options = list(channel_options)
        self._connect: ChannelFactory = channel_factory or (
            lambda address: grpc.aio.insecure_channel(address, options=options)
        )
        self._upstreams: dict[str, _Upstream] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._index: dict[tuple[str, str], list[str]] = {}
        self._generation = -1
        self._label_orders: dict[tuple[str, str], tuple[str, ...]] = {}
        self._background: set[asyncio.Task[None]] = set()

    # ----- lifecycle -----

    async def start(self) -> None:
        """Start discovery (its first poll included) and open channels to what it found."""
        await self.discovery.start()
        self._sync()

    async def close(self) -> None:
        """Stop discovery and probes; close every channel now (in-flight calls are cancelled)."""
        await self.discovery.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        upstreams, self._upstreams = list(self._upstreams.values()), {}
        for upstream in upstreams:
            self._stop_probe(upstream)
        await asyncio.gather(*(u.channel.close() for u in upstreams), return_exceptions=True)
        self._index, self._workers, self._generation = {}, {}, -1

    # ----- views -----

    def candidates(self, ref: ModelRef) -> list[str]:
        """Healthy endpoints with a ready model that `ref` reaches (by version or alias)."""
        return [upstream.address for upstream in self._candidates(ref)]

    def endpoints(self) -> list[EndpointStatus]:
        """Every endpoint discovery lists, with its load and health."""
        self._sync()
        return [
            EndpointStatus(u.address, u.outstanding, u.health.failures, u.health.ejected)
            for u in sorted(self._upstreams.values(), key=lambda u: u.address)
        ]

    def _candidates(self, ref: ModelRef) -> list[_Upstream]:
        self._sync()
        addresses = self._index.get((ref.name, ref.target), ())
        return [u for a in addresses if not (u := self._upstreams[a]).health.ejected]

    # ----- discovery -> channels and index -----

    def _sync(self) -> None:
        """Follow discovery: open channels to new endpoints, drain gone ones, rebuild the index."""
        generation = self.discovery.generation
        if generation == self._generation:
            return  # the hot path: one integer comparison
        self._generation = generation
        workers = {worker.endpoint: worker for worker in self.discovery.snapshot()}
        for address in self._upstreams.keys() - workers.keys():
            self._retire(self._upstreams.pop(address))
        for address in workers.keys() - self._upstreams.keys():
            self._upstreams[address] = self._open(address)
        self._workers = workers
        self._index = _index(workers.values())

    def _open(self, address: str) -> _Upstream:
        channel = self._connect(address)
        with contextlib.suppress(Exception):  # fakes and some channel types lack get_state
            channel.get_state(try_to_connect=True)  # connect now, not on the first request
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        log.info("upstream added", extra={"endpoint": address})
        return _Upstream(address, channel, stub, Health(self.eject_after))

    def _retire(self, upstream: _Upstream) -> None:
        # A worker leaving the registry may still be answering what it accepted (graceful
        # drain): let those calls finish before the channel goes.
        self._stop_probe(upstream)
        log.info("upstream removed", extra={"endpoint": upstream.address})
        self._spawn(upstream.channel.close(grace=self.drain_seconds))

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----- inference -----

    async def infer(
        self,
        ref: ModelRef,
        texts: Sequence[str],
        parameters: Mapping[str, oip.ParamValue] | None = None,
        deadline: float | None = None,
    ) -> oip.WorkerAnswer:
        """Classify `texts` with the model `ref` reaches, on the best endpoint for it.

        `deadline` is a `time.monotonic()` instant (None: `default_timeout`). Retries once on
        another endpoint after UNAVAILABLE, RESOURCE_EXHAUSTED or NOT_FOUND while time remains.
        """
        params = dict(parameters or {})
        request = oip.build_request(
            ref.name, ref.target, texts, params, str(params.get("request_id", ""))
        )
        if deadline is None:
            deadline = time.monotonic() + self.default_timeout
        tried: list[_RetryableError] = []
        for attempt in range(self.max_attempts):
            upstream = await self._choose(ref, exclude={failure.address for failure in tried})
            if upstream is None or deadline <= time.monotonic():
                break
            if attempt:
                self._emit("retry", upstream.address)
            try:
                return await self._infer_on(upstream, request, len(texts), deadline)
            except _RetryableError as failure:
                tried.append(failure)
                if _code(failure) == grpc.StatusCode.NOT_FOUND:
                    self._forget(ref, failure.address)
        raise self._exhausted(ref, tried, deadline)

    def _forget(self, ref: ModelRef, address: str) -> None:
        """A worker said it does not serve `ref` (it unloaded it since its last heartbeat): stop
        choosing it for `ref` until discovery lists it again, so later calls skip the dead end."""
        key = (ref.name, ref.target)
        addresses = self._index.get(key)
        if addresses and address in addresses:
            self._index = {**self._index, key: [a for a in addresses if a != address]}

    async def _choose(self, ref: ModelRef, exclude: set[str]) -> _Upstream | None:
        candidates = [u for u in self._candidates(ref) if u.address not in exclude]
        if not candidates and not exclude and self.discovery.track(ref.name, ref.target):
            # A static server without a repository index learns of a model only when asked.
            await self.discovery.refresh()
            candidates = self._candidates(ref)
        if not candidates:
            return None
        return power_of_two(candidates, lambda u: u.outstanding, self._rng)

    async def _infer_on(
        self, upstream: _Upstream, request: pb.ModelInferRequest, count: int, deadline: float
    ) -> oip.WorkerAnswer:
        upstream.outstanding += 1
        try:
            timeout = deadline - time.monotonic()
            response = await upstream.stub.ModelInfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            self._note_failure(upstream, err)
            if err.code() in RETRYABLE:
                raise _RetryableError(
                    upstream.address, err, err.details() or err.code().name
                ) from err
            raise upstream_error(err, upstream.address) from None
        except grpc.aio.UsageError as err:
            # The channel closed under us (the endpoint just left discovery): try another one.
            raise _RetryableError(upstream.address, None, f"channel closed: {err}") from err
        finally:
            upstream.outstanding -= 1
        upstream.health.success()
        order = await self._label_order(
            upstream, response.model_name, response.model_version, request.model_version, deadline
        )
        return oip.decode_response(response, count, order, upstream.address)

    def _exhausted(
        self, ref: ModelRef, tried: list[_RetryableError], deadline: float
    ) -> LooplineError:
        if not tried:
            if deadline <= time.monotonic():
                return DeadlineExceeded(f"{ref}: the deadline passed before a worker was tried")
            return self._no_worker(ref)
        last = tried[-1]
        if all(_code(f) == grpc.StatusCode.NOT_FOUND for f in tried) and last.error is not None:
            return upstream_error(last.error, last.address)
        kind = ErrorKind.OVERLOADED if _is_overloaded(last) else ErrorKind.NOT_READY
        where = ", ".join(f"{f.address} ({f.message})" for f in tried)
        hint = (
            "retry with backoff or add workers"
            if kind is ErrorKind.OVERLOADED
            else "no other worker serving it was available"
        )
        message = f"{ref}: every worker tried failed: {where}; {hint}"
        return _rebuilt(kind, message, {"model": ref.name, "workers": [f.address for f in tried]})

    def _no_worker(self, ref: ModelRef) -> NotReady:
        what = f"version {ref.version}" if ref.version else f"alias '{ref.target}'"
        source = (
            f"models:/{ref.name}/{ref.version}"
            if ref.version
            else f"models:/{ref.name}@{ref.target}"
        )
        ejected = [
            a
            for a in self._index.get((ref.name, ref.target), ())
            if self._upstreams[a].health.ejected
        ]
        state = (
            f"{len(ejected)} worker(s) serving it are ejected after failures and probed every "
            f"{self.probe_interval:g}s"
            if ejected
            else f"{len(self._upstreams)} worker(s) known, none serving it"
        )
        return NotReady(
            f"no ready worker serves model '{ref.name}' at {what} ({state}); start a worker "
            f"with --model {source} or load it on a running one (repository extension)",
            model=ref.name,
            target=ref.target,
            ejected=ejected,
        )

    # ----- health -----

    def _note_failure(self, upstream: _Upstream, err: grpc.aio.AioRpcError) -> None:
        if not _is_transport_failure(err):
            upstream.health.success()  # the worker answered: its transport is fine
            return
        if upstream.health.failure():
            log.warning(
                "upstream ejected after consecutive failures",
                extra={
                    "endpoint": upstream.address,
                    "failures": upstream.health.failures,
                    "error": err.details(),
                },
            )
            self._emit("eject", upstream.address)
            upstream.probe = asyncio.get_running_loop().create_task(self._probe(upstream))

    async def _probe(self, upstream: _Upstream) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                answer = await upstream.stub.ServerReady(
                    pb.ServerReadyRequest(), timeout=max(self.probe_interval, 0.5)
                )
            except (grpc.aio.AioRpcError, grpc.aio.UsageError):
                continue
            if answer.ready and upstream.health.readmit():
                log.info("upstream readmitted", extra={"endpoint": upstream.address})
                self._emit("readmit", upstream.address)
                upstream.probe = None
                return

    def _stop_probe(self, upstream: _Upstream) -> None:
        if upstream.probe is not None:
            upstream.probe.cancel()
            upstream.probe = None

    def _emit(self, kind: str, endpoint: str) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, endpoint)
        except Exception:  # a metrics bug must never fail a request
            log.exception("balancer on_event callback failed", extra={"event": kind})

    # ----- metadata -----

    async def model_labels(self, ref: ModelRef) -> list[str]:
        """The label order (probability columns) of the version `ref` reaches now (cached)."""
        upstream = await self._choose(ref, exclude=set())
        if upstream is None:
            raise self._no_worker(ref)
        served = self._workers[upstream.address].serving(ref.name, ref.target)
        version = served.version if served is not None else ref.target
        return list(await self._label_order(upstream, ref.name, version, ref.target))

    async def _label_order(
        self,
        upstream: _Upstream,
        name: str,
        version: str,
        target: str,
        deadline: float | None = None,
    ) -> tuple[str, ...]:
        """Label order per (model, version); fetched once from the endpoint that serves it.

        Asked with the request's `target`, which that endpoint just resolved (a package's
        version need not be a number the worker accepts as one). Empty: columns by index.
        A failed fetch raises NotReady rather than name columns wrongly.
        """
        key = (name, version)
        order = self._label_orders.get(key)
        if order is not None:
            return order
        timeout = _METADATA_TIMEOUT_S
        if deadline is not None:
            timeout = max(min(timeout, deadline - time.monotonic()), 0.001)
        order = await self._fetch_label_order(upstream, name, target, timeout)
        if order is None:
            raise NotReady(
                f"could not read the label order of {name}/{version} from {upstream.address}; "
                "retry shortly",
                model=name,
                worker=upstream.address,
            )
        self._label_orders[key] = order
        return order

    async def _fetch_label_order(
        self, upstream: _Upstream, name: str, target: str, timeout: float
    ) -> tuple[str, ...] | None:
        """Our workers' ModelConfig `labels`; else index names from ModelMetadata's shape.

        None when the endpoint did not answer (try again later, nothing cached).
        """
        try:
            config = await upstream.stub.ModelConfig(
                pb.ModelConfigRequest(name=name, version=target), timeout=timeout
            )
            if labels := oip.labels_from_config(config):
                return tuple(labels)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:  # MLServer has no ModelConfig
                _no_label_order(upstream.address, name, err)
                return None
        try:
            metadata = await upstream.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=name, version=target), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            _no_label_order(upstream.address, name, err)
            return None
        return _index_labels(metadata)

    # ----- loading -----

    async def ensure_loaded(self, ref: ModelRef, source: str, timeout: float = 300.0) -> list[str]:
        """Make sure some healthy worker serves `ref`; return the endpoints that do.

        When none does, every healthy worker is asked to load `source` (`models:/NAME/VERSION`,
        `models:/NAME@ALIAS` or a package folder they can read) through RepositoryModelLoad, then
        discovery is polled until the model shows ready. FailedPrecondition, with each worker's
        reason, when no worker could load it within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        if found := self.candidates(ref):
            return found
        upstreams = await self._loaders(ref, source)
        reasons = await asyncio.gather(
            *(self._load_on(u, ref, source, deadline) for u in upstreams)
        )
        failed = {u.address: r for u, r in zip(upstreams, reasons, strict=True) if r is not None}
        if len(failed) == len(upstreams):
            raise _load_failed(ref, source, failed)
        for address, reason in failed.items():  # others loaded it: enough to go on
            log.warning(
                "a worker could not load a model", extra={"endpoint": address, "reason": reason}
            )
        return await self._wait_ready(ref, source, deadline)

    async def _loaders(self, ref: ModelRef, source: str) -> list[_Upstream]:
        """The healthy workers to ask (after a fresh poll if none is known yet)."""
        for attempt in range(2):
            if attempt:
                await self.discovery.refresh()
            self._sync()
            upstreams = [u for u in self._upstreams.values() if not u.health.ejected]
            if upstreams:
                return upstreams
        raise FailedPrecondition(
            f"cannot load {ref}: no healthy inference worker is registered; start one "
            f"(loopline serve inference --model {source})",
            model=ref.name,
            source=source,
        )

    async def _load_on(
        self, upstream: _Upstream, ref: ModelRef, source: str, deadline: float
    ) -> str | None:
        """Ask one worker to load `source`; None on success, else the reason it could not."""
        request = pb.RepositoryModelLoadRequest(model_name=ref.name)
        request.parameters["source"].string_param = source
        metadata = (("authorization", f"Bearer {self.admin_token}"),) if self.admin_token else ()
        try:
            await upstream.stub.RepositoryModelLoad(
                request, timeout=max(deadline - time.monotonic(), 0.001), metadata=metadata
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                return (
                    "the worker refused the router's admin token (set LOOPLINE_ADMIN_TOKEN alike)"
                )
            return f"{err.code().name}: {err.details()}"
        return None

    async def _wait_ready(self, ref: ModelRef, source: str, deadline: float) -> list[str]:
        # The load call returns once the worker serves it; discovery sees that at its next
        # heartbeat (or index poll), so poll a little faster than usual until then.
        while not (found := self.candidates(ref)):
            if time.monotonic() >= deadline:
                raise FailedPrecondition(
                    f"{ref} was loaded from {source}, but no worker showed it ready in discovery "
                    "before the timeout; check the workers' heartbeats (LOOPLINE_REDIS_URL)",
                    model=ref.name,
                    source=source,
                )
            await asyncio.sleep(0.05)
            await self.discovery.refresh()
        return found


def _index(workers: Iterable[WorkerInfo]) -> dict[tuple[str, str], list[str]]:
    """(model name, version or alias) -> endpoints with that model ready."""
    index: dict[tuple[str, str], list[str]] = {}
    for worker in workers:
        for model in worker.models:
            if not model.ready:
                continue
            for target in dict.fromkeys((model.version, *model.aliases)):
                index.setdefault((model.name, target), []).append(worker.endpoint)
    return index


def _index_labels(metadata: pb.ModelMetadataResponse) -> tuple[str, ...]:
    for output in metadata.outputs:
        if output.name == oip.PROBABILITIES_OUTPUT and output.shape and output.shape[-1] > 0:
            return tuple(str(i) for i in range(output.shape[-1]))
    return ()


def _no_label_order(endpoint: str, name: str, err: grpc.aio.AioRpcError) -> None:
    log.warning(
        "could not read a model's label order",
        extra={"endpoint": endpoint, "model": name, "code": err.code().name},
    )


def _is_transport_failure(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE that did not come from a Loopline handler: the connection, not the worker.

    Our workers answer UNAVAILABLE themselves for a model still loading; they tag it with the
    error-kind trailer, and such an answer proves the transport works.
    """
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailers = err.trailing_metadata() or ()
    return not any(key == KIND_METADATA_KEY for key, _ in trailers)


def _code(failure: _RetryableError) -> grpc.StatusCode | None:
    return failure.error.code() if failure.error is not None else None


def _is_overloaded(failure: _RetryableError) -> bool:
    return failure.error is not None and failure.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def upstream_error(err: grpc.aio.AioRpcError, endpoint: str) -> LooplineError:
    """A worker's non-retried status as the matching Loopline error, with its message."""
    kind = KIND_BY_STATUS.get(err.code(), ErrorKind.INTERNAL)
    message = err.details() or f"worker {endpoint} answered {err.code().name}"
    return _rebuilt(kind, message, {"worker": endpoint, "code": err.code().name})


def _rebuilt(kind: ErrorKind, message: str, details: Mapping[str, Any]) -> LooplineError:
    # The subclasses' constructors take data (NotFound(resource, name), Overloaded(n, max)) that
    # a forwarded status no longer has; build the right class around the message as it is.
    cls = _ERROR_CLASSES.get(kind, LooplineError)
    err = cls.__new__(cls)
    LooplineError.__init__(err, message, kind=kind, details=details)
    return err


def _load_failed(ref: ModelRef, source: str, failed: Mapping[str, str]) -> FailedPrecondition:
    reasons = "; ".join(f"{address}: {reason}" for address, reason in failed.items())
    return FailedPrecondition(
        f"no worker could load {ref} from {source}: {reasons}",
        model=ref.name,
        source=source,
        reasons=dict(failed),
    )
