"""The balancer's choices and health logic, with an in-memory discovery and fake channels.

No sockets here (tests/integration/test_balancer.py runs real servers): a fake channel answers the
generated stub's calls from a table of per-endpoint behaviours, so retries, ejection and probing
can be driven step by step.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest

from loopline.errors import KIND_METADATA_KEY, FailedPrecondition, InvalidInput, NotReady
from loopline.oip import grpc_service_pb2 as pb
from loopline.workers import ServedModelInfo, WorkerInfo, parse_worker
from services.router import oip
from services.router.balancer import Balancer, Health, power_of_two
from services.router.discovery import CombinedDiscovery
from services.router.domain import ModelRef

REF = ModelRef("sentiment", version="2")
LABELS = ["negative", "positive"]


# ----- power of two choices -----


def test_power_of_two_never_picks_the_busiest_and_favours_the_idlest() -> None:
    loads = {"a": 3, "b": 1, "c": 2}
    rng = random.Random(7)
    picks = Counter(power_of_two(list(loads), loads.__getitem__, rng) for _ in range(3000))
    assert picks["a"] == 0  # it loses to whichever other candidate it is paired with
    # "b" wins whenever it is one of the two sampled: 2 pairs out of 3.
    assert abs(picks["b"] / 3000 - 2 / 3) < 0.03
    assert abs(picks["c"] / 3000 - 1 / 3) < 0.03


def test_power_of_two_with_one_candidate_and_ties() -> None:
    rng = random.Random(1)
    assert power_of_two(["only"], lambda _: 99, rng) == "only"
    picks = Counter(power_of_two(["x", "y"], lambda _: 0, rng) for _ in range(2000))
    assert abs(picks["x"] - picks["y"]) < 200  # ties are broken at random, not by position


# ----- health -----


def test_health_ejects_after_consecutive_failures_only() -> None:
    health = Health(eject_after=3)
    assert [health.failure(), health.failure()] == [False, False]
    health.success()  # the run is broken: start counting again
    assert [health.failure(), health.failure(), health.failure()] == [False, False, True]
    assert health.ejected
    assert health.failure() is False  # already ejected: no second ejection event
    assert health.readmit() is True
    assert (health.ejected, health.failures) == (False, 0)
    assert health.readmit() is False


def test_health_rejects_nonsense_thresholds() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Health(eject_after=0)


# ----- fakes -----


class FakeDiscovery:
    """A discovery whose list the test sets."""

    def __init__(self, workers: list[WorkerInfo]) -> None:
        self.workers = workers
        self.generation = 1

    def set(self, workers: list[WorkerInfo]) -> None:
        self.workers = workers
        self.generation += 1

    def snapshot(self) -> list[WorkerInfo]:
        return self.workers

    async def refresh(self) -> list[WorkerInfo]:
        return self.workers

    def track(self, name: str, target: str) -> bool:
        return False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def worker(endpoint: str, version: str = "2", aliases: tuple[str, ...] = ()) -> WorkerInfo:
    return WorkerInfo(endpoint, (ServedModelInfo("sentiment", version, aliases, ready=True),))


def rpc_error(code: grpc.StatusCode, details: str, kind: str | None = None) -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata((KIND_METADATA_KEY, kind)) if kind else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details)


def infer_response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    count = request.inputs[0].shape[0]
    response = pb.ModelInferResponse(model_name=request.model_name, model_version="2")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[count, 2])
    probabilities = np.tile(np.asarray([0.25, 0.75], "<f4"), (count, 1))
    response.raw_output_contents.append(probabilities.tobytes())
    return response


Behaviour = Callable[[str, Any], Awaitable[Any]]


class Upstreams:
    """Per-endpoint behaviour: None answers normally, an exception is raised for every call."""

    def __init__(self) -> None:
        self.failing: dict[str, Exception] = {}
        self.calls: Counter[tuple[str, str]] = Counter()
        self.closed: list[str] = []

    async def handle(self, address: str, method: str, request: Any) -> Any:
        self.calls[(address, method)] += 1
        if address in self.failing:
            raise self.failing[address]
        if method == "ModelInfer":
            return infer_response(request)
        if method == "ModelConfig":
            response = pb.ModelConfigResponse()
            response.config.parameters["labels"].string_value = '["negative", "positive"]'
            return response
        if method == "ServerReady":
            return pb.ServerReadyResponse(ready=True)
        raise AssertionError(f"unexpected call {method}")

    def channel(self, address: str) -> FakeChannel:
        return FakeChannel(self, address)


class FakeChannel:
    """Enough of grpc.aio.Channel for the generated stub: unary calls go to `Upstreams`."""

    def __init__(self, upstreams: Upstreams, address: str) -> None:
        self.upstreams = upstreams
        self.address = address

    def unary_unary(self, path: str, *args: Any, **kwargs: Any) -> Callable[..., Awaitable[Any]]:
        method = path.rsplit("/", 1)[-1]

        async def call(request: Any, **_: Any) -> Any:
            await asyncio.sleep(0)  # a real call always yields to the loop
            return await self.upstreams.handle(self.address, method, request)

        return call

    def stream_stream(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def close(self, grace: float | None = None) -> None:
        self.upstreams.closed.append(self.address)


def balancer(
    discovery: FakeDiscovery, upstreams: Upstreams, events: list[tuple[str, str]], **kw: Any
) -> Balancer:
    return Balancer(
        discovery,
        rng=random.Random(3),
        channel_factory=upstreams.channel,
        on_event=lambda kind, endpoint: events.append((kind, endpoint)),
        **kw,
    )


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.01)


# ----- forwarding -----


def test_an_unavailable_endpoint_is_retried_elsewhere_then_ejected_and_probed_back() -> None:
    upstreams = Upstreams()
    events: list[tuple[str, str]] = []
    discovery = FakeDiscovery([worker("a:1"), worker("b:1")])

    async def main() -> None:
        lb = balancer(discovery, upstreams, events, eject_after=3, probe_interval=0.02)
        await lb.start()
        upstreams.failing["a:1"] = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
        for _ in range(30):
            answer = await lb.infer(REF, ["fine"])
            assert answer.endpoint == "b:1"
            assert answer.labels == ["positive"]
            assert answer.columns == tuple(LABELS)
        assert upstreams.calls[("a:1", "ModelInfer")] == 3  # then ejected: never tried again
        assert ("eject", "a:1") in events
        assert events.count(("retry", "b:1")) == 3
        assert lb.candidates(REF) == ["b:1"]
        assert [s.ejected for s in lb.endpoints()] == [True, False]

        del upstreams.failing["a:1"]  # the worker is back: the next probe readmits it
        await eventually(lambda: lb.candidates(REF) == ["a:1", "b:1"], "a:1 readmitted")
        assert ("readmit", "a:1") in events
        await lb.close()

    asyncio.run(main())


def test_a_worker_sent_unavailable_is_retried_but_does_not_eject() -> None:
    upstreams = Upstreams()
    events: list[tuple[str, str]] = []
    discovery = FakeDiscovery([worker("a:1"), worker("b:1")])

    async def main() -> None:
        lb = balancer(discovery, upstreams, events, eject_after=1)
        await lb.start()
        upstreams.failing["a:1"] = rpc_error(
            grpc.StatusCode.UNAVAILABLE, "model 'sentiment' is still loading", kind="not_ready"
        )
        for _ in range(10):
            assert (await lb.infer(REF, ["fine"])).endpoint == "b:1"
        assert not [e for e in events if e[0] == "eject"]
        await lb.close()

    asyncio.run(main())


def test_client_errors_are_not_retried_and_keep_the_workers_message() -> None:
    upstreams = Upstreams()
    discovery = FakeDiscovery([worker("a:1"), worker("b:1")])
    message = "input 'text' element 0 is empty"

    async def main() -> None:
        lb = balancer(discovery, upstreams, [])
        await lb.start()
        error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, message)
        upstreams.failing.update({"a:1": error, "b:1": error})
        with pytest.raises(InvalidInput) as caught:
            await lb.infer(REF, [" "])
        assert caught.value.message == message
        infer_calls = sum(n for (_, method), n in upstreams.calls.items() if method == "ModelInfer")
        assert infer_calls == 1
        await lb.close()

    asyncio.run(main())


def test_routing_by_alias_or_version_and_a_clear_error_without_a_worker() -> None:
    upstreams = Upstreams()
    discovery = FakeDiscovery([worker("a:1", "2", ("champion",)), worker("b:1", "3")])

    async def main() -> None:
        lb = balancer(discovery, upstreams, [])
        await lb.start()
        assert lb.candidates(ModelRef("sentiment", alias="champion")) == ["a:1"]
        assert lb.candidates(ModelRef("sentiment")) == ["a:1"]  # no target: champion
        assert lb.candidates(ModelRef("sentiment", version="3")) == ["b:1"]
        with pytest.raises(NotReady) as caught:
            await lb.infer(ModelRef("sentiment", alias="challenger"), ["x"])
        assert "alias 'challenger'" in caught.value.message
        assert "models:/sentiment@challenger" in caught.value.message
        await lb.close()

    asyncio.run(main())


def test_endpoints_leaving_discovery_get_their_channel_closed() -> None:
    upstreams = Upstreams()
    discovery = FakeDiscovery([worker("a:1"), worker("b:1")])

    async def main() -> None:
        lb = balancer(discovery, upstreams, [], drain_seconds=0.01)
        await lb.start()
        discovery.set([worker("b:1")])
        assert lb.candidates(REF) == ["b:1"]
        await eventually(lambda: upstreams.closed == ["a:1"], "a:1 channel closed")
        await lb.close()
        assert sorted(upstreams.closed) == ["a:1", "b:1"]

    asyncio.run(main())


def test_decoding_checks_the_count_and_names_columns() -> None:
    request = oip.build_request("m", "1", ["a", "b"], {"experiment": "e1", "shadow": True})
    assert request.parameters["experiment"].string_param == "e1"
    assert request.parameters["shadow"].bool_param is True
    assert oip.decode_bytes(request.raw_input_contents[0]) == [b"a", b"b"]
    response = infer_response(request)
    answer = oip.decode_response(response, 2, LABELS)
    assert answer.labels == ["positive", "positive"]  # no label output: argmax over the order
    assert answer.truncated == [False, False]
    assert oip.decode_response(response, 2).columns == ("0", "1")
    with pytest.raises(Exception, match="for 3 texts"):
        oip.decode_response(response, 3, LABELS)


def test_heartbeats_parse_leniently_but_only_ready_models_are_served() -> None:
    raw = {
        "endpoint": "10.0.0.5:8001",
        "models": [
            {"name": "sentiment", "version": "3", "aliases": "champion", "ready": True},
            {"name": "sentiment", "version": "4", "aliases": ["challenger"]},  # no `ready`
        ],
        "queue_depth": 2,
        "pid": 7,
        "added_by_a_newer_worker": {"x": 1},
    }
    info = parse_worker(raw)
    assert info is not None
    assert info.models[0].aliases == ("champion",)
    served = info.serving("sentiment", "champion")
    assert served is not None
    assert served.version == "3"
    assert info.serving("sentiment", "challenger") is None  # not ready: never routed to
    assert parse_worker({"models": []}) is None
    assert parse_worker({"endpoint": "e:1", "models": [{"version": "1"}]}) is None


def test_ensure_loaded_without_any_worker_says_how_to_start_one() -> None:
    async def main() -> None:
        lb = balancer(FakeDiscovery([]), Upstreams(), [])
        await lb.start()
        with pytest.raises(FailedPrecondition, match="no healthy inference worker"):
            await lb.ensure_loaded(REF, "models:/sentiment/2", timeout=1)
        await lb.close()

    asyncio.run(main())


def test_combined_discovery_merges_sources_and_follows_their_changes() -> None:
    heartbeats = FakeDiscovery([worker("b:1", "2"), worker("a:1", "2")])
    static = FakeDiscovery([worker("a:1", "9"), worker("c:1", "3")])
    combined = CombinedDiscovery([heartbeats, static])
    assert [(w.endpoint, w.models[0].version) for w in combined.snapshot()] == [
        ("a:1", "2"),  # listed by both: the first source wins
        ("b:1", "2"),
        ("c:1", "3"),
    ]
    before = combined.generation
    static.set([])
    assert combined.generation != before
    assert [w.endpoint for w in combined.snapshot()] == ["a:1", "b:1"]
