"""Token management over the API: issue one or many, list without secrets, revoke."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import timedelta

from app.auth import OUTSIDE_CHECK_SECONDS, TOUCH_EVERY, TokenService
from app.store import SqliteStore
from tests.conftest import Api


async def test_an_issued_token_is_shown_once_and_works(api: Api, db_path):
    admin = await api.token("admin")
    response, body = await api.post("/tokens", token=admin, json={"name": "dash", "role": "viewer"})
    assert response.status == 201
    (item,) = body["items"]
    secret = item["token"]
    assert secret.startswith("upt_") and len(secret) >= 4 + 43  # 32 random bytes
    assert item["name"] == "dash" and item["role"] == "viewer" and item["state"] == "active"

    response, _ = await api.get("/status", token=secret)
    assert response.status == 200

    _, listing = await api.get("/tokens", token=admin)
    assert all("token" not in t for t in listing["items"])
    assert secret not in str(listing)
    # Only the SHA-256 of the secret is stored.
    with sqlite3.connect(db_path) as db:
        stored = db.execute("SELECT token_hash FROM api_tokens WHERE name = 'dash'").fetchone()[0]
        dump = "\n".join(db.iterdump())
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in dump


async def test_runner_tokens_for_many_orgs_are_issued_in_one_request(api: Api):
    admin = await api.token("admin")
    batch = [{"name": f"runner-{i}", "role": "runner", "orgId": f"org-{i}"} for i in range(50)]
    response, body = await api.post("/tokens", token=admin, json=batch)
    assert response.status == 201
    assert [t["orgId"] for t in body["items"]] == [f"org-{i}" for i in range(50)]
    assert len({t["token"] for t in body["items"]}) == 50

    _, events = await api.get("/events?type=tokens_issued", token=admin)
    (event,) = events["items"]
    assert len(event["data"]["tokens"]) == 50
    assert event["data"]["by"] == "token:admin-1"
    assert set(event["data"]["tokens"][0]) == {"name", "role", "orgId"}


async def test_a_batch_with_a_taken_name_issues_nothing(api: Api):
    admin = await api.token("admin", name="ops")
    batch = [{"name": "new-1", "role": "viewer"}, {"name": "ops", "role": "viewer"}]
    response, body = await api.post("/tokens", token=admin, json=batch)
    assert response.status == 409
    assert body["error"] == {"code": "CONFLICT", "message": "a token named 'ops' already exists"}
    _, listing = await api.get("/tokens", token=admin)
    assert [t["name"] for t in listing["items"]] == ["ops"]


async def test_a_name_twice_in_one_batch_is_400(api: Api):
    admin = await api.token("admin")
    batch = [{"name": "twin", "role": "viewer"}, {"name": "twin", "role": "admin"}]
    response, body = await api.post("/tokens", token=admin, json=batch)
    assert response.status == 400
    assert "appears twice" in body["error"]["message"]


async def test_token_requests_are_validated(api: Api):
    admin = await api.token("admin")
    cases = [
        ({"name": "r", "role": "runner"}, "organisation"),
        ({"name": "v", "role": "viewer", "orgId": "org-1"}, "only runner tokens"),
        ({"name": "x", "role": "viewer", "expiresIn": "soon"}, "expiresIn"),
        ({"name": "x", "role": "viewer", "expiresIn": "0s"}, "future"),
        ({"name": "bad name!", "role": "viewer"}, "body.name"),
        ({"name": "x", "role": "viewer", "extra": 1}, "extra"),
        ([], "body"),
    ]
    for request, expected in cases:
        response, body = await api.post("/tokens", token=admin, json=request)
        assert response.status == 400, request
        assert expected in body["error"]["message"], (request, body)
    _, listing = await api.get("/tokens", token=admin)
    assert len(listing["items"]) == 1


async def test_expiring_tokens_report_their_expiry_and_stop_working(api: Api, clock):
    admin = await api.token("admin")
    _, body = await api.post(
        "/tokens", token=admin, json={"name": "temp", "role": "viewer", "expiresIn": "1h30m"}
    )
    (item,) = body["items"]
    assert item["expiresAt"] == "2026-03-01T13:30:00.000Z"
    clock.advance(timedelta(hours=1, minutes=30))
    response, _ = await api.get("/status", token=item["token"])
    assert response.status == 401
    _, listing = await api.get("/tokens", token=admin)
    assert {t["name"]: t["state"] for t in listing["items"]}["temp"] == "expired"


async def test_revoking_takes_effect_at_once(api: Api):
    admin = await api.token("admin")
    viewer = await api.token("viewer", name="laptop")
    assert (await api.get("/status", token=viewer))[0].status == 200  # now cached

    response, body = await api.delete("/tokens/laptop", token=admin)
    assert response.status == 200
    assert body["state"] == "revoked" and body["revokedAt"] is not None
    assert (await api.get("/status", token=viewer))[0].status == 401

    response, body = await api.delete("/tokens/laptop", token=admin)
    assert response.status == 404
    _, listing = await api.get("/tokens?includeRevoked=true", token=admin)
    assert {t["name"]: t["state"] for t in listing["items"]}["laptop"] == "revoked"
    _, listing = await api.get("/tokens", token=admin)
    assert "laptop" not in {t["name"] for t in listing["items"]}


async def test_last_used_is_recorded_without_a_write_per_request(api: Api, clock, monkeypatch):
    viewer = await api.token("viewer", name="poller")
    writes: list[object] = []
    original = api.services.store.touch_token

    async def counting(token_id, at):
        writes.append(at)
        await original(token_id, at)

    monkeypatch.setattr(api.services.store, "touch_token", counting)
    for _ in range(5):
        await api.get("/status", token=viewer)
    clock.advance(TOUCH_EVERY)
    await api.get("/status", token=viewer)
    assert len(writes) == 2
    (record,) = [t for t in await api.services.tokens.list() if t.name == "poller"]
    assert record.last_used_at == clock.now()


async def test_a_token_revoked_by_another_process_stops_working_within_a_second(
    api: Api, db_path, clock
):
    viewer = await api.token("viewer", name="shared")
    assert (await api.get("/status", token=viewer))[0].status == 200  # cached now

    # The token CLI runs as its own process with its own connection to the same file.
    other = await SqliteStore.open(db_path)
    try:
        await TokenService(other, clock).revoke("shared", by="test")
    finally:
        await other.close()

    clock.advance(timedelta(seconds=OUTSIDE_CHECK_SECONDS))
    response, body = await api.get("/status", token=viewer)
    assert response.status == 401
    assert body["error"]["message"] == "token revoked"
