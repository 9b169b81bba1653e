"""Signing in with GitHub: the App's user authorisation flow on ``GITHUB_WEB_URL``.

1. ``/dashboard/login/github`` sends the browser to GitHub's authorize page with the
   client id, the callback address and a random ``state``, which a short-lived cookie
   binds to this browser.
2. GitHub sends it back to ``/dashboard/login/github/callback`` with a ``code`` and the
   ``state``; the state must equal the cookie's (compared in constant time), else nothing
   is exchanged.
3. The code is exchanged once at ``{GITHUB_WEB_URL}/login/oauth/access_token`` for a user
   token, which reads ``GET /user`` and is then dropped: the dashboard keeps only the
   login. Neither the code nor the token is ever logged.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlencode

import aiohttp
from aiohttp import web
from gidgethub import GitHubException

from app.github.client import REQUESTER, GitHubClient, GitHubUnavailable
from app.logs import get_logger
from app.services import Services

log = get_logger("dashboard.oauth")

STATE_COOKIE = "up_oauth_state"
START_PATH = "/dashboard/login/github"
CALLBACK_PATH = "/dashboard/login/github/callback"
STATE_SECONDS = 600  # long enough to approve on GitHub, short enough to be useless later
EXCHANGE_TIMEOUT = aiohttp.ClientTimeout(total=15)


class SignInRefused(Exception):
    """The sign-in cannot go on; the message is for the person signing in."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def available(services: Services) -> bool:
    """GitHub sign-in needs the App's client id and secret, the App itself (to read the
    user's permission) and the control repository (where the permission is read)."""
    settings = services.settings
    return (
        bool(settings.github_client_id)
        and settings.github_client_secret is not None
        and services.github is not None
        and settings.control_repo is not None
    )


def callback_url(request: web.Request, services: Services) -> str:
    base = services.settings.public_url or f"{request.scheme}://{request.host}"
    return base + CALLBACK_PATH


def start(request: web.Request, services: Services, next_path: str) -> web.HTTPFound:
    """The redirect to GitHub, carrying a new state bound to this browser."""
    settings = services.settings
    state = secrets.token_urlsafe(32)
    query = urlencode(
        {
            "client_id": settings.github_client_id or "",
            "redirect_uri": callback_url(request, services),
            "state": state,
            "allow_signup": "false",
        }
    )
    redirect = web.HTTPFound(f"{settings.github_web_url}/login/oauth/authorize?{query}")
    redirect.set_cookie(
        STATE_COOKIE,
        f"{state}:{quote(next_path, safe='')}",
        max_age=STATE_SECONDS,
        path=START_PATH,
        secure=True,
        httponly=True,
        samesite="Lax",
    )
    return redirect


@dataclass(frozen=True, slots=True)
class GitHubUser:
    login: str
    next_path: str


async def finish(request: web.Request, services: Services) -> GitHubUser:
    """Check the state, exchange the code, read the user."""
    query = request.query
    cookie = request.cookies.get(STATE_COOKIE, "")
    expected, _, next_quoted = cookie.partition(":")
    if "error" in query:
        # The person declined on GitHub (or GitHub refused the request).
        raise SignInRefused("GitHub did not sign you in: the authorisation was declined.", 401)
    state, code = query.get("state", ""), query.get("code", "")
    if not expected or not hmac.compare_digest(state.encode(), expected.encode()):
        raise SignInRefused(
            "This sign-in could not be tied to this browser (it expired, or came from"
            " elsewhere). Start again.",
            400,
        )
    if not code or len(code) > 256:
        raise SignInRefused("GitHub sent no sign-in code. Start again.", 400)
    token = await _exchange(request, services, code)
    login = await _login(services, token)
    return GitHubUser(login, unquote(next_quoted) or "/")


async def _exchange(request: web.Request, services: Services, code: str) -> str:
    settings = services.settings
    assert services.github is not None and settings.github_client_secret is not None
    form = {
        "client_id": settings.github_client_id or "",
        "client_secret": settings.github_client_secret.reveal(),
        "code": code,
        "redirect_uri": callback_url(request, services),
    }
    try:
        async with services.github.session.post(
            f"{settings.github_web_url}/login/oauth/access_token",
            data=form,
            headers={"Accept": "application/json", "User-Agent": REQUESTER},
            timeout=EXCHANGE_TIMEOUT,
        ) as response:
            body = await response.json(content_type=None) if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("GitHub sign-in: the code exchange failed: %s", type(exc).__name__)
        raise SignInRefused("GitHub could not be reached to finish signing in.", 502) from None
    token = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        # GitHub answers 200 with an "error" for a code used twice, expired or wrong.
        error = body.get("error") if isinstance(body, dict) else None
        log.warning("GitHub sign-in: the code was refused (%s)", error or "no token")
        raise SignInRefused("GitHub refused the sign-in code (used or expired). Start again.", 401)
    return token


class _UserAuth:
    """The signed-in user's own token: for ``GET /user`` once, never cached or stored."""

    pacing_key: str | None = None

    def __init__(self, token: str) -> None:
        self._token = token

    async def authorization(self) -> str:
        return f"Bearer {self._token}"

    async def rejected(self, value: str) -> bool:
        return False  # a fresh user token that GitHub refuses will not get better


async def _login(services: Services, token: str) -> str:
    assert services.github is not None
    client = GitHubClient(
        services.github.session,
        auth=_UserAuth(token),
        base_url=services.settings.github_api_url,
        clock=services.clock,
    )
    try:
        user = await client.getitem("/user")
    except (GitHubException, GitHubUnavailable) as exc:
        log.warning("GitHub sign-in: GET /user failed: %s", type(exc).__name__)
        raise SignInRefused("GitHub did not say who you are. Start again.", 502) from None
    login = user.get("login") if isinstance(user, dict) else None
    if not isinstance(login, str) or not login:
        raise SignInRefused("GitHub did not say who you are. Start again.", 502)
    return login
