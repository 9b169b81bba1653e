"""The GitHub client: gidgethub on one session, with retries, rate limits and pacing.

Everything cross-cutting lives in ``GitHubClient._request``, gidgethub's transport hook,
so call sites use plain ``getitem``/``getiter``/``post``/``patch``/... and get it all.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from gidgethub import GitHubException
from gidgethub.aiohttp import GitHubAPI

from app.clock import Clock
from app.logs import get_logger
from app.metrics import route_template

log = get_logger("github.client")

REQUESTER = "update-pipeline"
# Safe to send twice: the HTTP methods whose repetition has no further effect.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MUTATING = frozenset({"POST", "PATCH", "PUT", "DELETE"})

Sleep = Callable[[float], Awaitable[None]]


class Authenticator(Protocol):
    pacing_key: str | None

    async def authorization(self) -> str: ...

    async def rejected(self, value: str) -> bool: ...


class GitHubRateLimited(GitHubException):
    """GitHub's rate limit would make this request wait longer than allowed."""

    def __init__(self, message: str, reset_in: float) -> None:
        super().__init__(message)
        self.reset_in = reset_in


class GitHubUnavailable(GitHubException):
    """GitHub could not be reached (timeouts, connection errors) after the allowed retries."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries in all for an idempotent request on 5xx/timeouts/resets
    base_delay: float = 0.5
    max_delay: float = 30.0
    timeout: float = 30.0  # one try, from sending to the last byte
    max_rate_limit_wait: float = 15 * 60.0  # beyond this, fail fast instead of waiting
    secondary_wait: float = 60.0  # GitHub: with no Retry-After, wait at least a minute
    secondary_attempts: int = 4


@dataclass
class GitHubStats:
    """Counters for the metrics endpoint: calls, retries, waits and rate-limit headroom."""

    calls: Counter[tuple[str, int]] = field(default_factory=Counter)
    # method, route template (see app.metrics.route_template), status
    routes: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    rate_limit_waits: int = 0
    rate_limit_wait_seconds: float = 0.0
    # pacing key (or "app") and resource -> (remaining, limit, reset epoch)
    headroom: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)


class Pacer:
    """Spaces mutating requests per installation, as GitHub asks of integrators: one at a
    time, about a second apart, and content creation below ~80 a minute and ~500 an hour."""

    def __init__(
        self,
        clock: Clock,
        sleep: Sleep,
        *,
        interval: float = 1.0,
        per_minute: int = 80,
        per_hour: int = 500,
    ) -> None:
        self.clock = clock
        self.sleep = sleep
        self.interval = interval
        self.limits = ((60.0, per_minute), (3600.0, per_hour))
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, float] = {}
        self._created: dict[str, deque[float]] = {}

    def lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def wait_turn(self, key: str, method: str) -> None:
        """Call with ``lock(key)`` held; returns when this request may be sent."""
        delay = 0.0
        last = self._last.get(key)
        if last is not None:
            delay = last + self.interval - self.clock.monotonic()
        if method == "POST":
            created = self._created.setdefault(key, deque())
            for window, limit in self.limits:
                recent = [t for t in created if t > self.clock.monotonic() - window]
                if len(recent) >= limit:
                    delay = max(delay, recent[-limit] + window - self.clock.monotonic())
        if delay > 0:
            await self.sleep(delay)
        now = self.clock.monotonic()
        self._last[key] = now
        if method == "POST":
            created = self._created[key]
            created.append(now)
            while created and created[0] <= now - self.limits[-1][0]:
                created.popleft()


class GitHubClient(GitHubAPI):
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        auth: Authenticator,
        base_url: str,
        clock: Clock,
        policy: RetryPolicy | None = None,
        pacer: Pacer | None = None,
        stats: GitHubStats | None = None,
        sleep: Sleep = asyncio.sleep,
        cache: MutableMapping[Any, Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(session, REQUESTER, base_url=base_url, cache=cache)
        self.auth = auth
        self.clock = clock
        self.policy = policy or RetryPolicy()
        self.pacer = pacer
        self.stats = stats or GitHubStats()
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._exhausted_until: float = 0.0  # epoch seconds; core limit known to be 0

    async def sleep(self, seconds: float) -> None:
        await self._sleep(seconds)

    async def _request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes = b""
    ) -> tuple[int, Mapping[str, str], bytes]:
        pacing = self.pacer is not None and method in MUTATING and self.auth.pacing_key
        if pacing:
            assert self.pacer is not None and self.auth.pacing_key is not None
            async with self.pacer.lock(self.auth.pacing_key):
                return await self._attempts(method, url, headers, body, paced=True)
        return await self._attempts(method, url, headers, body, paced=False)

    async def _attempts(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes, *, paced: bool
    ) -> tuple[int, Mapping[str, str], bytes]:
        send_headers = dict(headers)
        value = await self.auth.authorization()
        reauthenticated = False
        failures = secondary = 0
        while True:
            await self._respect_primary_limit()
            if paced:
                assert self.pacer is not None and self.auth.pacing_key is not None
                await self.pacer.wait_turn(self.auth.pacing_key, method)
            send_headers["authorization"] = value
            try:
                status, response_headers, data = await self._send(method, url, send_headers, body)
            except (TimeoutError, aiohttp.ClientError) as exc:
                kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                self.stats.errors[kind] += 1
                failures += 1
                if method in IDEMPOTENT and failures < self.policy.attempts:
                    await self._backoff(failures, f"{method} {url}: {kind}")
                    continue
                raise GitHubUnavailable(f"{method} {url} failed: {kind}") from None
            self.stats.calls[(method, status)] += 1
            self.stats.routes[(method, route_template(urlsplit(url).path), status)] += 1
            self._note_headroom(response_headers)

            if status == 401 and not reauthenticated and await self.auth.rejected(value):
                # A token GitHub no longer accepts (revoked, expired early): one fresh try.
                reauthenticated = True
                value = await self.auth.authorization()
                continue
            if status in (403, 429):
                wait = self._rate_limit_wait(status, response_headers, data, secondary)
                if wait is not None:
                    secondary += 1
                    if secondary > self.policy.secondary_attempts:
                        return status, response_headers, data
                    await self._wait_for_limit(wait, f"{method} {url}")
                    self._exhausted_until = 0.0  # that wait already covered the reset
                    continue
            if status >= 500 and method in IDEMPOTENT:
                failures += 1
                if failures < self.policy.attempts:
                    await self._backoff(failures, f"{method} {url}: {status}")
                    continue
            return status, response_headers, data

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Mapping[str, str], bytes]:
        timeout = aiohttp.ClientTimeout(total=self.policy.timeout)
        async with self._session.request(
            method, url, headers=headers, data=body, timeout=timeout
        ) as response:
            return response.status, response.headers, await response.read()

    def _note_headroom(self, headers: Mapping[str, str]) -> None:
        try:
            remaining = int(headers["x-ratelimit-remaining"])
            limit = int(headers["x-ratelimit-limit"])
            reset = int(headers["x-ratelimit-reset"])
        except (KeyError, ValueError):
            return
        resource = headers.get("x-ratelimit-resource", "core")
        self.stats.headroom[(self.auth.pacing_key or "app", resource)] = (remaining, limit, reset)
        if resource == "core":
            self._exhausted_until = float(reset) if remaining == 0 else 0.0

    async def _respect_primary_limit(self) -> None:
        if not self._exhausted_until:
            return
        wait = self._exhausted_until - self.clock.now().timestamp()
        if wait <= 0:
            self._exhausted_until = 0.0
            return
        await self._wait_for_limit(wait + 1, "primary rate limit exhausted")
        self._exhausted_until = 0.0

    def _rate_limit_wait(
        self, status: int, headers: Mapping[str, str], data: bytes, secondary: int
    ) -> float | None:
        """Seconds to wait before trying again, or None if this is no rate limit."""
        retry_after = headers.get("retry-after", "")
        if retry_after.isdigit():
            return float(retry_after)
        if headers.get("x-ratelimit-remaining") == "0":
            reset = headers.get("x-ratelimit-reset", "")
            if reset.isdigit():
                return max(0.0, int(reset) - self.clock.now().timestamp()) + 1
        if b"secondary rate limit" in data.lower():
            # No hint given: GitHub asks for at least a minute, then growing waits.
            return float(self.policy.secondary_wait * 2**secondary)
        return None

    async def _wait_for_limit(self, seconds: float, what: str) -> None:
        if seconds > self.policy.max_rate_limit_wait:
            raise GitHubRateLimited(
                f"GitHub rate limit: {what}; it lifts in {seconds:.0f}s, more than the"
                f" {self.policy.max_rate_limit_wait:.0f}s this client waits",
                seconds,
            )
        self.stats.rate_limit_waits += 1
        self.stats.rate_limit_wait_seconds += seconds
        log.warning("GitHub rate limit (%s): waiting %.1fs", what, seconds)
        await self._sleep(seconds)

    async def _backoff(self, failures: int, what: str) -> None:
        # Full jitter: spreads the retries of many callers instead of synchronising them.
        ceiling = min(self.policy.max_delay, self.policy.base_delay * 2 ** (failures - 1))
        delay = self._rng.uniform(0, ceiling)
        self.stats.retries += 1
        log.info("retrying %s in %.2fs", what, delay)
        await self._sleep(delay)
