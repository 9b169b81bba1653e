"""The fleet's domain core: heartbeats counted once, organisations, and the build each
runner should run. Everything the heartbeat path needs is held in memory; a change of an
org, a channel or the known-good builds refreshes it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from cachetools import LRUCache

from app.clock import Clock
from app.config import Settings
from app.logs import get_logger
from app.pipeline import CHANNELS
from app.pipeline.periodic import Periodic
from app.store import BuildRecord, Heartbeat, Org, RunnerState, Store, StoreError

log = get_logger("fleet")

POLL_AFTER_SECONDS = 30
# Last counters of this many runners stay in memory (about 0.5 KB each), as plain tuples
# of strings and ints, which the garbage collector stops tracking: 50,000 tracked
# objects made each full collection pause every request in flight for 30-50 ms.
RUNNER_CACHE = 100_000

_Last = tuple[str, str, int, int, int]  # org, boot, started, failed, disconnected


@dataclass(frozen=True, slots=True)
class Report:
    """One heartbeat as a runner sends it (validated by the API)."""

    runner_id: str
    org_id: str
    boot_id: str
    build_id: str | None
    runtimes: Mapping[str, str]
    started: int
    failed: int
    disconnected: int


@dataclass(frozen=True, slots=True)
class Instruction:
    desired_build_id: str | None
    channel: str
    rollout_id: str | None
    poll_after_seconds: int = POLL_AFTER_SECONDS
    warnings: tuple[str, ...] = ()
    counted: tuple[int, int, int] = (0, 0, 0)


@dataclass
class _State:
    orgs: dict[str, Org] = field(default_factory=dict)
    recommended: dict[str, str] = field(default_factory=dict)
    good_builds: list[BuildRecord] = field(default_factory=list)  # newest first


def new_sessions(last: RunnerState | None, report: Report) -> tuple[int, int, int] | None:
    """What a heartbeat adds: the positive difference from the last heartbeat of the same
    boot; a new boot starts from zero. None when a counter went back within a boot: that
    is an old heartbeat arriving late (or a runner that restarted without a new bootId),
    and counting it as a new boot would count its sessions twice."""
    now = (report.started, report.failed, report.disconnected)
    if last is None or last.boot_id != report.boot_id:
        return now
    before = (last.started, last.failed, last.disconnected)
    if any(n < b for n, b in zip(now, before, strict=True)):
        return None
    return (now[0] - before[0], now[1] - before[1], now[2] - before[2])


class Fleet:
    def __init__(self, store: Store, clock: Clock, settings: Settings) -> None:
        self.store = store
        self.clock = clock
        self.settings = settings
        self._state: _State | None = None
        self._loading: asyncio.Lock = asyncio.Lock()
        self._runners: LRUCache[tuple[str, str], _Last] = LRUCache(maxsize=RUNNER_CACHE)
        self.poll_after_seconds = POLL_AFTER_SECONDS

    # -- the in-memory state ------------------------------------------------------------

    def forget_runners(self) -> None:
        """Drop the remembered counters (after old runners were pruned from the store)."""
        self._runners.clear()

    def invalidate(self) -> None:
        """Orgs, channels or known-good builds changed: reload before the next answer."""
        self._state = None

    async def _current(self) -> _State:
        state = self._state
        if state is not None:
            return state
        async with self._loading:
            if self._state is None:
                orgs = {o.org_id: o for o in await self.store.all_orgs()}
                recommended = {c.channel: c.build_id for c in await self.store.list_channels()}
                good = [
                    b
                    for b in await self.store.list_builds(before=None, limit=500)
                    if b.runtime_versions and set(b.runtime_versions) <= set(b.known_good_for)
                ]
                self._state = _State(orgs, recommended, good)
            return self._state

    # -- heartbeats ------------------------------------------------------------------------

    async def heartbeat(self, report: Report) -> Instruction:
        state = await self._current()
        now = self.clock.now()
        org = state.orgs.get(report.org_id)
        new_org = None
        if org is None:
            org = Org(report.org_id, "stable", None, {}, False, now, now)
            state.orgs[report.org_id] = org
            new_org = org
        key = (report.org_id, report.runner_id)
        cached = self._runners.get(key)
        if cached is None:
            stored = await self.store.runner_state(report.org_id, report.runner_id)
            cached = self._runners.get(key)  # another heartbeat may have won meanwhile
            if cached is None and stored is not None:
                cached = _last(stored)
        last = _state(report.runner_id, cached) if cached is not None else None
        counted = new_sessions(last, report)
        if counted is None:
            assert last is not None
            desired = self.desired_build(org, report.build_id, state)
            warning = (
                f"sessions: counters went back within boot {report.boot_id[:128]!r}; not"
                " counted (an old heartbeat arriving late, or a restart without a new bootId)"
            )
            return Instruction(
                desired, org.channel, None, self.poll_after_seconds, warnings=(warning,)
            )
        runner = RunnerState(
            report.runner_id,
            report.org_id,
            report.boot_id,
            report.build_id,
            report.started,
            report.failed,
            report.disconnected,
        )
        # Updated before the write is awaited, so a concurrent duplicate of this heartbeat
        # counts nothing; put back if the write fails (its sender will retry).
        remembered = _last(runner)
        self._runners[key] = remembered
        try:
            await self.store.add_heartbeat(
                Heartbeat(runner, report.runtimes, now, counted, new_org=new_org)
            )
        except BaseException:
            if self._runners.get(key) is remembered:
                if cached is None:
                    self._runners.pop(key, None)
                else:
                    self._runners[key] = cached
            if new_org is not None and state.orgs.get(report.org_id) is new_org:
                del state.orgs[report.org_id]
            raise
        desired = self.desired_build(org, report.build_id, state)
        return Instruction(desired, org.channel, None, self.poll_after_seconds, counted=counted)

    def desired_build(self, org: Org, reported: str | None, state: _State) -> str | None:
        """Pinned orgs get their pin, and nothing else moves them; enterprise orgs get
        their pin or (with rollouts) what they approved, never simply the channel's
        recommendation; others the channel's recommended build; with none, they stay."""
        if org.pinned_build_id is not None:
            return org.pinned_build_id
        if org.version_pins:
            matching = next((b for b in state.good_builds if _matches(b, org.version_pins)), None)
            return matching.build_id if matching else reported
        if org.approval_required:
            return reported
        return state.recommended.get(org.channel, reported)

    # -- organisations ---------------------------------------------------------------------

    async def set_org(
        self,
        org_id: str,
        *,
        channel: str,
        pinned_build_id: str | None,
        version_pins: Mapping[str, str],
        approval_required: bool,
    ) -> Org:
        """Set an org's configuration as a whole (PUT); ValueError names a bad field."""
        if channel not in CHANNELS:
            raise ValueError(f"channel: {channel!r} is not one of {', '.join(CHANNELS)}")
        unknown = sorted(set(version_pins) - {p.id for p in self.settings.providers})
        if unknown:
            raise ValueError(f"versionPins: unknown provider(s) {', '.join(unknown)}")
        if pinned_build_id is not None and await self.store.get_build(pinned_build_id) is None:
            raise ValueError(f"pinnedBuildId: no build {pinned_build_id!r}")
        if pinned_build_id is not None and version_pins:
            raise ValueError("pin a build or version prefixes, not both")
        now = self.clock.now()
        existing = await self.store.get_org(org_id)
        org = Org(
            org_id,
            channel,
            pinned_build_id,
            dict(version_pins),
            approval_required,
            existing.created_at if existing else now,
            now,
        )
        await self.store.save_org(org)
        self.invalidate()
        return org


def _last(runner: RunnerState) -> _Last:
    return (runner.org_id, runner.boot_id, runner.started, runner.failed, runner.disconnected)


def _state(runner_id: str, last: _Last) -> RunnerState:
    org_id, boot_id, started, failed, disconnected = last
    return RunnerState(runner_id, org_id, boot_id, None, started, failed, disconnected)


def _matches(build: BuildRecord, pins: Mapping[str, str]) -> bool:
    return all(
        build.runtime_versions.get(provider, "").startswith(prefix)
        for provider, prefix in pins.items()
    )


def retention(fleet: Fleet) -> Periodic:
    """Pipeline component: session counts older than the retention period are deleted,
    hourly (the last heartbeat of each runner is kept, for the fleet view)."""

    async def prune() -> None:
        cutoff = fleet.clock.now() - fleet.settings.heartbeat_retention
        pruned = await fleet.store.prune_sessions(cutoff)
        fleet.forget_runners()
        if pruned:
            log.info("pruned %d hourly session counts older than %s", pruned, cutoff)

    return Periodic("heartbeat_retention", prune, timedelta(hours=1), survives=(StoreError,))
