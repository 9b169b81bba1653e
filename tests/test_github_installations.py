"""Installations: reconciled with GitHub (paginated), suspended ones left alone, events."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest

from app.config import Settings
from app.github.app import GitHubApp, InstallationSuspended
from app.github.installations import InstallationRegistry, InstallationSync
from app.pipeline import UpdatePipeline
from app.pipeline.events import EventBus
from app.store import Installation, Repository, SqliteStore

WEBHOOKS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "webhooks"


def payload(name: str) -> dict:
    return json.loads((WEBHOOKS / f"{name}.json").read_text())


@pytest.fixture
def registry(store: SqliteStore, app_github: GitHubApp, clock) -> InstallationRegistry:
    return InstallationRegistry(store, app_github, clock)


def names(installation: Installation) -> list[str]:
    return sorted(r.full_name for r in installation.repositories)


async def test_reconcile_follows_pagination_for_installations_and_repositories(
    github, registry: InstallationRegistry, store: SqliteStore
):
    many_repos = [f"acme/repo-{i:03d}" for i in range(230)]
    acme = github.add_installation(account="acme", repos=many_repos)
    others = [github.add_installation(account=f"org-{i}", repos=[f"org-{i}/r"]) for i in range(104)]

    await registry.reconcile()

    stored = {i.id: i for i in await store.list_installations()}
    assert set(stored) == {acme, *others}
    assert names(stored[acme]) == sorted(many_repos)
    assert stored[acme].account_login == "acme"
    assert names(stored[others[-1]]) == ["org-103/r"]
    assert len(github.calls("GET /app/installations")) == 2
    acme_pages = [
        c for c in github.calls("GET /installation/repositories") if c.installation_id == acme
    ]
    assert len(acme_pages) == 3  # 230 repositories, 100 a page


async def test_a_suspended_installation_gets_no_calls_and_keeps_what_was_known(
    github, registry: InstallationRegistry, store: SqliteStore, app_github: GitHubApp
):
    quiet = github.add_installation(account="quiet", repos=["quiet/app"])
    await registry.reconcile()
    github.suspend_installation(quiet)
    tokens_before = len(github.calls("POST /app/installations/{installation_id}/access_tokens"))

    await registry.reconcile()

    (stored,) = await store.list_installations()
    assert stored.suspended and names(stored) == ["quiet/app"]
    assert app_github.suspended == {quiet}
    tokens_after = len(github.calls("POST /app/installations/{installation_id}/access_tokens"))
    assert tokens_after == tokens_before
    with pytest.raises(InstallationSuspended):
        app_github.installation(quiet)


async def test_reconcile_forgets_installations_that_are_gone(
    github, registry: InstallationRegistry, store: SqliteStore, clock
):
    await store.save_installation(
        Installation(99, "gone", "Organization", False, (Repository(1, "gone/x"),)), clock.now()
    )
    kept = github.add_installation(account="kept", repos=["kept/y"])
    await registry.reconcile()
    assert [i.id for i in await store.list_installations()] == [kept]
    assert await store.installation_for_repository("gone/x") is None
    assert (await store.installation_for_repository("KEPT/Y")).id == kept  # type: ignore[union-attr]


async def test_installation_events_keep_the_tables_current(
    registry: InstallationRegistry, store: SqliteStore, app_github: GitHubApp
):
    created = payload("installation.created.0")
    await registry.on_installation("created", created)
    (installation,) = await store.list_installations()
    assert installation.id == created["installation"]["id"]
    assert installation.account_login == "Codertocat"
    assert names(installation) == ["Codertocat/Hello-World"]

    added = payload("installation_repositories.added.0")
    await registry.on_installation_repositories("added", added)
    (installation,) = await store.list_installations()
    assert names(installation) == ["Codertocat/Hello-World", "Codertocat/Space"]

    await registry.on_installation("suspend", {**created, "action": "suspend"})
    assert app_github.suspended == {installation.id}
    assert (await store.list_installations())[0].suspended
    await registry.on_installation("unsuspend", {**created, "action": "unsuspend"})
    assert app_github.suspended == set()

    removed = {**added, "repositories_removed": added["repositories_added"]}
    await registry.on_installation_repositories("removed", removed)
    assert names((await store.list_installations())[0]) == ["Codertocat/Hello-World"]

    await registry.on_installation("deleted", created)
    assert await store.list_installations() == []


async def test_a_suspend_event_for_an_unknown_installation_records_it_suspended(
    registry: InstallationRegistry, store: SqliteStore, app_github: GitHubApp
):
    event = payload("installation.suspend.0")
    await registry.on_installation("suspend", event)
    (installation,) = await store.list_installations()
    assert installation.suspended
    assert app_github.suspended == {event["installation"]["id"]}


async def test_the_sync_component_reconciles_at_start_and_survives_github_outages(
    github,
    registry: InstallationRegistry,
    store: SqliteStore,
    app_github: GitHubApp,
    settings: Settings,
    clock,
):
    github.add_installation(account="acme", repos=["acme/runner"])
    pipeline = UpdatePipeline(
        settings,
        store,
        EventBus(store, clock),
        clock,
        [InstallationSync(registry, interval=timedelta(milliseconds=50))],
    )
    await pipeline.start()
    try:
        for _ in range(200):
            if app_github.state == "ok":
                break
            await asyncio.sleep(0.01)
        assert app_github.state == "ok"
        assert len(await store.list_installations()) == 1

        github.inject("GET /app/installations", status=502, times=1000)
        for _ in range(300):
            if app_github.state.startswith("error"):
                break
            await asyncio.sleep(0.01)
        assert app_github.state.startswith("error")
        assert pipeline.health() is None  # the loop lives on
        assert len(await store.list_installations()) == 1  # nothing lost
    finally:
        await pipeline.stop()


async def test_a_client_obtained_before_a_suspension_stops_calling(
    github, registry: InstallationRegistry, app_github: GitHubApp
):
    acme = github.add_installation(account="acme", repos=["acme/runner"])
    client = app_github.installation(acme)
    await registry.on_installation(
        "suspend", {"installation": {"id": acme, "account": {"login": "acme"}}}
    )
    before = len(github.requests)
    with pytest.raises(InstallationSuspended):
        await client.getitem("/repos/acme/runner/topics")
    assert len(github.requests) == before
