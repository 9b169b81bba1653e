"""Prometheus metrics: what an operator graphs and alerts on.

Counters that must be exact at the moment something happens (webhook outcomes, HTTP
answers, heartbeats) are counted where it happens. Everything the store or another
component already knows (outbox depth, rollouts by state, GitHub's answers and rate
limits, version polls) is read when Prometheus scrapes, so the hot paths pay nothing for
it. Labels stay low in cardinality: route templates, states, channels, never an org,
runner, repository or rollout id."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.services import Services

PREFIX = "update_pipeline"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEARTBEAT_ROUTE = "/api/update-pipeline/heartbeat"


class Metrics:
    """The service's metrics, in a registry of its own (several test servers in one
    process must not share counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.heartbeats = Counter(
            f"{PREFIX}_heartbeats",
            "Runner heartbeats, accepted (2xx) or rejected.",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            f"{PREFIX}_webhook_deliveries",
            "Webhook deliveries processed, by event and outcome (processed, retried, parked).",
            ["event", "outcome"],
            registry=self.registry,
        )
        self.webhook_delivery_seconds = Histogram(
            f"{PREFIX}_webhook_delivery_seconds",
            "From a delivery's receipt to its processing's end.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=self.registry,
        )
        self.snapshot = _Snapshot()
        self.registry.register(_Scraped(self.snapshot))
        self._heartbeat_ok = self.heartbeats.labels("accepted")
        self._heartbeat_refused = self.heartbeats.labels("rejected")

    def answered(self, route: str, method: str, status: int) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        if route == HEARTBEAT_ROUTE:
            (self._heartbeat_ok if status < 400 else self._heartbeat_refused).inc()

    async def refresh(self, services: Services) -> None:
        """Read what the scrape reports from the store and the components."""
        self.snapshot.counts = await services.store.metric_counts()
        stats = await services.store.outbox_stats()
        self.snapshot.outbox_pending = stats.pending
        self.snapshot.outbox_failed = stats.failed
        oldest = stats.oldest_pending
        self.snapshot.outbox_oldest_seconds = (
            (services.clock.now() - oldest.created_at).total_seconds() if oldest else 0.0
        )
        github = services.github
        client_stats = github.stats if github is not None else None
        self.snapshot.github_calls = dict(client_stats.routes) if client_stats else {}
        self.snapshot.github_remaining = {}
        if client_stats is not None:
            for (credential, resource), (remaining, _, _) in client_stats.headroom.items():
                kind = "app" if credential == "app" else "installation"
                key = (kind, resource)
                # The tightest credential of a kind is what an alert should see.
                previous = self.snapshot.github_remaining.get(key)
                self.snapshot.github_remaining[key] = (
                    remaining if previous is None else min(previous, remaining)
                )
        pipeline = services.pipeline
        watcher = pipeline.component("version_watcher") if pipeline is not None else None
        self.snapshot.version_polls = dict(getattr(watcher, "poll_outcomes", {}) or {})
        self.snapshot.live_rollouts = []
        state = await services.fleet.current()
        for channel, live in sorted(state.live.items()):
            r = live.rollout
            tally = services.fleet.tally(r.rollout_id, r.stage)
            total = tally.total if tally is not None else None
            self.snapshot.live_rollouts.append(
                (
                    channel,
                    r.percentage,
                    total.started if total else 0,
                    total.failure_rate if total else 0.0,
                    total.disconnect_rate if total else 0.0,
                )
            )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


@dataclass
class _Snapshot:
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    outbox_pending: int = 0
    outbox_failed: int = 0
    outbox_oldest_seconds: float = 0.0
    github_calls: Mapping[tuple[str, str, int], int] = field(default_factory=dict)
    github_remaining: dict[tuple[str, str], int] = field(default_factory=dict)
    version_polls: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # channel, percentage, stage sessions, failure rate, disconnect rate
    live_rollouts: list[tuple[str, float, int, float, float]] = field(default_factory=list)


class _Scraped(Collector):
    """Families made at scrape time from the snapshot ``Metrics.refresh`` took."""

    def __init__(self, snapshot: _Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        for table, name, help_text in (
            ("active_rollouts", "rollouts", "Rollouts by state."),
            ("canary_runs", "canary_runs", "Canary runs by state (passed, failed, ...)."),
            ("sweeps", "sweeps", "Sweeps by state."),
            (
                "sweep_runs",
                "sweep_repositories",
                "Sweep repositories by state: dispatches waiting, in flight, completed,"
                " failed (refused by GitHub) or timed out.",
            ),
            ("webhook_deliveries", "webhook_deliveries_stored", "Stored deliveries by status."),
        ):
            family = GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["state"])
            for state, count in sorted((s.counts.get(table) or {}).items()):
                family.add_metric([state], count)
            yield family
        yield GaugeMetricFamily(
            f"{PREFIX}_outbox_pending", "GitHub side effects waiting.", value=s.outbox_pending
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_outbox_failed",
            "GitHub side effects parked after GitHub refused them.",
            value=s.outbox_failed,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_outbox_oldest_pending_age_seconds",
            "How long the oldest waiting side effect has waited.",
            value=s.outbox_oldest_seconds,
        )
        calls = CounterMetricFamily(
            f"{PREFIX}_github_requests",
            "Answers from GitHub's API, by method, route template and status.",
            labels=["method", "route", "status"],
        )
        for (method, route, status), count in sorted(s.github_calls.items()):
            calls.add_metric([method, route, str(status)], count)
        yield calls
        remaining = GaugeMetricFamily(
            f"{PREFIX}_github_rate_limit_remaining",
            "Requests GitHub last said are left, per credential kind and resource (the"
            " lowest installation's).",
            labels=["credential", "resource"],
        )
        for (credential, resource), value in sorted(s.github_remaining.items()):
            remaining.add_metric([credential, resource], value)
        yield remaining
        polls = CounterMetricFamily(
            f"{PREFIX}_version_polls",
            "Version source checks, by source kind and outcome.",
            labels=["source", "outcome"],
        )
        for (source, outcome), count in sorted(s.version_polls.items()):
            polls.add_metric([source, outcome], count)
        yield polls
        gauges = {
            "rollout_percentage": "A live rollout's share of its channel's orgs, in percent.",
            "rollout_stage_sessions": "Sessions counted in a live rollout's current stage.",
            "rollout_stage_failure_ratio": "Failed / started sessions in the current stage.",
            "rollout_stage_disconnect_ratio": "Disconnected / started in the current stage.",
        }
        families = {
            name: GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=["channel"])
            for name, text in gauges.items()
        }
        for channel, percentage, sessions, failure, disconnect in s.live_rollouts:
            families["rollout_percentage"].add_metric([channel], percentage)
            families["rollout_stage_sessions"].add_metric([channel], sessions)
            families["rollout_stage_failure_ratio"].add_metric([channel], failure)
            families["rollout_stage_disconnect_ratio"].add_metric([channel], disconnect)
        yield from families.values()


_NUMBER = re.compile(r"^\d+$")
# Path parts after these are names, not structure: contents/<path>, labels/<name>, ...
_REST_IS_NAME = {"contents", "labels", "ref", "refs", "branches", "tags"}


def route_template(path: str) -> str:
    """A GitHub API path reduced to its shape, for a low-cardinality label:
    ``/repos/acme/app/issues/12/comments`` is ``/repos/{owner}/{repo}/issues/{n}/comments``."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    shaped: list[str] = []
    index = 0
    while index < len(parts):
        part = parts[index]
        if part in ("repos", "orgs", "users") and index + 1 < len(parts):
            shaped.append(part)
            shaped.append("{owner}" if part == "repos" else "{name}")
            index += 2
            if part == "repos" and index < len(parts):
                shaped.append("{repo}")
                index += 1
            continue
        if part in _REST_IS_NAME and index + 1 < len(parts):
            shaped.append(part)
            shaped.append("{name}")
            break
        shaped.append("{n}" if _NUMBER.match(part) else part)
        index += 1
    return "/" + "/".join(shaped)
