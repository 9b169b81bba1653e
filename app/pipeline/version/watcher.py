"""VersionWatcher: finds new runtime versions upstream and in runners' heartbeats.

Sources (the npm registry, GitHub releases) are asked at most once per poll interval
each, whoever triggers the check, with an exponential back-off after failures. What they
report is recorded once per (provider, version); the store writes the row and its
``new_version_detected`` event in one transaction. Only versions newer than every version
already announced for the provider are announced; older ones found later (a provider's
history on its first check, old releases a newly added source lists) are recorded
quietly as history, with no event and no canary, so a first start does not announce
hundreds of old releases. With auto-canary on, announced versions are handed to the canary once they
are older than the minimum release age.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from app.clock import Clock, isoformat
from app.logs import get_logger
from app.pipeline.events import EventBus
from app.pipeline.version.semver import Version
from app.store import FoundVersion, RuntimeVersionRecord, Store

if TYPE_CHECKING:
    from app.pipeline import UpdatePipeline

log = get_logger("pipeline.versions")

NAME = "version_watcher"
JITTER = 0.1  # a poll waits the interval plus up to 10% more, so fleets of them spread out
BACKOFF_CEILING = timedelta(hours=1)
HANDOFF_RECHECK = timedelta(minutes=1)


class SourceError(Exception):
    """A source could not give a usable answer; nothing is recorded from it."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, when upstream asked for a pause


@dataclass(frozen=True, slots=True)
class Release:
    version: str
    released_at: datetime
    prerelease: bool = False
    source_url: str | None = None


class Source(Protocol):
    """One upstream place a provider's versions come from."""

    @property
    def key(self) -> str:
        """Unique among sources, e.g. ``npm:@openai/codex``."""
        ...

    @property
    def kind(self) -> str:
        """``npm`` or ``github``: recorded as the version's source."""
        ...

    @property
    def provider_id(self) -> str: ...

    async def fetch(self) -> list[Release] | None:
        """Every release the source knows, or None when nothing changed since the last
        successful fetch. Raises ``SourceError`` for an unusable answer."""
        ...


class CanaryHandoff(Protocol):
    async def version_ready(self, version: RuntimeVersionRecord) -> bool:
        """Take a version for canary testing; False to be asked again later."""
        ...


@dataclass
class _SourceState:
    source: Source
    next_allowed: float = 0.0  # monotonic seconds
    failures: int = 0
    last_checked_at: datetime | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class SourceOutcome:
    source: str
    provider_id: str
    outcome: str  # new, unchanged, not_modified, skipped, error
    new_versions: tuple[str, ...] = ()
    error: str | None = None
    next_check_at: datetime | None = None


@dataclass
class CheckReport:
    checked_at: datetime
    outcomes: list[SourceOutcome] = field(default_factory=list)


class VersionWatcher:
    name = NAME

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        clock: Clock,
        providers: Sequence[str],
        sources: Sequence[Source],
        *,
        load_sources: Callable[[], Awaitable[Sequence[Source]]] | None = None,
        interval: timedelta,
        polling: bool,
        auto_canary: bool = False,
        min_release_age: timedelta = timedelta(0),
        canary: CanaryHandoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        # (source kind, outcome) -> checks, for the metrics endpoint.
        self.poll_outcomes: Counter[tuple[str, str]] = Counter()
        self.providers = frozenset(providers)
        self.interval = interval
        self.polling = polling
        self.auto_canary = auto_canary
        self.min_release_age = min_release_age
        self.canary = canary
        self.rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._sources = [_SourceState(source) for source in sources]
        # Sources that take I/O to find (npm's configuration) are found at start, where
        # a failure is the pipeline's start failing, not the service's.
        self._load_sources = load_sources
        self._check_lock = asyncio.Lock()
        # (provider, version) -> announced by a source (False: only runners reported it).
        # Kept in memory so that the heartbeat path writes only for what is new.
        self._known: dict[tuple[str, str], bool] | None = None
        self._recording: dict[tuple[str, str], asyncio.Future[str | None]] = {}
        self._handoff_wake = asyncio.Event()
        self._poll_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, pipeline: UpdatePipeline) -> None:
        if self._load_sources is not None:
            self._sources += [_SourceState(s) for s in await self._load_sources()]
            self._load_sources = None
        await self._load()
        if self.polling:
            if not self._sources:
                log.warning("polling is on but no version source is available")
            self._poll_task = pipeline.spawn("version-poll", self._poll())
        if self.auto_canary and self.canary is None:
            log.warning(
                "UPDATE_PIPELINE_AUTO_CANARY is on but no canary runner is available;"
                " new versions wait until one is"
            )
        elif self.auto_canary:
            pipeline.spawn("version-canary-handoff", self._handoff())

    async def stop(self) -> None:
        return None

    @property
    def active(self) -> bool:
        """Polling runs (for ``versionWatcherActive`` in /status)."""
        return self._poll_task is not None and not self._poll_task.done()

    async def _load(self) -> dict[tuple[str, str], bool]:
        if self._known is None:
            self._known = await self.store.version_pairs()
        return self._known

    # -- checking sources ---------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await self.check()
            now = self.clock.monotonic()
            due = min((s.next_allowed for s in self._sources), default=now + 60.0)
            await asyncio.sleep(max(1.0, due - now))

    async def check(self) -> CheckReport:
        """Ask every source that may be asked now; the others are reported skipped.
        Checks run one at a time, so two at once cannot both ask a source."""
        async with self._check_lock:
            report = CheckReport(self.clock.now())
            # Sources are independent (each has its own state and upstream): asked
            # together, a start with several providers is as quick as its slowest one.
            outcomes = await asyncio.gather(*(self._check_source(s) for s in self._sources))
            report.outcomes.extend(outcomes)
            for outcome in outcomes:
                kind = outcome.source.split(":", 1)[0]
                self.poll_outcomes[(kind, outcome.outcome)] += 1
            return report

    async def _check_source(self, state: _SourceState) -> SourceOutcome:
        source = state.source
        now = self.clock.monotonic()
        if now < state.next_allowed:
            return SourceOutcome(
                source.key,
                source.provider_id,
                "skipped",
                error=state.last_error if state.failures else None,
                next_check_at=self._wall(state.next_allowed),
            )
        wait = self.interval.total_seconds() * (1 + self.rng.uniform(0, JITTER))
        state.next_allowed = now + wait
        state.last_checked_at = self.clock.now()
        try:
            releases = await source.fetch()
            found = self._validated(source, releases or [])
        except SourceError as exc:
            return self._failed(state, str(exc), retry_after=exc.retry_after)
        except Exception as exc:
            log.exception("version source %s failed unexpectedly", source.key)
            return self._failed(state, f"{type(exc).__name__}: {exc}")
        state.failures, state.last_error = 0, None
        next_at = self._wall(state.next_allowed)
        if releases is None:
            return SourceOutcome(
                source.key, source.provider_id, "not_modified", next_check_at=next_at
            )
        new = await self._record(source, found)
        outcome = "new" if new else "unchanged"
        return SourceOutcome(
            source.key, source.provider_id, outcome, tuple(new), next_check_at=next_at
        )

    def _failed(
        self, state: _SourceState, error: str, *, retry_after: float | None = None
    ) -> SourceOutcome:
        state.failures += 1
        state.last_error = error
        ceiling = max(self.interval, BACKOFF_CEILING).total_seconds()
        delay = min(ceiling, self.interval.total_seconds() * 2 ** min(state.failures - 1, 20))
        # Upstream's own Retry-After is honoured, up to a day.
        delay = max(delay, min(retry_after or 0.0, 86400.0))
        state.next_allowed = self.clock.monotonic() + delay
        log.warning(
            "version source %s failed (%d in a row), next try in %.0fs: %s",
            state.source.key,
            state.failures,
            delay,
            error,
        )
        return SourceOutcome(
            state.source.key,
            state.source.provider_id,
            "error",
            error=error,
            next_check_at=self._wall(state.next_allowed),
        )

    def _wall(self, monotonic: float) -> datetime:
        return self.clock.now() + timedelta(seconds=monotonic - self.clock.monotonic())

    def _validated(self, source: Source, releases: Sequence[Release]) -> list[Release]:
        """Every release must be a semantic version, or the whole answer is refused: a
        source answering junk must not create a single phantom version."""
        checked = []
        for release in releases:
            try:
                version = Version(release.version)
            except ValueError:
                raise SourceError(f"{release.version!r} is not a semantic version") from None
            checked.append(
                Release(
                    version.canonical,
                    release.released_at,
                    release.prerelease or bool(version.prerelease),
                    release.source_url,
                )
            )
        return checked

    async def _record(self, source: Source, releases: Sequence[Release]) -> list[str]:
        known = await self._load()
        provider = source.provider_id
        fresh = sorted(
            (r for r in releases if not known.get((provider, r.version), False)),
            key=lambda r: Version(r.version),
        )
        if not fresh:
            return []
        # News is what is newer than what was announced before on its track: a stable
        # release beyond the newest stable one, a prerelease beyond everything. A
        # provider's first answer announces its newest stable release (and a newer
        # prerelease); a backport, or old releases a source lists late, are history.
        before = [Version(v) for (p, v), announced in known.items() if announced and p == provider]
        if before:
            stable = max((v for v in before if not v.prerelease), default=None)
            newest_any = max(before)
            announced = {
                r.version
                for r in fresh
                if (
                    Version(r.version) > newest_any
                    if r.prerelease
                    else stable is None or Version(r.version) > stable
                )
            }
        else:
            announced = _newest_per_track(fresh)
        found = [
            FoundVersion(
                provider,
                r.version,
                r.released_at,
                source.kind,
                r.source_url,
                r.prerelease,
                baseline=r.version not in announced,
            )
            for r in fresh
        ]
        events = await self.store.record_versions(
            found, self.clock.now(), keep_events=self.bus.keep
        )
        for r in fresh:
            known[(provider, r.version)] = True
        self.bus.deliver(events)
        new = [str(e.data["version"]) for e in events]
        for version in new:
            log.info("new %s version %s (from %s)", provider, version, source.kind)
        if len(fresh) > len(new):
            log.info("recorded %d older %s version(s) as history", len(fresh) - len(new), provider)
        if events:
            self._handoff_wake.set()
        return new

    # -- heartbeats ---------------------------------------------------------------------

    async def register_heartbeat_version(self, provider_id: str, version: str) -> str | None:
        """Record a version a runner reports (design section 3.3). Returns a warning for
        the heartbeat's answer when the report is dropped; None when it was taken.

        Known pairs cost a dictionary look-up: the hot path writes only for the first
        report of a version, and concurrent first reports share one write."""
        if provider_id not in self.providers:
            return f"unknown provider {provider_id[:100]!r}; version not recorded"
        try:
            canonical = Version(version).canonical
        except ValueError:
            return f"{version[:100]!r} is not a semantic version; not recorded"
        known = await self._load()
        key = (provider_id, canonical)
        if key in known:
            return None
        pending = self._recording.get(key)
        if pending is not None:  # another heartbeat is recording it right now
            return await asyncio.shield(pending)
        pending = asyncio.get_running_loop().create_future()
        # Nobody else may be waiting: mark an exception retrieved, it is raised below.
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._recording[key] = pending
        try:
            await self._record_heartbeat(key)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(None)
        finally:
            del self._recording[key]
        return None

    async def _record_heartbeat(self, key: tuple[str, str]) -> None:
        provider_id, version = key
        now = self.clock.now()
        event = await self.store.record_heartbeat_version(
            FoundVersion(provider_id, version, now, "heartbeat"), now, keep_events=self.bus.keep
        )
        known = await self._load()
        known.setdefault(key, False)
        if event is not None:
            self.bus.deliver([event])
            log.warning(
                "runners report %s %s, which no source has announced (drift)",
                provider_id,
                version,
            )

    # -- handing versions to the canary ---------------------------------------------------

    async def _handoff(self) -> None:
        while True:
            self._handoff_wake.clear()
            await self.hand_over()
            await self._wait_for_next_handoff()

    async def hand_over(self) -> list[RuntimeVersionRecord]:
        """Give the canary every announced version that is old enough; the ones taken."""
        assert self.canary is not None
        now = self.clock.now()
        taken = []
        for version in await self.store.versions_for_canary(now - self.min_release_age, limit=100):
            if await self.canary.version_ready(version):
                await self.store.mark_handed_to_canary(version.id, self.clock.now())
                taken.append(version)
                log.info("handed %s %s to the canary", version.provider_id, version.version)
        return taken

    async def _wait_for_next_handoff(self) -> None:
        wait = HANDOFF_RECHECK.total_seconds()
        oldest = await self.store.next_canary_eligible()
        if oldest is not None:
            until = (oldest + self.min_release_age - self.clock.now()).total_seconds()
            wait = min(wait, max(0.0, until))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._handoff_wake.wait(), max(wait, 0.05))

    def canary_eligible_at(self, version: RuntimeVersionRecord) -> datetime | None:
        """When a waiting version may be handed to the canary (None: not waiting)."""
        if not self.auto_canary or version.baseline or version.announced_at is None:
            return None
        if version.handed_to_canary_at is not None:
            return None
        return version.released_at + self.min_release_age

    def describe(self) -> list[dict[str, object]]:
        """Each source's state, for the API."""
        return [
            {
                "source": s.source.key,
                "providerId": s.source.provider_id,
                "lastCheckedAt": isoformat(s.last_checked_at) if s.last_checked_at else None,
                "failures": s.failures,
                "lastError": s.last_error,
            }
            for s in self._sources
        ]


def _newest_per_track(releases: Sequence[Release]) -> set[str]:
    """The newest stable release, and the newest prerelease when it is newer still."""
    ordered = list(releases)  # sorted by version already
    stable = [r for r in ordered if not r.prerelease]
    chosen = {stable[-1].version} if stable else set()
    if ordered and ordered[-1].prerelease:
        chosen.add(ordered[-1].version)
    return chosen
