"""The canary end to end over the API: builds, results, judgement, the known-good
registry, timeouts and channel recommendations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from app.clock import ManualClock
from app.config import Settings
from app.pipeline.canary.service import CanaryTimeouts, build_id_for_commit
from app.store import FoundVersion, Installation, Repository
from tests.conftest import START, Api, MakeApi
from tests.fake_oidc import FakeOidcIssuer

SHA = "0123456789abcdef0123456789abcdef01234567"


def build_body(build_id: str = "build-0123456789ab", **runtimes: str) -> dict[str, Any]:
    return {
        "buildId": build_id,
        "runnerVersion": "3.1.0",
        "builtAt": "2026-03-01T11:00:00.000Z",
        "runtimeVersions": runtimes or {"codex": "1.2.0", "claude_code": "2.0.1"},
        "repository": "acme/runner",
        "commitSha": SHA,
    }


def suite(provider: str, passed: int, failed: int = 0, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": f"{provider}-{n}", "provider": provider, "status": "passed", **extra}
        for n in range(passed)
    ] + [
        {"name": f"{provider}-f{n}", "provider": provider, "status": "failed", **extra}
        for n in range(failed)
    ]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A suite's results are larger than the small body limit the other tests use.
    return settings.replace(max_body_bytes=1024 * 1024)


@pytest.fixture
async def admin(api: Api) -> str:
    return await api.token("admin")


async def register(api: Api, admin: str, **runtimes: str) -> dict[str, Any]:
    response, body = await api.post("/builds", token=admin, json=build_body(**runtimes))
    assert response.status == 201, body
    return body


def test_the_id_of_a_build_made_from_a_commit_is_stable() -> None:
    assert build_id_for_commit(SHA) == "build-0123456789ab"
    assert build_id_for_commit(SHA.upper()) == "build-0123456789ab"
    with pytest.raises(ValueError):
        build_id_for_commit("not-a-sha")


async def test_a_registered_build_starts_its_canary_run(api: Api, admin: str) -> None:
    body = await register(api, admin)
    assert body["canary"]["state"] == "pending"
    assert body["canary"]["deadlineAt"] == "2026-03-01T13:00:00.000Z"  # 60 minutes
    assert body["knownGoodFor"] == []

    _, status = await api.get("/status", token=admin)
    assert status["activeCanaryTests"] == 1
    _, events = await api.get("/events?type=canary_started", token=admin)
    assert events["items"][0]["data"]["buildId"] == "build-0123456789ab"

    response, _ = await api.post("/builds", token=admin, json=build_body())
    assert response.status == 409
    response, _ = await api.get("/builds/build-0123456789ab", token=await api.token("viewer"))
    assert response.status == 200


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"buildId": "../etc"}, "buildId"),
        ({"runtimeVersions": {}}, "runtimeVersions"),
        ({"runtimeVersions": {"Codex!": "1"}}, "runtimeVersions"),
        ({"commitSha": "xyz"}, "commitSha"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_a_bad_build_is_refused_with_the_field_named(
    api: Api, admin: str, change: dict[str, Any], field: str
) -> None:
    response, body = await api.post("/builds", token=admin, json={**build_body(), **change})
    assert response.status == 400
    assert field in body["error"]["message"]


async def test_a_build_for_an_unknown_provider_is_refused(api: Api, admin: str) -> None:
    response, body = await api.post("/builds", token=admin, json=build_body(aider="1.0.0"))
    assert response.status == 400
    assert "aider" in body["error"]["message"]


async def test_passing_results_make_the_build_known_good_and_its_versions_canary_passed(
    api: Api, admin: str
) -> None:
    store = api.services.store
    for provider, version in (("codex", "1.2.0"), ("claude_code", "2.0.1")):
        await store.record_versions(
            [FoundVersion(provider, version, START, "npm")], START, keep_events=100
        )
    await register(api, admin)
    results = suite("codex", 19, 1, sessionStartMs=400, timeToFirstOutputMs=800) + suite(
        "claude_code", 20
    )
    response, body = await api.post(
        "/canary/build-0123456789ab/results", token=admin, json={"results": results}
    )
    assert response.status == 200, body
    assert body["status"] == "passed"
    assert body["knownGoodFor"] == ["claude_code", "codex"]
    assert body["metrics"]["perProvider"]["codex"]["passRate"] == 0.95

    _, build = await api.get("/builds/build-0123456789ab", token=admin)
    assert build["knownGoodFor"] == ["claude_code", "codex"]
    assert build["canary"]["state"] == "passed"
    _, versions = await api.get("/versions?providerId=codex", token=admin)
    assert versions["items"][0]["canaryPassed"] is True
    assert versions["items"][0]["canaryPassedAt"] == "2026-03-01T12:00:00.000Z"
    _, events = await api.get("/events?type=canary_completed", token=admin)
    assert events["items"][0]["data"]["status"] == "passed"


async def test_the_metrics_have_the_design_shape(api: Api, admin: str) -> None:
    await register(api, admin, codex="1.2.0")
    response, posted = await api.post(
        "/canary/build-0123456789ab/results",
        token=admin,
        json={"results": suite("codex", 48, 2, sessionStartMs=450)},
    )
    assert response.status == 200, posted
    response, body = await api.get("/canary/build-0123456789ab/metrics", token=admin)
    assert response.status == 200
    assert body["buildId"] == "build-0123456789ab"
    assert body["status"] == "passed"
    assert body["startedAt"] == body["completedAt"] == "2026-03-01T12:00:00.000Z"
    metrics = body["metrics"]
    assert {k: metrics[k] for k in ("totalTests", "passed", "failed", "passRate")} == {
        "totalTests": 50,
        "passed": 48,
        "failed": 2,
        "passRate": 0.96,
    }
    assert metrics["avgSessionStartMs"] == 450 and metrics["disconnectRate"] == 0.0
    assert set(metrics) == {
        "totalTests",
        "passed",
        "failed",
        "errored",
        "skipped",
        "passRate",
        "avgSessionStartMs",
        "avgTimeToFirstOutputMs",
        "disconnectRate",
        "perProvider",
    }


async def test_a_failing_provider_leaves_the_build_known_good_only_for_the_others(
    api: Api, admin: str
) -> None:
    await register(api, admin)
    results = suite("codex", 20) + suite("claude_code", 10, 10)
    _, body = await api.post(
        "/canary/build-0123456789ab/results", token=admin, json={"results": results}
    )
    assert (body["status"], body["knownGoodFor"]) == ("failed", ["codex"])
    assert "claude_code" in body["error"]


async def test_results_are_taken_once(api: Api, admin: str) -> None:
    await register(api, admin, codex="1.2.0")
    path = "/canary/build-0123456789ab/results"
    first, second = await asyncio.gather(
        api.post(path, token=admin, json={"results": suite("codex", 20)}),
        api.post(path, token=admin, json={"results": suite("codex", 0, 20)}),
    )
    assert sorted([first[0].status, second[0].status]) == [200, 409]
    response, body = await api.post(path, token=admin, json={"results": suite("codex", 0, 5)})
    assert response.status == 409
    assert "already" in body["error"]["message"]


async def test_the_same_report_posted_again_gets_the_same_answer(api: Api, admin: str) -> None:
    # A client that lost the first answer retries: it must not be told it failed.
    await register(api, admin, codex="1.2.0")
    path = "/canary/build-0123456789ab/results"
    results = suite("codex", 19, 1, sessionStartMs=300)
    first = await api.post(path, token=admin, json={"results": results})
    again = await api.post(path, token=admin, json={"results": results})
    assert first[0].status == again[0].status == 200
    assert first[1] == again[1]
    _, events = await api.get("/events?type=canary_completed", token=admin)
    assert len(events["items"]) == 1


async def test_results_for_an_unknown_build_are_404(api: Api, admin: str) -> None:
    response, _ = await api.post(
        "/canary/build-nope/results", token=admin, json={"results": suite("codex", 1)}
    )
    assert response.status == 404


@pytest.mark.parametrize(
    "results",
    [
        [{"name": "x", "provider": "codex", "status": "flaky"}],
        [{"name": "", "provider": "codex", "status": "passed"}],
        [{"name": "x", "provider": "codex", "status": "passed", "sessionStartMs": -1}],
        [{"name": "x" * 301, "provider": "codex", "status": "passed"}],
        [{"name": "x", "provider": "codex", "status": "passed", "extra": True}],
        [{"name": "x", "status": "passed"}],
    ],
)
async def test_malformed_results_are_refused_and_change_nothing(
    api: Api, admin: str, results: list[dict[str, Any]]
) -> None:
    await register(api, admin, codex="1.2.0")
    response, body = await api.post(
        "/canary/build-0123456789ab/results", token=admin, json={"results": results}
    )
    assert response.status == 400, body
    _, build = await api.get("/builds/build-0123456789ab", token=admin)
    assert build["canary"]["state"] == "pending"


async def test_too_many_results_are_refused(api: Api, admin: str) -> None:
    await register(api, admin, codex="1.2.0")
    response, body = await api.post(
        "/canary/build-0123456789ab/results",
        token=admin,
        json={"results": suite("codex", 5001)},
    )
    assert response.status == 400
    assert "results" in body["error"]["message"]


async def test_a_viewer_may_not_post_results(api: Api, admin: str) -> None:
    await register(api, admin, codex="1.2.0")
    response, _ = await api.post(
        "/canary/build-0123456789ab/results",
        token=await api.token("viewer"),
        json={"results": suite("codex", 1)},
    )
    assert response.status == 403


async def test_without_results_in_time_a_run_errors_even_across_a_restart(
    make_api: MakeApi, settings, clock: ManualClock
) -> None:
    first = await make_api(build=lambda services: [CanaryTimeouts(services.canary)])
    admin = await first.token("admin")
    await register(first, admin, codex="1.2.0")
    clock.advance(timedelta(minutes=59))
    assert await first.services.canary.expire_due() == []
    assert first.services.pipeline is not None
    await first.services.pipeline.stop()

    clock.advance(timedelta(minutes=2))  # the deadline passed while it was down
    second = await make_api(build=lambda services: [CanaryTimeouts(services.canary)])

    async def errored() -> bool:
        _, build = await second.get("/builds/build-0123456789ab", token=admin)
        return build["canary"]["state"] == "errored"

    for _ in range(200):
        if await errored():
            break
        await asyncio.sleep(0.01)
    _, build = await second.get("/builds/build-0123456789ab", token=admin)
    assert build["canary"]["state"] == "errored"
    assert build["canary"]["error"] == "no results within 1h"
    response, _ = await second.post(
        "/canary/build-0123456789ab/results", token=admin, json={"results": suite("codex", 5)}
    )
    assert response.status == 409  # late results


# -- channels -------------------------------------------------------------------------


async def test_channels_change_only_when_an_admin_recommends_a_known_good_build(
    api: Api, admin: str
) -> None:
    await register(api, admin, codex="1.2.0")
    _, channels = await api.get("/channels", token=admin)
    assert [c["buildId"] for c in channels["items"]] == [None, None]

    body = {"buildId": "build-0123456789ab", "reason": "ship it"}
    response, refused = await api.request("PUT", "/channels/stable", token=admin, json=body)
    assert response.status == 409
    assert "not known-good" in refused["error"]["message"]

    await api.post(
        "/canary/build-0123456789ab/results", token=admin, json={"results": suite("codex", 20)}
    )
    _, status = await api.get("/status", token=admin)
    assert status["recommendedBuilds"] == {"stable": None, "beta": None}  # a pass alone: no

    response, channel = await api.request("PUT", "/channels/stable", token=admin, json=body)
    assert response.status == 200
    assert (channel["buildId"], channel["reason"]) == ("build-0123456789ab", "ship it")
    assert channel["setBy"].startswith("token admin-")
    _, status = await api.get("/status", token=admin)
    assert status["recommendedBuilds"]["stable"] == "build-0123456789ab"
    _, events = await api.get("/events?type=channel_updated", token=admin)
    assert events["items"][0]["data"]["reason"] == "ship it"


async def test_forcing_a_build_that_is_not_known_good_needs_a_reason(api: Api, admin: str) -> None:
    await register(api, admin, codex="1.2.0")
    forced = {"buildId": "build-0123456789ab", "reason": "hotfix", "force": True}
    response, body = await api.request("PUT", "/channels/beta", token=admin, json=forced)
    assert response.status == 200 and body["buildId"] == "build-0123456789ab"
    no_reason = {"buildId": "build-0123456789ab", "force": True}
    response, _ = await api.request("PUT", "/channels/beta", token=admin, json=no_reason)
    assert response.status == 400
    response, _ = await api.request("PUT", "/channels/nightly", token=admin, json=forced)
    assert response.status == 404
    response, _ = await api.request(
        "PUT", "/channels/beta", token=await api.token("viewer"), json=forced
    )
    assert response.status == 403


# -- results from the canary workflow, with its OIDC token ---------------------------------


@pytest.fixture
async def issuer() -> AsyncIterator[FakeOidcIssuer]:
    async with FakeOidcIssuer() as fake:
        yield fake


@pytest.fixture
async def trusting(
    make_api: MakeApi, settings: Settings, issuer: FakeOidcIssuer, clock: ManualClock
) -> Api:
    """The app trusting acme/runners' canary.yml, as known from its installation."""
    api = await make_api(
        settings_override=settings.replace(runner_repo="acme/runners", oidc_issuer=issuer.url),
        oidc_issuer=issuer.url,
    )
    runners = Installation(7, "acme", "Organization", False, [Repository(424242, "acme/runners")])
    await api.services.store.save_installation(runners, clock.now())
    return api


async def post_as_workflow(api: Api, token: str, results: list[dict[str, Any]]) -> Any:
    return await api.post(
        "/canary/build-0123456789ab/results",
        headers={"Authorization": f"Bearer {token}"},
        json={"results": results},
    )


async def test_a_canary_runs_end_to_end_with_the_workflows_oidc_token(
    trusting: Api, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    admin = await trusting.token("admin")
    await register(trusting, admin, codex="1.2.0")
    token = issuer.mint(issuer.claims(clock.now()))
    response, body = await post_as_workflow(trusting, token, suite("codex", 20))
    assert response.status == 200, body

    response, report = await trusting.get("/canary/build-0123456789ab/metrics", token=admin)
    assert response.status == 200
    assert (report["buildId"], report["status"]) == ("build-0123456789ab", "passed")
    assert report["metrics"]["totalTests"] == 20 and report["metrics"]["passRate"] == 1.0
    (run,) = await trusting.services.store.list_canary_runs("build-0123456789ab")
    assert run.reported_by == "workflow run 22259804324"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"repository": "evil/runners"}, "repository"),
        ({"repository_id": "999"}, "with id 424242"),
        ({"workflow_ref": "acme/runners/.github/workflows/other.yml@refs/heads/main"}, "workflow"),
        ({"event_name": "push"}, "workflow_dispatch"),
        ({"aud": "someone-else"}, "aud"),
    ],
)
async def test_tokens_that_prove_the_wrong_thing_are_refused(
    trusting: Api, issuer: FakeOidcIssuer, clock: ManualClock, claims: dict[str, Any], reason: str
) -> None:
    admin = await trusting.token("admin")
    await register(trusting, admin, codex="1.2.0")
    token = issuer.mint(issuer.claims(clock.now(), **claims))
    response, body = await post_as_workflow(trusting, token, suite("codex", 20))
    assert response.status == 401
    assert reason in body["error"]["message"]
    _, build = await trusting.get("/builds/build-0123456789ab", token=admin)
    assert build["canary"]["state"] == "pending"


async def test_an_unknown_build_is_not_revealed_to_a_bad_token(trusting: Api) -> None:
    response, _ = await post_as_workflow(trusting, "not-a-token", suite("codex", 1))
    assert response.status == 401


async def test_an_unreachable_issuer_is_a_503_to_retry(
    trusting: Api, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    admin = await trusting.token("admin")
    await register(trusting, admin, codex="1.2.0")
    issuer.fail_with = 502
    token = issuer.mint(issuer.claims(clock.now()))
    response, body = await post_as_workflow(trusting, token, suite("codex", 20))
    assert response.status == 503
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert response.headers["Retry-After"] == "60"


async def test_workflow_tokens_wait_for_the_runner_repositorys_id(
    make_api: MakeApi, settings: Settings, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    api = await make_api(
        settings_override=settings.replace(runner_repo="acme/runners", oidc_issuer=issuer.url),
        oidc_issuer=issuer.url,
    )
    await register(api, await api.token("admin"), codex="1.2.0")
    token = issuer.mint(issuer.claims(clock.now()))
    response, body = await post_as_workflow(api, token, suite("codex", 20))
    assert response.status == 401
    assert "installed on acme/runners" in body["error"]["message"]


async def test_without_a_runner_repository_workflow_tokens_are_not_accepted(
    api: Api, admin: str
) -> None:
    await register(api, admin, codex="1.2.0")
    response, body = await post_as_workflow(api, "eyJhbGciOi.x.y", suite("codex", 1))
    assert response.status == 401
    assert "UPDATE_PIPELINE_RUNNER_REPO" in body["error"]["message"]
