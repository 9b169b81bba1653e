"""The sweep manager's domain core: which repositories a sweep dispatches to, how many
run at once, how their workflow runs are followed, and when a sweep is done. GitHub is
behind two small interfaces (reading opt-in files, turning dispatches and summaries into
outbox entries), so this module knows nothing of it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from app.clock import Clock
from app.config import Settings
from app.logs import get_logger
from app.pipeline.events import EventBus
from app.store import (
    BUSY_PAUSE,
    NewEffect,
    Rollout,
    Store,
    StoreBusy,
    Sweep,
    SweepRepo,
    SweepRun,
)
from app.sweeps.config import STANDARD_INPUTS, SweepConfig

if TYPE_CHECKING:
    from app.pipeline import UpdatePipeline

log = get_logger("sweeps")

IN_FLIGHT = ("dispatching", "queued", "in_progress")
FINAL = ("completed", "failed", "timed_out")
# A workflow run created this long before its dispatch was recorded can still be it
# (GitHub's clock and ours need not agree to the second).
MATCH_MARGIN = timedelta(minutes=2)
MATCH_WINDOW = timedelta(minutes=15)
RECHECK = timedelta(seconds=30)


class SweepError(Exception):
    status = 400
    code = "VALIDATION_FAILED"


class SweepNotFound(SweepError):
    status = 404
    code = "NOT_FOUND"


class SweepUnavailable(SweepError):
    status = 503
    code = "SERVICE_UNAVAILABLE"


class ConfigSource(Protocol):
    """Reads repositories' opt-in files (the GitHub side)."""

    async def read_unread(self) -> int: ...


class SweepReporter(Protocol):
    """Turns dispatches and finished sweeps into GitHub side effects."""

    def dispatch(self, run: SweepRun) -> NewEffect: ...

    async def finished(self, sweep: Sweep, runs: Sequence[SweepRun]) -> list[NewEffect]: ...


@dataclass(frozen=True, slots=True)
class WorkflowRunEvent:
    """What a workflow_run event says about a run."""

    repo: str
    run_id: int
    run_attempt: int
    workflow_path: str  # .github/workflows/sweep.yml
    display_title: str
    status: str  # queued, in_progress, completed, ...
    conclusion: str | None
    url: str | None
    created_at: datetime | None
    event: str  # workflow_dispatch, push, ...


@dataclass(frozen=True, slots=True)
class SweepView:
    sweep: Sweep
    runs: tuple[SweepRun, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Repositories by outcome: their conclusion when they ran to the end, else
        their state (waiting, dispatching, queued, in_progress, failed, timed_out)."""
        return dict(
            Counter(
                r.conclusion if r.state == "completed" and r.conclusion else r.state
                for r in self.runs
            )
        )


class SweepService:
    def __init__(self, store: Store, bus: EventBus, clock: Clock, settings: Settings) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.settings = settings
        self.configs: ConfigSource | None = None
        self.reporter: SweepReporter | None = None
        self.effects_written: Callable[[], None] | None = None
        # Called with a sweep's id once it completes (the rollout gate looks again then).
        self.finished: list[Callable[[str], None]] = []
        self.wake = asyncio.Event()
        self._lock = asyncio.Lock()

    # -- starting ---------------------------------------------------------------------------

    async def start(
        self,
        *,
        by: str,
        provider: str | None = None,
        version: str | None = None,
        build_id: str | None = None,
        rollout_id: str | None = None,
    ) -> SweepView:
        """Sweep the opted-in repositories that want ``provider`` at ``version``, or any
        of a build's runtimes. Unread opt-in files are read first."""
        if self.reporter is None:
            raise SweepUnavailable("sweeps need the GitHub App (GITHUB_APP_ID and a key)")
        known = {p.id for p in self.settings.providers}
        if build_id is not None:
            build = await self.store.get_build(build_id)
            if build is None:
                raise SweepNotFound(f"no build {build_id!r}")
            versions = dict(build.runtime_versions)
            if not versions:
                raise SweepError(f"build {build_id} carries no runtime to sweep for")
        else:
            if provider is None or version is None:
                raise SweepError("give provider and version, or buildId")
            if provider not in known:
                raise SweepError(f"provider: {provider!r} is not one of {', '.join(sorted(known))}")
            versions = {provider: version}
        if self.configs is not None:
            await self.configs.read_unread()
        now = self.clock.now()
        sweep = Sweep(
            str(uuid.uuid4()),
            "running",
            provider,
            version,
            build_id,
            rollout_id,
            by,
            now,
        )
        runs = [
            run
            for repo in await self._opted_in()
            if (run := self._run(sweep, repo.repo, repo.installation_id, repo.config, versions))
        ]
        events = await self.store.add_sweep(sweep, runs, now, keep_events=self.bus.keep)
        self.bus.deliver(events)
        log.info("sweep %s started by %s: %d repositories", sweep.sweep_id, by, len(runs))
        await self.pump()
        await self.finish_if_done(sweep.sweep_id)
        return await self.view(sweep.sweep_id)

    async def _opted_in(self) -> list[SweepRepo]:
        found: list[SweepRepo] = []
        before: str | None = None
        while True:
            page = await self.store.list_sweep_repos(opted_in=True, before=before, limit=500)
            found += [r for r in page if r.state == "opted_in" and r.excluded_at is None]
            if len(page) < 500:
                return found
            before = page[-1].repo

    def _run(
        self,
        sweep: Sweep,
        repo: str,
        installation_id: int,
        config: Mapping[str, Any] | None,
        versions: Mapping[str, str],
    ) -> SweepRun | None:
        if config is None:
            return None
        parsed = SweepConfig.from_json(config)
        wanted = {p: v for p, v in sorted(versions.items()) if parsed.wants(p)}
        if not wanted:
            return None
        # A build sweep names every runtime the repository wants, comma-separated, in
        # the same order in both inputs.
        inputs = {
            **parsed.inputs,
            "sweep_id": sweep.sweep_id,
            "provider": ",".join(wanted),
            "version": ",".join(wanted.values()),
            "build_id": sweep.build_id or "",
        }
        assert set(STANDARD_INPUTS) <= set(inputs)
        return SweepRun(
            sweep.sweep_id,
            repo,
            installation_id,
            parsed.workflow,
            parsed.ref or "",
            inputs,
            "waiting",
            sweep.created_at,
        )

    # -- dispatching ------------------------------------------------------------------------

    async def pump(self) -> int:
        """Dispatch waiting repositories while fewer than the limit run; how many."""
        assert self.reporter is not None
        async with self._lock:
            room = self.settings.sweep_concurrency - await self.store.sweep_runs_in_flight()
            started = 0
            for sweep in await self.store.live_sweeps():
                if room <= 0:
                    break
                for run in await self.store.sweep_runs(sweep.sweep_id):
                    if room <= 0:
                        break
                    if run.state != "waiting":
                        continue
                    now = self.clock.now()
                    changed = await self.store.update_sweep_run(
                        run.sweep_id,
                        run.repo,
                        {
                            "state": "dispatching",
                            "dispatched_at": now,
                            "deadline_at": now + self.settings.sweep_timeout,
                        },
                        states=("waiting",),
                        effects=[self.reporter.dispatch(run)],
                        at=now,
                    )
                    if changed:
                        room -= 1
                        started += 1
            if started and self.effects_written is not None:
                self.effects_written()
            return started

    # -- following runs ---------------------------------------------------------------------

    async def run_event(self, event: WorkflowRunEvent) -> SweepRun | None:
        """A workflow run moved: the sweep repository it belongs to, updated."""
        run = await self._match(event)
        if run is None:
            return None
        if run.run_attempt is not None and event.run_attempt < run.run_attempt:
            return run  # an older attempt's late news
        if event.status == "completed":
            changes: dict[str, Any] = {
                "state": "completed",
                "conclusion": event.conclusion,
                "finished_at": self.clock.now(),
            }
        else:
            state = (
                "queued"
                if event.status in ("queued", "requested", "waiting", "pending")
                else "in_progress"
            )
            changes = {"state": state, "conclusion": None, "finished_at": None}
            if run.state in FINAL:  # a re-run: followed to its end again
                changes["deadline_at"] = self.clock.now() + self.settings.sweep_timeout
        changes |= {"run_id": event.run_id, "run_attempt": event.run_attempt}
        if event.url:
            changes["run_url"] = event.url
        await self.store.update_sweep_run(run.sweep_id, run.repo, changes, at=self.clock.now())
        if changes["state"] in FINAL:
            await self.pump()
            await self.finish_if_done(run.sweep_id)
        return run

    async def _match(self, event: WorkflowRunEvent) -> SweepRun | None:
        """By the run id the dispatch returned; else, where the dispatch named no run, by
        the sweep id in the run's title; else the oldest dispatch of that workflow that
        the run could have come from."""
        found = await self.store.sweep_run_by_run_id(event.run_id)
        if found is not None:
            return found
        if event.event != "workflow_dispatch":
            return None
        candidates = await self.store.unmatched_sweep_runs(event.repo)
        titled = [r for r in candidates if r.sweep_id in event.display_title]
        if titled:
            return titled[0]
        workflow = event.workflow_path.rsplit("/", 1)[-1]
        for run in candidates:
            if run.workflow != workflow or run.dispatched_at is None:
                continue
            if event.created_at is None or (
                run.dispatched_at - MATCH_MARGIN
                <= event.created_at
                <= run.dispatched_at + MATCH_WINDOW
            ):
                return run
        return None

    async def expire(self) -> int:
        """Repositories past their timeout are marked timed out."""
        now = self.clock.now()
        expired = 0
        for sweep in await self.store.live_sweeps():
            for run in await self.store.sweep_runs(sweep.sweep_id):
                if (
                    run.state in IN_FLIGHT
                    and run.deadline_at is not None
                    and run.deadline_at <= now
                ):
                    changed = await self.store.update_sweep_run(
                        run.sweep_id,
                        run.repo,
                        {
                            "state": "timed_out",
                            "error": f"no result within {self.settings.sweep_timeout}",
                            "finished_at": now,
                        },
                        states=IN_FLIGHT,
                        at=now,
                    )
                    expired += changed
            await self.finish_if_done(sweep.sweep_id)
        if expired:
            await self.pump()
        return expired

    async def finish_if_done(self, sweep_id: str) -> bool:
        view = await self.view(sweep_id)
        if view.sweep.state not in ("pending", "running"):
            return False
        if any(r.state not in FINAL for r in view.runs):
            return False
        effects = (
            await self.reporter.finished(view.sweep, view.runs) if self.reporter is not None else []
        )
        counts = view.counts
        failed = sum(
            n for outcome, n in counts.items() if outcome not in ("success", "skipped", "neutral")
        )
        events = await self.store.finish_sweep(
            sweep_id,
            "completed",
            self.clock.now(),
            keep_events=self.bus.keep,
            data={
                "sweepId": sweep_id,
                "rolloutId": view.sweep.rollout_id,
                "repositories": len(view.runs),
                "counts": counts,
                "failed": failed,
            },
            effects=effects,
        )
        self.bus.deliver(events)
        if effects and self.effects_written is not None:
            self.effects_written()
        for listener in self.finished:
            listener(sweep_id)
        log.info("sweep %s completed: %s", sweep_id, counts)
        return bool(events)

    # -- the gate ---------------------------------------------------------------------------

    async def hold(self, rollout: Rollout) -> str | None:
        """Why a rollout must stay at its stage for its sweeps (UPDATE_PIPELINE_SWEEP_GATE):
        a sweep of it started during the stage still runs, or the latest one had more
        repositories fail than the gate allows. None when nothing holds it."""
        gate = self.settings.sweep_gate
        started = rollout.stage_started_at
        if gate is None or started is None:
            return None
        for sweep in await self.store.rollout_sweeps(rollout.rollout_id):
            if sweep.created_at < started:
                return None  # only sweeps that ran during this stage count
            if sweep.state in ("pending", "running"):
                return f"waiting for sweep {sweep.sweep_id} to finish"
            runs = await self.store.sweep_runs(sweep.sweep_id)
            bad = sum(1 for r in runs if not (r.state == "completed" and r.conclusion == "success"))
            if runs and bad / len(runs) > gate:
                return (
                    f"sweep {sweep.sweep_id}: {bad} of {len(runs)} repositories did not"
                    f" succeed, more than the gate's {gate:.0%}"
                )
            return None
        return None

    # -- reading ----------------------------------------------------------------------------

    async def view(self, sweep_id: str) -> SweepView:
        sweep = await self.store.get_sweep(sweep_id)
        if sweep is None:
            raise SweepNotFound(f"no sweep {sweep_id!r}")
        return SweepView(sweep, tuple(await self.store.sweep_runs(sweep_id)))


class SweepManager:
    """Pipeline component: dispatches as room frees up, times out runs that never
    finish, and completes sweeps; woken by changes, and at the next deadline. Deadlines
    are stored, so they survive restarts."""

    name = "sweeps"

    def __init__(self, service: SweepService) -> None:
        self.service = service

    async def start(self, pipeline: UpdatePipeline) -> None:
        pipeline.spawn(self.name, self._loop())

    async def stop(self) -> None:
        return None

    async def _loop(self) -> None:
        service = self.service
        if service.configs is not None:
            # Read the opt-in files of repositories never read, so the first sweep does
            # not wait for them.
            await service.configs.read_unread()
        while True:
            service.wake.clear()
            try:
                if service.reporter is not None:
                    await service.expire()
                    await service.pump()
                    for sweep in await service.store.live_sweeps():
                        await service.finish_if_done(sweep.sweep_id)
                due = await service.store.next_sweep_deadline()
            except StoreBusy as exc:
                # Another process holds the database; dispatches wait a moment.
                log.warning("sweeps: %s; trying again in %.0fs", exc, BUSY_PAUSE)
                await asyncio.sleep(BUSY_PAUSE)
                continue
            wait = RECHECK.total_seconds()
            if due is not None:
                wait = min(wait, max(0.0, (due - service.clock.now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(service.wake.wait(), max(wait, 0.05))
