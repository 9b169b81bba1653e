"""The dashboard's pages as HTML, read from the same domain objects the API serves:
``pipeline.status()``, the fleet counts, ``RolloutController.view()``, the canary's
builds and runs, the versions, ``SweepService.view()``.

Each section that changes carries ``data-live`` and an id: the script fetches the page
again on a relevant event and swaps those sections in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.api.versions import version_json
from app.config import format_duration
from app.dashboard.render import (
    ChartStage,
    badge,
    esc,
    path,
    rate,
    share,
    share_bar,
    stage_chart,
    table,
    time,
)
from app.dashboard.sessions import Viewer
from app.github.outbox import check_run_target
from app.pipeline import CHANNELS, VERSION_WATCHER
from app.pipeline.version.watcher import VersionWatcher
from app.rollouts.controller import RolloutView
from app.services import Services
from app.store import BuildRecord, CanaryRun, HistoryEntry, Rollout
from app.sweeps.service import SweepView

RECENT_ROLLOUTS = 5
LATEST_BUILDS = 8


def section(ident: str, title: str, body: str) -> str:
    return (
        f'<section id="{ident}" data-live aria-labelledby="{ident}-h">'
        f'<h2 id="{ident}-h">{esc(title)}</h2>{body}</section>'
    )


def rollout_link(r: Rollout) -> str:
    return (
        f'<a href="{path("rollouts", r.rollout_id)}"><code>{esc(r.build_id)}</code>'
        f" → {esc(r.channel)}</a>"
    )


def build_link(build_id: str) -> str:
    return f'<a href="{path("canaries", build_id)}"><code>{esc(build_id)}</code></a>'


# -- the overview ---------------------------------------------------------------------------


async def overview(services: Services) -> str:
    parts = [
        "<h1>Overview</h1>",
        await _status(services),
        await _fleet(services),
        await _active_rollouts(services),
        await _recent_rollouts(services),
        await _canaries(services),
        await _versions(services),
        await _sweeps(services),
    ]
    return "".join(parts)


async def _status(services: Services) -> str:
    pipeline = services.pipeline
    if pipeline is not None:
        status = await pipeline.status()
        running = badge("completed", "running") if status["running"] else badge("failed", "stopped")
        frozen = status["frozen"]
    else:
        why = services.pipeline_error or "not enabled (UPDATE_PIPELINE_ENABLED)"
        running = badge("failed", f"off: {why}")
        freeze = await services.store.get_freeze()
        frozen = {"reason": freeze.reason, "by": freeze.frozen_by} if freeze else None
    channels = {c.channel: c for c in await services.store.list_channels()}
    rows = [
        ("Pipeline", running),
        ("GitHub", esc(services.github_state)),
        ("Tracking issues", esc(services.tracking_issues)),
        (
            "Freeze",
            badge("held", f"frozen by {frozen['by']}: {frozen['reason']}")
            if frozen
            else "not frozen",
        ),
    ]
    for channel in CHANNELS:
        record = channels.get(channel)
        recommended = build_link(record.build_id) if record and record.build_id else "none"
        rows.append((f"Recommended on {channel}", recommended))
    items = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in rows)
    return section("status", "Pipeline status", f'<dl class="facts">{items}</dl>')


async def _fleet(services: Services) -> str:
    by_channel: dict[str, list[tuple[str, int]]] = {}
    for row in await services.store.fleet_counts():
        name = row["build_id"] or "no build reported"
        by_channel.setdefault(row["channel"], []).append((name, int(row["runners"])))
    bars = [
        share_bar(f"{channel}: {sum(n for _, n in parts)} runner(s)", parts)
        for channel, parts in sorted(by_channel.items())
    ]
    body = "".join(bars) or '<p class="empty">No runner has sent a heartbeat yet.</p>'
    return section("fleet", "Fleet by build", body)


def gate_summary(services: Services, view: RolloutView) -> str:
    """The current stage's numbers against the thresholds and the baseline, in words."""
    gate = view.gate
    if gate is None:
        return '<p class="empty">No stage data.</p>'
    settings = services.settings
    target, baseline = gate.comparison.target, gate.comparison.baseline
    verdict = gate.verdict.outcome
    rows = [
        (
            "Failure rate",
            f"{rate(target.failure_rate)} (max {rate(settings.max_failure_rate)};"
            f" baseline {rate(baseline.failure_rate)})",
        ),
        (
            "Disconnect rate",
            f"{rate(target.disconnect_rate)} (max {rate(settings.max_disconnect_rate)};"
            f" baseline {rate(baseline.disconnect_rate)})",
        ),
        (
            "Sessions",
            f"{target.started} of {settings.min_session_count} needed; baseline {baseline.started}",
        ),
        ("Gate", badge(verdict)),
    ]
    items = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in rows)
    return f'<dl class="facts gate">{items}</dl>'


def progress(r: Rollout, stages: int) -> str:
    return (
        f'<label class="progress">Stage {r.stage + 1} of {stages}, {share(r.percentage)}'
        f' <progress value="{r.stage + 1}" max="{stages}">{share(r.percentage)}</progress>'
        f"</label>"
    )


async def _active_rollouts(services: Services) -> str:
    cards = []
    for r in await services.store.live_rollouts():
        view = await services.rollouts.view(r.rollout_id)
        cards.append(
            f'<article class="card" aria-labelledby="r-{esc(r.rollout_id)}">'
            f'<h3 id="r-{esc(r.rollout_id)}">{rollout_link(r)} {badge(r.state)}</h3>'
            f"{progress(r, len(view.stages))}{gate_summary(services, view)}"
            f'<p class="next">Next: {esc(view.next_step.detail)}</p></article>'
        )
    body = "".join(cards) or '<p class="empty">No rollout is active.</p>'
    return section("rollouts", "Active rollouts", body)


async def _recent_rollouts(services: Services) -> str:
    rows = []
    for r in await services.store.list_rollouts(
        state=None, channel=None, before=None, limit=RECENT_ROLLOUTS
    ):
        reason = (r.rollback or {}).get("reason") if r.state == "rolled_back" else None
        rows.append(
            (
                rollout_link(r),
                badge(r.state),
                share(r.percentage),
                time(r.started_at),
                esc(reason) if reason else "—",
            )
        )
    return section(
        "recent",
        "Recent rollouts",
        table("Newest rollouts", ("Rollout", "State", "Share", "Started", "Rollback"), rows),
    )


async def _canaries(services: Services) -> str:
    rows = []
    for build in await services.store.list_builds(before=None, limit=LATEST_BUILDS):
        run = await services.store.latest_canary_run(build.build_id)
        good = ", ".join(build.known_good_for) or "—"
        rows.append(
            (
                build_link(build.build_id),
                badge(run.state) if run else "no run",
                esc(good),
                time(run.completed_at if run and run.completed_at else build.created_at),
            )
        )
    return section(
        "canaries",
        "Latest canaries",
        table("Newest builds", ("Build", "Verdict", "Known-good for", "When"), rows),
    )


async def _versions(services: Services) -> str:
    pipeline = services.pipeline
    found = pipeline.component(VERSION_WATCHER) if pipeline is not None else None
    watcher = found if isinstance(found, VersionWatcher) else None
    rows = []
    for provider in services.settings.providers:
        newest = await services.store.list_versions(provider_id=provider.id, before=None, limit=1)
        if not newest:
            rows.append((esc(provider.id), "none known", "—", "—"))
            continue
        shown = version_json(newest[0], watcher)
        canary = "passed" if shown["canaryPassed"] else shown["canary"]["state"]
        rows.append(
            (
                esc(provider.id),
                f"<code>{esc(shown['version'])}</code>"
                + (" (prerelease)" if shown["prerelease"] else ""),
                time(newest[0].released_at),
                badge(canary if canary == "passed" else None, canary.replace("_", " ")),
            )
        )
    return section(
        "versions",
        "Newest versions",
        table("Newest version per provider", ("Provider", "Version", "Released", "Canary"), rows),
    )


async def _sweeps(services: Services) -> str:
    rows = []
    for sweep in await services.store.live_sweeps():
        view = await services.sweeps.view(sweep.sweep_id)
        counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(view.counts.items()))
        what = sweep.build_id or f"{sweep.provider} {sweep.version}"
        rows.append(
            (
                f'<a href="{path("sweeps", sweep.sweep_id)}">{esc(sweep.sweep_id)}</a>',
                esc(what),
                esc(counts or "no repositories"),
                time(sweep.created_at),
            )
        )
    return section(
        "sweeps",
        "Running sweeps",
        table("Sweeps in progress", ("Sweep", "For", "Repositories", "Started"), rows),
    )


# -- a rollout ------------------------------------------------------------------------------


async def rollout(services: Services, view: RolloutView, viewer: Viewer) -> str:
    r = view.rollout
    store = services.store
    history = await store.rollout_history(r.rollout_id, after_id=None, limit=500)
    facts = [
        ("Build", build_link(r.build_id)),
        ("Channel", esc(r.channel)),
        ("State", badge(r.state)),
        ("Share", share(r.percentage)),
        ("Started", f"{time(r.started_at)} by {esc(r.started_by)}"),
        ("Stage deadline", time(r.deadline_at)),
        ("Organisations included", str(view.included)),
        ("Next step", esc(view.next_step.detail)),
        ("Tracking issue", await _issue_link(services, r.rollout_id)),
    ]
    if r.forced_reason:
        facts.append(("Forced", esc(r.forced_reason)))
    if view.frozen is not None:
        facts.append(("Frozen", esc(f"{view.frozen.reason} (by {view.frozen.frozen_by})")))
    summary = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    parts = [
        f"<h1>Rollout <code>{esc(r.rollout_id)}</code></h1>",
        f'<section id="summary" data-live aria-label="Summary">'
        f'<dl class="facts">{summary}</dl>{_rollback_box(r)}'
        f"{_buttons(r, viewer)}</section>",
        section("timeline", "Stages", _timeline(services, view)),
        section("history", "History", _history(history)),
    ]
    return "".join(parts)


async def _issue_link(services: Services, rollout_id: str) -> str:
    issue = await services.store.tracking_issue(rollout_id)
    if issue is None or issue.number is None:
        return "none" if issue is None else "being opened"
    url = f"{services.settings.github_web_url}/{issue.repo}/issues/{issue.number}"
    return f'<a href="{esc(url)}">{esc(issue.repo)}#{issue.number}</a>'


def _rollback_box(r: Rollout) -> str:
    if r.state != "rolled_back" or not r.rollback:
        return ""
    rb = r.rollback
    lines = [
        f"<p><strong>Rolled back</strong> by {esc(rb.get('by', '?'))}: "
        f'<span class="reason">{esc(rb.get("reason", ""))}</span></p>'
    ]
    if "metric" in rb:
        lines.append(
            f"<p>{esc(rb['metric'])} {rate(float(rb['value']))} above"
            f" {rate(float(rb['threshold']))} over {esc(rb.get('sessions', '?'))} sessions"
            f" (orgs over: {esc(', '.join(rb.get('orgs') or []) or '—')})</p>"
        )
    return f'<div class="alert" role="note">{"".join(lines)}</div>'


def _buttons(r: Rollout, viewer: Viewer) -> str:
    allowed = {
        "pause": r.state == "rolling_out",
        "resume": r.state == "paused",
        "advance": r.state == "rolling_out",
        "rollback": r.state in ("rolling_out", "paused", "completed"),
    }
    links = [
        f'<a class="button button-{action}" href="{path("rollouts", r.rollout_id, action)}">'
        f"{esc(LABELS[action])}…</a>"
        for action, ok in allowed.items()
        if ok and viewer.may(action)
    ]
    if not links:
        return ""
    return f'<nav class="actions" aria-label="Rollout actions">{"".join(links)}</nav>'


LABELS = {
    "pause": "Pause",
    "resume": "Resume",
    "advance": "Advance to the next stage",
    "rollback": "Roll back",
}


def _timeline(services: Services, view: RolloutView) -> str:
    settings = services.settings
    r = view.rollout
    steps = []
    for s in view.stages:
        where = "current" if s.index == r.stage and r.state in ("rolling_out", "paused") else ""
        verdict = badge(s.verdict.outcome) if s.verdict is not None else "not reached"
        duration = f"watched {format_duration(s.duration)}" if s.duration else "last stage"
        current = ' aria-current="step"' if where else ""
        steps.append(
            f'<li class="{where}"{current}>'
            f"<strong>{share(s.percentage)}</strong> ({esc(duration)}): "
            f"{time(s.started_at)} → {time(s.ended_at)} {verdict}</li>"
        )
    chart = stage_chart(
        [
            ChartStage(
                share(s.percentage),
                s.target.started,
                s.target.failure_rate,
                s.target.disconnect_rate,
                s.verdict is not None,
            )
            for s in view.stages
        ],
        settings.max_failure_rate,
        settings.max_disconnect_rate,
    )
    rows = [
        (
            share(s.percentage),
            str(s.target.started),
            rate(s.target.failure_rate),
            rate(s.target.disconnect_rate),
            f"{s.baseline.started}: {rate(s.baseline.failure_rate)} /"
            f" {rate(s.baseline.disconnect_rate)}",
            badge(s.verdict.outcome) if s.verdict is not None else "not reached",
        )
        for s in view.stages
    ]
    numbers = table(
        f"Rates per stage (thresholds: failure {rate(settings.max_failure_rate)},"
        f" disconnect {rate(settings.max_disconnect_rate)},"
        f" at least {settings.min_session_count} sessions)",
        ("Stage", "Sessions", "Failure rate", "Disconnect rate", "Baseline", "Verdict"),
        rows,
    )
    return f'<ol class="timeline">{"".join(steps)}</ol>{chart}{numbers}'


def _history(entries: Sequence[HistoryEntry]) -> str:
    rows = [
        (
            time(h.at),
            esc(h.actor),
            esc(h.action),
            esc(f"{h.from_state or '—'} → {h.to_state}"),
            share(h.percentage),
            esc(h.reason) if h.reason else "—",
        )
        for h in entries
    ]
    return table(
        "Commands and transitions, oldest first",
        ("When", "Who", "Action", "State", "Share", "Reason"),
        rows,
    )


# -- a canary -------------------------------------------------------------------------------

METRIC_ROWS = (
    ("totalTests", "Tests"),
    ("passed", "Passed"),
    ("failed", "Failed"),
    ("errored", "Errored"),
    ("skipped", "Skipped"),
    ("passRate", "Pass rate"),
    ("disconnectRate", "Disconnect rate"),
    ("avgSessionStartMs", "Session start (ms, mean)"),
    ("avgTimeToFirstOutputMs", "First output (ms, mean)"),
)
MAX_FAILED_SHOWN = 200


async def canary(services: Services, build: BuildRecord, run: CanaryRun | None) -> str:
    versions = ", ".join(f"{p} {v}" for p, v in sorted(build.runtime_versions.items()))
    facts = [
        ("Runner version", esc(build.runner_version)),
        ("Runtimes", esc(versions or "—")),
        ("Known-good for", esc(", ".join(build.known_good_for) or "—")),
        ("Built", time(build.built_at)),
        ("Commit", esc(f"{build.repository}@{build.commit_sha}") if build.commit_sha else "—"),
    ]
    if run is not None:
        facts += [
            ("Verdict", badge(run.state)),
            ("Run", f"attempt {run.attempt}, started {time(run.started_at or run.created_at)}"),
            ("Completed", time(run.completed_at)),
            ("Check run", await _check_link(services, build, run)),
        ]
        if run.error:
            facts.append(("Error", esc(run.error)))
    items = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    body = [
        f"<h1>Canary of <code>{esc(build.build_id)}</code></h1>",
        f'<section id="summary" data-live aria-label="Summary"><dl class="facts">{items}</dl>'
        "</section>",
    ]
    if run is not None:
        body.append(section("metrics", "Metrics", _metrics(services, run)))
        results = await services.store.canary_results(run.id) or []
        body.append(section("failures", "Failed tests", _failures(results)))
    return "".join(body)


async def _check_link(services: Services, build: BuildRecord, run: CanaryRun) -> str:
    if build.repository is None or run.check_key is None:
        return "not on GitHub"
    result = await services.store.effect_result(
        check_run_target(build.repository, run.check_key), "check_run"
    )
    url = result.get("url") if result else None
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        return "not created yet"
    return f'<a href="{esc(url)}">check run on {esc(build.repository)}</a>'


def _metrics(services: Services, run: CanaryRun) -> str:
    metrics: dict[str, Any] = dict(run.metrics or {})
    if not metrics:
        return '<p class="empty">No results judged yet.</p>'
    per_provider: dict[str, Any] = dict(metrics.get("perProvider") or {})
    columns = [("All", metrics), *sorted(per_provider.items())]
    rows = [
        (esc(label), *(_metric(key, values.get(key)) for _, values in columns))
        for key, label in METRIC_ROWS
    ]
    settings = services.settings
    return table(
        f"Canary metrics (to pass, each provider: pass rate at least"
        f" {rate(settings.canary_min_pass_rate)}, disconnect rate at most"
        f" {rate(settings.canary_max_disconnect_rate)})",
        ("Measure", *(name for name, _ in columns)),
        rows,
    )


def _metric(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key.endswith("Rate"):
        return rate(float(value))
    if isinstance(value, float):
        return f"{value:.0f}"
    return esc(value)


def _failures(results: Sequence[dict[str, Any]]) -> str:
    failing = [r for r in results if r.get("status") in ("failed", "errored")]
    rows = [
        (
            f"<code>{esc(r.get('name', ''))}</code>",
            esc(r.get("provider", "")),
            badge(str(r.get("status"))),
            esc(r.get("message") or "—"),
        )
        for r in failing[:MAX_FAILED_SHOWN]
    ]
    note = ""
    if len(failing) > MAX_FAILED_SHOWN:
        note = f"<p>{len(failing) - MAX_FAILED_SHOWN} more not shown; the API lists them all.</p>"
    return (
        table("Tests that failed or errored", ("Test", "Provider", "Status", "Message"), rows)
        + note
    )


# -- a sweep --------------------------------------------------------------------------------


def sweep(services: Services, view: SweepView) -> str:
    s = view.sweep
    web = services.settings.github_web_url
    what = s.build_id or f"{s.provider} {s.version}"
    counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(view.counts.items()))
    facts = [
        ("For", esc(what)),
        ("State", badge(s.state)),
        ("Repositories", esc(counts or "none")),
        ("Started", f"{time(s.created_at)} by {esc(s.started_by)}"),
        ("Completed", time(s.completed_at)),
    ]
    if s.rollout_id:
        facts.append(
            ("Rollout", f'<a href="{path("rollouts", s.rollout_id)}">{esc(s.rollout_id)}</a>')
        )
    items = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    rows = []
    for run in view.runs:
        outcome = run.conclusion if run.state == "completed" and run.conclusion else run.state
        link = "—"
        if run.run_url and run.run_url.startswith(("https://", "http://")):
            link = f'<a href="{esc(run.run_url)}">run {esc(run.run_id)}</a>'
        rows.append(
            (
                f'<a href="{esc(f"{web}/{run.repo}")}">{esc(run.repo)}</a>',
                badge(outcome),
                link,
                esc(run.error) if run.error else "—",
                time(run.finished_at),
            )
        )
    return (
        f"<h1>Sweep <code>{esc(s.sweep_id)}</code></h1>"
        f'<section id="summary" data-live aria-label="Summary"><dl class="facts">{items}</dl>'
        f"</section>"
        + section(
            "repos",
            "Repositories",
            table(
                "One row per repository",
                ("Repository", "Conclusion", "Workflow run", "Error", "Finished"),
                rows,
            ),
        )
    )
