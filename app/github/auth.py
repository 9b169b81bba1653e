"""App JWTs and installation access tokens: minted, cached, refreshed before they expire."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache

from app.clock import Clock, parse_iso
from app.github.keys import PrivateKey
from app.logs import get_logger

if TYPE_CHECKING:
    from app.github.client import GitHubClient

log = get_logger("github.auth")

# GitHub rejects an App JWT whose exp is over 10 minutes ahead; iat is set in the past to
# absorb clock drift between this host and GitHub (GitHub's own recommendation).
JWT_BACKDATE = timedelta(seconds=60)
JWT_LIFETIME = timedelta(minutes=9)
JWT_RENEW_BEFORE = timedelta(minutes=1)
# Tokens live an hour; never hand out one with less than this left, so a request (and
# its retries) cannot outlive the token it started with.
TOKEN_REFRESH_MARGIN = timedelta(minutes=5)


class AppAuth:
    """Authenticates as the App itself (``Authorization: Bearer <JWT>``)."""

    pacing_key: str | None = None

    def __init__(self, app_id: int, key: PrivateKey, clock: Clock) -> None:
        self.app_id = app_id
        self.key = key
        self.clock = clock
        self._jwt: str | None = None
        self._renew_at: datetime | None = None

    def claims(self) -> dict[str, Any]:
        now = self.clock.now()
        return {
            "iat": int((now - JWT_BACKDATE).timestamp()),
            "exp": int((now + JWT_LIFETIME).timestamp()),
            "iss": str(self.app_id),
        }

    def jwt(self) -> str:
        now = self.clock.now()
        if self._jwt is None or self._renew_at is None or now >= self._renew_at:
            self._jwt = self.key.sign(self.claims())
            self._renew_at = now + JWT_LIFETIME - JWT_RENEW_BEFORE
        return self._jwt

    async def authorization(self) -> str:
        return f"Bearer {self.jwt()}"

    async def rejected(self, value: str) -> bool:
        # A fresh JWT is worth one more try only if the rejected one was not just minted.
        if self._jwt is not None and hmac.compare_digest(
            value.encode(), f"Bearer {self._jwt}".encode()
        ):
            self._jwt = None
            return True
        return False


class InstallationSuspended(Exception):
    """A suspended installation gets no calls."""


@dataclass(frozen=True, slots=True)
class InstallationToken:
    token: str
    expires_at: datetime


class InstallationTokens:
    """Installation access tokens, one per installation, shared by every caller."""

    def __init__(self, app_client: GitHubClient, clock: Clock) -> None:
        self.app_client = app_client
        self.clock = clock
        self._cache: TTLCache[int, InstallationToken] = TTLCache(
            maxsize=10_000, ttl=3600, timer=clock.monotonic
        )
        self._inflight: dict[int, asyncio.Task[InstallationToken]] = {}
        self.fetches = 0

    async def get(self, installation_id: int) -> str:
        cached = self._cache.get(installation_id)
        if cached is not None and cached.expires_at - TOKEN_REFRESH_MARGIN > self.clock.now():
            return cached.token
        task = self._inflight.get(installation_id)
        if task is None:
            # One request however many callers arrive while it runs.
            task = asyncio.create_task(self._fetch(installation_id))
            self._inflight[installation_id] = task
            task.add_done_callback(lambda _: self._inflight.pop(installation_id, None))
        # shield: one caller giving up must not cancel the fetch the others wait on.
        return (await asyncio.shield(task)).token

    def invalidate(self, installation_id: int, token: str) -> bool:
        """Forget ``token`` if it is still the cached one; True when it was."""
        cached = self._cache.get(installation_id)
        if cached is not None and hmac.compare_digest(cached.token.encode(), token.encode()):
            del self._cache[installation_id]
            return True
        return False

    async def _fetch(self, installation_id: int) -> InstallationToken:
        self.fetches += 1
        body = await self.app_client.post(
            "/app/installations/{installation_id}/access_tokens",
            url_vars={"installation_id": str(installation_id)},
            data={},
        )
        token = InstallationToken(body["token"], parse_iso(body["expires_at"]))
        self._cache[installation_id] = token
        log.debug("new access token for installation %d", installation_id)
        return token


class InstallationAuth:
    """Authenticates as one installation (``Authorization: token <access token>``)."""

    def __init__(
        self,
        installation_id: int,
        tokens: InstallationTokens,
        is_suspended: Callable[[int], bool] = lambda _: False,
    ) -> None:
        self.installation_id = installation_id
        self.tokens = tokens
        self.is_suspended = is_suspended
        self.pacing_key: str | None = f"installation:{installation_id}"

    async def authorization(self) -> str:
        # Checked per request, so a client obtained before a suspension stops too.
        if self.is_suspended(self.installation_id):
            raise InstallationSuspended(f"installation {self.installation_id} is suspended")
        return f"token {await self.tokens.get(self.installation_id)}"

    async def rejected(self, value: str) -> bool:
        # Worth the one retry even when the token is no longer cached: a concurrent request
        # that met the same rejection has already dropped it, so the next one is fresh.
        self.tokens.invalidate(self.installation_id, value.removeprefix("token "))
        return True
