"""GitHub Actions OIDC tokens: check that a request comes from one workflow of one repository.

A workflow that posts a canary result proves where it runs with an OIDC token
(``core.getIDToken(audience)``). ``OidcVerifier.verify`` checks the token's signature
against the issuer's published keys, its standard claims against the issuer, the audience
and this service's clock, and GitHub's claims against an ``OidcPolicy``.

Keys: the issuer's discovery document names its key set (``jwks_uri``). The set is kept
for ``keys_ttl`` seconds and replaced whole when fetched again, so a key the issuer drops
stops being trusted. A token naming a key id the set lacks starts a fetch (the issuer may
have rotated its keys), but the issuer is asked at most once per ``min_refetch_interval``,
whatever the reason, so a flood of tokens with made-up key ids, or an issuer that is down,
costs it one request a minute. Callers that arrive during a fetch wait for that fetch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import jwt
from cachetools import TTLCache
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from app.clock import Clock, isoformat
from app.logs import get_logger

log = get_logger("github.oidc")

GITHUB_ACTIONS_ISSUER = "https://token.actions.githubusercontent.com"
DEFAULT_AUDIENCE = "update-pipeline"

ALGORITHM = "RS256"
MAX_TOKEN_BYTES = 16 * 1024  # GitHub's tokens are about 1.5 KB
MAX_DOCUMENT_BYTES = 1024 * 1024  # a discovery document or key set
MIN_RSA_BITS = 2048
KEYS_TTL = 3600.0  # seconds
MIN_REFETCH_INTERVAL = 60.0  # seconds between two requests to the issuer, at most one
FETCH_TIMEOUT = 10.0  # seconds for one document
MAX_REDIRECTS = 3
WORKFLOWS_DIR = ".github/workflows/"

# Names of JWS algorithms (RFC 7518), safe to repeat in a message. Any other ``alg`` value
# comes from whoever made the token and is not shown.
_KNOWN_ALGORITHMS = frozenset(
    {"none", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512"}
    | {"ES256", "ES256K", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"}
)
_MAX_KID_LENGTH = 256
_KEYS = "keys"  # the one entry of the key cache
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class OidcRejected(Exception):
    """The token does not prove what the policy asks; ``reason`` is safe to show the caller.

    ``status`` is the HTTP status an API should answer with: 401 here, 503 for
    ``OidcIssuerUnavailable``. No message ever contains the token.
    """

    status: ClassVar[int] = 401
    unreachable: ClassVar[bool] = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OidcIssuerUnavailable(OidcRejected):
    """The issuer's keys cannot be fetched (unreachable, erroring, or serving a broken
    document): the token may be good, and the caller should try again later."""

    status: ClassVar[int] = 503
    unreachable: ClassVar[bool] = True


@dataclass(frozen=True, slots=True, kw_only=True)
class OidcPolicy:
    """What a token must say about the workflow run that asked for it.

    - ``audience``: the token's ``aud`` is this string, or a list that contains it.
    - ``repository``: ``owner/name``; the ``repository`` claim must match, ignoring case.
    - ``repository_id``: the ``repository_id`` claim must match, compared as text (GitHub
      sends it as a string). Pin it: a deleted or renamed repository's name can be taken
      by someone else, its id cannot. **When None, the id is not checked at all.**
    - ``event_name``: the event that started the run.
    - ``workflow``: the workflow file, as ``canary.yml`` or ``.github/workflows/canary.yml``.
      The ``workflow_ref`` claim (``owner/repo/.github/workflows/canary.yml@refs/heads/main``)
      must name ``repository`` (ignoring case) and exactly this path (case matters, as in
      git), at any ref. ``workflow_ref`` is the run's top-level workflow: a reusable
      workflow it calls does not count.
    - ``run_id``: when set, the ``run_id`` claim must equal it.
    """

    audience: str
    repository: str
    repository_id: str | int | None
    workflow: str
    event_name: str = "workflow_dispatch"
    run_id: str | None = None

    def __post_init__(self) -> None:
        if not self.audience:
            raise ValueError("an OIDC policy needs an audience")
        owner, _, name = self.repository.partition("/")
        if not owner or not name or "/" in name:
            raise ValueError(f"repository {self.repository!r} is not owner/name")
        workflow_path(self.workflow)

    @property
    def workflow_path(self) -> str:
        """The workflow's path in its repository: ``.github/workflows/<file>``."""
        return workflow_path(self.workflow)


def workflow_path(workflow: str) -> str:
    """``canary.yml`` or ``.github/workflows/canary.yml`` as the latter; ValueError for
    anything that cannot be a workflow file (settings can check theirs at start)."""
    path = workflow if "/" in workflow else WORKFLOWS_DIR + workflow
    stem = path.removeprefix(WORKFLOWS_DIR)
    if "@" in path or not stem or "/" in stem or not stem.endswith((".yml", ".yaml")):
        raise ValueError(
            f"workflow {workflow!r} is not a workflow file such as canary.yml "
            f"or {WORKFLOWS_DIR}canary.yml"
        )
    return path


def issuer_problem(issuer: str) -> str | None:
    """Why ``issuer`` cannot be an OIDC issuer here, or None. It must be https, or http to
    a loopback IP address (a local test issuer), with no credentials, query or fragment."""
    problem = _insecure(issuer)
    if problem is None and (urlsplit(issuer).query or urlsplit(issuer).fragment):
        problem = "an issuer identifier has no query or fragment"
    return problem


@dataclass(frozen=True, slots=True)
class OidcClaims:
    """The checked claims of a token (all text, as GitHub sends them), and all of them."""

    repository: str
    repository_id: str
    run_id: str
    run_attempt: str
    workflow_ref: str
    sha: str
    ref: str
    actor: str
    event_name: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)


class OidcVerifier:
    """Verifies OIDC tokens from one issuer (GitHub Actions' by default).

    ``issuer`` must be https, or http to a loopback IP address (a local test issuer).
    ``leeway`` (seconds) absorbs clock drift in the ``exp``, ``nbf`` and ``iat`` checks,
    which use ``clock``, never the system time. ``session`` is borrowed, not closed.
    """

    def __init__(
        self,
        issuer: str,
        session: aiohttp.ClientSession,
        clock: Clock,
        *,
        leeway: float = 60.0,
        keys_ttl: float = KEYS_TTL,
        min_refetch_interval: float = MIN_REFETCH_INTERVAL,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        problem = issuer_problem(issuer)
        if problem is not None:
            raise ValueError(f"OIDC issuer {issuer!r}: {problem}")
        self.issuer = issuer
        # OpenID Connect Discovery 1.0, section 4: a trailing slash is removed first.
        self.discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        self.leeway = leeway
        self.min_refetch_interval = min_refetch_interval
        self._session = session
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._keys: TTLCache[str, Mapping[str, jwt.PyJWK]] = TTLCache(
            maxsize=1, ttl=keys_ttl, timer=clock.monotonic
        )
        self._inflight: asyncio.Task[Mapping[str, jwt.PyJWK]] | None = None
        self._last_attempt: float | None = None  # clock.monotonic() when a fetch started
        self._last_error: OidcIssuerUnavailable | None = None

    def __repr__(self) -> str:
        return f"OidcVerifier({self.issuer!r})"

    async def verify(self, token: str, policy: OidcPolicy) -> OidcClaims:
        """The token's claims if it passes every check; raises OidcRejected otherwise
        (OidcIssuerUnavailable when the keys cannot be fetched)."""
        if not isinstance(token, str) or not token:
            raise OidcRejected("no token")
        if len(token) > MAX_TOKEN_BYTES:
            raise OidcRejected(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
        kid = _key_id(token)
        key = await self._key(kid)
        payload = _verified_payload(token, key)
        self._check_standard_claims(payload, policy.audience)
        return _check_policy(payload, policy)

    # -- the standard claims --

    def _check_standard_claims(self, payload: Mapping[str, Any], audience: str) -> None:
        if payload.get("iss") != self.issuer:
            raise OidcRejected(f"the token was not issued by {self.issuer}")
        aud = payload.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if audience not in [a for a in audiences if isinstance(a, str)]:
            raise OidcRejected(f"the token's audience is not {audience!r}")
        now = self._clock.now().timestamp()
        exp = _timestamp(payload, "exp")
        if now > exp + self.leeway:
            raise OidcRejected(f"the token expired at {_show_time(exp)}")
        iat = _timestamp(payload, "iat")
        if iat > now + self.leeway:
            raise OidcRejected(f"the token says it was issued in the future ({_show_time(iat)})")
        if "nbf" in payload:
            nbf = _timestamp(payload, "nbf")
            if now < nbf - self.leeway:
                raise OidcRejected(f"the token is not valid before {_show_time(nbf)}")

    # -- keys --

    async def _key(self, kid: str) -> jwt.PyJWK:
        keys = self._keys.get(_KEYS)
        if keys is not None and kid in keys:
            return keys[kid]
        if self._inflight is None:
            if self._throttled():
                if self._last_error is not None:  # the issuer failed us less than a minute ago
                    raise OidcIssuerUnavailable(self._last_error.reason)
                if keys is not None:  # and fetched in the last minute: no new key since
                    raise OidcRejected("the token's key id is not among the issuer's keys")
            self._start_fetch()
        assert self._inflight is not None
        try:
            # shield: one caller giving up must not cancel the fetch the others wait on.
            keys = await asyncio.shield(self._inflight)
        except OidcIssuerUnavailable as exc:
            raise OidcIssuerUnavailable(exc.reason) from None  # one exception per caller
        if kid not in keys:
            raise OidcRejected("the token's key id is not among the issuer's keys")
        return keys[kid]

    def _throttled(self) -> bool:
        last = self._last_attempt
        return last is not None and self._clock.monotonic() - last < self.min_refetch_interval

    def _start_fetch(self) -> None:
        self._last_attempt = self._clock.monotonic()
        task = asyncio.create_task(self._fetch_keys())
        self._inflight = task

        def done(finished: asyncio.Task[Mapping[str, jwt.PyJWK]]) -> None:
            self._inflight = None
            # Retrieve the outcome even when every waiter gave up, so asyncio does not
            # report an exception that was never retrieved.
            error = None if finished.cancelled() else finished.exception()
            if isinstance(error, OidcIssuerUnavailable):
                self._last_error = error
            elif error is None and not finished.cancelled():
                self._last_error = None

        task.add_done_callback(done)

    async def _fetch_keys(self) -> Mapping[str, jwt.PyJWK]:
        try:
            config = await self._get_json(self.discovery_url)
            if config.get("issuer") != self.issuer:
                raise _FetchError(
                    f"the discovery document at {self.discovery_url} names another issuer"
                )
            jwks_uri = config.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri:
                raise _FetchError(f"the discovery document at {self.discovery_url} has no jwks_uri")
            problem = _insecure(jwks_uri)
            if problem is not None:
                raise _FetchError(f"jwks_uri {jwks_uri}: {problem}")
            keys = _parse_key_set(await self._get_json(jwks_uri), jwks_uri)
        except _FetchError as exc:
            log.warning("OIDC issuer %s: cannot fetch its keys: %s", self.issuer, exc)
            raise OidcIssuerUnavailable(f"cannot fetch the issuer's keys: {exc}") from None
        log.info("OIDC issuer %s: %d signing keys (%s)", self.issuer, len(keys), ", ".join(keys))
        frozen = MappingProxyType(keys)
        self._keys[_KEYS] = frozen
        return frozen

    async def _get_json(self, url: str) -> dict[str, Any]:
        """A JSON object from ``url``, following redirects only to https (or loopback) URLs,
        checked before they are requested."""
        first = url
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = await self._get(url)
            if status not in _REDIRECTS:
                break
            if location is None:
                raise _FetchError(f"{url} answered {status} without a Location")
            target = str(URL(url).join(URL(location)))
            problem = _insecure(target)
            if problem is not None:
                raise _FetchError(f"{url} redirected to {target}: {problem}")
            url = target
        else:
            raise _FetchError(f"{first} redirected more than {MAX_REDIRECTS} times")
        if status != 200:
            raise _FetchError(f"{url} answered {status}")
        try:
            document = json.loads(body)
        except ValueError:
            raise _FetchError(f"{url} did not answer with JSON") from None
        if not isinstance(document, dict):
            raise _FetchError(f"{url} did not answer with a JSON object")
        return document

    async def _get(self, url: str) -> tuple[int, str | None, bytes]:
        try:
            async with self._session.get(
                url,
                timeout=self._timeout,
                headers={"Accept": "application/json"},
                allow_redirects=False,
            ) as response:
                body = await _read_limited(response, url) if response.status == 200 else b""
                return response.status, response.headers.get("Location"), body
        except TimeoutError:
            raise _FetchError(f"no answer from {url} within {self._timeout.total}s") from None
        except aiohttp.ClientError as exc:
            # str, not repr: a connection error's repr carries its key, proxy auth included.
            raise _FetchError(f"{url}: {type(exc).__name__}: {exc}") from None


class _FetchError(Exception):
    """A document could not be fetched or used; the message names the URL, not a token."""


async def _read_limited(response: aiohttp.ClientResponse, url: str) -> bytes:
    too_large = _FetchError(f"{url} sent more than {MAX_DOCUMENT_BYTES} bytes")
    if (response.content_length or 0) > MAX_DOCUMENT_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_DOCUMENT_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _insecure(url: str) -> str | None:
    """Why ``url`` cannot be trusted to serve keys, or None: https, or http to loopback."""
    parts = urlsplit(url)
    if not parts.hostname:
        return "not an absolute URL"
    if parts.username or parts.password:
        return "must not carry credentials"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http":
        try:
            if ipaddress.ip_address(parts.hostname).is_loopback:
                return None
        except ValueError:
            pass
        return "http is allowed only to a loopback IP address such as 127.0.0.1; use https"
    return "must be an https URL"


def _parse_key_set(document: Mapping[str, Any], url: str) -> dict[str, jwt.PyJWK]:
    """The RS256 signing keys of a JWKS, by key id; keys of other kinds are skipped."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise _FetchError(f"{url} is not a JSON Web Key Set")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or kid in keys:
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", ALGORITHM) != ALGORITHM:
            continue
        try:
            key = jwt.PyJWK(entry, algorithm=ALGORITHM)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            log.warning("OIDC key set %s: skipping the malformed key %r", url, kid[:64])
            continue
        if not isinstance(key.key, rsa.RSAPublicKey) or key.key.key_size < MIN_RSA_BITS:
            log.warning("OIDC key set %s: skipping the key %r (not RSA-2048+)", url, kid[:64])
            continue
        keys[kid] = key
    if not keys:
        raise _FetchError(f"{url} lists no RS256 signing key")
    return keys


def _key_id(token: str) -> str:
    """The ``kid`` of a token signed with RS256; rejects any other algorithm first."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise OidcRejected("the token is not a JWT") from None
    alg = header.get("alg")
    if alg != ALGORITHM:
        shown = repr(alg) if isinstance(alg, str) and alg in _KNOWN_ALGORITHMS else "another"
        raise OidcRejected(f"the token is signed with {shown} algorithm; only RS256 is accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_LENGTH:
        raise OidcRejected("the token names no usable key id")
    return kid


def _verified_payload(token: str, key: jwt.PyJWK) -> dict[str, Any]:
    try:
        # Only the signature (and the shape) here: the time checks of pyjwt read the
        # system clock, so they are made against the injected clock instead.
        return jwt.decode(
            token,
            key.key,
            algorithms=[ALGORITHM],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
                "verify_sub": False,
                "verify_jti": False,
                "enforce_minimum_key_length": True,
                "require": [],
            },
        )
    except jwt.InvalidSignatureError:
        raise OidcRejected("the token's signature does not verify") from None
    except jwt.PyJWTError:
        raise OidcRejected("the token is not a valid JWT") from None


def _timestamp(payload: Mapping[str, Any], claim: str) -> float:
    value = payload.get(claim)
    if value is None:
        raise OidcRejected(f"the token has no {claim} claim")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OidcRejected(f"the token's {claim} claim is not a time")
    return float(value)


def _show_time(timestamp: float) -> str:
    try:
        return isoformat(datetime.fromtimestamp(timestamp, UTC))
    except (OverflowError, OSError, ValueError):
        return f"{timestamp:.0f} (epoch seconds)"


def _text_claim(payload: Mapping[str, Any], claim: str) -> str:
    """A claim GitHub sends as a non-empty string; an integer is taken as its digits."""
    value = payload.get(claim)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or value == "":
        raise OidcRejected(f"the token has no {claim} claim")
    if not isinstance(value, str):
        raise OidcRejected(f"the token's {claim} claim is not text")
    return value


def _check_policy(payload: Mapping[str, Any], policy: OidcPolicy) -> OidcClaims:
    claims = OidcClaims(
        repository=_text_claim(payload, "repository"),
        repository_id=_text_claim(payload, "repository_id"),
        run_id=_text_claim(payload, "run_id"),
        run_attempt=_text_claim(payload, "run_attempt"),
        workflow_ref=_text_claim(payload, "workflow_ref"),
        sha=_text_claim(payload, "sha"),
        ref=_text_claim(payload, "ref"),
        actor=_text_claim(payload, "actor"),
        event_name=_text_claim(payload, "event_name"),
        raw=MappingProxyType(dict(payload)),
    )
    if claims.repository.casefold() != policy.repository.casefold():
        raise OidcRejected(f"the token is not from the repository {policy.repository}")
    if policy.repository_id is not None and claims.repository_id != str(policy.repository_id):
        raise OidcRejected(
            f"the token is not from the repository with id {policy.repository_id} "
            f"(a repository named {policy.repository} may have been replaced)"
        )
    if claims.event_name != policy.event_name:
        raise OidcRejected(f"the token is not from a {policy.event_name} run")
    if not _workflow_matches(claims.workflow_ref, policy):
        raise OidcRejected(
            f"the token is not from the workflow {policy.repository}/{policy.workflow_path}"
        )
    if policy.run_id is not None and claims.run_id != policy.run_id:
        raise OidcRejected(f"the token is not from the run {policy.run_id}")
    return claims


def _workflow_matches(workflow_ref: str, policy: OidcPolicy) -> bool:
    """``owner/repo/<path>@<ref>``: the repository ignoring case, the path exactly, any ref."""
    owner, _, rest = workflow_ref.partition("/")
    name, _, rest = rest.partition("/")
    prefix = policy.workflow_path + "@"
    return (
        f"{owner}/{name}".casefold() == policy.repository.casefold()
        and rest.startswith(prefix)
        and len(rest) > len(prefix)
    )
