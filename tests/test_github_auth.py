"""App authentication: the private key, App JWTs, and cached installation tokens."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import logging
import pickle
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from gidgethub import BadRequest

from app.clock import ManualClock
from app.config import ConfigError, Secret, Settings
from app.github.app import GitHubApp
from app.github.auth import AppAuth
from app.github.keys import PrivateKey, load_private_key
from tests.fake_github import FakeGitHub

APP_ID = 424242


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL
        if isinstance(key, rsa.RSAPrivateKey)
        else serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PEM = _pem(_RSA)
PUBLIC_PEM = (
    _RSA.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
EC_PEM = _pem(ec.generate_private_key(ec.SECP256R1()))
ENCRYPTED_PEM = _RSA.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(b"passphrase"),
).decode()


def pem_body_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


# -- The private key ------------------------------------------------------------------


def test_the_key_shows_only_the_fingerprint_github_displays() -> None:
    key = PrivateKey(RSA_PEM)
    der = _RSA.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode()

    assert key.fingerprint == expected
    assert repr(key) == str(key) == f"PrivateKey({expected})"
    assert f"{key}" == f"{key!r}" == f"PrivateKey({expected})"
    for text in (repr(key), str(key), repr([key]), repr({"key": key})):
        assert "PRIVATE KEY" not in text
        assert not any(line in text for line in pem_body_lines(RSA_PEM))


def test_logging_the_key_writes_only_its_fingerprint(caplog: pytest.LogCaptureFixture) -> None:
    key = PrivateKey(RSA_PEM)
    with caplog.at_level(logging.INFO):
        logging.getLogger("test.keys").info("key %s / %r", key, key)
    assert caplog.messages == [f"key {key} / {key}"]
    assert "PRIVATE KEY" not in caplog.text


@pytest.mark.parametrize(
    "copier",
    [pickle.dumps, copy.copy, copy.deepcopy],
    ids=["pickle", "copy", "deepcopy"],
)
def test_the_key_cannot_be_pickled_or_copied_out(copier: Callable[[Any], Any]) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        copier(PrivateKey(RSA_PEM))


def test_the_key_has_no_attribute_dict_to_dump() -> None:
    key = PrivateKey(RSA_PEM)
    with pytest.raises(TypeError):
        vars(key)


@pytest.mark.parametrize(
    "pem",
    [
        "not a key at all",
        "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        # A real key with its body damaged: the error must not echo what is left of it.
        RSA_PEM.replace(pem_body_lines(RSA_PEM)[3], "!!!!"),
        RSA_PEM[: len(RSA_PEM) // 2],
        PUBLIC_PEM,
        ENCRYPTED_PEM,
    ],
    ids=["text", "empty-body", "damaged", "truncated", "public-key", "encrypted"],
)
def test_a_malformed_key_is_a_config_error_naming_its_source(pem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PrivateKey(pem, source="GITHUB_PRIVATE_KEY")
    (problem,) = caught.value.problems
    assert problem.startswith("GITHUB_PRIVATE_KEY: not a PEM private key")
    assert not any(line in str(caught.value) for line in pem_body_lines(RSA_PEM))


def test_a_key_that_is_not_rsa_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        PrivateKey(EC_PEM, source="GITHUB_PRIVATE_KEY")
    (problem,) = caught.value.problems
    assert problem.startswith("GITHUB_PRIVATE_KEY: ")
    assert "RSA" in problem


def test_load_private_key_names_the_variables_when_the_key_is_bad() -> None:
    settings = Settings(github_app_id=1, github_private_key=Secret(EC_PEM))
    with pytest.raises(ConfigError) as caught:
        load_private_key(settings)
    assert caught.value.problems[0].startswith("GITHUB_PRIVATE_KEY")


def test_load_private_key_accepts_a_key_with_literal_backslash_n() -> None:
    one_line = RSA_PEM.strip().replace("\n", "\\n")
    assert "\n" not in one_line
    settings = Settings.from_env({"GITHUB_APP_ID": str(APP_ID), "GITHUB_PRIVATE_KEY": one_line})

    key = load_private_key(settings)

    assert key is not None
    assert key.fingerprint == PrivateKey(RSA_PEM).fingerprint


def test_load_private_key_reads_the_key_file(tmp_path: Path) -> None:
    path = tmp_path / "app.pem"
    path.write_text(RSA_PEM)
    settings = Settings.from_env(
        {"GITHUB_APP_ID": str(APP_ID), "GITHUB_PRIVATE_KEY_PATH": str(path)}
    )

    key = load_private_key(settings)

    assert key is not None
    assert key.fingerprint == PrivateKey(RSA_PEM).fingerprint


def test_no_key_configured_loads_as_none() -> None:
    assert load_private_key(Settings()) is None


# -- App JWTs ---------------------------------------------------------------------------


def decode(token: str) -> dict[str, Any]:
    # The clock is a ManualClock, not the wall clock: check the signature, not the times.
    return jwt.decode(
        token,
        PUBLIC_PEM,
        algorithms=["RS256"],
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )


def test_the_app_jwt_is_rs256_signed_with_backdated_iat_and_short_exp(
    clock: ManualClock,
) -> None:
    auth = AppAuth(APP_ID, PrivateKey(RSA_PEM), clock)
    token = auth.jwt()
    now = int(clock.now().timestamp())

    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    claims = decode(token)
    assert claims["iss"] == str(APP_ID)
    assert claims["iat"] == now - 60
    assert now < claims["exp"] <= now + 600


async def test_the_app_jwt_is_reused_until_a_minute_before_it_expires(
    clock: ManualClock,
) -> None:
    auth = AppAuth(APP_ID, PrivateKey(RSA_PEM), clock)
    first = auth.jwt()
    exp = decode(first)["exp"]
    assert await auth.authorization() == f"Bearer {first}"

    # Just over a minute before exp: still the same token.
    clock.advance(timedelta(seconds=exp - clock.now().timestamp() - 61))
    assert auth.jwt() == first

    # Within a minute of exp: a new one, again valid for the full lifetime.
    clock.advance(timedelta(seconds=1))
    second = auth.jwt()
    assert second != first
    now = int(clock.now().timestamp())
    assert decode(second)["iat"] == now - 60
    assert now < decode(second)["exp"] <= now + 600
    assert decode(second)["exp"] - now > 60


async def test_a_rejected_jwt_is_replaced_only_if_it_is_the_current_one(
    clock: ManualClock,
) -> None:
    auth = AppAuth(APP_ID, PrivateKey(RSA_PEM), clock)
    current = await auth.authorization()
    clock.advance(timedelta(seconds=1))

    assert not await auth.rejected("Bearer some-older-token")
    assert await auth.authorization() == current

    assert await auth.rejected(current)
    assert await auth.authorization() != current


# -- Installation access tokens, against the fake GitHub -------------------------------

ACCESS_TOKENS = "POST /app/installations/{installation_id}/access_tokens"
GET_TOPICS = "GET /repos/{owner}/{repo}/topics"
TOPICS = "/repos/acme/runner/topics"


def authorizations(github: FakeGitHub, pattern: str) -> list[str]:
    return [c.headers.get("Authorization", "") for c in github.calls(pattern)]


def statuses(github: FakeGitHub, pattern: str) -> list[int | None]:
    return [c.status for c in github.calls(pattern)]


async def test_the_token_is_fetched_with_the_app_jwt_and_then_cached(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    first = await app_github.tokens.get(installation)
    second = await app_github.tokens.get(installation)

    assert first == second == github.token_for(installation)
    (fetch,) = github.calls(ACCESS_TOKENS)
    assert fetch.status == 201
    assert fetch.params["installation_id"] == str(installation)
    scheme, _, token = fetch.headers["Authorization"].partition(" ")
    assert scheme.lower() == "bearer"
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == str(github.app_id)


async def test_installation_requests_carry_the_cached_token(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    client = app_github.installation(installation)
    for _ in range(3):
        topics = await client.getitem(
            "/repos/{owner}/{repo}/topics", {"owner": "acme", "repo": "runner"}
        )
        assert topics == {"names": ["runner"]}

    assert len(github.calls(ACCESS_TOKENS)) == 1
    token = github.token_for(installation)
    assert authorizations(github, GET_TOPICS) == [f"token {token}"] * 3
    assert {c.installation_id for c in github.calls(GET_TOPICS)} == {installation}


async def test_the_token_is_refreshed_five_minutes_before_it_expires(
    github: FakeGitHub, app_github: GitHubApp, installation: int, clock: ManualClock
) -> None:
    first = await app_github.tokens.get(installation)  # the fake: valid for one hour

    clock.advance(timedelta(minutes=54, seconds=59))
    assert await app_github.tokens.get(installation) == first
    assert len(github.calls(ACCESS_TOKENS)) == 1

    clock.advance(timedelta(seconds=1))
    second = await app_github.tokens.get(installation)
    assert second != first
    assert statuses(github, ACCESS_TOKENS) == [201, 201]

    # The App JWT that asked for it was renewed too: the fake accepted it first time.
    clock.advance(timedelta(minutes=55))
    assert await app_github.tokens.get(installation) not in (first, second)
    assert statuses(github, ACCESS_TOKENS) == [201, 201, 201]


async def test_a_token_the_fake_has_expired_early_is_replaced_on_the_401(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    client = app_github.installation(installation)
    await client.getitem(TOPICS)
    github.expire_tokens()

    assert await client.getitem(TOPICS) == {"names": ["runner"]}
    # 304: the ETag of the first answer still holds, and the new token was accepted.
    assert statuses(github, GET_TOPICS) == [200, 401, 304]
    assert len(github.calls(ACCESS_TOKENS)) == 2


async def test_fifty_concurrent_callers_share_one_token_request(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    github.inject(ACCESS_TOKENS, status=None, delay=0.05)  # slow, so all 50 overlap it

    tokens = await asyncio.gather(*(app_github.tokens.get(installation) for _ in range(50)))

    assert set(tokens) == {github.token_for(installation)}
    assert len(github.calls(ACCESS_TOKENS)) == 1
    assert app_github.tokens.fetches == 1


async def test_fifty_concurrent_requests_of_a_new_installation_fetch_one_token(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    github.inject(ACCESS_TOKENS, status=None, delay=0.05)
    client = app_github.installation(installation)

    answers = await asyncio.gather(*(client.getitem(TOPICS) for _ in range(50)))

    assert all(a == {"names": ["runner"]} for a in answers)
    assert len(github.calls(ACCESS_TOKENS)) == 1
    assert statuses(github, GET_TOPICS) == [200] * 50


async def test_a_caller_giving_up_does_not_cancel_the_fetch_others_wait_on(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    github.inject(ACCESS_TOKENS, status=None, delay=0.2)
    impatient = asyncio.create_task(app_github.tokens.get(installation))
    patient = asyncio.create_task(app_github.tokens.get(installation))
    await asyncio.sleep(0.05)

    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    token = await patient

    assert token == github.token_for(installation)
    assert len(github.calls(ACCESS_TOKENS)) == 1


async def test_a_fetch_whose_only_caller_gave_up_still_fills_the_cache(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    github.inject(ACCESS_TOKENS, status=None, delay=0.1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(app_github.tokens.get(installation), 0.02)

    assert await app_github.tokens.get(installation) == github.token_for(installation)
    assert len(github.calls(ACCESS_TOKENS)) == 1


async def test_a_revoked_token_is_dropped_and_the_request_retried_once_with_a_new_one(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    client = app_github.installation(installation)
    await client.getitem(TOPICS)
    old = github.token_for(installation)
    github.revoke_token(old)

    topics = await client.getitem(TOPICS)

    new = github.token_for(installation)
    assert topics == {"names": ["runner"]} and new != old
    assert statuses(github, GET_TOPICS) == [200, 401, 304]
    assert authorizations(github, GET_TOPICS) == [f"token {old}", f"token {old}", f"token {new}"]
    assert await app_github.tokens.get(installation) == new
    assert len(github.calls(ACCESS_TOKENS)) == 2


async def test_concurrent_requests_that_all_meet_the_revoked_token_all_recover(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    client = app_github.installation(installation)
    await client.getitem(TOPICS)
    github.revoke_token(github.token_for(installation))

    answers = await asyncio.gather(*(client.getitem(TOPICS) for _ in range(5)))

    assert all(a == {"names": ["runner"]} for a in answers)
    assert sorted(statuses(github, GET_TOPICS)) == [200] + [304] * 5 + [401] * 5
    assert len(github.calls(ACCESS_TOKENS)) == 2


async def test_a_second_401_is_an_error_and_not_a_loop(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    client = app_github.installation(installation)
    await app_github.tokens.get(installation)
    github.inject(GET_TOPICS, status=401, times=None, body={"message": "Bad credentials"})

    with pytest.raises(BadRequest) as caught:
        await client.getitem(TOPICS)

    assert caught.value.status_code == 401
    assert statuses(github, GET_TOPICS) == [401, 401]
    assert len(github.calls(ACCESS_TOKENS)) == 2
