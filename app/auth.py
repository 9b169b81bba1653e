"""API tokens and roles: issuing, hashing, checking and revoking bearer tokens."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cachetools import TTLCache

from app.clock import Clock
from app.pipeline.events import EventBus
from app.store import NewToken, Store, TokenRecord

TOKEN_PREFIX = "upt_"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
# Writing last-used on every request would turn each read into a write; a minute's
# resolution is plenty to tell a live token from a forgotten one.
TOUCH_EVERY = timedelta(minutes=1)
CACHE_TTL_SECONDS = 30
# How often the cache asks whether another process (the token CLI) changed the database.
OUTSIDE_CHECK_SECONDS = 1.0


class Role(enum.StrEnum):
    ADMIN = "admin"
    VIEWER = "viewer"
    RUNNER = "runner"


class Access(enum.StrEnum):
    """Who may call a route. Every route must name one."""

    PUBLIC = "public"
    VIEWER = "viewer"
    ADMIN = "admin"
    RUNNER = "runner"
    # GitHub's deliveries: no bearer token; the handler checks the HMAC signature itself.
    GITHUB_SIGNATURE = "github-signature"
    # An admin token, or a GitHub Actions OIDC token of the workflow the route trusts:
    # the route wrapper checks both, the OIDC token through the route's workflow_auth
    # (what it must prove depends on the route), before the body is read.
    ADMIN_OR_WORKFLOW = "admin-or-workflow"

    def allows(self, role: Role) -> bool:
        if self in (Access.PUBLIC, Access.GITHUB_SIGNATURE) or role is Role.ADMIN:
            return True
        return role.value == self.value


class AuthError(Exception):
    """The bearer token is missing, unknown, revoked or expired (HTTP 401)."""


class TokenSpecError(ValueError):
    """A token request is invalid; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: int
    name: str
    role: Role
    org_id: str | None


@dataclass(frozen=True, slots=True)
class TokenSpec:
    name: str
    role: Role
    org_id: str | None = None
    expires_in: timedelta | None = None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    record: TokenRecord
    secret: str


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def validate_spec(spec: TokenSpec) -> None:
    if not _NAME.match(spec.name):
        raise TokenSpecError(
            f"token name {spec.name!r} must be 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    # Named as the API names the fields (the command's --org and --expires are the same).
    if spec.role is Role.RUNNER and not spec.org_id:
        raise TokenSpecError(
            "orgId: a runner token needs the id of the organisation it reports for"
        )
    if spec.role is not Role.RUNNER and spec.org_id:
        raise TokenSpecError("orgId: only runner tokens belong to an organisation")
    if spec.expires_in is not None and spec.expires_in <= timedelta(0):
        raise TokenSpecError("expiresIn: expiry must be in the future")


class TokenService:
    def __init__(self, store: Store, clock: Clock, bus: EventBus | None = None) -> None:
        self.store = store
        self.clock = clock
        self.bus = bus or EventBus(store, clock)
        # hash -> record, so hot paths (heartbeats) do not read the database per request.
        # Revoking here evicts at once; a revocation by another process empties the cache
        # within OUTSIDE_CHECK_SECONDS (see _forget_outside_changes).
        self._cache: TTLCache[str, TokenRecord] = TTLCache(
            maxsize=10_000, ttl=CACHE_TTL_SECONDS, timer=clock.monotonic
        )
        self._outside_marker: int | None = None
        self._outside_checked = float("-inf")

    async def issue(self, specs: Sequence[TokenSpec], *, by: str) -> list[IssuedToken]:
        """Create all the tokens or none of them; ``by`` names who asked, for the log."""
        seen: set[str] = set()
        for spec in specs:
            validate_spec(spec)
            if spec.name in seen:
                raise TokenSpecError(f"token name {spec.name!r} appears twice")
            seen.add(spec.name)
        now = self.clock.now()
        secrets_by_name = {spec.name: new_secret() for spec in specs}
        records = await self.store.add_tokens(
            [
                NewToken(
                    name=spec.name,
                    role=spec.role.value,
                    token_hash=hash_token(secrets_by_name[spec.name]),
                    org_id=spec.org_id,
                    created_at=now,
                    expires_at=now + spec.expires_in if spec.expires_in else None,
                )
                for spec in specs
            ]
        )
        await self.bus.publish(
            "tokens_issued",
            {
                "tokens": [{"name": r.name, "role": r.role, "orgId": r.org_id} for r in records],
                "by": by,
            },
        )
        return [IssuedToken(r, secrets_by_name[r.name]) for r in records]

    async def authenticate(self, secret: str) -> Principal:
        digest = hash_token(secret)
        await self._forget_outside_changes()
        record = self._cache.get(digest)
        if record is None:
            record = await self.store.token_by_hash(digest)
            if record is None:
                raise AuthError("unknown token")
            self._cache[digest] = record
        # The lookup was by hash; comparing again in constant time keeps timing from
        # telling anything about stored hashes, whatever the index does.
        if not hmac.compare_digest(record.token_hash, digest):
            raise AuthError("unknown token")
        now = self.clock.now()
        if record.revoked_at is not None:
            raise AuthError("token revoked")
        if record.expires_at is not None and record.expires_at <= now:
            raise AuthError("token expired")
        if record.last_used_at is None or now - record.last_used_at >= TOUCH_EVERY:
            await self.store.touch_token(record.id, now)
            self._cache[digest] = dataclasses.replace(record, last_used_at=now)
        return Principal(record.id, record.name, Role(record.role), record.org_id)

    async def _forget_outside_changes(self) -> None:
        now = self.clock.monotonic()
        if now - self._outside_checked < OUTSIDE_CHECK_SECONDS:
            return
        self._outside_checked = now
        marker = await self.store.outside_writes()
        if self._outside_marker is not None and marker != self._outside_marker:
            self._cache.clear()
        self._outside_marker = marker

    async def list(self, *, include_revoked: bool = False) -> list[TokenRecord]:
        return await self.store.list_tokens(include_revoked=include_revoked)

    async def revoke(self, name: str, *, by: str) -> TokenRecord | None:
        record = await self.store.revoke_token(name, self.clock.now())
        if record is not None:
            self._cache.pop(record.token_hash, None)
            await self.bus.publish("token_revoked", {"name": record.name, "by": by})
        return record


def token_state(record: TokenRecord, now: datetime) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    return "active"
