"""Dashboard sessions: the cookie, who it signs in, what they may do, and CSRF tokens.

A session id is 32 random bytes, sent only in an HttpOnly, Secure, SameSite=Lax cookie;
the store keeps its SHA-256. The CSRF token of a session is an HMAC of a fixed label
keyed by the session id, so it needs no storage and says nothing about the id.

What a person may do follows the API token's role (``viewer``: look; ``admin``:
everything) or, for a GitHub sign-in, their permission on the control repository
compared with what the slash commands need (the same ``CommandRegistry``, overrides
included): ``/status`` to look, ``/pause``, ``/resume``, ``/rollback`` and ``/advance``
for the buttons of the same names.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

from aiohttp import web
from gidgethub import GitHubException

from app.api.errors import ApiError
from app.auth import Principal, Role
from app.github.auth import InstallationSuspended
from app.github.client import GitHubUnavailable
from app.github.commands import Permission, PermissionCache
from app.logs import get_logger
from app.services import Services
from app.store import DashboardSession

log = get_logger("dashboard")

COOKIE = "up_session"
ACTIONS = ("pause", "resume", "rollback", "advance")
VIEW = "view"
# The slash command whose permission lets a GitHub user look at the dashboard.
VIEW_COMMAND = "status"
_CSRF_LABEL = b"update-pipeline dashboard csrf"


def session_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def csrf_token(secret: str) -> str:
    return hmac.new(secret.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Viewer:
    """A signed-in person, for one request."""

    session: DashboardSession
    secret: str  # the cookie's session id: only to derive the CSRF token
    abilities: frozenset[str]
    standing: str  # what their rights come from, in words

    @property
    def who(self) -> str:
        kind = "GitHub" if self.session.kind == "github" else "token"
        return f"{self.session.login} ({kind})"

    @property
    def actor(self) -> str:
        """How their commands are recorded: a GitHub login as the slash commands record
        it, a token as the API records it."""
        if self.session.kind == "github":
            return self.session.login
        return f"token {self.session.login}"

    @property
    def csrf(self) -> str:
        return csrf_token(self.secret)

    def may(self, ability: str) -> bool:
        return ability in self.abilities

    def csrf_ok(self, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(sent.encode(), self.csrf.encode())


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ip_address(name).is_loopback
    except ValueError:
        return False


class Sessions:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.permissions = PermissionCache(services.clock)

    # -- the cookie ------------------------------------------------------------------------

    def set_cookie(self, response: web.StreamResponse, secret: str) -> None:
        # Secure always: browsers keep Secure cookies on http://localhost and 127.0.0.1
        # (potentially trustworthy origins), and anywhere else the dashboard belongs
        # behind TLS. The sign-in page says so when it is reached over plain http.
        response.set_cookie(
            COOKIE,
            secret,
            max_age=int(self.services.settings.session_ttl.total_seconds()),
            path="/",
            secure=True,
            httponly=True,
            samesite="Lax",
        )

    @staticmethod
    def clear_cookie(response: web.StreamResponse) -> None:
        response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Lax")

    # -- sessions ----------------------------------------------------------------------------

    async def create(self, kind: str, login: str, level: str, token_id: int | None = None) -> str:
        """A new session; returns the secret for the cookie (never logged)."""
        secret = secrets.token_urlsafe(32)
        now = self.services.clock.now()
        await self.services.store.add_session(
            DashboardSession(
                id_hash=session_hash(secret),
                kind=kind,
                login=login,
                level=level,
                token_id=token_id,
                created_at=now,
                expires_at=now + self.services.settings.session_ttl,
            )
        )
        log.info("dashboard sign-in: %s (%s)", login, kind)
        return secret

    async def end(self, viewer: Viewer) -> None:
        await self.services.store.delete_session(viewer.session.id_hash)
        log.info("dashboard sign-out: %s", viewer.session.login)

    async def current(self, request: web.Request) -> Viewer | None:
        secret = request.cookies.get(COOKIE)
        if not secret or len(secret) > 128:
            return None
        found = await self.services.store.session_by_hash(
            session_hash(secret), self.services.clock.now()
        )
        if found is None:
            return None
        abilities, standing = await self._abilities(found)
        return Viewer(found, secret, abilities, standing)

    async def principal(self, request: web.Request) -> Principal | None:
        """For the event stream: who the cookie signs in, as a viewer of the API."""
        viewer = await self.current(request)
        if viewer is None:
            return None
        if not viewer.may(VIEW):
            raise ApiError(403, "FORBIDDEN", f"{viewer.standing}: not enough to view")
        return Principal(viewer.session.token_id or 0, viewer.actor, Role.VIEWER, None)

    # -- rights ------------------------------------------------------------------------------

    async def _abilities(self, session: DashboardSession) -> tuple[frozenset[str], str]:
        if session.kind == "token":
            if session.level == Role.ADMIN.value:
                return frozenset((VIEW, *ACTIONS)), "admin token"
            if session.level == Role.VIEWER.value:
                return frozenset((VIEW,)), "viewer token"
            return frozenset(), f"{session.level} token"
        permission = await self.github_permission(session.login, Permission[session.level.upper()])
        repo = self.services.settings.control_repo
        granted = {name for name in (VIEW, *ACTIONS) if permission >= self.needs(name)}
        return frozenset(granted), f"{permission} on {repo}"

    def needs(self, ability: str) -> Permission:
        """The permission on the control repository an ability needs: that of the slash
        command it mirrors (maintain when the command is not registered)."""
        registry = self.services.commands
        spec = registry.get(VIEW_COMMAND if ability == VIEW else ability) if registry else None
        if spec is None:
            return Permission.TRIAGE if ability == VIEW else Permission.MAINTAIN
        return spec.permission

    async def github_permission(self, login: str, fallback: Permission) -> Permission:
        """The user's permission on the control repository, read through the App's
        installation there and remembered a minute. When GitHub cannot answer, the
        permission read at sign-in stands: the dashboard must keep working (to roll
        back, say) while GitHub is down."""
        github = self.services.github
        repo = self.services.settings.control_repo
        if github is None or repo is None:
            return Permission.NONE
        installation = await self.services.store.installation_for_repository(repo)
        if installation is None:
            return Permission.NONE
        try:
            client = github.installation(installation.id)
            return await self.permissions.get(client, repo, login)
        except (GitHubException, GitHubUnavailable, InstallationSuspended) as exc:
            log.warning(
                "permission of %s on %s unknown (%s): keeping the one read at sign-in",
                login,
                repo,
                type(exc).__name__,
            )
            return fallback


def same_origin(request: web.Request, public_url: str | None) -> bool:
    """Whether a state-changing request comes from a page of this service: its Origin
    (or, from a browser that sent none, its Referer) names this service's origin."""
    expected = _origin(public_url) if public_url else f"{request.scheme}://{request.host}"
    sent = request.headers.get("Origin")
    if sent is None or sent == "null":
        referer = request.headers.get("Referer")
        sent = _origin(referer) if referer else None
    return sent is not None and hmac.compare_digest(sent.lower(), expected.lower())


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
