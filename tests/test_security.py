"""Security properties, each checked end to end where it can be: webhook replays, secrets
compared in constant time, secrets kept out of the logs, user text echoed harmlessly,
request size and nesting limits, and no fetching of URLs a repository owner (or the
providers file) names."""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import hypothesis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from gidgethub import sansio
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from app.auth import new_secret
from app.clock import ManualClock
from app.config import Secret, Settings
from app.github.commands import CommandRegistry
from app.github.tracking import TrackingSync
from app.logs import configure
from app.pipeline.version.npmrc import NpmRegistry
from app.pipeline.version.providers import ProvidersFileError, load_providers
from app.server import version_watcher
from app.store import BuildRecord
from app.sweeps.config import ConfigError, parse_config
from tests.conftest import START, Api, MakeApi
from tests.fake_github import FakeGitHub
from tests.fake_npm_registry import FakeNpmRegistry
from tests.fake_oidc import FakeOidcIssuer
from tests.github_fixtures import WEBHOOK_SECRET
from tests.test_authorization import CONTROL, RUNNER, Comments, install, started, tracking_issue
from tests.test_sweeps import opt_in
from tests.test_webhooks import HOOK, WEBHOOKS, headers_for, wait_until

APP = Path(__file__).resolve().parents[1] / "app"


@pytest.fixture
def repos(github: FakeGitHub) -> int:
    return install(github)


@pytest.fixture
async def steering(
    make_api: MakeApi, github_settings: Settings, github: FakeGitHub, repos: int
) -> Comments:
    """The app steering a rollout from its tracking issue in the control repository."""
    settings = github_settings.replace(
        control_repo=CONTROL, runner_repo=RUNNER, stages_stable="50%:1h,100%"
    )
    api = await started(make_api, settings, CommandRegistry())
    comments = Comments(api, github, repos)
    await comments.settled()
    return comments


async def rollout(api: Api) -> dict:
    _, page = await api.get("/rollouts", token=await api.token("viewer"))
    return page["items"][0]


async def history(api: Api) -> list[str]:
    admin = await api.token("admin")
    _, page = await api.get(f"/rollouts/{(await rollout(api))['rolloutId']}/history", token=admin)
    return [h["action"] for h in page["items"]]


# -- webhook replays ---------------------------------------------------------------------------


async def test_a_replayed_delivery_is_not_applied_again(
    steering: Comments, github: FakeGitHub
) -> None:
    api = steering.api
    number = tracking_issue(github)
    _, data = steering.post(CONTROL, number, "/pause looking", user="writer")
    delivery = str(uuid.uuid4())
    assert await steering.deliver(data, delivery=delivery) == {
        "accepted": True,
        "duplicate": False,
    }
    rollout_id = (await rollout(api))["rolloutId"]
    response, _ = await api.post(
        f"/rollouts/{rollout_id}/resume", token=await api.token("admin", name="oncall")
    )
    assert response.status == 200
    replies = len(github.repo(CONTROL).comments)

    # The same delivery again, as someone who kept a copy would send it: its signature is
    # still valid, but its id was seen.
    assert await steering.deliver(data, delivery=delivery) == {
        "accepted": True,
        "duplicate": True,
    }
    assert len(github.repo(CONTROL).comments) == replies
    # Only the body is signed, so a copy can come with a new delivery id: it is taken,
    # but the comment's commands were acted on by the first delivery, so nothing runs
    # and nothing is said again.
    assert await steering.deliver(data, delivery=str(uuid.uuid4())) == {
        "accepted": True,
        "duplicate": False,
    }
    assert (await rollout(api))["state"] == "rolling_out"
    assert await history(api) == ["start", "pause", "resume"]
    assert len(github.repo(CONTROL).comments) == replies


async def test_a_replayed_unfreeze_does_not_lift_a_later_freeze(
    steering: Comments, github: FakeGitHub
) -> None:
    api = steering.api
    lobby = github.add_issue(CONTROL, "Releases")
    await steering.say(CONTROL, lobby, "/freeze drill", user="maintainer")
    _, unfreeze = steering.post(CONTROL, lobby, "/unfreeze", user="maintainer")
    await steering.deliver(unfreeze)
    admin = await api.token("admin", name="oncall")
    response, _ = await api.post("/freeze", token=admin, json={"reason": "incident"})
    assert response.status == 200

    # The old /unfreeze again, signed as before but under a new delivery id.
    await steering.deliver(unfreeze, delivery=str(uuid.uuid4()))
    _, frozen = await api.get("/freeze", token=admin)
    assert frozen["frozen"] is not None, "the old /unfreeze lifted the freeze made since"
    assert frozen["frozen"]["reason"] == "incident"


# -- constant-time comparisons -------------------------------------------------------------

# Names that hold (or are derived from) a credential. ``state`` is the manifest flow's
# OAuth-like state; rollout states are compared with literals, which are left alone below.
SECRETISH = re.compile(
    r"(?:^|_)(token|secret|signature|digest|password|jwt|hmac|nonce|state|credential"
    r"|private_key|api_key)s?(?:$|_)",
    re.IGNORECASE,
)
# Comparisons the check finds that compare no credential, each with the reason.
NOT_CREDENTIALS = {
    ("github/tracking.py", "sent == digest"): (
        "the SHA-256 of an issue body the app rendered, to skip sending it twice"
    ),
}


def _names(node: ast.expr) -> list[str]:
    """The names an operand reads: a variable, an attribute, a string subscript or
    ``.get("...")``, or any of these inside an f-string."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return [str(node.slice.value)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        key = node.args[0] if node.func.attr == "get" and node.args else None
        return [str(key.value)] if isinstance(key, ast.Constant) else []
    if isinstance(node, ast.JoinedStr):
        return [
            n for v in node.values if isinstance(v, ast.FormattedValue) for n in _names(v.value)
        ]
    return []


def equality_on_secrets() -> list[tuple[str, int, str]]:
    """Every ``==``/``!=`` in app/ with a credential-like name on either side, neither side
    a literal (a credential is never one, and comparing with one tells nothing)."""
    found = []
    for path in sorted(APP.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, sides, sides[1:], strict=False):
                if not isinstance(op, ast.Eq | ast.NotEq):
                    continue
                if isinstance(left, ast.Constant) or isinstance(right, ast.Constant):
                    continue
                if any(SECRETISH.search(n) for n in _names(left) + _names(right)):
                    where = str(path.relative_to(APP))
                    found.append((where, node.lineno, ast.unparse(node)))
    return found


def test_no_secret_is_compared_with_equality() -> None:
    """``==`` stops at the first differing byte, so its timing tells an attacker how much
    of a guess was right; credentials are compared with hmac.compare_digest, or looked
    up by their hash."""
    found = equality_on_secrets()
    suspicious = [
        f"app/{where}:{line}: {code}"
        for where, line, code in found
        if (where, code) not in NOT_CREDENTIALS
    ]
    assert not suspicious, "\n".join(suspicious)
    # Keeps the allow-list honest: an entry whose code is gone must go too.
    assert set(NOT_CREDENTIALS) <= {(where, code) for where, _, code in found}


def test_the_check_would_see_an_equality_on_a_secret() -> None:
    tree = ast.parse("if request_token == stored.token_hash: pass")
    (compare,) = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert any(SECRETISH.search(n) for n in _names(compare.left) + _names(compare.comparators[0]))


# Where a secret the service holds meets what a caller sent (or what GitHub answered).
COMPARED_IN_CONSTANT_TIME = [
    ("auth.py", "TokenService.authenticate"),  # API tokens, after the lookup by hash
    ("github/webhooks.py", "signature_valid"),  # X-Hub-Signature-256
    ("api/system.py", "metrics"),  # UPDATE_PIPELINE_METRICS_TOKEN
    ("github/manifest.py", "ManifestFlow._callback"),  # the setup flow's state
    ("github/auth.py", "AppAuth.rejected"),  # the App's JWT GitHub refused
    ("github/auth.py", "InstallationTokens.invalidate"),  # an installation token refused
]


@pytest.mark.parametrize(("module", "function"), COMPARED_IN_CONSTANT_TIME)
def test_each_secret_check_uses_compare_digest(module: str, function: str) -> None:
    found: ast.AST = ast.parse((APP / module).read_text())
    for name in function.split("."):
        (found,) = [
            node
            for node in ast.iter_child_nodes(found)
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name == name
        ]
    calls = [
        node.func
        for node in ast.walk(found)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "compare_digest"
    ]
    assert calls, f"{module}: {function} compares without compare_digest"


# -- no secret in the logs -----------------------------------------------------------------

NPM_TOKEN = "npm_tok_7f3c9a1e5b2d8f4a6c0e"
METRICS_TOKEN = "metrics-bearer-5d1f2e8a9c"


class Everything(logging.Handler):
    """Every record of every logger, before any filter of the service's own handler: the
    promise is that no secret is logged, not only that the output scrubs it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
async def npm_registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[FakeNpmRegistry]:
    async with FakeNpmRegistry(token=NPM_TOKEN) as registry:
        registry.publish("@openai/codex", "0.47.0", START - timedelta(days=1))
        # npm's own configuration, registry and token, as an operator sets them.
        host = registry.url.split("//", 1)[1]
        monkeypatch.setenv("npm_config_registry", registry.url)
        monkeypatch.setenv(f"npm_config_//{host}:_authToken", NPM_TOKEN)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.chdir(tmp_path)
        yield registry


@pytest.fixture
async def issuer() -> AsyncIterator[FakeOidcIssuer]:
    async with FakeOidcIssuer() as fake:
        yield fake


@pytest.mark.usefixtures("restore_logging")
async def test_no_secret_reaches_the_logs(
    make_api: MakeApi,
    github_settings: Settings,
    github: FakeGitHub,
    repos: int,
    npm_registry: FakeNpmRegistry,
    issuer: FakeOidcIssuer,
    clock: ManualClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = github_settings.replace(
        control_repo=CONTROL,
        runner_repo=RUNNER,
        stages_stable="50%:1h,100%",
        metrics_token=Secret(METRICS_TOKEN),
        oidc_issuer=issuer.url,
        log_level="DEBUG",
    )
    # As the service sets logging up, with everything also collected unfiltered.
    root = logging.getLogger()
    configure("json", "DEBUG", settings.secrets())
    everything = Everything()
    # First in line: the service's handler scrubs each record in place as it passes.
    root.handlers.insert(0, everything)
    try:
        async with aiohttp.ClientSession() as session:
            api = await make_api(
                settings_override=settings,
                with_github=True,
                oidc_issuer=issuer.url,
                build=lambda services: [version_watcher(services, session)],
            )
            secrets = await _a_day_of_work(api, github, repos, issuer, clock)
    finally:
        # Before the servers stop: what they log then must not reach capsys' closed
        # stream (restore_logging puts pytest's handlers back afterwards).
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)

    # Credentials the fake GitHub handed out or received: installation tokens and the
    # App's JWTs.
    secrets += list(github.tokens)
    secrets += [
        value.split(" ", 1)[1]
        for r in github.requests
        if (value := r.headers.get("Authorization", "")).startswith("Bearer ")
    ]
    pem = github.private_key_pem
    secrets += [line for line in pem.splitlines() if len(line) >= 40]  # the key's body
    assert any(s.startswith("ghs_") for s in secrets) and len(secrets) > 10

    raw = "\n".join(everything.lines)
    written = capsys.readouterr()
    # The scenario did log, at every level, from the app's components and the others.
    assert "update_pipeline.github" in raw and " DEBUG " in raw and " WARNING " in raw
    leaks = [
        f"{secret[:12]}... in {where}"
        for secret in secrets
        for where, text in (("a log record", raw), ("stderr", written.err), ("stdout", written.out))
        if secret in text
    ]
    assert not leaks, "\n".join(leaks)


async def _a_day_of_work(
    api: Api, github: FakeGitHub, installation: int, issuer: FakeOidcIssuer, clock: ManualClock
) -> list[str]:
    """Webhooks, API calls with every kind of token (bad ones too), GitHub calls with
    installation tokens (one revoked under the app), an npm check with a token, a
    workflow's OIDC tokens, metrics; the secrets it used."""
    store = api.services.store
    admin = await api.token("admin")
    viewer = await api.token("viewer")
    runner = await api.token("runner", org="org-00")
    revoked = await api.token("viewer", name="leaver")
    await api.services.tokens.revoke("leaver", by="test")
    unknown = new_secret()
    response, issued = await api.post(
        "/tokens", token=admin, json={"name": "dashboard", "role": "viewer"}
    )
    assert response.status == 201
    fresh = issued["items"][0]["token"]
    for token in (viewer, fresh, revoked, unknown, "not-even-a-token"):
        await api.get("/status", token=token)
    await api.get("/metrics", token=METRICS_TOKEN)
    await api.get("/metrics", token=METRICS_TOKEN[:-1] + "x")
    response, checked = await api.post("/versions/check", token=admin)
    assert response.status == 200, checked
    assert any(s["outcome"] == "new" for s in checked["sources"]), checked

    for build in ("build-old", "build-new"):
        await store.add_build(
            BuildRecord(build, "1.0.0", START, {"codex": "0.47.0"}, ["codex"]), START
        )
    await api.request(
        "PUT", "/channels/stable", token=admin, json={"buildId": "build-old", "reason": "set-up"}
    )
    heartbeat = {
        "runnerId": "r1",
        "orgId": "org-00",
        "bootId": "b1",
        "buildId": "build-old",
        "sessions": {"started": 0, "failed": 0, "disconnected": 0},
    }
    for org, status in (("org-00", 200), ("someone-else", 403)):
        response, _ = await api.post("/heartbeat", token=runner, json={**heartbeat, "orgId": org})
        assert response.status == status

    async def installed() -> bool:
        return await store.repository_id(RUNNER) is not None

    await wait_until(installed)
    response, _ = await api.post(
        "/rollouts", token=admin, json={"buildId": "build-new", "channel": "stable"}
    )
    assert response.status == 201
    comments = Comments(api, github, installation)
    await comments.settled()
    number = tracking_issue(github)
    await comments.say(CONTROL, number, "/status", user="triager")
    # GitHub stops taking the installation token: the app must get a new one, and say
    # what happened without quoting it.
    github.revoke_token(github.token_for(installation))
    await comments.say(CONTROL, number, "/pause checking the logs", user="writer")
    assert len(github.tokens) >= 2
    # GitHub fails while a command is handled: the delivery is retried later, and the
    # failure is logged.
    github.inject("GET /repos/*/collaborators/*/permission", status=502, times=None)
    _, data = comments.post(CONTROL, number, "/resume", user="maintainer")
    response, _ = await api.post(HOOK, data=data, headers=headers_for("issue_comment", data))
    assert response.status == 202

    async def failed_once() -> bool:
        (delivery,) = await store.list_deliveries(status="pending", before=None, limit=1)
        return delivery.attempts > 0

    await wait_until(failed_once)
    github.clear_faults()
    clock.advance(timedelta(minutes=1))
    api.services.deliveries.wake.set()
    await comments.settled()
    _, data = comments.post(CONTROL, number, "/advance", user="maintainer")
    response, _ = await api.post(
        HOOK,
        data=data,
        headers=headers_for("issue_comment", data, **{"X-Hub-Signature-256": "sha256=" + "0" * 64}),
    )
    assert response.status == 401

    # A workflow's tokens: one the canary's policy accepts, one from another repository.
    claims = issuer.claims(
        clock.now(),
        repository=RUNNER,
        repository_id=str(github.repo(RUNNER).id),
        workflow_ref=f"{RUNNER}/.github/workflows/canary.yml@refs/heads/main",
    )
    good = issuer.mint(claims)
    foreign = issuer.mint({**claims, "repository": "mallory/runner"})
    for token, verified in ((good, True), (foreign, False)):
        response, _ = await api.post(
            "/canary/build-new/results",
            headers={"Authorization": f"Bearer {token}"},
            json={"results": []},
        )
        assert (response.status != 401) is verified
    fixed = [WEBHOOK_SECRET, METRICS_TOKEN, NPM_TOKEN, good, foreign]
    return [*fixed, admin, viewer, runner, revoked, unknown, fresh]


# -- echoed user text ------------------------------------------------------------------------

# What a commenter might type to make the bot's comment ping people, reference issues,
# render HTML, links or images, or break out of the bot's formatting.
HOSTILE = (
    "@everyone @acme/oncall <img src=x onerror=alert(1)> <details open> [click](https://evil.example)"
    " ![pixel](https://evil.example/p.png) ``` #1 acme/control#1 **loud** <!-- \u202egnirts"
)
# None of these may show in anything the bot writes, exactly as typed.
RAW = [
    "@everyone",
    "@acme/oncall",
    "<img",
    "<details",
    "[click](",
    "![pixel]",
    "```",
    "#1",
    "**loud**",
    "<!-- \u202e",
    "\u202e",
]


async def test_echoed_user_text_pings_no_one_and_renders_as_plain_text(
    steering: Comments, github: FakeGitHub
) -> None:
    api = steering.api
    number = tracking_issue(github)
    lobby = github.add_issue(CONTROL, "Releases")
    sync = api.services.pipeline.component("tracking_sync")  # type: ignore[union-attr]
    assert isinstance(sync, TrackingSync)
    await steering.say(CONTROL, lobby, f"/freeze {HOSTILE}", user="maintainer")
    await sync.sync()  # the tracking issue's body shows the freeze and its reason
    await steering.settled()
    frozen_body = github.repo(CONTROL).issue(number)["body"]
    await steering.say(CONTROL, number, "/status", user="triager")  # says what is next
    await steering.say(CONTROL, lobby, "/unfreeze", user="maintainer")
    await steering.say(CONTROL, number, f"/pause {HOSTILE}", user="writer")
    # Refusals quote what was asked for.
    await steering.say(
        CONTROL, lobby, "/rollout <img/src=x/onerror=alert(1)> beta", user="maintainer"
    )
    await steering.say(CONTROL, number, "/approve @everyone", user="maintainer")
    # An admin's reason through the API lands in the issue too.
    rollout_id = (await rollout(api))["rolloutId"]
    response, _ = await api.post(
        f"/rollouts/{rollout_id}/rollback",
        token=await api.token("admin", name="oncall"),
        json={"reason": HOSTILE},
    )
    assert response.status == 200
    await sync.sync()  # and now the rollback's
    await steering.settled()
    # Not a command at all: nothing is said, so nothing is echoed.
    assert await steering.say(CONTROL, lobby, f"/{HOSTILE}", user="maintainer") is None

    bot = [c["body"] for c in github.repo(CONTROL).comments.values() if c["user"]["type"] == "Bot"]
    bodies = [issue["body"] or "" for issue in github.repo(CONTROL).issues.values()]
    written = "\n".join([*bot, *bodies, frozen_body])
    # The text was echoed, neutralised: in the freeze reply, the /status reply, the pause
    # and rollback comments, the refusal of the unknown build, and the issue body while
    # frozen (its next step and its freeze note) and once rolled back.
    assert written.count("&lt;img") >= 8, written
    found = [raw for raw in RAW if raw in written]
    assert not found, f"{found} in:\n{written}"
    # No mention, and no issue reference, can form anywhere the bot wrote.
    assert not re.search(r"@[\w-]", written), written
    assert not re.search(r"(?<![\w&])#\d", written), written


# -- request size and nesting ------------------------------------------------------------------

MiB = 1024 * 1024


def padded(document: object, size: int) -> io.BytesIO:
    """``document`` as JSON, padded with whitespace (still valid JSON) to ``size`` bytes,
    sent with its length announced."""
    text = json.dumps(document).encode()
    return io.BytesIO(text + b" " * (size - len(text)))


async def test_bodies_up_to_the_configured_limits_are_taken_and_larger_ones_are_413(
    make_api: MakeApi, settings: Settings
) -> None:
    """The limits are the settings', both above aiohttp's own default of 1 MiB."""
    api = await make_api(
        settings_override=settings.replace(
            max_body_bytes=int(1.5 * MiB),
            webhook_max_bytes=2 * MiB,
            github_webhook_secret=Secret(WEBHOOK_SECRET),
        )
    )
    admin = await api.token("admin")
    token = {"name": "big", "role": "viewer"}
    response, _ = await api.post("/tokens", token=admin, data=padded(token, int(1.4 * MiB)))
    assert response.status == 201
    response, body = await api.post("/tokens", token=admin, data=padded(token, int(1.6 * MiB)))
    assert (response.status, body["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")

    delivery = json.loads((WEBHOOKS / "issues.opened.0.json").read_text())
    for size, status in ((int(1.9 * MiB), 202), (int(2.1 * MiB), 413)):
        data = padded(delivery, size)
        headers = headers_for("issues", data.getvalue())
        response, _ = await api.post(HOOK, data=data, headers=headers)
        assert response.status == status, size


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        ("[" * 32 + "]" * 32, False),  # as deep as allowed: the schema has its say
        ("[" * 33 + "]" * 33, True),
        ('{"a":' * 33 + "1" + "}" * 33, True),
        ('[{"a":' * 20 + "1" + "}]" * 20, True),
        ("[" * 4000, True),  # deeper than the parser's own stack, and unfinished
        ('{"name": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "role": "viewer"}', False),
    ],
    ids=["32 lists", "33 lists", "33 objects", "40 mixed", "4000 unclosed", "brackets in text"],
)
async def test_json_nested_too_deep_is_refused_with_a_400_that_says_so(
    api: Api, body: str, refused: bool
) -> None:
    """Deep nesting would exhaust the stack of the parser or of the schema validators: a
    500 at best. It is refused before either runs into it."""
    response, answer = await api.post(
        "/tokens",
        token=await api.token("admin"),
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status in (400, 201)
    if refused:
        assert answer["error"] == {
            "code": "INVALID_JSON",
            "message": "the JSON nests more than 32 levels deep",
        }
    else:
        assert answer.get("error", {}).get("code") != "INVALID_JSON"


async def test_a_deeply_nested_delivery_is_a_400(make_api: MakeApi, settings: Settings) -> None:
    api = await make_api(
        settings_override=settings.replace(github_webhook_secret=Secret(WEBHOOK_SECRET))
    )
    data = b'{"action": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response, answer = await api.post(HOOK, data=data, headers=headers_for("issues", data))
    assert (response.status, answer["error"]["code"]) == (400, "INVALID_JSON")


# -- no fetching of URLs from configuration ------------------------------------------------------

# Values that would make a naive client fetch somewhere else than the registry or GitHub.
URLISH = [
    "https://evil.example/pkg",
    "http://127.0.0.1:9/pkg",
    "//evil.example/pkg",
    "file:///etc/passwd",
    "evil.example/pkg",
    "../../pkg",
    "pkg/../../admin",
    "pkg?redirect=https://evil.example",
    "pkg#fragment",
    "%2e%2e/pkg",
    "@evil.example:8080/pkg",
    "pkg@https://evil.example",
]


def test_the_providers_file_cannot_name_a_url(tmp_path: Path) -> None:
    """The registry comes from npm's own configuration and GitHub from the App's settings;
    the providers file only names packages and repositories, and anything URL-like is
    refused as a name."""
    tables = [f"[providers.p{n}]\nnpm = {json.dumps(url)}\n" for n, url in enumerate(URLISH)]
    tables += [
        f"[providers.g{n}]\ngithub = {json.dumps(url)}\n"
        for n, url in enumerate([*URLISH, "https://github.com/openai/codex", "git@github.com:a/b"])
    ]
    # Keys that would name an address are not part of the format at all, at the top
    # (first, before any table takes the keys that follow it) or in a provider.
    tables = [
        'registry = "https://evil.example/"\n',
        *tables,
        '[providers.r1]\nnpm = "fine"\nregistry = "https://evil.example/"\n',
        '[providers.r2]\nnpm = "fine"\nurl = "https://evil.example/"\n',
    ]
    path = tmp_path / "providers.toml"
    path.write_text("\n".join(tables))
    with pytest.raises(ProvidersFileError) as raised:
        load_providers(path)
    # One problem for each: every value and key above is refused.
    assert len(raised.value.problems) == len(tables), raised.value.problems


NAME_CHARS = "abz09.-_~!*'()@/:%?#&=+ \\"


@hypothesis.settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=NAME_CHARS, min_size=1, max_size=16),
        st.from_regex(r"@?[a-z0-9._~-]{1,8}(/[a-z0-9._~-]{1,8})?", fullmatch=True),
    )
)
def test_any_package_name_the_file_accepts_is_fetched_from_the_registry(name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "providers.toml"
        path.write_text(f"[providers.x]\nnpm = {json.dumps(name)}\n")
        try:
            (provider,) = [p for p in load_providers(path) if p.id == "x"]
        except ProvidersFileError:
            return  # refused: nothing is fetched
    assert provider.npm_package is not None
    registry = NpmRegistry("https://registry.example/npm/", "test")
    url = URL(registry.package_url(provider.npm_package), encoded=True)
    assert (url.scheme, url.host, url.port) == ("https", "registry.example", 443)
    segment = url.raw_path.removeprefix("/npm/")
    assert url.raw_path.startswith("/npm/") and "/" not in segment
    assert segment not in ("", ".", "..") and not url.raw_query_string and not url.raw_fragment


@hypothesis.settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=NAME_CHARS, min_size=1, max_size=16),
        st.from_regex(r"[A-Za-z0-9-]{1,6}/[A-Za-z0-9._-]{1,6}", fullmatch=True),
    )
)
def test_any_repository_the_file_accepts_is_read_from_github_alone(repo: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "providers.toml"
        path.write_text(f"[providers.x]\ngithub = {json.dumps(repo)}\n")
        try:
            (provider,) = [p for p in load_providers(path) if p.id == "x"]
        except ProvidersFileError:
            return
    assert provider.github_repo is not None
    owner, _, name = provider.github_repo.partition("/")
    # How the GitHub releases source asks for them.
    url = URL(
        sansio.format_url(
            "/repos/{owner}/{repo}/releases{?per_page}",
            {"owner": owner, "repo": name, "per_page": "30"},
            base_url="https://api.github.com",
        )
    )
    assert (url.host, url.parts[:2], url.parts[-1]) == (
        "api.github.com",
        ("/", "repos"),
        "releases",
    )
    assert url.path == f"/repos/{owner}/{name}/releases"


def test_the_sweep_config_cannot_point_the_app_at_an_address() -> None:
    """``.github/update-pipeline.yml`` is written by whoever controls a repository: its
    workflow is a file name in that repository and its ref a git ref name (both sent to
    GitHub's API for that repository); there is no key for an address."""
    for url in URLISH:
        with pytest.raises(ConfigError, match=r"sweep\.workflow"):
            parse_config(f"sweep:\n  workflow: {json.dumps(url)}\n", ["codex"])
    # A ref such as evil.example/pkg is a fine branch name (it only ever goes into the
    # body of a workflow dispatch); one with a scheme or a host is none.
    for url in [u for u in URLISH if "//" in u]:
        text = f"sweep:\n  workflow: sweep.yml\n  ref: {json.dumps(url)}\n"
        with pytest.raises(ConfigError, match=r"sweep\.ref"):
            parse_config(text, ["codex"])
    for key in ("url", "registry", "webhook", "api_url", "callback"):
        with pytest.raises(ConfigError, match="unknown key"):
            parse_config(f"sweep:\n  workflow: sweep.yml\n  {key}: https://evil.example/\n", [])
        with pytest.raises(ConfigError, match="unknown top-level key"):
            parse_config(f"{key}: https://evil.example/\nsweep:\n  workflow: sweep.yml\n", [])


@pytest.fixture
async def trap() -> AsyncIterator[tuple[str, list[str]]]:
    """A server nothing should ever reach; its address, and what reached it."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(f"{request.method} {request.path_qs}")
        return web.Response(text="{}", content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/")), hits


async def test_a_sweep_config_full_of_addresses_makes_the_app_fetch_none(
    make_api: MakeApi,
    github_settings: Settings,
    github: FakeGitHub,
    trap: tuple[str, list[str]],
) -> None:
    address, hits = trap
    swept, bent, extra = "acme/svc", "acme/bent", "acme/extra"
    installation = github.add_installation(account="acme", repos=[swept, bent, extra])
    # Addresses as input values are data for the workflow: sent, never fetched.
    opt_in(github, swept, inputs={"callback": address + "hook", "mirror": address})
    opt_in(github, bent, text=f"sweep:\n  workflow: {address}sweep.yml\n")
    opt_in(github, extra, text=f"sweep:\n  workflow: sweep.yml\n  registry: {address}\n")
    api = await make_api(settings_override=github_settings, with_github=True)

    async def installed() -> bool:
        return await api.services.store.installation_for_repository(swept) is not None

    await wait_until(installed)
    admin = await api.token("admin")
    response, sweep = await api.post(
        "/sweeps", token=admin, json={"provider": "codex", "version": "0.47.0"}
    )
    assert response.status == 201, sweep
    await Comments(api, github, installation).settled()

    assert [r["repository"] for r in sweep["repositories"]] == [swept]
    (dispatch,) = github.repo(swept).dispatches
    assert dispatch["inputs"]["callback"] == address + "hook"
    _, repos = await api.get("/sweeps/repos?all=true", token=admin)
    states = {r["repository"]: r["state"] for r in repos["items"]}
    assert states == {swept: "opted_in", bent: "misconfigured", extra: "misconfigured"}
    assert hits == []
    # Everything the app asked, it asked GitHub, about the App or these repositories.
    assert {r.path.split("/")[1] for r in github.requests} <= {"app", "installation", "repos"}
    assert {
        "/".join(r.path.split("/")[2:4]) for r in github.requests if r.path.startswith("/repos/")
    } <= {swept, bent, extra}
