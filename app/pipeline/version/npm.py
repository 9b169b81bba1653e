"""npm as a version source: the releases a package's registry document lists, fetched
with conditional requests. The registry comes from ``npmrc.resolve_registry``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import aiohttp
from yarl import URL

from app.clock import parse_iso
from app.logs import get_logger
from app.pipeline.version.npmrc import NpmRegistry
from app.pipeline.version.semver import Version

log = get_logger("version.npm")

FETCH_TIMEOUT = 60.0  # seconds for one package document, a few MB for popular packages
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024


# -- the source -------------------------------------------------------------------------


class SourceError(Exception):
    """The registry's answer cannot be used; nothing from it is returned or remembered."""

    transient: ClassVar[bool] = False

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds, when the registry said so


class TransientSourceError(SourceError):
    """Worth trying again after a pause: a timeout, a lost connection, a 5xx, a 429."""

    transient = True


@dataclass(frozen=True, slots=True)
class Release:
    """One published version.

    ``prerelease`` is true for a semver pre-release (``2.0.0-beta.1``) and for any version
    newer than the ``latest`` dist-tag: such a version was published under another tag
    (``next``, ``beta``) or not yet promoted, so it is not what ``npm install`` gives.
    """

    version: str
    released_at: datetime  # aware, UTC, from the document's ``time`` map
    prerelease: bool
    source_url: str
    tags: tuple[str, ...] = ()  # the dist-tags pointing at this version


@dataclass(frozen=True, slots=True)
class PackageReleases:
    """Every version a package document lists, oldest first by semver precedence."""

    package: str
    releases: tuple[Release, ...]
    latest: Release  # the ``latest`` dist-tag: the stable candidate


@dataclass(frozen=True, slots=True)
class NotModified:
    """The document has not changed since the last good answer: there is nothing to do."""

    package: str


class NpmSource:
    """One package on one registry. ``check`` fetches its document with conditional
    requests: it remembers the validators of the last good answer only."""

    def __init__(
        self,
        package: str,
        registry: NpmRegistry,
        session: aiohttp.ClientSession,
        *,
        page_url_template: str | None = None,
        timeout: float | None = None,
        max_bytes: int = MAX_DOCUMENT_BYTES,
    ) -> None:
        self.package = package
        self.registry = registry
        self.url = registry.package_url(package)
        self.page_url_template = page_url_template
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT if timeout is None else timeout)
        self._max_bytes = max_bytes
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._lock = asyncio.Lock()  # concurrent checks would race on the validators

    @property
    def etag(self) -> str | None:
        return self._etag

    def __repr__(self) -> str:
        return f"NpmSource({self.package!r}, {self.registry!r})"

    async def check(self) -> PackageReleases | NotModified:
        """The releases, or NotModified; raises SourceError (transient or not)."""
        async with self._lock:
            status, headers, body = await self._get()
            if status == 304:
                if self._etag is None and self._last_modified is None:
                    raise SourceError(f"{self.package}: 304 Not Modified to a plain request")
                return NotModified(self.package)
            if not 200 <= status < 300:
                raise self._status_error(status, headers)
            # Parsing a 5 MB document takes ~100 ms: in a thread, and in pieces, since
            # one json.loads call would hold the GIL, and so the event loop, throughout.
            found = await asyncio.to_thread(
                parse_package_document,
                body,
                self.package,
                document_url=self.url,
                page_url_template=self.page_url_template,
            )
            self._etag = headers.get("ETag")
            self._last_modified = headers.get("Last-Modified")
            return found

    def _request_headers(self) -> dict[str, str]:
        # The full document: the abbreviated install format has no ``time`` map.
        headers = {"Accept": "application/json", **self.registry.headers()}
        if self._etag is not None:
            headers["If-None-Match"] = self._etag
        if self._last_modified is not None:
            headers["If-Modified-Since"] = self._last_modified
        return headers

    async def _get(self) -> tuple[int, Mapping[str, str], bytes]:
        # Sent as npm sends it (``%2f``); yarl would otherwise re-encode it as ``%2F``.
        url = URL(self.url, encoded=True)
        try:
            async with self._session.get(
                url, headers=self._request_headers(), timeout=self._timeout
            ) as response:
                body = await self._read(response) if 200 <= response.status < 300 else b""
                return response.status, response.headers, body
        except TimeoutError as exc:
            waited = f"within {self._timeout.total}s"
            raise TransientSourceError(
                f"{self.package}: no answer from {self.registry.url} {waited}"
            ) from exc
        except aiohttp.ClientError as exc:
            # str, not repr: a connection error's repr carries its key, proxy auth included.
            reason = f"{type(exc).__name__}: {exc}"
            raise TransientSourceError(
                f"{self.package}: cannot fetch from {self.registry.url}: {reason}"
            ) from exc

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        too_large = SourceError(
            f"{self.package}: the document is larger than {self._max_bytes} bytes"
        )
        if (response.content_length or 0) > self._max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self._max_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _status_error(self, status: int, headers: Mapping[str, str]) -> SourceError:
        message = f"{self.package}: {self.registry.url} answered {status}"
        if status in (408, 429) or status >= 500:
            retry_after = _retry_after(headers.get("Retry-After"))
            return TransientSourceError(message, status=status, retry_after=retry_after)
        hints = {
            401: " (check the auth token npm has for this registry)",
            403: " (check the auth token npm has for this registry)",
            404: " (no such package there)",
        }
        return SourceError(message + hints.get(status, ""), status=status)


def _retry_after(value: str | None) -> float | None:
    # Only the seconds form: an HTTP date would need the clock for little gain.
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


# -- the package document ---------------------------------------------------------------


def parse_package_document(
    body: bytes,
    package: str,
    *,
    document_url: str,
    page_url_template: str | None = None,
) -> PackageReleases:
    """Check a full package document and list its releases; SourceError if any part of
    it is missing or malformed, so a partial answer never yields a release."""

    def fail(problem: str) -> SourceError:
        return SourceError(f"{package}: the registry's document {problem}")

    try:
        document = loads_in_pieces(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise fail(f"is not JSON ({_short(exc)})") from None
    if not isinstance(document, dict):
        raise fail("is not a JSON object")
    if "name" in document and document["name"] != package:
        raise fail(f"is for another package ({_show(document['name'])})")
    versions = _object_field(document, "versions", fail)
    times = _object_field(document, "time", fail)
    tags = _object_field(document, "dist-tags", fail)
    latest = tags.get("latest")
    if not isinstance(latest, str) or latest not in versions:
        raise fail(f"has a latest dist-tag ({_show(latest)}) that names no listed version")
    parsed = sorted((_version_key(key, fail), key) for key in versions)
    latest_version = Version(latest)
    tags_of: dict[str, list[str]] = {}
    for tag, target in tags.items():
        if isinstance(target, str):
            tags_of.setdefault(target, []).append(tag)
    homepage = _homepage(document)
    releases: list[Release] = []
    for version, key in parsed:
        if not isinstance(versions[key], dict):
            raise fail(f"has no manifest object for version {_show(key)}")
        releases.append(
            Release(
                version=key,
                released_at=_release_time(times, key, fail),
                prerelease=bool(version.prerelease) or version > latest_version,
                source_url=_source_url(page_url_template, package, key, homepage, document_url),
                tags=tuple(sorted(tags_of.get(key, ()))),
            )
        )
    return PackageReleases(
        package, tuple(releases), next(r for r in releases if r.version == latest)
    )


def loads_in_pieces(body: bytes) -> Any:
    """``json.loads`` for UTF-8 bytes, with the top two levels of objects decoded one member
    at a time: between members, another thread can take the GIL (every 5 ms by default),
    which one long ``json.loads`` call never lets it do."""
    text = body.decode("utf-8-sig")
    decoder = json.JSONDecoder()
    value, end = _json_value(decoder, text, _skip_space(text, 0), levels=2)
    if _skip_space(text, end) != len(text):
        raise ValueError(f"extra data at character {end}")
    return value


def _json_value(decoder: json.JSONDecoder, text: str, pos: int, levels: int) -> tuple[Any, int]:
    if levels and text.startswith("{", pos):
        return _json_object(decoder, text, pos + 1, levels - 1)
    return decoder.raw_decode(text, pos)


def _json_object(
    decoder: json.JSONDecoder, text: str, pos: int, levels: int
) -> tuple[dict[str, Any], int]:
    members: dict[str, Any] = {}
    pos = _skip_space(text, pos)
    if text.startswith("}", pos):
        return members, pos + 1
    while True:
        key, pos = decoder.raw_decode(text, pos) if text.startswith('"', pos) else (None, pos)
        pos = _skip_space(text, pos)
        if not isinstance(key, str) or not text.startswith(":", pos):
            raise ValueError(f"expected a member name and ':' at character {pos}")
        members[key], pos = _json_value(decoder, text, _skip_space(text, pos + 1), levels)
        pos = _skip_space(text, pos)
        if text.startswith("}", pos):
            return members, pos + 1
        if not text.startswith(",", pos):
            raise ValueError(f"expected ',' or '}}' at character {pos}")
        pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _object_field(
    document: dict[str, Any], name: str, fail: Callable[[str], SourceError]
) -> dict[str, Any]:
    value = document.get(name)
    if not isinstance(value, dict):
        raise fail(f"has no {name!r} object")
    return value


def _version_key(key: str, fail: Callable[[str], SourceError]) -> Version:
    try:
        version = Version(key)
    except ValueError:
        raise fail(f"lists {_show(key)}, which is not a semantic version") from None
    if version.text != key:  # Version strips whitespace; a registry key never has any
        raise fail(f"lists {_show(key)}, which is not a semantic version")
    return version


def _release_time(
    times: dict[str, Any], version: str, fail: Callable[[str], SourceError]
) -> datetime:
    text = times.get(version)
    if not isinstance(text, str):
        raise fail(f"has no release time for {_show(version)}")
    try:
        return parse_iso(text)
    except ValueError:
        raise fail(f"has a release time for {_show(version)} that is not a date") from None


def _homepage(document: dict[str, Any]) -> str | None:
    homepage = document.get("homepage")
    if isinstance(homepage, str) and homepage.startswith(("https://", "http://")):
        return homepage
    return None


def _source_url(
    template: str | None, package: str, version: str, homepage: str | None, document_url: str
) -> str:
    # str.replace, not str.format: a template from the environment must not reach
    # attributes through format fields ({package.__class__}).
    if template:
        return template.replace("{package}", package).replace("{version}", version)
    return homepage or document_url


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _short(exc: Exception) -> str:
    return str(exc)[:120]
