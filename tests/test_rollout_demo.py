"""The demo the rollout docs describe, end to end: the real service on a short stage plan,
the simulator playing a fleet against it, a good build rolled out to every org and a bad
one pulled back automatically."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from app.fleet.simulator import SessionModel, Simulator, SimulatorOptions
from tests.service_process import ServiceProcess

RUNNERS, ORGS = 60, 12
SETTLE = 30.0  # seconds; each phase takes a few on an idle machine


def admin_token(service: ServiceProcess) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app", "token", "create", "--name", "demo", "--role", "admin"],
        env=service.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


async def call(
    session: aiohttp.ClientSession, service: ServiceProcess, method: str, path: str, **kw: Any
) -> Any:
    async with session.request(method, service.api_url(path), **kw) as response:
        body = await response.json()
        assert response.status < 300, (method, path, response.status, body)
        return body


async def known_good(session: aiohttp.ClientSession, service: ServiceProcess, build: str) -> None:
    """Registered, then passed by its canary: the way a build becomes known-good."""
    await call(
        session,
        service,
        "POST",
        "/builds",
        json={"buildId": build, "runnerVersion": "1.0.0", "runtimeVersions": {"codex": "0.47.0"}},
    )
    results = [{"name": f"t{n}", "provider": "codex", "status": "passed"} for n in range(20)]
    verdict = await call(
        session, service, "POST", f"/canary/{build}/results", json={"results": results}
    )
    assert verdict["status"] == "passed"


async def until(
    session: aiohttp.ClientSession, service: ServiceProcess, rollout_id: str, *states: str
) -> Any:
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        body = await call(session, service, "GET", f"/rollouts/{rollout_id}")
        if body["state"] in states:
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"rollout {rollout_id} never reached {states}: {body}\n{service.output()}")


async def test_a_good_build_completes_and_a_bad_one_is_rolled_back(tmp_path: Path) -> None:
    env = {
        "UPDATE_PIPELINE_ENABLED": "true",
        "UPDATE_PIPELINE_STAGES_STABLE": "25%:2s,100%",
        "UPDATE_PIPELINE_MIN_SESSION_COUNT": "40",
        "UPDATE_PIPELINE_HEARTBEAT_INTERVAL": "1s",
    }
    async with ServiceProcess(tmp_path, env=env) as service:
        await service.start()
        token = admin_token(service)
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            for build in ("build-old", "build-good", "build-bad"):
                await known_good(session, service, build)
            await call(
                session,
                service,
                "PUT",
                "/channels/stable",
                json={"buildId": "build-old", "reason": "today's build"},
            )
            simulator = Simulator(
                SimulatorOptions(
                    url=service.url,
                    token=token,
                    runners=RUNNERS,
                    orgs=ORGS,
                    interval=0.2,
                    seed=11,
                    start_build="build-old",
                    model=SessionModel(fail_rates={"build-bad": 0.5, "*": 0.01}),
                )
            )
            running = asyncio.create_task(simulator.run())
            try:
                good = await call(
                    session,
                    service,
                    "POST",
                    "/rollouts",
                    json={"buildId": "build-good", "channel": "stable"},
                )
                done = await until(session, service, good["rolloutId"], "completed", "rolled_back")
                assert done["state"] == "completed", done
                assert done["stages"][0]["verdict"]["outcome"] == "pass"

                bad = await call(
                    session,
                    service,
                    "POST",
                    "/rollouts",
                    json={"buildId": "build-bad", "channel": "stable"},
                )
                pulled = await until(session, service, bad["rolloutId"], "rolled_back", "completed")
                assert pulled["state"] == "rolled_back", pulled
                assert (pulled["rollback"]["by"], pulled["rollback"]["metric"]) == (
                    "auto",
                    "failure_rate",
                )
                assert pulled["currentPercentage"] == 25  # never reached the rest

                # Every runner ends on the good build: the bad one's orgs went back.
                deadline = time.monotonic() + SETTLE
                while simulator.shares() != {"build-good": RUNNERS}:
                    assert time.monotonic() < deadline, simulator.shares()
                    await asyncio.sleep(0.2)
                # The metrics tell the same story.
                async with session.get(f"{service.url}/metrics") as response:
                    families = {
                        f"{sample.name}{sorted(sample.labels.items())}": sample.value
                        for family in text_string_to_metric_families(await response.text())
                        for sample in family.samples
                    }
                assert families["update_pipeline_rollouts[('state', 'completed')]"] == 1
                assert families["update_pipeline_rollouts[('state', 'rolled_back')]"] == 1
                accepted = "update_pipeline_heartbeats_total[('outcome', 'accepted')]"
                assert families[accepted] > RUNNERS
            finally:
                simulator.stop()
                report = await running
            assert report.heartbeats.failed == 0
