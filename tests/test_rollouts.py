"""Staged rollouts: stages, gates, automatic rollback, approvals, manual control, history.
Real HTTP, real SQLite, a clock the tests move."""

from __future__ import annotations

import asyncio
import math
import secrets
import sqlite3
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import pytest

from app.clock import ManualClock, isoformat, parse_iso
from app.config import Settings
from app.fleet.cohorts import members
from app.rollouts.gates import Counts, StageTally, Thresholds, judge_stage
from app.store import BuildRecord
from tests.conftest import START, Api, MakeApi

OLD, NEW, OTHER = "build-old", "build-new", "build-other"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(stages_stable="1%:1h,10%:2h,50%:4h,100%", stages_beta="50%:30m,100%")


class Fleet:
    """Runners that do what the service tells them: each org has one runner, which
    reports the build it runs with its sessions, then switches to the build it is told."""

    def __init__(self, api: Api, token: str) -> None:
        self.api = api
        self.token = token
        self.running: dict[str, str | None] = {}
        self.counters: dict[str, list[int]] = {}
        self.answers: dict[str, dict[str, Any]] = {}

    async def beat(
        self, org: str, started: int = 0, failed: int = 0, disconnected: int = 0
    ) -> dict[str, Any]:
        counters = self.counters.setdefault(org, [0, 0, 0])
        counters[0] += started
        counters[1] += failed
        counters[2] += disconnected
        response, answer = await self.api.post(
            "/heartbeat",
            token=self.token,
            json={
                "runnerId": f"runner-{org}",
                "orgId": org,
                "bootId": "boot-1",
                "buildId": self.running.setdefault(org, OLD),
                "sessions": dict(zip(("started", "failed", "disconnected"), counters, strict=True)),
            },
        )
        assert response.status == 200, answer
        self.running[org] = answer["desiredBuildId"]
        self.answers[org] = answer
        return answer

    async def everyone(self, orgs: Iterable[str]) -> None:
        """Each org checks in once (and so learns its build)."""
        for org in orgs:
            await self.beat(org)

    async def sessions(
        self, orgs: Iterable[str], total: int, *, failed: float = 0.0, disconnected: float = 0.0
    ) -> None:
        """``total`` sessions spread over ``orgs``, each on the build it runs."""
        orgs = list(orgs)
        each = math.ceil(total / len(orgs))
        for org in orgs:
            await self.beat(org, each, round(each * failed), round(each * disconnected))


async def add_build(api: Api, build_id: str, *, good: bool = True) -> None:
    runtimes = {"codex": "0.47.0" if build_id != OLD else "0.46.0"}
    await api.services.store.add_build(
        BuildRecord(
            build_id, "1.0.0", START, runtimes, known_good_for=list(runtimes) if good else []
        ),
        START,
    )


async def on_channel(api: Api, orgs: Iterable[str], admin: str | None = None) -> tuple[str, Fleet]:
    """Builds old (the stable channel's) and new, and ``orgs`` checked in on the old one;
    an admin token (named ops) and the fleet."""
    admin = admin or await api.token("admin", name="ops")
    await add_build(api, OLD)
    await add_build(api, NEW)
    response, _ = await api.request(
        "PUT", "/channels/stable", token=admin, json={"buildId": OLD, "reason": "today's build"}
    )
    assert response.status == 200
    runners = Fleet(api, admin)
    await runners.everyone(orgs)
    return admin, runners


@pytest.fixture
async def admin(api: Api) -> str:
    return await api.token("admin", name="ops")


@pytest.fixture
async def fleet(api: Api, admin: str) -> Fleet:
    """A fleet of 40 orgs on the stable channel's old build."""
    return (await on_channel(api, ORGS, admin))[1]


ORGS = [f"org-{n:02d}" for n in range(40)]


async def start(api: Api, admin: str, build: str = NEW, channel: str = "stable", **kw: Any) -> Any:
    response, body = await api.post(
        "/rollouts", token=admin, json={"buildId": build, "channel": channel, **kw}
    )
    assert response.status == 201, body
    return body


async def view(api: Api, rollout_id: str) -> Any:
    viewer = await api.token("viewer", name=f"viewer-{secrets.token_hex(4)}")
    response, body = await api.get(f"/rollouts/{rollout_id}", token=viewer)
    assert response.status == 200
    return body


async def command(api: Api, admin: str, rollout_id: str, action: str, **body: Any) -> Any:
    return await api.post(f"/rollouts/{rollout_id}/{action}", token=admin, json=body)


def included(body: dict[str, Any]) -> list[str]:
    assert body["affectedOrgCount"] == len(body["affectedOrgIds"])
    return body["affectedOrgIds"]


async def to_deadline(api: Api, clock: ManualClock, rollout_id: str) -> None:
    deadline = (await view(api, rollout_id))["stage"]["deadlineAt"]
    assert deadline is not None
    clock.advance(max(timedelta(0), parse_iso(deadline) - clock.now()))
    await api.services.rollouts.step_all()


# -- the whole way --------------------------------------------------------------------------


async def test_a_stable_rollout_goes_through_all_four_stages(
    api: Api, admin: str, fleet: Fleet, clock: ManualClock
) -> None:
    body = await start(api, admin)
    assert (body["state"], body["currentPercentage"]) == ("rolling_out", 1)
    assert body["startedAt"] == body["stage"]["startedAt"]
    assert body["previousBuildId"] == OLD
    rollout_id = body["rolloutId"]

    seen = []
    for percentage, hours in [(1, 1), (10, 2), (50, 4)]:
        body = await view(api, rollout_id)
        assert body["currentPercentage"] == percentage
        orgs = included(body)
        # The cohort is the deterministic one, and only grows.
        assert set(orgs) == members(rollout_id, ORGS, percentage)
        assert set(seen) <= set(orgs)
        seen = orgs
        assert body["stage"]["deadlineAt"] is not None
        await fleet.everyone(ORGS)  # included orgs learn the new build
        assert {o for o in ORGS if fleet.running[o] == NEW} == set(orgs)
        assert all(fleet.answers[o]["rolloutId"] == rollout_id for o in orgs)
        await fleet.sessions(orgs, 120, failed=0.02)
        # Not before its deadline, however good the numbers.
        clock.advance(timedelta(hours=hours) - timedelta(seconds=1))
        await api.services.rollouts.step_all()
        assert (await view(api, rollout_id))["currentPercentage"] == percentage
        clock.advance(timedelta(seconds=1))
        await api.services.rollouts.step_all()

    body = await view(api, rollout_id)
    assert (body["state"], body["currentPercentage"]) == ("completed", 100)
    assert body["affectedOrgCount"] == len(ORGS)
    assert [s["verdict"]["outcome"] for s in body["stages"][:3]] == ["pass"] * 3
    assert all(s["target"]["sessions"] >= 100 for s in body["stages"][:3])
    _, channels = await api.get("/channels", token=admin)
    stable = next(c for c in channels["items"] if c["channel"] == "stable")
    assert (stable["buildId"], stable["setBy"]) == (NEW, f"rollout {rollout_id}")
    await fleet.everyone(ORGS)
    assert set(fleet.running.values()) == {NEW}

    _, history = await api.get(f"/rollouts/{rollout_id}/history", token=admin)
    assert [(h["action"], h["fromState"], h["toState"], h["actor"]) for h in history["items"]] == [
        ("start", "pending", "rolling_out", "token ops"),
        ("advance", "rolling_out", "rolling_out", "auto"),
        ("advance", "rolling_out", "rolling_out", "auto"),
        ("advance", "rolling_out", "rolling_out", "auto"),
        ("complete", "rolling_out", "completed", "auto"),
    ]
    _, events = await api.get(
        "/events?type=rollout_initiated,rollout_stage_advanced,rollout_completed", token=admin
    )
    assert [e["type"] for e in reversed(events["items"])] == [
        "rollout_initiated",
        *["rollout_stage_advanced"] * 3,
        "rollout_completed",
    ]


async def test_starting_is_checked(api: Api, admin: str, fleet: Fleet) -> None:
    await add_build(api, OTHER, good=False)
    viewer = await api.token("viewer")
    response, _ = await api.post(
        "/rollouts", token=viewer, json={"buildId": NEW, "channel": "stable"}
    )
    assert response.status == 403
    for body, status, words in [
        ({"buildId": NEW, "channel": "nightly"}, 400, "channel"),
        ({"buildId": "build-nope", "channel": "stable"}, 404, "no build"),
        ({"buildId": OTHER, "channel": "stable"}, 409, "not known-good"),
        ({"buildId": OTHER, "channel": "stable", "force": True}, 400, "reason"),
        ({"buildId": OLD, "channel": "stable"}, 409, "already"),
    ]:
        response, answer = await api.post("/rollouts", token=admin, json=body)
        assert response.status == status, (body, answer)
        assert words in answer["error"]["message"]
    forced = await start(api, admin, OTHER, force=True, reason="hotfix for a customer outage")
    assert forced["forced"] == {"reason": "hotfix for a customer outage"}
    # One active rollout per channel.
    response, answer = await api.post(
        "/rollouts", token=admin, json={"buildId": NEW, "channel": "stable"}
    )
    assert response.status == 409 and "already active" in answer["error"]["message"]
    # ... but the other channel is free.
    beta = await start(api, admin, NEW, "beta")
    assert beta["state"] == "rolling_out"
    _, status = await api.get("/status", token=admin)
    assert status["activeRollouts"] == 2
    _, page = await api.get("/rollouts?state=rolling_out&channel=beta", token=admin)
    assert [r["rolloutId"] for r in page["items"]] == [beta["rolloutId"]]


# -- gates ----------------------------------------------------------------------------------


@pytest.fixture
def one_stage(settings: Settings) -> Settings:
    return settings.replace(stages_stable="1%:1h,100%")


async def test_the_heartbeat_that_crosses_the_failure_threshold_rolls_back(
    make_api: MakeApi, one_stage: Settings
) -> None:
    api = await make_api(settings_override=one_stage)
    admin, runners = await on_channel(
        api, ["solo"]
    )  # the only org: its data alone can trip the gate
    rollout = await start(api, admin)
    await runners.beat("solo")
    assert runners.running["solo"] == NEW

    # 99 sessions, half failed: below the minimum, nothing is decided.
    answer = await runners.beat("solo", 99, 50)
    assert answer["desiredBuildId"] == NEW
    body = await view(api, rollout["rolloutId"])
    assert body["state"] == "rolling_out"
    assert body["gate"]["verdict"]["outcome"] == "insufficient"
    # The hundredth session brings it to 51 of 100 failed: this heartbeat rolls it back,
    # and its own answer already sends the org back.
    answer = await runners.beat("solo", 1, 1)
    assert answer["desiredBuildId"] == OLD and answer["rolloutId"] is None
    body = await view(api, rollout["rolloutId"])
    assert body["state"] == "rolled_back"
    assert body["rollback"] | {"at": None} == {
        "reason": "failure rate 0.5100 above 0.1 after 100 sessions",
        "by": "auto",
        "at": None,
        "metric": "failure_rate",
        "value": 0.51,
        "threshold": 0.1,
        "sessions": 100,
        "orgs": ["solo"],
    }
    _, events = await api.get("/events?type=rollback_initiated", token=admin)
    assert events["items"][0]["data"]["metric"] == "failure_rate"


async def test_exactly_at_the_threshold_holds_and_one_more_failure_trips(
    make_api: MakeApi, one_stage: Settings
) -> None:
    api = await make_api(settings_override=one_stage)
    admin, runners = await on_channel(api, ["solo"])
    rollout = await start(api, admin)
    await runners.beat("solo")
    answer = await runners.beat("solo", 100, 10)  # 10%: not above
    assert answer["desiredBuildId"] == NEW
    answer = await runners.beat("solo", 1, 1)  # 11 of 101
    assert answer["desiredBuildId"] == OLD
    assert (await view(api, rollout["rolloutId"]))["state"] == "rolled_back"


async def test_one_misbehaving_org_cannot_pull_back_a_healthy_stage(
    make_api: MakeApi, settings: Settings, clock: ManualClock
) -> None:
    api = await make_api(settings_override=settings.replace(stages_stable="50%:1h,100%"))
    admin, runners = await on_channel(api, ORGS)
    rollout = await start(api, admin)
    orgs = included(await view(api, rollout["rolloutId"]))
    assert len(orgs) >= 4
    await runners.everyone(orgs)
    bad, good = orgs[0], orgs[1:]
    await runners.beat(bad, 60, 60)
    await runners.sessions(good, 120)
    body = await view(api, rollout["rolloutId"])
    assert body["state"] == "rolling_out"
    verdict = body["gate"]["verdict"]
    assert (verdict["outcome"], verdict["orgs"]) == ("held", [bad])
    # Held at the deadline too: not moved on with a rate above the limit.
    await to_deadline(api, clock, rollout["rolloutId"])
    body = await view(api, rollout["rolloutId"])
    assert (body["state"], body["currentPercentage"]) == ("rolling_out", 50)
    assert "held" in body["nextStep"]["detail"]
    # A second org going bad is evidence enough.
    await runners.beat(good[0], 200, 100)
    body = await view(api, rollout["rolloutId"])
    assert body["state"] == "rolled_back"
    assert body["rollback"]["orgs"] == sorted([bad, good[0]])
    await runners.everyone(orgs)
    assert {runners.running[o] for o in orgs} == {OLD}


async def test_insufficient_data_holds_at_the_deadline_and_advances_once_it_arrives(
    api: Api, admin: str, fleet: Fleet, clock: ManualClock
) -> None:
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    orgs = included(rollout)
    await fleet.everyone(orgs)
    await fleet.sessions(orgs, 50)
    await to_deadline(api, clock, rollout_id)
    body = await view(api, rollout_id)
    assert body["currentPercentage"] == 1
    assert body["gate"]["verdict"]["text"] == "insufficient data"
    assert body["nextStep"]["detail"].startswith("insufficient data: 50 of 100 sessions")
    clock.advance(timedelta(hours=5))
    await api.services.rollouts.step_all()
    assert (await view(api, rollout_id))["currentPercentage"] == 1  # never on missing data
    # The data arrives: the controller is woken by the heartbeat that completes it.
    await fleet.sessions(orgs, 60)
    assert api.services.rollouts.wake.is_set()
    await api.services.rollouts.step_all()
    assert (await view(api, rollout_id))["currentPercentage"] == 10


async def test_the_baseline_is_the_eligible_orgs_not_yet_included(
    api: Api, admin: str, fleet: Fleet
) -> None:
    rollout = await start(api, admin)
    orgs = included(rollout)
    others = [o for o in ORGS if o not in orgs]
    await fleet.everyone(ORGS)
    await fleet.sessions(orgs, 200, failed=0.05)
    await fleet.sessions(others, 400, failed=0.02)
    body = await view(api, rollout["rolloutId"])
    baseline = body["gate"]["baseline"]
    target, base = baseline["target"], baseline["baseline"]
    assert target["sessions"] == 200 and base["sessions"] == len(others) * math.ceil(
        400 / len(others)
    )
    difference = baseline["failureRateDifference"]
    assert difference["estimate"] == pytest.approx(target["failureRate"] - base["failureRate"])
    assert difference["low"] < difference["estimate"] < difference["high"]
    assert baseline["regression"] is None


async def test_the_regression_gate_rolls_back_a_build_confidently_worse_than_the_baseline(
    make_api: MakeApi, settings: Settings
) -> None:
    api = await make_api(
        settings_override=settings.replace(
            stages_stable="50%:1h,100%", max_relative_regression=0.02, max_failure_rate=0.5
        )
    )
    admin, runners = await on_channel(api, ORGS)
    rollout = await start(api, admin)
    orgs = included(rollout)
    others = [o for o in ORGS if o not in orgs]
    await runners.everyone(ORGS)
    await runners.sessions(others, 2000, failed=0.02)
    # 8% against 2%: within the 50% threshold, but far worse than the baseline.
    await runners.sessions(orgs, 1000, failed=0.08)
    body = await view(api, rollout["rolloutId"])
    assert body["state"] == "rolled_back"
    assert body["rollback"]["metric"] == "failure_rate_regression"
    assert body["rollback"]["value"] > 0.02


# -- pause, resume, advance -------------------------------------------------------------------


async def test_pause_stops_the_stage_clock_and_resume_goes_on_from_there(
    api: Api, admin: str, fleet: Fleet, clock: ManualClock
) -> None:
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    orgs = included(rollout)
    await fleet.everyone(orgs)
    await fleet.sessions(orgs, 150)
    clock.advance(timedelta(minutes=40))
    response, body = await command(api, admin, rollout_id, "pause", reason="looking at a report")
    assert response.status == 200
    assert (body["state"], body["stage"]["deadlineAt"]) == ("paused", None)
    assert body["stage"]["remainingSeconds"] == 20 * 60
    # Included orgs stay on the build; no new orgs join.
    await fleet.everyone(ORGS)
    assert {o for o in ORGS if fleet.running[o] == NEW} == set(orgs)
    clock.advance(timedelta(hours=10))
    await api.services.rollouts.step_all()
    assert (await view(api, rollout_id))["currentPercentage"] == 1
    response, body = await command(api, admin, rollout_id, "pause")
    assert response.status == 409
    assert (body["error"]["code"], body["error"]["state"]) == ("INVALID_TRANSITION", "paused")

    response, body = await command(api, admin, rollout_id, "resume")
    assert body["state"] == "rolling_out"
    assert body["stage"]["deadlineAt"] == isoformat(clock.now() + timedelta(minutes=20))
    clock.advance(timedelta(minutes=19))
    await api.services.rollouts.step_all()
    assert (await view(api, rollout_id))["currentPercentage"] == 1
    clock.advance(timedelta(minutes=1))
    await api.services.rollouts.step_all()
    assert (await view(api, rollout_id))["currentPercentage"] == 10
    _, history = await api.get(f"/rollouts/{rollout_id}/history", token=admin)
    paused = next(h for h in history["items"] if h["action"] == "pause")
    assert (paused["reason"], paused["fromState"], paused["toState"]) == (
        "looking at a report",
        "rolling_out",
        "paused",
    )


async def test_advance_moves_on_by_hand_and_to_100_promotes_fully(
    api: Api, admin: str, fleet: Fleet
) -> None:
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    response, body = await command(api, admin, rollout_id, "advance")
    assert response.status == 200 and body["currentPercentage"] == 10
    response, body = await command(api, admin, rollout_id, "advance", to=25)
    assert response.status == 400 and "not a stage" in body["error"]["message"]
    response, body = await command(api, admin, rollout_id, "advance", to=1)
    assert response.status == 409 and "only moves forward" in body["error"]["message"]
    response, body = await command(api, admin, rollout_id, "advance", to=100)
    assert (body["state"], body["currentPercentage"]) == ("completed", 100)
    response, body = await command(api, admin, rollout_id, "advance")
    assert response.status == 409 and body["error"]["state"] == "completed"
    for action in ("pause", "resume"):
        response, body = await command(api, admin, rollout_id, action)
        assert response.status == 409 and body["error"]["state"] == "completed"


async def test_unknown_rollouts_and_bad_bodies(api: Api, admin: str) -> None:
    response, body = await command(api, admin, "nope", "pause")
    assert response.status == 404
    response, body = await command(api, admin, "nope", "rollback")
    assert response.status == 400 and "reason" in body["error"]["message"]
    response, body = await api.get("/rollouts/nope/history", token=admin)
    assert response.status == 404
    response, body = await api.post("/rollouts/nope/pause", token=admin, data=b"{not json")
    assert response.status == 400 and body["error"]["code"] == "INVALID_JSON"


# -- rollback -----------------------------------------------------------------------------------


async def test_a_manual_rollback_restores_each_org_to_the_build_it_ran_before(
    api: Api, admin: str, fleet: Fleet, clock: ManualClock
) -> None:
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    # One included org was on another build when it was included (a pin lifted just
    # before, say): it goes back to that one, not to the channel's.
    await command(api, admin, rollout_id, "advance")
    orgs = included(await view(api, rollout_id))
    await fleet.everyone(ORGS)
    response, body = await command(api, admin, rollout_id, "rollback", reason="bad reports")
    assert response.status == 200
    assert (body["state"], body["error"]) == ("rolled_back", "bad reports")
    assert body["rollback"]["by"] == "token ops"
    await fleet.everyone(ORGS)
    assert set(fleet.running.values()) == {OLD}
    _, page = await api.get(f"/rollouts/{rollout_id}/orgs?limit=500", token=admin)
    assert {i["orgId"]: i["previousBuildId"] for i in page["items"]} == {o: OLD for o in orgs}
    response, body = await command(api, admin, rollout_id, "rollback", reason="again")
    assert response.status == 409 and body["error"]["state"] == "rolled_back"
    _, events = await api.get("/events?type=update_rollback", token=admin)
    assert events["items"][0]["data"]["by"] == "token ops"


async def test_previous_builds_are_those_at_inclusion_not_at_start(
    api: Api, admin: str, fleet: Fleet
) -> None:
    await add_build(api, OTHER)
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    first = set(included(rollout))
    await fleet.everyone(ORGS)
    # The channel moves on while the rollout is at its first stage.
    response, _ = await api.request(
        "PUT", "/channels/stable", token=admin, json={"buildId": OTHER, "reason": "hotfix"}
    )
    assert response.status == 200
    await fleet.everyone(ORGS)
    response, body = await command(api, admin, rollout_id, "advance", to=50)
    assert response.status == 200, body
    _, page = await api.get(f"/rollouts/{rollout_id}/orgs?limit=500", token=admin)
    previous = {i["orgId"]: i["previousBuildId"] for i in page["items"]}
    assert {o: previous[o] for o in first} == {o: OLD for o in first}
    later = set(previous) - first
    assert later and {previous[o] for o in later} == {OTHER}
    # A rollback sends each back to its own.
    await command(api, admin, rollout_id, "rollback", reason="no")
    await fleet.everyone(ORGS)
    assert {o: fleet.running[o] for o in previous} == previous


async def test_rollback_after_completion_within_the_window_and_not_after(
    api: Api, admin: str, fleet: Fleet, clock: ManualClock
) -> None:
    ent = "org-ent"
    await api.request(
        "PUT",
        f"/orgs/{ent}",
        token=admin,
        json={"channel": "stable", "enterprise": {"approvalRequired": True}},
    )
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    await command(api, admin, rollout_id, "approve", orgId=ent)
    _, body = await command(api, admin, rollout_id, "advance", to=100)
    assert body["state"] == "completed"
    await fleet.everyone([*ORGS, ent])
    assert fleet.running[ent] == NEW
    clock.advance(timedelta(hours=23))
    response, body = await command(api, admin, rollout_id, "rollback", reason="late regression")
    assert response.status == 200 and body["state"] == "rolled_back"
    assert body["enterprise"][0]["voided"] is True
    _, channels = await api.get("/channels", token=admin)
    assert next(c for c in channels["items"] if c["channel"] == "stable")["buildId"] == OLD
    await fleet.everyone([*ORGS, ent])
    assert set(fleet.running.values()) == {OLD}

    # A second one completed, then rolled back too late.
    again = await start(api, admin)
    await command(api, admin, again["rolloutId"], "approve", orgId=ent)
    await command(api, admin, again["rolloutId"], "advance", to=100)
    clock.advance(timedelta(hours=24, seconds=1))
    response, body = await command(api, admin, again["rolloutId"], "rollback", reason="too late")
    assert response.status == 409 and "rollback window" in body["error"]["message"]


# -- enterprise orgs -------------------------------------------------------------------------


async def test_enterprise_orgs_wait_for_approval_and_the_rollout_waits_for_them(
    api: Api, admin: str, fleet: Fleet
) -> None:
    ents = ["ent-a", "ent-b", "ent-c"]
    for org in ents:
        await api.request(
            "PUT",
            f"/orgs/{org}",
            token=admin,
            json={"channel": "stable", "enterprise": {"approvalRequired": True}},
        )
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    assert not set(ents) & set(included(rollout))  # never in the progressive stages
    # Approved early: takes effect only at 100%.
    response, body = await command(api, admin, rollout_id, "approve", orgId="ent-a")
    assert response.status == 200
    await fleet.everyone(ents)
    assert fleet.running["ent-a"] == OLD
    _, body = await command(api, admin, rollout_id, "advance", to=100)
    assert (body["state"], body["currentPercentage"]) == ("rolling_out", 100)
    assert body["nextStep"]["detail"] == "waiting for 2 enterprise org(s) to decide"
    await fleet.everyone(ents)
    assert [fleet.running[o] for o in ents] == [NEW, OLD, OLD]
    # Skipped: keeps what it runs. Approved at 100%: takes effect at once.
    await command(api, admin, rollout_id, "approve", orgId="ent-b", skip=True)
    _, body = await command(api, admin, rollout_id, "approve", orgId="ent-c")
    assert body["state"] == "completed"
    assert {e["orgId"]: (e["decision"], e["applied"]) for e in body["enterprise"]} == {
        "ent-a": ("approved", True),
        "ent-b": ("skipped", False),
        "ent-c": ("approved", True),
    }
    await fleet.everyone(ents)
    assert [fleet.running[o] for o in ents] == [NEW, OLD, NEW]


async def test_approvals_are_checked(api: Api, admin: str, fleet: Fleet) -> None:
    await api.request(
        "PUT",
        "/orgs/ent-beta",
        token=admin,
        json={"channel": "beta", "enterprise": {"approvalRequired": True}},
    )
    rollout = await start(api, admin)
    for org, status, words in [
        ("nobody", 404, "no org"),
        ("org-01", 400, "does not require approval"),
        ("ent-beta", 400, "beta channel"),
        ("bad id!", 400, "orgId"),
    ]:
        response, body = await command(api, admin, rollout["rolloutId"], "approve", orgId=org)
        assert response.status == status, body
        assert words in body["error"]["message"]


async def test_pinned_orgs_are_never_moved(api: Api, admin: str, fleet: Fleet) -> None:
    await add_build(api, OTHER)
    for org, config in [
        ("org-00", {"channel": "stable", "pinnedBuildId": OTHER}),
        ("org-01", {"channel": "stable", "versionPins": {"codex": "0.46."}}),
        (
            "ent-pinned",
            {"channel": "stable", "pinnedBuildId": OTHER, "enterprise": {"approvalRequired": True}},
        ),
    ]:
        await api.request("PUT", f"/orgs/{org}", token=admin, json=config)
    rollout = await start(api, admin)
    _, body = await command(api, admin, rollout["rolloutId"], "advance", to=100)
    assert body["state"] == "completed"  # a pinned enterprise org is not waited for
    assert not {"org-00", "org-01", "ent-pinned"} & set(included(body))
    await fleet.everyone(["org-00", "org-01", "ent-pinned", "org-02"])
    assert [fleet.running[o] for o in ("org-00", "org-01", "ent-pinned", "org-02")] == [
        OTHER,
        OLD,
        OTHER,
        NEW,
    ]


# -- freeze --------------------------------------------------------------------------------------


async def test_a_freeze_blocks_starts_and_advances_but_not_automatic_rollbacks(
    make_api: MakeApi, settings: Settings, clock: ManualClock
) -> None:
    api = await make_api(settings_override=settings.replace(stages_stable="50%:1h,100%"))
    admin, runners = await on_channel(api, ORGS)
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    orgs = included(rollout)
    await runners.everyone(orgs)
    await runners.sessions(orgs, 200)

    response, body = await api.post("/freeze", token=admin, json={"reason": "holiday"})
    assert response.status == 200 and body["frozen"]["reason"] == "holiday"
    _, status = await api.get("/status", token=admin)
    assert status["frozen"]["by"] == "token ops"
    assert (await view(api, rollout_id))["frozen"]["reason"] == "holiday"
    await to_deadline(api, clock, rollout_id)
    assert (await view(api, rollout_id))["currentPercentage"] == 50
    response, body = await command(api, admin, rollout_id, "advance")
    assert response.status == 409 and "frozen" in body["error"]["message"]
    response, body = await api.post(
        "/rollouts", token=admin, json={"buildId": NEW, "channel": "beta"}
    )
    assert response.status == 409 and "frozen" in body["error"]["message"]

    # Bad news still pulls the build back while frozen.
    await runners.sessions(orgs, 400, failed=0.5)
    assert (await view(api, rollout_id))["state"] == "rolled_back"

    response, body = await api.delete("/freeze", token=admin)
    assert body == {"frozen": None}
    _, status = await api.get("/status", token=admin)
    assert status["frozen"] is None


async def test_lifting_a_freeze_lets_a_rollout_past_its_deadline_move_on(
    api: Api, admin: str, fleet: Fleet, clock: ManualClock
) -> None:
    rollout = await start(api, admin)
    orgs = included(rollout)
    await fleet.everyone(orgs)
    await fleet.sessions(orgs, 150)
    await api.post("/freeze", token=admin, json={"reason": "incident"})
    await to_deadline(api, clock, rollout["rolloutId"])
    assert (await view(api, rollout["rolloutId"]))["nextStep"]["detail"] == "frozen: incident"
    await api.delete("/freeze", token=admin)
    assert api.services.rollouts.wake.is_set()
    await api.services.rollouts.step_all()
    assert (await view(api, rollout["rolloutId"]))["currentPercentage"] == 10


# -- restarts and races ------------------------------------------------------------------------


async def test_a_restart_mid_stage_resumes_with_the_same_deadline_and_counts(
    make_api: MakeApi, settings: Settings, clock: ManualClock
) -> None:
    api = await make_api()
    admin, runners = await on_channel(api, ORGS)
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    orgs = included(rollout)
    await runners.everyone(orgs)
    await runners.sessions(orgs, 60)
    before = await view(api, rollout_id)
    clock.advance(timedelta(minutes=30))

    # The same database, a new process's worth of objects.
    again = await make_api()
    runners.api = again
    after = await view(again, rollout_id)
    assert after["stage"] == before["stage"]
    assert after["stages"][0]["target"]["sessions"] == 60
    # The stage's counts were read back: 40 more make the 100 it needs.
    await runners.sessions(orgs, 40)
    tally = again.services.fleet.tally(rollout_id, 0)
    assert tally is not None and tally.total.started == 100
    clock.advance(timedelta(minutes=30))
    await again.services.rollouts.step_all()
    await again.services.rollouts.step_all()  # a second look advances nothing twice
    body = await view(again, rollout_id)
    assert body["currentPercentage"] == 10
    _, history = await again.get(f"/rollouts/{rollout_id}/history", token=admin)
    assert [h["action"] for h in history["items"]] == ["start", "advance"]


async def test_a_manual_advance_racing_an_automatic_rollback_ends_consistent(
    make_api: MakeApi, one_stage: Settings
) -> None:
    api = await make_api(settings_override=one_stage.replace(stages_stable="50%:1h,100%"))
    admin, runners = await on_channel(api, ORGS)
    rollout = await start(api, admin)
    rollout_id = rollout["rolloutId"]
    orgs = included(rollout)
    await runners.everyone(orgs)
    await runners.sessions(orgs, 90, failed=0.5)
    # The heartbeats that tip it and an advance to 100%, at the same time.
    results = await asyncio.gather(
        runners.sessions(orgs, 40, failed=0.5),
        command(api, admin, rollout_id, "advance", to=100),
    )
    response, _ = results[1]
    body = await view(api, rollout_id)
    _, history = await api.get(f"/rollouts/{rollout_id}/history", token=admin)
    actions = [h["action"] for h in history["items"]]
    # Either the rollback came first (the advance is refused), or the advance did and
    # completed the rollout (then the rollback, too late for a live rollout, did not
    # happen on the heartbeat path). Never both, never a half state.
    if response.status == 409:
        assert body["state"] == "rolled_back" and actions == ["start", "rollback"]
    else:
        assert body["state"] in ("completed", "rolled_back")
        assert actions[:3] == ["start", "advance", "complete"] or actions == [
            "start",
            "advance",
            "rollback",
        ]
    with sqlite3.connect(api.services.settings.db_path) as db:
        states = db.execute("SELECT state FROM active_rollouts").fetchall()
    assert states == [(body["state"],)]


# -- the gate arithmetic ---------------------------------------------------------------------------


def test_a_tally_fed_heartbeat_by_heartbeat_agrees_with_judging_the_totals() -> None:
    import random

    rng = random.Random(7)
    limits = Thresholds(0.10, 0.15, 100)
    for _ in range(200):
        tally = StageTally(limits)
        by_org: dict[str, Counts] = {}
        for _ in range(rng.randint(1, 40)):
            org = f"o{rng.randint(0, 5)}"
            started = rng.randint(0, 30)
            counts = Counts(started, rng.randint(0, started), rng.randint(0, started))
            tally.add(org, counts)
            by_org[org] = by_org.get(org, Counts()) + counts
            assert tally.verdict() == judge_stage(by_org, limits)


async def test_orgs_that_appear_after_a_stage_began_join_it_as_their_cohort_says(
    make_api: MakeApi, settings: Settings
) -> None:
    api = await make_api(settings_override=settings.replace(stages_stable="30%:1h,100%"))
    admin, runners = await on_channel(api, [])
    rollout = await start(api, admin)  # before any org has been heard from
    rollout_id = rollout["rolloutId"]
    assert rollout["affectedOrgCount"] == 0
    # The first org in joins an empty stage, whatever its bucket, on its first heartbeat.
    answer = await runners.beat(ORGS[0])
    assert (answer["desiredBuildId"], answer["rolloutId"]) == (NEW, rollout_id)
    await runners.everyone(ORGS[1:])
    body = await view(api, rollout_id)
    assert set(included(body)) == {ORGS[0]} | members(rollout_id, ORGS[1:], 30) - {ORGS[0]}
    assert {o for o in ORGS if runners.running[o] == NEW} == set(included(body))
    # A paused rollout takes nobody new.
    await command(api, admin, rollout_id, "pause")
    late = [f"late-{n}" for n in range(30)]
    await runners.everyone(late)
    assert not set(late) & set(included(await view(api, rollout_id)))
    assert {runners.running[o] for o in late} == {OLD}


async def test_the_timer_component_advances_a_rollout_at_its_deadline(
    make_api: MakeApi, clock: ManualClock
) -> None:
    from app.rollouts.controller import RolloutTimer

    api = await make_api(build=lambda services: [RolloutTimer(services.rollouts)])
    admin, runners = await on_channel(api, ORGS)
    rollout = await start(api, admin)
    orgs = included(rollout)
    await runners.everyone(orgs)
    await runners.sessions(orgs, 120)
    clock.advance(timedelta(hours=1))
    api.services.rollouts.wake.set()  # what the real clock's passing does by itself
    for _ in range(100):
        if (await view(api, rollout["rolloutId"]))["currentPercentage"] == 10:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the timer did not advance the rollout")
    assert api.services.pipeline is not None and api.services.pipeline.health() is None


async def test_the_fleet_kept_up_to_date_by_changes_equals_a_fresh_read(
    api: Api, admin: str, fleet: Fleet, clock: ManualClock
) -> None:
    """Rollout changes update the heartbeat path's state in place rather than reading
    every org again; after any sequence it must be what reading everything gives."""
    service = api.services.fleet

    async def same_as_fresh() -> None:
        await fleet.everyone(ORGS[:3])  # uses (and so loads) the state
        kept = await service.current()
        service.invalidate()
        fresh = await service.current()
        assert kept.recommended == fresh.recommended
        assert kept.live.keys() == fresh.live.keys()
        for channel, live in kept.live.items():
            assert (live.rollout, live.included) == (
                fresh.live[channel].rollout,
                fresh.live[channel].included,
            )
            assert dict(live.previous) == dict(fresh.live[channel].previous)
        assert kept.settled == fresh.settled

    for org in ("ent-a", "ent-b"):
        await api.request(
            "PUT",
            f"/orgs/{org}",
            token=admin,
            json={"channel": "stable", "enterprise": {"approvalRequired": True}},
        )
    await fleet.everyone(["ent-a", "ent-b"])
    first = await start(api, admin)
    await same_as_fresh()
    await command(api, admin, first["rolloutId"], "advance")
    await same_as_fresh()
    await command(api, admin, first["rolloutId"], "rollback", reason="bad")
    await same_as_fresh()
    await add_build(api, OTHER)
    second = await start(api, admin, OTHER)
    await command(api, admin, second["rolloutId"], "approve", orgId="ent-a")
    await command(api, admin, second["rolloutId"], "approve", orgId="ent-b", skip=True)
    await command(api, admin, second["rolloutId"], "advance", to=100)
    await same_as_fresh()
    await command(api, admin, second["rolloutId"], "rollback", reason="late")
    await same_as_fresh()
    third = await start(api, admin, OTHER)
    await command(api, admin, third["rolloutId"], "pause")
    await same_as_fresh()
