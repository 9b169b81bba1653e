"""GitHub Actions OIDC tokens, verified against a local issuer (tests/fake_oidc.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from app.clock import ManualClock
from app.github.oidc import (
    DEFAULT_AUDIENCE,
    GITHUB_ACTIONS_ISSUER,
    MAX_TOKEN_BYTES,
    OidcIssuerUnavailable,
    OidcPolicy,
    OidcRejected,
    OidcVerifier,
    issuer_problem,
    workflow_path,
)
from tests.fake_oidc import DISCOVERY, JWKS, FakeOidcIssuer, sign_hs256, spare_key, unsigned

POLICY = OidcPolicy(
    audience=DEFAULT_AUDIENCE,
    repository="acme/runners",
    repository_id="424242",
    workflow="canary.yml",
)
LEEWAY = timedelta(seconds=60)
MINUTE = timedelta(seconds=60)


@pytest.fixture
async def issuer() -> AsyncIterator[FakeOidcIssuer]:
    async with FakeOidcIssuer() as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as opened:
        yield opened


@pytest.fixture
def verifier(
    issuer: FakeOidcIssuer, session: aiohttp.ClientSession, clock: ManualClock
) -> OidcVerifier:
    return OidcVerifier(issuer.url, session, clock, leeway=LEEWAY.total_seconds())


def github_token(issuer: FakeOidcIssuer, clock: ManualClock, **overrides: Any) -> str:
    """A token as GitHub mints it for the canary run, now; ``name=None`` drops a claim."""
    return issuer.mint(issuer.claims(clock.now(), **overrides))


async def rejected(verifier: OidcVerifier, token: str, policy: OidcPolicy = POLICY) -> OidcRejected:
    with pytest.raises(OidcRejected) as caught:
        await verifier.verify(token, policy)
    error = caught.value
    assert error.reason == str(error)
    if len(token) >= 8:
        assert token not in str(error), "a rejection must never repeat the token"
    return error


# -- a good token ------------------------------------------------------------------------


async def test_a_token_from_the_canary_workflow_passes_and_gives_its_claims(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    claims = await verifier.verify(github_token(issuer, clock), POLICY)

    assert claims.repository == "acme/runners"
    assert claims.repository_id == "424242"
    assert claims.run_id == "22259804324"
    assert claims.run_attempt == "1"
    assert claims.workflow_ref == "acme/runners/.github/workflows/canary.yml@refs/heads/main"
    assert claims.sha == "c040cae0f0dc81641728557b80f09cfa23b83fe5"
    assert claims.ref == "refs/heads/main"
    assert claims.actor == "octocat"
    assert claims.event_name == "workflow_dispatch"
    assert claims.raw["sub"] == "repo:acme/runners:ref:refs/heads/main"
    assert issuer.requests == [DISCOVERY, JWKS]


async def test_the_keys_are_kept_for_an_hour(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    await verifier.verify(github_token(issuer, clock), POLICY)
    clock.advance(timedelta(minutes=59))
    await verifier.verify(github_token(issuer, clock), POLICY)
    assert issuer.requests == [DISCOVERY, JWKS]

    clock.advance(timedelta(minutes=2))
    await verifier.verify(github_token(issuer, clock), POLICY)
    assert issuer.requests == [DISCOVERY, JWKS] * 2


@pytest.mark.parametrize(
    "policy",
    [
        OidcPolicy(
            audience="update-pipeline",
            repository="Acme/Runners",
            repository_id=424242,
            workflow=".github/workflows/canary.yml",
        ),
        OidcPolicy(
            audience="update-pipeline",
            repository="acme/runners",
            repository_id=None,
            workflow="canary.yml",
            run_id="22259804324",
        ),
    ],
    ids=["repository-any-case-id-as-int-full-path", "no-id-check-and-this-run"],
)
async def test_policies_that_describe_the_run_accept_it(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock, policy: OidcPolicy
) -> None:
    await verifier.verify(github_token(issuer, clock), policy)


@pytest.mark.parametrize(
    "ref", ["refs/heads/main", "refs/heads/release@2026", "refs/tags/v1.2.0", "refs/pull/7/merge"]
)
async def test_the_workflow_may_run_at_any_ref(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock, ref: str
) -> None:
    workflow_ref = f"acme/runners/.github/workflows/canary.yml@{ref}"
    claims = await verifier.verify(github_token(issuer, clock, workflow_ref=workflow_ref), POLICY)
    assert claims.workflow_ref == workflow_ref


async def test_the_audience_may_be_a_list_that_contains_ours(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    token = github_token(issuer, clock, aud=["https://github.com/acme", "update-pipeline"])
    await verifier.verify(token, POLICY)


async def test_without_a_repository_id_to_pin_any_id_passes(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    unpinned = OidcPolicy(
        audience="update-pipeline",
        repository="acme/runners",
        repository_id=None,
        workflow="canary.yml",
    )
    claims = await verifier.verify(github_token(issuer, clock, repository_id="999"), unpinned)
    assert claims.repository_id == "999"


# -- claims that do not match ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": GITHUB_ACTIONS_ISSUER}, "the token was not issued by http://127.0.0.1:"),
        ({"iss": None}, "the token was not issued by"),
        ({"aud": "https://github.com/acme"}, "the token's audience is not 'update-pipeline'"),
        ({"aud": ["https://github.com/acme", "sts"]}, "audience is not 'update-pipeline'"),
        ({"aud": None}, "audience is not 'update-pipeline'"),
        ({"repository": "acme/runners-fork"}, "not from the repository acme/runners"),
        ({"repository": "evil/runners"}, "not from the repository acme/runners"),
        ({"repository_id": "31337"}, "not from the repository with id 424242"),
        ({"repository_id": None}, "the token has no repository_id claim"),
        ({"event_name": "push"}, "the token is not from a workflow_dispatch run"),
        ({"event_name": "pull_request_target"}, "not from a workflow_dispatch run"),
        (
            {"workflow_ref": "acme/runners/.github/workflows/deploy.yml@refs/heads/main"},
            "not from the workflow acme/runners/.github/workflows/canary.yml",
        ),
        (
            {"workflow_ref": "evil/runners/.github/workflows/canary.yml@refs/heads/main"},
            "not from the workflow acme/runners/.github/workflows/canary.yml",
        ),
        (
            {"workflow_ref": "acme/runners/.github/workflows/canary.yml.bak@refs/heads/main"},
            "not from the workflow",
        ),
        ({"workflow_ref": "acme/runners/.github/workflows/canary.yml@"}, "not from the workflow"),
        ({"workflow_ref": "acme/runners/.github/workflows/canary.yml"}, "not from the workflow"),
        ({"run_id": None}, "the token has no run_id claim"),
        ({"sha": ["c040cae"]}, "the token's sha claim is not text"),
    ],
    ids=[
        "other-issuer",
        "no-issuer",
        "other-audience",
        "audience-list-without-ours",
        "no-audience",
        "other-repository",
        "same-name-other-owner",
        "other-repository-id",
        "no-repository-id",
        "push-event",
        "pull-request-target-event",
        "other-workflow-file",
        "same-path-in-another-repository",
        "path-that-only-starts-like-ours",
        "no-ref",
        "no-at-ref",
        "no-run-id",
        "sha-not-text",
    ],
)
async def test_a_token_whose_claims_do_not_match_is_rejected(
    verifier: OidcVerifier,
    issuer: FakeOidcIssuer,
    clock: ManualClock,
    overrides: dict[str, Any],
    reason: str,
) -> None:
    error = await rejected(verifier, github_token(issuer, clock, **overrides))
    assert reason in error.reason
    assert error.status == 401 and not error.unreachable


async def test_a_token_from_another_run_is_rejected_when_the_run_is_named(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    policy = OidcPolicy(
        audience="update-pipeline",
        repository="acme/runners",
        repository_id="424242",
        workflow="canary.yml",
        run_id="22259804325",
    )
    error = await rejected(verifier, github_token(issuer, clock), policy)
    assert error.reason == "the token is not from the run 22259804325"


# -- time --------------------------------------------------------------------------------


async def test_a_token_is_good_until_its_expiry_plus_the_leeway(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    token = github_token(issuer, clock)  # expires in 5 minutes
    clock.advance(timedelta(minutes=5) + LEEWAY - timedelta(seconds=1))
    await verifier.verify(token, POLICY)

    clock.advance(timedelta(seconds=2))
    error = await rejected(verifier, token)
    assert error.reason.startswith("the token expired at 2026-03-01T12:05:00.000Z")


async def test_a_token_is_not_good_before_its_not_before_time_minus_the_leeway(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    now = int(clock.now().timestamp())
    early = github_token(issuer, clock, nbf=now + 120, iat=now, exp=now + 600)
    error = await rejected(verifier, early)
    assert error.reason == "the token is not valid before 2026-03-01T12:02:00.000Z"

    clock.advance(timedelta(minutes=2) - LEEWAY)
    await verifier.verify(early, POLICY)


async def test_a_token_issued_in_the_future_is_rejected(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    now = int(clock.now().timestamp())
    error = await rejected(verifier, github_token(issuer, clock, iat=now + 120, exp=now + 600))
    assert "issued in the future" in error.reason


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": None}, "the token has no exp claim"),
        ({"iat": None}, "the token has no iat claim"),
        ({"exp": "tomorrow"}, "the token's exp claim is not a time"),
        ({"exp": True}, "the token's exp claim is not a time"),
        ({"nbf": [1]}, "the token's nbf claim is not a time"),
    ],
)
async def test_a_token_without_usable_times_is_rejected(
    verifier: OidcVerifier,
    issuer: FakeOidcIssuer,
    clock: ManualClock,
    overrides: dict[str, Any],
    reason: str,
) -> None:
    error = await rejected(verifier, github_token(issuer, clock, **overrides))
    assert error.reason == reason


async def test_an_infinite_expiry_is_not_a_time(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    # Python's JSON (pyjwt's too) reads the non-standard Infinity.
    token = github_token(issuer, clock, exp=float("inf"))
    error = await rejected(verifier, token)
    assert error.reason == "the token's exp claim is not a time"


# -- signatures and algorithms -----------------------------------------------------------


async def test_a_token_signed_by_another_key_under_the_issuers_key_id_is_rejected(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    forged = issuer.mint(issuer.claims(clock.now()), key=spare_key(kid=issuer.key.kid))
    error = await rejected(verifier, forged)
    assert error.reason == "the token's signature does not verify"


async def test_a_token_with_a_tampered_payload_is_rejected(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    head, _, signature = github_token(issuer, clock).split(".")
    other = unsigned({}, issuer.claims(clock.now(), repository="acme/other")).split(".")[1]
    error = await rejected(verifier, f"{head}.{other}.{signature}")
    assert error.reason == "the token's signature does not verify"


async def test_an_unsigned_token_is_rejected_before_any_key_is_fetched(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    token = unsigned({"alg": "none", "typ": "JWT", "kid": "key-1"}, issuer.claims(clock.now()))
    error = await rejected(verifier, token)
    assert error.reason == "the token is signed with 'none' algorithm; only RS256 is accepted"
    assert issuer.requests == []


async def test_an_hmac_token_keyed_with_the_issuers_public_key_is_rejected(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    public_pem = issuer.key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = sign_hs256({"kid": "key-1", "typ": "JWT"}, issuer.claims(clock.now()), public_pem)
    error = await rejected(verifier, token)
    assert error.reason == "the token is signed with 'HS256' algorithm; only RS256 is accepted"


async def test_an_unknown_algorithm_name_is_not_repeated(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    token = unsigned({"alg": "<script>", "kid": "key-1"}, issuer.claims(clock.now()))
    error = await rejected(verifier, token)
    assert error.reason == "the token is signed with another algorithm; only RS256 is accepted"


async def test_a_token_without_a_key_id_is_rejected(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    token = issuer.mint(issuer.claims(clock.now()))
    head = unsigned({"alg": "RS256", "typ": "JWT"}, {}).split(".")[0]
    error = await rejected(verifier, head + token[token.index(".") :])
    assert error.reason == "the token names no usable key id"


async def test_an_oversized_token_is_rejected_unread(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    padded = github_token(issuer, clock, padding="x" * MAX_TOKEN_BYTES)
    error = await rejected(verifier, padded)
    assert error.reason == f"the token is longer than {MAX_TOKEN_BYTES} bytes"
    assert issuer.requests == []


@pytest.mark.parametrize(
    "garbage",
    ["", "garbage", "a.b.c", "a.b", "....", "eyJhbGciOiJSUzI1NiJ9.e30", "Bearer x.y.z", "é.é.é"],
)
async def test_garbage_is_not_a_jwt(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, garbage: str
) -> None:
    error = await rejected(verifier, garbage)
    assert error.reason in ("no token", "the token is not a JWT")
    assert issuer.requests == []


async def test_a_token_whose_payload_is_not_json_is_rejected(
    verifier: OidcVerifier, issuer: FakeOidcIssuer
) -> None:
    # Signed properly, so the only problem is the payload.
    token = jwt.api_jws.encode(
        b"not json", issuer.key.private, algorithm="RS256", headers={"kid": issuer.key.kid}
    )
    error = await rejected(verifier, token)
    assert error.reason == "the token is not a valid JWT"


# -- keys: unknown ids, rotation ---------------------------------------------------------


async def test_an_unknown_key_id_refetches_the_keys_at_most_once_a_minute(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    await verifier.verify(github_token(issuer, clock), POLICY)
    assert issuer.requests == [DISCOVERY, JWKS]
    clock.advance(MINUTE)

    def made_up_kid(kid: str) -> str:
        return issuer.mint(issuer.claims(clock.now()), key=spare_key(kid))

    error = await rejected(verifier, made_up_kid("random-1"))
    assert error.reason == "the token's key id is not among the issuer's keys"
    assert issuer.requests == [DISCOVERY, JWKS] * 2  # maybe the issuer rotated: asked again

    for n in range(2, 20):  # a flood of made-up key ids within the minute
        await rejected(verifier, made_up_kid(f"random-{n}"))
    assert issuer.requests == [DISCOVERY, JWKS] * 2

    clock.advance(MINUTE)
    await rejected(verifier, made_up_kid("random-20"))
    assert issuer.requests == [DISCOVERY, JWKS] * 3


async def test_a_rotated_key_is_accepted_after_a_refetch_and_the_dropped_one_is_not(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    old_token = github_token(issuer, clock)
    await verifier.verify(old_token, POLICY)
    clock.advance(MINUTE)

    issuer.rotate()
    new_token = github_token(issuer, clock)
    claims = await verifier.verify(new_token, POLICY)

    assert claims.repository == "acme/runners"
    assert issuer.requests == [DISCOVERY, JWKS] * 2
    error = await rejected(verifier, old_token)
    assert error.reason == "the token's key id is not among the issuer's keys"


async def test_keys_that_cannot_sign_rs256_tokens_are_ignored(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    hmac_key = {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}
    encryption_key = {**spare_key("enc").jwk(), "use": "enc"}
    issuer.extra_jwks = [hmac_key, encryption_key, {"kty": "RSA", "kid": "broken", "n": "?"}]
    await verifier.verify(github_token(issuer, clock), POLICY)
    token = issuer.mint(issuer.claims(clock.now()), key=spare_key("enc"))
    error = await rejected(verifier, token)
    assert error.reason == "the token's key id is not among the issuer's keys"


# -- the issuer down or broken -----------------------------------------------------------


async def test_an_issuer_that_answers_with_errors_is_unavailable_not_a_bad_token(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    issuer.fail_with = 503
    token = github_token(issuer, clock)

    with pytest.raises(OidcIssuerUnavailable) as caught:
        await verifier.verify(token, POLICY)

    error = caught.value
    assert error.unreachable and error.status == 503
    assert error.reason == f"cannot fetch the issuer's keys: {issuer.url}{DISCOVERY} answered 503"


async def test_an_issuer_nobody_answers_for_is_unavailable(
    session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    async with FakeOidcIssuer() as issuer:
        url = issuer.url
        token = github_token(issuer, clock)
    verifier = OidcVerifier(url, session, clock)  # nothing listens there any more

    with pytest.raises(OidcIssuerUnavailable) as caught:
        await verifier.verify(token, POLICY)
    assert caught.value.reason.startswith(f"cannot fetch the issuer's keys: {url}{DISCOVERY}: ")
    assert "ClientConnectorError" in caught.value.reason
    assert token not in caught.value.reason


async def test_the_issuer_is_not_hammered_while_down_and_is_used_again_once_back(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    issuer.fail_with = 500
    for _ in range(5):
        with pytest.raises(OidcIssuerUnavailable):
            await verifier.verify(github_token(issuer, clock), POLICY)
    assert issuer.requests == [DISCOVERY]

    issuer.fail_with = None
    clock.advance(MINUTE)
    await verifier.verify(github_token(issuer, clock), POLICY)
    assert issuer.requests == [DISCOVERY, DISCOVERY, JWKS]


@pytest.mark.parametrize(
    ("discovery", "reason"),
    [
        ({"issuer": GITHUB_ACTIONS_ISSUER}, "names another issuer"),
        ({"jwks_uri": None}, "has no jwks_uri"),
        (
            {"jwks_uri": "http://keys.example.com/jwks"},
            "jwks_uri http://keys.example.com/jwks: http is allowed only to a loopback",
        ),
        ({"jwks_uri": "/.well-known/jwks"}, "not an absolute URL"),
    ],
    ids=["other-issuer", "no-jwks-uri", "jwks-over-plain-http", "relative-jwks-uri"],
)
async def test_a_broken_discovery_document_makes_the_issuer_unavailable(
    verifier: OidcVerifier,
    issuer: FakeOidcIssuer,
    clock: ManualClock,
    discovery: dict[str, Any],
    reason: str,
) -> None:
    issuer.discovery = discovery
    with pytest.raises(OidcIssuerUnavailable) as caught:
        await verifier.verify(github_token(issuer, clock), POLICY)
    assert caught.value.reason.startswith("cannot fetch the issuer's keys: ")
    assert reason in caught.value.reason


async def test_a_key_set_without_rs256_keys_makes_the_issuer_unavailable(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    token = github_token(issuer, clock)
    issuer.keys = []
    issuer.extra_jwks = [{"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"}]
    with pytest.raises(OidcIssuerUnavailable) as caught:
        await verifier.verify(token, POLICY)
    assert caught.value.reason.endswith(f"{issuer.url}{JWKS} lists no RS256 signing key")


async def test_the_keys_may_be_served_through_a_redirect_to_a_safe_url(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    issuer.discovery = {"jwks_uri": f"{issuer.url}/redirect?to={issuer.url}{JWKS}"}
    await verifier.verify(github_token(issuer, clock), POLICY)
    assert issuer.requests == [DISCOVERY, "/redirect", JWKS]


@pytest.mark.parametrize(
    ("to", "reason"),
    [
        (
            "http://keys.example.com/jwks",
            "redirected to http://keys.example.com/jwks: http is allowed only to a loopback",
        ),
        ("", "/redirect redirected more than 3 times"),
    ],
    ids=["to-plain-http", "in-a-loop"],
)
async def test_a_redirect_to_plain_http_or_in_a_loop_is_not_followed(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock, to: str, reason: str
) -> None:
    issuer.discovery = {"jwks_uri": f"{issuer.url}/redirect" + (f"?to={to}" if to else "")}
    with pytest.raises(OidcIssuerUnavailable) as caught:
        await verifier.verify(github_token(issuer, clock), POLICY)
    assert reason in caught.value.reason


# -- concurrency -------------------------------------------------------------------------


async def until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def test_concurrent_verifies_share_one_fetch_of_the_keys(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    issuer.hold = asyncio.Event()
    tokens = [github_token(issuer, clock, run_id=str(n)) for n in range(10)]
    tasks = [asyncio.create_task(verifier.verify(t, POLICY)) for t in tokens]
    await until(lambda: JWKS in issuer.requests)

    issuer.hold.set()
    results = await asyncio.gather(*tasks)

    assert [c.run_id for c in results] == [str(n) for n in range(10)]
    assert issuer.requests == [DISCOVERY, JWKS]


async def test_a_caller_that_gives_up_does_not_cancel_the_fetch_others_wait_on(
    verifier: OidcVerifier, issuer: FakeOidcIssuer, clock: ManualClock
) -> None:
    issuer.hold = asyncio.Event()
    impatient = asyncio.create_task(verifier.verify(github_token(issuer, clock), POLICY))
    patient = asyncio.create_task(verifier.verify(github_token(issuer, clock), POLICY))
    await until(lambda: JWKS in issuer.requests)

    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    issuer.hold.set()

    assert (await patient).repository == "acme/runners"
    assert issuer.requests == [DISCOVERY, JWKS]


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        GITHUB_ACTIONS_ISSUER,
        "https://ghes.example.com/_services/token",
        "http://127.0.0.1:8081",
        "http://[::1]:8081",
    ],
)
def test_an_issuer_is_https_or_on_a_loopback_address(
    session: aiohttp.ClientSession, clock: ManualClock, url: str
) -> None:
    assert OidcVerifier(url, session, clock).issuer == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://token.actions.githubusercontent.com", "http is allowed only to a loopback"),
        ("http://localhost:8081", "http is allowed only to a loopback IP address"),
        ("http://10.0.0.1", "http is allowed only to a loopback"),
        ("ftp://token.example.com", "must be an https URL"),
        ("token.actions.githubusercontent.com", "not an absolute URL"),
        ("https://issuer.example.com/?tenant=1", "has no query or fragment"),
        ("https://user:pass@issuer.example.com", "must not carry credentials"),
    ],
)
def test_an_issuer_over_plain_http_elsewhere_is_refused(
    session: aiohttp.ClientSession, clock: ManualClock, url: str, problem: str
) -> None:
    with pytest.raises(ValueError, match="OIDC issuer") as caught:
        OidcVerifier(url, session, clock)
    assert problem in str(caught.value)


def test_settings_can_check_an_issuer_without_building_a_verifier() -> None:
    assert issuer_problem(GITHUB_ACTIONS_ISSUER) is None
    assert issuer_problem("http://127.0.0.1:8081") is None
    assert issuer_problem("http://issuer.example.com") == (
        "http is allowed only to a loopback IP address such as 127.0.0.1; use https"
    )


def test_the_discovery_document_is_looked_for_under_the_issuer(
    session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    verifier = OidcVerifier(GITHUB_ACTIONS_ISSUER, session, clock)
    assert verifier.discovery_url == (
        "https://token.actions.githubusercontent.com/.well-known/openid-configuration"
    )


@pytest.mark.parametrize(
    ("workflow", "path"),
    [
        ("canary.yml", ".github/workflows/canary.yml"),
        ("canary.yaml", ".github/workflows/canary.yaml"),
        (".github/workflows/canary.yml", ".github/workflows/canary.yml"),
    ],
)
def test_a_policy_names_a_workflow_by_file_or_path(workflow: str, path: str) -> None:
    policy = OidcPolicy(
        audience="a", repository="acme/runners", repository_id=None, workflow=workflow
    )
    assert policy.workflow_path == path == workflow_path(workflow)


@pytest.mark.parametrize(
    "changes",
    [
        {"workflow": "canary"},
        {"workflow": ""},
        {"workflow": "ci/canary.yml"},
        {"workflow": ".github/workflows/nested/canary.yml"},
        {"workflow": "canary.yml@refs/heads/main"},
        {"repository": "runners"},
        {"repository": "acme/runners/extra"},
        {"audience": ""},
    ],
)
def test_a_policy_that_cannot_match_a_real_run_is_refused(changes: dict[str, str]) -> None:
    fields: dict[str, Any] = {
        "audience": "a",
        "repository": "acme/runners",
        "repository_id": None,
        "workflow": "canary.yml",
    }
    with pytest.raises(ValueError):
        OidcPolicy(**{**fields, **changes})
