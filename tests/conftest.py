"""Shared fixtures: a real SQLite file, a movable clock, and the app on a real test server.

Every JSON response that passes through ``Api`` is checked against the OpenAPI
description the app serves, so the documented contract is tested by every test.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator

from app.api.routing import PREFIX
from app.auth import Role, hash_token, new_secret
from app.clock import ManualClock
from app.config import Settings
from app.github.app import GitHubApp
from app.github.commands import CommandRegistry
from app.github.oidc import OidcVerifier
from app.pipeline import Component
from app.server import create_app, github_components, start_pipeline
from app.services import Services
from app.store import NewToken, SqliteStore

if TYPE_CHECKING:  # imported by pytest_plugins below; importing it here first would
    # keep pytest from rewriting its asserts
    from tests.github_fixtures import RecordedSleep

pytest_plugins = ["tests.github_fixtures"]

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() replaces the root handlers; put pytest's own back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "pipeline.db"


@pytest.fixture
def settings(db_path: Path) -> Settings:
    return Settings(enabled=True, db_path=db_path, max_body_bytes=4096)


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(db_path)
    yield opened
    await opened.close()


ROOT_ROUTES = {"/metrics"}


class Api:
    """A client for the app under test: paths are relative to the API prefix."""

    def __init__(self, client: TestClient, services: Services, openapi: dict[str, Any]):
        self.client = client
        self.services = services
        self.openapi = openapi
        self._issued = 0
        self._operations = [
            (method.upper(), _template_regex(path), op)
            for path, ops in openapi["paths"].items()
            for method, op in ops.items()
        ]

    async def token(
        self, role: str | Role, *, name: str | None = None, org: str | None = None
    ) -> str:
        role = Role(role)
        if role is Role.RUNNER and org is None:
            org = "org-1"
        self._issued += 1
        # Written straight to the store: test set-up, not an issuance worth an event.
        secret = new_secret()
        token = NewToken(
            name or f"{role.value}-{self._issued}",
            role.value,
            hash_token(secret),
            org,
            self.services.clock.now(),
            None,
        )
        await self.services.store.add_tokens([token])
        return secret

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        check_schema: bool = True,
        **kwargs: Any,
    ) -> tuple[aiohttp.ClientResponse, Any]:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        # Paths are below the API prefix, except GitHub's (/api/github/...) and the few
        # routes at the root (/metrics).
        at_root = path.startswith("/api/") or path in ROOT_ROUTES or not path.startswith("/")
        full = path if at_root else PREFIX + path
        response = await self.client.request(method, full, headers=all_headers, **kwargs)
        body: Any = None
        if response.content_type == "application/json":
            body = await response.json()
            if check_schema:
                self.check(method, full, response.status, body)
        return response, body

    async def get(self, path: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, Any]:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, Any]:
        return await self.request("POST", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, Any]:
        return await self.request("DELETE", path, **kwargs)

    def check(self, method: str, path: str, status: int, body: Any) -> None:
        """Fail unless ``body`` is what the OpenAPI description promises for this status."""
        path = path.split("?")[0]
        operation = next(
            (
                op
                for m, regex, op in self._operations
                if m == method.upper() and regex.fullmatch(path)
            ),
            None,
        )
        if operation is None:
            assert status in (404, 405), f"{method} {path} answered {status} but is undocumented"
            schema = self.openapi["components"]["schemas"]["Error"]
            Draft202012Validator(schema).validate(body)
            return
        documented = operation["responses"]
        assert str(status) in documented, (
            f"{method} {path} answered {status}, documented: {sorted(documented)}"
        )
        content = documented[str(status)].get("content", {})
        schema = content.get("application/json", {}).get("schema")
        assert schema is not None, f"{method} {path} {status} has no documented JSON body"
        schema = self._resolve(schema)
        Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(
            body
        )

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if ref:
            return self.openapi["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        return schema


def _template_regex(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path)))


MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Settings,
    clock: ManualClock,
    github_sleep: RecordedSleep,
) -> AsyncIterator[MakeApi]:
    """Build the app on a real test server; the pipeline starts when settings enable it."""
    opened: list[tuple[SqliteStore, Services, TestClient]] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(
        *,
        settings_override: Settings | None = None,
        components: Sequence[Component] = (),
        with_github: bool = False,
        commands: CommandRegistry | None = None,
        build: Callable[[Services], Sequence[Component]] | None = None,
        oidc_issuer: str | None = None,
    ) -> Api:
        active = settings_override or settings
        store = await SqliteStore.open(active.db_path)
        services = Services.build(active, store, clock)
        try:
            services.sse_keepalive_seconds = 0.2
            if with_github:
                # Pacing and back-off sleeps return at once (and are recorded).
                services.github = GitHubApp.from_settings(active, clock, sleep=github_sleep)
                components = [*github_components(services, commands), *components]
            if oidc_issuer is not None:
                session = aiohttp.ClientSession()
                sessions.append(session)
                services.oidc = OidcVerifier(oidc_issuer, session, clock)
            if build is not None:  # components that need the services
                components = [*components, *build(services)]
            await start_pipeline(services, components)
            client = await aiohttp_client(create_app(services))
        except BaseException:
            # A store left open keeps its writer threads alive, and pytest never exits.
            if services.pipeline is not None:
                await services.pipeline.stop()
            if services.github is not None:
                await services.github.close()
            await store.close()
            raise
        opened.append((store, services, client))
        openapi = await (await client.get(f"{PREFIX}/openapi.json")).json()
        return Api(client, services, openapi)

    yield make
    for store, services, client in reversed(opened):
        await client.close()
        if services.pipeline is not None:
            await services.pipeline.stop()
        if services.github is not None:
            await services.github.close()
        await store.close()
    for session in sessions:
        await session.close()


@pytest.fixture
async def api(make_api: MakeApi) -> Api:
    return await make_api()
