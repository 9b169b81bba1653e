"""Missed deliveries: ask GitHub to send again what never reached the store.

GitHub does not retry a failed delivery by itself. Every few minutes this lists the App's
recent deliveries and requests a redelivery of each one this service never stored."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Any

from gidgethub import GitHubException

from app.clock import Clock, parse_iso
from app.github.app import GitHubApp
from app.logs import get_logger
from app.pipeline.periodic import Periodic
from app.store import Store

log = get_logger("github.redelivery")

CHECK_EVERY = timedelta(minutes=10)
# GitHub keeps deliveries for three days; older ones cannot be redelivered anyway.
LOOK_BACK = timedelta(days=3)
MAX_PAGES = 10  # of 100 deliveries each, per run
MAX_REDELIVERIES_PER_RUN = 50
# A delivery GitHub already redelivered this often is failing for a reason a further
# redelivery will not fix; it is left for an operator (the log says which).
MAX_REDELIVERIES_PER_DELIVERY = 3


class MissedDeliveries:
    def __init__(self, store: Store, github: GitHubApp, clock: Clock) -> None:
        self.store = store
        self.github = github
        self.clock = clock

    async def run_once(self) -> list[str]:
        """Request redeliveries; returns the delivery ids (GUIDs) asked for again."""
        attempts: dict[str, list[dict[str, Any]]] = defaultdict(list)
        oldest = self.clock.now() - LOOK_BACK
        seen = 0
        async for item in self.github.app.getiter("/app/hook/deliveries?per_page=100"):
            if parse_iso(item["delivered_at"]) < oldest:
                break  # newest first: everything after this is older still
            attempts[item["guid"]].append(item)
            seen += 1
            if seen >= MAX_PAGES * 100:
                break
        stored = await self.store.stored_delivery_ids(list(attempts))
        requested: list[str] = []
        for guid, tries in attempts.items():
            if guid in stored or any(t["event"] == "ping" for t in tries):
                continue
            if sum(1 for t in tries if t["redelivery"]) >= MAX_REDELIVERIES_PER_DELIVERY:
                log.warning(
                    "delivery %s was redelivered %d times and still never stored",
                    guid,
                    MAX_REDELIVERIES_PER_DELIVERY,
                )
                continue
            if len(requested) >= MAX_REDELIVERIES_PER_RUN:
                break
            newest = max(tries, key=lambda t: t["id"])
            await self.github.app.post(
                "/app/hook/deliveries/{delivery_id}/attempts",
                url_vars={"delivery_id": str(newest["id"])},
                data=b"",
            )
            requested.append(guid)
        if requested:
            log.info("asked GitHub to redeliver %d missed delivery(ies)", len(requested))
        return requested


class MissedDeliverySweep(Periodic):
    """Pipeline component: look for missed deliveries at start, then every ten minutes."""

    def __init__(self, missed: MissedDeliveries, interval: timedelta = CHECK_EVERY) -> None:
        super().__init__(
            "missed-deliveries", missed.run_once, interval, survives=(GitHubException, OSError)
        )
