"""A fake OIDC issuer for tests: GitHub Actions' token service on 127.0.0.1, over http.

It serves ``/.well-known/openid-configuration`` and a key set (``/.well-known/jwks``),
records every request, fails on demand, and mints tokens shaped like GitHub's::

    async with FakeOidcIssuer() as issuer:
        token = issuer.mint(issuer.claims(now, run_id="42"))
        ...  # verify it against issuer.url
        assert issuer.requests == [DISCOVERY, JWKS]

The RSA keys are made once per test session (a 2048-bit key takes tens of milliseconds).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

DISCOVERY = "/.well-known/openid-configuration"
JWKS = "/.well-known/jwks"

_PRIVATE_KEYS = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    def jwk(self) -> dict[str, Any]:
        """The public half as the issuer publishes it."""
        public = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "use": "sig", "alg": "RS256"}


def spare_key(kid: str = "spare") -> SigningKey:
    """A key the issuer does not publish (the last of the pool)."""
    return SigningKey(kid, _PRIVATE_KEYS[-1])


class FakeOidcIssuer:
    """An OIDC issuer on 127.0.0.1 publishing one key until ``rotate`` replaces it.

    ``fail_with`` answers every request with that status; ``hold`` (an Event) keeps key-set
    requests waiting until it is set; ``discovery`` entries override the discovery
    document's; ``extra_jwks`` are published beside the signing keys.
    """

    def __init__(self) -> None:
        self.keys = [SigningKey("key-1", _PRIVATE_KEYS[0])]
        self.requests: list[str] = []
        self.fail_with: int | None = None
        self.hold: asyncio.Event | None = None
        self.discovery: dict[str, Any] = {}
        self.extra_jwks: list[dict[str, Any]] = []
        self.url = ""  # the issuer identifier, no trailing slash, once started
        self._server: TestServer | None = None

    async def __aenter__(self) -> FakeOidcIssuer:
        app = web.Application()
        app.router.add_get(DISCOVERY, self._discovery)
        app.router.add_get(JWKS, self._jwks)
        app.router.add_get("/redirect", self._redirect)
        self._server = TestServer(app, host="127.0.0.1", port=0)
        await self._server.start_server(shutdown_timeout=2.0, access_log=None)
        self.url = str(self._server.make_url("")).rstrip("/")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._server is not None:
            await self._server.close()

    @property
    def key(self) -> SigningKey:
        """The key new tokens are signed with."""
        return self.keys[-1]

    def rotate(self) -> SigningKey:
        """Publish a new key in place of the current one; tokens are signed with it."""
        self.keys = [SigningKey("key-2", _PRIVATE_KEYS[1])]
        return self.key

    # -- tokens --

    def claims(self, now: datetime, **overrides: Any) -> dict[str, Any]:
        """GitHub Actions' claims for a workflow_dispatch run of acme/runners' canary.yml.

        All of GitHub's own claims are strings, ids included; times are epoch seconds.
        """
        iat = int(now.timestamp())
        claims: dict[str, Any] = {
            "jti": "6f2b8c1e-4d0a-4c8e-9a57-2f1c3b9d7e10",
            "sub": "repo:acme/runners:ref:refs/heads/main",
            "aud": "update-pipeline",
            "ref": "refs/heads/main",
            "sha": "c040cae0f0dc81641728557b80f09cfa23b83fe5",
            "repository": "acme/runners",
            "repository_owner": "acme",
            "repository_owner_id": "2020",
            "repository_id": "424242",
            "repository_visibility": "private",
            "run_id": "22259804324",
            "run_number": "42",
            "run_attempt": "1",
            "runner_environment": "github-hosted",
            "actor": "octocat",
            "actor_id": "583231",
            "workflow": "canary",
            "head_ref": "",
            "base_ref": "",
            "event_name": "workflow_dispatch",
            "ref_protected": "true",
            "ref_type": "branch",
            "workflow_ref": "acme/runners/.github/workflows/canary.yml@refs/heads/main",
            "workflow_sha": "c040cae0f0dc81641728557b80f09cfa23b83fe5",
            "job_workflow_ref": "acme/runners/.github/workflows/canary.yml@refs/heads/main",
            "job_workflow_sha": "c040cae0f0dc81641728557b80f09cfa23b83fe5",
            "check_run_id": "90000001",
            "iss": self.url,
            "nbf": iat - 600,
            "iat": iat,
            "exp": iat + 300,
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def mint(self, claims: dict[str, Any], *, key: SigningKey | None = None) -> str:
        """A token signed with RS256 by ``key`` (the current key by default)."""
        key = key or self.key
        return jwt.encode(claims, key.private, algorithm="RS256", headers={"kid": key.kid})

    # -- the endpoints --

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if self.fail_with is not None:
            return web.Response(status=self.fail_with)
        document = {
            "issuer": self.url,
            "jwks_uri": self.url + JWKS,
            "subject_types_supported": ["public", "pairwise"],
            "response_types_supported": ["id_token"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid"],
            **self.discovery,
        }
        return web.json_response(document)

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_with is not None:
            return web.Response(status=self.fail_with)
        return web.json_response({"keys": [k.jwk() for k in self.keys] + self.extra_jwks})

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        """``/redirect?to=<url>`` answers 302 to that URL; without ``to``, to itself."""
        self.requests.append(request.path)
        raise web.HTTPFound(request.query.get("to", request.path))


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS with any header and signature, for tokens pyjwt refuses to make."""
    head, body = _b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signature)}"


def sign_hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token; pyjwt will not use a PEM public key as an HMAC secret, so by hand."""
    head = _b64(json.dumps({**header, "alg": "HS256"}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
