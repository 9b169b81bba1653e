"""Webhook intake: signatures checked, deliveries stored once, processed, retried, parked."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sqlite3
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from gidgethub import routing, sansio

from app.github.webhooks import (
    MAX_ATTEMPTS,
    Deliveries,
    WebhookContext,
    WebhookProcessor,
    delivery_fields,
)
from app.store import SqliteStore
from tests.conftest import Api, MakeApi
from tests.github_fixtures import WEBHOOK_SECRET

WEBHOOKS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "webhooks"
PAYLOADS = sorted(WEBHOOKS.glob("*.json"))
HOOK = "/api/github/webhooks"


def sign(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def headers_for(event: str, body: bytes, **extra: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(body),
        **extra,
    }


def stored_count(db_path: Path) -> int:
    with sqlite3.connect(db_path) as db:
        return int(db.execute("SELECT count(*) FROM webhook_deliveries").fetchone()[0])


@pytest.fixture
async def hooked(make_api: MakeApi, github_settings, github) -> Api:
    return await make_api(settings_override=github_settings, with_github=True)


async def wait_until(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("path", PAYLOADS, ids=lambda p: p.stem)
async def test_every_real_payload_correctly_signed_is_accepted_without_error(
    hooked: Api, path: Path, caplog
):
    body = path.read_bytes()
    event = path.name.split(".")[0]
    with caplog.at_level(logging.WARNING):
        response, answer = await hooked.post(HOOK, data=body, headers=headers_for(event, body))
        if event == "ping":
            assert (response.status, answer) == (200, {"pong": True})
            return
        assert response.status == 202
        assert answer == {"accepted": True, "duplicate": False}
        store = hooked.services.store

        async def processed() -> bool:
            (delivery,) = await store.list_deliveries(status=None, before=None, limit=5)
            return delivery.status == "done"

        await wait_until(processed)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


BODY = (WEBHOOKS / "issue_comment.created.0.json").read_bytes()


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ("tampered body", 401),
        ("wrong secret", 401),
        ("sha1 only", 401),
        ("no signature", 401),
        ("form encoded", 400),
        ("truncated json", 400),
        ("no delivery id", 400),
    ],
)
async def test_bad_deliveries_are_refused_and_nothing_is_stored(
    hooked: Api, db_path: Path, change: str, status: int
):
    body, headers = BODY, headers_for("issue_comment", BODY)
    if change == "tampered body":
        body = BODY.replace(b'"created"', b'"deleted"')
    elif change == "wrong secret":
        headers["X-Hub-Signature-256"] = sign(BODY, "not-the-secret")
    elif change == "sha1 only":
        del headers["X-Hub-Signature-256"]
        headers["X-Hub-Signature"] = (
            "sha1=" + hmac.new(WEBHOOK_SECRET.encode(), BODY, hashlib.sha1).hexdigest()
        )
    elif change == "no signature":
        del headers["X-Hub-Signature-256"]
    elif change == "form encoded":
        body = b"payload=" + BODY
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        headers["X-Hub-Signature-256"] = sign(body)
    elif change == "truncated json":
        body = BODY[: len(BODY) // 2]
        headers["X-Hub-Signature-256"] = sign(body)
    elif change == "no delivery id":
        del headers["X-GitHub-Delivery"]
    response, answer = await hooked.post(HOOK, data=body, headers=headers)
    assert response.status == status, answer
    assert "error" in answer
    assert stored_count(db_path) == 0


async def test_an_oversized_delivery_is_413_and_not_stored(
    make_api: MakeApi, github_settings, github, db_path: Path
):
    api = await make_api(settings_override=github_settings.replace(webhook_max_bytes=4096))
    body = json.dumps({"action": "created", "padding": "x" * 5000}).encode()
    response, answer = await api.post(HOOK, data=body, headers=headers_for("issues", body))
    assert response.status == 413
    assert answer["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert stored_count(db_path) == 0


async def test_without_a_webhook_secret_deliveries_are_refused(api: Api, db_path: Path):
    response, answer = await api.post(HOOK, data=BODY, headers=headers_for("issues", BODY))
    assert response.status == 503
    assert "GITHUB_WEBHOOK_SECRET" in answer["error"]["message"]
    assert stored_count(db_path) == 0


async def test_a_redelivered_id_is_acknowledged_and_processed_once(
    hooked: Api, github, db_path: Path
):
    body = (WEBHOOKS / "installation.created.0.json").read_bytes()
    headers = headers_for("installation", body)
    first, _ = await hooked.post(HOOK, data=body, headers=headers)
    second, answer = await hooked.post(HOOK, data=body, headers=headers)
    assert (first.status, second.status) == (202, 202)
    assert answer == {"accepted": True, "duplicate": True}
    assert stored_count(db_path) == 1

    store = hooked.services.store

    async def processed() -> bool:
        done = await store.list_deliveries(status="done", before=None, limit=5)
        return [d.attempts for d in done] == [1]

    await wait_until(processed)
    installation_id = json.loads(body)["installation"]["id"]
    assert [i.id for i in await store.list_installations()] == [installation_id]


async def test_deliveries_are_stored_while_the_pipeline_is_disabled(
    make_api: MakeApi, github_settings, github, db_path: Path
):
    api = await make_api(settings_override=github_settings.replace(enabled=False))
    response, _ = await api.post(HOOK, data=BODY, headers=headers_for("issue_comment", BODY))
    assert response.status == 202
    (delivery,) = await api.services.store.list_deliveries(status="pending", before=None, limit=5)
    assert delivery.event == "issue_comment" and delivery.action == "created"


# -- The worker, driven directly --------------------------------------------------------


class Flaky:
    """A feature router whose handler fails a given number of times, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.router = routing.Router()
        self.router.add(self.handle, "issues")

    async def handle(self, event: sansio.Event, context: WebhookContext) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"boom {self.calls}")


async def accept_issue_event(deliveries: Deliveries) -> str:
    delivery_id = str(uuid.uuid4())
    body = (WEBHOOKS / "issues.opened.0.json").read_bytes()
    action, installation_id = delivery_fields(json.loads(body))
    assert await deliveries.accept(
        "issues", delivery_id, body, action=action, installation_id=installation_id
    )
    return delivery_id


async def run_due(processor: WebhookProcessor) -> None:
    for delivery in await processor.store.due_deliveries(processor.clock.now(), limit=50):
        await processor.process(delivery)


async def test_a_failing_handler_is_retried_with_backoff_then_succeeds(store: SqliteStore, clock):
    flaky = Flaky(failures=2)
    deliveries = Deliveries(store, clock)
    processor = WebhookProcessor(deliveries, [flaky.router], WebhookContext())
    delivery_id = await accept_issue_event(deliveries)

    await run_due(processor)
    (pending,) = await store.list_deliveries(status="pending", before=None, limit=5)
    assert pending.last_error == "RuntimeError: boom 1"
    await run_due(processor)  # not due yet: nothing happens
    assert flaky.calls == 1

    clock.advance(timedelta(seconds=2))
    await run_due(processor)
    clock.advance(timedelta(seconds=4))
    await run_due(processor)
    (done,) = await store.list_deliveries(status="done", before=None, limit=5)
    assert (done.delivery_id, done.attempts, flaky.calls) == (delivery_id, 3, 3)


async def test_a_handler_that_keeps_failing_is_parked_and_the_api_re_runs_it(
    make_api: MakeApi, clock
):
    api = await make_api()
    flaky = Flaky(failures=MAX_ATTEMPTS)
    processor = WebhookProcessor(api.services.deliveries, [flaky.router], WebhookContext())
    delivery_id = await accept_issue_event(api.services.deliveries)
    for _ in range(MAX_ATTEMPTS):
        await run_due(processor)
        clock.advance(timedelta(minutes=10))
    admin = await api.token("admin")
    _, failed = await api.get("/webhooks/deliveries?status=failed", token=admin)
    (item,) = failed["items"]
    assert item["id"] == delivery_id
    assert item["attempts"] == MAX_ATTEMPTS
    assert item["lastError"] == f"RuntimeError: boom {MAX_ATTEMPTS}"

    response, requeued = await api.post(f"/webhooks/deliveries/{delivery_id}/retry", token=admin)
    assert response.status == 200 and requeued["status"] == "pending"
    await run_due(processor)
    _, done = await api.get("/webhooks/deliveries?status=done", token=admin)
    assert [d["id"] for d in done["items"]] == [delivery_id]

    response, _ = await api.post("/webhooks/deliveries/nope/retry", token=admin)
    assert response.status == 404


async def test_deliveries_acknowledged_before_a_crash_are_processed_after_restart(
    db_path: Path, clock
):
    first = await SqliteStore.open(db_path)
    accepted = [await accept_issue_event(Deliveries(first, clock)) for _ in range(3)]
    await first.close()  # the process died before its worker got to them

    store = await SqliteStore.open(db_path)
    try:
        counter = Flaky(failures=0)
        processor = WebhookProcessor(Deliveries(store, clock), [counter.router], WebhookContext())
        await run_due(processor)
        await run_due(processor)
        done = await store.list_deliveries(status="done", before=None, limit=10)
        assert sorted(d.delivery_id for d in done) == sorted(accepted)
        assert counter.calls == 3
    finally:
        await store.close()
