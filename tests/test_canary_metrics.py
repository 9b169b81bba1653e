"""Canary metrics (design section 7.1) and the judgement, as arithmetic."""

from __future__ import annotations

import pytest

from app.pipeline.canary.metrics import TestResult as Result
from app.pipeline.canary.metrics import Thresholds, judge, measure

THRESHOLDS = Thresholds(min_pass_rate=0.95, max_disconnect_rate=0.05)


def results(
    provider: str,
    passed: int = 0,
    failed: int = 0,
    errored: int = 0,
    skipped: int = 0,
    disconnected: int = 0,
) -> list[Result]:
    made = []
    for status, count in (
        ("passed", passed),
        ("failed", failed),
        ("errored", errored),
        ("skipped", skipped),
    ):
        made += [Result(f"{provider}-{status}-{n}", provider, status) for n in range(count)]
    ran = [i for i, r in enumerate(made) if r.status != "skipped"]
    for i in ran[:disconnected]:
        r = made[i]
        made[i] = Result(r.name, r.provider, r.status, disconnected=True)
    return made


def test_the_nine_fields_of_a_mixed_suite() -> None:
    suite = [
        Result("a", "codex", "passed", 400, 900, False),
        Result("b", "codex", "passed", 500, None, False),
        Result("c", "codex", "failed", None, 1100, True),
        Result("d", "codex", "errored"),
        Result("e", "codex", "skipped", 9999, 9999, True),
    ]
    m = measure(suite)
    assert m.as_json() == {
        "totalTests": 5,
        "passed": 2,
        "failed": 1,
        "errored": 1,
        "skipped": 1,
        "passRate": 0.5,  # 2 / (2 + 1 + 1): skipped tests do not count
        "avgSessionStartMs": (400 + 500 + 9999) / 3,  # over the tests that report it
        "avgTimeToFirstOutputMs": (900 + 1100 + 9999) / 3,
        "disconnectRate": 1 / 4,  # disconnected among tests not skipped
    }


@pytest.mark.parametrize(
    "suite",
    [[], results("codex", skipped=7)],
    ids=["empty", "all skipped"],
)
def test_a_suite_where_nothing_ran_is_errored_never_passed(suite: list[Result]) -> None:
    verdict = judge(suite, ["codex"], THRESHOLDS)
    assert verdict.state == "errored"
    assert verdict.known_good_for == ()
    assert verdict.metrics.pass_rate == 0.0 and verdict.metrics.disconnect_rate == 0.0
    assert verdict.metrics.avg_session_start_ms is None


def test_an_all_errored_suite_fails() -> None:
    verdict = judge(results("codex", errored=10), ["codex"], THRESHOLDS)
    assert (verdict.state, verdict.metrics.pass_rate) == ("failed", 0.0)


@pytest.mark.parametrize(
    ("passed", "failed", "state"),
    [(95, 5, "passed"), (94, 6, "failed"), (19, 1, "passed"), (100, 0, "passed")],
)
def test_the_pass_rate_threshold_is_inclusive(passed: int, failed: int, state: str) -> None:
    assert judge(results("codex", passed, failed), ["codex"], THRESHOLDS).state == state


@pytest.mark.parametrize(("disconnected", "state"), [(5, "passed"), (6, "failed")])
def test_the_disconnect_threshold_is_inclusive(disconnected: int, state: str) -> None:
    suite = results("codex", passed=100, disconnected=disconnected)
    assert judge(suite, ["codex"], THRESHOLDS).state == state


def test_a_build_is_known_good_only_for_the_providers_that_met_the_thresholds() -> None:
    suite = results("codex", passed=20) + results("claude_code", passed=10, failed=10)
    verdict = judge(suite, ["codex", "claude_code"], THRESHOLDS)
    assert verdict.state == "failed"
    assert verdict.known_good_for == ("codex",)
    assert "claude_code" in verdict.reason
    assert verdict.per_provider["claude_code"].pass_rate == 0.5
    assert verdict.metrics_json()["perProvider"]["codex"]["passRate"] == 1.0


def test_a_provider_of_the_build_without_tests_keeps_the_run_from_passing() -> None:
    verdict = judge(results("codex", passed=20), ["codex", "gemini_cli"], THRESHOLDS)
    assert verdict.state == "failed"
    assert verdict.known_good_for == ("codex",)
    assert "no test ran for: gemini_cli" in verdict.reason


def test_tests_of_providers_the_build_does_not_carry_do_not_make_it_known_good_for_them() -> None:
    suite = results("codex", passed=20) + results("aider", passed=5)
    verdict = judge(suite, ["codex"], THRESHOLDS)
    assert (verdict.state, verdict.known_good_for) == ("passed", ("codex",))
