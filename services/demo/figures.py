"""What a demo run measures, kept as plain data: the runner fills it, the report draws it, and
`figures.json` beside the report keeps it for scripts (`DemoFigures.to_json`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "AlertEvent",
    "DemoFigures",
    "DriftPoint",
    "Marker",
    "RequestSample",
    "StepResult",
    "VariantFigures",
]


@dataclass
class RequestSample:
    """One Classify as the traffic generator saw it. `t` is seconds since the run started."""

    t: float
    latency_ms: float
    ok: bool
    phase: str  # "experiment", "drift", "promotion", ...
    version: str = ""  # model version that answered ("" when it failed)
    variant: str = ""
    code: str = "OK"  # gRPC status name


@dataclass
class StepResult:
    """One numbered step of the loop: what it did, how long, and its outcome in one line."""

    number: int
    title: str
    seconds: float
    outcome: str


@dataclass
class VariantFigures:
    """One arm of the A/B experiment as the monitor reported it."""

    variant: str
    version: str
    shadow: bool
    requests: int
    labelled: int
    accuracy: float
    ci_low: float
    ci_high: float
    p50_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass
class DriftPoint:
    """A GetDrift reading of the served version at time `t`."""

    t: float
    version: str
    samples: int
    drifted: bool
    scores: dict[str, float] = field(default_factory=dict)  # feature -> statistic value
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass
class AlertEvent:
    t: float
    kind: str  # DRIFT, RETRAINING, ...
    state: str  # FIRING, RESOLVED
    message: str


@dataclass
class Marker:
    """A moment worth a vertical line on the time plots (e.g. "promote v3", "roll back")."""

    t: float
    label: str


@dataclass
class DemoFigures:
    model: str
    started_at: str  # ISO time
    profile: str  # "full" or "quick"
    base_model: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    steps: list[StepResult] = field(default_factory=list)
    requests: list[RequestSample] = field(default_factory=list)
    variants: list[VariantFigures] = field(default_factory=list)
    p_value: float | None = None
    difference: float | None = None
    recommendation: str = ""
    rationale: str = ""
    drift: list[DriftPoint] = field(default_factory=list)
    alerts: list[AlertEvent] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)  # version -> tags/figures
    gate: str = ""  # the retraining job's gate decision, as the trainer wrote it
    failed_during_swaps: int = 0
    requests_during_swaps: int = 0
    error: str = ""  # why the run stopped early; empty when it finished

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.requests)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> DemoFigures:
        data = json.loads(text)
        data["steps"] = [StepResult(**s) for s in data["steps"]]
        data["requests"] = [RequestSample(**r) for r in data["requests"]]
        data["variants"] = [VariantFigures(**v) for v in data["variants"]]
        data["drift"] = [DriftPoint(**d) for d in data["drift"]]
        data["alerts"] = [AlertEvent(**a) for a in data["alerts"]]
        data["markers"] = [Marker(**m) for m in data["markers"]]
        return cls(**data)
