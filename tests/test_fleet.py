"""Heartbeats and organisations: sessions counted once, which build each org should run,
and the fleet view."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app.clock import ManualClock
from app.config import Settings
from app.fleet.service import Report, new_sessions
from app.store import BuildRecord, RunnerState
from tests.conftest import START, Api

HEARTBEAT = "/heartbeat"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(max_body_bytes=64 * 1024)


def beat(
    started: int = 0,
    failed: int = 0,
    disconnected: int = 0,
    *,
    runner: str = "r-1",
    org: str = "org-1",
    boot: str = "b-1",
    build: str | None = "build-old",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "runnerId": runner,
        "orgId": org,
        "bootId": boot,
        "buildId": build,
        "runtimes": {"codex": "0.46.0"},
        "sessions": {"started": started, "failed": failed, "disconnected": disconnected},
        **extra,
    }


def counted(db_path: Path) -> tuple[int, int, int]:
    with sqlite3.connect(db_path) as db:
        row = db.execute(
            "SELECT coalesce(sum(started), 0), coalesce(sum(failed), 0),"
            " coalesce(sum(disconnected), 0) FROM session_counts"
        ).fetchone()
    return tuple(row)  # type: ignore[return-value]


@pytest.fixture
async def runner_token(api: Api) -> str:
    return await api.token("runner", org="org-1")


async def send(api: Api, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    response, answer = await api.post(HEARTBEAT, token=token, json=body)
    return response.status, answer


# -- counting ------------------------------------------------------------------------------


def test_only_what_is_new_within_a_boot_counts() -> None:
    last = RunnerState("r", "o", "b-1", None, 10, 2, 1)

    def report(started: int, failed: int, disconnected: int, boot: str = "b-1") -> Report:
        return Report("r", "o", boot, None, {}, started, failed, disconnected)

    assert new_sessions(None, report(5, 1, 0)) == (5, 1, 0)
    assert new_sessions(last, report(10, 2, 1)) == (0, 0, 0)  # a duplicate
    assert new_sessions(last, report(15, 2, 3)) == (5, 0, 2)
    assert new_sessions(last, report(4, 0, 0, boot="b-2")) == (4, 0, 0)  # a restart
    # Going back within a boot: an old heartbeat arriving late; it counts nothing.
    assert new_sessions(last, report(3, 0, 0)) is None
    assert new_sessions(last, report(12, 1, 1)) is None


async def test_duplicates_retries_and_restarts_count_each_session_once(
    api: Api, runner_token: str, db_path: Path
) -> None:
    assert (await send(api, runner_token, beat(10, 1, 1)))[0] == 200
    await send(api, runner_token, beat(10, 1, 1))  # retried
    await send(api, runner_token, beat(14, 1, 2))
    await send(api, runner_token, beat(3, 0, 0, boot="b-2"))  # the runner restarted
    assert counted(db_path) == (17, 1, 2)


async def test_an_old_heartbeat_arriving_late_counts_nothing_and_says_so(
    api: Api, runner_token: str, db_path: Path
) -> None:
    for started in (10, 12):
        await send(api, runner_token, beat(started))
    status, answer = await send(api, runner_token, beat(10))  # delayed, out of order
    assert status == 200
    assert any("went back" in w for w in answer["warnings"])
    await send(api, runner_token, beat(15))
    assert counted(db_path) == (15, 0, 0)


async def test_runner_ids_are_per_org(api: Api, db_path: Path) -> None:
    admin = await api.token("admin")
    for org in ("org-a", "org-b"):
        for started in (5, 10):
            await send(api, admin, beat(started, org=org, runner="runner-1"))
    assert counted(db_path) == (20, 0, 0)


async def test_concurrent_duplicates_count_once(api: Api, runner_token: str, db_path: Path) -> None:
    await asyncio.gather(*(send(api, runner_token, beat(7, 1, 0)) for _ in range(20)))
    assert counted(db_path) == (7, 1, 0)


async def test_failures_and_disconnects_are_separate(
    api: Api, runner_token: str, db_path: Path
) -> None:
    await send(api, runner_token, beat(10, failed=0, disconnected=4))
    assert counted(db_path) == (10, 0, 4)


async def test_a_runner_token_reports_only_for_its_org(api: Api, runner_token: str) -> None:
    status, body = await send(api, runner_token, beat(1, org="org-2"))
    assert status == 403
    assert "org-1" in body["error"]["message"]
    status, _ = await send(api, await api.token("admin"), beat(1, org="org-2"))
    assert status == 200
    status, _ = await send(api, await api.token("viewer"), beat(1))
    assert status == 403


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"runnerId": ""}, "runnerId"),
        ({"orgId": "x" * 200}, "orgId"),
        ({"sessions": {"started": -1, "failed": 0, "disconnected": 0}}, "started"),
        ({"sessions": {"started": 1, "failed": 0}}, "disconnected"),
        ({"sessions": {"started": 10**12, "failed": 0, "disconnected": 0}}, "started"),
        ({"unexpected": 1}, "unexpected"),
        ({"buildId": ""}, "buildId"),
    ],
)
async def test_a_malformed_heartbeat_is_refused_naming_the_field(
    api: Api, runner_token: str, db_path: Path, change: dict[str, Any], field: str
) -> None:
    status, body = await send(api, runner_token, {**beat(5), **change})
    assert status == 400
    assert field in body["error"]["message"]
    assert counted(db_path) == (0, 0, 0)


async def test_bad_runtime_versions_are_dropped_with_warnings_and_sessions_still_count(
    api: Api, runner_token: str, db_path: Path
) -> None:
    body = beat(6, runtimes={"codex": "latest", "nope": "1.0.0", "claude_code": "2.1.0"})
    status, answer = await send(api, runner_token, body)
    assert status == 200
    assert len(answer["warnings"]) == 2
    assert any("runtimes.codex" in w for w in answer["warnings"])
    assert counted(db_path) == (6, 0, 0)


# -- which build -----------------------------------------------------------------------------


async def known_good(api: Api, build_id: str, **runtimes: str) -> None:
    store = api.services.store
    await store.add_build(
        BuildRecord(build_id, "1.0.0", START, runtimes, known_good_for=list(runtimes)), START
    )


async def test_the_desired_build_for_every_kind_of_org(api: Api, runner_token: str) -> None:
    admin = await api.token("admin")
    await known_good(api, "build-new", codex="0.47.0")
    await known_good(api, "build-pin", codex="0.45.1")

    # No recommendation yet: stay on what you run.
    _, answer = await send(api, admin, beat(1, org="plain"))
    assert (answer["desiredBuildId"], answer["channel"]) == ("build-old", "stable")

    await api.request(
        "PUT",
        "/channels/stable",
        token=admin,
        json={"buildId": "build-new", "reason": "good"},
    )
    _, answer = await send(api, admin, beat(2, org="plain"))
    assert answer["desiredBuildId"] == "build-new"  # the cache saw the channel change

    for org, config, desired in [
        ("pinned", {"channel": "stable", "pinnedBuildId": "build-pin"}, "build-pin"),
        ("prefix", {"channel": "stable", "versionPins": {"codex": "0.45."}}, "build-pin"),
        ("nomatch", {"channel": "stable", "versionPins": {"codex": "9."}}, "build-old"),
        ("ent", {"channel": "stable", "enterprise": {"approvalRequired": True}}, "build-old"),
        ("betaorg", {"channel": "beta"}, "build-old"),
    ]:
        response, _ = await api.request("PUT", f"/orgs/{org}", token=admin, json=config)
        assert response.status == 200
        _, answer = await send(api, admin, beat(1, org=org, runner=f"r-{org}"))
        assert answer["desiredBuildId"] == desired, org


async def test_org_writes_are_validated(api: Api) -> None:
    admin = await api.token("admin")
    response, body = await api.request("PUT", "/orgs/o", token=admin, json={"channel": "nightly"})
    assert response.status == 400 and "channel" in body["error"]["message"]
    response, body = await api.request(
        "PUT", "/orgs/o", token=admin, json={"channel": "stable", "pinnedBuildId": "build-x"}
    )
    assert response.status == 400 and "pinnedBuildId" in body["error"]["message"]
    response, _ = await api.request(
        "PUT", "/orgs/o", token=await api.token("viewer"), json={"channel": "stable"}
    )
    assert response.status == 403
    response, body = await api.request(
        "PUT", "/orgs/new%20org", token=admin, json={"channel": "stable"}
    )
    assert response.status == 400 and "orgId" in body["error"]["message"]
    response, body = await api.request(
        "PUT", "/orgs/o", token=admin, json={"channel": "stable", "versionPins": {"aider": "1."}}
    )
    assert response.status == 400 and "aider" in body["error"]["message"]


async def test_orgs_are_created_on_their_first_heartbeat_and_listed(
    api: Api, runner_token: str
) -> None:
    admin = await api.token("admin")
    for n in range(3):
        await send(api, admin, beat(1, org=f"org-{n}", runner=f"r-{n}"))
    _, first = await api.get("/orgs?limit=2", token=admin)
    _, second = await api.get(f"/orgs?limit=2&cursor={first['nextCursor']}", token=admin)
    assert [o["orgId"] for o in first["items"] + second["items"]] == ["org-0", "org-1", "org-2"]
    assert first["items"][0]["channel"] == "stable"
    _, one = await api.get("/orgs/org-1", token=admin)
    assert one["enterprise"] == {"approvalRequired": False}
    response, _ = await api.get("/orgs/nobody", token=admin)
    assert response.status == 404


async def test_the_fleet_view_counts_runners_per_channel_and_build(api: Api) -> None:
    admin = await api.token("admin")
    await send(api, admin, beat(1, org="a", runner="r-1", build="build-x"))
    await send(api, admin, beat(1, org="a", runner="r-2", build="build-x"))
    await send(api, admin, beat(1, org="b", runner="r-3", build="build-y"))
    await send(api, admin, beat(1, org="b", runner="r-4", build=None))
    _, body = await api.get("/fleet", token=await api.token("viewer"))
    assert body["channels"]["stable"]["noBuild"] == 1
    assert body["builds"]["build-x"]["runners"] == 2
    assert body["builds"]["build-x"]["orgs"] == 1
    assert body["channels"]["stable"]["runners"] == 4


async def test_session_counts_older_than_the_retention_are_pruned(
    api: Api, runner_token: str, db_path: Path, clock: ManualClock
) -> None:
    from app.fleet.service import retention

    await send(api, runner_token, beat(5))
    clock.advance(timedelta(days=8))
    await send(api, runner_token, beat(9))
    await retention(api.services.fleet).work()
    assert counted(db_path) == (4, 0, 0)
    clock.advance(timedelta(days=8))  # the runner went quiet: it leaves the fleet view
    await retention(api.services.fleet).work()
    _, fleet = await api.get("/fleet", token=await api.token("viewer"))
    assert fleet["builds"] == {}


async def test_the_simulator_drives_the_real_service(api: Api, db_path: Path) -> None:
    from app.fleet.simulator import Simulator, SimulatorOptions

    admin = await api.token("admin")
    await known_good(api, "build-new", codex="0.47.0")
    await api.request(
        "PUT", "/channels/stable", token=admin, json={"buildId": "build-new", "reason": "go"}
    )
    url = str(api.client.make_url("/")).rstrip("/")
    options = SimulatorOptions(
        url=url, token=admin, runners=30, orgs=5, interval=0.05, duration=1.0, seed=7
    )
    api.services.fleet.poll_after_seconds = 0  # let the runners beat as often as asked
    report = await Simulator(options).run()
    assert report.succeeded and report.heartbeats.failed == 0
    # Every runner obeyed the recommendation: it restarted onto the new build.
    assert report.fleet == {"build-new": 30}
    _, fleet = await api.get("/fleet", token=admin)
    assert fleet["builds"]["build-new"]["runners"] == 30
    assert counted(db_path)[0] > 0
