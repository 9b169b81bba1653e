"""The canary's domain core: registering builds, taking results, judging, timing out,
and the channel recommendations the known-good registry keeps."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from app.clock import Clock
from app.config import Settings, format_duration
from app.logs import get_logger
from app.pipeline.canary.metrics import TestResult, Thresholds, Verdict, judge
from app.pipeline.events import EventBus
from app.store import (
    BUSY_PAUSE,
    BuildRecord,
    CanaryOutcome,
    CanaryRun,
    ChannelRecord,
    Conflict,
    EventRecord,
    NewCanaryRun,
    NewEffect,
    Store,
    StoreBusy,
)

if TYPE_CHECKING:
    from app.pipeline import UpdatePipeline

log = get_logger("pipeline.canary")

BUILD_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_BUILD_ID = re.compile(BUILD_ID_PATTERN)
_SHA = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
TIMEOUT_RECHECK = timedelta(minutes=1)
ACTIVE = ("pending", "running")


def build_id_for_commit(sha: str) -> str:
    """The id of a build made from a commit: stable across redeliveries and restarts."""
    if not _SHA.match(sha.lower()):
        raise ValueError(f"{sha!r} is not a commit SHA")
    return "build-" + sha.lower()[:12]


class CanaryError(Exception):
    """A request the canary cannot take; ``status`` is the HTTP status it maps to."""

    status = 400


class UnknownBuild(CanaryError):
    status = 404


class RunFinished(CanaryError):
    status = 409

    def __init__(self, run: CanaryRun) -> None:
        super().__init__(
            f"the canary run of {run.build_id} is already {run.state}; results are taken"
            " once, while it is pending or running"
        )
        self.run = run


class NotKnownGood(CanaryError):
    status = 409


def check_key(build_id: str, attempt: int) -> str:
    """The external_id of a run's check run: the build id for the first run."""
    return build_id if attempt == 1 else f"{build_id}@{attempt}"


def dispatch_key(build_id: str, attempt: int) -> str:
    """The key a run's workflow dispatch carries (and its run name shows)."""
    return f"canary-{build_id}-{attempt}"


class CanaryReporter(Protocol):
    """Turns what happens to a canary run into GitHub side effects (check runs, workflow
    dispatches), written in the same transaction as the change they report."""

    async def started(
        self, build: BuildRecord, attempt: int, run: NewCanaryRun
    ) -> list[NewEffect]: ...

    async def finished(
        self,
        build: BuildRecord,
        run: CanaryRun,
        outcome: CanaryOutcome,
        verdict: Verdict | None,
        *,
        ended_by: str,
    ) -> list[NewEffect]:
        """``ended_by``: results, timeout, superseded or workflow."""
        ...

    async def dispatched_run_id(self, run: CanaryRun) -> str | None:
        """The id of the workflow run GitHub started for ``run``'s dispatch, if known."""
        ...


class CanaryService:
    def __init__(self, store: Store, bus: EventBus, clock: Clock, settings: Settings) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.timeout = settings.canary_timeout
        self.thresholds = Thresholds(
            settings.canary_min_pass_rate, settings.canary_max_disconnect_rate
        )
        self.providers = tuple(p.id for p in settings.providers)
        self.wake = asyncio.Event()
        # Set when the GitHub App is configured: check runs and workflow dispatches.
        self.reporter: CanaryReporter | None = None
        self.effects_written: Callable[[], None] = lambda: None
        # Told when builds, their known-good providers or channels change (the fleet's
        # in-memory view of them).
        self.listeners: list[Callable[[], None]] = []

    def _new_run(self, build: BuildRecord, attempt: int, ref: str | None) -> NewCanaryRun:
        # A check run needs a commit to sit on.
        on_github = (
            self.reporter is not None
            and build.repository is not None
            and build.commit_sha is not None
        )
        return NewCanaryRun(
            self.clock.now() + self.timeout,
            ref=ref,
            check_key=check_key(build.build_id, attempt) if on_github else None,
            dispatch_key=dispatch_key(build.build_id, attempt) if on_github else None,
        )

    async def _started(
        self, build: BuildRecord, attempt: int, run: NewCanaryRun
    ) -> list[NewEffect]:
        if self.reporter is None or run.check_key is None:
            return []
        return await self.reporter.started(build, attempt, run)

    def _delivered(self, events: Sequence[EventRecord], effects: Sequence[NewEffect]) -> None:
        self.bus.deliver(events)
        for listener in self.listeners:
            listener()
        if effects:
            self.effects_written()
        self.wake.set()

    async def register(
        self, build: BuildRecord, *, ref: str | None = None
    ) -> tuple[BuildRecord, CanaryRun]:
        """Record a new build and start its canary run (Conflict when the id is known).
        ``ref`` is the branch its canary workflow runs on, for builds from GitHub."""
        if not _BUILD_ID.match(build.build_id):
            raise CanaryError(f"build id {build.build_id!r} does not match {BUILD_ID_PATTERN}")
        unknown = sorted(set(build.runtime_versions) - set(self.providers))
        if unknown:
            raise CanaryError(f"unknown provider(s) in runtimeVersions: {', '.join(unknown)}")
        run = self._new_run(build, 1, ref)
        effects = await self._started(build, 1, run)
        stored, started, events = await self.store.register_build(
            build, self.clock.now(), run=run, keep_events=self.bus.keep, effects=effects
        )
        self._delivered(events, effects)
        log.info("build %s registered; canary run started", build.build_id)
        return stored, started

    async def rerun(self, build_id: str) -> CanaryRun:
        """Start another canary run of a build; one still going is superseded first."""
        build, latest = await self.build(build_id)
        if latest is None:
            raise UnknownBuild(f"build {build_id!r} has no canary run")
        if latest.state in ACTIVE:
            await self.supersede(latest, reason="superseded by a re-run")
        attempt = latest.attempt + 1
        run = self._new_run(build, attempt, latest.ref)
        effects = await self._started(build, attempt, run)
        try:
            started, events = await self.store.start_canary_run(
                build_id,
                attempt,
                self.clock.now(),
                run=run,
                keep_events=self.bus.keep,
                effects=effects,
            )
        except Conflict:  # a concurrent re-run took this attempt
            _, current = await self.build(build_id)
            assert current is not None
            return current
        self._delivered(events, effects)
        log.info("canary of %s started again (run %d)", build_id, attempt)
        return started

    async def supersede(self, run: CanaryRun, *, reason: str) -> bool:
        """End a run that is no longer wanted (its pull request moved on)."""
        return await self._end(run, "errored", reason, ended_by="superseded")

    async def workflow_finished(
        self, workflow_run_id: str, keys: Sequence[str], conclusion: str | None
    ) -> bool:
        """A canary workflow run completed: a run still waiting for its results fails
        now rather than at its deadline."""
        run = await self.store.canary_run_for_workflow(workflow_run_id, keys)
        if run is None or run.state not in ACTIVE:
            return False
        return await self._end(
            run,
            "errored",
            f"the canary workflow run {workflow_run_id} finished ({conclusion or 'no conclusion'})"
            " without posting results",
            ended_by="workflow",
        )

    async def bound_workflow_run(self, run: CanaryRun) -> str | None:
        """The workflow run dispatched for ``run``, once GitHub said which it is."""
        if run.workflow_run_id is not None or self.reporter is None:
            return run.workflow_run_id
        found = await self.reporter.dispatched_run_id(run)
        if found is not None:
            await self.store.bind_workflow_run(run.id, found)
        return found

    async def bind(self, run: CanaryRun, workflow_run_id: str) -> None:
        await self.store.bind_workflow_run(run.id, workflow_run_id)

    async def _end(self, run: CanaryRun, state: str, error: str, *, ended_by: str) -> bool:
        outcome = CanaryOutcome(state, None, None, (), error=error, reported_by=ended_by)
        build, _ = await self.build(run.build_id)
        effects: list[NewEffect] = []
        if self.reporter is not None and run.check_key is not None:
            effects = await self.reporter.finished(build, run, outcome, None, ended_by=ended_by)
        finished = await self.store.finish_canary(
            run.id, outcome, self.clock.now(), keep_events=self.bus.keep, effects=effects
        )
        if finished is None:
            return False
        self._delivered(finished[1], effects)
        log.info("canary run %d of %s ended: %s", run.attempt, run.build_id, error)
        return True

    async def build(self, build_id: str) -> tuple[BuildRecord, CanaryRun | None]:
        build = await self.store.get_build(build_id)
        if build is None:
            raise UnknownBuild(f"no build {build_id!r}")
        return build, await self.store.latest_canary_run(build_id)

    async def active_run(self, build_id: str) -> tuple[BuildRecord, CanaryRun]:
        """The run results may be posted to; UnknownBuild or RunFinished otherwise."""
        build, run = await self.build(build_id)
        if run is None:
            raise UnknownBuild(f"build {build_id!r} has no canary run")
        if run.state not in ACTIVE:
            raise RunFinished(run)
        if run.deadline_at is not None and run.deadline_at <= self.clock.now():
            # Past its deadline: it times out now, whether or not the timeout task (which
            # runs only with the pipeline) got to it.
            await self.expire_due()
            _, ended = await self.build(build_id)
            assert ended is not None
            raise RunFinished(ended)
        return build, run

    async def record_results(
        self, build_id: str, results: Sequence[TestResult], *, reported_by: str
    ) -> tuple[CanaryRun, Verdict]:
        try:
            build, run = await self.active_run(build_id)
        except RunFinished as ended:
            # The same report again (a client retrying after losing the answer) gets
            # the same answer; anything else is refused.
            repeated = await self._same_report(ended.run, build_id, results)
            if repeated is None:
                raise
            return repeated
        verdict = judge(results, build.runtime_versions, self.thresholds)
        outcome = CanaryOutcome(
            verdict.state,
            verdict.metrics_json(),
            [r.as_json() for r in results],
            verdict.known_good_for,
            error=None if verdict.state == "passed" else verdict.reason,
            reported_by=reported_by,
        )
        effects: list[NewEffect] = []
        if self.reporter is not None and run.check_key is not None:
            effects = await self.reporter.finished(build, run, outcome, verdict, ended_by="results")
        finished = await self.store.finish_canary(
            run.id, outcome, self.clock.now(), keep_events=self.bus.keep, effects=effects
        )
        if finished is None:  # the run ended (timed out, say) while this was judged
            _, latest = await self.build(build_id)
            assert latest is not None
            raise RunFinished(latest)
        concluded, events = finished
        self._delivered(events, effects)
        log.info(
            "canary of %s %s (%s; known-good for %s)",
            build_id,
            verdict.state,
            verdict.reason,
            ", ".join(verdict.known_good_for) or "no provider",
        )
        return concluded, verdict

    async def _same_report(
        self, run: CanaryRun, build_id: str, results: Sequence[TestResult]
    ) -> tuple[CanaryRun, Verdict] | None:
        stored = await self.store.canary_results(run.id)
        if stored is None or stored != [r.as_json() for r in results]:
            return None
        build, _ = await self.build(build_id)
        return run, judge(results, build.runtime_versions, self.thresholds)

    async def expire_due(self) -> list[CanaryRun]:
        """Runs whose results did not come in time are errored."""
        expired = []
        for run in await self.store.expired_canaries(self.clock.now(), limit=100):
            if await self._end(
                run,
                "errored",
                f"no results within {format_duration(self.timeout)}",
                ended_by="timeout",
            ):
                expired.append(run)
                log.warning("canary of %s errored: no results in time", run.build_id)
        return expired

    # -- the known-good registry ----------------------------------------------------------

    @staticmethod
    def covers(build: BuildRecord) -> bool:
        """Known-good for every provider it carries: the condition to roll it out."""
        return bool(build.runtime_versions) and set(build.runtime_versions) <= set(
            build.known_good_for
        )

    async def recommend(
        self, channel: str, build_id: str, *, reason: str, by: str, force: bool = False
    ) -> ChannelRecord:
        """Make ``build_id`` the channel's recommended build, by an admin's decision (a
        completed rollout does this through the rollout controller). Only known-good
        builds, unless forced with a reason."""
        build = await self.store.get_build(build_id)
        if build is None:
            raise UnknownBuild(f"no build {build_id!r}")
        if not self.covers(build) and not force:
            missing = sorted(set(build.runtime_versions) - set(build.known_good_for))
            raise NotKnownGood(
                f"build {build_id} is not known-good for {', '.join(missing) or 'any provider'};"
                " pass force with a reason to recommend it anyway"
            )
        record, events = await self.store.set_channel(
            channel,
            build_id,
            self.clock.now(),
            reason=reason,
            set_by=by,
            keep_events=self.bus.keep,
        )
        self._delivered(events, ())
        log.info("channel %s now recommends %s (%s, by %s)", channel, build_id, reason, by)
        return record


class CanaryTimeouts:
    """Pipeline component: errors runs whose results did not arrive in time. Deadlines
    are stored, so a restart neither resets nor loses them."""

    name = "canary_timeouts"

    def __init__(self, canary: CanaryService) -> None:
        self.canary = canary

    async def start(self, pipeline: UpdatePipeline) -> None:
        pipeline.spawn("canary-timeouts", self._loop())

    async def stop(self) -> None:
        return None

    async def _loop(self) -> None:
        while True:
            self.canary.wake.clear()
            try:
                await self.canary.expire_due()
                due = await self.canary.store.next_canary_deadline()
            except StoreBusy as exc:
                # Another process holds the database; its deadlines wait a moment.
                log.warning("canary timeouts: %s; trying again in %.0fs", exc, BUSY_PAUSE)
                await asyncio.sleep(BUSY_PAUSE)
                continue
            wait = TIMEOUT_RECHECK.total_seconds()
            if due is not None:
                wait = min(wait, max(0.0, (due - self.canary.clock.now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.canary.wake.wait(), max(wait, 0.05))
