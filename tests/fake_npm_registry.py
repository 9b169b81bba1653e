"""A fake npm registry for tests: a real HTTP server on 127.0.0.1 that serves package
documents shaped like the registry's, answers conditional requests, records every request
and fails on demand.

::

    async with FakeNpmRegistry() as registry:
        registry.publish("@acme/agent", "1.0.0", datetime(2026, 1, 5, tzinfo=UTC))
        ...  # point the code under test at registry.url
        (request,) = registry.requests
        assert request.headers["Accept"] == "application/json"

Every change to a package (a publish, a tag, an ``edit``) is a new revision with a new
ETag; ``GET /<name>`` answers 304 to an ``If-None-Match`` naming the current one (or,
without it, to an ``If-Modified-Since`` not older than the last change).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from app.clock import isoformat


@dataclass
class Recorded:
    """One request the fake received; ``status`` is None when the connection was reset."""

    method: str
    path: str  # as sent, still encoded: a scoped name reads "/@scope%2fname"
    headers: CIMultiDict[str]
    status: int | None = None

    @property
    def package(self) -> str:
        return unquote(self.path.lstrip("/"))


@dataclass
class Fault:
    """The next ``times`` requests wait ``delay`` seconds, then are reset, answered with
    ``status``, or (``body`` set) answered 200 with that body and a fresh ETag, as
    ``content_type``; ``size`` answers 200 with that many bytes, streamed in chunks
    without a Content-Length (a document too large to hold)."""

    status: int | None = 500
    times: int = 1
    delay: float = 0.0
    body: bytes | None = None
    reset: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    size: int | None = None
    hits: int = 0


@dataclass
class _Package:
    document: dict[str, Any]
    modified: datetime
    revision: int = 0
    _body: bytes | None = None

    def changed(self, modified: datetime) -> None:
        self.revision += 1
        self.modified = modified
        self._body = None
        if isinstance(self.document.get("time"), dict):  # an edit may have removed it
            self.document["time"]["modified"] = isoformat(modified)
        digest = hashlib.sha1(f"{self.revision}".encode()).hexdigest()
        self.document["_rev"] = f"{self.revision}-{digest}"

    @property
    def body(self) -> bytes:
        if self._body is None:
            self._body = json.dumps(self.document).encode()
        return self._body

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:40] + '"'


class FakeNpmRegistry:
    """An npm registry on 127.0.0.1. With ``token``, every request must carry
    ``Authorization: Bearer <token>`` or is answered 401."""

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.url = ""  # the base URL, ending with "/", once started
        self._packages: dict[str, _Package] = {}
        self._server: TestServer | None = None
        self._closing = asyncio.Event()
        self._fault_bodies = 0

    # -- lifecycle --

    async def start(self) -> FakeNpmRegistry:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = TestServer(app, host="127.0.0.1", port=0)
        await self._server.start_server(shutdown_timeout=2.0, access_log=None)
        self.url = str(self._server.make_url("/"))
        return self

    async def close(self) -> None:
        self._closing.set()  # wakes injected delays, so shutdown does not wait on them
        if self._server is not None:
            await self._server.close()
            self._server = None

    async def __aenter__(self) -> FakeNpmRegistry:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- state --

    def publish(
        self,
        package: str,
        version: str,
        released_at: datetime,
        *,
        tag: str | None = None,
        homepage: str | None = None,
    ) -> None:
        """Publish ``version`` as ``npm publish --tag <tag>`` would (``latest`` by default)."""
        entry = self._packages.get(package)
        if entry is None:
            document = _new_document(package, released_at)
            entry = self._packages[package] = _Package(document, released_at)
        document = entry.document
        if version in document["versions"]:
            raise ValueError(f"{package}@{version} is already published")
        document["versions"][version] = self._manifest(package, version, homepage)
        document["time"][version] = isoformat(released_at)
        document["dist-tags"][tag or "latest"] = version
        if homepage is not None:
            document["homepage"] = homepage
        # Each change moves Last-Modified by at least a second, its HTTP resolution.
        first = entry.revision == 0
        entry.changed(released_at if first else max(released_at, self._next(entry)))

    def tag(self, package: str, tag: str, version: str) -> None:
        """``npm dist-tag add package@version tag``."""
        entry = self._packages[package]
        entry.document["dist-tags"][tag] = version
        entry.changed(self._next(entry))

    def edit(self, package: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Change the stored document in place (to serve a broken one): a new revision."""
        entry = self._packages[package]
        change(entry.document)
        entry.changed(self._next(entry))

    @staticmethod
    def _next(entry: _Package) -> datetime:
        return entry.modified + timedelta(seconds=1)

    def document(self, package: str) -> dict[str, Any]:
        return copy.deepcopy(self._packages[package].document)

    def etag(self, package: str) -> str:
        return self._packages[package].etag

    def fail_next(
        self,
        times: int = 1,
        *,
        status: int | None = 500,
        delay: float = 0.0,
        body: bytes | None = None,
        reset: bool = False,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        size: int | None = None,
    ) -> Fault:
        """Inject a fault into the next ``times`` requests (``status=None``: only slow)."""
        fault = Fault(status, times, delay, body, reset, dict(headers or {}), content_type, size)
        self.faults.append(fault)
        return fault

    def _manifest(self, package: str, version: str, homepage: str | None) -> dict[str, Any]:
        tarball = f"{package.rsplit('/', 1)[-1]}-{version}.tgz"
        digest = hashlib.sha512(f"{package}@{version}".encode()).digest()
        manifest: dict[str, Any] = {
            "name": package,
            "version": version,
            "description": f"{package}, a coding agent for the terminal",
            "bin": {package.rsplit("/", 1)[-1]: "cli.js"},
            "engines": {"node": ">=18.0.0"},
            "license": "MIT",
            "_id": f"{package}@{version}",
            "_npmUser": {"name": "publisher", "email": "publisher@example.test"},
            "maintainers": [{"name": "publisher", "email": "publisher@example.test"}],
            "dist": {
                "integrity": "sha512-" + base64.b64encode(digest).decode(),
                "shasum": hashlib.sha1(digest).hexdigest(),
                "tarball": f"{self.url}{package}/-/{tarball}",
                "fileCount": 12,
                "unpackedSize": 4_200_000,
            },
        }
        if homepage is not None:
            manifest["homepage"] = homepage
        return manifest

    # -- the request path --

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = Recorded(request.method, request.rel_url.raw_path, CIMultiDict(request.headers))
        self.requests.append(record)
        response = await self._answer(request, record)
        if response is None:  # reset: the connection is closed, nothing is sent
            return web.Response()
        record.status = response.status
        return response

    async def _answer(self, request: web.Request, record: Recorded) -> web.StreamResponse | None:
        fault = next((f for f in self.faults if f.hits < f.times), None)
        if fault is not None:
            fault.hits += 1
            if fault.delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), fault.delay)
            if fault.reset:
                if request.transport is not None:
                    request.transport.close()
                return None
            if fault.size is not None:
                return await _stream(request, fault.size, fault.content_type)
            if fault.body is not None:
                self._fault_bodies += 1
                headers = {"ETag": f'"broken-{self._fault_bodies}"', **fault.headers}
                return web.Response(
                    body=fault.body, content_type=fault.content_type, headers=headers
                )
            if fault.status is not None:
                return _error(fault.status, "injected fault", fault.headers)
        if request.method != "GET":
            return _error(405, "Method not allowed")
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return _error(401, "Unable to authenticate, need: Bearer")
        entry = self._packages.get(record.package)
        if entry is None:
            return _error(404, "Not found")
        headers = {
            "ETag": entry.etag,
            "Last-Modified": format_datetime(entry.modified.astimezone(UTC), usegmt=True),
            "Cache-Control": "public, max-age=300",
        }
        if _not_modified(request, entry):
            return web.Response(status=304, headers=headers)
        return web.Response(body=entry.body, content_type="application/json", headers=headers)


async def _stream(request: web.Request, size: int, content_type: str) -> web.StreamResponse:
    """A JSON document whose first string never ends, ``size`` bytes of it, chunked: only
    reading shows how large it is. A client that stops reading and hangs up ends it."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunk = b"x" * (1 << 20)
    sent = 0
    with contextlib.suppress(ConnectionError):
        await response.write(b'{"name": "')
        while sent < size:
            piece = chunk[: size - sent]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
    return response


def _not_modified(request: web.Request, entry: _Package) -> bool:
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:  # it overrides If-Modified-Since (RFC 9110, 13.1.3)
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or entry.etag in tags
    if_modified_since = request.headers.get("If-Modified-Since")
    if if_modified_since is None:
        return False
    try:
        since = parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError):
        return False
    return entry.modified.replace(microsecond=0) <= since


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    if status in (204, 304):  # no body allowed
        return web.Response(status=status, headers=headers)
    return web.json_response({"error": message}, status=status, headers=headers)


def _new_document(package: str, created: datetime) -> dict[str, Any]:
    return {
        "_id": package,
        "_rev": "",
        "name": package,
        "description": f"{package}, a coding agent for the terminal",
        "dist-tags": {},
        "versions": {},
        "time": {"created": isoformat(created), "modified": isoformat(created)},
        "maintainers": [{"name": "publisher", "email": "publisher@example.test"}],
        "license": "MIT",
        "readme": f"# {package}\n\nA coding agent for the terminal.\n",
        "readmeFilename": "README.md",
    }
