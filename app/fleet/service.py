"""The fleet's domain core: heartbeats counted once, organisations, and the build each
runner should run. Everything the heartbeat path needs is held in memory; a change of an
org, a channel or the known-good builds refreshes it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from cachetools import LRUCache

from app.clock import Clock
from app.config import Settings
from app.fleet.cohorts import bucket
from app.logs import get_logger
from app.pipeline import CHANNELS
from app.pipeline.periodic import Periodic
from app.rollouts.gates import Counts, StageTally, Thresholds
from app.store import (
    BuildRecord,
    Heartbeat,
    Inclusion,
    Org,
    Rollout,
    RunnerState,
    Settled,
    Store,
    StoreError,
)

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


@dataclass(frozen=True, slots=True)
class LiveRollout:
    """A rollout still moving, as the heartbeat path needs it: the orgs it included, and
    the build each ran before (what a rollback gives back)."""

    rollout: Rollout
    included: frozenset[str]
    previous: Mapping[str, str | None] = field(default_factory=dict)

    def including(
        self, inclusions: Sequence[Inclusion], rollout: Rollout | None = None
    ) -> LiveRollout:
        previous = {**self.previous, **{i.org_id: i.previous_build_id for i in inclusions}}
        return LiveRollout(rollout or self.rollout, frozenset(previous), previous)

    def counts_as_baseline(self, build_id: str) -> bool:
        previous = self.rollout.previous_build_id
        return build_id == previous if previous is not None else build_id != self.rollout.build_id


@dataclass
class FleetState:
    orgs: dict[str, Org] = field(default_factory=dict)
    recommended: dict[str, str] = field(default_factory=dict)
    good_builds: list[BuildRecord] = field(default_factory=list)  # newest first
    live: dict[str, LiveRollout] = field(default_factory=dict)  # by channel
    settled: dict[str, Settled] = field(default_factory=dict)  # by org


def eligible(org: Org, channel: str) -> bool:
    """Whether a rollout on ``channel`` moves the org through its stages: on the channel,
    not pinned in any way, and not an enterprise org (those wait for approval)."""
    return (
        org.channel == channel
        and org.pinned_build_id is None
        and not org.version_pins
        and not org.approval_required
    )


def thresholds(settings: Settings) -> Thresholds:
    return Thresholds(
        settings.max_failure_rate, settings.max_disconnect_rate, settings.min_session_count
    )


# Called after a heartbeat's sessions were committed and added to a live rollout's stage.
OnCounted = Callable[[LiveRollout, StageTally], Awaitable[None]]
# Called for an eligible org a live rollout's stage takes in but has not included (it
# appeared after the stage began); its inclusion once written.
OnJoining = Callable[[LiveRollout, Org, str | None], Awaitable[Inclusion | None]]


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
        self._state: FleetState | None = None
        # Each live rollout's current stage, counted as heartbeats commit; kept across
        # reloads of the state, read from the store only when first needed.
        self._tallies: dict[tuple[str, int], StageTally] = {}
        self.on_counted: OnCounted | None = None
        self.on_joining: OnJoining | None = None
        self._loading: asyncio.Lock = asyncio.Lock()
        self._runners: LRUCache[tuple[str, str], _Last] = LRUCache(maxsize=RUNNER_CACHE)
        self.poll_after_seconds = int(settings.heartbeat_interval.total_seconds())

    # -- the in-memory state ------------------------------------------------------------

    def forget_runners(self) -> None:
        """Drop the remembered counters (after old runners were pruned from the store)."""
        self._runners.clear()

    def invalidate(self) -> None:
        """Orgs, channels or known-good builds changed: reload before the next answer."""
        self._state = None

    async def current(self) -> FleetState:
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
                live: dict[str, LiveRollout] = {}
                for rollout in await self.store.live_rollouts():
                    inclusions = await self.store.rollout_orgs(rollout.rollout_id)
                    live[rollout.channel] = LiveRollout(rollout, frozenset()).including(inclusions)
                await self._keep_tallies(live)
                settled = await self.store.settled_orgs()
                self._state = FleetState(orgs, recommended, good, live, settled)
            return self._state

    async def _keep_tallies(self, live: Mapping[str, LiveRollout]) -> None:
        for each in live.values():
            await self._load_tally(each)
        current = {(r.rollout.rollout_id, r.rollout.stage) for r in live.values()}
        for key in [k for k in self._tallies if k not in current]:
            del self._tallies[key]

    async def rollout_changed(self, rollout: Rollout, added: Sequence[Inclusion] = ()) -> None:
        """A rollout changed (``added``: the orgs the change included). The rollout parts of
        the state are brought up to date and swapped in, instead of a full reload, which
        reads every org and stalls every heartbeat meanwhile; heartbeats in flight keep
        the state they hold."""
        async with self._loading:
            state = self._state
            if state is None:
                return  # the next heartbeat loads everything anyway
            recommended = {c.channel: c.build_id for c in await self.store.list_channels()}
            live = dict(state.live)
            settled = state.settled
            before = live.get(rollout.channel)
            if before is not None and before.rollout.rollout_id != rollout.rollout_id:
                before = None
            if rollout.state in ("pending", "rolling_out", "paused"):
                base = before or LiveRollout(rollout, frozenset())
                live[rollout.channel] = base.including(added, rollout)
            else:
                live.pop(rollout.channel, None)
                if before is None:  # not live before: read whom it included
                    inclusions = await self.store.rollout_orgs(rollout.rollout_id)
                    before = LiveRollout(rollout, frozenset()).including(inclusions)
                before = before.including(added)
                settled = self._settle(state, rollout, before, recommended)
            await self._keep_tallies(live)
            self._state = FleetState(state.orgs, recommended, state.good_builds, live, settled)

    @staticmethod
    def _settle(
        state: FleetState, rollout: Rollout, ended: LiveRollout, recommended: Mapping[str, str]
    ) -> dict[str, Settled]:
        """Where a rollout that just ended leaves orgs (what ``settled_orgs`` would read):
        a rollback restores its orgs' previous builds; setting the channel's recommended
        build (completion, or a rollback after it) ends older restores on that channel."""
        settled = dict(state.settled)
        channel = rollout.channel
        channel_set = rollout.state == "completed" or (
            state.recommended.get(channel) != recommended.get(channel)
        )
        if channel_set:
            for org_id, entry in list(settled.items()):
                if entry.restores and entry.channel == channel:
                    del settled[org_id]
        for org_id, previous in ended.previous.items():
            if rollout.state == "rolled_back":
                settled[org_id] = Settled(
                    rollout.rollout_id, "rolled_back", rollout.build_id, previous, True, channel
                )
            else:
                org = state.orgs.get(org_id)
                if org is not None and org.approval_required:
                    settled[org_id] = Settled(
                        rollout.rollout_id, "completed", rollout.build_id, previous, False, channel
                    )
        return settled

    async def _load_tally(self, live: LiveRollout) -> None:
        rollout = live.rollout
        key = (rollout.rollout_id, rollout.stage)
        if key in self._tallies:
            return
        tally = StageTally(thresholds(self.settings))
        for row in await self.store.stage_sessions(rollout.rollout_id, rollout.stage):
            counts = Counts(row.started, row.failed, row.disconnected)
            if row.org_id in live.included:
                if row.build_id == rollout.build_id:
                    tally.add(row.org_id, counts)
            elif live.counts_as_baseline(row.build_id):
                tally.add_baseline(counts)
        self._tallies[key] = tally

    def tally(self, rollout_id: str, stage: int) -> StageTally | None:
        """The current stage's live counts (None until the state has loaded them)."""
        return self._tallies.get((rollout_id, stage))

    # -- heartbeats ------------------------------------------------------------------------

    async def heartbeat(self, report: Report) -> Instruction:
        state = await self.current()
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
        await self._join(org, report.build_id, state)
        live, side = self._attribution(org, report.build_id, state)
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
                Heartbeat(
                    runner,
                    report.runtimes,
                    now,
                    counted,
                    rollout_id=live.rollout.rollout_id if live and side else "",
                    stage=live.rollout.stage if live and side else -1,
                    new_org=new_org,
                )
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
        if live is not None and side is not None and any(counted):
            tally = self._tallies.get((live.rollout.rollout_id, live.rollout.stage))
            if tally is not None:
                if side == "target":
                    tally.add(report.org_id, Counts(*counted))
                else:
                    tally.add_baseline(Counts(*counted))
                if self.on_counted is not None:
                    await self.on_counted(live, tally)
                    state = await self.current()  # it may have moved the rollout
        desired = self.desired_build(org, report.build_id, state)
        return Instruction(
            desired,
            org.channel,
            self._rollout_of(org, state),
            self.poll_after_seconds,
            counted=counted,
        )

    async def _join(self, org: Org, reported: str | None, state: FleetState) -> None:
        """An eligible org that appeared after its channel's rollout stage began joins it
        if its cohort bucket is in (or the stage has nobody yet), as it would have at the
        stage's start."""
        live = state.live.get(org.channel)
        if (
            live is None
            or self.on_joining is None
            or live.rollout.state != "rolling_out"
            or org.org_id in live.included
            or not eligible(org, live.rollout.channel)
        ):
            return
        if live.included and bucket(live.rollout.rollout_id, org.org_id) >= live.rollout.percentage:
            return
        joined = await self.on_joining(live, org, reported)
        if joined is not None and state.live.get(org.channel) is live:
            state.live[org.channel] = live.including([joined])

    @staticmethod
    def _attribution(
        org: Org, build_id: str | None, state: FleetState
    ) -> tuple[LiveRollout | None, str | None]:
        """Whose sessions a heartbeat's are: a live rollout's target (an included org on
        the target build), its baseline (an eligible org not yet included, on the previous
        build), or neither."""
        live = state.live.get(org.channel)
        if live is None or build_id is None:
            return live, None
        if org.org_id in live.included:
            return live, "target" if build_id == live.rollout.build_id else None
        if eligible(org, live.rollout.channel) and live.counts_as_baseline(build_id):
            return live, "baseline"
        return live, None

    @staticmethod
    def _rollout_of(org: Org, state: FleetState) -> str | None:
        live = state.live.get(org.channel)
        if live is not None and org.org_id in live.included and org.pinned_build_id is None:
            return live.rollout.rollout_id
        return None

    def desired_build(self, org: Org, reported: str | None, state: FleetState) -> str | None:
        """Pins win and nothing else moves a pinned org. Then a live rollout that included
        the org gives its target; an enterprise org otherwise keeps the build its last
        approved rollout gave it (or what it runs), never simply the channel's
        recommendation; a rollback restores the build an org ran before the rollout
        (until the channel's recommendation is set again); others get the channel's
        recommended build, and with none they stay."""
        if org.pinned_build_id is not None:
            return org.pinned_build_id
        if org.version_pins:
            matching = next((b for b in state.good_builds if _matches(b, org.version_pins)), None)
            return matching.build_id if matching else reported
        live = state.live.get(org.channel)
        if live is not None and org.org_id in live.included:
            return live.rollout.build_id
        settled = state.settled.get(org.org_id)
        if settled is not None and settled.restores and settled.previous_build_id is not None:
            return settled.previous_build_id
        if org.approval_required:
            if settled is not None and settled.state == "completed":
                return settled.build_id
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
