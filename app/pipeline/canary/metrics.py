"""Canary metrics (design section 7.1) and the pass/fail judgement. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TEST_STATUSES = ("passed", "failed", "errored", "skipped")


@dataclass(frozen=True, slots=True)
class TestResult:
    name: str
    provider: str
    status: str  # one of TEST_STATUSES
    session_start_ms: float | None = None
    time_to_first_output_ms: float | None = None
    disconnected: bool = False
    message: str | None = None

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> TestResult:
        """A result as the API takes it (and stores it)."""
        return cls(
            name=str(item["name"]),
            provider=str(item["provider"]),
            status=str(item["status"]),
            session_start_ms=item.get("sessionStartMs"),
            time_to_first_output_ms=item.get("timeToFirstOutputMs"),
            disconnected=bool(item.get("disconnected", False)),
            message=item.get("message"),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "provider": self.provider,
            "status": self.status,
            "sessionStartMs": self.session_start_ms,
            "timeToFirstOutputMs": self.time_to_first_output_ms,
            "disconnected": self.disconnected,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Metrics:
    total_tests: int
    passed: int
    failed: int
    errored: int
    skipped: int
    pass_rate: float  # passed / (passed + failed + errored); 0 when none ran
    avg_session_start_ms: float | None  # over the tests that report it
    avg_time_to_first_output_ms: float | None
    disconnect_rate: float  # disconnected / tests not skipped; 0 when none ran

    @property
    def ran(self) -> int:
        return self.passed + self.failed + self.errored

    def as_json(self) -> dict[str, Any]:
        return {
            "totalTests": self.total_tests,
            "passed": self.passed,
            "failed": self.failed,
            "errored": self.errored,
            "skipped": self.skipped,
            "passRate": self.pass_rate,
            "avgSessionStartMs": self.avg_session_start_ms,
            "avgTimeToFirstOutputMs": self.avg_time_to_first_output_ms,
            "disconnectRate": self.disconnect_rate,
        }


def measure(results: Iterable[TestResult]) -> Metrics:
    results = list(results)
    counts = {status: 0 for status in TEST_STATUSES}
    for result in results:
        counts[result.status] += 1
    ran = [r for r in results if r.status != "skipped"]
    disconnected = sum(1 for r in ran if r.disconnected)
    return Metrics(
        total_tests=len(results),
        passed=counts["passed"],
        failed=counts["failed"],
        errored=counts["errored"],
        skipped=counts["skipped"],
        pass_rate=counts["passed"] / len(ran) if ran else 0.0,
        avg_session_start_ms=_mean(r.session_start_ms for r in results),
        avg_time_to_first_output_ms=_mean(r.time_to_first_output_ms for r in results),
        disconnect_rate=disconnected / len(ran) if ran else 0.0,
    )


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_pass_rate: float = 0.95
    max_disconnect_rate: float = 0.05

    def met(self, metrics: Metrics) -> bool:
        return (
            metrics.passed > 0  # whatever the thresholds, a provider must pass something
            and metrics.pass_rate >= self.min_pass_rate
            and metrics.disconnect_rate <= self.max_disconnect_rate
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    state: str  # passed, failed, errored
    metrics: Metrics
    per_provider: Mapping[str, Metrics]
    known_good_for: tuple[str, ...]
    reason: str

    def metrics_json(self) -> dict[str, Any]:
        return {
            **self.metrics.as_json(),
            "perProvider": {p: m.as_json() for p, m in sorted(self.per_provider.items())},
        }


def judge(
    results: Sequence[TestResult], providers: Iterable[str], thresholds: Thresholds
) -> Verdict:
    """A run passes iff every provider the build carries met the thresholds on its own
    tests; the build is known-good for exactly the providers that did. A suite where no
    test ran (empty, or all skipped) is errored: it proves nothing."""
    overall = measure(results)
    by_provider: dict[str, list[TestResult]] = {}
    for result in results:
        by_provider.setdefault(result.provider, []).append(result)
    per_provider = {p: measure(rs) for p, rs in by_provider.items()}
    expected = sorted(set(providers)) or sorted(per_provider)
    good = tuple(p for p in expected if p in per_provider and thresholds.met(per_provider[p]))
    if overall.ran == 0:
        return Verdict("errored", overall, per_provider, (), "no test ran")
    missing = [p for p in expected if p not in per_provider or per_provider[p].ran == 0]
    below = [p for p in expected if p not in good and p not in missing]
    if not missing and not below:
        return Verdict("passed", overall, per_provider, good, "every provider met the thresholds")
    reasons = []
    if below:
        reasons.append("below the thresholds: " + ", ".join(below))
    if missing:
        reasons.append("no test ran for: " + ", ".join(missing))
    return Verdict("failed", overall, per_provider, good, "; ".join(reasons))
