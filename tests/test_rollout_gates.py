"""Rollout stage plans and stage gates: the arithmetic a rollout is moved by."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.config import Settings
from app.rollouts.gates import Counts, Thresholds, judge_stage, newcombe, wilson
from app.rollouts.plan import BETA, STABLE, Stage, format_stages, parse_stages

GATES = Thresholds(max_failure_rate=0.10, max_disconnect_rate=0.15, min_sessions=100)


def test_the_default_plans_are_the_designs() -> None:
    assert parse_stages(STABLE) == (
        Stage(1, timedelta(hours=1)),
        Stage(10, timedelta(hours=2)),
        Stage(50, timedelta(hours=4)),
        Stage(100, None),
    )
    assert parse_stages(BETA) == (Stage(10, timedelta(minutes=30)), Stage(100, None))
    settings = Settings.from_env({})
    assert (settings.stages_stable, settings.stages_beta) == (STABLE, BETA)


def test_short_plans_serve_demos_and_read_back_the_same() -> None:
    stages = parse_stages(" 5% : 30s , 50%:1m30s, 100% ")
    assert stages == (
        Stage(5, timedelta(seconds=30)),
        Stage(50, timedelta(seconds=90)),
        Stage(100, None),
    )
    assert format_stages(stages) == "5%:30s,50%:1m30s,100%"
    assert parse_stages(format_stages(stages)) == stages


@pytest.mark.parametrize(
    "plan",
    [
        "",
        "100",
        "1%:1h",
        "1%,100%",
        "50%:1h,10%:1h,100%",
        "0%:1h,100%",
        "1%:1h,100%:1h",
        "1%:0s,100%",
        "1%:1h,,100%",
        "101%:1h,100%",
    ],
)
def test_a_bad_plan_is_refused(plan: str) -> None:
    with pytest.raises(ValueError):
        parse_stages(plan)


# -- gates ------------------------------------------------------------------------------


def failing(started: int, failed: int) -> Counts:
    return Counts(started, failed, 0)


def test_nothing_is_decided_below_the_minimum_of_sessions() -> None:
    verdict = judge_stage({"a": failing(50, 40), "b": failing(49, 40)}, GATES)
    assert verdict.outcome == "insufficient" and verdict.total.started == 99


def test_a_bad_rate_in_two_orgs_rolls_back_at_the_minimum() -> None:
    verdict = judge_stage({"a": failing(50, 10), "b": failing(50, 10)}, GATES)
    assert (verdict.outcome, verdict.metric) == ("rollback", "failure_rate")
    assert verdict.value == 0.2 and verdict.threshold == 0.10
    assert verdict.orgs_over == ("a", "b")


def test_one_misbehaving_org_cannot_roll_back_a_healthy_fleet() -> None:
    by_org = {"bad": failing(100, 100), **{f"ok-{n}": failing(100, 0) for n in range(3)}}
    verdict = judge_stage(by_org, GATES)
    # Held: not pulled back, and not moved on while the overall rate is above the limit.
    assert (verdict.outcome, verdict.orgs_over, verdict.value) == ("held", ("bad",), 0.25)
    # ... but one that is the whole stage can.
    assert judge_stage({"only": failing(100, 11)}, GATES).outcome == "rollback"


def test_rates_at_the_thresholds_pass() -> None:
    assert judge_stage({"a": failing(100, 10), "b": failing(100, 10)}, GATES).outcome == "pass"
    at_limit = {"a": Counts(100, 0, 15), "b": Counts(100, 0, 15)}
    assert judge_stage(at_limit, GATES).outcome == "pass"
    above = {"a": Counts(100, 0, 16), "b": Counts(100, 0, 16)}
    assert judge_stage(above, GATES).metric == "disconnect_rate"


def test_newcombes_interval_matches_his_published_examples() -> None:
    # Newcombe (1998), table II, method 10.
    for (x1, n1, x2, n2), expected in [
        ((56, 70, 48, 80), (0.0524, 0.3339)),
        ((9, 10, 3, 10), (0.1705, 0.8090)),
        ((6, 7, 2, 7), (0.0582, 0.8062)),
        ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ]:
        lower, upper = newcombe(x1, n1, x2, n2)
        assert (round(lower, 4), round(upper, 4)) == expected


@given(
    st.integers(min_value=1, max_value=2000),
    st.integers(min_value=1, max_value=2000),
    st.data(),
)
def test_the_interval_holds_the_observed_difference(n1: int, n2: int, data: st.DataObject) -> None:
    x1 = data.draw(st.integers(min_value=0, max_value=n1))
    x2 = data.draw(st.integers(min_value=0, max_value=n2))
    lower, upper = newcombe(x1, n1, x2, n2)
    assert -1 <= lower <= x1 / n1 - x2 / n2 <= upper <= 1
    w_lower, w_upper = wilson(x1, n1)
    assert 0 <= w_lower <= x1 / n1 <= w_upper <= 1


def test_a_stage_with_more_failures_than_starts_is_judged_without_error() -> None:
    # A session started in the stage before and failed in this one counts only here.
    verdict = judge_stage({"a": Counts(100, 150, 0), "b": Counts(100, 120, 0)}, GATES)
    assert (verdict.outcome, verdict.value) == ("rollback", 1.0)
    low, high = newcombe(150, 100, 5, 100)
    assert -1 <= low <= high <= 1
