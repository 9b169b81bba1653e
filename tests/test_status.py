"""/status, /health and /ready: design sections 4.1 and 9.3, computed from the store."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta

from app.pipeline import UpdatePipeline
from app.store import BuildRecord, FoundVersion, Rollout, RolloutChange
from tests.conftest import START, Api, MakeApi

STATUS_KEYS = {
    "running",
    "versionWatcherActive",
    "activeCanaryTests",
    "activeRollouts",
    "activeSweeps",
    "knownVersions",
    "recommendedBuilds",
    "frozen",
    "trackingIssues",
    "github",
}


class FailingComponent:
    name = "broken"

    async def start(self, pipeline: UpdatePipeline) -> None:
        raise RuntimeError("cannot reach the registry")

    async def stop(self) -> None:  # pragma: no cover - never started
        pass


class WorkerComponent:
    """Owns one background loop through the pipeline, like later components will."""

    name = "worker"

    def __init__(self) -> None:
        self.crash = asyncio.Event()
        self.stopped = False

    async def start(self, pipeline: UpdatePipeline) -> None:
        pipeline.spawn("worker-loop", self._loop())

    async def _loop(self) -> None:
        await self.crash.wait()
        raise ValueError("worker hit a bad row")

    async def stop(self) -> None:
        self.stopped = True


async def test_status_of_an_empty_pipeline_has_the_design_shape(api: Api):
    response, body = await api.get("/status", token=await api.token("viewer"))
    assert response.status == 200
    assert body == {
        "running": True,
        "versionWatcherActive": False,
        "activeCanaryTests": 0,
        "activeRollouts": 0,
        "activeSweeps": 0,
        "knownVersions": {"claude_code": None, "codex": None, "gemini_cli": None},
        "recommendedBuilds": {"stable": None, "beta": None},
        "frozen": None,
        "trackingIssues": "off",
        "github": "not configured",
    }


async def test_status_counts_what_the_store_holds(api: Api, db_path):
    store, at = api.services.store, START
    for provider, version in [
        ("claude_code", "1.2.3"),
        ("claude_code", "1.10.0"),
        ("claude_code", "2.0.0-beta.1"),
        ("codex", "0.9.0"),
        ("codex", "not-a-version"),
    ]:
        await store.record_versions(
            [FoundVersion(provider, version, at, "npm")], at, keep_events=100
        )
    for build in ("build-aaa", "build-bbb"):
        await store.add_build(BuildRecord(build, "1.0.0", at, {"codex": "0.9.0"}), at)
    # One active rollout per channel at most, and any number of finished ones.
    for i, (state, channel) in enumerate(
        [
            ("rolling_out", "stable"),
            ("paused", "beta"),
            ("completed", "stable"),
            ("rolled_back", "stable"),
        ]
    ):
        rollout = Rollout(f"r{i}", "build-aaa", channel, state, "10%:1h,100%", 0, 10, at, at)
        await store.write_rollout(RolloutChange(rollout, None, []), at, keep_events=100)
    for build in ("build-aaa", "build-bbb"):
        await store.set_channel("stable", build, at, reason="test", set_by="test", keep_events=9)
    # Rows in every state, written directly (sweeps have no writer yet).
    with sqlite3.connect(db_path) as db:
        db.executemany(
            "INSERT INTO canary_runs (id, build_id, state, attempt, created_at)"
            " VALUES (?, ?, ?, ?, 'x')",
            [
                ("c1", "build-aaa", "running", 2),
                ("c2", "build-bbb", "pending", 1),
                ("c3", "build-aaa", "passed", 1),
            ],
        )
        db.executemany(
            "INSERT INTO sweeps (id, state, created_at) VALUES (?, ?, 'x')",
            [("s1", "running"), ("s2", "completed")],
        )

    _, body = await api.get("/status", token=await api.token("admin"))
    assert body["activeRollouts"] == 2
    assert body["activeCanaryTests"] == 2
    assert body["activeSweeps"] == 1
    assert body["knownVersions"] == {
        "claude_code": "1.10.0",  # the newest stable: prereleases do not count
        "codex": "0.9.0",
        "gemini_cli": None,
    }
    assert body["recommendedBuilds"] == {"stable": "build-bbb", "beta": None}
    assert set(body) == STATUS_KEYS


async def test_disabled_pipeline_answers_the_design_503_bodies(make_api: MakeApi, settings):
    api = await make_api(settings_override=settings.replace(enabled=False))
    response, body = await api.get("/status", token=await api.token("viewer"))
    assert response.status == 503
    assert body == {
        "error": {"code": "SERVICE_UNAVAILABLE", "message": "Update pipeline is not enabled"}
    }
    _, health = await api.get("/health")
    assert (health["enabled"], health["running"]) == (False, False)
    response, ready = await api.get("/ready")
    assert response.status == 200
    assert ready == {"ready": True, "checks": {"database": "ok", "pipeline": "disabled"}}


async def test_status_still_requires_a_token_when_disabled(make_api: MakeApi, settings):
    api = await make_api(settings_override=settings.replace(enabled=False))
    response, _ = await api.get("/status")
    assert response.status == 401


async def test_pipeline_that_fails_to_start_leaves_the_api_up_and_says_so(make_api: MakeApi):
    api = await make_api(components=[FailingComponent()])
    response, body = await api.get("/status", token=await api.token("viewer"))
    assert response.status == 503
    assert body == {
        "error": {"code": "SERVICE_UNAVAILABLE", "message": "Update pipeline status unavailable"}
    }
    _, health = await api.get("/health")
    assert health["enabled"] is False
    response, ready = await api.get("/ready")
    assert response.status == 503
    assert ready["error"]["code"] == "NOT_READY"
    assert "cannot reach the registry" in ready["error"]["message"]


async def test_status_unavailable_when_the_store_cannot_answer(api: Api, monkeypatch):
    async def broken(_providers):
        raise sqlite3.OperationalError("disk I/O error")

    viewer = await api.token("viewer")
    monkeypatch.setattr(api.services.store, "status_counts", broken)
    response, body = await api.get("/status", token=viewer)
    assert response.status == 503
    assert body["error"]["message"] == "Update pipeline status unavailable"


async def test_health_reports_enabled_running_and_the_clock(api: Api, clock):
    clock.advance(timedelta(seconds=90))
    response, body = await api.get("/health")
    assert response.status == 200
    assert body == {"enabled": True, "running": True, "timestamp": "2026-03-01T12:01:30.000Z"}


async def test_ready_turns_503_when_a_background_worker_dies(make_api: MakeApi):
    worker = WorkerComponent()
    api = await make_api(components=[worker])
    response, body = await api.get("/ready")
    assert response.status == 200
    assert body["checks"] == {"database": "ok", "pipeline": "ok"}

    worker.crash.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if api.services.pipeline and api.services.pipeline.health():
            break
    response, body = await api.get("/ready")
    assert response.status == 503
    assert "worker-loop: ValueError: worker hit a bad row" in body["error"]["message"]


async def test_ready_turns_503_when_the_database_stops_answering(api: Api, monkeypatch):
    async def hang():
        await asyncio.sleep(60)

    monkeypatch.setattr("app.api.system.READY_DB_TIMEOUT_SECONDS", 0.05)
    monkeypatch.setattr(api.services.store, "ping", hang)
    response, body = await api.get("/ready")
    assert response.status == 503
    assert body["error"]["message"].startswith("database is not answering")
