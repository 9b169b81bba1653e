"""Where the App is installed: reconciled with GitHub, kept current from webhook events."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from gidgethub import GitHubException, routing, sansio

from app.clock import Clock
from app.github.app import GitHubApp
from app.logs import get_logger
from app.pipeline.periodic import Periodic
from app.store import Installation, Repository, Store

if TYPE_CHECKING:
    from app.github.webhooks import WebhookContext
    from app.pipeline import UpdatePipeline

log = get_logger("github.installations")

RECONCILE_EVERY = timedelta(hours=1)
PER_PAGE = 100


class InstallationRegistry:
    """Installations and their repositories, in the store, mirrored for quick checks."""

    def __init__(self, store: Store, github: GitHubApp, clock: Clock) -> None:
        self.store = store
        self.github = github
        self.clock = clock

    async def load(self) -> None:
        """Take the suspended set from the store, so nothing calls a suspended one at start."""
        installations = await self.store.list_installations()
        self.github.suspended = {i.id for i in installations if i.suspended}

    async def reconcile(self) -> list[Installation]:
        """Make the store match GitHub: every installation, and the repositories of those
        not suspended (a suspended one keeps what was last known; it gets no calls)."""
        known = {i.id: i for i in await self.store.list_installations()}
        found: list[Installation] = []
        async for item in self.github.app.getiter(f"/app/installations?per_page={PER_PAGE}"):
            installation = _from_payload(item)
            if installation.suspended:
                previous = known.get(installation.id)
                repositories = previous.repositories if previous else ()
            else:
                repositories = await self._repositories(installation.id)
            found.append(_with_repositories(installation, repositories))
        await self.store.replace_installations(found, self.clock.now())
        self.github.suspended = {i.id for i in found if i.suspended}
        self.github.state = "ok"
        log.info(
            "reconciled %d installation(s), %d suspended",
            len(found),
            len(self.github.suspended),
        )
        return found

    async def _repositories(self, installation_id: int) -> list[Repository]:
        client = self.github.installation(installation_id)
        return [
            Repository(repo["id"], repo["full_name"])
            async for repo in client.getiter(
                f"/installation/repositories?per_page={PER_PAGE}", iterable_key="repositories"
            )
        ]

    # -- Webhook events (routed here by the intake, GitHub App core part 2) --------------

    async def on_installation(self, action: str, payload: Mapping[str, Any]) -> None:
        installation = _from_payload(payload["installation"])
        now = self.clock.now()
        if action == "deleted":
            await self.store.delete_installation(installation.id)
            self.github.suspended.discard(installation.id)
        elif action in ("suspend", "unsuspend"):
            suspended = action == "suspend"
            if not await self.store.set_installation_suspended(installation.id, suspended, now):
                await self.store.save_installation(installation, now)
            if suspended:
                self.github.suspended.add(installation.id)
            else:
                self.github.suspended.discard(installation.id)
        else:  # created, new_permissions_accepted
            repositories = [_repository(r) for r in payload.get("repositories") or ()]
            await self.store.save_installation(_with_repositories(installation, repositories), now)

    async def on_installation_repositories(self, action: str, payload: Mapping[str, Any]) -> None:
        installation_id = int(payload["installation"]["id"])
        if action == "added":
            added = [_repository(r) for r in payload.get("repositories_added") or ()]
            await self.store.save_installation(
                _with_repositories(_from_payload(payload["installation"]), added),
                self.clock.now(),
            )
        elif action == "removed":
            removed = [int(r["id"]) for r in payload.get("repositories_removed") or ()]
            await self.store.remove_repositories(installation_id, removed)


router = routing.Router()


@router.register("installation")
async def installation_event(event: sansio.Event, context: WebhookContext) -> None:
    if context.installations is not None:
        await context.installations.on_installation(event.data["action"], event.data)


@router.register("installation_repositories")
async def installation_repositories_event(event: sansio.Event, context: WebhookContext) -> None:
    if context.installations is not None:
        await context.installations.on_installation_repositories(event.data["action"], event.data)


class InstallationSync(Periodic):
    """Pipeline component: reconcile at start, then every ``interval``."""

    def __init__(self, registry: InstallationRegistry, interval: timedelta = RECONCILE_EVERY):
        super().__init__(
            "installations",
            registry.reconcile,
            interval,
            survives=(GitHubException, OSError),
            on_error=self._failed,
        )
        self.registry = registry

    async def start(self, pipeline: UpdatePipeline) -> None:
        await self.registry.load()
        await super().start(pipeline)

    def _failed(self, exc: BaseException) -> None:
        # GitHub being down must not lose what is known; /status shows the reason.
        self.registry.github.state = f"error: {exc}"


def _from_payload(item: Mapping[str, Any]) -> Installation:
    account = item.get("account") or {}
    return Installation(
        id=int(item["id"]),
        account_login=str(account.get("login") or account.get("slug") or ""),
        account_type=str(account.get("type") or ("Enterprise" if "slug" in account else "")),
        suspended=item.get("suspended_at") is not None,
    )


def _repository(item: Mapping[str, Any]) -> Repository:
    return Repository(int(item["id"]), str(item["full_name"]))


def _with_repositories(installation: Installation, repositories: Any) -> Installation:
    return dataclasses.replace(installation, repositories=tuple(repositories))
