"""A fake GitHub for tests: a real HTTP server that authenticates, answers and refuses like
api.github.com, records every request, and checks each one against GitHub's own description
(``../shared/conformance``).

Start one with the ``github`` fixture (tests/github_fixtures.py) and point the app at
``github.url``::

    installation = github.add_installation(account="acme", repos=["acme/runner"])
    github.set_file("acme/runner", ".github/update-pipeline.yml", "canary: true\\n")
    ...  # run the code under test against GITHUB_API_URL=github.url
    (call,) = github.calls("POST /repos/{owner}/{repo}/check-runs")
    assert call.json["name"] == "update-pipeline"

Shape of this module, for whoever extends it:

* State lives in plain objects (``Installation``, ``Token``, ``Repo``); most resources are
  stored as the very JSON GitHub would return, built from the subset's response examples.
  URLs inside state say ``https://api.github.com``; they are rewritten to ``fake.url`` on
  the wire, so a client following them reaches the fake.
* One handler per operation, registered with ``@operation("POST /repos/{owner}/{repo}/...")``
  (the conformance key). A handler takes a ``Ctx`` and returns the JSON body (answered with
  the operation's first success status) or a ``Reply``; it raises ``GitHubError`` to refuse.
  Valid operations without a handler answer 501 and are recorded as a violation.
* Every request passes, in order: conformance check (recorded in ``violations``), injected
  faults, routing (404), authentication (401/403), 400/422 for a bad body, the primary rate
  limit, repository access (404), the handler, then ``If-None-Match`` (304).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import fnmatch
import hashlib
import importlib.util
import inspect
import itertools
import json
import re
import secrets
import string
import sys
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlencode

import jsonschema
import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

T = TypeVar("T")

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
API_ROOT = "https://api.github.com"
WEB_ROOT = "https://github.com"
DOCS = "https://docs.github.com/rest"
APP_ID = 4242
SECONDARY_LIMIT_MESSAGE = (
    "You have exceeded a secondary rate limit. Please wait a few minutes before you try"
    " again. If you reach out to GitHub Support for help, please include the request ID."
)
# GitHub derives the legacy ``permission`` from the repository role this way.
PERMISSION_OF_ROLE = {
    "admin": "admin",
    "maintain": "write",
    "write": "write",
    "triage": "read",
    "read": "read",
    "none": "none",
}
_ROLE_FLAGS = {  # role -> the collaborator ``permissions`` flags it grants
    "admin": ("pull", "triage", "push", "maintain", "admin"),
    "maintain": ("pull", "triage", "push", "maintain"),
    "write": ("pull", "triage", "push"),
    "triage": ("pull", "triage"),
    "read": ("pull",),
    "none": (),
}


def _load_check_request() -> ModuleType:
    if "check_request" in sys.modules:
        return sys.modules["check_request"]
    source = CONFORMANCE / "check_request.py"
    if not source.exists():
        raise RuntimeError(
            f"{source} is missing: the conformance data lives in shared/ beside the repository"
        )
    spec = importlib.util.spec_from_file_location("check_request", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_request"] = module
    spec.loader.exec_module(module)
    return module


check_request = _load_check_request()
OPERATIONS: dict[str, dict[str, Any]] = json.loads(
    (CONFORMANCE / "github-rest-subset.json").read_text(encoding="utf-8")
)["operations"]


# -- Keys, time and small helpers ---------------------------------------------------------


@cache
def _key_pair() -> tuple[str, Any]:
    """One 2048-bit RSA key pair per test session: (private PEM, public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # what GitHub hands out
        serialization.NoEncryption(),
    ).decode()
    return pem, key.public_key()


def iso(moment: datetime) -> str:
    """GitHub's timestamp format: ``2026-03-01T12:00:00Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_blob_sha(data: bytes) -> str:
    """The SHA git (and so GitHub) gives a file's contents."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fake_sha(*parts: object) -> str:
    """A stable 40-hex commit SHA for anything the test did not name."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()


def _node_id(kind: str, number: int) -> str:
    return base64.b64encode(f"0{len(kind)}:{kind}{number}".encode()).decode()


@cache
def _example_raw(key: str, status: str | None, name: str | None) -> Any:
    op = OPERATIONS[key]
    status = status or str(op["success_status"][0])
    examples = op["responses"][status]["content"]["application/json"]["examples"]
    return examples[name or next(iter(examples))]["value"]


def example(key: str, status: int | None = None, name: str | None = None) -> Any:
    """A fresh copy of one of the subset's response examples, to use as a body template."""
    return copy.deepcopy(_example_raw(key, str(status) if status else None, name))


# -- Errors, replies, recorded requests, faults --------------------------------------------


class GitHubError(Exception):
    """Raised by a handler to answer as GitHub does when it refuses a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "documentation_url": DOCS}
        if self.errors is not None:
            body["errors"] = self.errors
        if self.status == 422 or self.status >= 500:
            body["status"] = str(self.status)
        return body


def not_found() -> GitHubError:
    return GitHubError(404, "Not Found")


def found(value: T | None) -> T:
    """``value``, or GitHub's 404 when there is none."""
    if value is None:
        raise not_found()
    return value


def validation_failed(resource: str, code: str, field_name: str) -> GitHubError:
    return GitHubError(
        422,
        "Validation Failed",
        errors=[{"resource": resource, "code": code, "field": field_name}],
    )


@dataclass
class Reply:
    """What a handler answers when the default (first success status, JSON body) won't do."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    """One request the fake received, and what it answered (``status`` None: reset)."""

    method: str
    path: str  # decoded, without the query
    query: dict[str, str]
    headers: CIMultiDict[str]
    json: Any
    status: int | None = None
    operation: str | None = None  # the conformance key, None when no operation matched
    params: dict[str, str] = field(default_factory=dict)  # decoded path parameters
    installation_id: int | None = None  # whose token made it
    at: datetime | None = None  # when it arrived, on the fake's clock

    @property
    def target(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Fault:
    """An injected failure; ``hits`` counts the requests it answered."""

    pattern: str
    status: int | None = 502
    times: int | None = 1  # None: every matching request
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    delay: float = 0.0
    reset: bool = False
    until: datetime | None = None  # on the fake's clock; None: until ``times`` runs out
    hits: int = 0

    def active_at(self, moment: datetime) -> bool:
        if self.until is not None and moment >= self.until:
            return False
        return self.times is None or self.hits < self.times

    @property
    def active(self) -> bool:
        return self.times is None or self.hits < self.times


def _matches(pattern: str | None, method: str, path: str, operation: str | None) -> bool:
    """A pattern is a conformance key, or a ``METHOD /path`` glob on the concrete path."""
    if pattern is None or pattern == "*" or pattern == operation:
        return True
    return fnmatch.fnmatchcase(f"{method} {path}", pattern)


# -- State ---------------------------------------------------------------------------------


@dataclass
class Installation:
    id: int
    account: str
    account_type: str
    repos: list[str]  # full names
    suspended: bool = False
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    suspended_at: datetime | None = None
    permissions: dict[str, str] = field(
        default_factory=lambda: {
            "actions": "write",
            "checks": "write",
            "contents": "write",
            "issues": "write",
            "metadata": "read",
            "pull_requests": "write",
        }
    )
    events: list[str] = field(
        default_factory=lambda: [
            "check_run",
            "issue_comment",
            "issues",
            "pull_request",
            "push",
            "workflow_run",
        ]
    )
    repository_selection: str = "selected"

    def covers(self, full_name: str) -> bool:
        return full_name.lower() in {r.lower() for r in self.repos}


@dataclass
class Token:
    value: str
    installation_id: int
    expires_at: datetime
    repos: frozenset[str] | None = None  # lower-case full names when narrowed at issuance
    revoked: bool = False


@dataclass
class Repo:
    """One repository's state. Resources are stored as the JSON GitHub returns."""

    full_name: str
    id: int
    private: bool = False
    default_branch: str = "main"
    issues: dict[int, dict[str, Any]] = field(default_factory=dict)  # pulls too, as GitHub
    comments: dict[int, dict[str, Any]] = field(default_factory=dict)  # by comment id
    reactions: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)  # by lower-case name
    check_runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (ref, path)
    roles: dict[str, str] = field(default_factory=dict)  # lower-case login -> role name
    custom_roles: dict[str, str] = field(default_factory=dict)  # custom role -> its base

    def base_role(self, role: str) -> str:
        """The built-in role a role grants what of: itself, or a custom role's base."""
        return self.custom_roles.get(role, role)

    workflows: dict[int, dict[str, Any]] = field(default_factory=dict)
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    dispatches: list[dict[str, Any]] = field(default_factory=list)
    run_names: dict[int, str] = field(default_factory=dict)  # workflow id -> its run-name
    pulls: dict[int, dict[str, Any]] = field(default_factory=dict)
    pull_files: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "heads/main" -> sha
    releases: dict[int, dict[str, Any]] = field(default_factory=dict)
    topics: list[str] = field(default_factory=list)
    properties: dict[str, str | list[str] | None] = field(default_factory=dict)
    next_number: int = 1

    @property
    def owner(self) -> str:
        return self.full_name.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.full_name.split("/", 1)[1]

    def issue(self, number: int) -> dict[str, Any]:
        if number not in self.issues:
            raise not_found()
        return self.issues[number]

    def resolve(self, ref: str) -> str:
        """A commit SHA for a branch, tag, full ref or SHA."""
        ref = ref.removeprefix("refs/")
        for candidate in (ref, f"heads/{ref}", f"tags/{ref}"):
            if candidate in self.refs:
                return self.refs[candidate]
        return ref


@dataclass
class Caller:
    kind: str  # "app", "installation", "user" or "anonymous"
    installation: Installation | None = None
    token: Token | None = None
    login: str | None = None

    @property
    def rate_key(self) -> str:
        if self.installation is not None:
            return f"installation:{self.installation.id}"
        return self.kind if self.login is None else f"user:{self.login}"


@dataclass
class RateWindow:
    limit: int
    used: int
    reset: int  # epoch seconds


# -- The operation table -------------------------------------------------------------------


@dataclass
class Ctx:
    """What a handler gets: the parsed request, the caller, and the fake's state."""

    fake: FakeGitHub
    key: str
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: Any
    request: web.Request
    caller: Caller
    repo_state: Repo | None = None

    @property
    def repo(self) -> Repo:
        if self.repo_state is None:
            raise not_found()
        return self.repo_state

    def int(self, name: str) -> int:
        return int(self.params[name])

    def arg(self, name: str, default: Any = None) -> Any:
        """A body field (None when the body has none)."""
        return (self.body or {}).get(name, default) if isinstance(self.body, dict) else default

    def page(self, items: list[Any], *, wrap: str | None = None) -> Reply:
        """One page of ``items`` as GitHub pages (``per_page``/``page``, ``Link`` header);
        ``wrap`` puts the page under that key beside ``total_count``."""
        per_page = min(max(int(self.query.get("per_page", 30)), 1), 100)
        page = max(int(self.query.get("page", 1)), 1)
        last = max((len(items) + per_page - 1) // per_page, 1)
        chunk = items[(page - 1) * per_page : page * per_page]
        links = []
        if page > 1:
            links += [(min(page - 1, last), "prev")]
        if page < last:
            links += [(page + 1, "next"), (last, "last")]
        if page > 1:
            links += [(1, "first")]
        url = self.request.rel_url
        header = ", ".join(
            f'<{self.fake.url}{url.update_query(page=str(n))}>; rel="{rel}"' for n, rel in links
        )
        body: Any = {"total_count": len(items), wrap: chunk} if wrap else chunk
        status = OPERATIONS[self.key]["success_status"][0]
        return Reply(status, body, {"Link": header} if header else {})


Handler = Callable[[Ctx], Any]


@dataclass(frozen=True)
class Operation:
    key: str
    handler: Handler | None
    auth: str  # "app" (JWT), "installation" (token), "user", "any" or "none"


HANDLERS: dict[str, Operation] = {}


def default_auth(key: str) -> str:
    path = key.split(" ", 1)[1]
    if path.startswith("/app-manifests/"):
        return "none"  # the code in the path is the credential
    if path == "/app" or path.startswith("/app/") or path == "/repos/{owner}/{repo}/installation":
        return "app"
    if path == "/rate_limit":
        return "any"
    if path == "/user" or path.startswith("/user/"):
        return "user"
    return "installation"


def operation(key: str, *, auth: str | None = None) -> Callable[[Handler], Handler]:
    """Register ``handler`` for the conformance operation ``key``."""
    if key not in OPERATIONS:
        raise KeyError(f"{key!r} is not an operation of the conformance subset")

    def register(handler: Handler) -> Handler:
        HANDLERS[key] = Operation(key, handler, auth or default_auth(key))
        return handler

    return register


# -- The server ----------------------------------------------------------------------------

LIVE: list[FakeGitHub] = []  # every fake not yet checked by tests/github_fixtures.py


class FakeGitHub:
    """A stateful, recording, fault-injecting fake of api.github.com for one test."""

    def __init__(
        self,
        clock: Any = None,
        *,
        app_id: int = APP_ID,
        app_slug: str = "update-pipeline",
        rate_limit: int = 5000,
        check_responses: bool = True,
    ) -> None:
        self.clock = clock  # None (real UTC time), a callable, or an object with .now()
        self.app_id = app_id
        self.app_slug = app_slug
        self.rate_limit = rate_limit
        self.check_responses = check_responses
        self.private_key_pem, self._public_key = _key_pair()
        self.url = ""
        self.requests: list[Recorded] = []
        self.violations: list[str] = []
        self.faults: list[Fault] = []
        self.handlers: dict[str, Operation] = {
            key: HANDLERS.get(key) or Operation(key, None, default_auth(key)) for key in OPERATIONS
        }
        self.override("POST /app-manifests/{code}/conversions", _convert_manifest)
        self.installations: dict[int, Installation] = {}
        self.tokens: dict[str, Token] = {}
        self.user_tokens: dict[str, str] = {}  # user-to-server token -> login
        self.repos: dict[str, Repo] = {}  # by lower-case full name
        self.teams: dict[tuple[str, str, str], dict[str, str]] = {}
        self.deliveries: dict[int, dict[str, Any]] = {}
        self.redeliveries: list[int] = []
        self.redelivery_status_code = 200
        self.hook_config: dict[str, Any] = {
            "content_type": "json",
            "insecure_ssl": "0",
            "secret": "********",
            "url": "https://update-pipeline.example/github/webhook",
        }
        self.rate_windows: dict[str, RateWindow] = {}
        self.manifest_codes: dict[str, dict[str, Any]] = {}  # code -> the App manifest
        self.created_apps: list[dict[str, Any]] = []  # what the code exchanges answered
        # The App's user authorisation flow, on the fake's web side (see _authorize).
        self.oauth_client_id = "Iv1.fakeclientid"
        self.oauth_client_secret = "fake-oauth-client-secret"
        self.oauth_login: str | None = None  # who approves on the authorize page
        self.oauth_codes: dict[str, tuple[str, str]] = {}  # code -> (login, redirect_uri)
        self.oauth_exchanges: list[dict[str, str]] = []  # each exchange's form, no secret
        self._ids = itertools.count(1001)
        self._users: dict[str, tuple[str, int, str]] = {}
        self._server: TestServer | None = None
        self._closing = asyncio.Event()
        self.closed = False
        LIVE.append(self)

    # -- lifecycle --

    async def start(self) -> FakeGitHub:
        app = web.Application()
        # GitHub's web side (github.com, not the API), served at the same address.
        app.router.add_get("/login/oauth/authorize", self._authorize)
        app.router.add_post("/login/oauth/access_token", self._access_token)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = TestServer(app, host="127.0.0.1", port=0)
        await self._server.start_server(shutdown_timeout=2.0, access_log=None)
        self.url = str(self._server.make_url("")).rstrip("/")
        return self

    async def close(self) -> None:
        self._closing.set()  # wakes injected delays, so shutdown does not wait on them
        if self._server is not None:
            await self._server.close()
            self._server = None
        self.closed = True

    async def __aenter__(self) -> FakeGitHub:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def now(self) -> datetime:
        if self.clock is None:
            return datetime.now(UTC)
        if callable(self.clock):
            return self.clock()
        return self.clock.now()

    def new_id(self) -> int:
        return next(self._ids)

    # -- App credentials (for tests that talk to the fake directly) --

    def app_jwt(self, **claims: Any) -> str:
        """A JWT GitHub would accept from this App (``claims`` override the defaults)."""
        now = int(self.now().timestamp())
        payload = {"iat": now - 60, "exp": now + 540, "iss": str(self.app_id), **claims}
        return jwt.encode(payload, self.private_key_pem, algorithm="RS256")

    def issue_token(self, installation_id: int, repos: Iterable[str] | None = None) -> str:
        """An installation access token, as ``POST .../access_tokens`` hands out."""
        installation = self.installations[installation_id]
        value = "ghs_" + "".join(
            secrets.choice(string.ascii_letters + string.digits) for _ in range(36)
        )
        narrowed = frozenset(r.lower() for r in repos) if repos is not None else None
        self.tokens[value] = Token(
            value, installation.id, self.now() + timedelta(hours=1), narrowed
        )
        return value

    def token_for(self, installation_id: int) -> str:
        """The most recently issued token of an installation that is still usable."""
        for token in reversed(self.tokens.values()):
            if token.installation_id == installation_id and self._usable(token):
                return token.value
        raise LookupError(f"no live token for installation {installation_id}")

    def revoke_token(self, value: str) -> None:
        self.tokens[value].revoked = True

    def expire_tokens(self) -> None:
        """Every token issued so far expires now."""
        for token in self.tokens.values():
            token.expires_at = min(token.expires_at, self.now() - timedelta(seconds=1))

    def issue_user_token(self, login: str) -> str:
        """A user-to-server token (``ghu_``), for the ``/user`` routes."""
        value = "ghu_" + secrets.token_hex(18)
        self.user_tokens[value] = login
        return value

    def set_rate_limit(
        self, remaining: int, *, installation_id: int | None = None, reset_in: float = 3600
    ) -> None:
        """Put a caller's primary rate limit window in a given state (None: the App)."""
        key = "app" if installation_id is None else f"installation:{installation_id}"
        reset = int(self.now().timestamp() + reset_in)
        self.rate_windows[key] = RateWindow(self.rate_limit, self.rate_limit - remaining, reset)

    def _usable(self, token: Token) -> bool:
        return not token.revoked and token.expires_at > self.now()

    # -- the App's user authorisation flow (the web side) --

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        """GitHub's authorize page with ``oauth_login`` signed in and approving at once:
        back to ``redirect_uri`` with a one-time code and the state; with no one set,
        the person declines (``error=access_denied``). An unknown client is a 404 page."""
        query = request.query
        redirect = query.get("redirect_uri", "")
        if query.get("client_id") != self.oauth_client_id or not redirect.startswith("http"):
            return web.Response(status=404, text="Not Found")
        back = {"state": query.get("state", "")}
        if self.oauth_login is None:
            back["error"] = "access_denied"
        else:
            code = secrets.token_hex(10)
            self.oauth_codes[code] = (self.oauth_login, redirect)
            back["code"] = code
        separator = "&" if "?" in redirect else "?"
        raise web.HTTPFound(redirect + separator + urlencode(back))

    async def _access_token(self, request: web.Request) -> web.StreamResponse:
        """The code exchange: a code works once, for the client it was issued to and the
        redirect_uri it was sent to; GitHub answers a bad one with 200 and an error."""
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.oauth_exchanges.append({k: v for k, v in form.items() if k != "client_secret"})
        if (
            form.get("client_id") != self.oauth_client_id
            or form.get("client_secret") != self.oauth_client_secret
        ):
            answer = {"error": "incorrect_client_credentials"}
        else:
            found = self.oauth_codes.pop(form.get("code", ""), None)
            if found is None or form.get("redirect_uri", found[1]) != found[1]:
                answer = {"error": "bad_verification_code"}
            else:
                token = self.issue_user_token(found[0])
                answer = {"access_token": token, "token_type": "bearer", "scope": ""}
        if "application/json" in request.headers.get("Accept", ""):
            return web.json_response(answer)
        return web.Response(
            text=urlencode(answer), content_type="application/x-www-form-urlencoded"
        )

    # -- the App manifest flow --

    def manifest_code(self, manifest: dict[str, Any]) -> str:
        """What GitHub's web side does when someone confirms an App manifest: the code it
        redirects back with, which ``POST /app-manifests/{code}/conversions`` exchanges,
        once, for the new App. The App is this fake's own (``app_id``, and the key the
        fake verifies JWTs with), named and configured as the manifest says."""
        hook = manifest.get("hook_attributes")
        if not isinstance(manifest.get("url"), str) or (
            hook is not None and not isinstance(hook.get("url"), str)
        ):
            raise ValueError("GitHub refuses a manifest without url (and hook_attributes.url)")
        code = secrets.token_hex(10)
        self.manifest_codes[code] = manifest
        return code

    def app_from_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The App GitHub creates from ``manifest``, with its credentials."""
        body = self.app_json()
        name = str(manifest.get("name") or body["name"])
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        hook = manifest.get("hook_attributes")
        body.update(
            slug=slug,
            name=name,
            description=manifest.get("description") or "",
            external_url=manifest["url"],
            html_url=f"{WEB_ROOT}/apps/{slug}",
            permissions=dict(manifest.get("default_permissions") or {}),
            events=list(manifest.get("default_events") or []),
            client_secret=secrets.token_hex(20),
            webhook_secret=secrets.token_hex(20) if hook else None,
            pem=self.private_key_pem,
        )
        self.created_apps.append(body)
        return copy.deepcopy(body)

    # -- installations and repositories --

    def add_installation(
        self,
        account: str = "acme",
        repos: Iterable[str] = (),
        *,
        suspended: bool = False,
        account_type: str = "Organization",
        id: int | None = None,
        repository_selection: str = "selected",
    ) -> int:
        installation = Installation(
            id=id if id is not None else self.new_id(),
            account=account,
            account_type=account_type,
            repos=[],
            created_at=self.now(),
            repository_selection=repository_selection,
        )
        self.installations[installation.id] = installation
        self.user(account, account_type)
        self.add_repos(installation.id, repos)
        if suspended:
            self.suspend_installation(installation.id)
        return installation.id

    def add_repos(self, installation_id: int, repos: Iterable[str]) -> None:
        installation = self.installations[installation_id]
        for full_name in repos:
            self.add_repo(full_name)
            if not installation.covers(full_name):
                installation.repos.append(full_name)

    def remove_repos(self, installation_id: int, repos: Iterable[str]) -> None:
        gone = {r.lower() for r in repos}
        installation = self.installations[installation_id]
        installation.repos = [r for r in installation.repos if r.lower() not in gone]

    def suspend_installation(self, installation_id: int) -> None:
        installation = self.installations[installation_id]
        installation.suspended = True
        installation.suspended_at = self.now()

    def unsuspend_installation(self, installation_id: int) -> None:
        installation = self.installations[installation_id]
        installation.suspended = False
        installation.suspended_at = None

    def remove_installation(self, installation_id: int) -> None:
        """Uninstalled: gone from listings, and its tokens stop working."""
        del self.installations[installation_id]

    def add_repo(
        self, full_name: str, *, private: bool = False, default_branch: str = "main"
    ) -> Repo:
        """The repository (created if new); its default branch gets a commit."""
        existing = self.repos.get(full_name.lower())
        if existing is not None:
            return existing
        repo = Repo(full_name, self.new_id(), private=private, default_branch=default_branch)
        repo.refs[f"heads/{default_branch}"] = fake_sha(full_name, default_branch)
        self.repos[full_name.lower()] = repo
        self.user(repo.owner, "Organization")
        return repo

    def repo(self, full_name: str) -> Repo:
        return self.repos[full_name.lower()]

    def installation_of(self, full_name: str) -> Installation | None:
        return next((i for i in self.installations.values() if i.covers(full_name)), None)

    # -- users --

    def user(self, login: str, type: str = "User") -> dict[str, Any]:
        """A simple-user object; the same login keeps the same id."""
        known = self._users.get(login.lower())
        if known is None:
            known = (login, self.new_id(), type)
            self._users[login.lower()] = known
        login, user_id, user_type = known
        body = copy.deepcopy(_SIMPLE_USER)
        body = _replace_strings(body, "octocat", login)
        body.update(id=user_id, node_id=_node_id("User", user_id), type=user_type)
        return body

    @property
    def bot_login(self) -> str:
        return f"{self.app_slug}[bot]"

    def bot(self) -> dict[str, Any]:
        return self.user(self.bot_login, "Bot")

    def author(self, ctx: Ctx) -> dict[str, Any]:
        """Who GitHub says made a change: the App's bot for installation tokens."""
        if ctx.caller.kind == "user" and ctx.caller.login:
            return self.user(ctx.caller.login)
        return self.bot()

    # -- repository data --

    def set_permission(
        self, repo: str, user: str, role_name: str = "write", *, base: str | None = None
    ) -> None:
        """Give ``user`` a role on ``repo``: a built-in one, or a custom role (an
        organisation's own) inheriting from the built-in role ``base``."""
        state = self.add_repo(repo)
        if base is not None:
            if base not in PERMISSION_OF_ROLE or base == "none" or role_name in PERMISSION_OF_ROLE:
                raise ValueError(f"custom role {role_name!r} needs a built-in base, not {base!r}")
            state.custom_roles[role_name] = base
        elif role_name not in PERMISSION_OF_ROLE:
            raise ValueError(
                f"unknown role {role_name!r}; one of {sorted(PERMISSION_OF_ROLE)},"
                " or give base= for a custom role"
            )
        self.user(user)
        state.roles[user.lower()] = role_name

    def set_team_member(
        self, org: str, team: str, user: str, *, role: str = "member", state: str = "active"
    ) -> None:
        self.teams[(org.lower(), team.lower(), user.lower())] = {"role": role, "state": state}

    def set_file(self, repo: str, path: str, text: str | bytes, ref: str | None = None) -> str:
        """Put a file at ``ref`` (the default branch when None); returns its blob SHA."""
        state = self.add_repo(repo)
        data = text.encode() if isinstance(text, str) else text
        state.files[(ref or state.default_branch, path.strip("/"))] = data
        return git_blob_sha(data)

    def delete_file(self, repo: str, path: str, ref: str | None = None) -> None:
        state = self.repo(repo)
        del state.files[(ref or state.default_branch, path.strip("/"))]

    def set_ref(self, repo: str, ref: str, sha: str) -> None:
        """``ref`` as ``heads/main`` or ``tags/v1`` (``refs/`` prefix optional)."""
        self.add_repo(repo).refs[ref.removeprefix("refs/")] = sha

    def add_label(
        self, repo: str, name: str, *, color: str = "ededed", description: str | None = None
    ) -> dict[str, Any]:
        state = self.add_repo(repo)
        if name.lower() not in state.labels:
            label_id = self.new_id()
            state.labels[name.lower()] = {
                "id": label_id,
                "node_id": _node_id("Label", label_id),
                "url": f"{API_ROOT}/repos/{state.full_name}/labels/{quote(name)}",
                "name": name,
                "description": description,
                "color": color,
                "default": False,
            }
        return state.labels[name.lower()]

    def add_issue(
        self,
        repo: str,
        title: str,
        body: str | None = None,
        *,
        labels: Iterable[str] = (),
        user: str = "octocat",
        state: str = "open",
    ) -> int:
        repo_state = self.add_repo(repo)
        issue = self._new_issue(repo_state, title, body, self.user(user))
        issue["labels"] = [self.add_label(repo, name) for name in labels]
        if state == "closed":
            _close(issue, self.now(), self.user(user), "completed")
        return int(issue["number"])

    def add_comment(self, repo: str, number: int, body: str, *, user: str = "octocat") -> int:
        state = self.repo(repo)
        return int(self._new_comment(state, state.issue(number), body, self.user(user))["id"])

    def add_pull(
        self,
        repo: str,
        title: str = "Update runner",
        *,
        head: str = "update",
        head_sha: str | None = None,
        base: str | None = None,
        body: str | None = None,
        files: Iterable[str | dict[str, Any]] = (),
        user: str = "octocat",
        state: str = "open",
        draft: bool = False,
    ) -> int:
        repo_state = self.add_repo(repo)
        pull = self._new_pull(
            repo_state,
            title,
            head,
            base or repo_state.default_branch,
            body,
            self.user(user),
            draft=draft,
            head_sha=head_sha,
        )
        number = int(pull["number"])
        repo_state.pull_files[number] = [_pull_file(repo_state, f) for f in files]
        if state == "closed":
            pull["state"] = "closed"
            pull["closed_at"] = iso(self.now())
            _close(repo_state.issues[number], self.now(), self.user(user), "completed")
        return number

    def add_release(
        self,
        repo: str,
        tag: str,
        *,
        name: str | None = None,
        body: str | None = "",
        draft: bool = False,
        prerelease: bool = False,
        created_at: datetime | None = None,
        target_commitish: str | None = None,
    ) -> int:
        state = self.add_repo(repo)
        release = example("GET /repos/{owner}/{repo}/releases/latest")
        release = _replace_strings(release, "octocat/Hello-World", state.full_name)
        release = _replace_strings(release, "v1.0.0", tag)
        release_id = self.new_id()
        when = iso(created_at or self.now())
        base = f"{API_ROOT}/repos/{state.full_name}/releases/{release_id}"
        release.update(
            url=base,
            assets_url=f"{base}/assets",
            upload_url=f"https://uploads.github.com/repos/{state.full_name}/releases/"
            f"{release_id}/assets{{?name,label}}",
            id=release_id,
            node_id=_node_id("Release", release_id),
            tag_name=tag,
            target_commitish=target_commitish or state.default_branch,
            name=name if name is not None else tag,
            body=body,
            draft=draft,
            prerelease=prerelease,
            created_at=when,
            published_at=None if draft else when,
            author=self.user("octocat"),
            assets=[],
        )
        release.pop("discussion_url", None)
        state.releases[release_id] = release
        state.refs.setdefault(f"tags/{tag}", fake_sha(state.full_name, tag))
        return release_id

    def add_workflow(
        self, repo: str, file: str, *, name: str | None = None, run_name: str | None = None
    ) -> int:
        """A workflow by file name (``canary.yml``) or path; returns its id. ``run_name``
        is the workflow's ``run-name``: ``${{ inputs.x }}`` in it takes a dispatch's input,
        and the result is the run's ``display_title``, as on GitHub."""
        state = self.add_repo(repo)
        path = file if "/" in file else f".github/workflows/{file}"
        for workflow in state.workflows.values():
            if workflow["path"] == path:
                if run_name is not None:
                    state.run_names[int(workflow["id"])] = run_name
                return int(workflow["id"])
        workflow = example("GET /repos/{owner}/{repo}/actions/workflows/{workflow_id}")
        workflow_id = self.new_id()
        when = iso(self.now())
        workflow.update(
            id=workflow_id,
            node_id=_node_id("Workflow", workflow_id),
            name=name or Path(path).stem,
            path=path,
            created_at=when,
            updated_at=when,
            url=f"{API_ROOT}/repos/{state.full_name}/actions/workflows/{workflow_id}",
            html_url=f"{WEB_ROOT}/{state.full_name}/blob/{state.default_branch}/{path}",
            badge_url=f"{WEB_ROOT}/{state.full_name}/workflows/{quote(name or Path(path).stem)}"
            "/badge.svg",
        )
        state.workflows[workflow_id] = workflow
        if run_name is not None:
            state.run_names[workflow_id] = run_name
        return workflow_id

    def add_workflow_run(
        self,
        repo: str,
        workflow: str | int,
        *,
        head_sha: str | None = None,
        head_branch: str | None = None,
        event: str = "push",
        status: str = "completed",
        conclusion: str | None = "success",
        actor: str = "octocat",
    ) -> int:
        state = self.add_repo(repo)
        workflow_id = workflow if isinstance(workflow, int) else self.add_workflow(repo, workflow)
        branch = head_branch or state.default_branch
        run = self._new_run(
            state,
            state.workflows[workflow_id],
            branch,
            head_sha or state.resolve(branch),
            event,
            self.user(actor),
        )
        run.update(status=status, conclusion=conclusion if status == "completed" else None)
        return int(run["id"])

    def add_delivery(
        self,
        event: str = "issues",
        action: str | None = "opened",
        *,
        status_code: int = 200,
        guid: str | None = None,
        installation_id: int | None = None,
        repository_id: int | None = None,
        delivered_at: datetime | None = None,
        redelivery: bool = False,
    ) -> int:
        """A webhook delivery the App's hook made (``GET /app/hook/deliveries``)."""
        delivery = example("GET /app/hook/deliveries/{delivery_id}")
        delivery_id = self.new_id()
        guid = guid or str(uuid.uuid4())
        delivery.update(
            id=delivery_id,
            guid=guid,
            delivered_at=iso(delivered_at or self.now()),
            redelivery=redelivery,
            status="OK" if 200 <= status_code < 300 else f"Invalid HTTP Response: {status_code}",
            status_code=status_code,
            event=event,
            action=action,
            installation_id=installation_id,
            repository_id=repository_id,
            url=self.hook_config["url"],
            throttled_at=None,
        )
        delivery["request"]["headers"]["X-GitHub-Delivery"] = guid
        delivery["request"]["headers"]["X-GitHub-Event"] = event
        delivery["response"]["payload"] = "ok" if status_code < 300 else "error"
        self.deliveries[delivery_id] = delivery
        return delivery_id

    # -- recording, violations, faults --

    def calls(self, pattern: str | None = None) -> list[Recorded]:
        """Requests made, filtered by conformance key or ``METHOD /path`` glob."""
        return [r for r in self.requests if _matches(pattern, r.method, r.path, r.operation)]

    def last(self, pattern: str | None = None) -> Recorded:
        found = self.calls(pattern)
        if not found:
            raise AssertionError(f"no request matched {pattern!r}")
        return found[-1]

    @contextlib.contextmanager
    def expect_violations(self) -> Iterator[list[str]]:
        """For tests that send bad requests on purpose: the violations recorded inside the
        block are moved to the yielded list (so they fail nothing), and at least one must be."""
        before = len(self.violations)
        seen: list[str] = []
        yield seen
        seen.extend(self.violations[before:])
        del self.violations[before:]
        if not seen:
            raise AssertionError("expected the fake to record a conformance violation")

    def inject(
        self,
        pattern: str,
        status: int | None = 502,
        times: int | None = 1,
        headers: dict[str, str] | None = None,
        body: Any = None,
        delay: float = 0.0,
        reset: bool = False,
        until: datetime | None = None,
    ) -> Fault:
        """Fail the next ``times`` matching requests (None: all of them).

        ``pattern`` is a conformance key or a ``METHOD /path`` glob. After ``delay`` seconds
        the fault closes the connection unanswered (``reset``), or answers ``status`` with
        ``headers`` and ``body`` (GitHub-like default body), or -- with ``status=None`` --
        lets the request through (slowness only). With ``until``, the fault lasts only
        until that moment of the fake's clock: an outage or a rate-limit window that ends
        when the test's clock gets there.
        """
        fault = Fault(pattern, status, times, dict(headers or {}), body, delay, reset, until)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def override(self, key: str, handler: Handler, *, auth: str | None = None) -> None:
        """Answer ``key`` with ``handler`` in this fake only."""
        if key not in OPERATIONS:
            raise KeyError(f"{key!r} is not an operation of the conformance subset")
        self.handlers[key] = Operation(key, handler, auth or self.handlers[key].auth)

    # -- the request path --

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body, body_error = _parse_json(raw)
        record = Recorded(
            request.method,
            request.path,
            dict(request.query),
            CIMultiDict(request.headers),
            body,
            at=self.now(),
        )
        self.requests.append(record)
        try:
            key, raw_params, _ = check_request.match(request.method, request.raw_path)
            record.operation = key
            record.params = {k: unquote(v) for k, v in raw_params.items()}
        except LookupError:
            key = None
        problems = (
            [f"body is not valid JSON: {body_error}"]
            if body_error
            else check_request.validate(request.method, request.raw_path, body)
        )
        if "User-Agent" not in request.headers:
            problems.append("no User-Agent header (GitHub answers 403)")
        if problems:
            self.violations.append(f"{request.method} {request.raw_path}: " + "; ".join(problems))
        try:
            response = await self._answer(request, record, key, problems, body_error)
        except GitHubError as exc:
            response = self._json_response(exc.status, exc.body(), exc.headers)
        except Exception:  # a bug in the fake: make it loud, in this test
            self.violations.append(
                f"the fake failed on {request.method} {request.raw_path}:\n"
                + traceback.format_exc()
            )
            response = self._json_response(500, {"message": "FakeGitHub crashed"})
        if response is None:  # reset: the connection is closed, nothing is sent
            return web.Response()
        record.status = response.status
        return response

    async def _answer(
        self,
        request: web.Request,
        record: Recorded,
        key: str | None,
        problems: list[str],
        body_error: str | None,
    ) -> web.StreamResponse | None:
        moment = self.now()
        fault = next(
            (
                f
                for f in self.faults
                if f.active_at(moment) and _matches(f.pattern, request.method, request.path, key)
            ),
            None,
        )
        if fault is not None:
            fault.hits += 1
            if fault.delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), fault.delay)
            if fault.reset:
                if request.transport is not None:
                    request.transport.close()
                return None
            if fault.status is not None:
                return self._fault_response(fault)
        if "User-Agent" not in request.headers:
            raise GitHubError(
                403,
                "Request forbidden by administrative rules. Please make sure your request"
                " has a User-Agent header (https://docs.github.com/en/rest/overview/"
                "resources-in-the-rest-api#user-agent-required).",
            )
        if key is None:
            raise not_found()
        op = self.handlers[key]
        caller = self._authenticate(request, op.auth)
        if caller.installation is not None:
            record.installation_id = caller.installation.id
        counted = key != "GET /rate_limit"  # GitHub does not count asking for the limit
        window, exhausted = self._rate_limit(caller, counted=counted)
        rate_headers = self._rate_header_values(window)
        try:
            if body_error:
                raise GitHubError(400, "Problems parsing JSON")
            if problems:
                raise GitHubError(422, "Invalid request.\n\n" + "\n".join(problems))
            if exhausted:
                raise GitHubError(
                    403,
                    f"API rate limit exceeded for {caller.rate_key.replace(':', ' ID ')}.",
                )
            ctx = Ctx(
                self,
                key,
                request.method,
                request.path,
                record.params,
                dict(request.query),
                record.json,
                request,
                caller,
            )
            ctx.repo_state = self._repository(ctx)
            if op.handler is None:
                self.violations.append(
                    f"{request.method} {request.raw_path}: FakeGitHub does not implement"
                    f" {key} yet (add a handler in tests/fake_github.py)"
                )
                raise GitHubError(501, f"FakeGitHub does not implement {key} yet")
            result = op.handler(ctx)
            if inspect.isawaitable(result):
                result = await result
            reply = (
                result
                if isinstance(result, Reply)
                else Reply(OPERATIONS[key]["success_status"][0], result)
            )
        except GitHubError as exc:
            headers = {**self._rate_header_values(window), **exc.headers}
            return self._json_response(exc.status, exc.body(), headers)
        if self.check_responses:
            self._check_response(request, key, reply)
        response = self._json_response(
            reply.status, reply.body, {**rate_headers, **reply.headers}, etag=True
        )
        if request.method == "GET" and reply.status == 200:
            wanted = request.headers.get("If-None-Match", "")
            etag = response.headers["ETag"]
            if any(_same_etag(tag, etag) for tag in wanted.split(",")):
                if counted:
                    window.used -= 1  # GitHub does not count a 304 either
                headers = {**self._rate_header_values(window), "ETag": etag}
                return web.Response(status=304, headers=headers)
        return response

    def _authenticate(self, request: web.Request, kind: str) -> Caller:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        scheme = scheme.lower()
        if kind == "none":
            return Caller("anonymous")
        if not credential:
            if kind == "any":
                return Caller("anonymous")
            if kind == "app":  # GitHub's answer to a missing JWT on /app routes
                raise GitHubError(401, "A JSON web token could not be decoded")
            raise GitHubError(401, "Requires authentication")
        if kind == "app" or (kind == "any" and credential.count(".") == 2):
            if scheme != "bearer":
                raise GitHubError(401, "A JSON web token could not be decoded")
            self._verify_jwt(credential.strip())
            return Caller("app")
        if kind == "user":
            value = credential.strip() if scheme in ("token", "bearer") else ""
            login = self.user_tokens.get(value)
            if login is None:
                raise GitHubError(401, "Bad credentials")
            return Caller("user", login=login)
        token = self.tokens.get(credential.strip()) if scheme in ("token", "bearer") else None
        if token is None or not self._usable(token):
            raise GitHubError(401, "Bad credentials")
        installation = self.installations.get(token.installation_id)
        if installation is None:
            raise GitHubError(401, "Bad credentials")
        if installation.suspended:
            raise GitHubError(403, "This installation has been suspended")
        return Caller("installation", installation, token)

    def _verify_jwt(self, token: str) -> None:
        try:
            claims = jwt.decode(
                token,
                self._public_key,
                algorithms=["RS256"],
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_iss": False,
                    "verify_aud": False,
                },
            )
        except jwt.InvalidTokenError:
            raise GitHubError(401, "A JSON web token could not be decoded") from None
        now = self.now().timestamp()
        iat, exp, iss = claims.get("iat"), claims.get("exp"), claims.get("iss")
        if not _is_number(iat, integer=True) or iat > now + 60:
            raise GitHubError(
                401,
                "'Issued at' claim ('iat') must be an Integer representing the time that the"
                " assertion was issued.",
            )
        if not _is_number(exp) or exp <= now:
            raise GitHubError(
                401,
                "'Expiration time' claim ('exp') must be a numeric value representing the"
                " future time at which the assertion expires.",
            )
        if exp - iat > 600:
            raise GitHubError(401, "'Expiration time' claim ('exp') is too far in the future.")
        if str(iss) != str(self.app_id) or isinstance(iss, bool):
            raise GitHubError(401, "'Issuer' claim ('iss') must be the App's id.")

    def _rate_limit(self, caller: Caller, *, counted: bool) -> tuple[RateWindow, bool]:
        """The caller's window, counting this request; True when it was already used up."""
        if caller.kind == "anonymous" and caller.installation is None:
            key, limit = "anonymous", 60
        else:
            key, limit = caller.rate_key, self.rate_limit
        now = int(self.now().timestamp())
        window = self.rate_windows.get(key)
        if window is None or window.reset <= now:
            window = RateWindow(limit, 0, now + 3600)
            self.rate_windows[key] = window
        exhausted = counted and window.used >= window.limit
        if counted and not exhausted:
            window.used += 1
        return window, exhausted

    @staticmethod
    def _rate_header_values(window: RateWindow | None) -> dict[str, str]:
        if window is None:
            return {}
        return {
            "X-RateLimit-Limit": str(window.limit),
            "X-RateLimit-Remaining": str(max(window.limit - window.used, 0)),
            "X-RateLimit-Reset": str(window.reset),
            "X-RateLimit-Used": str(window.used),
            "X-RateLimit-Resource": "core",
        }

    def _repository(self, ctx: Ctx) -> Repo | None:
        """The repository a /repos route names, if the caller may see it (else 404)."""
        if "owner" not in ctx.params or "repo" not in ctx.params:
            return None
        full_name = f"{ctx.params['owner']}/{ctx.params['repo']}"
        repo = self.repos.get(full_name.lower())
        caller = ctx.caller
        if caller.kind == "installation":
            assert caller.installation is not None and caller.token is not None
            narrowed = caller.token.repos
            if repo is None:
                raise not_found()
            covered = caller.installation.covers(full_name) and (
                narrowed is None or full_name.lower() in narrowed
            )
            if not covered:
                # As on GitHub: any token reads a public repository; writing to one the
                # installation does not cover is refused, a private one stays unseen.
                if repo.private:
                    raise not_found()
                if ctx.method not in ("GET", "HEAD"):
                    raise GitHubError(403, "Resource not accessible by integration")
        return repo

    def _fault_response(self, fault: Fault) -> web.Response:
        status = fault.status or 502
        body = fault.body
        if body is None and status not in (204, 304):
            message = SECONDARY_LIMIT_MESSAGE if status in (403, 429) else HTTPStatus(status).phrase
            body = GitHubError(status, message).body()
        return self._json_response(status, body, fault.headers, rewrite=False)

    def _json_response(
        self,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
        *,
        etag: bool = False,
        rewrite: bool = True,
    ) -> web.Response:
        all_headers = {
            "X-GitHub-Request-Id": secrets.token_hex(8).upper(),
            "X-GitHub-Media-Type": "github.v3; format=json",
            "X-GitHub-Api-Version-Selected": "2022-11-28",
        }
        data = b""
        if body is not None and status not in (204, 304):
            if isinstance(body, (bytes, str)):
                data = body.encode() if isinstance(body, str) else body
            else:
                text = json.dumps(body)
                data = (text.replace(API_ROOT, self.url) if rewrite and self.url else text).encode()
            all_headers["Content-Type"] = "application/json; charset=utf-8"
        if etag and data:
            all_headers["ETag"] = f'W/"{hashlib.sha256(data).hexdigest()[:40]}"'
            all_headers["Vary"] = "Accept, Authorization, Cookie, X-GitHub-OTP"
        all_headers.update(headers or {})
        return web.Response(status=status, body=data, headers=all_headers)

    def _check_response(self, request: web.Request, key: str, reply: Reply) -> None:
        problems = response_problems(key, reply.status, reply.body)
        if problems:
            self.violations.append(
                f"the fake's own answer to {request.method} {request.raw_path} does not match"
                f" the subset's {reply.status} schema (fix tests/fake_github.py): "
                + "; ".join(problems[:5])
            )

    # -- builders shared by handlers and set-up helpers --

    def _new_issue(
        self, repo: Repo, title: str, body: str | None, user: dict[str, Any]
    ) -> dict[str, Any]:
        number = repo.next_number
        repo.next_number += 1
        issue_id = self.new_id()
        issue = example("POST /repos/{owner}/{repo}/issues")
        url = f"{API_ROOT}/repos/{repo.full_name}/issues/{number}"
        when = iso(self.now())
        issue.update(
            id=issue_id,
            node_id=_node_id("Issue", issue_id),
            url=url,
            repository_url=f"{API_ROOT}/repos/{repo.full_name}",
            labels_url=f"{url}/labels{{/name}}",
            comments_url=f"{url}/comments",
            events_url=f"{url}/events",
            html_url=f"{WEB_ROOT}/{repo.full_name}/issues/{number}",
            number=number,
            state="open",
            title=title,
            body=body,
            user=user,
            labels=[],
            assignee=None,
            assignees=[],
            milestone=None,
            locked=False,
            active_lock_reason=None,
            comments=0,
            closed_at=None,
            created_at=when,
            updated_at=when,
            closed_by=None,
            author_association="NONE" if user["type"] == "Bot" else "MEMBER",
            state_reason=None,
        )
        issue.pop("pull_request", None)
        repo.issues[number] = issue
        return issue

    def _new_comment(
        self, repo: Repo, issue: dict[str, Any], body: str, user: dict[str, Any]
    ) -> dict[str, Any]:
        comment_id = self.new_id()
        comment = example("POST /repos/{owner}/{repo}/issues/{issue_number}/comments")
        when = iso(self.now())
        comment.update(
            id=comment_id,
            node_id=_node_id("IssueComment", comment_id),
            url=f"{API_ROOT}/repos/{repo.full_name}/issues/comments/{comment_id}",
            html_url=f"{issue['html_url']}#issuecomment-{comment_id}",
            body=body,
            user=user,
            created_at=when,
            updated_at=when,
            issue_url=issue["url"],
            author_association="NONE" if user["type"] == "Bot" else "MEMBER",
        )
        repo.comments[comment_id] = comment
        issue["comments"] += 1
        return comment

    def _new_pull(
        self,
        repo: Repo,
        title: str,
        head: str,
        base: str,
        body: str | None,
        user: dict[str, Any],
        *,
        draft: bool = False,
        head_sha: str | None = None,
    ) -> dict[str, Any]:
        issue = self._new_issue(repo, title, body, user)
        number = issue["number"]
        pull = example("GET /repos/{owner}/{repo}/pulls/{pull_number}")
        pull = _replace_strings(pull, "octocat/Hello-World", repo.full_name)
        pull = _replace_strings(pull, "/1347", f"/{number}")
        repo_json = self.repo_json(repo)
        sha = head_sha or fake_sha(repo.full_name, head)
        repo.refs.setdefault(f"heads/{head}", sha)
        pull.update(
            id=self.new_id(),
            number=number,
            state="open",
            title=title,
            body=body,
            user=user,
            labels=[],
            milestone=None,
            active_lock_reason=None,
            created_at=issue["created_at"],
            updated_at=issue["updated_at"],
            closed_at=None,
            merged_at=None,
            merge_commit_sha=None,
            assignee=None,
            assignees=[],
            requested_reviewers=[],
            requested_teams=[],
            locked=False,
            draft=draft,
            merged=False,
            mergeable=True,
            merged_by=None,
            comments=0,
            review_comments=0,
            commits=1,
            author_association=issue["author_association"],
            auto_merge=None,
        )
        pull["node_id"] = _node_id("PullRequest", pull["id"])
        pull["head"].update(
            label=f"{repo.owner}:{head}",
            ref=head,
            sha=sha,
            repo=repo_json,
            user=self.user(repo.owner),
        )
        pull["base"].update(
            label=f"{repo.owner}:{base}",
            ref=base,
            sha=repo.resolve(base),
            repo=repo_json,
            user=self.user(repo.owner),
        )
        issue["pull_request"] = {
            "url": pull["url"],
            "html_url": pull["html_url"],
            "diff_url": pull["diff_url"],
            "patch_url": pull["patch_url"],
            "merged_at": None,
        }
        repo.pulls[number] = pull
        repo.pull_files.setdefault(number, [])
        return pull

    def _new_run(
        self,
        repo: Repo,
        workflow: dict[str, Any],
        branch: str,
        sha: str,
        event: str,
        actor: dict[str, Any],
    ) -> dict[str, Any]:
        runs = example("GET /repos/{owner}/{repo}/actions/runs")
        run = _replace_strings(runs["workflow_runs"][0], "octo-org/octo-repo", repo.full_name)
        run_id = self.new_id()
        base = f"{API_ROOT}/repos/{repo.full_name}/actions/runs/{run_id}"
        when = iso(self.now())
        run.update(
            id=run_id,
            name=workflow["name"],
            node_id=_node_id("WorkflowRun", run_id),
            check_suite_id=self.new_id(),
            head_branch=branch,
            head_sha=sha,
            path=workflow["path"],
            run_number=sum(1 for r in repo.runs.values() if r["workflow_id"] == workflow["id"]) + 1,
            event=event,
            display_title=workflow["name"],
            status="queued",
            conclusion=None,
            workflow_id=workflow["id"],
            url=base,
            html_url=f"{WEB_ROOT}/{repo.full_name}/actions/runs/{run_id}",
            created_at=when,
            updated_at=when,
            run_started_at=when,
            actor=actor,
            triggering_actor=actor,
            jobs_url=f"{base}/jobs",
            logs_url=f"{base}/logs",
            artifacts_url=f"{base}/artifacts",
            cancel_url=f"{base}/cancel",
            rerun_url=f"{base}/rerun",
            workflow_url=workflow["url"],
            repository=self.repo_json(repo, minimal=True),
            head_repository=self.repo_json(repo, minimal=True),
        )
        run["head_commit"].update(id=sha, timestamp=when)
        repo.runs[run_id] = run
        return run

    def repo_json(self, repo: Repo, *, minimal: bool = False) -> dict[str, Any]:
        """The repository object GitHub embeds (``minimal``: the short form runs use)."""
        body = copy.deepcopy(_REPOSITORY)
        body = _replace_strings(body, "octocat/Hello-World", repo.full_name)
        body.update(
            id=repo.id,
            node_id=_node_id("Repository", repo.id),
            name=repo.name,
            full_name=repo.full_name,
            owner=self.user(repo.owner),
            private=repo.private,
            visibility="private" if repo.private else "public",
            default_branch=repo.default_branch,
            description=None,
            fork=False,
        )
        if minimal:
            keep = _MINIMAL_REPOSITORY_KEYS
            body = {k: v for k, v in body.items() if k in keep}
        return body

    def installation_json(self, installation: Installation) -> dict[str, Any]:
        body = example("GET /app/installations/{installation_id}")
        account = self.user(installation.account, installation.account_type)
        settings = (
            f"{WEB_ROOT}/organizations/{installation.account}/settings/installations"
            if installation.account_type == "Organization"
            else f"{WEB_ROOT}/settings/installations"
        )
        body.update(
            id=installation.id,
            account=account,
            access_tokens_url=f"{API_ROOT}/app/installations/{installation.id}/access_tokens",
            repositories_url=f"{API_ROOT}/installation/repositories",
            html_url=f"{settings}/{installation.id}",
            app_id=self.app_id,
            app_slug=self.app_slug,
            target_id=account["id"],
            target_type=installation.account_type,
            permissions=dict(installation.permissions),
            events=list(installation.events),
            single_file_name=None,
            has_multiple_single_files=False,
            single_file_paths=[],
            repository_selection=installation.repository_selection,
            created_at=iso(installation.created_at),
            updated_at=iso(installation.suspended_at or installation.created_at),
            suspended_at=iso(installation.suspended_at) if installation.suspended_at else None,
            suspended_by=self.user("octocat") if installation.suspended else None,
        )
        return body

    def app_json(self) -> dict[str, Any]:
        body = example("GET /app")
        body.update(
            id=self.app_id,
            slug=self.app_slug,
            node_id=_node_id("Integration", self.app_id),
            client_id=f"Iv23li{self.app_id:014d}",
            owner=self.user("acme", "Organization"),
            name="Update Pipeline",
            description="Canaries runner builds and rolls them out.",
            external_url="https://update-pipeline.example",
            html_url=f"{WEB_ROOT}/apps/{self.app_slug}",
            permissions={
                "actions": "write",
                "checks": "write",
                "contents": "write",
                "issues": "write",
                "metadata": "read",
                "pull_requests": "write",
            },
            events=["check_run", "issue_comment", "issues", "pull_request", "workflow_run"],
        )
        return body


def _parse_json(raw: bytes) -> tuple[Any, str | None]:
    if not raw.strip():
        return None, None
    try:
        return json.loads(raw), None
    except ValueError as exc:
        return None, str(exc)


def _is_number(value: Any, *, integer: bool = False) -> bool:
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool)


def _same_etag(a: str, b: str) -> bool:
    a, b = a.strip(), b.strip()
    return a == "*" or (bool(a) and a.removeprefix("W/") == b.removeprefix("W/"))


def _replace_strings(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_replace_strings(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace_strings(v, old, new) for k, v in value.items()}
    return value


def _close(issue: dict[str, Any], now: datetime, by: dict[str, Any], reason: str) -> None:
    issue.update(state="closed", closed_at=iso(now), closed_by=by, state_reason=reason)


def _pull_file(repo: Repo, spec: str | dict[str, Any]) -> dict[str, Any]:
    file = example("GET /repos/{owner}/{repo}/pulls/{pull_number}/files")[0]
    file = _replace_strings(file, "octocat/Hello-World", repo.full_name)
    name = spec if isinstance(spec, str) else spec["filename"]
    file.update(
        filename=name,
        status="modified",
        additions=1,
        deletions=1,
        changes=2,
        sha=fake_sha(repo.full_name, name),
        blob_url=f"{WEB_ROOT}/{repo.full_name}/blob/{repo.default_branch}/{name}",
        raw_url=f"{WEB_ROOT}/{repo.full_name}/raw/{repo.default_branch}/{name}",
        contents_url=f"{API_ROOT}/repos/{repo.full_name}/contents/{name}",
        patch="@@ -1 +1 @@\n-old\n+new",
    )
    if isinstance(spec, dict):
        file.update(spec)
    return file


_SIMPLE_USER = _example_raw(
    "GET /repos/{owner}/{repo}/collaborators/{username}/permission", None, None
)["user"]
_REPOSITORY = _example_raw("GET /installation/repositories", None, None)["repositories"][0]
_MINIMAL_REPOSITORY_KEYS = frozenset(
    _example_raw("GET /repos/{owner}/{repo}/actions/runs", None, None)["workflow_runs"][0][
        "repository"
    ]
)


# -- Checking the fake's own answers -------------------------------------------------------

# Where the subset's response schema contradicts what GitHub sends, by operation: the JSON
# path element below which mismatches are expected, and why.
RESPONSE_SCHEMA_QUIRKS: dict[str, tuple[str, str]] = {
    key: ("account", "the subset merges anyOf[simple-user, enterprise] into allOf")
    for key in (
        "GET /app/installations",
        "GET /app/installations/{installation_id}",
        "GET /repos/{owner}/{repo}/installation",
        "GET /user/installations",
    )
}


@cache
def _response_validator(key: str, status: str) -> jsonschema.Draft4Validator | None:
    response = OPERATIONS[key]["responses"].get(status) or {}
    schema = ((response.get("content") or {}).get("application/json") or {}).get("schema")
    if schema is None:
        return None
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("date-time")(
        lambda v: not isinstance(v, str) or bool(check_request._DATE_TIME.match(v))
    )
    return jsonschema.Draft4Validator(check_request.to_json_schema(schema), format_checker=checker)


def response_problems(key: str, status: int, body: Any) -> list[str]:
    """Why ``body`` is not what the subset documents for ``key`` answering ``status``."""
    validator = _response_validator(key, str(status))
    if validator is None:
        return []
    quirk = RESPONSE_SCHEMA_QUIRKS.get(key, ("", ""))[0]
    problems = []
    for error in validator.iter_errors(body):
        path = [str(p) for p in error.absolute_path]
        if quirk and quirk in path:
            continue
        problems.append(f"{'/'.join(path) or '(body)'}: {error.message[:200]}")
    return problems


# -- Handlers: the App ---------------------------------------------------------------------


@operation("GET /app")
def _get_app(ctx: Ctx) -> Any:
    return ctx.fake.app_json()


@operation("GET /user")
def _authenticated_user(ctx: Ctx) -> Any:
    """The user a user-to-server token belongs to (as a public user)."""
    assert ctx.caller.login is not None
    body = ctx.fake.user(ctx.caller.login)
    since = "2020-01-01T00:00:00Z"
    body.update(
        name=None,
        company=None,
        blog="",
        location=None,
        email=None,
        hireable=None,
        bio=None,
        public_repos=0,
        public_gists=0,
        followers=0,
        following=0,
        created_at=since,
        updated_at=since,
    )
    return body


# Registered by each fake (FakeGitHub.__init__) rather than with @operation: SMOKE in
# tests/test_fake_github.py lists every @operation handler, and a conversion needs a code
# from ``manifest_code`` first. tests/test_manifest.py checks its answers.
def _convert_manifest(ctx: Ctx) -> Any:
    """A code from ``manifest_code`` becomes the App, once (then, as on GitHub, 404)."""
    manifest = found(ctx.fake.manifest_codes.pop(ctx.params["code"], None))
    return ctx.fake.app_from_manifest(manifest)


@operation("GET /app/installations")
def _list_installations(ctx: Ctx) -> Any:
    fake = ctx.fake
    items = [fake.installation_json(i) for i in sorted(fake.installations.values(), key=_id)]
    return ctx.page(items)


def _id(installation: Installation) -> int:
    return installation.id


def _installation(ctx: Ctx) -> Installation:
    return found(ctx.fake.installations.get(ctx.int("installation_id")))


@operation("GET /app/installations/{installation_id}")
def _get_installation(ctx: Ctx) -> Any:
    return ctx.fake.installation_json(_installation(ctx))


@operation("POST /app/installations/{installation_id}/access_tokens")
def _create_access_token(ctx: Ctx) -> Any:
    fake = ctx.fake
    installation = _installation(ctx)
    if installation.suspended:
        raise GitHubError(403, "This installation has been suspended")
    names = ctx.arg("repositories")
    ids = ctx.arg("repository_ids")
    repos: list[str] | None = None
    if names is not None or ids is not None:
        repos = []
        for repo_name in names or ():
            full = f"{installation.account}/{repo_name}"
            if not installation.covers(full):
                raise GitHubError(
                    422,
                    "There is at least one repository that does not exist"
                    " or is not accessible to the parent installation.",
                )
            repos.append(full)
        by_id = {fake.repo(r).id: fake.repo(r).full_name for r in installation.repos}
        for repo_id in ids or ():
            if repo_id not in by_id:
                raise GitHubError(
                    422,
                    "There is at least one repository that does not exist"
                    " or is not accessible to the parent installation.",
                )
            repos.append(by_id[repo_id])
    value = fake.issue_token(installation.id, repos)
    token = fake.tokens[value]
    permissions = dict(installation.permissions)
    permissions.update(ctx.arg("permissions") or {})
    body: dict[str, Any] = {
        "token": value,
        "expires_at": iso(token.expires_at),
        "permissions": permissions,
        "repository_selection": "selected" if repos is not None else "all",
    }
    if repos is not None:
        body["repositories"] = [fake.repo_json(fake.repo(r)) for r in repos]
    return body


@operation("GET /repos/{owner}/{repo}/installation")
def _get_repo_installation(ctx: Ctx) -> Any:
    installation = ctx.fake.installation_of(f"{ctx.params['owner']}/{ctx.params['repo']}")
    if installation is None:
        raise not_found()
    return ctx.fake.installation_json(installation)


@operation("GET /installation/repositories")
def _list_installation_repositories(ctx: Ctx) -> Any:
    fake, caller = ctx.fake, ctx.caller
    assert caller.installation is not None and caller.token is not None
    names = [
        r
        for r in caller.installation.repos
        if caller.token.repos is None or r.lower() in caller.token.repos
    ]
    reply = ctx.page([fake.repo_json(fake.repo(n)) for n in names], wrap="repositories")
    reply.body["repository_selection"] = caller.installation.repository_selection
    return reply


@operation("GET /app/hook/config")
def _hook_config(ctx: Ctx) -> Any:
    return dict(ctx.fake.hook_config)


@operation("GET /app/hook/deliveries")
def _list_deliveries(ctx: Ctx) -> Any:
    """Newest first, cursor-paginated (``Link: <...&cursor=...>; rel="next"``) as GitHub."""
    wanted = ctx.query.get("status")
    items = sorted(ctx.fake.deliveries.values(), key=lambda d: d["id"], reverse=True)
    if wanted:
        items = [d for d in items if (d["status_code"] < 300) == (wanted == "success")]
    per_page = min(max(int(ctx.query.get("per_page", 30)), 1), 100)
    cursor = ctx.query.get("cursor", "")
    start = 0
    if cursor:
        try:
            after = int(cursor.removeprefix("v1_"))
        except ValueError:
            raise GitHubError(400, "Invalid cursor") from None
        start = next((i for i, d in enumerate(items) if d["id"] < after), len(items))
    chunk = items[start : start + per_page]
    summary_keys = _DELIVERY_SUMMARY_KEYS
    body = [{k: v for k, v in d.items() if k in summary_keys} for d in chunk]
    headers = {}
    if start + per_page < len(items):
        url = ctx.request.rel_url.update_query(cursor=f"v1_{chunk[-1]['id']}")
        headers["Link"] = f'<{ctx.fake.url}{url}>; rel="next"'
    return Reply(200, body, headers)


_DELIVERY_SUMMARY_KEYS = frozenset(_example_raw("GET /app/hook/deliveries", None, None)[0])


def _delivery(ctx: Ctx) -> dict[str, Any]:
    return found(ctx.fake.deliveries.get(ctx.int("delivery_id")))


@operation("GET /app/hook/deliveries/{delivery_id}")
def _get_delivery(ctx: Ctx) -> Any:
    return _delivery(ctx)


@operation("POST /app/hook/deliveries/{delivery_id}/attempts")
def _redeliver(ctx: Ctx) -> Any:
    fake = ctx.fake
    original = _delivery(ctx)
    fake.redeliveries.append(original["id"])
    fake.add_delivery(
        original["event"],
        original["action"],
        status_code=fake.redelivery_status_code,
        guid=original["guid"],
        installation_id=original["installation_id"],
        repository_id=original["repository_id"],
        redelivery=True,
    )
    return Reply(202, {})


@operation("GET /rate_limit")
def _rate_limit(ctx: Ctx) -> Any:
    body = example("GET /rate_limit")
    headers = ctx.fake._rate_header_values(ctx.fake._rate_limit(ctx.caller, counted=False)[0])
    core = {
        "limit": int(headers["X-RateLimit-Limit"]),
        "used": int(headers["X-RateLimit-Used"]),
        "remaining": int(headers["X-RateLimit-Remaining"]),
        "reset": int(headers["X-RateLimit-Reset"]),
    }
    body["resources"]["core"] = dict(core)
    body["rate"] = dict(core)
    return body


# -- Handlers: repositories, users, contents ----------------------------------------------


@operation("GET /repos/{owner}/{repo}")
def _get_repo(ctx: Ctx) -> Any:
    body = ctx.fake.repo_json(ctx.repo)
    body.pop("permissions", None)
    body.update(
        language=None,
        has_discussions=False,
        network_count=0,
        subscribers_count=0,
        open_issues_count=sum(1 for i in ctx.repo.issues.values() if i["state"] == "open"),
    )
    body["open_issues"] = body["open_issues_count"]
    return body


@operation("GET /repos/{owner}/{repo}/topics")
def _topics(ctx: Ctx) -> Any:
    return {"names": list(ctx.repo.topics)}


@operation("GET /repos/{owner}/{repo}/properties/values")
def _properties(ctx: Ctx) -> Any:
    return [{"property_name": k, "value": v} for k, v in ctx.repo.properties.items()]


def _collaborator(ctx: Ctx, login: str, role: str) -> dict[str, Any]:
    user = ctx.fake.user(login)
    base = ctx.repo.base_role(role)
    user["permissions"] = {flag: flag in _ROLE_FLAGS[base] for flag in _ROLE_FLAGS["admin"]}
    user["role_name"] = role
    return user


def _role(ctx: Ctx) -> tuple[str, str]:
    login = ctx.params["username"]
    role = ctx.repo.roles.get(login.lower())
    if role is None:
        raise not_found()
    return ctx.fake._users[login.lower()][0], role


@operation("GET /repos/{owner}/{repo}/collaborators/{username}/permission")
def _collaborator_permission(ctx: Ctx) -> Any:
    login, role = _role(ctx)
    return {
        # A custom role's legacy permission is its base's, as GitHub reports it.
        "permission": PERMISSION_OF_ROLE[ctx.repo.base_role(role)],
        "role_name": role,
        "user": _collaborator(ctx, login, role),
    }


@operation("GET /repos/{owner}/{repo}/collaborators/{username}")
def _is_collaborator(ctx: Ctx) -> Any:
    _, role = _role(ctx)
    if role == "none":
        raise not_found()
    return Reply(204)


@operation("GET /repos/{owner}/{repo}/collaborators")
def _list_collaborators(ctx: Ctx) -> Any:
    wanted = ctx.query.get("permission")
    items = [
        _collaborator(ctx, ctx.fake._users[login][0], role)
        for login, role in sorted(ctx.repo.roles.items())
        if role != "none" and (wanted is None or wanted in _ROLE_FLAGS[ctx.repo.base_role(role)])
    ]
    return ctx.page(items)


@operation("GET /orgs/{org}/teams/{team_slug}/memberships/{username}")
def _team_membership(ctx: Ctx) -> Any:
    org, team, login = ctx.params["org"], ctx.params["team_slug"], ctx.params["username"]
    membership = ctx.fake.teams.get((org.lower(), team.lower(), login.lower()))
    if membership is None:
        raise not_found()
    team_id = int(fake_sha(org.lower(), team.lower())[:6], 16)
    return {"url": f"{API_ROOT}/teams/{team_id}/memberships/{login}", **membership}


def _content_entry(repo: Repo, ref: str, path: str, data: bytes | None) -> dict[str, Any]:
    """One item of a contents answer: a file (``data``) or a directory (None)."""
    sha = git_blob_sha(data) if data is not None else fake_sha(repo.full_name, ref, path)
    kind = "file" if data is not None else "dir"
    api = f"{API_ROOT}/repos/{repo.full_name}"
    git_url = f"{api}/git/{'blobs' if data is not None else 'trees'}/{sha}"
    html_url = f"{WEB_ROOT}/{repo.full_name}/{'blob' if data is not None else 'tree'}/{ref}/{path}"
    entry = {
        "type": kind,
        "size": len(data) if data is not None else 0,
        "name": path.rsplit("/", 1)[-1],
        "path": path,
        "sha": sha,
        "url": f"{api}/contents/{quote(path)}?ref={quote(ref)}",
        "git_url": git_url,
        "html_url": html_url,
        "download_url": (
            f"https://raw.githubusercontent.com/{repo.full_name}/{ref}/{path}"
            if data is not None
            else None
        ),
        "_links": {
            "self": f"{api}/contents/{quote(path)}?ref={quote(ref)}",
            "git": git_url,
            "html": html_url,
        },
    }
    return entry


def _base64_lines(data: bytes) -> str:
    """Base64 in 60-character lines, as the contents API sends it."""
    text = base64.b64encode(data).decode()
    return "".join(text[i : i + 60] + "\n" for i in range(0, len(text), 60))


@operation("GET /repos/{owner}/{repo}/contents/{path}")
def _get_contents(ctx: Ctx) -> Any:
    repo = ctx.repo
    ref = ctx.query.get("ref") or repo.default_branch
    path = ctx.params["path"].strip("/")
    data = repo.files.get((ref, path))
    if data is not None:
        entry = _content_entry(repo, ref, path, data)
        entry.update(encoding="base64", content=_base64_lines(data))
        return entry
    children: dict[str, bytes | None] = {}
    for (file_ref, file_path), file_data in repo.files.items():
        if file_ref == ref and file_path.startswith(path + "/"):
            rest = file_path[len(path) + 1 :]
            child = rest.split("/", 1)[0]
            children[f"{path}/{child}"] = file_data if "/" not in rest else None
    if not children:
        raise not_found()
    return [_content_entry(repo, ref, p, d) for p, d in sorted(children.items())]


@operation("PUT /repos/{owner}/{repo}/contents/{path}")
def _put_contents(ctx: Ctx) -> Any:
    repo = ctx.repo
    ref = ctx.arg("branch") or repo.default_branch
    path = ctx.params["path"].strip("/")
    try:
        data = base64.b64decode(ctx.arg("content"), validate=True)
    except ValueError:
        raise GitHubError(422, "content is not valid Base64") from None
    existing = repo.files.get((ref, path))
    if existing is not None:
        if ctx.arg("sha") is None:
            raise GitHubError(422, 'Invalid request.\n\n"sha" wasn\'t supplied.')
        if ctx.arg("sha") != git_blob_sha(existing):
            raise GitHubError(409, f"{path} does not match {ctx.arg('sha')}")
    repo.files[(ref, path)] = data
    body = example("PUT /repos/{owner}/{repo}/contents/{path}", 201)
    body = _replace_strings(body, "octocat/Hello-World", repo.full_name)
    commit_sha = fake_sha(repo.full_name, ref, path, ctx.fake.new_id())
    repo.refs[f"heads/{ref}"] = commit_sha
    for pull in repo.pulls.values():  # a push to a pull request's branch moves its head
        if pull["state"] == "open" and pull["head"]["ref"] == ref:
            pull["head"]["sha"] = commit_sha
    entry = _content_entry(repo, ref, path, data)
    body["content"] = {k: v for k, v in entry.items() if k in body["content"]}
    body["commit"].update(
        sha=commit_sha,
        node_id=_node_id("Commit", int(commit_sha[:8], 16)),
        url=f"{API_ROOT}/repos/{repo.full_name}/git/commits/{commit_sha}",
        html_url=f"{WEB_ROOT}/{repo.full_name}/git/commit/{commit_sha}",
        message=ctx.arg("message"),
    )
    return Reply(200 if existing is not None else 201, body)


# -- Handlers: git refs --------------------------------------------------------------------


def _ref_json(repo: Repo, ref: str) -> dict[str, Any]:
    sha = repo.refs[ref]
    return {
        "ref": f"refs/{ref}",
        "node_id": base64.b64encode(f"Ref:{repo.full_name}:{ref}".encode()).decode(),
        "url": f"{API_ROOT}/repos/{repo.full_name}/git/refs/{ref}",
        "object": {
            "type": "commit",
            "sha": sha,
            "url": f"{API_ROOT}/repos/{repo.full_name}/git/commits/{sha}",
        },
    }


@operation("GET /repos/{owner}/{repo}/git/ref/{ref}")
def _get_ref(ctx: Ctx) -> Any:
    ref = ctx.params["ref"].removeprefix("refs/")
    if ref not in ctx.repo.refs:
        raise not_found()
    return _ref_json(ctx.repo, ref)


@operation("POST /repos/{owner}/{repo}/git/refs")
def _create_ref(ctx: Ctx) -> Any:
    ref = str(ctx.arg("ref"))
    if not ref.startswith("refs/") or ref.count("/") < 2:
        raise GitHubError(422, "Reference name must start with 'refs/' and have two slashes.")
    ref = ref.removeprefix("refs/")
    if ref in ctx.repo.refs:
        raise GitHubError(422, "Reference already exists")
    ctx.repo.refs[ref] = ctx.arg("sha")
    if ref.startswith("heads/"):
        _branch_files_from(ctx.repo, ref.removeprefix("heads/"), str(ctx.arg("sha")))
    return _ref_json(ctx.repo, ref)


def _branch_files_from(repo: Repo, branch: str, sha: str) -> None:
    """A new branch holds the files of the commit it starts from, as in git. Files are
    kept per branch, so they come from a branch whose head is that commit (the default
    branch first); a commit no branch points at gives an empty branch."""
    heads = sorted(
        (
            name.removeprefix("heads/")
            for name, at in repo.refs.items()
            if at == sha and name.startswith("heads/") and name != f"heads/{branch}"
        ),
        key=lambda name: name != repo.default_branch,
    )
    source = next(iter(heads), None)
    if source is None:
        return
    for (ref, path), data in list(repo.files.items()):
        if ref == source:
            repo.files[(branch, path)] = data


@operation("PATCH /repos/{owner}/{repo}/git/refs/{ref}")
def _update_ref(ctx: Ctx) -> Any:
    ref = ctx.params["ref"].removeprefix("refs/")
    if ref not in ctx.repo.refs:
        raise GitHubError(422, "Reference does not exist")
    ctx.repo.refs[ref] = ctx.arg("sha")
    return _ref_json(ctx.repo, ref)


# -- Handlers: issues, comments, labels, reactions ----------------------------------------


def _issue(ctx: Ctx) -> dict[str, Any]:
    return ctx.repo.issue(ctx.int("issue_number"))


def _label_names(items: Iterable[Any]) -> list[str]:
    return [item["name"] if isinstance(item, dict) else str(item) for item in items]


def _set_issue_labels(ctx: Ctx, issue: dict[str, Any], names: Iterable[str]) -> None:
    labels: dict[str, dict[str, Any]] = {}
    for name in names:
        label = ctx.fake.add_label(ctx.repo.full_name, name)  # GitHub creates unknown labels
        labels[label["name"].lower()] = label
    issue["labels"] = list(labels.values())
    issue["updated_at"] = iso(ctx.fake.now())


@operation("POST /repos/{owner}/{repo}/issues")
def _create_issue(ctx: Ctx) -> Any:
    issue = ctx.fake._new_issue(
        ctx.repo, str(ctx.arg("title")), ctx.arg("body"), ctx.fake.author(ctx)
    )
    _set_issue_labels(ctx, issue, _label_names(ctx.arg("labels") or ()))
    _assign(
        ctx, issue, ctx.arg("assignees") or ([ctx.arg("assignee")] if ctx.arg("assignee") else [])
    )
    return issue


def _assign(ctx: Ctx, issue: dict[str, Any], logins: list[str]) -> None:
    users = [ctx.fake.user(login) for login in logins]
    issue["assignees"] = users
    issue["assignee"] = users[0] if users else None


@operation("GET /repos/{owner}/{repo}/issues/{issue_number}")
def _get_issue(ctx: Ctx) -> Any:
    return _issue(ctx)


@operation("PATCH /repos/{owner}/{repo}/issues/{issue_number}")
def _update_issue(ctx: Ctx) -> Any:
    issue = _issue(ctx)
    now = ctx.fake.now()
    if ctx.arg("title") is not None:
        issue["title"] = str(ctx.arg("title"))
    if isinstance(ctx.body, dict) and "body" in ctx.body:
        issue["body"] = ctx.body["body"]
    if ctx.arg("labels") is not None:
        _set_issue_labels(ctx, issue, _label_names(ctx.arg("labels")))
    if ctx.arg("assignees") is not None:
        _assign(ctx, issue, ctx.arg("assignees"))
    state = ctx.arg("state")
    if state == "closed" and issue["state"] == "open":
        _close(issue, now, ctx.fake.author(ctx), ctx.arg("state_reason") or "completed")
    elif state == "open" and issue["state"] == "closed":
        issue.update(state="open", closed_at=None, closed_by=None, state_reason="reopened")
    issue["updated_at"] = iso(now)
    if issue["number"] in ctx.repo.pulls and state:
        ctx.repo.pulls[issue["number"]].update(state=issue["state"], closed_at=issue["closed_at"])
    return issue


@operation("GET /repos/{owner}/{repo}/issues")
def _list_issues(ctx: Ctx) -> Any:
    q = ctx.query
    state = q.get("state", "open")
    items = [i for i in ctx.repo.issues.values() if state == "all" or i["state"] == state]
    if q.get("labels"):
        wanted = {n.strip().lower() for n in q["labels"].split(",")}
        items = [i for i in items if wanted <= {lab["name"].lower() for lab in i["labels"]}]
    if q.get("creator"):
        items = [i for i in items if i["user"]["login"].lower() == q["creator"].lower()]
    if q.get("assignee") not in (None, "*"):
        if q["assignee"] == "none":
            items = [i for i in items if not i["assignees"]]
        else:
            items = [
                i
                for i in items
                if any(a["login"].lower() == q["assignee"].lower() for a in i["assignees"])
            ]
    if q.get("since"):
        items = [i for i in items if i["updated_at"] >= q["since"]]
    sort = {"created": "created_at", "updated": "updated_at", "comments": "comments"}[
        q.get("sort", "created")
    ]
    items.sort(key=lambda i: (i[sort], i["number"]), reverse=q.get("direction", "desc") == "desc")
    return ctx.page(items)


@operation("POST /repos/{owner}/{repo}/issues/{issue_number}/comments")
def _create_comment(ctx: Ctx) -> Any:
    issue = _issue(ctx)
    if issue["locked"]:
        raise GitHubError(403, "Unable to create comment because issue is locked.")
    return ctx.fake._new_comment(ctx.repo, issue, str(ctx.arg("body")), ctx.fake.author(ctx))


@operation("GET /repos/{owner}/{repo}/issues/{issue_number}/comments")
def _list_comments(ctx: Ctx) -> Any:
    issue = _issue(ctx)
    since = ctx.query.get("since")
    items = [
        c
        for c in ctx.repo.comments.values()
        if c["issue_url"] == issue["url"] and (since is None or c["updated_at"] >= since)
    ]
    return ctx.page(sorted(items, key=lambda c: c["id"]))


@operation("PATCH /repos/{owner}/{repo}/issues/comments/{comment_id}")
def _update_comment(ctx: Ctx) -> Any:
    comment = ctx.repo.comments.get(ctx.int("comment_id"))
    if comment is None:
        raise not_found()
    comment.update(body=str(ctx.arg("body")), updated_at=iso(ctx.fake.now()))
    return comment


def _react(ctx: Ctx, target: tuple[str, int]) -> Any:
    user = ctx.fake.author(ctx)
    reactions = ctx.repo.reactions.setdefault(target, [])
    for reaction in reactions:
        if reaction["user"]["login"] == user["login"] and reaction["content"] == ctx.arg("content"):
            return Reply(200, reaction)
    reaction_id = ctx.fake.new_id()
    reaction = {
        "id": reaction_id,
        "node_id": _node_id("Reaction", reaction_id),
        "user": user,
        "content": ctx.arg("content"),
        "created_at": iso(ctx.fake.now()),
    }
    reactions.append(reaction)
    return Reply(201, reaction)


@operation("POST /repos/{owner}/{repo}/issues/{issue_number}/reactions")
def _react_to_issue(ctx: Ctx) -> Any:
    _issue(ctx)
    return _react(ctx, ("issue", ctx.int("issue_number")))


@operation("POST /repos/{owner}/{repo}/issues/comments/{comment_id}/reactions")
def _react_to_comment(ctx: Ctx) -> Any:
    if ctx.int("comment_id") not in ctx.repo.comments:
        raise not_found()
    return _react(ctx, ("comment", ctx.int("comment_id")))


@operation("POST /repos/{owner}/{repo}/issues/{issue_number}/labels")
def _add_labels(ctx: Ctx) -> Any:
    issue = _issue(ctx)
    current = _label_names(issue["labels"])
    _set_issue_labels(ctx, issue, current + _label_names(ctx.arg("labels") or ()))
    return issue["labels"]


@operation("PUT /repos/{owner}/{repo}/issues/{issue_number}/labels")
def _set_labels(ctx: Ctx) -> Any:
    issue = _issue(ctx)
    _set_issue_labels(ctx, issue, _label_names(ctx.arg("labels") or ()))
    return issue["labels"]


@operation("DELETE /repos/{owner}/{repo}/issues/{issue_number}/labels/{name}")
def _remove_label(ctx: Ctx) -> Any:
    issue = _issue(ctx)
    name = ctx.params["name"].lower()
    if not any(label["name"].lower() == name for label in issue["labels"]):
        raise GitHubError(404, "Label does not exist")
    issue["labels"] = [label for label in issue["labels"] if label["name"].lower() != name]
    issue["updated_at"] = iso(ctx.fake.now())
    return issue["labels"]


@operation("POST /repos/{owner}/{repo}/labels")
def _create_label(ctx: Ctx) -> Any:
    name = str(ctx.arg("name"))
    if name.lower() in ctx.repo.labels:
        raise validation_failed("Label", "already_exists", "name")
    return ctx.fake.add_label(
        ctx.repo.full_name,
        name,
        color=str(ctx.arg("color") or "ededed").lstrip("#"),
        description=ctx.arg("description"),
    )


@operation("GET /repos/{owner}/{repo}/labels/{name}")
def _get_label(ctx: Ctx) -> Any:
    return found(ctx.repo.labels.get(ctx.params["name"].lower()))


# -- Handlers: check runs ------------------------------------------------------------------


def _apply_check_run(ctx: Ctx, run: dict[str, Any]) -> None:
    body = ctx.body or {}
    for name in ("name", "details_url", "external_id", "started_at", "completed_at", "actions"):
        if name in body:
            run[name] = body[name]
    if "status" in body:
        run["status"] = body["status"]
    if body.get("conclusion") is not None:
        run["conclusion"] = body["conclusion"]
        run["status"] = "completed"
    if run["status"] == "completed":
        if run["conclusion"] is None:
            raise GitHubError(
                422, "Invalid request.\n\nconclusion is required when status is completed."
            )
        run["completed_at"] = run["completed_at"] or iso(ctx.fake.now())
    if "output" in body:
        output = body["output"]
        run["output"].update(
            title=output.get("title", run["output"]["title"]),
            summary=output.get("summary", run["output"]["summary"]),
            text=output.get("text", run["output"]["text"]),
        )
        run["output"]["annotations_count"] += len(output.get("annotations") or ())


@operation("POST /repos/{owner}/{repo}/check-runs")
def _create_check_run(ctx: Ctx) -> Any:
    fake, repo = ctx.fake, ctx.repo
    run = example("POST /repos/{owner}/{repo}/check-runs", 201, "example-of-in-progress-conclusion")
    run_id = fake.new_id()
    url = f"{API_ROOT}/repos/{repo.full_name}/check-runs/{run_id}"
    head_sha = str(ctx.arg("head_sha"))
    suite_id = int(fake_sha(repo.full_name, head_sha)[:8], 16)
    run.update(
        id=run_id,
        head_sha=head_sha,
        node_id=_node_id("CheckRun", run_id),
        external_id="",
        url=url,
        html_url=f"{WEB_ROOT}/{repo.full_name}/runs/{run_id}",
        details_url=None,
        status="queued",
        conclusion=None,
        started_at=iso(fake.now()),
        completed_at=None,
        output={
            "title": None,
            "summary": None,
            "text": None,
            "annotations_count": 0,
            "annotations_url": f"{url}/annotations",
        },
        check_suite={"id": suite_id},
        app=fake.app_json(),
        pull_requests=[],
    )
    _apply_check_run(ctx, run)
    repo.check_runs[run_id] = run
    return run


def _check_run(ctx: Ctx) -> dict[str, Any]:
    return found(ctx.repo.check_runs.get(ctx.int("check_run_id")))


@operation("PATCH /repos/{owner}/{repo}/check-runs/{check_run_id}")
def _update_check_run(ctx: Ctx) -> Any:
    run = _check_run(ctx)
    updated = copy.deepcopy(run)
    _apply_check_run(ctx, updated)  # a 422 leaves the stored run as it was
    run.clear()
    run.update(updated)
    return run


@operation("GET /repos/{owner}/{repo}/check-runs/{check_run_id}")
def _get_check_run(ctx: Ctx) -> Any:
    return _check_run(ctx)


@operation("GET /repos/{owner}/{repo}/commits/{ref}/check-runs")
def _list_check_runs(ctx: Ctx) -> Any:
    sha = ctx.repo.resolve(ctx.params["ref"])
    q = ctx.query
    runs = sorted(
        (r for r in ctx.repo.check_runs.values() if r["head_sha"] == sha),
        key=lambda r: r["id"],
        reverse=True,
    )
    if q.get("filter", "latest") == "latest":
        seen: set[str] = set()
        runs = [r for r in runs if not (r["name"] in seen or seen.add(r["name"]))]
    if q.get("check_name"):
        runs = [r for r in runs if r["name"] == q["check_name"]]
    if q.get("status"):
        runs = [r for r in runs if r["status"] == q["status"]]
    if q.get("app_id"):
        runs = [r for r in runs if str(r["app"]["id"]) == q["app_id"]]
    return ctx.page(runs, wrap="check_runs")


# -- Handlers: Actions ---------------------------------------------------------------------


def _workflow(ctx: Ctx, *, create: bool = False) -> dict[str, Any]:
    """A workflow by id or file name; dispatching to an unknown file name registers it."""
    ident = ctx.params["workflow_id"]
    repo = ctx.repo
    if ident.isdigit() and int(ident) in repo.workflows:
        return repo.workflows[int(ident)]
    for workflow in repo.workflows.values():
        if workflow["path"].rsplit("/", 1)[-1] == ident:
            return workflow
    if create and not ident.isdigit():
        return repo.workflows[ctx.fake.add_workflow(repo.full_name, ident)]
    raise not_found()


@operation("GET /repos/{owner}/{repo}/actions/workflows/{workflow_id}")
def _get_workflow(ctx: Ctx) -> Any:
    return _workflow(ctx)


@operation("POST /repos/{owner}/{repo}/actions/workflows/{workflow_id}/dispatches")
def _dispatch_workflow(ctx: Ctx) -> Any:
    """Recorded in ``repo.dispatches``; queues a run, as GitHub soon does."""
    repo = ctx.repo
    workflow = _workflow(ctx, create=True)
    ref = str(ctx.arg("ref"))
    branch = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    run = ctx.fake._new_run(
        repo, workflow, branch, repo.resolve(ref), "workflow_dispatch", ctx.fake.author(ctx)
    )
    inputs = ctx.arg("inputs") or {}
    template = repo.run_names.get(int(workflow["id"]))
    if template is not None:
        run["display_title"] = re.sub(
            r"\$\{\{\s*inputs\.([A-Za-z0-9_-]+)\s*\}\}",
            lambda m: str(inputs.get(m.group(1), "")),
            template,
        )
    repo.dispatches.append(
        {
            "workflow_id": workflow["id"],
            "workflow": workflow["path"],
            "ref": ref,
            "inputs": ctx.arg("inputs") or {},
            "run_id": run["id"],
        }
    )
    if ctx.arg("return_run_details"):
        return Reply(
            200,
            {"workflow_run_id": run["id"], "run_url": run["url"], "html_url": run["html_url"]},
        )
    return Reply(204)


def _filter_runs(ctx: Ctx, runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    q = ctx.query
    selected = sorted(runs, key=lambda r: r["id"], reverse=True)
    filters = {
        "branch": lambda r, v: r["head_branch"] == v,
        "event": lambda r, v: r["event"] == v,
        "status": lambda r, v: v in (r["status"], r["conclusion"]),
        "head_sha": lambda r, v: r["head_sha"] == v,
        "actor": lambda r, v: r["actor"]["login"].lower() == v.lower(),
        "check_suite_id": lambda r, v: str(r["check_suite_id"]) == v,
        # Only the ">=" form of GitHub's date-range syntax.
        "created": lambda r, v: v.startswith(">=") and r["created_at"] >= v[2:],
    }
    for name, keep in filters.items():
        if q.get(name):
            selected = [r for r in selected if keep(r, q[name])]
    return selected


@operation("GET /repos/{owner}/{repo}/actions/runs")
def _list_runs(ctx: Ctx) -> Any:
    return ctx.page(_filter_runs(ctx, ctx.repo.runs.values()), wrap="workflow_runs")


@operation("GET /repos/{owner}/{repo}/actions/workflows/{workflow_id}/runs")
def _list_workflow_runs(ctx: Ctx) -> Any:
    workflow = _workflow(ctx)
    runs = (r for r in ctx.repo.runs.values() if r["workflow_id"] == workflow["id"])
    return ctx.page(_filter_runs(ctx, runs), wrap="workflow_runs")


def _run(ctx: Ctx) -> dict[str, Any]:
    return found(ctx.repo.runs.get(ctx.int("run_id")))


@operation("GET /repos/{owner}/{repo}/actions/runs/{run_id}")
def _get_run(ctx: Ctx) -> Any:
    return _run(ctx)


@operation("POST /repos/{owner}/{repo}/actions/runs/{run_id}/cancel")
def _cancel_run(ctx: Ctx) -> Any:
    run = _run(ctx)
    if run["status"] == "completed":
        raise GitHubError(409, "Cannot cancel a workflow run that is completed.")
    run.update(status="completed", conclusion="cancelled", updated_at=iso(ctx.fake.now()))
    return Reply(202, {})


# -- Handlers: pulls and releases ----------------------------------------------------------


def _pull(ctx: Ctx) -> dict[str, Any]:
    return found(ctx.repo.pulls.get(ctx.int("pull_number")))


@operation("GET /repos/{owner}/{repo}/pulls/{pull_number}")
def _get_pull(ctx: Ctx) -> Any:
    return _pull(ctx)


@operation("GET /repos/{owner}/{repo}/pulls/{pull_number}/files")
def _list_pull_files(ctx: Ctx) -> Any:
    _pull(ctx)
    return ctx.page(ctx.repo.pull_files[ctx.int("pull_number")])


@operation("GET /repos/{owner}/{repo}/pulls")
def _list_pulls(ctx: Ctx) -> Any:
    q = ctx.query
    state = q.get("state", "open")
    pulls = [p for p in ctx.repo.pulls.values() if state == "all" or p["state"] == state]
    if q.get("head"):
        pulls = [p for p in pulls if p["head"]["label"] == q["head"]]
    if q.get("base"):
        pulls = [p for p in pulls if p["base"]["ref"] == q["base"]]
    pulls.sort(key=lambda p: p["number"], reverse=q.get("direction", "desc") == "desc")
    return ctx.page(pulls)


@operation("POST /repos/{owner}/{repo}/pulls")
def _create_pull(ctx: Ctx) -> Any:
    repo = ctx.repo
    head = str(ctx.arg("head")).split(":", 1)[-1]
    base = str(ctx.arg("base"))
    if f"heads/{base}" not in repo.refs:
        raise validation_failed("PullRequest", "invalid", "base")
    if f"heads/{head}" not in repo.refs:
        raise validation_failed("PullRequest", "invalid", "head")
    if any(p["head"]["ref"] == head and p["state"] == "open" for p in repo.pulls.values()):
        raise GitHubError(
            422,
            "Validation Failed",
            errors=[
                {
                    "resource": "PullRequest",
                    "code": "custom",
                    "message": f"A pull request already exists for {repo.owner}:{head}.",
                }
            ],
        )
    return ctx.fake._new_pull(
        repo,
        str(ctx.arg("title") or head),
        head,
        base,
        ctx.arg("body"),
        ctx.fake.author(ctx),
        draft=bool(ctx.arg("draft")),
        head_sha=repo.refs[f"heads/{head}"],
    )


@operation("PATCH /repos/{owner}/{repo}/pulls/{pull_number}")
def _update_pull(ctx: Ctx) -> Any:
    pull = _pull(ctx)
    issue = ctx.repo.issues[pull["number"]]
    for name in ("title", "body"):
        if isinstance(ctx.body, dict) and name in ctx.body:
            pull[name] = issue[name] = ctx.body[name]
    if ctx.arg("state") in ("open", "closed"):
        pull["state"] = ctx.arg("state")
        pull["closed_at"] = iso(ctx.fake.now()) if pull["state"] == "closed" else None
        issue.update(state=pull["state"], closed_at=pull["closed_at"])
    pull["updated_at"] = issue["updated_at"] = iso(ctx.fake.now())
    return pull


@operation("GET /repos/{owner}/{repo}/releases/latest")
def _latest_release(ctx: Ctx) -> Any:
    published = [r for r in ctx.repo.releases.values() if not r["draft"] and not r["prerelease"]]
    if not published:
        raise not_found()
    return max(published, key=lambda r: (r["created_at"], r["id"]))


@operation("GET /repos/{owner}/{repo}/releases")
def _list_releases(ctx: Ctx) -> Any:
    releases = sorted(
        ctx.repo.releases.values(), key=lambda r: (r["created_at"], r["id"]), reverse=True
    )
    return ctx.page(releases)
