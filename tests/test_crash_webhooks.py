"""Crash safety of webhook intake, with the real service killed by SIGKILL.

The promise under test: a delivery answered 202 is durable and is processed exactly
once, whatever moment the process dies at. "Processed" means its completion was
committed (status 'done'); ``finish_delivery`` counts attempts in that same commit, so
a delivery completed twice would show attempts == 2. A kill after a handler ran but
before that commit makes the handler run again after the restart; that is by design
(handlers must tolerate it, and their GitHub effects are committed with the completion),
and it still ends with one completion.

Every payload is a real GitHub delivery from ../shared/conformance/webhooks. The service
runs without GitHub App credentials, so no handler calls out: installation events have
no registry to update and comments find no registered commands.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.service_process import ServiceProcess, WebhookReply, post_webhook

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock are POSIX-only")

WEBHOOKS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "webhooks"
# A ping is answered without being stored, so it has nothing to survive a crash.
PAYLOADS = [
    (path.name.split(".")[0], path.read_bytes())
    for path in sorted(WEBHOOKS.glob("*.json"))
    if not path.name.startswith("ping.")
]
DRAIN_TIMEOUT = 15.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)


# -- reading the database from outside the service ----------------------------------------


def _connect(db: Path) -> sqlite3.Connection:
    # Read-only, so looking never changes what the service finds on its next start.
    return sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)


@dataclass(frozen=True)
class Row:
    status: str
    attempts: int
    payload: str


def stored_deliveries(db: Path) -> dict[str, list[Row]]:
    """Every stored row, grouped by delivery id (a list, so a duplicate would show)."""
    with closing(_connect(db)) as conn:
        rows = conn.execute(
            "SELECT delivery_id, status, attempts, payload FROM webhook_deliveries"
        ).fetchall()
    grouped: dict[str, list[Row]] = {}
    for delivery_id, status, attempts, payload in rows:
        grouped.setdefault(delivery_id, []).append(Row(status, attempts, payload))
    return grouped


def pending_count(db: Path) -> int:
    with closing(_connect(db)) as conn:
        query = "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
        return int(conn.execute(query).fetchone()[0])


def integrity(db: Path) -> list[str]:
    with closing(_connect(db)) as conn:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        problems += [repr(row) for row in conn.execute("PRAGMA foreign_key_check")]
    return problems


async def wait_until_drained(service: ServiceProcess, expected: int, context: str) -> None:
    """Until every expected delivery is stored and none is pending."""
    deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT
    while True:
        stored = stored_deliveries(service.db)
        pending = sum(row.status == "pending" for rows in stored.values() for row in rows)
        if len(stored) >= expected and pending == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"{pending} of {len(stored)} deliveries still pending (expected {expected})"
                f" after {DRAIN_TIMEOUT}s; {context}\n{service.output(last=1)}"
            )
        await asyncio.sleep(0.05)


def exactly_once_problems(db: Path, acknowledged: dict[str, bytes]) -> list[str]:
    """What contradicts "every acknowledged delivery is stored intact, once, and was
    completed once", and "nothing was stored that was not sent"."""
    stored = stored_deliveries(db)
    problems = []
    for delivery_id, body in acknowledged.items():
        rows = stored.get(delivery_id, [])
        if len(rows) != 1:
            problems.append(f"{delivery_id}: stored {len(rows)} times")
            continue
        (row,) = rows
        if (row.status, row.attempts) != ("done", 1):
            problems.append(f"{delivery_id}: status {row.status}, attempts {row.attempts}")
        if row.payload.encode() != body:
            problems.append(f"{delivery_id}: stored payload differs from the body sent")
    problems += [f"{d}: stored but never acknowledged" for d in stored.keys() - acknowledged]
    return problems


# -- a crash with deliveries waiting ----------------------------------------------------


async def test_deliveries_acknowledged_before_a_crash_are_processed_once_after_restart(
    tmp_path: Path,
):
    # With the pipeline off the worker does not run, so every delivery is still waiting
    # when the process dies: the restart alone must find and finish all of them.
    async with (
        ServiceProcess(tmp_path, env={"UPDATE_PIPELINE_ENABLED": "false"}) as service,
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
    ):
        health = await service.start()
        assert health["enabled"] is False

        acknowledged: dict[str, bytes] = {}
        for event, body in PAYLOADS:
            delivery_id = str(uuid.uuid4())
            reply = await post_webhook(
                session, service.webhook_url, event=event, delivery_id=delivery_id, body=body
            )
            assert reply == WebhookReply(202, {"accepted": True, "duplicate": False}), event
            acknowledged[delivery_id] = body

        await service.kill()
        waiting = stored_deliveries(service.db)
        assert set(waiting) == set(acknowledged)
        assert {(r.status, r.attempts) for rows in waiting.values() for r in rows} == {
            ("pending", 0)
        }, "the disabled worker processed something; the crash would test nothing"

        await service.start(env={"UPDATE_PIPELINE_ENABLED": "true"})
        await wait_until_drained(service, len(acknowledged), "after one restart")
        await service.stop()

        assert exactly_once_problems(service.db, acknowledged) == []
        assert integrity(service.db) == ["ok"]


# -- crashes at random moments under load -------------------------------------------------


KILLS = 5
SENDERS = 4
DELIBERATE_DUPLICATES = 5


@dataclass
class Traffic:
    """The senders' shared record of what the service was sent and what it answered."""

    session: aiohttp.ClientSession
    service: ServiceProcess
    up: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    acknowledged: dict[str, bytes] = field(default_factory=dict)
    events: dict[str, str] = field(default_factory=dict)
    unanswered: set[str] = field(default_factory=set)
    resend: list[tuple[str, str, bytes]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Resends found already stored: the kill came after the commit, before the answer.
    answers_lost: set[str] = field(default_factory=set)
    fresh: Iterator[tuple[str, str, bytes]] = field(init=False)

    def __post_init__(self) -> None:
        counter = itertools.count()
        self.fresh = (
            (f"crash-{next(counter)}", event, body) for event, body in itertools.cycle(PAYLOADS)
        )

    async def sender(self) -> None:
        while True:
            await self.up.wait()
            if self.resend:
                delivery_id, event, body = self.resend.pop()
            elif self.stopping.is_set():
                return
            else:
                delivery_id, event, body = next(self.fresh)
            reply = await post_webhook(
                self.session,
                self.service.webhook_url,
                event=event,
                delivery_id=delivery_id,
                body=body,
            )
            if reply is None:
                # No answer: it may or may not be stored. GitHub would redeliver it under
                # the same id, so do the same once the service is back.
                self.unanswered.add(delivery_id)
                self.resend.append((delivery_id, event, body))
                await asyncio.sleep(0.02)
                continue
            self.record(delivery_id, event, body, reply)

    def record(self, delivery_id: str, event: str, body: bytes, reply: WebhookReply) -> None:
        if reply.status != 202 or not isinstance(reply.body, dict):
            self.problems.append(f"{delivery_id}: answered {reply.status} {reply.body!r}")
            return
        # A first post can only be new. A resend may find it stored by the attempt whose
        # answer was lost, and then it must say so rather than store it again.
        if reply.body.get("duplicate"):
            if delivery_id not in self.unanswered:
                self.problems.append(f"{delivery_id}: first post answered duplicate=true")
            self.answers_lost.add(delivery_id)
        self.acknowledged[delivery_id] = body
        self.events[delivery_id] = event


async def test_deliveries_acknowledged_while_the_service_is_killed_at_random_are_processed_once(
    tmp_path: Path,
):
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    pending_at_kill: list[int] = []

    async with (
        ServiceProcess(tmp_path, env={"UPDATE_PIPELINE_ENABLED": "true"}) as service,
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
    ):
        traffic = Traffic(session, service)

        def context() -> str:
            return (
                f"seed {seed} (rerun with CRASH_SEED={seed}); {len(traffic.acknowledged)}"
                f" acknowledged, {len(traffic.unanswered)} left unanswered by a kill (of which"
                f" {len(traffic.answers_lost)} had been stored); pending at each kill:"
                f" {pending_at_kill}; service logs in {tmp_path}"
            )

        await service.start()
        traffic.up.set()
        senders = [asyncio.create_task(traffic.sender()) for _ in range(SENDERS)]
        try:
            acknowledged_before_last_kill: list[str] = []
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.1, 0.5))
                traffic.up.clear()
                acknowledged_before_last_kill = list(traffic.acknowledged)
                await service.kill()
                # The state exactly as the crash left it, before a restart repairs anything.
                assert integrity(service.db) == ["ok"], context()
                pending_at_kill.append(pending_count(service.db))
                await service.start()
                traffic.up.set()
            await asyncio.sleep(rng.uniform(0.1, 0.3))
            traffic.stopping.set()
            await asyncio.wait_for(asyncio.gather(*senders), DRAIN_TIMEOUT)
        finally:
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)

        assert traffic.problems == [], context()
        assert traffic.unanswered, f"no post was cut off by a kill; {context()}"

        # Redeliveries of what was acknowledged before the last crash: the dedup must
        # outlive the process, and must not store or process them again.
        for delivery_id in rng.sample(acknowledged_before_last_kill, DELIBERATE_DUPLICATES):
            reply = await post_webhook(
                session,
                service.webhook_url,
                event=traffic.events[delivery_id],
                delivery_id=delivery_id,
                body=traffic.acknowledged[delivery_id],
            )
            assert reply == WebhookReply(202, {"accepted": True, "duplicate": True}), context()

        await wait_until_drained(service, len(traffic.acknowledged), context())
        await service.stop()

        assert exactly_once_problems(service.db, traffic.acknowledged) == [], context()
        assert integrity(service.db) == ["ok"], context()
