"""GET /metrics: Prometheus' text format, counters that move with what happens, gauges
read at scrape time, low-cardinality labels, and the optional bearer token."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from app.config import Secret, Settings
from app.metrics import route_template
from app.store import BuildRecord
from tests.conftest import START, Api, MakeApi


async def scrape(api: Api, token: str | None = None) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await api.client.get("/metrics", headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def beat(org: str, started: int, failed: int = 0, build: str = "build-old") -> dict[str, object]:
    return {
        "runnerId": "r1",
        "orgId": org,
        "bootId": "b1",
        "buildId": build,
        "sessions": {"started": started, "failed": failed, "disconnected": 0},
    }


async def test_metrics_follow_heartbeats_and_a_rollout(make_api: MakeApi, settings: Settings):
    api = await make_api(settings_override=settings.replace(stages_stable="50%:1h,100%"))
    admin = await api.token("admin")
    for build in ("build-old", "build-new"):
        await api.services.store.add_build(
            BuildRecord(build, "1.0.0", START, {"codex": "0.47.0"}, known_good_for=["codex"]),
            START,
        )
    await api.request(
        "PUT", "/channels/stable", token=admin, json={"buildId": "build-old", "reason": "x"}
    )
    before = await scrape(api)
    assert before.get('update_pipeline_heartbeats_total{outcome="accepted"}', 0) == 0
    for n in range(10):
        await api.post("/heartbeat", token=admin, json=beat(f"org-{n}", 0))
    await api.post("/heartbeat", token=admin, json={"runnerId": "bad"})
    _, rollout = await api.post(
        "/rollouts", token=admin, json={"buildId": "build-new", "channel": "stable"}
    )
    for org in rollout["affectedOrgIds"]:
        await api.post("/heartbeat", token=admin, json=beat(org, 0, build="build-old"))
        await api.post("/heartbeat", token=admin, json=beat(org, 20, 1, build="build-new"))

    after = await scrape(api)
    assert after['update_pipeline_heartbeats_total{outcome="accepted"}'] >= 10
    assert after['update_pipeline_heartbeats_total{outcome="rejected"}'] == 1
    assert after['update_pipeline_rollouts{state="rolling_out"}'] == 1
    assert after['update_pipeline_rollout_percentage{channel="stable"}'] == 50
    assert after['update_pipeline_rollout_stage_sessions{channel="stable"}'] == 20 * len(
        rollout["affectedOrgIds"]
    )
    assert after['update_pipeline_rollout_stage_failure_ratio{channel="stable"}'] == 0.05
    assert after["update_pipeline_outbox_pending{}"] == 0
    key = (
        'update_pipeline_http_requests_total{method="POST",'
        'route="/api/update-pipeline/rollouts",status="201"}'
    )
    assert after[key] == 1
    # Route templates, never ids: one series for every rollout's page.
    assert not any("org-1" in name or rollout["rolloutId"] in name for name in after)


async def test_the_metrics_token_guards_the_route_when_set(make_api: MakeApi, settings: Settings):
    api = await make_api(settings_override=settings.replace(metrics_token=Secret("scrape-me")))
    response = await api.client.get("/metrics")
    assert response.status == 401
    response = await api.client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert response.status == 401
    samples = await scrape(api, "scrape-me")
    assert any(name.startswith("update_pipeline_outbox_pending") for name in samples)


def test_github_paths_become_route_templates() -> None:
    for path, template in [
        ("/repos/acme/app/issues/12/comments", "/repos/{owner}/{repo}/issues/{n}/comments"),
        (
            "/repos/acme/app/contents/.github/update-pipeline.yml",
            "/repos/{owner}/{repo}/contents/{name}",
        ),
        ("/app/installations/42/access_tokens", "/app/installations/{n}/access_tokens"),
        (
            "/repos/acme/app/issues/7/labels/rollout:paused",
            "/repos/{owner}/{repo}/issues/{n}/labels/{name}",
        ),
        ("/repos/acme/app", "/repos/{owner}/{repo}"),
        ("/users/octocat", "/users/{name}"),
    ]:
        assert route_template(path) == template


async def test_processed_webhook_deliveries_are_counted_with_their_latency(
    make_api: MakeApi, github_settings: Settings, github: object
) -> None:
    from tests.test_webhooks import HOOK, WEBHOOKS, headers_for, wait_until

    api = await make_api(settings_override=github_settings, with_github=True)
    body = (WEBHOOKS / "issues.opened.0.json").read_bytes()
    response, _ = await api.post(HOOK, data=body, headers=headers_for("issues", body))
    assert response.status == 202

    async def processed() -> bool:
        return not await api.services.store.list_deliveries(status="pending", before=None, limit=1)

    await wait_until(processed)
    samples = await scrape(api)
    assert (
        samples['update_pipeline_webhook_deliveries_total{event="issues",outcome="processed"}'] == 1
    )
    assert samples["update_pipeline_webhook_delivery_seconds_count{}"] == 1
    assert samples['update_pipeline_webhook_deliveries_stored{state="done"}'] == 1
