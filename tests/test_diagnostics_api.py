"""The operator's view of the outbox and queues: /diagnostics, /outbox, and retrying a
parked entry."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.clock import ManualClock
from app.github.outbox import add_comment, edit_issue
from tests.conftest import Api, MakeApi
from tests.fake_github import FakeGitHub
from tests.test_webhooks import wait_until

REPO = "acme/runner"
COMMENTS = "POST /repos/{owner}/{repo}/issues/{issue_number}/comments"


@pytest.fixture
async def api(make_api: MakeApi, github_settings, github: FakeGitHub, installation: int) -> Api:
    return await make_api(settings_override=github_settings, with_github=True)


async def test_diagnostics_show_the_depth_age_and_error_of_a_waiting_outbox(
    api: Api, github: FakeGitHub, installation: int, clock: ManualClock
) -> None:
    admin = await api.token("admin")
    issue = github.add_issue(REPO, "Rollout")
    github.inject(COMMENTS, status=502, times=None)
    await api.services.outbox.add(
        [add_comment(installation, REPO, issue, f"n{n}", key=f"k-{n}") for n in range(3)]
    )

    async def tried() -> bool:
        stats = await api.services.store.outbox_stats()
        return stats.oldest_pending is not None and stats.oldest_pending.attempts == 1

    await wait_until(tried)
    clock.advance(timedelta(seconds=90))

    response, body = await api.get("/diagnostics", token=admin)
    assert response.status == 200
    outbox = body["outbox"]
    assert (outbox["pending"], outbox["failed"]) == (3, 0)
    assert outbox["oldestPendingAgeSeconds"] == 90
    assert outbox["oldestPending"]["kind"] == "comment"
    assert "502" in outbox["oldestPending"]["lastError"]
    assert body["github"]["state"] in ("ok", "connecting")
    assert body["github"]["calls"] >= 1
    assert "payload" not in outbox["oldestPending"]  # what people wrote stays out


async def test_an_empty_outbox_has_no_oldest_entry(api: Api) -> None:
    _, body = await api.get("/diagnostics", token=await api.token("admin"))
    assert body["outbox"] == {
        "pending": 0,
        "failed": 0,
        "oldestPendingAgeSeconds": None,
        "oldestPending": None,
    }
    assert body["webhooks"] == {"pending": 0, "failed": 0, "done": 0}


@pytest.mark.parametrize("path", ["/diagnostics", "/outbox"])
async def test_only_admins_see_diagnostics(api: Api, path: str) -> None:
    response, _ = await api.get(path, token=await api.token("viewer"))
    assert response.status == 403
    response, _ = await api.get(path)
    assert response.status == 401


async def test_a_parked_entry_is_listed_and_can_be_retried(
    api: Api, github: FakeGitHub, installation: int, clock: ManualClock
) -> None:
    admin = await api.token("admin")
    issue = github.add_issue(REPO, "Rollout")
    store, outbox = api.services.store, api.services.outbox
    refusal = github.inject(COMMENTS, status=422, times=None)
    await outbox.add([add_comment(installation, REPO, issue, "hi", key="p-1")])

    async def parked() -> bool:
        clock.advance(timedelta(minutes=1))  # each refusal is retried a little later
        outbox.written()
        return bool(await store.list_effects(status="failed", limit=1))

    await wait_until(parked)
    _, listed = await api.get("/outbox?status=failed", token=admin)
    (entry,) = listed["items"]
    assert entry["kind"] == "comment" and "422" in entry["lastError"]

    refusal.times = 0
    response, body = await api.post(f"/outbox/{entry['id']}/retry", token=admin)
    assert response.status == 200 and body["status"] == "pending"

    async def applied() -> bool:
        return bool(await store.list_effects(status="done", limit=1))

    await wait_until(applied)
    assert len(github.repo(REPO).comments) == 1
    response, _ = await api.post(f"/outbox/{entry['id']}/retry", token=admin)
    assert response.status == 404  # applied, so no longer parked
    response, _ = await api.post("/outbox/nope/retry", token=admin)
    assert response.status == 404


async def test_retrying_an_edit_a_newer_one_replaces_is_a_conflict(
    api: Api, github: FakeGitHub, installation: int
) -> None:
    admin = await api.token("admin")
    store = api.services.store
    github.inject("PATCH /repos/*", status=503, times=None)  # keep the newer one waiting
    await store.add_effects(
        [edit_issue(installation, REPO, issue_number=7, body="old")], api.services.clock.now()
    )
    (old,) = await store.list_effects(status="pending", limit=1)
    await store.fail_effect(old.id, "GitHub answered 404", retry_at=None, at=old.created_at)
    await store.add_effects(
        [edit_issue(installation, REPO, issue_number=7, body="new")], api.services.clock.now()
    )
    response, body = await api.post(f"/outbox/{old.id}/retry", token=admin)
    assert response.status == 409
    assert body["error"]["code"] == "CONFLICT"


async def test_the_outbox_list_pages_newest_first(api: Api, installation: int) -> None:
    admin = await api.token("admin")
    store = api.services.store
    for n in range(5):
        await store.add_effects(
            [add_comment(installation, REPO, 1, "x", key=f"page-{n}")], api.services.clock.now()
        )
    _, first = await api.get("/outbox?limit=3", token=admin)
    _, second = await api.get(f"/outbox?limit=3&cursor={first['nextCursor']}", token=admin)
    ids = [e["id"] for e in first["items"] + second["items"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5
    assert second["nextCursor"] is None
    for cursor in ["abc", "²", "9" * 40]:
        response, _ = await api.get(f"/outbox?cursor={cursor}", token=admin)
        assert response.status == 400
