"""Missed deliveries: GitHub is asked to redeliver exactly what never reached the store."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest

from app.github.redelivery import (
    MAX_REDELIVERIES_PER_DELIVERY,
    MAX_REDELIVERIES_PER_RUN,
    MissedDeliveries,
)
from app.github.webhooks import Deliveries
from app.store import SqliteStore

ATTEMPTS = "POST /app/hook/deliveries/{delivery_id}/attempts"


@pytest.fixture
def missed(store: SqliteStore, app_github, clock) -> MissedDeliveries:
    return MissedDeliveries(store, app_github, clock)


async def store_delivery(store: SqliteStore, clock, guid: str) -> None:
    body = json.dumps({"action": "opened"}).encode()
    assert await Deliveries(store, clock).accept(
        "issues", guid, body, action="opened", installation_id=None
    )


async def test_only_deliveries_never_stored_are_redelivered(
    github, missed: MissedDeliveries, store: SqliteStore, clock
):
    received, lost_failed, lost_ok = (str(uuid.uuid4()) for _ in range(3))
    github.add_delivery(guid=received)
    await store_delivery(store, clock, received)
    lost_id = github.add_delivery(guid=lost_failed, status_code=502)
    github.add_delivery(guid=lost_ok)  # GitHub thinks it arrived; the store never had it
    github.add_delivery("ping", None, status_code=502)

    requested = await missed.run_once()

    assert sorted(requested) == sorted([lost_failed, lost_ok])
    redelivered = {c.params["delivery_id"] for c in github.calls(ATTEMPTS)}
    assert str(lost_id) in redelivered
    assert len(redelivered) == 2


async def test_the_newest_attempt_is_redelivered_and_repeated_failures_are_left_alone(
    github, missed: MissedDeliveries
):
    stuck = str(uuid.uuid4())
    github.add_delivery(guid=stuck, status_code=500)
    for _ in range(MAX_REDELIVERIES_PER_DELIVERY):
        github.add_delivery(guid=stuck, status_code=500, redelivery=True)
    retrying = str(uuid.uuid4())
    github.add_delivery(guid=retrying, status_code=500)
    newest = github.add_delivery(guid=retrying, status_code=500, redelivery=True)

    assert await missed.run_once() == [retrying]
    (call,) = github.calls(ATTEMPTS)
    assert call.params["delivery_id"] == str(newest)


async def test_deliveries_older_than_github_keeps_are_ignored(
    github, missed: MissedDeliveries, clock
):
    github.add_delivery(status_code=502, delivered_at=clock.now() - timedelta(days=4))
    assert await missed.run_once() == []
    assert github.calls(ATTEMPTS) == []


async def test_each_run_is_bounded(github, missed: MissedDeliveries) -> None:
    for _ in range(MAX_REDELIVERIES_PER_RUN + 5):
        github.add_delivery(status_code=502)

    requested = await missed.run_once()

    assert len(requested) == MAX_REDELIVERIES_PER_RUN
    assert len(github.calls(ATTEMPTS)) == MAX_REDELIVERIES_PER_RUN
