"""The versions API: the design's list (section 4.2) and checking upstream by hand."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest

from app.clock import ManualClock
from app.pipeline.version.watcher import VersionWatcher
from tests.conftest import START, Api, MakeApi
from tests.test_version_watcher import INTERVAL, PROVIDERS, Canary, ScriptedSource


def watcher_for(api_services, *sources: ScriptedSource, **options: object) -> VersionWatcher:
    options.setdefault("interval", INTERVAL)
    options.setdefault("polling", False)
    return VersionWatcher(
        api_services.store,
        api_services.bus,
        api_services.clock,
        PROVIDERS,
        sources,
        rng=random.Random(3),
        **options,
    )


@pytest.fixture
def codex() -> ScriptedSource:
    source = ScriptedSource("codex")
    for n, version in enumerate(["0.9.0", "0.10.0", "0.11.0-alpha.1"]):
        source.publish(version, START - timedelta(days=5 - n))
    return source


async def make(make_api: MakeApi, *sources: ScriptedSource, **options: object) -> Api:
    return await make_api(build=lambda services: [watcher_for(services, *sources, **options)])


async def test_a_check_by_hand_reports_each_source_and_what_it_found(
    make_api: MakeApi, codex: ScriptedSource
) -> None:
    api = await make(make_api, codex)
    admin = await api.token("admin")
    response, body = await api.post("/versions/check", token=admin)
    assert response.status == 200
    (source,) = body["sources"]
    assert source["source"] == "npm:codex" and source["outcome"] == "new"
    assert source["newVersions"] == ["0.10.0", "0.11.0-alpha.1"]

    response, again = await api.post("/versions/check", token=admin)
    assert again["sources"][0]["outcome"] == "skipped"  # asked less than an interval ago
    assert again["sources"][0]["nextCheckAt"] is not None


async def test_versions_are_listed_newest_release_first_in_the_design_shape(
    make_api: MakeApi, codex: ScriptedSource
) -> None:
    api = await make(make_api, codex)
    await api.post("/versions/check", token=await api.token("admin"))
    viewer = await api.token("viewer")
    response, body = await api.get("/versions", token=viewer)
    assert response.status == 200
    assert [v["version"] for v in body["items"]] == ["0.11.0-alpha.1", "0.10.0", "0.9.0"]
    newest = body["items"][0]
    assert newest["providerId"] == "codex"
    assert newest["releasedAt"] == "2026-02-26T12:00:00.000Z"
    assert newest["sourceUrl"] == "https://example.test/0.11.0-alpha.1"
    assert (newest["canaryPassed"], newest["canaryPassedAt"]) == (False, None)
    assert (newest["prerelease"], newest["announced"]) == (True, True)
    assert body["items"][2]["canary"]["state"] == "history"


async def test_the_list_pages_and_filters_by_provider(
    make_api: MakeApi, codex: ScriptedSource
) -> None:
    gemini = ScriptedSource("gemini_cli")
    gemini.publish("1.0.0", START)
    api = await make(make_api, codex, gemini)
    await api.post("/versions/check", token=await api.token("admin"))
    viewer = await api.token("viewer")

    _, first = await api.get("/versions?limit=2", token=viewer)
    _, second = await api.get(f"/versions?limit=2&cursor={first['nextCursor']}", token=viewer)
    listed = [(v["providerId"], v["version"]) for v in first["items"] + second["items"]]
    assert len(set(listed)) == 4 and second["nextCursor"] is None
    _, only = await api.get("/versions?providerId=gemini_cli", token=viewer)
    assert [v["version"] for v in only["items"]] == ["1.0.0"]
    response, _ = await api.get("/versions?providerId=Not%20An%20Id", token=viewer)
    assert response.status == 400


async def test_a_waiting_version_says_when_it_may_go_to_the_canary(
    make_api: MakeApi, codex: ScriptedSource, clock: ManualClock
) -> None:
    api = await make(
        make_api, codex, auto_canary=True, min_release_age=timedelta(days=30), canary=Canary()
    )
    await api.post("/versions/check", token=await api.token("admin"))
    _, body = await api.get("/versions?providerId=codex", token=await api.token("viewer"))
    canary = body["items"][1]["canary"]  # 0.10.0, released 4 days before START
    assert canary == {
        "state": "waiting",
        "eligibleAt": "2026-03-27T12:00:00.000Z",
        "handedOverAt": None,
    }


async def test_checking_needs_admin_and_a_running_pipeline(
    make_api: MakeApi, settings, codex: ScriptedSource
) -> None:
    api = await make(make_api, codex)
    response, _ = await api.post("/versions/check", token=await api.token("viewer"))
    assert response.status == 403
    disabled = await make_api(settings_override=settings.replace(enabled=False))
    response, body = await disabled.post("/versions/check", token=await disabled.token("admin"))
    assert response.status == 503
    assert body["error"]["message"] == "Update pipeline is not enabled"


@pytest.mark.parametrize("polling", [True, False])
async def test_status_says_whether_the_watcher_polls(
    make_api: MakeApi, codex: ScriptedSource, polling: bool
) -> None:
    api = await make(make_api, codex, polling=polling)
    _, status = await api.get("/status", token=await api.token("viewer"))
    assert status["versionWatcherActive"] is polling
    if polling:  # one check right after start
        for _ in range(200):
            if codex.asked:
                break
            await asyncio.sleep(0.01)
        assert codex.asked == 1
    else:
        assert codex.asked == 0


async def test_auto_canary_without_a_canary_runner_keeps_the_service_ready(
    make_api: MakeApi, codex: ScriptedSource
) -> None:
    api = await make(make_api, codex, auto_canary=True)
    await api.post("/versions/check", token=await api.token("admin"))
    response, body = await api.get("/ready")
    assert response.status == 200, body
    _, versions = await api.get("/versions?providerId=codex", token=await api.token("viewer"))
    assert versions["items"][1]["canary"]["state"] == "waiting"
