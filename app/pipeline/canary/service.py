"""The canary's domain core: registering builds, taking results, judging, timing out,
and the channel recommendations the known-good registry keeps."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from app.clock import Clock
from app.config import Settings
from app.logs import get_logger
from app.pipeline.canary.metrics import TestResult, Thresholds, Verdict, judge
from app.pipeline.events import EventBus
from app.store import BuildRecord, CanaryOutcome, CanaryRun, ChannelRecord, Store

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

    async def register(self, build: BuildRecord) -> tuple[BuildRecord, CanaryRun]:
        """Record a new build and start its canary run (Conflict when the id is known)."""
        if not _BUILD_ID.match(build.build_id):
            raise CanaryError(f"build id {build.build_id!r} does not match {BUILD_ID_PATTERN}")
        unknown = sorted(set(build.runtime_versions) - set(self.providers))
        if unknown:
            raise CanaryError(f"unknown provider(s) in runtimeVersions: {', '.join(unknown)}")
        now = self.clock.now()
        stored, run, events = await self.store.register_build(
            build, now, deadline_at=now + self.timeout, keep_events=self.bus.keep
        )
        self.bus.deliver(events)
        self.wake.set()
        log.info("build %s registered; canary run started", build.build_id)
        return stored, run

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
        finished = await self.store.finish_canary(
            run.id, outcome, self.clock.now(), keep_events=self.bus.keep
        )
        if finished is None:  # the run ended (timed out, say) while this was judged
            _, latest = await self.build(build_id)
            assert latest is not None
            raise RunFinished(latest)
        concluded, events = finished
        self.bus.deliver(events)
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
        now = self.clock.now()
        for run in await self.store.expired_canaries(now, limit=100):
            outcome = CanaryOutcome(
                "errored",
                None,
                None,
                (),
                error=f"no results within {self.timeout}",
                reported_by="timeout",
            )
            finished = await self.store.finish_canary(
                run.id, outcome, now, keep_events=self.bus.keep
            )
            if finished is not None:
                concluded, events = finished
                self.bus.deliver(events)
                expired.append(concluded)
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
        self.bus.deliver(events)
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
            await self.canary.expire_due()
            wait = TIMEOUT_RECHECK.total_seconds()
            due = await self.canary.store.next_canary_deadline()
            if due is not None:
                wait = min(wait, max(0.0, (due - self.canary.clock.now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.canary.wake.wait(), max(wait, 0.05))
