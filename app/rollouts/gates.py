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

    @property
    def failure_rate(self) -> float:
        return self.failed / self.started if self.started else 0.0

    @property
    def disconnect_rate(self) -> float:
        return self.disconnected / self.started if self.started else 0.0


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_failure_rate: float = 0.10
    max_disconnect_rate: float = 0.15
    min_sessions: int = 100


@dataclass(frozen=True, slots=True)
class Verdict:
    """``rollback`` (with the metric that tripped it), ``pass`` (enough sessions, rates
    within), or ``insufficient`` (not enough sessions to judge)."""

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
    fleet. Below the minimum nothing is decided."""
    total = sum(by_org.values(), Counts())
    if total.started < thresholds.min_sessions:
        return Verdict("insufficient", total)
    for metric, limit in (
        ("failure_rate", thresholds.max_failure_rate),
        ("disconnect_rate", thresholds.max_disconnect_rate),
    ):
        overall = getattr(total, metric)
        if overall <= limit:
            continue
        over = tuple(
            sorted(org for org, c in by_org.items() if c.started and getattr(c, metric) > limit)
        )
        orgs_with_data = [org for org, c in by_org.items() if c.started]
        if len(over) >= 2 or (len(orgs_with_data) == 1 and over):
            return Verdict("rollback", total, metric, overall, limit, over)
    return Verdict("pass", total)


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion."""
    if trials == 0:
        return (0.0, 1.0)
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
    p1 = x1 / n1 if n1 else 0.0
    p2 = x2 / n2 if n2 else 0.0
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    difference = p1 - p2
    lower = difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (lower, upper)
