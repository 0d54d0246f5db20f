"""Alert rules (pure) and the alert book in a real Redis: fire once, resolve once, page, follow."""

from __future__ import annotations

import asyncio

import pytest

from loopline.redis import connect
from services.monitor.alerts import FIRING, RESOLVED, AlertBook, RuleInputs, Rules, evaluate

RULES = Rules(drift_consecutive=2, accuracy_floor=0.8, accuracy_min_labels=50, latency_p99_ms=20)


def holding(inputs: RuleInputs) -> set[str]:
    return {c.rule for c in evaluate(RULES, inputs) if c.holds}


def test_rules_fire_only_with_enough_evidence() -> None:
    assert holding(RuleInputs("m", "1")) == set()
    assert holding(RuleInputs("m", "1", drifted_in_a_row=1)) == set()
    assert holding(RuleInputs("m", "1", drifted_in_a_row=2)) == {"drift"}
    # A low accuracy on too few labels is not judged.
    assert holding(RuleInputs("m", "1", labelled=10, accuracy=0.5)) == set()
    assert holding(RuleInputs("m", "1", labelled=60, accuracy=0.5)) == {"accuracy_floor"}
    assert holding(RuleInputs("m", "1", latency_p99_ms=25.0)) == {"latency_slo"}
    srm = RuleInputs("m", "1", srm={"exp-1": 1e-6, "exp-2": 0.4})
    conditions = [c for c in evaluate(RULES, srm) if c.rule == "srm"]
    assert [(c.detail, c.holds) for c in conditions] == [("exp-1", True), ("exp-2", False)]


def test_a_condition_fires_once_and_resolves_once(redis_url: str) -> None:
    async def scenario() -> None:
        client = connect(redis_url)
        book = AlertBook(client)
        drifting = evaluate(RULES, RuleInputs("m", "1", drifted_in_a_row=3, drift_summary="x"))
        raised = await book.apply(drifting, now=100.0)
        assert [(a.rule, a.state) for a in raised] == [("drift", FIRING)]
        assert await book.apply(drifting, now=130.0) == []  # still firing: nothing new
        assert [a.id for a in await book.firing()] == [raised[0].id]

        calm = evaluate(RULES, RuleInputs("m", "1"))
        resolved = await book.apply(calm, now=160.0)
        assert [(a.rule, a.state, a.time, a.resolve_time) for a in resolved] == [
            ("drift", RESOLVED, 100.0, 160.0)
        ]
        assert await book.firing() == []
        history = await book.history()
        assert [a.state for a in history] == [RESOLVED, FIRING]  # newest first
        assert history[0].id > history[1].id
        await client.aclose()

    asyncio.run(scenario())


def test_watchers_resume_after_the_last_alert_they_saw(redis_url: str) -> None:
    async def scenario() -> None:
        client = connect(redis_url)
        book = AlertBook(client)
        first = await book.apply(evaluate(RULES, RuleInputs("m", "1", latency_p99_ms=99.0)))
        follower = book.follow(after_id=first[0].id, block_ms=200)
        pending = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.1)
        second = await book.apply(evaluate(RULES, RuleInputs("m", "2", drifted_in_a_row=5)))
        seen = await asyncio.wait_for(pending, timeout=5)
        assert seen.id == second[0].id
        assert (seen.model, seen.version, seen.rule) == ("m", "2", "drift")
        await follower.aclose()
        await client.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("floor", [0.0])
def test_a_rule_turned_off_never_fires(floor: float) -> None:
    rules = Rules(accuracy_floor=floor)
    inputs = RuleInputs("m", "1", labelled=10_000, accuracy=0.01)
    assert "accuracy_floor" not in {c.rule for c in evaluate(rules, inputs)}
