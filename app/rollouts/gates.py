"""Stage gates (design section 6.1): whether a stage's metrics call for a rollback, allow
an advance, or are not enough yet; and the baseline comparison. Pure functions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Z95 = 1.959963984540054  # the normal quantile for a two-sided 95% interval


@dataclass(frozen=True, slots=True)
class Counts:
    started: int = 0
    failed: int = 0
    disconnected: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.started + other.started,
            self.failed + other.failed,
            self.disconnected + other.disconnected,
        )

    # Capped at 1: a stage can count a session's failure but not its start (the runner
    # started it while the stage before was current), so failed can exceed started.
    @property
    def failure_rate(self) -> float:
        return min(1.0, self.failed / self.started) if self.started else 0.0

    @property
    def disconnect_rate(self) -> float:
        return min(1.0, self.disconnected / self.started) if self.started else 0.0


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_failure_rate: float = 0.10
    max_disconnect_rate: float = 0.15
    min_sessions: int = 100


@dataclass(frozen=True, slots=True)
class Verdict:
    """``rollback`` (with the metric that tripped it), ``pass`` (enough sessions, rates
    within), ``insufficient`` (not enough sessions to judge), or ``held`` (a rate above
    its threshold, but in one org's data only: no rollback, and no advance either)."""

    outcome: str
    total: Counts
    metric: str | None = None
    value: float | None = None
    threshold: float | None = None
    orgs_over: tuple[str, ...] = ()


def judge_stage(by_org: Mapping[str, Counts], thresholds: Thresholds) -> Verdict:
    """Judge a stage on the sessions of its included orgs on the target build.

    A rate above its threshold trips a rollback once the stage has the minimum number of
    sessions, but only if it is above the threshold in at least two orgs' own data (or
    in the only org's): one misbehaving org cannot pull a build back from a healthy
    fleet; it holds the stage instead. Below the minimum nothing is decided."""
    tally = StageTally(thresholds)
    for org, counts in by_org.items():
        tally.add(org, counts)
    return tally.verdict()


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion."""
    if trials == 0:
        return (0.0, 1.0)
    successes = max(0, min(successes, trials))  # see Counts: never more than the trials
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    denominator = 1 + z * z / trials
    # Exact at the ends (0 or all successes), which rounding would miss by 1e-19.
    lower = min(p, max(0.0, (centre - spread) / denominator))
    upper = max(p, min(1.0, (centre + spread) / denominator))
    return (lower, upper)


def newcombe(x1: int, n1: int, x2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """A 95% confidence interval for p1 - p2 by Newcombe's hybrid score method (his
    method 10, 1998): sound for small samples and rates near 0, unlike the Wald
    interval."""
    x1, x2 = max(0, min(x1, n1)), max(0, min(x2, n2))
    p1 = x1 / n1 if n1 else 0.0
    p2 = x2 / n2 if n2 else 0.0
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    difference = p1 - p2
    lower = difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (lower, upper)


@dataclass(frozen=True, slots=True)
class Baseline:
    """The target build's rates against the baseline's (eligible orgs not yet included,
    on the previous build), with 95% intervals for the differences."""

    target: Counts
    baseline: Counts
    failure_difference: tuple[float, float, float]  # estimate, low, high
    disconnect_difference: tuple[float, float, float]


def compare(target: Counts, baseline: Counts) -> Baseline:
    def difference(metric: str, x1: int, x2: int) -> tuple[float, float, float]:
        low, high = newcombe(x1, target.started, x2, baseline.started)
        return (getattr(target, metric) - getattr(baseline, metric), low, high)

    return Baseline(
        target,
        baseline,
        difference("failure_rate", target.failed, baseline.failed),
        difference("disconnect_rate", target.disconnected, baseline.disconnected),
    )


def judge_regression(
    comparison: Baseline, max_regression: float | None, min_sessions: int
) -> Verdict | None:
    """The baseline gate: a rollback when, with enough sessions on both sides, the target
    build's rate is above the baseline's by more than ``max_regression`` with 95%
    confidence (the interval's lower end is above it). None when it does not trip."""
    if max_regression is None:
        return None
    if comparison.target.started < min_sessions or comparison.baseline.started < min_sessions:
        return None
    for metric, (_, low, _) in (
        ("failure_rate", comparison.failure_difference),
        ("disconnect_rate", comparison.disconnect_difference),
    ):
        if low > max_regression:
            return Verdict(
                "rollback",
                comparison.target,
                f"{metric}_regression",
                low,
                max_regression,
            )
    return None


class StageTally:
    """A stage's sessions as heartbeats arrive, judged in constant time per heartbeat:
    totals and the orgs over each threshold are kept up to date as counts are added, so
    a verdict never sums every org again (``judge_stage`` is the same judgement of
    counts known at once)."""

    __slots__ = ("_over", "_with_data", "baseline", "by_org", "thresholds", "total")

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self.by_org: dict[str, Counts] = {}
        self.total = Counts()
        self.baseline = Counts()
        self._over: dict[str, set[str]] = {"failure_rate": set(), "disconnect_rate": set()}
        self._with_data = 0

    def add(self, org_id: str, counts: Counts) -> None:
        before = self.by_org.get(org_id, Counts())
        after = before + counts
        self.by_org[org_id] = after
        self.total = self.total + counts
        if after.started and not before.started:
            self._with_data += 1
        for metric, limit in (
            ("failure_rate", self.thresholds.max_failure_rate),
            ("disconnect_rate", self.thresholds.max_disconnect_rate),
        ):
            if after.started and getattr(after, metric) > limit:
                self._over[metric].add(org_id)
            else:
                self._over[metric].discard(org_id)

    def add_baseline(self, counts: Counts) -> None:
        self.baseline = self.baseline + counts

    def verdict(self) -> Verdict:
        t, total = self.thresholds, self.total
        if total.started < t.min_sessions:
            return Verdict("insufficient", total)
        held: Verdict | None = None
        for metric, limit in (
            ("failure_rate", t.max_failure_rate),
            ("disconnect_rate", t.max_disconnect_rate),
        ):
            overall = getattr(total, metric)
            if overall <= limit:
                continue
            over = tuple(sorted(self._over[metric]))
            if len(over) >= 2 or (self._with_data == 1 and over):
                return Verdict("rollback", total, metric, overall, limit, over)
            held = held or Verdict("held", total, metric, overall, limit, over)
        return held or Verdict("pass", total)
