"""The checker's sample-ratio pass over experiments, with the monitor's views faked (unit)."""

from __future__ import annotations

import asyncio
from typing import Any

from loopline.errors import NotFound
from services.monitor import stats as st
from services.monitor.alerts import Rules
from services.monitor.handlers import Checker, ExperimentInfo

WEIGHTS = {"control": 50.0, "candidate": 50.0}
TRAFFIC = {
    "exp-skewed": ("running", {"control": 700, "candidate": 300}),
    "exp-fair": ("running", {"control": 505, "candidate": 495}),
    "exp-stopped": ("stopped", {"control": 700, "candidate": 300}),
}


class FakeState:
    async def experiments(self) -> list[str]:
        return [*TRAFFIC, "exp-deleted"]


class FakeViews:
    state = FakeState()

    async def sample_ratio(self, experiment_id: str) -> tuple[ExperimentInfo, Any]:
        if experiment_id not in TRAFFIC:
            raise NotFound("experiment", experiment_id)
        status, observed = TRAFFIC[experiment_id]
        info = ExperimentInfo(
            experiment_id, "ab", "sentiment", list(WEIGHTS.items()), [], 0.0, {"status": status}
        )
        return info, st.sample_ratio_mismatch(observed, WEIGHTS)


def test_running_experiments_are_judged_on_their_assignment_shares() -> None:
    checker = Checker(
        FakeViews(),  # type: ignore[arg-type]
        book=Any,  # type: ignore[arg-type]
        rules=Rules(srm_p_value=0.001),
        retrainer=Any,  # type: ignore[arg-type]
        interval=60,
        window_seconds=60,
        drift_records=100,
    )
    conditions = asyncio.run(checker.experiment_conditions())
    verdicts = {c.detail: c.holds for c in conditions}
    # 700/300 under 50/50 weights is a mismatch; 505/495 is not; a stopped experiment resolves
    # what it raised; a deleted one is skipped.
    assert verdicts == {"exp-skewed": True, "exp-fair": False, "exp-stopped": False}
    assert {(c.rule, c.model, c.version) for c in conditions} == {("srm", "sentiment", "")}
