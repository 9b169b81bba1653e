"""Rollouts as tracked GitHub issues: one issue per rollout in the control repository,
its body a live view, its comments the command line.

The rollout controller knows nothing of GitHub: ``TrackingReporter`` turns each change
into outbox entries written in the change's own transaction (the issue opened, one
short comment per transition, the state label, closing and reopening), and
``TrackingSync`` re-renders bodies from the store, coalesced, as state and metrics move.
The slash commands call the same controller as the API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from gidgethub import routing, sansio

from app.clock import Clock, isoformat
from app.config import Settings
from app.github.commands import (
    CommandRefused,
    CommandRegistry,
    Invocation,
    Permission,
    Place,
    escape_for_comment,
    is_bot,
)
from app.github.outbox import (
    Attempt,
    Outbox,
    add_comment,
    add_labels,
    applier,
    created_issue_target,
    edit_issue,
    issue_target,
    open_issue,
)
from app.github.webhooks import WebhookContext
from app.logs import get_logger
from app.rollouts.controller import (
    AUTO,
    Reported,
    RolloutController,
    RolloutError,
    RolloutView,
    Transition,
)
from app.store import (
    BUSY_PAUSE,
    EventRecord,
    NewEffect,
    Rollout,
    Store,
    StoreBusy,
    TrackingIssue,
)

if TYPE_CHECKING:
    from app.pipeline import UpdatePipeline

log = get_logger("github.tracking")

ROLLOUT_LABEL = "update-pipeline:rollout"
STATE_LABELS = {
    "pending": "rollout:rolling-out",
    "rolling_out": "rollout:rolling-out",
    "paused": "rollout:paused",
    "completed": "rollout:completed",
    "rolled_back": "rollout:rolled-back",
}
MAX_BODY = 65_536  # GitHub's limit on an issue body, in characters
# Room kept for the outbox's hidden marker and a little slack.
BODY_BUDGET = MAX_BODY - 500
ENTERPRISE_SHOWN = 200
# Body edits of one rollout at most this often; the last one always shows the latest.
COALESCE = timedelta(seconds=3)
# Live rollouts' bodies are rendered again this often for their metrics.
REFRESH = timedelta(seconds=30)
# Finished rollouts whose bodies are brought up to date when the service starts.
RECENT = timedelta(days=2)


def title(rollout: Rollout) -> str:
    return f"Rollout {rollout.build_id} → {rollout.channel}"


def issue_key(rollout_id: str, generation: int = 1) -> str:
    return f"rollout-{rollout_id}" + (f"-{generation}" if generation > 1 else "")


def _who(actor: str) -> str:
    if actor == AUTO:
        return "the pipeline"
    return escape_for_comment(actor, 100)


def _pct(value: float) -> str:
    return f"{value:g}%"


def _rate(value: float) -> str:
    return f"{value * 100:.2f}%"


def transition_comment(t: Transition, notify_team: str | None) -> str | None:
    """The short comment a change posts on its rollout's issue (None for the start:
    the issue itself says it)."""
    entry = t.history[0] if t.history else None
    r = t.after
    if entry is None or entry.action == "start":
        return None
    who = _who(entry.actor)
    reason = f": {escape_for_comment(entry.reason, 300)}" if entry.reason else ""
    details = entry.details
    if entry.action == "advance":
        sessions = details.get("sessions")
        numbers = (
            f" after {sessions} sessions (failure rate {_rate(details['failureRate'])},"
            f" disconnect rate {_rate(details['disconnectRate'])})"
            if sessions is not None
            else ""
        )
        how = "automatically" if entry.actor == AUTO else f"by {who}"
        return (
            f"Advanced to **{_pct(r.percentage)}** {how}{numbers};"
            f" {details.get('orgs', 0)} more org(s) included."
        )
    if entry.action == "pause":
        return f"Paused at {_pct(r.percentage)} by {who}{reason}."
    if entry.action == "resume":
        return f"Resumed at {_pct(r.percentage)} by {who}."
    if entry.action in ("approved", "skipped"):
        return f"`{details.get('orgId')}` {entry.action} by {who}."
    if entry.action == "withdrawn":
        return f"`{details.get('orgId')}`: decision withdrawn by {who}; it is waited for again."
    if entry.action == "approvals_applied":
        applied = ", ".join(f"`{o}`" for o in details.get("orgIds", [])[:50])
        return f"Approvals took effect at 100%: {applied} now run `{r.build_id}`."
    if entry.action == "complete":
        return f"Completed: `{r.build_id}` is now the {r.channel} channel's recommended build."
    if entry.action == "rollback":
        rollback = r.rollback or {}
        if entry.actor == AUTO and rollback.get("metric"):
            team = f"{notify_team} " if notify_team else ""
            orgs = list(rollback.get("orgs") or [])
            over = f" in {', '.join(f'`{o}`' for o in orgs[:20])}" if orgs else ""
            return (
                f"{team}**Rolled back automatically** at {_pct(r.percentage)}:"
                f" {str(rollback['metric']).replace('_', ' ')} {rollback['value']:.4f} is above"
                f" the threshold {rollback['threshold']:g} after {rollback['sessions']}"
                f" sessions{over}. Every included org is sent back to the build it ran before."
            )
        return (
            f"**Rolled back** by {who}{reason}. Every included org goes back to its previous build."
        )
    return None


# -- the body ----------------------------------------------------------------------------

COMMANDS_HELP = (
    "`/pause [reason]`, `/resume`, `/advance`, `/advance full`, `/rollback <reason>`,"
    " `/approve <orgId>`, `/skip <orgId>`, `/status`, `/help`"
)


NONE = "-"  # an empty table cell


def _time(moment: datetime | None) -> str:
    return isoformat(moment).replace("T", " ")[:16] + " UTC" if moment else NONE


def _duration(delta: timedelta | None) -> str:
    if delta is None:
        return NONE
    seconds = int(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    parts.append(f"{seconds}s" if seconds and not hours else "")
    return "".join(parts) or "0s"


def _verdict(v: Any) -> str:
    if v is None:
        return NONE
    if v.outcome == "insufficient":
        return "insufficient data"
    if v.outcome == "pass":
        return "✅ within thresholds"
    text = f"{v.metric.replace('_', ' ')} {v.value:.4f} > {v.threshold:g}"
    if v.outcome == "held":
        return f"⏸️ held: {text} in one org only"
    return f"❌ rollback: {text}"


def _next_detail(view: RolloutView) -> str:
    """The next step in words: the controller's, Markdown-safe, but for a freeze's reason
    in them, which is whatever the person who froze rollouts typed."""
    detail = view.next_step.detail
    if view.frozen is not None and view.frozen.reason:
        detail = detail.replace(view.frozen.reason, escape_for_comment(view.frozen.reason, 300))
    return detail


def render_body(
    view: RolloutView,
    settings: Settings,
    runtimes: dict[str, str],
    canary: str | None,
    *,
    api_url: str | None,
) -> str:
    """The tracking issue's body: a dashboard rendered from the rollout's view alone."""
    r = view.rollout
    state = r.state.replace("_", " ")
    lines = [
        f"**{state.capitalize()}** at **{_pct(r.percentage)}** of the {r.channel} channel's"
        f" organisations: `{r.build_id}` (stage {r.stage + 1} of {len(view.stages)}, plan"
        f" `{r.plan}`).",
        "",
    ]
    step = view.next_step
    when = f" at {_time(step.at)}" if step.at else ""
    lines += [f"**Next:** {step.action}{when}: {_next_detail(view)}.", ""]
    if view.frozen is not None:
        lines += [
            f"> [!WARNING]\n> Rollouts are frozen since {_time(view.frozen.frozen_at)} by"
            f" {_who(view.frozen.frozen_by)}: {escape_for_comment(view.frozen.reason, 300)}",
            "",
        ]
    if r.rollback:
        rb = r.rollback
        how = (
            f"{str(rb.get('metric', '')).replace('_', ' ')} {rb['value']:.4f} above"
            f" {rb['threshold']:g} after {rb['sessions']} sessions"
            if rb.get("metric")
            else escape_for_comment(str(rb.get("reason", "")), 300)
        )
        lines += [f"**Rolled back** by {_who(str(rb.get('by', '')))}: {how}.", ""]
    lines += ["### Build", ""]
    versions = ", ".join(f"{p} {v}" for p, v in sorted(runtimes.items())) or "none"
    lines.append(f"`{r.build_id}`: {versions}. Canary: {canary or 'none'}.")
    if r.previous_build_id:
        lines.append(f"Baseline (the channel's build at the start): `{r.previous_build_id}`.")
    if r.forced_reason:
        lines.append(f"Started with force: {escape_for_comment(r.forced_reason, 300)}.")
    lines += ["", "### Stages", ""]
    lines.append(
        "| Stage | Share | Watched for | Started | Deadline or end | Sessions | Failure rate"
        " | Disconnect rate | Failure vs baseline (95% CI) | Gate |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in view.stages:
        current = s.index == r.stage and r.state in ("rolling_out", "paused")
        end = r.deadline_at if current and r.deadline_at else s.ended_at
        baseline = NONE
        if s.verdict is not None and s.baseline.started:
            difference = s.target.failure_rate - s.baseline.failure_rate
            baseline = f"{difference * 100:+.2f} pts (n={s.baseline.started})"
            if current and view.gate is not None:
                _, low, high = view.gate.comparison.failure_difference
                baseline = (
                    f"{difference * 100:+.2f} pts [{low * 100:+.2f}, {high * 100:+.2f}]"
                    f" (n={s.baseline.started})"
                )
        reached = s.verdict is not None
        lines.append(
            f"| {s.index + 1}{' ◀' if current else ''} | {_pct(s.percentage)}"
            f" | {_duration(s.duration)} | {_time(s.started_at)} | {_time(end)}"
            f" | {s.target.started if reached else NONE}"
            f" | {_rate(s.target.failure_rate) if reached else NONE}"
            f" | {_rate(s.target.disconnect_rate) if reached else NONE}"
            f" | {baseline} | {_verdict(s.verdict)} |"
        )
    lines += [
        "",
        f"Thresholds: failure rate at most {_rate(settings.max_failure_rate)}, disconnect"
        f" rate at most {_rate(settings.max_disconnect_rate)}, at least"
        f" {settings.min_session_count} sessions per stage"
        + (
            f", no more than {settings.max_relative_regression * 100:g} points worse than the"
            " baseline (95% confidence)"
            if settings.max_relative_regression is not None
            else ""
        )
        + ".",
        "",
        "### Organisations",
        "",
        f"{view.included} org(s) included"
        + (f" ([list]({api_url}/orgs))." if api_url else " (`GET /rollouts/{id}/orgs`)."),
        "",
    ]
    if view.enterprise:
        lines += ["### Enterprise approvals", ""]
        lines.append(
            "Tick an org to approve it (it takes effect at 100%), or use `/approve <orgId>`"
            " and `/skip <orgId>`."
        )
        lines.append("")
        for e in view.enterprise[:ENTERPRISE_SHOWN]:
            ticked = "x" if e.decision == "approved" and e.voided_at is None else " "
            note = {"approved": "approved", "skipped": "skipped", "pending": "waiting"}[e.decision]
            if e.voided_at is not None:
                note = "voided by the rollback"
            elif e.decided_by:
                note += f" by {_who(e.decided_by)}"
            if e.applied:
                note += ", runs the build"
            lines.append(f"- [{ticked}] `{e.org_id}`: {note}")
        hidden = len(view.enterprise) - ENTERPRISE_SHOWN
        if hidden > 0:
            where = f"[the API]({api_url})" if api_url else "the API"
            lines.append(f"- … and {hidden} more: see {where}.")
        lines.append("")
    lines += ["### Commands", "", COMMANDS_HELP, ""]
    body = "\n".join(lines)
    if len(body) > BODY_BUDGET:
        cut = body[: BODY_BUDGET - 200].rsplit("\n", 1)[0]
        where = f"[the API]({api_url})" if api_url else "the API"
        body = f"{cut}\n\n… cut at GitHub's size limit; the whole view is in {where}.\n"
    return body


# -- the reporter --------------------------------------------------------------------------


class TrackingReporter:
    """The RolloutReporter for the control repository."""

    def __init__(self, store: Store, settings: Settings) -> None:
        assert settings.control_repo is not None
        self.store = store
        self.settings = settings
        self.repo = settings.control_repo
        self._warned = False

    async def installation(self) -> int | None:
        found = await self.store.installation_for_repository(self.repo)
        if found is None or found.suspended:
            if not self._warned:
                log.warning("the App is not installed on %s: rollouts are not tracked", self.repo)
                self._warned = True
            return None
        return found.id

    async def issue(self, rollout_id: str) -> TrackingIssue | None:
        """The rollout's tracking issue, with its number once GitHub has made it."""
        tracking = await self.store.tracking_issue(rollout_id)
        if tracking is None or tracking.number is not None:
            return tracking
        created = await self.store.effect_result(
            created_issue_target(tracking.repo, tracking.key), "issue"
        )
        if created is None:
            return tracking
        number = int(created["number"])
        await self.store.set_tracking_number(rollout_id, tracking.key, number)
        return TrackingIssue(
            tracking.rollout_id, tracking.repo, tracking.installation_id, tracking.key, number
        )

    async def report(self, t: Transition) -> Reported:
        r = t.after
        tracking = await self.issue(r.rollout_id)
        new_tracking = None
        effects: list[NewEffect] = []
        if tracking is None:
            installation = await self.installation()
            if installation is None:
                return Reported()
            key = issue_key(r.rollout_id)
            tracking = new_tracking = TrackingIssue(r.rollout_id, self.repo, installation, key)
            effects.append(
                open_issue(
                    installation,
                    self.repo,
                    title(r),
                    f"Rollout `{r.rollout_id}` of `{r.build_id}` on the {r.channel} channel,"
                    f" started by {_who(r.started_by)}. This body shows its state in a moment.",
                    key=key,
                    labels=[ROLLOUT_LABEL, STATE_LABELS[r.state]],
                )
            )
        ref: dict[str, Any] = (
            {"issue_number": tracking.number}
            if tracking.number is not None
            else {"issue_key": tracking.key}
        )
        installation = tracking.installation_id
        comment = transition_comment(t, self.settings.notify_team)
        if comment is not None:
            target = (
                issue_target(self.repo, tracking.number)
                if tracking.number is not None
                else created_issue_target(self.repo, tracking.key)
            )
            effects.append(
                NewEffect(
                    installation,
                    target,
                    "comment",
                    {
                        "repo": self.repo,
                        **ref,
                        "body": comment,
                        "key": f"{tracking.key}-v{r.version}",
                    },
                )
            )
        before = t.before.state if t.before is not None else None
        if before is not None and STATE_LABELS.get(before) != STATE_LABELS[r.state]:
            effects.append(add_labels(installation, self.repo, [STATE_LABELS[r.state]], **ref))
            effects.append(remove_label(installation, self.repo, STATE_LABELS[before], ref))
        if r.state in ("completed", "rolled_back") and before not in ("completed", None):
            reason = "completed" if r.state == "completed" else "not_planned"
            effects.append(
                edit_issue(installation, self.repo, state="closed", state_reason=reason, **ref)
            )
        elif before == "completed" and r.state == "rolled_back":
            effects.append(edit_issue(installation, self.repo, state="open", **ref))
        return Reported(tuple(effects), new_tracking)


def remove_label(installation_id: int, repo: str, label: str, ref: dict[str, Any]) -> NewEffect:
    target = (
        issue_target(repo, ref["issue_number"])
        if ref.get("issue_number") is not None
        else created_issue_target(repo, ref["issue_key"])
    )
    payload = {"repo": repo, **ref, "label": label}
    return NewEffect(installation_id, target, "label_remove", payload)


@applier("label_remove")
async def _label_remove(attempt: Attempt) -> None:
    from gidgethub import BadRequest

    try:
        await attempt.client.delete(
            "/repos/{owner}/{repo}/issues/{issue_number}/labels/{name}",
            url_vars={
                **attempt.repo_vars,
                "issue_number": str(await attempt.issue_number()),
                "name": str(attempt.payload["label"]),
            },
        )
    except BadRequest as exc:
        if exc.status_code != 404:  # not on the issue (any more): what we wanted
            raise
    return None


# -- keeping bodies current -------------------------------------------------------------


class TrackingSync:
    """Pipeline component: renders tracking issues' bodies again after changes (at most
    one edit per rollout every few seconds, always ending on the latest state) and, for
    live rollouts, as their metrics move. An edit is sent only when the body changed."""

    name = "tracking_sync"

    def __init__(
        self,
        controller: RolloutController,
        reporter: TrackingReporter,
        outbox: Outbox,
        clock: Clock,
    ) -> None:
        self.controller = controller
        self.reporter = reporter
        self.outbox = outbox
        self.clock = clock
        self.store = controller.store
        self.dirty: set[str] = set()
        self.wake = asyncio.Event()
        # Rollout id -> digest of the last body sent ("" after forget: send it again).
        self._sent: dict[str, str] = {}
        controller.listeners.append(self.changed)

    def changed(self, rollout: Rollout, events: Sequence[EventRecord]) -> None:
        self.dirty.add(rollout.rollout_id)
        self.wake.set()

    def forget(self, rollout_id: str) -> None:
        """Render this rollout's body again even if it seems unchanged (someone edited it
        on GitHub, or its issue is new)."""
        self._sent[rollout_id] = ""
        self.dirty.add(rollout_id)
        self.wake.set()

    async def start(self, pipeline: UpdatePipeline) -> None:
        pipeline.spawn(self.name, self._loop())

    async def stop(self) -> None:
        return None

    async def _loop(self) -> None:
        # At start: everything that may have changed while the service was down.
        since = self.clock.now() - RECENT
        for r in await self.store.list_rollouts(state=None, channel=None, before=None, limit=500):
            if r.state in ("rolling_out", "paused") or (r.finished_at or since) >= since:
                self.dirty.add(r.rollout_id)
        last_refresh = self.clock.monotonic()
        while True:
            try:
                await self.sync()
            except StoreBusy as exc:
                # Another process holds the database; the edits wait a moment (the
                # rollouts not sent are still dirty).
                log.warning("tracking issues: %s; trying again in %.0fs", exc, BUSY_PAUSE)
                await asyncio.sleep(BUSY_PAUSE)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), REFRESH.total_seconds())
            self.wake.clear()
            if self.clock.monotonic() - last_refresh >= REFRESH.total_seconds():
                self.dirty |= {r.rollout_id for r in await self.store.live_rollouts()}
                last_refresh = self.clock.monotonic()
            await asyncio.sleep(COALESCE.total_seconds())

    async def sync(self) -> int:
        """Send the edits due now; how many."""
        dirty, self.dirty = self.dirty, set()
        sent = 0
        for rollout_id in sorted(dirty):
            try:
                sent += await self.render(rollout_id)
            except RolloutError:
                continue
        return sent

    async def render(self, rollout_id: str) -> int:
        tracking = await self.reporter.issue(rollout_id)
        if tracking is None:
            return 0
        view = await self.controller.view(rollout_id)
        r = view.rollout
        build = await self.store.get_build(r.build_id)
        run = await self.store.latest_canary_run(r.build_id)
        settings = self.reporter.settings
        canary = f"{run.state} (run {run.attempt})" if run is not None else None
        if canary is not None and build is not None and build.repository and build.commit_sha:
            # Its check run lives on the commit the build was made from.
            checks = (
                f"{settings.github_web_url}/{build.repository}/commit/{build.commit_sha}/checks"
            )
            canary = f"[{canary}]({checks})"
        api_url = (
            f"{settings.public_url}/api/update-pipeline/rollouts/{rollout_id}"
            if settings.public_url
            else None
        )
        body = render_body(
            view,
            settings,
            dict(build.runtime_versions) if build else {},
            canary,
            api_url=api_url,
        )
        digest = hashlib.sha256(body.encode()).hexdigest()
        sent = self._sent.get(rollout_id)
        if sent == digest:
            return 0
        if sent is None and await self._written(tracking, body):
            # First render since the service started, of a body that was written before
            # (the start renders every recent rollout in case it missed a change).
            self._sent[rollout_id] = digest
            return 0
        ref: dict[str, Any] = (
            {"issue_number": tracking.number}
            if tracking.number is not None
            else {"issue_key": tracking.key}
        )
        await self.outbox.add(
            [edit_issue(tracking.installation_id, tracking.repo, body=body, **ref)]
        )
        self._sent[rollout_id] = digest
        return 1

    async def _written(self, tracking: TrackingIssue, body: str) -> bool:
        """Whether the newest body edit written for this issue (by key or by number, as
        ``edit_issue`` names it) is this body."""
        targets = [created_issue_target(tracking.repo, tracking.key)]
        if tracking.number is not None:
            targets.append(issue_target(tracking.repo, tracking.number))
        last = await self.store.replaceable_payload([f"{t}:body" for t in targets])
        return last is not None and last.get("body") == body


# -- commands ------------------------------------------------------------------------------


def register_commands(
    registry: CommandRegistry, controller: RolloutController, reporter: TrackingReporter
) -> None:
    repo = reporter.repo.lower()

    def in_control_repo(place: Place) -> bool:
        return place.repo.lower() == repo and not place.is_pull_request

    def on_tracking_issue(place: Place) -> bool:
        return in_control_repo(place) and ROLLOUT_LABEL in place.labels

    async def tracked(call: Invocation) -> Rollout:
        store = controller.store
        found = await store.tracking_issue_by_number(call.place.repo, call.place.issue_number)
        if found is None:
            for pending in await store.unnumbered_tracking_issues(call.place.repo):
                await reporter.issue(pending.rollout_id)  # learns numbers GitHub gave
            found = await store.tracking_issue_by_number(call.place.repo, call.place.issue_number)
        if found is None:
            raise CommandRefused("this issue does not track a rollout.")
        if call.place.closed:
            raise CommandRefused(
                "this tracking issue is closed; nothing was changed. Its rollout is"
                " steered from its open issue or the API."
            )
        rollout = await store.get_rollout(found.rollout_id)
        assert rollout is not None
        return rollout

    def once(call: Invocation) -> str:
        return f"comment-{call.comment_id}-line-{call.command.line}"

    async def run(call: Invocation, action: str) -> str:
        rollout = await tracked(call)
        args = call.command.args.strip()
        try:
            if action == "pause":
                after = await controller.pause(
                    rollout.rollout_id, by=call.actor, reason=args or None, once=once(call)
                )
            elif action == "resume":
                after = await controller.resume(rollout.rollout_id, by=call.actor, once=once(call))
            elif action == "advance":
                if args not in ("", "full"):
                    raise CommandRefused("usage: `/advance` or `/advance full`.")
                after = await controller.advance(
                    rollout.rollout_id,
                    by=call.actor,
                    to=100 if args == "full" else None,
                    once=once(call),
                )
            elif action == "rollback":
                if not args:
                    raise CommandRefused("a rollback needs a reason: `/rollback <reason>`.")
                after = await controller.rollback(
                    rollout.rollout_id, by=call.actor, reason=args, once=once(call)
                )
            else:
                org = args.split()[0] if args else ""
                if not org or len(args.split()) != 1:
                    raise CommandRefused(f"usage: `/{action} <orgId>`.")
                after = await controller.approve(
                    rollout.rollout_id,
                    org,
                    by=call.actor,
                    skip=action == "skip",
                    once=once(call),
                )
        except RolloutError as exc:
            raise CommandRefused(escape_for_comment(str(exc), 300)) from None
        where = f"the rollout is {after.state.replace('_', ' ')} at {_pct(after.percentage)}"
        if action in ("approve", "skip"):
            decided = "approved" if action == "approve" else "skipped"
            # It named a real org, so an org id: safe in a code span.
            return f"`{args}` {decided}; {where}."
        return f"done: {where}."

    def handler(action: str) -> Any:
        async def handle(call: Invocation) -> str:
            return await run(call, action)

        return handle

    async def status(call: Invocation) -> str:
        rollout = await tracked(call)
        view = await controller.view(rollout.rollout_id)
        gate = view.gate
        numbers = ""
        if gate is not None:
            total = gate.verdict.total
            numbers = (
                f" {total.started} sessions this stage, failure rate {_rate(total.failure_rate)},"
                f" disconnect rate {_rate(total.disconnect_rate)}: {_verdict(gate.verdict)}."
            )
        return (
            f"{rollout.state.replace('_', ' ')} at {_pct(rollout.percentage)},"
            f" {view.included} org(s) included.{numbers} Next: {_next_detail(view)}."
        )

    async def start(call: Invocation) -> str:
        words = call.command.args.split()
        if len(words) != 2:
            raise CommandRefused("usage: `/rollout <buildId> <channel>`.")
        build_id, channel = words
        try:
            rollout = await controller.start(build_id, channel, by=call.actor, once=once(call))
        except RolloutError as exc:
            raise CommandRefused(escape_for_comment(str(exc), 300)) from None
        return (
            f"started rollout `{rollout.rollout_id}` of `{rollout.build_id}` on {channel} at"
            f" {_pct(rollout.percentage)}; it is tracked in a new issue titled"
            f" “{escape_for_comment(title(rollout), 200)}”."
        )

    async def freeze(call: Invocation) -> str:
        if not call.command.args.strip():
            raise CommandRefused("a freeze needs a reason: `/freeze <reason>`.")
        try:
            frozen = await controller.freeze(call.command.args.strip(), by=call.actor)
        except RolloutError as exc:  # a reason longer than one is kept
            raise CommandRefused(escape_for_comment(str(exc), 300)) from None
        return f"rollouts are frozen: {escape_for_comment(frozen.reason, 300)}."

    async def unfreeze(call: Invocation) -> str:
        lifted = await controller.unfreeze(by=call.actor)
        return "the freeze is lifted." if lifted else "rollouts were not frozen."

    # Defaults: looking is for triagers, stopping the line for every writer, moving
    # forward for maintainers; UPDATE_PIPELINE_COMMAND_PERMISSIONS changes any of them.
    levels = {
        name: Permission[level.upper()] for name, level in reporter.settings.command_permissions
    }
    specs: list[tuple[str, Permission, str, Any, str, Any]] = [
        ("status", Permission.TRIAGE, "show the rollout's numbers", status, "", on_tracking_issue),
        (
            "pause",
            Permission.WRITE,
            "halt the rollout",
            handler("pause"),
            "[reason]",
            on_tracking_issue,
        ),
        (
            "rollback",
            Permission.WRITE,
            "send every included org back to its previous build",
            handler("rollback"),
            "<reason>",
            on_tracking_issue,
        ),
        (
            "resume",
            Permission.MAINTAIN,
            "continue a paused rollout",
            handler("resume"),
            "",
            on_tracking_issue,
        ),
        (
            "advance",
            Permission.MAINTAIN,
            "move to the next stage now (`full`: to 100%)",
            handler("advance"),
            "[full]",
            on_tracking_issue,
        ),
        (
            "approve",
            Permission.MAINTAIN,
            "approve an enterprise org (it takes effect at 100%)",
            handler("approve"),
            "<orgId>",
            on_tracking_issue,
        ),
        (
            "skip",
            Permission.MAINTAIN,
            "leave an enterprise org on what it runs",
            handler("skip"),
            "<orgId>",
            on_tracking_issue,
        ),
        (
            "rollout",
            Permission.MAINTAIN,
            "start rolling a build out on a channel",
            start,
            "<buildId> <channel>",
            in_control_repo,
        ),
        (
            "freeze",
            Permission.MAINTAIN,
            "stop every rollout from starting or advancing",
            freeze,
            "<reason>",
            in_control_repo,
        ),
        ("unfreeze", Permission.MAINTAIN, "lift the freeze", unfreeze, "", in_control_repo),
    ]
    for name, permission, help_text, run_it, usage, where in specs:
        registry.register(
            name, levels.get(name, permission), help_text, run_it, usage=usage, where=where
        )


# -- the issue itself: checkboxes, closing and deleting by hand -----------------------------

_CHECKBOX = re.compile(r"^- \[([ xX])\] `([A-Za-z0-9][A-Za-z0-9._:-]{0,127})`", re.MULTILINE)


def ticked(body: str) -> set[str]:
    """The enterprise orgs ticked in a tracking issue's body."""
    return {org for mark, org in _CHECKBOX.findall(body or "") if mark in "xX"}


def listed(body: str) -> set[str]:
    return {org for _, org in _CHECKBOX.findall(body or "")}


def router_for(
    controller: RolloutController, reporter: TrackingReporter, sync: TrackingSync
) -> routing.Router:
    """What a tracking issue's own events do: ticking an enterprise org's checkbox
    approves it (unticking withdraws it), a person without the permission to approve
    gets the body put back, and an issue closed or deleted by hand while its rollout is
    live is reopened or made again."""
    router = routing.Router()
    store = controller.store

    async def tracked_rollout(data: Mapping[str, Any]) -> tuple[Rollout, TrackingIssue] | None:
        if str(data["repository"]["full_name"]).lower() != reporter.repo.lower():
            return None
        number = int(data["issue"]["number"])
        found = await store.tracking_issue_by_number(reporter.repo, number)
        if found is None:
            for pending in await store.unnumbered_tracking_issues(reporter.repo):
                await reporter.issue(pending.rollout_id)
            found = await store.tracking_issue_by_number(reporter.repo, number)
        if found is None:
            return None
        rollout = await store.get_rollout(found.rollout_id)
        return (rollout, found) if rollout is not None else None

    @router.register("issues", action="edited")
    async def edited(event: sansio.Event, context: WebhookContext) -> None:
        data = event.data
        sender = data.get("sender") or {}
        before = ((data.get("changes") or {}).get("body") or {}).get("from")
        if is_bot(sender) or before is None or context.github is None:
            return  # the App's own renders, and edits that left the body alone
        found = await tracked_rollout(data)
        if found is None:
            return
        rollout, tracking = found
        after = str(data["issue"].get("body") or "")
        shown = listed(before) & listed(after)
        added = (ticked(after) - ticked(before)) & shown
        removed = (ticked(before) - ticked(after)) & shown
        if not added and not removed:
            return
        actor = str(sender["login"])
        client = context.github.installation(tracking.installation_id)
        permission = await context.permissions.get(client, reporter.repo, actor)
        installation = tracking.installation_id
        number = int(data["issue"]["number"])
        needed = _approve_permission(reporter.settings)
        if permission < needed:
            sync.forget(rollout.rollout_id)  # the next render puts the boxes back
            context.effects.append(
                add_comment(
                    installation,
                    reporter.repo,
                    number,
                    f"{escape_for_comment(actor, 100)}: ticking an approval box needs"
                    f" **{needed}** permission on this repository (you have"
                    f" **{permission}**); the boxes are put back as they were.",
                    key=f"box-{event.delivery_id}",
                )
            )
            return
        failed: list[str] = []
        for org in sorted(added | removed):
            once = f"edit-{event.delivery_id}-{org}"
            try:
                if org in added:
                    await controller.approve(rollout.rollout_id, org, by=actor, once=once)
                else:
                    await controller.withdraw(rollout.rollout_id, org, by=actor, once=once)
            except RolloutError as exc:
                failed.append(f"`{org}`: {escape_for_comment(str(exc), 200)}")
        if failed:
            sync.forget(rollout.rollout_id)
            context.effects.append(
                add_comment(
                    installation,
                    reporter.repo,
                    number,
                    "Some boxes could not be applied, and are put back: " + "; ".join(failed),
                    key=f"box-{event.delivery_id}",
                )
            )

    @router.register("issues", action="closed")
    async def closed(event: sansio.Event, context: WebhookContext) -> None:
        data = event.data
        if is_bot(data.get("sender") or {}):
            return
        found = await tracked_rollout(data)
        if found is None:
            return
        rollout, tracking = found
        if rollout.state not in ("rolling_out", "paused"):
            return
        number = int(data["issue"]["number"])
        context.effects += [
            edit_issue(tracking.installation_id, reporter.repo, issue_number=number, state="open"),
            add_comment(
                tracking.installation_id,
                reporter.repo,
                number,
                f"Reopened: this issue tracks a rollout that is still"
                f" {rollout.state.replace('_', ' ')}. It closes when the rollout completes or"
                " is rolled back (`/rollback <reason>`); closing it changes nothing.",
                key=f"reopened-{event.delivery_id}",
            ),
        ]

    @router.register("issues", action="deleted")
    async def deleted(event: sansio.Event, context: WebhookContext) -> None:
        found = await tracked_rollout(event.data)
        if found is None:
            return
        rollout, tracking = found
        if rollout.state not in ("rolling_out", "paused"):
            return
        first = issue_key(rollout.rollout_id)
        generation = int(tracking.key[len(first) + 1 :]) + 1 if tracking.key != first else 2
        key = issue_key(rollout.rollout_id, generation)
        effects = [
            open_issue(
                tracking.installation_id,
                reporter.repo,
                title(rollout),
                f"Rollout `{rollout.rollout_id}`: its tracking issue"
                f" #{tracking.number} was deleted, so it continues here.",
                key=key,
                labels=[ROLLOUT_LABEL, STATE_LABELS[rollout.state]],
            ),
        ]
        replacement = TrackingIssue(
            rollout.rollout_id, reporter.repo, tracking.installation_id, key
        )
        await store.replace_tracking_issue(replacement, effects, sync.clock.now())
        sync.forget(rollout.rollout_id)
        sync.outbox.written()

    return router


def _approve_permission(settings: Settings) -> Permission:
    levels = dict(settings.command_permissions)
    return Permission[levels.get("approve", "maintain").upper()]
