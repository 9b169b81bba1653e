"""Contract tests: schemathesis drives every documented operation of a running server.

The server is the real aiohttp application (``create_app`` with the pipeline and the
components ``serve`` starts, minus what needs GitHub or the network), listening on a free
port of 127.0.0.1 in a background thread; the requests go over real HTTP. The cases come
from the description the route table gives, which is exactly what the server serves at
``/openapi.json`` (a test below checks that), so the operations are known when pytest
collects and each one is its own test case.

Every answer must pass schemathesis' checks: no server error (503 only where it is
documented, 500 never), a documented status, a documented content type, a body that
validates against its schema, documented headers. Schemathesis' coverage phase sends the
invalid inputs (each constraint broken in turn, wrong types, missing fields, other
methods); its fuzzing phase sends valid ones. Every case is sent with an admin token,
each valid one also with a token of a role the route refuses, and some with a bearer
token that is no API token at all.

Generated ids would only ever meet 404s, so the server is seeded (builds, one of them
known-good, orgs, three rollouts in different states, spare tokens, a stored delivery,
parked outbox entries, a sweep) and hooks put those ids in place of generated ones, in
paths and in a few body fields, along with edge values generation would hardly hit.

A second, degraded server (its pipeline failed to start, no webhook secret, a one-byte
body limit, a metrics token) runs the operations whose 503, 413 or 401 only that state
gives. The webhook endpoint gets its own property test with signed deliveries, and the
inputs the contract run found bugs with are sent once more, each on its own.

Finally, every status the description documents must have been answered during the run
or be in ``UNREACHED``, where each entry says why generated inputs do not reach it.

Bounded for CI: a fixed number of examples per operation, derandomized (the same cases
on every run), no example database; the file takes about 40 seconds on two cores.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import zlib
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import NotAServerErrorConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.api import build_route_table
from app.api.openapi import build_openapi
from app.api.routing import DATABASE_BUSY, PREFIX, Route
from app.auth import Role, TokenSpec
from app.clock import Clock
from app.config import Secret, Settings
from app.fleet.service import retention
from app.pipeline import Component, UpdatePipeline
from app.pipeline.canary.service import CanaryTimeouts
from app.pipeline.version.watcher import Release, VersionWatcher
from app.rollouts.controller import RolloutTimer
from app.server import create_app, github_components, start_pipeline
from app.services import Services
from app.store import NewEffect, SqliteStore, Sweep, SweepRepo, SweepRun

MAX_EXAMPLES = 20  # per operation, in the fuzzing phase (the coverage phase adds its own)
DEGRADED_EXAMPLES = 5
STREAM_SECONDS = 0.3  # how long an event stream is read before the client hangs up
WEBHOOK_SECRET = "contract-webhook-secret"
METRICS_TOKEN = "contract-metrics-token"
WEBHOOK_PATH = "/api/github/webhooks"
STREAM_PATH = f"{PREFIX}/events/stream"

TABLE = build_route_table()
ROUTES: dict[tuple[str, str], Route] = {(r.method, r.full_path): r for r in TABLE.routes}
OPENAPI = build_openapi(TABLE)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
HYPOTHESIS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _load(max_examples: int, *, coverage: bool) -> Any:
    loaded = schemathesis.openapi.from_dict(OPENAPI)
    loaded.config.generation.update(max_examples=max_examples, deterministic=True)
    if coverage:
        # The coverage phase sends the invalid inputs, systematically (each constraint
        # broken in turn, wrong types, missing fields, other methods); the fuzzing
        # phase's examples are then all valid ones, which reach the handlers' logic.
        loaded.config.phases.fuzzing.generation.update(modes=[GenerationMode.POSITIVE])
    else:
        loaded.config.phases.coverage.enabled = False
    # 503 is a documented answer on some routes (status_code_conformance checks that it
    # is documented where it appears); every other 5xx, 500 above all, is a failure.
    loaded.config.checks.not_a_server_error = NotAServerErrorConfig(
        expected_statuses=["2XX", "3XX", "4XX", "503"]
    )
    return loaded


schema = _load(MAX_EXAMPLES, coverage=True)

# (METHOD, path template) -> statuses answered; filled by every test below.
SEEN: dict[tuple[str, str], set[int]] = defaultdict(set)
# Operations the main contract test ran in this session (for the coverage test).
RAN: set[tuple[str, str]] = set()


# -- The server ------------------------------------------------------------------------


class FixedSource:
    """A version source that always announces the same two releases (no network)."""

    kind = "npm"

    def __init__(self, provider_id: str) -> None:
        self.provider_id = provider_id
        self.key = f"npm:{provider_id}"

    async def fetch(self) -> list[Release]:
        at = datetime(2026, 1, 1, tzinfo=UTC)
        return [
            Release("1.0.0", at, False, "https://example.test/1.0.0"),
            Release("1.1.0-beta.1", at, True),
        ]


class FailingComponent:
    name = "broken"

    async def start(self, pipeline: UpdatePipeline) -> None:
        raise RuntimeError("cannot reach the registry")

    async def stop(self) -> None:  # pragma: no cover - never started
        pass


class Server:
    """The app on a free port of 127.0.0.1, served by its own event loop in a thread."""

    def __init__(self, settings: Settings, *, broken: bool = False) -> None:
        self.settings = settings
        self.broken = broken
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""
        self.tokens: dict[Role, str] = {}

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    async def _start(self) -> None:
        self.store = await SqliteStore.open(self.settings.db_path)
        services = Services.build(self.settings, self.store, Clock())
        self.services = services
        components: list[Component]
        if self.broken:
            components = [FailingComponent()]
        else:
            # What serve() starts, without GitHub (not configured) and with a version
            # source that needs no network.
            watcher = VersionWatcher(
                services.store,
                services.bus,
                services.clock,
                [p.id for p in self.settings.providers],
                [FixedSource("codex")],
                interval=timedelta(minutes=5),
                polling=False,
            )
            components = [
                *github_components(services),
                watcher,
                CanaryTimeouts(services.canary),
                retention(services.fleet),
                RolloutTimer(services.rollouts),
            ]
        await start_pipeline(services, components)
        self.runner = web.AppRunner(create_app(services), shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        for role in Role:
            spec = TokenSpec(f"contract-{role.value}", role, "contract-org", None)
            if role is not Role.RUNNER:
                spec = TokenSpec(spec.name, role, None, None)
            (issued,) = await services.tokens.issue([spec], by="contract test")
            self.tokens[role] = issued.secret

    async def _stop(self) -> None:
        await self.runner.cleanup()
        if self.services.pipeline is not None:
            await self.services.pipeline.stop()
        await self.store.close()

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        response = requests.request(
            method,
            self.url + PREFIX + path,
            json=body,
            headers={"Authorization": f"Bearer {self.tokens[Role.ADMIN]}"},
            timeout=10,
        )
        assert response.status_code < 300, (method, path, response.status_code, response.text)
        return response.json()


# What the generated requests are steered towards, per operation ("METHOD /template"):
# path parameter sets naming objects the seed made, and body field values (ids, and edge
# values generation would hardly hit). KEEP leaves the generated value (or its absence).
# Hypothesis draws the first values of a list most often: the likeliest to reveal
# something come first. Each operation gets its own objects where the others' tests
# would spoil them (PUT /orgs does not touch the orgs the rollouts count on).
KEEP = object()
PATHS: dict[str, list[dict[str, str]]] = defaultdict(list)
FIELDS: dict[str, dict[str, list[Any]]] = defaultdict(dict)
BUILT_AT = [
    KEEP,
    "0080-09-13T01:26:59Z",  # year 80: the store writes four-digit years
    "0001-01-01T00:00:00+01:00",  # before year 1 once in UTC
    "9999-12-31T23:59:59-01:00",  # after year 9999 once in UTC
]
EXPIRES_IN = [KEEP, "30d", "0s", "3000000d", "999999999999d"]


def _paths(operations: str, template: str, *values: dict[str, str]) -> None:
    for method in operations.split():
        PATHS[f"{method} {PREFIX}{template}"].extend(values)


def _fields(operations: str, template: str, **fields: list[Any]) -> None:
    for method in operations.split():
        FIELDS[f"{method} {PREFIX}{template}"].update(fields)


def seed(server: Server) -> None:
    """Objects for the generated requests to find, made through the API where it can."""
    now = datetime.now(UTC)
    builds = [f"contract-build-{n}" for n in (1, 2, 3)]
    for n, build_id in enumerate(builds, start=1):
        server.call(
            "POST",
            "/builds",
            {
                "buildId": build_id,
                "runnerVersion": f"1.{n}.0",
                "runtimeVersions": {"codex": "1.0.0"},
            },
        )
    # contract-build-3 passes its canary: known-good, so channels and rollouts take it.
    passed = [{"name": f"t{n}", "provider": "codex", "status": "passed"} for n in range(20)]
    server.call("POST", f"/canary/{builds[2]}/results", {"results": passed})
    by_build = [{"buildId": b} for b in builds]
    _paths("GET", "/builds/{buildId}", *by_build)
    _paths("GET", "/canary/{buildId}/metrics", *by_build)
    _paths("GET", "/canary/{buildId}/results", *by_build)
    # build-1's run takes results (200) until it has them (then 409, as build-3's does).
    _paths("POST", "/canary/{buildId}/results", {"buildId": builds[0]}, {"buildId": builds[2]})
    _fields(
        "POST",
        "/builds",
        runtimeVersions=[{"codex": "1.2.0"}, KEEP],  # a provider the server knows
        buildId=[KEEP, KEEP, builds[0]],  # an existing one: 409
        builtAt=BUILT_AT,
    )
    _paths("PUT", "/channels/{channel}", {"channel": "beta"}, {"channel": "stable"})
    _fields(
        "PUT",
        "/channels/{channel}",
        buildId=[builds[2], builds[0], KEEP],  # known-good (200), not (409), unknown (404)
        force=[KEEP, True],
    )

    server.call("PUT", "/orgs/contract-org", {"channel": "stable"})
    enterprise = {"channel": "stable", "enterprise": {"approvalRequired": True}}
    server.call("PUT", "/orgs/contract-enterprise", enterprise)
    _paths("GET", "/orgs/{orgId}", {"orgId": "contract-org"}, {"orgId": "contract-enterprise"})
    _paths("PUT", "/orgs/{orgId}", {"orgId": "contract-other-org"})
    _fields(
        "PUT",
        "/orgs/{orgId}",
        channel=["stable", "beta", KEEP],
        pinnedBuildId=[KEEP, builds[2]],
        versionPins=[KEEP, {"codex": "1.0.0"}],
    )
    _fields("POST", "/heartbeat", orgId=["contract-org", KEEP], buildId=[builds[1], KEEP])

    # Rollouts: a live one on stable (the commands steer it; contract-enterprise awaits
    # its approval), one rolled back on beta (409 for every command), and one completed
    # on beta, within its rollback window. Beta has no live rollout: one may start.
    live = server.call(
        "POST",
        "/rollouts",
        {"buildId": builds[1], "channel": "stable", "force": True, "reason": "contract test"},
    )["rolloutId"]
    dead = server.call(
        "POST",
        "/rollouts",
        {"buildId": builds[0], "channel": "beta", "force": True, "reason": "contract test"},
    )["rolloutId"]
    server.call("POST", f"/rollouts/{dead}/rollback", {"reason": "contract test"})
    completed = server.call("POST", "/rollouts", {"buildId": builds[2], "channel": "beta"})
    completed = completed["rolloutId"]
    server.call("POST", f"/rollouts/{completed}/advance", {"to": 100})
    _fields(
        "POST",
        "/rollouts",
        channel=["beta", "stable", KEEP],
        buildId=[builds[1], KEEP, builds[2], builds[0]],
        force=[True, KEEP],
        reason=["contract test", KEEP],
    )
    for suffix in ("", "/history", "/orgs"):
        _paths(
            "GET",
            "/rollouts/{rolloutId}" + suffix,
            *({"rolloutId": r} for r in (live, dead, completed)),
        )
    for suffix in ("/pause", "/resume", "/advance", "/approve"):
        _paths("POST", "/rollouts/{rolloutId}" + suffix, {"rolloutId": live}, {"rolloutId": dead})
    _fields("POST", "/rollouts/{rolloutId}/approve", orgId=["contract-enterprise", KEEP])
    # Not the live one (the approvals come after); a rollout POST /rollouts starts goes
    # first (see call_and_check), as the completed one is no longer the latest then.
    _paths("POST", "/rollouts/{rolloutId}/rollback", {"rolloutId": completed}, {"rolloutId": dead})

    spares = [f"contract-spare-{n}" for n in range(3)]
    server.call("POST", "/tokens", [{"name": name, "role": "viewer"} for name in spares])
    _paths("DELETE", "/tokens/{name}", *({"name": name} for name in spares))
    _fields("POST", "/tokens", name=[KEEP, "contract-viewer"], expiresIn=EXPIRES_IN)

    async def in_store() -> None:
        services, store = server.services, server.store
        await services.deliveries.accept(
            "issues",
            "contract-delivery",
            b'{"action":"opened"}',
            action="opened",
            installation_id=None,
        )
        # Outbox: a parked comment to retry (200), and a parked issue-body edit that a
        # newer pending edit of the same issue replaces (409).
        await store.add_effects(
            [
                NewEffect(1, "contract/issue#1", "comment", {"body": "x"}),
                NewEffect(1, "contract/issue#2", "issue_body", {"body": "old"}, "issue#2"),
            ],
            now,
        )
        parked = await store.list_effects(status="pending", limit=10)
        for effect in parked:
            await store.fail_effect(effect.id, "refused", retry_at=None, at=now)
        newer = NewEffect(1, "contract/issue#2", "issue_body", {"body": "new"}, "issue#2")
        await store.add_effects([newer], now)
        for effect in sorted(parked, key=lambda e: e.kind != "issue_body"):
            _paths("POST", "/outbox/{id}/retry", {"id": str(effect.id)})
        # A sweep with one repository, to report results for.
        repo = "contract-owner/contract-repo"
        await store.save_sweep_repo(SweepRepo(repo, 1, "opted_in", {"workflow": "sweep.yml"}))
        sweep = Sweep("contract-sweep", "running", "codex", "1.0.0", None, None, "test", now)
        run = SweepRun("contract-sweep", repo, 1, "sweep.yml", "main", {}, "in_progress", now)
        await store.add_sweep(sweep, [run], now, keep_events=services.bus.keep)

    server.run(in_store())
    _paths("POST", "/webhooks/deliveries/{id}/retry", {"id": "contract-delivery"})
    _paths("GET", "/sweeps/{sweepId}", {"sweepId": "contract-sweep"})
    _paths("POST", "/sweeps/{sweepId}/results", {"sweepId": "contract-sweep"})
    _fields("POST", "/sweeps/{sweepId}/results", repository=["contract-owner/contract-repo", KEEP])
    _paths(
        "PUT DELETE",
        "/sweeps/repos/{owner}/{repo}/exclusion",
        {"owner": "contract-owner", "repo": "contract-repo"},
    )
    _fields("POST", "/sweeps", buildId=[builds[0], KEEP])


def _key(operation: Any) -> str:
    return f"{operation.method.upper()} {operation.path}"


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    known = PATHS.get(_key(context.operation), [])
    if not known:
        return st.just(path_parameters)
    # Ids that exist two times in three.
    return st.sampled_from(known) | st.sampled_from(known) | st.just(path_parameters)


@schema.hook
def flatmap_body(context: Any, body: Any) -> Any:
    fields = FIELDS.get(_key(context.operation), {})
    if not fields or not isinstance(body, dict):
        return st.just(body)

    def merge(chosen: dict[str, Any]) -> dict[str, Any]:
        merged = {**body, **{f: v for f, v in chosen.items() if v is not KEEP}}
        return merged

    return st.fixed_dictionaries({f: st.sampled_from(v) for f, v in fields.items()}).map(merge)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = Settings(
        enabled=True,
        db_path=tmp_path_factory.mktemp("contract") / "contract.db",
        github_webhook_secret=Secret(WEBHOOK_SECRET),
        webhook_max_bytes=4096,
    )
    running = Server(settings)
    running.start()
    try:
        seed(running)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = Settings(
        enabled=True,
        db_path=tmp_path_factory.mktemp("degraded") / "degraded.db",
        max_body_bytes=1,  # every body but an empty one is too large: 413
        metrics_token=Secret(METRICS_TOKEN),
    )
    running = Server(settings, broken=True)
    running.start()
    try:
        yield running
    finally:
        running.stop()


# -- Calling -----------------------------------------------------------------------------


# Every case is sent with an admin token. Each valid case is also sent with a token of a
# role the route refuses (403; where every role may call it, the least one), and a third
# of them (chosen by their content, so a replayed case is sent the same way) with a
# bearer token that is no API token at all (401).
def _callers(case: schemathesis.Case) -> list[str]:
    if case.method.upper() != case.operation.method.upper():
        return ["admin"]  # the coverage phase's probes with other methods (405)
    if case.meta is not None and case.meta.generation.mode is GenerationMode.NEGATIVE:
        return ["admin"]  # a token is checked before the input: nothing more to learn
    key = repr((case.path_parameters, case.query, case.body))
    return ["admin", "refused", *(["bogus"] if zlib.crc32(key.encode()) % 3 == 0 else [])]


def _token(server: Server, case: schemathesis.Case, caller: str) -> str:
    route = ROUTES.get((case.operation.method.upper(), case.operation.path))
    if route is None or caller == "admin":
        return server.tokens[Role.ADMIN]
    if caller == "bogus":
        return "not-an-api-token"
    refused = [role for role in Role if not route.access.allows(role)]
    return server.tokens[(refused or [Role.RUNNER])[0]]


def _refused_by_the_http_parser(case: schemathesis.Case, response: Any) -> bool:
    """A request line longer than aiohttp takes (8190 bytes) is refused with a plain-text
    400 before the app sees it (docs/api.md, Errors). Only an invalid value, such as an
    over-long string, can make one: the description bounds every valid query."""
    meta = case.meta
    negative = meta is not None and meta.generation.mode is GenerationMode.NEGATIVE
    request = response.request
    line = len(request.method) + len(request.path_url) + len(" HTTP/1.1") + 1
    return (
        negative
        and response.status_code == 400
        and response.headers.get("Content-Type", "").startswith("text/plain")
        and line > 8190
    )


def call_and_check(server: Server, case: schemathesis.Case, *, others: bool = True) -> int:
    """Send the case (as each caller) and check every answer; the admin call's status."""
    statuses = []
    for caller in _callers(case) if others else ["admin"]:
        headers = {"Authorization": f"Bearer {_token(server, case, caller)}"}
        # An event stream never ends: read it briefly (schemathesis stops at the timeout).
        timeout = STREAM_SECONDS if case.operation.path == STREAM_PATH else 10
        response = case.call(base_url=server.url, headers=headers, timeout=timeout)
        statuses.append(response.status_code)
        if _refused_by_the_http_parser(case, response):
            continue
        if case.method.upper() == case.operation.method.upper():
            SEEN[(case.operation.method.upper(), case.operation.path)].add(response.status_code)
        case.validate_response(response, checks=CHECKS)
        if _key(case.operation) == f"POST {PREFIX}/rollouts" and response.status_code == 201:
            # A live rollout for the rollback test (the completed one is not the latest
            # of its channel any more).
            started = {"rolloutId": response.json()["rolloutId"]}
            PATHS[f"POST {PREFIX}/rollouts/{{rolloutId}}/rollback"].insert(0, started)
    return statuses[0]


@schema.parametrize()
@settings(HYPOTHESIS, max_examples=MAX_EXAMPLES)
def test_every_operation_keeps_its_contract(case: schemathesis.Case, server: Server) -> None:
    RAN.add((case.operation.method.upper(), case.operation.path))
    call_and_check(server, case)


# The operations whose documented 503, 413 or 401 only a degraded server gives.
DEGRADED_OPERATIONS = sorted(
    {
        route.operation_id
        for route in TABLE.routes
        if route.request is not None
        or route.operation_id
        in ("getReady", "getStatus", "checkVersions", "receiveWebhook", "getMetrics")
    }
)
# Bodies over a one-byte limit and a pipeline that is off: a few generated cases (valid
# or not) show it.
degraded_schema = _load(DEGRADED_EXAMPLES, coverage=False).include(operation_id=DEGRADED_OPERATIONS)


@degraded_schema.parametrize()
@settings(HYPOTHESIS, max_examples=DEGRADED_EXAMPLES)
def test_a_degraded_server_keeps_the_contract(case: schemathesis.Case, degraded: Server) -> None:
    call_and_check(degraded, case, others=False)


# -- Webhooks ------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)


@given(
    event=st.sampled_from(["ping", "issues", "installation", "push", ""]),
    delivery=st.sampled_from(["", "contract-1", "contract-2"]) | st.uuids().map(str),
    payload=st.dictionaries(st.sampled_from(["action", "installation", "zen"]), _JSON) | _JSON,
    raw=st.sampled_from([None, b"", b"not json", b"\xff\xfe", b" " * 5000]),
    content_type=st.sampled_from(["application/json", "application/json", "text/plain"]),
    signature=st.sampled_from(["good", "good", "good", "wrong", "sha1"]),
)
@settings(HYPOTHESIS, max_examples=40)
def test_signed_webhook_deliveries_keep_the_contract(
    server: Server,
    event: str,
    delivery: str,
    payload: Any,
    raw: bytes | None,
    content_type: str,
    signature: str,
) -> None:
    body = json.dumps(payload).encode() if raw is None else raw
    digest = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": content_type,
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
    }
    if signature == "good":
        headers["X-Hub-Signature-256"] = f"sha256={digest}"
    elif signature == "wrong":
        headers["X-Hub-Signature-256"] = f"sha256={'0' * 64}"
    else:
        headers["X-Hub-Signature"] = "sha1=" + "0" * 40
    case = schema[WEBHOOK_PATH]["POST"].Case()
    response = case.call(base_url=server.url, headers=headers, data=body, timeout=10)
    SEEN[("POST", WEBHOOK_PATH)].add(response.status_code)
    case.validate_response(response, checks=CHECKS)


# -- What the contract run found --------------------------------------------------------

# Each input made the server answer 500 (or, for the long query, a plain-text 400 from the
# HTTP parser) before app/api was fixed. The contract run draws such values only some of
# the time; these send each one.
FOUND: list[tuple[str, str, dict[str, Any], int]] = [
    # A cumulative failed or disconnected count above started: the rollout gates'
    # confidence interval took the square root of a negative number.
    (
        "POST",
        "/heartbeat",
        {
            "body": {
                "runnerId": "r",
                "orgId": "o",
                "bootId": "b",
                "sessions": {"started": 1, "failed": 5, "disconnected": 0},
            }
        },
        400,
    ),
    (
        "POST",
        "/heartbeat",
        {
            "body": {
                "runnerId": "r",
                "orgId": "o",
                "bootId": "b",
                "sessions": {"started": 0, "failed": 0, "disconnected": 2},
            }
        },
        400,
    ),
    # A builtAt in year 80 was stored as "80-09-13T..." and could not be read back
    # (every later list of builds failed too); offsets that move a date out of years
    # 1 to 9999 overflowed.
    *(
        (
            "POST",
            "/builds",
            {
                "body": {
                    "buildId": f"found-{n}",
                    "runnerVersion": "1",
                    "builtAt": built_at,
                    "runtimeVersions": {"codex": "1.0.0"},
                }
            },
            400,
        )
        for n, built_at in enumerate(BUILT_AT[1:])
    ),
    # A lifetime longer than a timedelta holds, or one that ends after year 9999.
    *(
        ("POST", "/tokens", {"body": {"name": "found", "role": "viewer", "expiresIn": e}}, 400)
        for e in ("999999999999d", "3000000d")
    ),
    # The longest valid ?type= query must fit aiohttp's request line (20 values of 100).
    ("GET", "/events", {"query": {"type": [",".join(["a" * 49, "b" * 50])] * 20}}, 200),
]


@pytest.mark.parametrize(
    ("method", "path", "parts", "status"),
    FOUND,
    ids=[f"{m} {p} {n}" for n, (m, p, _, _) in enumerate(FOUND)],
)
def test_inputs_the_contract_run_found_keep_the_contract(
    server: Server, method: str, path: str, parts: dict[str, Any], status: int
) -> None:
    case = schema[PREFIX + path][method].Case(**parts)
    assert call_and_check(server, case, others=False) == status


# -- What was reached ----------------------------------------------------------------------

# Documented statuses the generated requests do not reach, and why. 500 is documented on
# every operation and must never happen: not_a_server_error fails the run if it does.
UNREACHED: dict[tuple[str, str, str], str] = {
    ("POST", "/canary/{buildId}/results", "503"): "needs a GitHub Actions OIDC token and an"
    " issuer whose keys cannot be fetched; tests/test_canary.py covers it",
    ("POST", "/sweeps/{sweepId}/results", "503"): "needs a sweep workflow's OIDC token and an"
    " unreachable issuer; the same handling as the canary's",
    ("POST", "/sweeps", "201"): "sweeps dispatch workflows on GitHub and the contract server"
    " has no GitHub App, so it answers 503; tests/test_sweeps.py starts them on a fake GitHub",
    ("POST", "/sweeps", "404"): "the build is looked up once the App is known to be there"
    " (503 first); tests/test_sweeps.py covers it",
}


def _documented() -> Iterator[tuple[str, str, str]]:
    for path, operations in OPENAPI["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                # A locked database is documented on every operation, like a 500, and
                # reached in tests/test_faults.py; only a route's own 503 must be reached.
                if status == "503" and response["description"] == DATABASE_BUSY:
                    continue
                yield method.upper(), path, status


def test_the_served_description_is_the_one_the_cases_come_from(server: Server) -> None:
    served = requests.get(server.url + PREFIX + "/openapi.json", timeout=10).json()
    assert served == json.loads(json.dumps(OPENAPI))


def test_every_unreached_status_is_a_documented_one() -> None:
    documented = {(m, p.removeprefix(PREFIX), s) for m, p, s in _documented()}
    assert set(UNREACHED) <= documented


def test_every_documented_status_is_reached_or_explained() -> None:
    operations = {(m.upper(), p) for p, ops in OPENAPI["paths"].items() for m in ops}
    if operations != RAN:
        pytest.skip("needs the whole contract run (some operations were deselected)")
    unreached = [
        f"{method} {path} {status}"
        for method, path, status in _documented()
        if status != "500"
        and (method, path.removeprefix(PREFIX), status) not in UNREACHED
        and int(status) not in SEEN[(method, path)]
    ]
    assert unreached == [], "documented but never answered:\n" + "\n".join(unreached)
