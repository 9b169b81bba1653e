"""VersionWatcher's core against scripted sources: what gets recorded and announced, how
often sources are asked, heartbeat versions, and handing versions to the canary."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta

import pytest

from app.clock import ManualClock
from app.pipeline.events import EventBus
from app.pipeline.version.watcher import (
    Release,
    SourceError,
    VersionWatcher,
)
from app.store import RuntimeVersionRecord, SqliteStore
from tests.conftest import START

PROVIDERS = ("claude_code", "codex", "gemini_cli")
INTERVAL = timedelta(minutes=5)


class ScriptedSource:
    """A source whose next answers a test sets; counts how often it was asked."""

    kind = "npm"

    def __init__(self, provider_id: str = "codex") -> None:
        self.provider_id = provider_id
        self.key = f"npm:{provider_id}"
        self.releases: list[Release] = []
        self.answers: list[object] = []  # queued one-off answers: None, an exception
        self.asked = 0

    def publish(self, version: str, at: datetime, *, prerelease: bool = False) -> None:
        self.releases.append(Release(version, at, prerelease, f"https://example.test/{version}"))

    async def fetch(self) -> list[Release] | None:
        self.asked += 1
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer  # type: ignore[return-value]
        return list(self.releases)


class Canary:
    def __init__(self) -> None:
        self.given: list[str] = []
        self.accepting = True

    async def version_ready(self, version: RuntimeVersionRecord) -> bool:
        if self.accepting:
            self.given.append(f"{version.provider_id} {version.version}")
        return self.accepting


@pytest.fixture
def source(clock: ManualClock) -> ScriptedSource:
    source = ScriptedSource()
    for n, version in enumerate(["0.1.0", "0.2.0", "0.3.0-beta.1", "0.2.1"]):
        source.publish(version, START - timedelta(days=10 - n))
    return source


@pytest.fixture
def bus(store: SqliteStore, clock: ManualClock) -> EventBus:
    return EventBus(store, clock)


@pytest.fixture
def make_watcher(store: SqliteStore, bus: EventBus, clock: ManualClock):
    def make(*sources: ScriptedSource, **options: object) -> VersionWatcher:
        options.setdefault("interval", INTERVAL)
        options.setdefault("polling", False)
        return VersionWatcher(
            store, bus, clock, PROVIDERS, sources, rng=random.Random(1), **options
        )

    return make


async def events(store: SqliteStore, type: str) -> list[dict[str, object]]:
    return [dict(e.data) for e in reversed(await store.list_events(types=[type], limit=1000))]


async def test_the_first_check_records_history_and_announces_only_the_newest(
    make_watcher, source: ScriptedSource, store: SqliteStore
) -> None:
    watcher = make_watcher(source)
    report = await watcher.check()

    (outcome,) = report.outcomes
    assert outcome.outcome == "new"
    assert sorted(outcome.new_versions) == ["0.2.1", "0.3.0-beta.1"]
    rows = await store.list_versions(provider_id="codex", before=None, limit=10)
    assert sorted(r.version for r in rows) == ["0.1.0", "0.2.0", "0.2.1", "0.3.0-beta.1"]
    assert {r.version for r in rows if r.baseline} == {"0.1.0", "0.2.0"}
    announced = await events(store, "new_version_detected")
    assert [(e["version"], e["prerelease"]) for e in announced] == [
        ("0.2.1", False),
        ("0.3.0-beta.1", True),
    ]


async def test_a_new_release_is_announced_exactly_once(
    make_watcher, source: ScriptedSource, store: SqliteStore, clock: ManualClock
) -> None:
    watcher = make_watcher(source)
    await watcher.check()
    source.publish("0.2.2", START)
    clock.advance(INTERVAL * 2)

    (outcome,) = (await watcher.check()).outcomes
    assert outcome.new_versions == ("0.2.2",)
    clock.advance(INTERVAL * 2)
    (again,) = (await watcher.check()).outcomes
    assert again.outcome == "unchanged"
    assert [e["version"] for e in await events(store, "new_version_detected")][-1:] == ["0.2.2"]
    assert len(await events(store, "new_version_detected")) == 3


async def test_old_releases_found_late_are_history_not_news(
    make_watcher, source: ScriptedSource, store: SqliteStore, clock: ManualClock
) -> None:
    watcher = make_watcher(source)
    await watcher.check()
    # A backport to an older line, and old releases a source only now lists.
    source.publish("0.1.1", START)
    source.publish("0.0.9", START - timedelta(days=30))
    source.publish("0.2.2", START)
    clock.advance(INTERVAL * 2)

    (outcome,) = (await watcher.check()).outcomes
    assert outcome.new_versions == ("0.2.2",)  # newer than anything announced
    history = {
        r.version
        for r in await store.list_versions(provider_id="codex", before=None, limit=20)
        if r.baseline
    }
    assert {"0.1.1", "0.0.9"} <= history


async def test_a_restart_announces_nothing_again(
    make_watcher, source: ScriptedSource, store: SqliteStore, clock: ManualClock
) -> None:
    await make_watcher(source).check()
    before = len(await events(store, "new_version_detected"))
    restarted = make_watcher(source)
    (outcome,) = (await restarted.check()).outcomes
    assert outcome.outcome == "unchanged"
    assert len(await events(store, "new_version_detected")) == before


async def test_two_checks_at_once_ask_the_source_once_and_record_once(
    make_watcher, source: ScriptedSource, store: SqliteStore
) -> None:
    watcher = make_watcher(source)
    first, second = await asyncio.gather(watcher.check(), watcher.check())
    assert source.asked == 1
    assert {first.outcomes[0].outcome, second.outcomes[0].outcome} == {"new", "skipped"}
    assert len(await store.list_versions(provider_id=None, before=None, limit=100)) == 4


async def test_a_source_is_asked_at_most_once_per_interval_even_by_hand(
    make_watcher, source: ScriptedSource, clock: ManualClock
) -> None:
    watcher = make_watcher(source)
    await watcher.check()
    clock.advance(INTERVAL / 2)
    (outcome,) = (await watcher.check()).outcomes
    assert outcome.outcome == "skipped" and source.asked == 1
    assert outcome.next_check_at is not None
    assert START + INTERVAL <= outcome.next_check_at <= START + INTERVAL * 1.1
    clock.advance(INTERVAL * 0.6)
    await watcher.check()
    assert source.asked == 2


async def test_not_modified_does_no_work(
    make_watcher, source: ScriptedSource, store: SqliteStore, clock: ManualClock
) -> None:
    watcher = make_watcher(source)
    await watcher.check()
    source.answers = [None]
    clock.advance(INTERVAL * 2)
    (outcome,) = (await watcher.check()).outcomes
    assert outcome.outcome == "not_modified"


@pytest.mark.parametrize(
    "bad",
    [
        [Release("1.0.0", START), Release("not-a-version", START)],
        [Release("1.0", START)],
    ],
)
async def test_an_answer_with_one_bad_version_records_nothing(
    make_watcher, source: ScriptedSource, store: SqliteStore, bad: list[Release]
) -> None:
    source.answers = [bad]
    (outcome,) = (await make_watcher(source).check()).outcomes
    assert outcome.outcome == "error" and "semantic version" in (outcome.error or "")
    assert await store.list_versions(provider_id=None, before=None, limit=10) == []


async def test_failures_back_off_exponentially_and_success_resets_them(
    make_watcher, source: ScriptedSource, clock: ManualClock
) -> None:
    watcher = make_watcher(source)
    source.answers = [SourceError("502 from the registry")] * 3
    waits = []
    for _ in range(3):
        (outcome,) = (await watcher.check()).outcomes
        assert outcome.outcome == "error"
        assert outcome.next_check_at is not None
        waits.append(outcome.next_check_at - clock.now())
        clock.advance(outcome.next_check_at - clock.now())
    assert waits == [INTERVAL, INTERVAL * 2, INTERVAL * 4]
    (outcome,) = (await watcher.check()).outcomes
    assert outcome.outcome == "new"
    assert outcome.next_check_at is not None
    assert outcome.next_check_at - clock.now() <= INTERVAL * 1.1  # back to the interval


async def test_backoff_is_capped(make_watcher, source: ScriptedSource, clock: ManualClock) -> None:
    watcher = make_watcher(source)
    source.answers = [SourceError("down")] * 12
    for _ in range(12):
        (outcome,) = (await watcher.check()).outcomes
        assert outcome.next_check_at is not None
        clock.advance(outcome.next_check_at - clock.now())
    assert outcome.next_check_at - (clock.now() - timedelta(hours=1)) <= timedelta(hours=1)


# -- heartbeats -----------------------------------------------------------------------


async def test_a_heartbeat_version_nobody_announced_is_drift_not_news(
    make_watcher, source: ScriptedSource, store: SqliteStore, clock: ManualClock
) -> None:
    watcher = make_watcher(source)
    assert await watcher.register_heartbeat_version("codex", "v9.9.9") is None
    assert await watcher.register_heartbeat_version("codex", "9.9.9") is None  # cached

    (drift,) = await events(store, "version_drift_detected")
    assert (drift["version"], drift["source"]) == ("9.9.9", "heartbeat")
    assert await events(store, "new_version_detected") == []
    (row,) = await store.list_versions(provider_id="codex", before=None, limit=5)
    assert row.released_at == START and row.announced_at is None
    assert (await store.status_counts(PROVIDERS)).versions["codex"] == []


async def test_drift_later_published_upstream_is_announced_then(
    make_watcher, source: ScriptedSource, store: SqliteStore, clock: ManualClock
) -> None:
    watcher = make_watcher(source)
    await watcher.check()
    await watcher.register_heartbeat_version("codex", "0.4.0")
    source.publish("0.4.0", START + timedelta(hours=1))
    clock.advance(INTERVAL * 2)

    (outcome,) = (await watcher.check()).outcomes
    assert outcome.new_versions == ("0.4.0",)
    (row,) = [
        r
        for r in await store.list_versions(provider_id="codex", before=None, limit=9)
        if r.version == "0.4.0"
    ]
    assert row.source == "npm" and row.released_at == START + timedelta(hours=1)


@pytest.mark.parametrize(
    ("provider", "version", "warning"),
    [
        ("nope", "1.0.0", "unknown provider"),
        ("codex", "latest", "not a semantic version"),
        ("codex", "1.2", "not a semantic version"),
    ],
)
async def test_bad_heartbeat_versions_are_dropped_with_a_warning(
    make_watcher, store: SqliteStore, provider: str, version: str, warning: str
) -> None:
    answer = await make_watcher().register_heartbeat_version(provider, version)
    assert answer is not None and warning in answer
    assert await store.list_versions(provider_id=None, before=None, limit=5) == []


async def test_many_heartbeats_reporting_one_new_version_write_once(
    make_watcher, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = make_watcher()
    writes = 0
    original = store.record_heartbeat_version

    async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal writes
        writes += 1
        await asyncio.sleep(0.01)
        return await original(*args, **kwargs)

    monkeypatch.setattr(store, "record_heartbeat_version", counted)
    answers = await asyncio.gather(
        *(watcher.register_heartbeat_version("gemini_cli", "1.0.0") for _ in range(50))
    )
    assert answers == [None] * 50
    assert writes == 1
    assert len(await events(store, "version_drift_detected")) == 1


# -- the canary --------------------------------------------------------------------------


async def test_new_versions_go_to_the_canary_once_they_are_old_enough_even_across_a_restart(
    make_watcher, source: ScriptedSource, store: SqliteStore, clock: ManualClock
) -> None:
    canary = Canary()
    options = {"auto_canary": True, "min_release_age": timedelta(days=3), "canary": canary}
    watcher = make_watcher(source, **options)
    await watcher.check()
    source.publish("0.2.2", clock.now())
    clock.advance(INTERVAL * 2)
    await watcher.check()

    # The history is never handed over; announced versions go once they are 3 days old.
    taken = await watcher.hand_over()
    assert sorted(v.version for v in taken) == ["0.2.1", "0.3.0-beta.1"]
    waiting = {
        r.version: watcher.canary_eligible_at(r)
        for r in await store.list_versions(provider_id="codex", before=None, limit=9)
    }
    assert waiting["0.2.2"] == START + timedelta(days=3)
    assert waiting["0.1.0"] is None

    clock.advance(timedelta(days=3))
    restarted = make_watcher(source, **options)
    assert [v.version for v in await restarted.hand_over()] == ["0.2.2"]
    assert await restarted.hand_over() == []  # handed over once
    assert len(canary.given) == 3


async def test_a_canary_that_declines_is_asked_again(make_watcher, source: ScriptedSource) -> None:
    canary = Canary()
    canary.accepting = False
    watcher = make_watcher(source, auto_canary=True, canary=canary)
    await watcher.check()
    assert await watcher.hand_over() == []
    canary.accepting = True
    assert len(await watcher.hand_over()) == 2
