"""Version discovery end to end: the watcher the server builds, asking a fake npm registry
found through npm's own configuration, and a fake GitHub's releases."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from app.clock import ManualClock
from app.config import Settings
from app.github.app import GitHubApp
from app.pipeline.events import EventBus
from app.pipeline.version.github_releases import GitHubReleasesSource
from app.pipeline.version.providers import BUILTIN_PROVIDERS, Provider
from app.pipeline.version.sources import upstream_sources
from app.pipeline.version.watcher import VersionWatcher
from app.store import Installation, Repository, SqliteStore
from tests.conftest import START
from tests.fake_github import FakeGitHub
from tests.fake_npm_registry import FakeNpmRegistry

INTERVAL = timedelta(minutes=10)
PACKAGES = [p.npm_package for p in BUILTIN_PROVIDERS]


@pytest.fixture
async def registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[FakeNpmRegistry]:
    async with FakeNpmRegistry() as fake:
        # npm's own configuration, as an operator would set it; nothing else can leak in.
        monkeypatch.setenv("npm_config_registry", fake.url)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.chdir(tmp_path)
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as opened:
        yield opened


def publish_history(registry: FakeNpmRegistry) -> None:
    for package in PACKAGES:
        assert package is not None
        for n, version in enumerate(["1.0.0", "1.1.0", "1.2.0-beta.1"]):
            tag = "next" if "beta" in version else None
            registry.publish(package, version, START - timedelta(days=3 - n), tag=tag)


async def watcher_for(
    settings: Settings,
    store: SqliteStore,
    clock: ManualClock,
    session: aiohttp.ClientSession,
    github: GitHubApp | None = None,
) -> VersionWatcher:
    sources = await upstream_sources(settings, session, github=github, store=store)
    return VersionWatcher(
        store,
        EventBus(store, clock),
        clock,
        [p.id for p in settings.providers],
        sources,
        interval=INTERVAL,
        polling=False,
        rng=random.Random(7),
    )


async def test_the_first_check_records_every_runtime_with_its_release_times(
    registry: FakeNpmRegistry,
    settings: Settings,
    store: SqliteStore,
    clock: ManualClock,
    session: aiohttp.ClientSession,
) -> None:
    publish_history(registry)
    watcher = await watcher_for(settings, store, clock, session)
    report = await watcher.check()

    assert [o.outcome for o in report.outcomes] == ["new", "new", "new"]
    rows = await store.list_versions(provider_id="claude_code", before=None, limit=10)
    assert {r.version: r.released_at for r in rows} == {
        "1.0.0": START - timedelta(days=3),
        "1.1.0": START - timedelta(days=2),
        "1.2.0-beta.1": START - timedelta(days=1),
    }
    beta = next(r for r in rows if r.version == "1.2.0-beta.1")
    assert beta.prerelease and beta.source == "npm"
    status = await store.status_counts([p.id for p in settings.providers])
    assert sorted(status.versions["codex"]) == ["1.0.0", "1.1.0"]  # stable ones only


async def test_an_unchanged_document_costs_a_304_and_no_write(
    registry: FakeNpmRegistry,
    settings: Settings,
    store: SqliteStore,
    clock: ManualClock,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish_history(registry)
    watcher = await watcher_for(settings, store, clock, session)
    await watcher.check()

    async def no_writes(*_: object, **__: object) -> None:
        raise AssertionError("a 304 must not write")

    monkeypatch.setattr(store, "record_versions", no_writes)
    clock.advance(INTERVAL * 2)
    report = await watcher.check()
    assert [o.outcome for o in report.outcomes] == ["not_modified"] * 3
    assert all("If-None-Match" in r.headers for r in registry.requests[-3:])


async def test_a_new_release_is_found_on_the_next_check(
    registry: FakeNpmRegistry,
    settings: Settings,
    store: SqliteStore,
    clock: ManualClock,
    session: aiohttp.ClientSession,
) -> None:
    publish_history(registry)
    watcher = await watcher_for(settings, store, clock, session)
    await watcher.check()
    registry.publish("@openai/codex", "1.1.1", START)
    clock.advance(INTERVAL * 2)

    report = await watcher.check()
    codex = next(o for o in report.outcomes if o.provider_id == "codex")
    assert codex.new_versions == ("1.1.1",)
    events = await store.list_events(types=["new_version_detected"], limit=100)
    assert sum(1 for e in events if e.data["version"] == "1.1.1") == 1


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500},
        {"status": None, "delay": 2.0},
        {"status": 200, "body": b'{"name": "broken'},
    ],
    ids=["500", "timeout", "malformed"],
)
async def test_a_failing_registry_records_nothing_backs_off_and_recovers(
    registry: FakeNpmRegistry,
    settings: Settings,
    store: SqliteStore,
    clock: ManualClock,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    fault: dict[str, object],
) -> None:
    from app.pipeline.version import npm

    monkeypatch.setattr(npm, "FETCH_TIMEOUT", 0.5)
    publish_history(registry)
    watcher = await watcher_for(settings, store, clock, session)
    registry.fail_next(3, **fault)  # type: ignore[arg-type]
    report = await watcher.check()
    assert [o.outcome for o in report.outcomes] == ["error"] * 3
    assert await store.list_versions(provider_id=None, before=None, limit=5) == []
    waits = {o.next_check_at - clock.now() for o in report.outcomes if o.next_check_at}
    assert waits == {INTERVAL}

    clock.advance(INTERVAL)
    report = await watcher.check()
    assert [o.outcome for o in report.outcomes] == ["new"] * 3


async def test_without_a_resolvable_registry_the_npm_sources_are_off_with_a_warning(
    settings: Settings,
    store: SqliteStore,
    clock: ManualClock,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in ("npm_config_registry", "NPM_CONFIG_REGISTRY", "npm_config_userconfig"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm to ask either
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        watcher = await watcher_for(settings, store, clock, session)
    assert (await watcher.check()).outcomes == []
    assert sum("no npm registry is configured" in r.getMessage() for r in caplog.records) == 3


async def test_github_releases_are_a_source_too(
    github: FakeGitHub,
    app_github: GitHubApp,
    installation: int,
    settings: Settings,
    store: SqliteStore,
    clock: ManualClock,
    session: aiohttp.ClientSession,
) -> None:
    await store.save_installation(
        Installation(installation, "acme", "Organization", False, [Repository(1, "acme/runner")]),
        clock.now(),
    )
    github.add_release("openai/codex", "rust-v0.46.0", created_at=START - timedelta(days=2))
    github.add_release("openai/codex", "rust-v0.47.0-alpha.1", prerelease=True, created_at=START)
    github.add_release("openai/codex", "rust-v0.48.0", draft=True, created_at=START)
    github.add_release("openai/codex", "nightly", created_at=START)
    codex = Provider("codex", None, github_repo="openai/codex")
    watcher = await watcher_for(
        settings.replace(providers=(codex,)), store, clock, session, github=app_github
    )

    (outcome,) = (await watcher.check()).outcomes
    assert outcome.source == "github:openai/codex"
    assert sorted(outcome.new_versions) == ["0.46.0", "0.47.0-alpha.1"]
    rows = await store.list_versions(provider_id="codex", before=None, limit=9)
    assert {(r.version, r.prerelease, r.source) for r in rows} == {
        ("0.46.0", False, "github"),
        ("0.47.0-alpha.1", True, "github"),
    }


async def test_a_github_source_without_any_installation_is_an_error_not_a_crash(
    github: FakeGitHub, app_github: GitHubApp, store: SqliteStore
) -> None:
    source = GitHubReleasesSource("codex", "openai/codex", app_github, store)
    with pytest.raises(Exception, match="not installed anywhere"):
        await source.fetch()
