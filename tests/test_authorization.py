"""Who may do what, as two generated tables: every API route of the route table against
every kind of caller, and every registered slash command against every permission level
GitHub has. Each table is derived from what the app declares (``Route.access``, the
command registry), so a route or command added without a rule here fails the test
rather than going untested."""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.api import build_route_table
from app.api.routing import Route
from app.auth import Access, new_secret
from app.config import Secret, Settings
from app.github.commands import CommandRegistry, Permission, Place
from app.github.outbox import marker
from app.github.tracking import ROLLOUT_LABEL
from app.store import BuildRecord
from tests.conftest import START, Api, MakeApi
from tests.fake_github import FakeGitHub
from tests.github_fixtures import WEBHOOK_SECRET
from tests.test_webhooks import HOOK, WEBHOOKS, headers_for, wait_until

# -- the route matrix ----------------------------------------------------------------------

NO_TOKEN = "no token"
UNKNOWN = "unknown token"
REVOKED = "revoked token"
FOREIGN = "foreign bearer"  # not an API token: what a workflow's OIDC token looks like
VIEWER = "viewer"
RUNNER_A = "runner of org A"
RUNNER_B = "runner of org B"
ADMIN = "admin"
# Admin last: its calls change state (revoke a token, pause a rollout), which must not
# decide what the others get.
PRINCIPALS = (NO_TOKEN, UNKNOWN, REVOKED, FOREIGN, VIEWER, RUNNER_A, RUNNER_B, ADMIN)
ORG_A, ORG_B = "org-a", "org-b"

PASS = 0  # got past authorisation: anything but 401 and 403 (and no 500)
NOT_A_TOKEN = {NO_TOKEN: 401, UNKNOWN: 401, REVOKED: 401, FOREIGN: 401}
RULES: dict[Access, dict[str, int]] = {
    Access.PUBLIC: dict.fromkeys(PRINCIPALS, PASS),
    Access.VIEWER: {**NOT_A_TOKEN, VIEWER: PASS, RUNNER_A: 403, RUNNER_B: 403, ADMIN: PASS},
    Access.ADMIN: {**NOT_A_TOKEN, VIEWER: 403, RUNNER_A: 403, RUNNER_B: 403, ADMIN: PASS},
    # A runner route acts for one organisation (org A in every request here): its own
    # runner passes, another organisation's runner does not.
    Access.RUNNER: {**NOT_A_TOKEN, VIEWER: 403, RUNNER_A: PASS, RUNNER_B: 403, ADMIN: PASS},
    # The workflow half needs a verifiable OIDC token; without a runner repository
    # configured, none is, so a foreign bearer is refused like a bad API token.
    Access.ADMIN_OR_WORKFLOW: {
        **NOT_A_TOKEN,
        VIEWER: 403,
        RUNNER_A: 403,
        RUNNER_B: 403,
        ADMIN: PASS,
    },
    # No bearer token, whatever its role, stands in for GitHub's signature.
    Access.GITHUB_SIGNATURE: dict.fromkeys(PRINCIPALS, 401),
}

# Path parameters: objects made in set-up where that is cheap, plausible ids elsewhere
# (an admin then gets a 404, which is past authorisation all the same).
PARAMS = {
    "name": "doomed",
    "buildId": "build-new",
    "channel": "stable",
    "orgId": ORG_A,
    "sweepId": "sweep-that-is-not",
    "owner": "acme",
    "repo": "svc",
}
# Bodies that get past validation, for the callers that get past authorisation where
# passing it depends on the body (a runner's organisation is in its heartbeat).
BODIES: dict[str, Any] = {
    "heartbeat": {
        "runnerId": "runner-1",
        "orgId": ORG_A,
        "bootId": "boot-1",
        "sessions": {"started": 0, "failed": 0, "disconnected": 0},
    },
}


def test_every_route_and_every_caller_has_a_rule() -> None:
    """A new Access value, or a rule that forgets a caller, fails here first."""
    routes = build_route_table().routes
    uncovered = [
        f"{r.method} {r.full_path} ({r.access.value})" for r in routes if r.access not in RULES
    ]
    assert not uncovered, f"routes whose access has no rule in RULES: {uncovered}"
    assert all(set(rule) == set(PRINCIPALS) for rule in RULES.values())


@dataclass
class Outcome:
    status: int
    code: str | None
    message: str
    challenge: bool  # the response carried WWW-Authenticate


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A webhook secret, so the webhook route checks signatures instead of answering 503.
    return settings.replace(github_webhook_secret=Secret(WEBHOOK_SECRET))


class Matrix:
    def __init__(self, api: Api, tokens: Mapping[str, str | None], params: dict[str, str]):
        self.api, self.tokens, self.params = api, tokens, params

    def path(self, route: Route) -> str:
        missing = [p for p in route.path_params if p not in self.params]
        assert not missing, f"{route.method} {route.path}: add a value for {missing} to PARAMS"
        path = route.full_path
        for name in route.path_params:
            path = path.replace(f"{{{name}}}", self.params[name])
        return path

    def body(self, route: Route, principal: str, expected: int) -> bytes | None:
        if route.request is None and route.access is not Access.GITHUB_SIGNATURE:
            return None
        denied = expected in (401, 403)
        if denied and not (route.access is Access.RUNNER and principal == RUNNER_B):
            # Too large and not JSON: a refused caller must get its 401 or 403, never a
            # 413 or 400, which would mean the body was read before the caller was checked.
            return b'{"' + b"[" * (self.api.services.settings.max_body_bytes + 10)
        return json.dumps(BODIES.get(route.operation_id, {})).encode()

    async def call(self, route: Route, principal: str, expected: int) -> Outcome:
        headers = {"Content-Type": "application/json"}
        token = self.tokens[principal]
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        path = self.path(route)
        async with self.api.client.request(
            route.method, path, headers=headers, data=self.body(route, principal, expected)
        ) as response:
            if response.content_type != "application/json":
                return Outcome(response.status, None, "", False)  # the event stream, /metrics
            body = await response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if response.status in (401, 403):
            self.api.check(route.method, path, response.status, body)
        return Outcome(
            response.status,
            error["code"] if error else None,
            error["message"] if error else "",
            "WWW-Authenticate" in response.headers,
        )


def judge(route: Route, principal: str, expected: int, got: Outcome) -> str | None:
    """What is wrong with the answer, or None."""
    if expected == PASS:
        # 503 is fine (a part that is off here, such as the GitHub App); 500 is a crash.
        if got.status in (401, 403, 500):
            return f"expected to get past authorisation, got {got.status} {got.message!r}"
        return None
    if got.status != expected:
        return f"expected {expected}, got {got.status} {got.message!r}"
    code = {401: "UNAUTHORIZED", 403: "FORBIDDEN"}[expected]
    if got.code != code:
        return f"{expected} with code {got.code}, not {code}"
    # A workflow token is refused by the workflow's rules, which send no challenge; an
    # API token that does not work gets one.
    workflow = route.access is Access.ADMIN_OR_WORKFLOW and principal == FOREIGN
    if expected == 401 and route.bearer and not workflow and not got.challenge:
        return "401 without WWW-Authenticate"
    if principal == REVOKED and route.bearer and got.message != "token revoked":
        return f"a revoked token was refused as {got.message!r}, not 'token revoked'"
    return None


async def test_every_route_answers_every_caller_as_its_access_rule_says(
    make_api: MakeApi,
) -> None:
    api = await make_api()
    store = api.services.store
    tokens: dict[str, str | None] = {
        NO_TOKEN: None,
        UNKNOWN: new_secret(),
        FOREIGN: "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl",
        VIEWER: await api.token("viewer"),
        RUNNER_A: await api.token("runner", org=ORG_A),
        RUNNER_B: await api.token("runner", org=ORG_B),
        ADMIN: await api.token("admin"),
        REVOKED: await api.token("viewer", name="revoked"),
    }
    await api.services.tokens.revoke("revoked", by="test")
    await api.token("viewer", name=PARAMS["name"])  # for DELETE /tokens/{name}
    admin = tokens[ADMIN]
    for build in ("build-old", "build-new"):
        await store.add_build(
            BuildRecord(build, "1.0.0", START, {"codex": "0.47.0"}, ["codex"]), START
        )
    response, _ = await api.request(
        "PUT", "/channels/stable", token=admin, json={"buildId": "build-old", "reason": "set-up"}
    )
    assert response.status == 200
    for org in (ORG_A, ORG_B):
        response, _ = await api.post(
            "/heartbeat", token=admin, json={**BODIES["heartbeat"], "orgId": org}
        )
        assert response.status == 200
    response, rollout = await api.post(
        "/rollouts", token=admin, json={"buildId": "build-new", "channel": "stable"}
    )
    assert response.status == 201, rollout
    delivery = str(uuid.uuid4())
    body = (WEBHOOKS / "issues.opened.0.json").read_bytes()
    response, _ = await api.post(
        HOOK, data=body, headers=headers_for("issues", body, **{"X-GitHub-Delivery": delivery})
    )
    assert response.status == 202
    matrix = Matrix(api, tokens, {**PARAMS, "rolloutId": rollout["rolloutId"], "id": delivery})

    wrong: list[str] = []
    routes = build_route_table().routes
    for route in routes:
        for principal in PRINCIPALS:
            expected = RULES[route.access][principal]
            got = await matrix.call(route, principal, expected)
            problem = judge(route, principal, expected, got)
            if problem:
                wrong.append(f"{route.method} {route.full_path} as {principal}: {problem}")
    assert not wrong, "\n".join(wrong)


# -- the command matrix ----------------------------------------------------------------------

# The least permission each command needs, by default (UPDATE_PIPELINE_COMMAND_PERMISSIONS
# unset): a command registered without a line here fails the test.
COMMAND_RULES: dict[str, Permission] = {
    "help": Permission.NONE,
    "status": Permission.TRIAGE,
    "pause": Permission.WRITE,
    "rollback": Permission.WRITE,
    "canary": Permission.WRITE,
    "resume": Permission.MAINTAIN,
    "advance": Permission.MAINTAIN,
    "approve": Permission.MAINTAIN,
    "skip": Permission.MAINTAIN,
    "rollout": Permission.MAINTAIN,
    "freeze": Permission.MAINTAIN,
    "unfreeze": Permission.MAINTAIN,
    "sweep": Permission.MAINTAIN,
}
# How a command is typed when its arguments matter (a missing reason would be refused
# before anything else, and the matrix wants the permission check).
TYPED = {
    "rollback": "/rollback checking the matrix",
    "approve": "/approve org-01",
    "skip": "/skip org-01",
    "rollout": "/rollout build-new beta",
    "freeze": "/freeze checking the matrix",
}
# The user with each level on both repositories; the outsider has none (GitHub answers
# 404 for the permission of someone who is no collaborator).
USERS = {
    Permission.NONE: "outsider",
    Permission.READ: "reader",
    Permission.TRIAGE: "triager",
    Permission.WRITE: "writer",
    Permission.MAINTAIN: "maintainer",
    Permission.ADMIN: "owner",
}
CONTROL, RUNNER = "acme/control", "acme/runner"
COMMENT = json.loads((WEBHOOKS / "issue_comment.created.0.json").read_text())
DOCS = Path(__file__).resolve().parents[1] / "docs" / "commands.md"


def test_the_documented_permissions_are_the_enforced_ones() -> None:
    """docs/commands.md is what people read before typing; it must say what the matrix
    below enforces."""
    documented: dict[str, Permission] = {}
    for row in re.findall(r"^\| (`/.*?) \| .*? \| (\w+) \|", DOCS.read_text(), re.MULTILINE):
        cell, needs = row
        level = Permission.NONE if needs == "nothing" else Permission[needs.upper()]
        documented.update(dict.fromkeys(re.findall(r"`/([a-z-]+)", cell), level))
    assert documented == COMMAND_RULES


class Comments:
    """Comments as GitHub delivers them, on the control repository's tracking issue and
    the runner repository's pull request."""

    def __init__(self, api: Api, github: FakeGitHub, installation: int) -> None:
        self.api, self.github, self.installation = api, github, installation

    def post(self, repo: str, number: int, body: str, *, user: str) -> tuple[int, bytes]:
        """Post ``body`` on GitHub; the comment's id and its delivery (unsigned)."""
        comment_id = self.github.add_comment(repo, number, body, user=user)
        issue = self.github.repo(repo).issue(number)
        payload = copy.deepcopy(COMMENT)
        author = {**payload["comment"]["user"], "login": user, "type": "User"}
        payload["comment"].update(id=comment_id, body=body, user=author)
        payload["sender"] = author
        payload["issue"].update(
            number=number,
            labels=[{"name": label["name"]} for label in issue["labels"]],
            state=issue["state"],
        )
        payload["issue"].pop("pull_request", None)
        if "pull_request" in issue:
            payload["issue"]["pull_request"] = issue["pull_request"]
        payload["repository"]["full_name"] = repo
        payload["installation"] = {"id": self.installation}
        return comment_id, json.dumps(payload).encode()

    async def deliver(self, data: bytes, *, delivery: str | None = None) -> Any:
        """Sign and send a delivery, then wait for everything it caused; the answer."""
        headers = headers_for("issue_comment", data)
        if delivery is not None:
            headers["X-GitHub-Delivery"] = delivery
        response, answer = await self.api.post(HOOK, data=data, headers=headers)
        assert response.status == 202
        await self.settled()
        return answer

    async def say(self, repo: str, number: int, body: str, *, user: str) -> str | None:
        """Post ``body``, deliver it, and return the bot's reply to it (None: no reply)."""
        comment_id, data = self.post(repo, number, body, user=user)
        await self.deliver(data)
        return self.reply(repo, comment_id)

    def reply(self, repo: str, comment_id: int) -> str | None:
        tag = marker(f"reply-{comment_id}")
        found = [c["body"] for c in self.github.repo(repo).comments.values() if tag in c["body"]]
        assert len(found) <= 1, found
        return str(found[0]) if found else None

    async def settled(self) -> None:
        store = self.api.services.store

        async def quiet() -> bool:
            pending = await store.list_deliveries(status="pending", before=None, limit=1)
            return not pending and (await store.outbox_stats()).pending == 0

        await wait_until(quiet, timeout=20)


def install(github: FakeGitHub) -> int:
    """One installation covering both repositories, each user with their level on both."""
    installation = github.add_installation(account="acme", repos=[CONTROL, RUNNER])
    for level, user in USERS.items():
        if level is not Permission.NONE:
            for repo in (CONTROL, RUNNER):
                github.set_permission(repo, user, str(level))
    return installation


def tracking_issue(github: FakeGitHub) -> int:
    (number,) = [
        n
        for n, issue in github.repo(CONTROL).issues.items()
        if ROLLOUT_LABEL in {label["name"] for label in issue["labels"]}
        and issue["state"] == "open"
    ]
    return number


@pytest.fixture
def repos(github: FakeGitHub) -> int:
    return install(github)


async def started(make_api: MakeApi, settings: Settings, registry: CommandRegistry) -> Api:
    """The app steering rollouts from CONTROL and canaries from RUNNER, one rollout
    under way (so its tracking issue exists)."""
    api = await make_api(settings_override=settings, with_github=True, commands=registry)
    admin = await api.token("admin")
    for build in ("build-old", "build-new"):
        await api.services.store.add_build(
            BuildRecord(build, "1.0.0", START, {"codex": "0.47.0"}, ["codex"]), START
        )
    await api.request(
        "PUT", "/channels/stable", token=admin, json={"buildId": "build-old", "reason": "set-up"}
    )
    for n in range(4):
        body = {**BODIES["heartbeat"], "orgId": f"org-{n:02d}", "buildId": "build-old"}
        await api.post("/heartbeat", token=admin, json=body)
    store = api.services.store

    async def installed() -> bool:
        return await store.installation_for_repository(CONTROL) is not None

    await wait_until(installed)
    response, _ = await api.post(
        "/rollouts", token=admin, json={"buildId": "build-new", "channel": "stable"}
    )
    assert response.status == 201
    return api


async def test_every_command_answers_every_permission_level_as_its_rule_says(
    make_api: MakeApi, github_settings: Settings, github: FakeGitHub, repos: int
) -> None:
    registry = CommandRegistry()
    settings = github_settings.replace(
        control_repo=CONTROL, runner_repo=RUNNER, stages_stable="50%:1h,100%"
    )
    api = await started(make_api, settings, registry)
    unruled = sorted(registry.known - set(COMMAND_RULES))
    assert not unruled, f"commands without a rule in COMMAND_RULES: {unruled}"
    assert sorted(set(COMMAND_RULES) - registry.known) == [], "rules for unregistered commands"
    for name, level in COMMAND_RULES.items():
        spec = registry.get(name)
        assert spec is None or spec.permission is level, f"/{name} needs {spec.permission}"

    comments = Comments(api, github, repos)
    await comments.settled()
    tracking = tracking_issue(github)
    pull = github.add_pull(RUNNER)
    places = {
        (CONTROL, tracking): Place(CONTROL, tracking, False, frozenset({ROLLOUT_LABEL})),
        (RUNNER, pull): Place(RUNNER, pull, True, frozenset()),
    }
    where = {
        name: [key for key, place in places.items() if spec.applies(place)]
        for name in registry.known - {"help"}
        if (spec := registry.get(name)) is not None
    }
    nowhere = sorted(name for name, found in where.items() if not found)
    assert not nowhere, f"give these commands a place in the matrix: {nowhere}"

    wrong: list[str] = []
    for level, user in USERS.items():
        for repo, number in places:
            here = sorted(name for name, found in where.items() if (repo, number) in found)
            lines = ["/help", *(TYPED.get(name, f"/{name}") for name in here)]
            reply = await comments.say(repo, number, "\n".join(lines), user=user) or ""
            if f"(your permission: {level})" not in reply:
                wrong.append(f"{user} on {repo}: /help does not say {level}")
            for name in here:
                needed = COMMAND_RULES[name]
                refused = f"`/{name}` needs **{needed}** permission" in reply
                answered = f"`/{name}`" in reply and "internal error" not in reply
                listed = re.search(rf"^- `/{name}[ `]", reply, re.MULTILINE) is not None
                if refused is (level >= needed) or not answered or listed is (level < needed):
                    wrong.append(
                        f"/{name} (needs {needed}) as {user} ({level}) on {repo}:"
                        f" refused={refused} answered={answered} listed by /help={listed}"
                    )
    assert not wrong, "\n".join(wrong)
