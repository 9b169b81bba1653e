"""The fake GitHub itself: authentication, state, pagination, faults and conformance."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from app.clock import ManualClock
from tests.fake_github import APP_ID, HANDLERS, FakeGitHub, example, response_problems

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
TOKENS = "POST /app/installations/{installation_id}/access_tokens"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"User-Agent": "fake-github-tests", "Accept": "application/vnd.github+json"}
    async with aiohttp.ClientSession(headers=headers) as session:
        yield session


@cache
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def app_jwt(
    github: FakeGitHub,
    *,
    key: Any = None,
    iat: float = -60,
    exp: float = 540,
    iss: Any = None,
) -> str:
    """A JWT made with pyjwt, times relative to the fake's clock."""
    now = int(github.now().timestamp())
    claims = {"iat": now + int(iat), "exp": now + int(exp), "iss": iss or str(github.app_id)}
    # PyJWS: pyjwt's encode() insists on a string iss, and GitHub also takes an integer.
    payload = json.dumps(claims).encode()
    return jwt.PyJWS().encode(payload, key or github.private_key_pem, algorithm="RS256")


async def send(
    http: aiohttp.ClientSession,
    github: FakeGitHub,
    method: str,
    path: str,
    *,
    auth: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """(status, headers, JSON body or None); ``path`` may also be a full URL."""
    all_headers = dict(headers or {})
    if auth:
        all_headers["Authorization"] = auth
    url = path if path.startswith("http") else github.url + path
    async with http.request(method, url, json=body, headers=all_headers) as response:
        data = await response.read()
        return response.status, response.headers, json.loads(data) if data else None


async def token(http: aiohttp.ClientSession, github: FakeGitHub, installation: int) -> str:
    status, _, body = await send(
        http,
        github,
        "POST",
        f"/app/installations/{installation}/access_tokens",
        auth=f"Bearer {app_jwt(github)}",
        body={},
    )
    assert status == 201, body
    return f"token {body['token']}"


def checked(key: str, status: int, body: Any) -> Any:
    """``body``, after asserting it is what the subset documents for this answer."""
    problems = response_problems(key, status, body)
    assert problems == [], f"{key} {status}: {problems}"
    return body


# -- App authentication --------------------------------------------------------------------


async def test_a_valid_app_jwt_is_accepted(http, github):
    status, _, body = await send(http, github, "GET", "/app", auth=f"Bearer {app_jwt(github)}")
    assert status == 200
    assert checked("GET /app", 200, body)["id"] == APP_ID == github.app_id
    # Clock drift: GitHub tolerates an iat up to a minute ahead, and an integer iss.
    drift = app_jwt(github, iat=30, exp=500, iss=github.app_id)
    assert (await send(http, github, "GET", "/app", auth=f"Bearer {drift}"))[0] == 200


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda g: app_jwt(g, key=other_key()), "could not be decoded"),
        (lambda g: app_jwt(g, iat=-700, exp=-100), "'exp'"),
        (lambda g: app_jwt(g, iat=-60, exp=600), "too far in the future"),
        (lambda g: app_jwt(g, iat=120, exp=500), "'iat'"),
        (lambda g: app_jwt(g, iss="4243"), "'iss'"),
        (lambda g: "not.a.jwt", "could not be decoded"),
    ],
    ids=["wrong-key", "expired", "exp-too-far", "iat-in-future", "wrong-iss", "garbage"],
)
async def test_a_bad_app_jwt_is_refused(http, github, make, message):
    status, _, body = await send(http, github, "GET", "/app", auth=f"Bearer {make(github)}")
    assert status == 401
    assert message in body["message"] and body["documentation_url"].startswith("https://")


async def test_app_routes_take_only_a_jwt(http, github):
    installation = github.add_installation(repos=["acme/runner"])
    assert (await send(http, github, "GET", "/app/installations"))[0] == 401
    auth = await token(http, github, installation)
    assert (await send(http, github, "GET", "/app/installations", auth=auth))[0] == 401
    # ... and the other routes only an installation token.
    jwt_auth = f"Bearer {app_jwt(github)}"
    assert (await send(http, github, "GET", "/installation/repositories", auth=jwt_auth))[0] == 401


# -- Installation tokens -------------------------------------------------------------------


async def test_tokens_are_issued_used_and_refused_once_revoked_or_expired(
    http, github, clock: ManualClock
):
    installation = github.add_installation(account="acme", repos=["acme/runner"])
    status, _, body = await send(
        http,
        github,
        "POST",
        f"/app/installations/{installation}/access_tokens",
        auth=f"Bearer {app_jwt(github)}",
        body={},
    )
    assert status == 201
    checked(TOKENS, 201, body)
    value = body["token"]
    assert value.startswith("ghs_") and len(value) == 40
    assert body["expires_at"] == (clock.now() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert github.token_for(installation) == value

    for auth in (f"token {value}", f"Bearer {value}"):
        status, _, listing = await send(
            http, github, "GET", "/installation/repositories", auth=auth
        )
        assert status == 200
        assert [r["full_name"] for r in listing["repositories"]] == ["acme/runner"]
    assert github.last("GET /installation/repositories").installation_id == installation

    github.revoke_token(value)
    assert (await send(http, github, "GET", "/installation/repositories", auth=f"token {value}"))[
        0
    ] == 401
    second = await token(http, github, installation)
    clock.advance(timedelta(minutes=61))
    assert (await send(http, github, "GET", "/installation/repositories", auth=second))[0] == 401
    third = await token(http, github, installation)
    github.expire_tokens()
    assert (await send(http, github, "GET", "/installation/repositories", auth=third))[0] == 401


async def test_tokens_for_unknown_or_suspended_installations_are_refused(http, github):
    suspended = github.add_installation(account="quiet", repos=["quiet/x"], suspended=True)
    jwt_auth = f"Bearer {app_jwt(github)}"
    status, _, body = await send(
        http, github, "POST", "/app/installations/999999/access_tokens", auth=jwt_auth, body={}
    )
    assert (status, body["message"]) == (404, "Not Found")
    status, _, body = await send(
        http, github, "POST", f"/app/installations/{suspended}/access_tokens", auth=jwt_auth
    )
    assert status == 403 and "suspended" in body["message"]
    status, _, body = await send(
        http, github, "GET", f"/app/installations/{suspended}", auth=jwt_auth
    )
    assert checked("GET /app/installations/{installation_id}", 200, body)["suspended_at"]


async def test_a_token_reaches_only_its_installations_repositories(http, github):
    acme = github.add_installation(account="acme", repos=["acme/runner", "acme/docs"])
    github.add_installation(account="other", repos=["other/secret"])
    for private in ("acme/runner", "other/secret"):
        github.repo(private).private = True
    github.add_issue("acme/runner", "ours")
    github.add_issue("other/secret", "theirs")
    auth = await token(http, github, acme)

    assert (await send(http, github, "GET", "/repos/acme/runner/issues/1", auth=auth))[0] == 200
    assert (await send(http, github, "GET", "/repos/ACME/Runner/issues/1", auth=auth))[0] == 200
    status, _, body = await send(http, github, "GET", "/repos/other/secret/issues/1", auth=auth)
    assert (status, body["message"]) == (404, "Not Found")
    assert (await send(http, github, "GET", "/repos/acme/nope/issues/1", auth=auth))[0] == 404

    # A token narrowed to some repositories at issuance sees only those.
    status, _, body = await send(
        http,
        github,
        "POST",
        f"/app/installations/{acme}/access_tokens",
        auth=f"Bearer {app_jwt(github)}",
        body={"repositories": ["docs"]},
    )
    assert status == 201 and [r["full_name"] for r in body["repositories"]] == ["acme/docs"]
    narrow = f"token {body['token']}"
    assert (await send(http, github, "GET", "/repos/acme/runner/issues/1", auth=narrow))[0] == 404


async def test_any_token_reads_a_public_repository_but_writes_only_where_installed(http, github):
    acme = github.add_installation(account="acme", repos=["acme/runner"])
    github.add_installation(account="openai", repos=["openai/codex"])
    github.add_release("openai/codex", "v1.0.0")
    auth = await token(http, github, acme)

    status, _, body = await send(http, github, "GET", "/repos/openai/codex/releases", auth=auth)
    assert status == 200 and body[0]["tag_name"] == "v1.0.0"
    status, _, body = await send(
        http, github, "POST", "/repos/openai/codex/issues", auth=auth, body={"title": "x"}
    )
    assert (status, body["message"]) == (403, "Resource not accessible by integration")


# -- Pagination ----------------------------------------------------------------------------


async def test_installation_repositories_are_paginated_with_githubs_link_header(http, github):
    installation = github.add_installation(repos=[f"acme/r{i}" for i in range(5)])
    auth = await token(http, github, installation)
    base = f"{github.url}/installation/repositories"

    status, headers, body = await send(
        http, github, "GET", "/installation/repositories?per_page=2", auth=auth
    )
    assert status == 200 and body["total_count"] == 5
    assert [r["full_name"] for r in body["repositories"]] == ["acme/r0", "acme/r1"]
    assert headers["Link"] == (
        f'<{base}?per_page=2&page=2>; rel="next", <{base}?per_page=2&page=3>; rel="last"'
    )
    checked("GET /installation/repositories", 200, body)

    status, headers, body = await send(
        http, github, "GET", "/installation/repositories?per_page=2&page=2", auth=auth
    )
    assert headers["Link"] == (
        f'<{base}?per_page=2&page=1>; rel="prev", <{base}?per_page=2&page=3>; rel="next", '
        f'<{base}?per_page=2&page=3>; rel="last", <{base}?per_page=2&page=1>; rel="first"'
    )
    status, headers, body = await send(http, github, "GET", f"{base}?per_page=2&page=3", auth=auth)
    assert [r["full_name"] for r in body["repositories"]] == ["acme/r4"]
    assert 'rel="next"' not in headers["Link"] and 'rel="prev"' in headers["Link"]


async def test_app_installations_are_paginated(http, github):
    ids = [github.add_installation(account=f"org-{i}", repos=[f"org-{i}/r"]) for i in range(3)]
    auth = f"Bearer {app_jwt(github)}"
    seen, url = [], "/app/installations?per_page=2"
    while url:
        status, headers, body = await send(http, github, "GET", url, auth=auth)
        assert status == 200
        checked("GET /app/installations", 200, body)
        seen += [(i["id"], i["account"]["login"], i["target_type"]) for i in body]
        links = dict(
            (part.split(";")[1].strip()[5:-1], part.split(";")[0].strip()[1:-1])
            for part in headers.get("Link", "").split(",")
            if part
        )
        url = links.get("next")
    assert seen == [(ids[i], f"org-{i}", "Organization") for i in range(3)]
    assert len(github.calls("GET /app/installations")) == 2


# -- State: permissions, contents, issues --------------------------------------------------


@pytest.mark.parametrize(
    ("role", "permission"),
    [
        ("admin", "admin"),
        ("maintain", "write"),
        ("write", "write"),
        ("triage", "read"),
        ("read", "read"),
    ],
)
async def test_permission_is_derived_from_the_role_as_github_does(http, github, role, permission):
    installation = github.add_installation(repos=["acme/runner"])
    github.set_permission("acme/runner", "alice", role_name=role)
    auth = await token(http, github, installation)
    key = "GET /repos/{owner}/{repo}/collaborators/{username}/permission"

    status, _, body = await send(
        http, github, "GET", "/repos/acme/runner/collaborators/alice/permission", auth=auth
    )
    assert status == 200
    checked(key, 200, body)
    assert (body["permission"], body["role_name"], body["user"]["login"]) == (
        permission,
        role,
        "alice",
    )
    status, _, _ = await send(
        http, github, "GET", "/repos/acme/runner/collaborators/mallory/permission", auth=auth
    )
    assert status == 404


async def test_contents_come_base64_encoded_with_gits_sha(http, github):
    installation = github.add_installation(repos=["acme/runner"])
    text = "canary:\n  percent: 5\n" + "# a long comment line " * 5 + "\n"
    github.set_file("acme/runner", ".github/update-pipeline.yml", text)
    github.set_file("acme/runner", "hello.txt", "hello\n", ref="v2")
    auth = await token(http, github, installation)
    key = "GET /repos/{owner}/{repo}/contents/{path}"

    status, _, body = await send(
        http, github, "GET", "/repos/acme/runner/contents/.github/update-pipeline.yml", auth=auth
    )
    assert status == 200
    checked(key, 200, body)
    assert body["type"] == "file" and body["encoding"] == "base64"
    assert all(len(line) <= 60 for line in body["content"].splitlines())
    assert base64.b64decode(body["content"]).decode() == text
    assert body["url"].startswith(github.url)  # URLs in bodies lead back to the fake

    status, _, body = await send(
        http, github, "GET", "/repos/acme/runner/contents/hello.txt?ref=v2", auth=auth
    )
    assert body["sha"] == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object
    status, _, body = await send(
        http, github, "GET", "/repos/acme/runner/contents/hello.txt", auth=auth
    )
    assert (status, body["message"]) == (404, "Not Found")
    status, _, body = await send(
        http, github, "GET", "/repos/acme/runner/contents/.github", auth=auth
    )
    assert status == 200 and [(e["type"], e["name"]) for e in checked(key, 200, body)] == [
        ("file", "update-pipeline.yml")
    ]


async def test_requests_are_recorded(http, github):
    installation = github.add_installation(repos=["acme/runner"])
    issue = github.add_issue("acme/runner", "Roll out 1.2.3")
    auth = await token(http, github, installation)
    path = f"/repos/acme/runner/issues/{issue}/comments"
    await send(http, github, "POST", path, auth=auth, body={"body": "Stage 1 done"})

    (call,) = github.calls("POST /repos/{owner}/{repo}/issues/{issue_number}/comments")
    assert (call.method, call.path, call.status, call.json) == (
        "POST",
        path,
        201,
        {"body": "Stage 1 done"},
    )
    assert call.params == {"owner": "acme", "repo": "runner", "issue_number": str(issue)}
    assert call.headers["authorization"] == auth and call.installation_id == installation
    assert github.calls("POST /repos/acme/*/issues/*/comments") == [call]
    assert [c["body"] for c in github.repo("acme/runner").comments.values()] == ["Stage 1 done"]


# -- Faults --------------------------------------------------------------------------------


async def test_an_injected_status_answers_the_given_number_of_times(http, github):
    fault = github.inject("GET /app", status=502, times=2)
    auth = f"Bearer {app_jwt(github)}"
    statuses = [(await send(http, github, "GET", "/app", auth=auth))[0] for _ in range(3)]
    assert statuses == [502, 502, 200] and fault.hits == 2
    assert [c.status for c in github.calls("GET /app")] == [502, 502, 200]


async def test_an_injected_secondary_rate_limit_carries_the_given_headers(http, github):
    github.inject("POST /repos/*/issues", status=403, headers={"Retry-After": "30"})
    github.inject(
        "GET /app",
        status=403,
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1772370000"},
    )
    installation = github.add_installation(repos=["acme/runner"])
    auth = await token(http, github, installation)

    status, headers, body = await send(
        http, github, "POST", "/repos/acme/runner/issues", auth=auth, body={"title": "x"}
    )
    assert (status, headers["Retry-After"]) == (403, "30")
    assert "secondary rate limit" in body["message"]
    status, headers, _ = await send(http, github, "GET", "/app", auth=f"Bearer {app_jwt(github)}")
    assert (status, headers["X-RateLimit-Remaining"], headers["X-RateLimit-Reset"]) == (
        403,
        "0",
        "1772370000",
    )
    # Once spent, the faults are gone and the issue is created.
    status, _, _ = await send(
        http, github, "POST", "/repos/acme/runner/issues", auth=auth, body={"title": "x"}
    )
    assert status == 201


async def test_a_delay_makes_a_client_time_out_and_a_slow_answer_still_arrives(http, github):
    auth = f"Bearer {app_jwt(github)}"
    github.inject("GET /app", delay=5.0)
    with pytest.raises(TimeoutError):
        async with http.get(
            f"{github.url}/app",
            headers={"Authorization": auth},
            timeout=aiohttp.ClientTimeout(total=0.1),
        ):
            pass
    github.inject("GET /app", status=None, delay=0.05)  # slowness only
    assert (await send(http, github, "GET", "/app", auth=auth))[0] == 200


async def test_a_reset_closes_the_connection_unanswered(http, github):
    fault = github.inject("GET /rate_limit", reset=True, times=None)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send(http, github, "GET", "/rate_limit")
    assert fault.hits >= 1 and github.last("GET /rate_limit").status is None
    github.clear_faults()
    assert (await send(http, github, "GET", "/rate_limit"))[0] == 200


async def test_the_primary_rate_limit_counts_down_and_runs_out(http, github):
    installation = github.add_installation(repos=["acme/runner"])
    auth = await token(http, github, installation)
    _, first, _ = await send(http, github, "GET", "/installation/repositories", auth=auth)
    _, second, _ = await send(http, github, "GET", "/installation/repositories", auth=auth)
    assert (first["X-RateLimit-Limit"], first["X-RateLimit-Resource"]) == ("5000", "core")
    assert int(second["X-RateLimit-Remaining"]) == int(first["X-RateLimit-Remaining"]) - 1
    assert int(second["X-RateLimit-Used"]) == int(first["X-RateLimit-Used"]) + 1

    github.set_rate_limit(1, installation_id=installation, reset_in=120)
    status, headers, _ = await send(http, github, "GET", "/installation/repositories", auth=auth)
    assert (status, headers["X-RateLimit-Remaining"]) == (200, "0")
    status, headers, body = await send(http, github, "GET", "/installation/repositories", auth=auth)
    assert status == 403 and "rate limit exceeded" in body["message"]
    assert int(headers["X-RateLimit-Reset"]) == int(github.now().timestamp()) + 120
    status, _, body = await send(http, github, "GET", "/rate_limit", auth=auth)
    assert checked("GET /rate_limit", 200, body)["resources"]["core"]["remaining"] == 0


# -- Conditional requests ------------------------------------------------------------------


async def test_an_unchanged_resource_answers_304_to_if_none_match(http, github):
    installation = github.add_installation(repos=["acme/runner"])
    issue = github.add_issue("acme/runner", "Roll out")
    auth = await token(http, github, installation)
    path = f"/repos/acme/runner/issues/{issue}"

    status, headers, _ = await send(http, github, "GET", path, auth=auth)
    etag, used = headers["ETag"], headers["X-RateLimit-Used"]
    status, headers, body = await send(
        http, github, "GET", path, auth=auth, headers={"If-None-Match": etag}
    )
    assert (status, body, headers["ETag"]) == (304, None, etag)
    assert headers["X-RateLimit-Used"] == used  # a 304 costs nothing

    await send(http, github, "PATCH", path, auth=auth, body={"state": "closed"})
    status, headers, body = await send(
        http, github, "GET", path, auth=auth, headers={"If-None-Match": etag}
    )
    assert status == 200 and body["state"] == "closed" and headers["ETag"] != etag


# -- Conformance ---------------------------------------------------------------------------


async def test_a_request_github_would_refuse_is_a_violation(http, github):
    installation = github.add_installation(repos=["acme/runner"])
    auth = await token(http, github, installation)
    with github.expect_violations() as seen:
        status, _, body = await send(
            http,
            github,
            "POST",
            "/repos/acme/runner/check-runs",
            auth=auth,
            body={"name": "canary", "status": "done"},
        )
        assert status == 422 and body["message"].startswith("Invalid request.")
        status, _, _ = await send(http, github, "GET", "/repos/acme/runner/nonsense", auth=auth)
        assert status == 404
        status, _, _ = await send(
            http, github, "GET", "/installation/repositories?colour=red", auth=auth
        )
        assert status == 422
    assert len(seen) == 3
    assert seen[0].startswith("POST /repos/acme/runner/check-runs: ") and "head_sha" in seen[0]
    assert "no operation in the subset matches" in seen[1]
    assert "'colour'" in seen[2]
    assert github.violations == []  # moved out, so this test passes
    assert github.repo("acme/runner").check_runs == {}


async def test_an_operation_without_a_handler_answers_501_loudly(http, github):
    installation = github.add_installation(repos=["acme/runner"])
    auth = await token(http, github, installation)
    with github.expect_violations() as seen:
        status, _, body = await send(http, github, "GET", "/users/octocat", auth=auth)
    assert status == 501 and "does not implement GET /users/{username}" in body["message"]
    assert "add a handler in tests/fake_github.py" in seen[0]
    # A test can answer it in its own fake until the module has a handler.
    github.override("GET /users/{username}", lambda ctx: example("GET /users/{username}"))
    status, _, body = await send(http, github, "GET", "/users/octocat", auth=auth)
    assert (status, body["login"]) == (200, "octocat")


def test_a_violation_fails_its_test_and_the_session(pytester: pytest.Pytester, monkeypatch):
    """The session check really fails a run (in a separate pytest process)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest('pytest_plugins = ["tests.github_fixtures"]\n')
    pytester.makepyfile(
        """
        from tests.fake_github import FakeGitHub

        def test_sends_a_bad_request():
            FakeGitHub().violations.append("POST /repos/o/r/check-runs: made up problem")

        def test_innocent():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    assert result.ret != 0
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_sends_a_bad_request*",
            "*1 request(s) to the fake GitHub in this test would be refused*",
            "*made up problem*",
            "*1 request(s) to the fake GitHub in this session would be refused*",
        ]
    )
    result.assert_outcomes(passed=2, errors=2)


# -- Stateful bodies that match GitHub's schemas ------------------------------------------


async def test_issue_label_comment_reaction_and_check_run_answers_match_the_subset(http, github):
    installation = github.add_installation(repos=["acme/runner"])
    auth = await token(http, github, installation)
    repo = "/repos/acme/runner"

    async def ok(method: str, key: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, _, answer = await send(http, github, method, repo + path, auth=auth, body=body)
        assert got == status, answer
        return checked(key, status, answer)

    issue = await ok(
        "POST",
        "POST /repos/{owner}/{repo}/issues",
        "/issues",
        {"title": "Roll out 1.2.3", "labels": ["rollout"]},
        201,
    )
    assert issue["user"]["login"] == "update-pipeline[bot]" and issue["user"]["type"] == "Bot"
    n = issue["number"]
    labels = await ok(
        "POST",
        "POST /repos/{owner}/{repo}/issues/{issue_number}/labels",
        f"/issues/{n}/labels",
        {"labels": ["stage-1"]},
    )
    assert [label["name"] for label in labels] == ["rollout", "stage-1"]
    labels = await ok(
        "DELETE",
        "DELETE /repos/{owner}/{repo}/issues/{issue_number}/labels/{name}",
        f"/issues/{n}/labels/rollout",
    )
    assert [label["name"] for label in labels] == ["stage-1"]
    assert (await send(http, github, "DELETE", f"{repo}/issues/{n}/labels/rollout", auth=auth))[
        0
    ] == 404
    await ok(
        "PUT",
        "PUT /repos/{owner}/{repo}/issues/{issue_number}/labels",
        f"/issues/{n}/labels",
        {"labels": ["stage-2"]},
    )
    await ok("GET", "GET /repos/{owner}/{repo}/labels/{name}", "/labels/stage-2")
    await ok(
        "POST",
        "POST /repos/{owner}/{repo}/labels",
        "/labels",
        {"name": "paused", "color": "ff0000"},
        201,
    )
    assert (await send(http, github, "POST", f"{repo}/labels", auth=auth, body={"name": "PAUSED"}))[
        0
    ] == 422

    comment = await ok(
        "POST",
        "POST /repos/{owner}/{repo}/issues/{issue_number}/comments",
        f"/issues/{n}/comments",
        {"body": "Stage 1"},
        201,
    )
    await ok(
        "PATCH",
        "PATCH /repos/{owner}/{repo}/issues/comments/{comment_id}",
        f"/issues/comments/{comment['id']}",
        {"body": "Stage 1 done"},
    )
    listed = await ok(
        "GET", "GET /repos/{owner}/{repo}/issues/{issue_number}/comments", f"/issues/{n}/comments"
    )
    assert [c["body"] for c in listed] == ["Stage 1 done"]
    key = "POST /repos/{owner}/{repo}/issues/comments/{comment_id}/reactions"
    await ok("POST", key, f"/issues/comments/{comment['id']}/reactions", {"content": "+1"}, 201)
    await ok("POST", key, f"/issues/comments/{comment['id']}/reactions", {"content": "+1"}, 200)
    await ok(
        "POST",
        "POST /repos/{owner}/{repo}/issues/{issue_number}/reactions",
        f"/issues/{n}/reactions",
        {"content": "rocket"},
        201,
    )
    issue = await ok("GET", "GET /repos/{owner}/{repo}/issues/{issue_number}", f"/issues/{n}")
    assert issue["comments"] == 1 and [la["name"] for la in issue["labels"]] == ["stage-2"]
    await ok("GET", "GET /repos/{owner}/{repo}/issues", "/issues?state=open&labels=stage-2")

    sha = "ce587453ced02b1526dfb4cb910479d431683101"
    run = await ok(
        "POST",
        "POST /repos/{owner}/{repo}/check-runs",
        "/check-runs",
        {"name": "canary", "head_sha": sha, "status": "in_progress"},
        201,
    )
    assert (run["status"], run["app"]["id"]) == ("in_progress", APP_ID)
    run = await ok(
        "PATCH",
        "PATCH /repos/{owner}/{repo}/check-runs/{check_run_id}",
        f"/check-runs/{run['id']}",
        {"conclusion": "success", "output": {"title": "ok", "summary": "All green"}},
    )
    assert (run["status"], run["conclusion"], run["output"]["summary"]) == (
        "completed",
        "success",
        "All green",
    )
    await ok(
        "GET", "GET /repos/{owner}/{repo}/check-runs/{check_run_id}", f"/check-runs/{run['id']}"
    )
    listing = await ok(
        "GET", "GET /repos/{owner}/{repo}/commits/{ref}/check-runs", f"/commits/{sha}/check-runs"
    )
    assert [r["id"] for r in listing["check_runs"]] == [run["id"]]


async def test_actions_pulls_refs_releases_and_deliveries_answers_match_the_subset(http, github):
    installation = github.add_installation(repos=["acme/runner"])
    github.add_pull("acme/runner", "Bump agent", head="bump", files=["package.json"])
    github.add_release("acme/runner", "v1.0.0")
    github.add_release("acme/runner", "v1.1.0-rc.1", prerelease=True)
    auth = await token(http, github, installation)
    repo = "/repos/acme/runner"

    async def ok(method: str, key: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, _, answer = await send(http, github, method, repo + path, auth=auth, body=body)
        assert got == status, answer
        return checked(key, status, answer) if answer is not None else None

    await ok(
        "POST",
        "POST /repos/{owner}/{repo}/actions/workflows/{workflow_id}/dispatches",
        "/actions/workflows/canary.yml/dispatches",
        {"ref": "main", "inputs": {"version": "1.2.3"}},
        204,
    )
    (dispatch,) = github.repo("acme/runner").dispatches
    assert (dispatch["workflow"], dispatch["inputs"]) == (
        ".github/workflows/canary.yml",
        {"version": "1.2.3"},
    )
    runs = await ok(
        "GET", "GET /repos/{owner}/{repo}/actions/runs", "/actions/runs?event=workflow_dispatch"
    )
    assert [r["id"] for r in runs["workflow_runs"]] == [dispatch["run_id"]]
    await ok(
        "GET",
        "GET /repos/{owner}/{repo}/actions/workflows/{workflow_id}/runs",
        "/actions/workflows/canary.yml/runs?status=queued",
    )
    await ok(
        "GET",
        "GET /repos/{owner}/{repo}/actions/runs/{run_id}",
        f"/actions/runs/{dispatch['run_id']}",
    )

    pull = await ok("GET", "GET /repos/{owner}/{repo}/pulls/{pull_number}", "/pulls/1")
    assert (pull["head"]["ref"], pull["base"]["ref"]) == ("bump", "main")
    files = await ok("GET", "GET /repos/{owner}/{repo}/pulls/{pull_number}/files", "/pulls/1/files")
    assert [f["filename"] for f in files] == ["package.json"]
    await ok("GET", "GET /repos/{owner}/{repo}/pulls", "/pulls?state=open")

    ref = await ok("GET", "GET /repos/{owner}/{repo}/git/ref/{ref}", "/git/ref/heads/bump")
    assert ref["object"]["sha"] == pull["head"]["sha"]
    await ok(
        "POST",
        "POST /repos/{owner}/{repo}/git/refs",
        "/git/refs",
        {"ref": "refs/heads/canary", "sha": ref["object"]["sha"]},
        201,
    )
    assert (await send(http, github, "GET", f"{repo}/git/ref/heads/nope", auth=auth))[0] == 404

    latest = await ok("GET", "GET /repos/{owner}/{repo}/releases/latest", "/releases/latest")
    assert latest["tag_name"] == "v1.0.0"
    releases = await ok("GET", "GET /repos/{owner}/{repo}/releases", "/releases")
    assert {r["tag_name"] for r in releases} == {"v1.0.0", "v1.1.0-rc.1"}

    # Hook deliveries: newest first, cursor pagination, redelivery.
    for status in (200, 500, 200):
        github.add_delivery("issues", "opened", status_code=status)
    jwt_auth = f"Bearer {app_jwt(github)}"
    status, headers, page = await send(
        http, github, "GET", "/app/hook/deliveries?per_page=2", auth=jwt_auth
    )
    checked("GET /app/hook/deliveries", 200, page)
    assert [d["status_code"] for d in page] == [200, 500]
    next_url = headers["Link"].split(";")[0].strip("<>")
    status, headers, rest = await send(http, github, "GET", next_url, auth=jwt_auth)
    assert [d["status_code"] for d in rest] == [200] and "Link" not in headers
    failed = page[1]["id"]
    status, _, body = await send(
        http, github, "POST", f"/app/hook/deliveries/{failed}/attempts", auth=jwt_auth
    )
    assert (status, body) == (202, {}) and github.redeliveries == [failed]


SHA = "ce587453ced02b1526dfb4cb910479d431683101"
# One request per operation the fake implements, in an order that builds on itself:
# (credential, method, path, body, status). ``{name}`` is filled from ``ids``; a request
# whose answer has an ``id`` stores it (its ``number`` if any) under its last path word.
SMOKE: list[tuple[str, str, str, Any, int]] = [
    ("app", "GET", "/app", None, 200),
    ("user", "GET", "/user", None, 200),
    ("app", "GET", "/app/installations", None, 200),
    ("app", "GET", "/app/installations/{installation}", None, 200),
    ("app", "POST", "/app/installations/{installation}/access_tokens", {}, 201),
    ("app", "GET", "/repos/acme/runner/installation", None, 200),
    ("app", "GET", "/app/hook/config", None, 200),
    ("app", "GET", "/app/hook/deliveries", None, 200),
    ("app", "GET", "/app/hook/deliveries/{delivery}", None, 200),
    ("app", "POST", "/app/hook/deliveries/{delivery}/attempts", None, 202),
    ("token", "GET", "/installation/repositories", None, 200),
    ("token", "GET", "/rate_limit", None, 200),
    ("token", "GET", "/repos/acme/runner", None, 200),
    ("token", "GET", "/repos/acme/runner/topics", None, 200),
    ("token", "GET", "/repos/acme/runner/properties/values", None, 200),
    ("token", "GET", "/repos/acme/runner/collaborators/alice/permission", None, 200),
    ("token", "GET", "/repos/acme/runner/collaborators/alice", None, 204),
    ("token", "GET", "/repos/acme/runner/collaborators?permission=push", None, 200),
    ("token", "GET", "/orgs/acme/teams/release/memberships/alice", None, 200),
    ("token", "GET", "/repos/acme/runner/contents/README.md?ref=main", None, 200),
    ("token", "PUT", "/repos/acme/runner/contents/docs/new.md",
     {"message": "Add notes", "content": base64.b64encode(b"notes\n").decode()}, 201),
    ("token", "GET", "/repos/acme/runner/git/ref/heads/main", None, 200),
    ("token", "POST", "/repos/acme/runner/git/refs", {"ref": "refs/heads/canary", "sha": SHA},
     201),
    ("token", "PATCH", "/repos/acme/runner/git/refs/heads/canary", {"sha": SHA, "force": True},
     200),
    ("token", "POST", "/repos/acme/runner/issues", {"title": "Roll out", "labels": ["a"]}, 201),
    ("token", "GET", "/repos/acme/runner/issues/1", None, 200),
    ("token", "PATCH", "/repos/acme/runner/issues/1", {"state": "closed"}, 200),
    ("token", "GET", "/repos/acme/runner/issues?state=all&sort=updated", None, 200),
    ("token", "POST", "/repos/acme/runner/issues/1/comments", {"body": "Done"}, 201),
    ("token", "GET", "/repos/acme/runner/issues/1/comments", None, 200),
    ("token", "PATCH", "/repos/acme/runner/issues/comments/{comments}", {"body": "Done!"}, 200),
    ("token", "POST", "/repos/acme/runner/issues/1/reactions", {"content": "eyes"}, 201),
    ("token", "POST", "/repos/acme/runner/issues/comments/{comments}/reactions",
     {"content": "heart"}, 201),
    ("token", "POST", "/repos/acme/runner/issues/1/labels", {"labels": ["b"]}, 200),
    ("token", "PUT", "/repos/acme/runner/issues/1/labels", {"labels": ["c"]}, 200),
    ("token", "DELETE", "/repos/acme/runner/issues/1/labels/c", None, 200),
    ("token", "POST", "/repos/acme/runner/labels", {"name": "paused"}, 201),
    ("token", "GET", "/repos/acme/runner/labels/paused", None, 200),
    ("token", "POST", "/repos/acme/runner/check-runs", {"name": "canary", "head_sha": SHA}, 201),
    ("token", "PATCH", "/repos/acme/runner/check-runs/{check-runs}",
     {"status": "completed", "conclusion": "failure"}, 200),
    ("token", "GET", "/repos/acme/runner/check-runs/{check-runs}", None, 200),
    ("token", "GET", f"/repos/acme/runner/commits/{SHA}/check-runs?filter=all", None, 200),
    ("token", "GET", "/repos/acme/runner/actions/workflows/canary.yml", None, 200),
    ("token", "POST", "/repos/acme/runner/actions/workflows/canary.yml/dispatches",
     {"ref": "main", "return_run_details": True}, 200),
    ("token", "GET", "/repos/acme/runner/actions/runs?branch=main", None, 200),
    ("token", "GET", "/repos/acme/runner/actions/workflows/canary.yml/runs", None, 200),
    ("token", "GET", "/repos/acme/runner/actions/runs/{run}", None, 200),
    ("token", "POST", "/repos/acme/runner/actions/runs/{run}/cancel", None, 202),
    ("token", "POST", "/repos/acme/runner/pulls",
     {"title": "Canary", "head": "acme:canary", "base": "main"}, 201),
    ("token", "GET", "/repos/acme/runner/pulls/{pulls}", None, 200),
    ("token", "GET", "/repos/acme/runner/pulls/{pulls}/files", None, 200),
    ("token", "GET", "/repos/acme/runner/pulls?state=all&head=acme:canary", None, 200),
    ("token", "PATCH", "/repos/acme/runner/pulls/{pulls}", {"state": "closed"}, 200),
    ("token", "GET", "/repos/acme/runner/releases/latest", None, 200),
    ("token", "GET", "/repos/acme/runner/releases?per_page=1", None, 200),
]  # fmt: skip


async def test_every_implemented_operation_answers_as_the_subset_documents(http, github):
    """A handler added to the fake needs a line in SMOKE: this is its schema check."""
    installation = github.add_installation(account="acme", repos=["acme/runner"])
    github.set_permission("acme/runner", "alice", "maintain")
    github.set_team_member("acme", "release", "alice", role="maintainer")
    github.repo("acme/runner").topics = ["runner"]
    github.repo("acme/runner").properties = {"tier": "canary"}
    github.set_file("acme/runner", "README.md", "hi\n")
    ids = {
        "installation": installation,
        "delivery": github.add_delivery("check_run", "completed", installation_id=installation),
        "run": github.add_workflow_run(
            "acme/runner", "canary.yml", status="in_progress", conclusion=None
        ),
    }
    github.add_release("acme/runner", "v1.0.0")
    auth = {
        "app": f"Bearer {app_jwt(github)}",
        "token": await token(http, github, installation),
        "user": f"token {github.issue_user_token('alice')}",
    }

    covered = set()
    for credential, method, path, body, expected in SMOKE:
        concrete = path.format(**ids)
        status, _, answer = await send(
            http, github, method, concrete, auth=auth[credential], body=body
        )
        key = github.last().operation
        assert status == expected, (method, concrete, answer)
        if answer is not None:
            checked(key, status, answer)
        if isinstance(answer, dict) and "id" in answer:
            ids[key.split("/")[-1]] = answer.get("number", answer["id"])
        covered.add(key)
    assert covered == set(HANDLERS)
