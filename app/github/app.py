"""The App's connection to GitHub: one HTTP session, the App client, installation clients."""

from __future__ import annotations

import asyncio

import aiohttp
from cachetools import LRUCache

from app.clock import Clock
from app.config import Settings
from app.github.auth import (
    AppAuth,
    InstallationAuth,
    InstallationSuspended,
    InstallationTokens,
)
from app.github.client import GitHubClient, GitHubStats, Pacer, RetryPolicy, Sleep
from app.github.keys import PrivateKey, load_private_key
from app.logs import get_logger

log = get_logger("github")

NOT_CONFIGURED = "not configured"
__all__ = ["NOT_CONFIGURED", "GitHubApp", "InstallationSuspended"]
ETAG_CACHE_ENTRIES = 500


class GitHubApp:
    def __init__(
        self,
        settings: Settings,
        key: PrivateKey,
        clock: Clock,
        *,
        session: aiohttp.ClientSession | None = None,
        sleep: Sleep = asyncio.sleep,
        policy: RetryPolicy | None = None,
    ) -> None:
        assert settings.github_app_id is not None
        self.settings = settings
        self.clock = clock
        self.key = key
        self._own_session = session is None
        self.session = session or aiohttp.ClientSession()
        self.stats = GitHubStats()
        self.pacer = Pacer(clock, sleep)
        self.suspended: set[int] = set()
        # "ok" once GitHub accepted the App's credentials, else what went wrong.
        self.state = "connecting"
        self._sleep = sleep
        self._policy = policy
        self.app = self._client(AppAuth(settings.github_app_id, key, clock))
        self.tokens = InstallationTokens(self.app, clock)
        self._installations: dict[int, GitHubClient] = {}

    def _client(self, auth: AppAuth | InstallationAuth) -> GitHubClient:
        return GitHubClient(
            self.session,
            auth=auth,
            base_url=self.settings.github_api_url,
            clock=self.clock,
            policy=self._policy,
            pacer=self.pacer,
            stats=self.stats,
            sleep=self._sleep,
            # Conditional requests (ETag) for what is polled; separate per credential, as
            # what GitHub returns depends on who asks.
            cache=LRUCache(maxsize=ETAG_CACHE_ENTRIES),
        )

    def installation(self, installation_id: int) -> GitHubClient:
        if installation_id in self.suspended:
            raise InstallationSuspended(f"installation {installation_id} is suspended")
        client = self._installations.get(installation_id)
        if client is None:
            auth = InstallationAuth(installation_id, self.tokens, self.is_suspended)
            client = self._client(auth)
            self._installations[installation_id] = client
        return client

    def is_suspended(self, installation_id: int) -> bool:
        return installation_id in self.suspended

    async def close(self) -> None:
        if self._own_session:
            await self.session.close()

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: Clock, *, sleep: Sleep = asyncio.sleep
    ) -> GitHubApp | None:
        """The App when credentials are configured; None (said once in the log) when not."""
        key = load_private_key(settings)
        if settings.github_app_id is None or key is None:
            log.info("GitHub App credentials not configured: GitHub features are off")
            return None
        log.info(
            "GitHub App %d, key %s, API %s",
            settings.github_app_id,
            key.fingerprint,
            settings.github_api_url,
        )
        return cls(settings, key, clock, sleep=sleep)
