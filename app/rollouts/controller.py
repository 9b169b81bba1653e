"""The rollout controller (design sections 6.1 to 6.4, 4.3): a build reaches a channel's
orgs stage by stage, moved on by its metrics and pulled back by them.

States: ``pending`` → ``rolling_out`` ⇄ ``paused`` → ``completed`` | ``rolled_back``.
``pending`` lasts only inside the transaction that commits the first stage. Every change
is one store transaction, made under one lock from a fresh read and written only if the
rollout is still the version it was read as, so a manual command racing an automatic
step ends in one consistent state."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from app.clock import Clock, isoformat
from app.config import Settings
from app.fleet.cohorts import members
from app.fleet.service import Fleet, FleetState, LiveRollout, eligible, thresholds
from app.logs import get_logger
from app.pipeline import CHANNELS
from app.pipeline.events import EventBus
from app.rollouts.gates import (
    Baseline,
    Counts,
    StageTally,
    Verdict,
    compare,
    judge_regression,
    judge_stage,
)
from app.rollouts.plan import Stage, format_stages, parse_stages
from app.store import (
    AlreadyDone,
    Approval,
    ChannelChange,
    Conflict,
    EventRecord,
    Freeze,
    HistoryEntry,
    Inclusion,
    NewEffect,
    Org,
    Rollout,
    RolloutChange,
    StaleRollout,
    Store,
    StoreBusy,
    TrackingIssue,
)

if TYPE_CHECKING:
    from app.pipeline import UpdatePipeline

log = get_logger("rollouts")

ACTIVE = ("pending", "rolling_out", "paused")
STATES = ("pending", "rolling_out", "paused", "completed", "rolled_back")
AUTO = "auto"
# How often the controller looks again when nothing is due (deadlines wake it sooner).
RECHECK = timedelta(minutes=1)
# The pause after another process kept the database locked past the busy timeout.
BUSY_PAUSE = 1.0
# The longest reason kept (pause, rollback, freeze, a forced start): what the API takes,
# and a slash command's line, which may be far longer, is held to the same.
MAX_REASON = 500


class RolloutError(Exception):
    """A request the controller refuses: ``status`` is the HTTP status that fits."""

    status = 400
    code = "VALIDATION_FAILED"


class NotFound(RolloutError):
    status = 404
    code = "NOT_FOUND"


def _check_reason(reason: str | None) -> None:
    if reason is not None and len(reason) > MAX_REASON:
        raise RolloutError(f"reason: {len(reason):,} characters, at most {MAX_REASON}")


class Refused(RolloutError):
    status = 409
    code = "CONFLICT"


class InvalidTransition(Refused):
    code = "INVALID_TRANSITION"

    def __init__(self, rollout: Rollout, action: str) -> None:
        super().__init__(f"cannot {action} rollout {rollout.rollout_id}: it is {rollout.state}")
        self.state = rollout.state


@dataclass(frozen=True, slots=True)
class StageReport:
    index: int
    percentage: float
    duration: timedelta | None
    started_at: datetime | None
    ended_at: datetime | None
    target: Counts
    orgs_with_sessions: int
    baseline: Counts
    verdict: Verdict | None  # None for stages not reached


@dataclass(frozen=True, slots=True)
class Gate:
    verdict: Verdict
    comparison: Baseline
    regression: Verdict | None


@dataclass(frozen=True, slots=True)
class NextStep:
    action: str  # advance, complete, resume, none
    at: datetime | None
    detail: str


@dataclass(frozen=True, slots=True)
class EnterpriseOrg:
    org_id: str
    decision: str  # approved, skipped, pending
    decided_by: str | None
    decided_at: datetime | None
    voided_at: datetime | None
    applied: bool  # included: its runners were told to run the build


@dataclass(frozen=True, slots=True)
class RolloutView:
    rollout: Rollout
    stages: tuple[StageReport, ...]
    gate: Gate | None
    next_step: NextStep
    included: int
    enterprise: tuple[EnterpriseOrg, ...]
    frozen: Freeze | None


@dataclass(frozen=True, slots=True)
class Transition:
    """One change about to be written: the rollout before (None when it starts), after,
    and the history entries that say what happened."""

    before: Rollout | None
    after: Rollout
    history: tuple[HistoryEntry, ...]


@dataclass(frozen=True, slots=True)
class Reported:
    """What a reporter adds to a change's transaction."""

    effects: tuple[NewEffect, ...] = ()
    tracking: TrackingIssue | None = None


class RolloutReporter(Protocol):
    """Turns a rollout's changes into GitHub side effects (implemented in app/github/,
    so the controller knows nothing of GitHub)."""

    async def report(self, transition: Transition) -> Reported: ...


class RolloutController:
    def __init__(
        self, store: Store, fleet: Fleet, bus: EventBus, clock: Clock, settings: Settings
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.bus = bus
        self.clock = clock
        self.settings = settings
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        # Told of every committed change (tracking issues follow rollouts through this).
        self.listeners: list[Callable[[Rollout, Sequence[EventRecord]], None]] = []
        # Turns each change into GitHub side effects written with it (tracking issues);
        # effects_written wakes whoever applies them.
        self.reporter: RolloutReporter | None = None
        self.effects_written: Callable[[], None] | None = None
        # Other reasons to keep a rollout at its stage (the sweep gate): each returns why,
        # or None.
        self.holds: list[Callable[[Rollout], Awaitable[str | None]]] = []
        self._tripping: set[str] = set()
        fleet.on_counted = self._counted
        fleet.on_joining = self._joining

    # -- plans and gates ----------------------------------------------------------------

    def plan(self, channel: str) -> tuple[Stage, ...]:
        text = self.settings.stages_stable if channel == "stable" else self.settings.stages_beta
        return parse_stages(text)

    def judge(self, tally: StageTally) -> Verdict:
        """The stage's verdict: its thresholds first, then the baseline gate if set."""
        verdict = tally.verdict()
        # Runs on every counted heartbeat: the intervals (square roots) only when the
        # baseline gate is on.
        if verdict.outcome == "rollback" or self.settings.max_relative_regression is None:
            return verdict
        regression = judge_regression(
            compare(tally.total, tally.baseline),
            self.settings.max_relative_regression,
            self.settings.min_session_count,
        )
        return regression if regression is not None else verdict

    # -- commands -------------------------------------------------------------------------

    async def start(
        self,
        build_id: str,
        channel: str,
        *,
        by: str,
        force: bool = False,
        reason: str | None = None,
        once: str | None = None,
    ) -> Rollout:
        """Start rolling a build out on a channel; the first stage is committed at once.
        ``once`` (on every command) is the key of the command's source, such as a
        comment: a second attempt with it changes nothing and answers the first's result."""
        if channel not in CHANNELS:
            raise RolloutError(f"channel: {channel!r} is not one of {', '.join(CHANNELS)}")
        build = await self.store.get_build(build_id)
        if build is None:
            raise NotFound(f"no build {build_id!r}")
        missing = sorted(set(build.runtime_versions) - set(build.known_good_for))
        if (missing or not build.runtime_versions) and not force:
            raise Refused(
                f"build {build_id} is not known-good for {', '.join(missing) or 'any provider'};"
                " an admin may pass force with a reason"
            )
        if force and not (reason or "").strip():
            raise RolloutError("reason: a forced rollout needs a reason")
        _check_reason(reason)
        if once is not None and (done := await self.store.command_done(once)):
            return await self._get(done)
        async with self.lock:
            frozen = await self.store.get_freeze()
            if frozen is not None:
                raise Refused(f"rollouts are frozen: {frozen.reason}")
            state = await self.fleet.current()
            if state.recommended.get(channel) == build_id:
                raise Refused(f"build {build_id} is already the {channel} channel's build")
            stages = self.plan(channel)
            now = self.clock.now()
            first = stages[0]
            rollout = Rollout(
                rollout_id=str(uuid.uuid4()),
                build_id=build_id,
                channel=channel,
                state="rolling_out",
                plan=format_stages(stages),
                stage=0,
                percentage=first.percentage,
                started_at=now,
                updated_at=now,
                stage_started_at=now,
                deadline_at=now + first.duration if first.duration else None,
                previous_build_id=state.recommended.get(channel),
                started_by=by,
                forced_reason=reason.strip() if force and reason else None,
            )
            inclusions = await self._inclusions(rollout, state, already=frozenset())
            try:
                await self._write(
                    None,
                    rollout,
                    once=once,
                    history=[
                        self._entry(rollout, by, "start", "pending", reason=rollout.forced_reason)
                    ],
                    inclusions=inclusions,
                    events=[
                        (
                            "rollout_initiated",
                            {
                                **_ids(rollout),
                                "percentage": rollout.percentage,
                                "by": by,
                                "forced": rollout.forced_reason is not None,
                                "orgs": len(inclusions),
                            },
                        )
                    ],
                )
            except Conflict:
                raise Refused(f"a rollout is already active on the {channel} channel") from None
            except AlreadyDone as done:
                return await self._get(done.rollout_id)
        log.info(
            "rollout %s of %s on %s started by %s at %g%% (%d orgs)",
            rollout.rollout_id,
            build_id,
            channel,
            by,
            rollout.percentage,
            len(inclusions),
        )
        await self.step(rollout.rollout_id)
        return await self._get(rollout.rollout_id)

    async def pause(
        self, rollout_id: str, *, by: str, reason: str | None = None, once: str | None = None
    ) -> Rollout:
        """Halt at the current percentage: no new inclusions, the stage's clock stopped;
        included orgs stay on the build."""
        _check_reason(reason)
        async with self.lock:
            r = await self._get(rollout_id)
            if once is not None and await self.store.command_done(once):
                return r  # this command was acted on before: nothing again
            if r.state != "rolling_out":
                raise InvalidTransition(r, "pause")
            now = self.clock.now()
            remaining = max(0.0, (r.deadline_at - now).total_seconds()) if r.deadline_at else None
            after = dataclasses.replace(
                r,
                state="paused",
                paused_at=now,
                deadline_at=None,
                remaining_seconds=remaining,
                updated_at=now,
            )
            after = await self._write(
                r,
                after,
                once=once,
                history=[self._entry(after, by, "pause", r.state, reason=reason)],
                events=[("rollout_paused", {**_ids(after), "by": by, "reason": reason})],
            )
        return after

    async def resume(self, rollout_id: str, *, by: str, once: str | None = None) -> Rollout:
        """Continue a paused rollout; its stage's watch goes on from where it stopped."""
        async with self.lock:
            r = await self._get(rollout_id)
            if once is not None and await self.store.command_done(once):
                return r  # this command was acted on before: nothing again
            if r.state != "paused":
                raise InvalidTransition(r, "resume")
            now = self.clock.now()
            after = dataclasses.replace(
                r,
                state="rolling_out",
                paused_at=None,
                remaining_seconds=None,
                deadline_at=(
                    now + timedelta(seconds=r.remaining_seconds)
                    if r.remaining_seconds is not None
                    else None
                ),
                updated_at=now,
            )
            await self._write(
                r,
                after,
                once=once,
                history=[self._entry(after, by, "resume", r.state)],
                events=[("rollout_resumed", {**_ids(after), "by": by})],
            )
        await self.step(rollout_id)
        return await self._get(rollout_id)

    async def advance(
        self, rollout_id: str, *, by: str, to: float | None = None, once: str | None = None
    ) -> Rollout:
        """Move to the next stage now (or to the plan's stage at ``to`` percent), whatever
        the current stage's clock says: a person's decision. Not while frozen."""
        async with self.lock:
            r = await self._get(rollout_id)
            if once is not None and await self.store.command_done(once):
                return r  # this command was acted on before: nothing again
            if r.state != "rolling_out":
                raise InvalidTransition(r, "advance")
            frozen = await self.store.get_freeze()
            if frozen is not None:
                raise Refused(f"rollouts are frozen: {frozen.reason}")
            stages = parse_stages(r.plan)
            if to is None:
                target = r.stage + 1
            else:
                found = [i for i, s in enumerate(stages) if abs(s.percentage - to) < 1e-9]
                if not found:
                    raise RolloutError(f"to: {to:g}% is not a stage of this rollout ({r.plan})")
                target = found[0]
            if target >= len(stages):
                raise Refused(
                    f"rollout {rollout_id} is at its last stage ({r.percentage:g}%);"
                    " it completes when every enterprise org has decided"
                )
            if target <= r.stage:
                raise Refused(
                    f"rollout {rollout_id} is already at {r.percentage:g}%; it only moves forward"
                )
            await self._advance(r, target, by=by, once=once)
        await self.step(rollout_id)
        return await self._get(rollout_id)

    async def rollback(
        self,
        rollout_id: str,
        *,
        by: str,
        reason: str,
        trip: Verdict | None = None,
        once: str | None = None,
    ) -> Rollout:
        """Send every included org back to the build it ran before. Allowed while rolling
        out or paused, and within the rollback window after completion (which also
        restores the channel's previous recommendation and voids approvals)."""
        if not reason.strip():
            raise RolloutError("reason: a rollback needs a reason")
        _check_reason(reason)
        async with self.lock:
            r = await self._get(rollout_id)
            if once is not None and await self.store.command_done(once):
                return r  # this command was acted on before: nothing again
            now = self.clock.now()
            channel: ChannelChange | None = None
            if r.state == "completed":
                assert r.finished_at is not None
                if now - r.finished_at > self.settings.rollback_window:
                    raise Refused(
                        f"rollout {rollout_id} completed at {isoformat(r.finished_at)}, beyond"
                        f" the rollback window; recommend the build you want on the channel"
                    )
                latest = await self.store.latest_rollout(r.channel)
                if latest is not None and latest.rollout_id != r.rollout_id:
                    raise Refused(
                        f"rollout {latest.rollout_id} has started on the {r.channel} channel"
                        " since; roll that one back instead"
                    )
                channel = ChannelChange(
                    r.replaced_build_id,
                    f"rollout {rollout_id} rolled back",
                    f"rollout {rollout_id}",
                )
            elif r.state not in ("rolling_out", "paused"):
                raise InvalidTransition(r, "roll back")
            details: dict[str, Any] = {"reason": reason, "by": by, "at": isoformat(now)}
            if trip is not None:
                details |= {
                    "metric": trip.metric,
                    "value": trip.value,
                    "threshold": trip.threshold,
                    "sessions": trip.total.started,
                    "orgs": list(trip.orgs_over),
                }
            after = dataclasses.replace(
                r,
                state="rolled_back",
                deadline_at=None,
                finished_at=now,
                rollback=details,
                updated_at=now,
            )
            after = await self._write(
                r,
                after,
                once=once,
                history=[
                    self._entry(after, by, "rollback", r.state, reason=reason, details=details)
                ],
                channel=channel,
                void_approvals=channel is not None,
                events=[
                    (
                        "rollback_initiated",
                        {
                            **_ids(after),
                            **details,
                            "fromState": r.state,
                            "percentage": r.percentage,
                        },
                    )
                ],
            )
        log.warning(
            "rollout %s of %s on %s rolled back by %s: %s",
            rollout_id,
            r.build_id,
            r.channel,
            by,
            reason,
        )
        return after

    async def approve(
        self,
        rollout_id: str,
        org_id: str,
        *,
        by: str,
        skip: bool = False,
        once: str | None = None,
    ) -> Rollout:
        """Record an enterprise org's decision; an approval takes effect at 100%."""
        async with self.lock:
            r = await self._get(rollout_id)
            if once is not None and await self.store.command_done(once):
                return r  # this command was acted on before: nothing again
            if r.state not in ("rolling_out", "paused"):
                raise InvalidTransition(r, "record an approval for")
            state = await self.fleet.current()
            org = state.orgs.get(org_id)
            if org is None:
                raise NotFound(f"no org {org_id!r}")
            if not org.approval_required:
                raise RolloutError(f"orgId: org {org_id} does not require approval")
            if org.channel != r.channel:
                raise RolloutError(f"orgId: org {org_id} is on the {org.channel} channel")
            now = self.clock.now()
            decision = "skipped" if skip else "approved"
            after = dataclasses.replace(r, updated_at=now)
            await self._write(
                r,
                after,
                once=once,
                history=[self._entry(after, by, decision, r.state, details={"orgId": org_id})],
                approval=Approval(org_id, decision, by, now),
                events=[
                    (
                        "rollout_org_" + decision,
                        {**_ids(after), "orgId": org_id, "by": by},
                    )
                ],
            )
        await self.step(rollout_id)
        return await self._get(rollout_id)

    async def withdraw(
        self, rollout_id: str, org_id: str, *, by: str, once: str | None = None
    ) -> Rollout:
        """Take back an enterprise org's approval or skip before it took effect."""
        async with self.lock:
            r = await self._get(rollout_id)
            if once is not None and await self.store.command_done(once):
                return r
            if r.state not in ("rolling_out", "paused"):
                raise InvalidTransition(r, "withdraw an approval for")
            approvals = {a.org_id: a for a in await self.store.rollout_approvals(rollout_id)}
            if org_id not in approvals:
                raise Refused(f"org {org_id} has not decided on rollout {rollout_id}")
            included = {i.org_id for i in await self.store.rollout_orgs(rollout_id)}
            if org_id in included:
                raise Refused(f"org {org_id}'s approval has taken effect; roll back instead")
            after = dataclasses.replace(r, updated_at=self.clock.now())
            return await self._write(
                r,
                after,
                once=once,
                withdraw=org_id,
                history=[self._entry(after, by, "withdrawn", r.state, details={"orgId": org_id})],
                events=[("rollout_org_withdrawn", {**_ids(after), "orgId": org_id, "by": by})],
            )

    async def freeze(self, reason: str, *, by: str) -> Freeze:
        """Stop every rollout from starting or advancing (automatic rollbacks go on)."""
        if not reason.strip():
            raise RolloutError("reason: a freeze needs a reason")
        _check_reason(reason)
        now = self.clock.now()
        written = Freeze(reason.strip(), by, now)
        events = await self.store.set_freeze(written, now, by=by, keep_events=self.bus.keep)
        self.bus.deliver(events)
        if events:
            log.warning("rollouts frozen by %s: %s", by, reason)
            # Not read back: a read on the shared reader connection that overlaps another
            # read still in progress sees that read's snapshot, from before this commit.
            return written
        # Already frozen: the standing freeze is the answer. None only if it was lifted (or
        # written) concurrently, when this request's freeze is as good an answer.
        return await self.store.get_freeze() or written

    async def unfreeze(self, *, by: str) -> bool:
        events = await self.store.set_freeze(
            None, self.clock.now(), by=by, keep_events=self.bus.keep
        )
        self.bus.deliver(events)
        if events:
            log.warning("rollouts unfrozen by %s", by)
            self.wake.set()
        return bool(events)

    # -- automatic steps --------------------------------------------------------------------

    async def step(self, rollout_id: str) -> None:
        """Whatever the rollout is due for: a rollback its metrics call for, the next
        stage at its deadline when the metrics pass, the approvals that take effect at
        100%, completion once every enterprise org has decided."""
        async with self.lock:
            r = await self.store.get_rollout(rollout_id)
            if r is None or r.state not in ("rolling_out", "paused"):
                return
            await self.fleet.current()  # loads the stage's tally
            tally = self.fleet.tally(r.rollout_id, r.stage)
            verdict = self.judge(tally) if tally is not None else None
        if verdict is not None and verdict.outcome == "rollback":
            await self._auto_rollback(r, verdict)
            return
        if r.state != "rolling_out":
            return
        async with self.lock:
            r = await self._get(rollout_id)
            if r.state != "rolling_out" or await self.store.get_freeze() is not None:
                return
            state = await self.fleet.current()
            stages = parse_stages(r.plan)
            at_deadline = r.deadline_at is not None and self.clock.now() >= r.deadline_at
            if (r.stage == len(stages) - 1 or at_deadline) and await self._held(r):
                return
            if r.stage == len(stages) - 1:
                await self._settle_last_stage(r, state)
                return
            if not at_deadline:
                return
            tally = self.fleet.tally(r.rollout_id, r.stage)
            if tally is None or self.judge(tally).outcome != "pass":
                return  # insufficient data: held, and looked at again as sessions arrive
            await self._advance(r, r.stage + 1, by=AUTO)
        await self.step(rollout_id)

    async def _held(self, r: Rollout) -> str | None:
        for hold in self.holds:
            reason = await hold(r)
            if reason is not None:
                return reason
        return None

    async def step_all(self) -> datetime | None:
        """Step every live rollout; when the next deadline is."""
        due: list[datetime] = []
        for r in await self.store.live_rollouts():
            await self.step(r.rollout_id)
            after = await self.store.get_rollout(r.rollout_id)
            if (
                after is not None
                and after.state == "rolling_out"
                and after.deadline_at is not None
                and after.deadline_at > self.clock.now()
            ):
                due.append(after.deadline_at)
        return min(due, default=None)

    async def _counted(self, live: LiveRollout, tally: StageTally) -> None:
        """After each heartbeat counted in a live rollout's stage: a verdict of rollback
        acts on this heartbeat; a stage past its deadline that now passes moves on."""
        r = live.rollout
        verdict = self.judge(tally)
        if verdict.outcome == "rollback":
            await self._auto_rollback(r, verdict)
        elif (
            verdict.outcome == "pass"
            and r.state == "rolling_out"
            and r.deadline_at is not None
            and self.clock.now() >= r.deadline_at
        ):
            self.wake.set()

    async def _joining(self, live: LiveRollout, org: Org, reported: str | None) -> Inclusion | None:
        """Include an org that appeared after the stage began (the fleet decided it
        belongs); written only if the rollout is still the version the fleet saw."""
        state = await self.fleet.current()
        r = live.rollout
        previous = _before(self.fleet, org, {org.org_id: reported} if reported else {}, state)
        inclusion = Inclusion(org.org_id, r.stage, self.clock.now(), previous)
        if not await self.store.include_org(r.rollout_id, inclusion, version=r.version):
            return None
        log.info("org %s joined rollout %s at %g%%", org.org_id, r.rollout_id, r.percentage)
        return inclusion

    async def _auto_rollback(self, r: Rollout, verdict: Verdict) -> None:
        if r.rollout_id in self._tripping:
            return  # another heartbeat is already rolling it back
        self._tripping.add(r.rollout_id)
        try:
            assert verdict.metric is not None and verdict.value is not None
            reason = (
                f"{verdict.metric.replace('_', ' ')} {verdict.value:.4f} above"
                f" {verdict.threshold:g} after {verdict.total.started} sessions"
            )
            with contextlib.suppress(InvalidTransition, StaleRollout):
                await self.rollback(r.rollout_id, by=AUTO, reason=reason, trip=verdict)
        finally:
            self._tripping.discard(r.rollout_id)

    async def _advance(
        self, r: Rollout, index: int, *, by: str, once: str | None = None
    ) -> Rollout:
        stages = parse_stages(r.plan)
        stage = stages[index]
        now = self.clock.now()
        after = dataclasses.replace(
            r,
            stage=index,
            percentage=stage.percentage,
            stage_started_at=now,
            deadline_at=now + stage.duration if stage.duration else None,
            updated_at=now,
        )
        state = await self.fleet.current()
        live = state.live.get(r.channel)
        already = live.included if live is not None else frozenset()
        inclusions = await self._inclusions(after, state, already=already)
        # The old stage's verdict, for the record.
        tally = self.fleet.tally(r.rollout_id, r.stage)
        details: dict[str, Any] = {"orgs": len(inclusions), "fromPercentage": r.percentage}
        if tally is not None:
            details |= {
                "sessions": tally.total.started,
                "failureRate": tally.total.failure_rate,
                "disconnectRate": tally.total.disconnect_rate,
            }
        after = await self._write(
            r,
            after,
            once=once,
            history=[self._entry(after, by, "advance", r.state, details=details)],
            inclusions=inclusions,
            events=[
                (
                    "rollout_stage_advanced",
                    {
                        **_ids(after),
                        "stage": index + 1,
                        "percentage": stage.percentage,
                        "by": by,
                        "orgs": len(inclusions),
                    },
                )
            ],
        )
        log.info(
            "rollout %s advanced to %g%% by %s (%d more orgs)",
            r.rollout_id,
            stage.percentage,
            by,
            len(inclusions),
        )
        return after

    async def _settle_last_stage(self, r: Rollout, state: FleetState) -> None:
        """At 100%: approvals take effect, then completion once all have decided."""
        approvals = {a.org_id: a for a in await self.store.rollout_approvals(r.rollout_id)}
        live = state.live.get(r.channel)
        included = live.included if live is not None else frozenset()
        waiting = [
            o
            for o in _enterprise(state, r.channel)
            if o.org_id not in approvals or approvals[o.org_id].voided_at is not None
        ]
        approved = [
            o
            for o in _enterprise(state, r.channel)
            if o.org_id not in included
            and (a := approvals.get(o.org_id)) is not None
            and a.decision == "approved"
            and a.voided_at is None
        ]
        now = self.clock.now()
        if approved:
            reported = await self.store.org_builds([o.org_id for o in approved])
            after = dataclasses.replace(r, updated_at=now)
            inclusions = [
                Inclusion(o.org_id, r.stage, now, _before(self.fleet, o, reported, state))
                for o in approved
            ]
            r = await self._write(
                r,
                after,
                history=[
                    self._entry(
                        after,
                        AUTO,
                        "approvals_applied",
                        r.state,
                        details={"orgIds": [o.org_id for o in approved]},
                    )
                ],
                inclusions=inclusions,
            )
        if waiting:
            return
        current = state.recommended.get(r.channel)
        after = dataclasses.replace(
            r,
            state="completed",
            deadline_at=None,
            finished_at=now,
            replaced_build_id=current,
            updated_at=now,
        )
        await self._write(
            r,
            after,
            history=[self._entry(after, AUTO, "complete", r.state)],
            channel=ChannelChange(
                r.build_id, f"rollout {r.rollout_id} completed", f"rollout {r.rollout_id}"
            ),
            events=[("rollout_completed", {**_ids(after), "previousBuildId": current})],
        )
        log.info("rollout %s of %s on %s completed", r.rollout_id, r.build_id, r.channel)

    async def _inclusions(
        self, rollout: Rollout, state: FleetState, *, already: frozenset[str]
    ) -> list[Inclusion]:
        """The orgs the rollout's current percentage adds, each with the build it was
        told to run until now."""
        pool = [o.org_id for o in state.orgs.values() if eligible(o, rollout.channel)]
        added = sorted(members(rollout.rollout_id, pool, rollout.percentage) - already)
        reported = await self.store.org_builds(added)
        now = self.clock.now()
        return [
            Inclusion(
                org_id, rollout.stage, now, _before(self.fleet, state.orgs[org_id], reported, state)
            )
            for org_id in added
        ]

    async def _write(
        self,
        before: Rollout | None,
        after: Rollout,
        *,
        history: Sequence[HistoryEntry],
        inclusions: Sequence[Inclusion] = (),
        approval: Approval | None = None,
        void_approvals: bool = False,
        channel: ChannelChange | None = None,
        events: Sequence[tuple[str, Mapping[str, Any]]] = (),
        once: str | None = None,
        withdraw: str | None = None,
    ) -> Rollout:
        written = dataclasses.replace(after, version=(before.version + 1) if before else 1)
        reported = (
            await self.reporter.report(Transition(before, written, tuple(history)))
            if self.reporter is not None
            else Reported()
        )
        change = RolloutChange(
            written,
            before.version if before is not None else None,
            history,
            inclusions,
            approval,
            void_approvals,
            channel,
            events,
            reported.effects,
            reported.tracking,
            once,
            withdraw,
        )
        records = await self.store.write_rollout(
            change, self.clock.now(), keep_events=self.bus.keep
        )
        await self.fleet.rollout_changed(written, inclusions)
        self.bus.deliver(records)
        self.wake.set()
        if reported.effects and self.effects_written is not None:
            self.effects_written()
        for listener in self.listeners:
            listener(written, records)
        return written

    def _entry(
        self,
        r: Rollout,
        actor: str,
        action: str,
        from_state: str | None,
        *,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> HistoryEntry:
        return HistoryEntry(
            self.clock.now(),
            actor,
            action,
            from_state,
            r.state,
            r.stage,
            r.percentage,
            reason,
            dict(details or {}),
        )

    async def _get(self, rollout_id: str) -> Rollout:
        r = await self.store.get_rollout(rollout_id)
        if r is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return r

    # -- reading ----------------------------------------------------------------------------

    async def view(self, rollout_id: str) -> RolloutView:
        """A rollout with its stages' metrics, gate, baseline and next step, from the
        store (not from the heartbeat path's memory)."""
        r = await self._get(rollout_id)
        state = await self.fleet.current()
        stages = parse_stages(r.plan)
        inclusions = await self.store.rollout_orgs(rollout_id)
        joined = {i.org_id: i.stage for i in inclusions}
        starts = _stage_starts(
            await self.store.rollout_history(rollout_id, after_id=None, limit=10_000)
        )
        rows = await self.store.stage_sessions(rollout_id)
        limits = thresholds(self.settings)
        previous = r.previous_build_id
        reports: list[StageReport] = []
        gate: Gate | None = None
        for index, stage in enumerate(stages):
            by_org: dict[str, Counts] = {}
            baseline = Counts()
            for row in rows:
                if row.stage != index:
                    continue
                counts = Counts(row.started, row.failed, row.disconnected)
                if joined.get(row.org_id, len(stages)) <= index:
                    if row.build_id == r.build_id:
                        by_org[row.org_id] = by_org.get(row.org_id, Counts()) + counts
                elif (row.build_id == previous) if previous else (row.build_id != r.build_id):
                    baseline = baseline + counts
            reached = index <= r.stage
            verdict = judge_stage(by_org, limits) if reached else None
            total = sum(by_org.values(), Counts())
            ended = starts.get(index + 1) or (r.finished_at if index == r.stage else None)
            reports.append(
                StageReport(
                    index,
                    stage.percentage,
                    stage.duration,
                    starts.get(index) if reached else None,
                    ended if reached else None,
                    total,
                    sum(1 for c in by_org.values() if c.started),
                    baseline,
                    verdict,
                )
            )
            if index == r.stage and verdict is not None:
                comparison = compare(total, baseline)
                regression = judge_regression(
                    comparison, self.settings.max_relative_regression, limits.min_sessions
                )
                gate = Gate(verdict, comparison, regression)
        frozen = await self.store.get_freeze()
        enterprise = await self._enterprise_view(r, state, joined)
        step = self._next_step(r, stages, gate, enterprise, frozen)
        held = await self._held(r) if r.state == "rolling_out" else None
        if held is not None and frozen is None:
            step = NextStep(step.action, None, f"held: {held}")
        return RolloutView(
            r,
            tuple(reports),
            gate,
            step,
            len(inclusions),
            enterprise,
            frozen,
        )

    async def _enterprise_view(
        self, r: Rollout, state: FleetState, joined: Mapping[str, int]
    ) -> tuple[EnterpriseOrg, ...]:
        approvals = {a.org_id: a for a in await self.store.rollout_approvals(r.rollout_id)}
        orgs = {o.org_id for o in _enterprise(state, r.channel)} | set(approvals)
        return tuple(
            EnterpriseOrg(
                org_id,
                a.decision if a is not None else "pending",
                a.decided_by if a is not None else None,
                a.decided_at if a is not None else None,
                a.voided_at if a is not None else None,
                org_id in joined,
            )
            for org_id in sorted(orgs)
            for a in [approvals.get(org_id)]
        )

    def _next_step(
        self,
        r: Rollout,
        stages: tuple[Stage, ...],
        gate: Gate | None,
        enterprise: tuple[EnterpriseOrg, ...],
        frozen: Freeze | None,
    ) -> NextStep:
        if r.state in ("completed", "rolled_back"):
            return NextStep("none", None, f"the rollout is {r.state.replace('_', ' ')}")
        if r.state == "paused":
            return NextStep("resume", None, "paused: it moves again when resumed")
        if frozen is not None:
            return NextStep("none", None, f"frozen: {frozen.reason}")
        if r.stage == len(stages) - 1:
            waiting = [e.org_id for e in enterprise if e.decision == "pending" or e.voided_at]
            if waiting:
                return NextStep(
                    "complete", None, f"waiting for {len(waiting)} enterprise org(s) to decide"
                )
            return NextStep("complete", self.clock.now(), "completing")
        following = stages[r.stage + 1].percentage
        if gate is not None and gate.verdict.outcome == "held":
            v = gate.verdict
            return NextStep(
                "advance",
                None,
                f"held: {v.metric} {v.value:.4f} above {v.threshold:g} in one org's data only"
                f" ({', '.join(v.orgs_over)}); advance by hand, pin that org, or roll back",
            )
        if gate is not None and gate.verdict.outcome == "insufficient":
            sessions = gate.verdict.total.started
            need = self.settings.min_session_count
            if r.deadline_at is not None and self.clock.now() >= r.deadline_at:
                return NextStep(
                    "advance",
                    None,
                    f"insufficient data: {sessions} of {need} sessions; advances to"
                    f" {following:g}% once there are enough",
                )
            return NextStep(
                "advance",
                r.deadline_at,
                f"to {following:g}% at the deadline if {need} sessions are in"
                f" ({sessions} so far) and rates are within thresholds",
            )
        return NextStep(
            "advance", r.deadline_at, f"to {following:g}% at the deadline if rates stay within"
        )


def _enterprise(state: FleetState, channel: str) -> list[Org]:
    """Enterprise orgs a rollout on ``channel`` waits for (pinned ones are never moved)."""
    return sorted(
        (
            o
            for o in state.orgs.values()
            if o.channel == channel
            and o.approval_required
            and o.pinned_build_id is None
            and not o.version_pins
        ),
        key=lambda o: o.org_id,
    )


def _before(fleet: Fleet, org: Org, reported: Mapping[str, str], state: FleetState) -> str | None:
    """The build an org was told to run before a rollout included it; for an org that has
    reported none and was told none, the channel's recommendation (what a rollback can
    safely send it to)."""
    told = fleet.desired_build(org, reported.get(org.org_id), state)
    return told if told is not None else state.recommended.get(org.channel)


def _stage_starts(history: Sequence[HistoryEntry]) -> dict[int, datetime]:
    starts: dict[int, datetime] = {}
    for entry in history:
        if entry.action in ("start", "advance"):
            starts.setdefault(entry.stage, entry.at)
    return starts


def _ids(r: Rollout) -> dict[str, Any]:
    return {"rolloutId": r.rollout_id, "buildId": r.build_id, "channel": r.channel}


class RolloutTimer:
    """Pipeline component: steps rollouts at their deadlines (stored, so a restart neither
    resets nor repeats them), when sessions arrive for a stage held for data, and when a
    freeze is lifted."""

    name = "rollouts"

    def __init__(self, controller: RolloutController) -> None:
        self.controller = controller

    async def start(self, pipeline: UpdatePipeline) -> None:
        pipeline.spawn("rollouts", self._loop())

    async def stop(self) -> None:
        return None

    async def _loop(self) -> None:
        controller = self.controller
        while True:
            controller.wake.clear()
            try:
                due = await controller.step_all()
            except StoreBusy as exc:
                # Another process held the database: nothing was written; step again.
                log.warning("rollout timer: %s; trying again in %.0fs", exc, BUSY_PAUSE)
                await asyncio.sleep(BUSY_PAUSE)
                continue
            wait = RECHECK.total_seconds()
            if due is not None:
                wait = min(wait, max(0.0, (due - controller.clock.now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(controller.wake.wait(), max(wait, 0.05))
