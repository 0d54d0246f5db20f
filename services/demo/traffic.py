"""Traffic for the demo: users classifying labelled sentences through the router, sending the
true label back as feedback for a share of them, every call timed and kept as a RequestSample."""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from loopline.v1 import router_pb2 as pb
from loopline.v1 import router_pb2_grpc as pb_grpc
from services.demo.figures import RequestSample

__all__ = ["Example", "Traffic"]


@dataclass(frozen=True)
class Example:
    text: str
    label: str


class Traffic:
    """Shared by every phase of one demo: one channel, one list of samples, one clock."""

    def __init__(
        self,
        router: str,
        clock_start: float,
        metadata: tuple[tuple[str, str], ...] = (),
        seed: int = 7,
    ) -> None:
        self.channel = grpc.insecure_channel(router)
        self.metadata = metadata
        self.stub = pb_grpc.RouterStub(self.channel)
        self.clock_start = clock_start
        self.samples: list[RequestSample] = []
        self.feedback_sent = 0
        self.feedback_failed = 0
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def close(self) -> None:
        self.stop()
        self.channel.close()

    def now(self) -> float:
        return time.monotonic() - self.clock_start

    def one(self, example: Example, user: str, phase: str, feedback: bool) -> RequestSample:
        """Classify one text as `user`; send its label as feedback when asked and it answered."""
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        try:
            answer = self.stub.Classify(
                pb.ClassifyRequest(text=example.text, user_id=user, request_id=request_id),
                metadata=self.metadata,
                timeout=30,
            )
        except grpc.RpcError as err:
            sample = RequestSample(
                t=started - self.clock_start,
                latency_ms=1000 * (time.monotonic() - started),
                ok=False,
                phase=phase,
                code=err.code().name,
            )
        else:
            sample = RequestSample(
                t=started - self.clock_start,
                latency_ms=1000 * (time.monotonic() - started),
                ok=True,
                phase=phase,
                version=answer.model.version,
                variant=answer.variant,
            )
            if feedback:
                self._feedback(request_id, example.label, user)
        with self._lock:
            self.samples.append(sample)
        return sample

    def _feedback(self, request_id: str, label: str, user: str) -> None:
        try:
            self.stub.Feedback(
                pb.FeedbackRequest(request_id=request_id, label=label, user_id=user, source="demo"),
                metadata=self.metadata,
                timeout=10,
            )
            with self._lock:
                self.feedback_sent += 1
        except grpc.RpcError:
            with self._lock:
                self.feedback_failed += 1

    def _users(self, count: int) -> list[str]:
        return [f"user-{n:04d}" for n in range(count)]

    def send(
        self,
        examples: Sequence[Example],
        users: int,
        phase: str,
        feedback_share: float,
        concurrency: int = 4,
    ) -> list[RequestSample]:
        """Every example once, spread over `concurrency` callers; returns this phase's samples."""
        names = self._users(users)
        plan = [(e, self._rng.choice(names), self._rng.random() < feedback_share) for e in examples]
        before = len(self.samples)
        lanes = [plan[n::concurrency] for n in range(concurrency)]

        def lane(items: list[tuple[Example, str, bool]]) -> None:
            for example, user, give in items:
                self.one(example, user, phase, give)

        threads = [threading.Thread(target=lane, args=(items,), daemon=True) for items in lanes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self.samples[before:]

    def start(
        self,
        examples: Sequence[Example],
        users: int,
        phase: str,
        feedback_share: float,
        concurrency: int = 2,
        pause: float = 0.0,
    ) -> None:
        """Cycle through `examples` in the background until `stop()`."""
        names = self._users(users)
        self._stop.clear()

        def lane(offset: int) -> None:
            rng = random.Random(offset)
            for example in itertools.islice(itertools.cycle(examples), offset, None):
                if self._stop.is_set():
                    return
                self.one(example, rng.choice(names), phase, rng.random() < feedback_share)
                if pause:
                    time.sleep(pause)

        for n in range(concurrency):
            thread = threading.Thread(target=lane, args=(n * 97,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._threads.clear()
