"""Webhook deliveries: verified, stored once, then processed by a worker through routers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson
from gidgethub import routing, sansio

from app.clock import Clock
from app.github.commands import CommandRegistry, PermissionCache
from app.github.outbox import Outbox, transient
from app.logs import get_logger
from app.metrics import Metrics
from app.store import Delivery, NewEffect, Store, StoreBusy

if TYPE_CHECKING:
    from app.config import Settings
    from app.github.app import GitHubApp
    from app.github.installations import InstallationRegistry
    from app.pipeline import UpdatePipeline
    from app.pipeline.canary.service import CanaryService

log = get_logger("github.webhooks")

MAX_ATTEMPTS = 5
RETRY_BASE = timedelta(seconds=2)
RETRY_CEILING = timedelta(minutes=10)
# A delivery failing because GitHub is down or limiting (its handler asked GitHub
# something) keeps being retried for this long before it is parked: an outage should
# delay a /rollback, not drop it.
OUTAGE_PATIENCE = timedelta(days=1)
KEEP_DELIVERIES = timedelta(days=30)
# A processed delivery's payload is needed no more; it is dropped after a day (kept that
# long for a look when something went wrong), its id kept for the 30 days above.
KEEP_PAYLOADS = timedelta(days=1)
BATCH = 50
# The pause after another process kept the database locked past the busy timeout.
BUSY_PAUSE = 1.0


def signature_valid(secret: str, body: bytes, header: str) -> bool:
    """``X-Hub-Signature-256`` check, in constant time. SHA-1 signatures are not accepted."""
    # The digest named by a string takes OpenSSL's one-shot path, a third faster than
    # passing the constructor (this runs on every delivery, over up to 25 MB).
    expected = b"sha256=" + hmac.digest(secret.encode(), body, "sha256").hex().encode()
    return hmac.compare_digest(expected, header.strip().encode())


@dataclass
class WebhookContext:
    """What handlers get besides the event: the parts of the app they may act on, and
    ``effects``, where they put GitHub side effects. Those are written to the outbox in
    the transaction that marks the delivery processed, so a crash cannot apply them twice
    or lose them. Each delivery gets its own copy (``for_delivery``)."""

    installations: InstallationRegistry | None = None
    github: GitHubApp | None = None
    canary: CanaryService | None = None
    settings: Settings | None = None
    commands: CommandRegistry = field(default_factory=CommandRegistry)
    permissions: PermissionCache = field(default_factory=lambda: PermissionCache(Clock()))
    # Where slash commands record which delivery acted on a comment (None: not recorded).
    store: Store | None = None
    clock: Clock = field(default_factory=Clock)
    effects: list[NewEffect] = field(default_factory=list)

    def for_delivery(self) -> WebhookContext:
        return dataclasses.replace(self, effects=[])


class Deliveries:
    """Accepts verified deliveries into the store and wakes the worker."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.wake = asyncio.Event()

    async def accept(
        self,
        event: str,
        delivery_id: str,
        body: bytes,
        *,
        action: str | None,
        installation_id: int | None,
    ) -> bool:
        """Store the delivery; False when this delivery id was stored before.

        Takes the raw body and the two fields the queue needs, not the parsed payload:
        holding thousands of parsed objects per request while the commit is awaited
        keeps the garbage collector busy (the worker parses the body again anyway)."""
        now = self.clock.now()
        stored = await self.store.add_delivery(
            Delivery(
                delivery_id=delivery_id,
                event=event,
                action=action,
                installation_id=installation_id,
                payload=body.decode("utf-8"),
                status="pending",
                attempts=0,
                next_attempt_at=now,
                last_error=None,
                received_at=now,
                finished_at=None,
            )
        )
        if stored:
            self.wake.set()
        return stored


class WebhookProcessor:
    """Pipeline component: processes stored deliveries through the merged routers.

    Deliveries stored but not finished before a crash are still ``pending`` and are
    processed after the next start, so handlers must tolerate seeing one twice."""

    name = "webhooks"

    def __init__(
        self,
        deliveries: Deliveries,
        routers: Sequence[routing.Router],
        context: WebhookContext,
        *,
        outbox: Outbox | None = None,
        idle_check: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.deliveries = deliveries
        self.outbox = outbox
        self.metrics = metrics
        self.store = deliveries.store
        self.clock = deliveries.clock
        self.router = routing.Router(*routers)
        self.context = context
        self.idle_check = idle_check

    async def start(self, pipeline: UpdatePipeline) -> None:
        pipeline.spawn("webhook-worker", self._loop())

    async def stop(self) -> None:
        return None

    async def _loop(self) -> None:
        last_prune = None
        while True:
            self.deliveries.wake.clear()
            try:
                while batch := await self.store.due_deliveries(self.clock.now(), limit=BATCH):
                    for delivery in batch:
                        await self.process(delivery)
                today = self.clock.now().date()
                if last_prune != today:
                    now = self.clock.now()
                    pruned = await self.store.prune_deliveries(
                        now - KEEP_DELIVERIES, payloads_before=now - KEEP_PAYLOADS
                    )
                    last_prune = today
                    if pruned:
                        log.info("forgot %d delivery id(s) older than 30 days", pruned)
            except StoreBusy as exc:
                # Another process held the database: a delivery not marked done is still
                # pending, and is processed again in a moment (handlers tolerate that).
                log.warning("webhook worker: %s; trying again in %.0fs", exc, BUSY_PAUSE)
                await asyncio.sleep(BUSY_PAUSE)
                continue
            await self._idle()

    async def _idle(self) -> None:
        due = await self.store.next_delivery_due()
        wait = self.idle_check
        if due is not None:
            wait = min(wait, max(0.0, (due - self.clock.now()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.deliveries.wake.wait(), wait)

    async def process(self, delivery: Delivery) -> None:
        context = self.context.for_delivery()
        try:
            # All inside the try: gidgethub's router reads the payload too (it raises on
            # an action that is a list), and nothing a stored payload holds may stop the
            # worker; intake refuses such payloads, but some were stored before it did.
            event = sansio.Event(
                orjson.loads(delivery.payload),
                event=delivery.event,
                delivery_id=delivery.delivery_id,
            )
            if not self.router.fetch(event):
                log.debug("no handler for %s (%s)", delivery.event, delivery.delivery_id)
            await self.router.dispatch(event, context)
        except Exception as exc:
            await self._failed(delivery, exc)
            return
        now = self.clock.now()
        await self.store.finish_delivery(delivery.delivery_id, now, context.effects)
        if context.effects and self.outbox is not None:
            self.outbox.written()
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(delivery.event, "processed").inc()
            self.metrics.webhook_delivery_seconds.observe(
                max(0.0, (now - delivery.received_at).total_seconds())
            )

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        attempts = delivery.attempts + 1
        now = self.clock.now()
        patient = transient(exc) and now - delivery.received_at < OUTAGE_PATIENCE
        if attempts >= MAX_ATTEMPTS and not patient:
            log.error(
                "delivery %s (%s) failed %d times, parked: %s",
                delivery.delivery_id,
                delivery.event,
                attempts,
                error,
            )
            await self.store.fail_delivery(delivery.delivery_id, error, retry_at=None, at=now)
            if self.metrics is not None:
                self.metrics.webhook_deliveries.labels(delivery.event, "parked").inc()
            return
        delay = min(RETRY_CEILING, RETRY_BASE * 2 ** min(attempts - 1, 20))
        log.warning(
            "delivery %s (%s) failed, retrying in %s: %s",
            delivery.delivery_id,
            delivery.event,
            delay,
            error,
        )
        await self.store.fail_delivery(delivery.delivery_id, error, retry_at=now + delay, at=now)
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(delivery.event, "retried").inc()


# An owner (a user, organisation or managed user), a slash, a repository name.
_FULL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+")


def payload_problem(data: Any) -> str | None:
    """What is wrong with the parts of a payload that handlers take as given (GitHub
    always sends them so): an object, with a string ``action``, an ``installation`` with
    an integer ``id``, a ``repository`` named ``owner/name`` and a ``sender`` object,
    each where present. None when they are fine."""
    if not isinstance(data, Mapping):
        return "the payload is not a JSON object"
    if "action" in data and not isinstance(data["action"], str):
        return "action: not a string"
    if "installation" in data:
        installation = data["installation"]
        if not isinstance(installation, Mapping) or type(installation.get("id")) is not int:
            return "installation.id: not an integer"
    if "repository" in data and (problem := _repository_problem(data["repository"])):
        return f"repository{problem}"
    # Installation events list repositories, which are stored as they come.
    for key in ("repositories", "repositories_added", "repositories_removed"):
        listed = data.get(key)
        if listed is None:
            continue
        if not isinstance(listed, list):
            return f"{key}: not a list"
        for index, repository in enumerate(listed):
            if problem := _repository_problem(repository, needs_id=True):
                return f"{key}[{index}]{problem}"
    if "sender" in data and not isinstance(data["sender"], Mapping):
        return "sender: not an object"
    return None


def _repository_problem(repository: Any, *, needs_id: bool = False) -> str | None:
    if not isinstance(repository, Mapping):
        return ": not an object"
    name = repository.get("full_name")
    if not isinstance(name, str) or not _FULL_NAME.fullmatch(name):
        return ".full_name: not a repository's owner/name"
    if needs_id and type(repository.get("id")) is not int:
        return ".id: not an integer"
    return None


def delivery_fields(data: Any) -> tuple[str | None, int | None]:
    """A payload's ``action`` and installation id, when it has them."""
    if not isinstance(data, Mapping):
        return None, None
    action = data.get("action")
    installation = data.get("installation")
    installation_id = installation.get("id") if isinstance(installation, Mapping) else None
    return (
        action if isinstance(action, str) else None,
        # JSON's true is a Python int too, but no installation's id.
        installation_id if type(installation_id) is int else None,
    )
