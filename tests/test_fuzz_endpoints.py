"""Fuzzing every public endpoint with hostile and malformed input, in process.

tests/test_contract.py sends what the OpenAPI description allows (and each constraint
broken once); these tests send what a careless or hostile client would: valid bodies with
one field dropped, of the wrong type or unknown, bodies that are not JSON at all or nest
deeper than Python recurses, lone UTF-16 surrogates, any query string and any id in a
path, heartbeats and canary results of any shape, GitHub's real webhook payloads with
fields dropped or retyped (signed as GitHub signs them), and slash commands of any text
typed on the control repository. What must hold, whatever the input:

- no answer is a 500, and every answer is the one its operation documents (``Api``
  checks each against the served OpenAPI description);
- a refusal is a 4xx whose message names the field (or the query parameter) at fault;
- a refused request leaves the database exactly as it was, and what an accepted one
  stores can be read back;
- a stored webhook delivery is processed without an exception escaping the worker: it
  ends done, or failed with a one-line reason, to be retried or parked;
- a slash command is done or refused, its reply pings nobody, and what it stores is
  what the API would take.

Each test builds one app and runs all its examples against it (hypothesis' check on
function-scoped fixtures is off for that reason): an example only asserts what its own
request did. tests/fuzzing.py says how to run a longer search.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from app.api import build_route_table
from app.api.routing import Route
from app.auth import Access
from app.clock import ManualClock
from app.config import Settings
from app.github.app import GitHubApp
from app.github.webhooks import WebhookProcessor
from app.pipeline.version.watcher import VersionWatcher
from app.server import github_components
from app.services import Services
from app.store import BuildRecord
from tests.conftest import START, Api, MakeApi
from tests.fake_github import FakeGitHub
from tests.fuzzing import RAW_BODIES, dumps, fuzz, json_values, text, wrong_values
from tests.github_fixtures import WEBHOOK_SECRET, RecordedSleep
from tests.service_process import signature

ROUTES = build_route_table().routes
# By operation id: hypothesis prints what it drew, and a Route's repr is pages long.
OPERATIONS = {r.operation_id: r for r in ROUTES}
BODY_ROUTES = sorted(r.operation_id for r in ROUTES if r.request is not None)
QUERY_ROUTES = sorted(r.operation_id for r in ROUTES if r.query)
PATH_ROUTES = sorted(r.operation_id for r in ROUTES if r.path_params)
WEBHOOKS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "webhooks"
HOOK = "/api/github/webhooks"

OLD, NEW, PENDING = "fuzz-old", "fuzz-new", "fuzz-pending"
ORG, ENTERPRISE = "org-1", "org-ent"
CODEX = {"codex": "1.0.0"}
APPROVES = {"approvalRequired": True}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(max_body_bytes=16 * 1024)


# -- The database, before and after ---------------------------------------------------------

# Written by every authenticated request (to the minute), so not part of what a refusal
# must leave alone.
VOLATILE = {"api_tokens": {"last_used_at"}}
Rows = dict[str, list[tuple[Any, ...]]]


class Database:
    """The app's database file as the test sees it, on a connection of its own (WAL:
    what has committed). Reading every table is done again only when another connection
    committed since (SQLite's data_version says so), which a refusal should never do."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self._version: int | None = None
        self._rows: Rows = {}

    def rows(self) -> Rows:
        (version,) = self.db.execute("PRAGMA data_version").fetchone()
        if version != self._version:
            self._rows, self._version = self._read(), version
        return self._rows

    def changed(self, before: Rows) -> list[str]:
        """The tables whose rows differ from ``before``."""
        after = self.rows()
        return [table for table in after if after[table] != before.get(table)]

    def _read(self) -> Rows:
        tables = [
            row[0]
            for row in self.db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        found = {}
        for table in tables:
            columns = [
                row[1]
                for row in self.db.execute(f"PRAGMA table_info({table})")
                if row[1] not in VOLATILE.get(table, ())
            ]
            rows = self.db.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
            found[table] = sorted(rows, key=repr)
        return found


@pytest.fixture
def database(db_path: Path) -> Iterator[Database]:
    opened = Database(db_path)
    yield opened
    opened.db.close()


# -- Sending, and what every answer must be ---------------------------------------------------


async def send(
    api: Api,
    route: Route,
    path: dict[str, str],
    *,
    token: str,
    body: Any = None,
    raw: bytes | None = None,
    query: list[tuple[str, str]] | None = None,
) -> tuple[int, Any]:
    """Call the route; fail on a 500 or an answer its operation does not document."""
    url = route.full_path
    for name, value in path.items():
        url = url.replace("{" + name + "}", _quoted(value))
    if query:
        url += "?" + "&".join(f"{_quoted(name)}={_quoted(value)}" for name, value in query)
    data = raw if raw is not None else (dumps(body) if body is not None else None)
    response, answer = await api.request(
        route.method,
        url,
        token=token,
        data=data,
        headers={"Content-Type": "application/json"} if data is not None else None,
    )
    response.close()  # an event stream would otherwise stay open
    assert response.status != 500, answer
    if response.status >= 400:
        assert answer is not None, f"{route.method} {url}: {response.status} without a JSON body"
        assert answer["error"]["message"] and "Traceback" not in answer["error"]["message"]
    return response.status, answer


def _quoted(value: str) -> str:
    # Half a surrogate pair goes as its would-be UTF-8 bytes: %ED%A0%80 is no UTF-8 at all.
    return quote(value, safe="", errors="surrogatepass")


READ_BACK = ["/builds", "/channels", "/orgs", "/fleet", "/rollouts", "/freeze", "/tokens"]
READ_BACK += ["/events", "/versions", "/outbox", "/webhooks/deliveries", "/sweeps"]


async def reads_back(api: Api, admin: str) -> None:
    """Whatever was stored is served again: no list breaks on a row a request wrote."""
    for path in READ_BACK:
        response, answer = await api.get(path, token=admin)
        assert response.status == 200, (path, answer)


def names_the_field(message: str, field: str | None) -> bool:
    if field is None:
        return True
    field = json.loads(json.dumps(field))  # as the server reads it: a pair of halves is one
    return field in message or repr(field) in message


# -- A server with something in it --------------------------------------------------------------


class Seeded:
    def __init__(self, api: Api, admin: str, runner: str, rollout: str) -> None:
        self.api, self.admin, self.runner, self.rollout = api, admin, runner, rollout

    def path(self, route: Route) -> dict[str, str]:
        """Path parameters naming objects that exist, so bodies reach the handlers."""
        known = {
            "channel": "beta",
            "buildId": PENDING,
            "orgId": "fuzz-org",
            "rolloutId": self.rollout,
            "sweepId": "no-such-sweep",
            "name": "no-such-token",
            "id": "1",
            "owner": "acme",
            "repo": "runner",
        }
        return {name: known[name] for name in route.path_params}

    def token(self, route: Route) -> str:
        return self.runner if route.access is Access.RUNNER else self.admin


async def seed(api: Api) -> Seeded:
    """Builds (two known-good), the stable channel's build, an org and an enterprise org,
    and a live rollout on stable: what the valid bodies below refer to."""
    admin = await api.token("admin", name="fuzz-admin")
    runner = await api.token("runner", name="fuzz-runner", org=ORG)
    store = api.services.store
    for build in (OLD, NEW):
        record = BuildRecord(build, "1.0.0", START, {"codex": "1.0.0"}, known_good_for=["codex"])
        await store.add_build(record, START)
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/builds", {"buildId": PENDING, "runnerVersion": "1", "runtimeVersions": CODEX}),
        ("PUT", "/channels/stable", {"buildId": OLD, "reason": "seed"}),
        ("PUT", f"/orgs/{ORG}", {"channel": "stable"}),
        ("PUT", f"/orgs/{ENTERPRISE}", {"channel": "stable", "enterprise": APPROVES}),
    ]
    for method, path, body in calls:
        response, answer = await api.request(method, path, token=admin, json=body)
        assert response.status < 300, answer
    response, answer = await api.post(
        "/rollouts", token=admin, json={"buildId": NEW, "channel": "stable"}
    )
    assert response.status == 201, answer
    return Seeded(api, admin, runner, answer["rolloutId"])


@pytest.fixture
async def seeded(make_api: MakeApi) -> Seeded:
    return await seed(await make_api())


# Valid bodies to start from, per operation: every optional field present, so that each
# can be dropped or broken.
VALID: dict[str, Any] = {
    "issueTokens": {"name": "fuzz-issued", "role": "runner", "orgId": ORG, "expiresIn": "30d"},
    "registerBuild": {
        "buildId": "fuzz-registered",
        "runnerVersion": "2.0.0",
        "runtimeVersions": {"codex": "1.1.0", "claude_code": "2.0.0-beta.1"},
        "builtAt": "2026-02-01T00:00:00Z",
        "repository": "acme/runner",
        "commitSha": "a" * 40,
    },
    "setChannel": {"buildId": OLD, "reason": "fuzz", "force": True},
    "postCanaryResults": {
        "results": [
            {
                "name": "starts",
                "provider": "codex",
                "status": "passed",
                "sessionStartMs": 120.5,
                "timeToFirstOutputMs": 300,
                "disconnected": False,
                "message": None,
            }
        ]
    },
    "heartbeat": {
        "runnerId": "r-1",
        "orgId": ORG,
        "bootId": "b-1",
        "buildId": OLD,
        "runtimes": {"codex": "1.0.0"},
        "sessions": {"started": 5, "failed": 1, "disconnected": 1},
    },
    "setOrg": {
        "channel": "beta",
        "pinnedBuildId": None,
        "versionPins": {"codex": "1."},
        "enterprise": {"approvalRequired": False},
    },
    "startRollout": {"buildId": OLD, "channel": "beta", "force": True, "reason": "fuzz"},
    "pauseRollout": {"reason": "fuzz"},
    "resumeRollout": {},
    "advanceRollout": {"to": 100},
    "rollbackRollout": {"reason": "fuzz"},
    "approveRolloutOrg": {"orgId": ENTERPRISE, "skip": False},
    "freezeRollouts": {"reason": "fuzz"},
    "startSweep": {"provider": "codex", "version": "1.0.0"},
    "postSweepResults": {"results": [{"name": "ok", "status": "passed"}], "repository": "a/b"},
}


def test_every_route_with_a_body_has_a_valid_one_to_start_from() -> None:
    assert set(BODY_ROUTES) == set(VALID)


# -- Bodies ---------------------------------------------------------------------------------


def locations(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document: dict keys and list indexes, the root first."""
    yield at
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from locations(inner, (*at, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from locations(inner, (*at, index))


def field_of(where: tuple[Any, ...]) -> str | None:
    """The field a refusal must name for a change at ``where``: its nearest key."""
    keys = [part for part in where if isinstance(part, str)]
    return keys[-1] if keys else None


def value_at(document: Any, where: tuple[Any, ...]) -> Any:
    for part in where:
        document = document[part]
    return document


def parent(document: Any, where: tuple[Any, ...]) -> Any:
    return value_at(document, where[:-1])


@st.composite
def broken_bodies(draw: st.DrawFn, valid: Any) -> tuple[Any, bytes | None, str | None]:
    """(body, raw bytes, field): a valid body broken in one place, and the field a
    refusal must name; or something that is not such a body at all (no field)."""
    kind = draw(st.sampled_from(["drop", "replace", "text", "text", "add", "raw", "any"]))
    body = copy.deepcopy(valid)
    places = list(locations(body))
    if kind == "text":
        strings = [w for w in places if w and isinstance(value_at(body, w), str)]
        if strings:
            where = draw(st.sampled_from(strings))
            parent(body, where)[where[-1]] = draw(HOSTILE_STRINGS)
            return body, None, field_of(where)
    if kind == "drop":
        keyed = [w for w in places if w and isinstance(w[-1], str)]
        if keyed:
            where = draw(st.sampled_from(keyed))
            del parent(body, where)[where[-1]]
            return body, None, where[-1]
    if kind == "replace":
        where = draw(st.sampled_from(places))
        value = draw(wrong_values())
        if not where:
            return value, None, None
        parent(body, where)[where[-1]] = value
        return body, None, field_of(where)
    if kind == "add":
        objects = [w for w in places if isinstance(value_at(body, w), dict)]
        where = draw(st.sampled_from(objects))
        key = draw(st.sampled_from(["extra", "", "__proto__"]) | text(10, surrogates=True))
        target = value_at(body, where)
        if key not in target:
            target[key] = draw(json_values())
            return body, None, key
    if kind == "raw":
        return None, draw(RAW_BODIES | st.binary(max_size=50)), None
    return draw(json_values()), None, None


# Strings where a valid body has one: lone surrogates (a JSON escape carries them), text
# longer than any limit, and Unicode that is not what it looks like.
HOSTILE_STRINGS = text(60, surrogates=True) | st.sampled_from(
    ["\ud800", "a\udfff", "\udbff\udbff", "x" * 600, "", " ", "\u0661", "1\u0661.0.0", "\u202e"]
)


def body_cases() -> st.SearchStrategy[tuple[str, Any, bytes | None, str | None]]:
    """(operation, body, raw bytes, field) for any operation that takes a body."""
    return st.sampled_from(BODY_ROUTES).flatmap(
        lambda operation: broken_bodies(VALID[operation]).map(lambda b: (operation, *b))
    )


@fuzz(240, app=True)
@given(case=body_cases())
@example(case=("advanceRollout", None, b"1" * 5000, None))  # int() refuses 4,301+ digits
@example(case=("heartbeat", None, b"[" * 2000 + b"]" * 2000, None))  # past Python's stack
@example(case=("freezeRollouts", {"reason": "a\ud800"}, None, "reason"))  # not storable
@example(case=("issueTokens", {**VALID["issueTokens"], "orgId": "\udfff"}, None, "orgId"))
@example(case=("issueTokens", {"name": "r", "role": "runner"}, None, "orgId"))  # unnamed
@example(case=("startSweep", {"version": "1.0.0"}, None, "provider"))  # oneOf: unnamed
@example(case=("heartbeat", {**VALID["heartbeat"], "runtimes": {"\ud800": "1"}}, None, "runtimes"))
async def test_a_broken_body_is_refused_naming_its_field_and_changes_nothing(
    seeded: Seeded, database: Database, case: tuple[str, Any, bytes | None, str | None]
) -> None:
    operation, body, raw, field = case
    route = OPERATIONS[operation]
    before = database.rows()
    status, answer = await send(
        seeded.api, route, seeded.path(route), token=seeded.token(route), body=body, raw=raw
    )
    event(f"{operation}: {status}")  # --hypothesis-show-statistics shows what was reached
    if status >= 400:
        assert database.changed(before) == [], answer
        error = answer["error"]
        # JSON that parses is refused naming the field: by the schema, by the handler, or
        # for a lone surrogate (which the message cannot quote when it is in a key).
        if status == 400 and raw is None and error["code"] in ("VALIDATION_FAILED", "INVALID_JSON"):
            assert names_the_field(error["message"], field) or (
                "one of its keys" in error["message"] and re.search("[\ud800-\udfff]", field)
            ), (field, error["message"])
    else:
        await reads_back(seeded.api, seeded.admin)


# -- Query strings and paths ------------------------------------------------------------------

QUERY_VALUES = text(30, surrogates=True) | st.sampled_from(
    ["", "0", "-1", "501", "1e3", "true", "TRUE", "2" * 30, "abc", "%00", "\x00"]
)


def query_cases() -> st.SearchStrategy[tuple[str, list[tuple[str, str]]]]:
    def queries(operation: str) -> st.SearchStrategy[list[tuple[str, str]]]:
        names = st.sampled_from([q.name for q in OPERATIONS[operation].query]) | text(8)
        return st.lists(st.tuples(names, QUERY_VALUES), max_size=4)

    return st.sampled_from(QUERY_ROUTES).flatmap(
        lambda operation: queries(operation).map(lambda query: (operation, query))
    )


@fuzz(120, app=True)
@given(case=query_cases())
async def test_any_query_string_is_answered_or_refused_naming_the_parameter(
    seeded: Seeded, database: Database, case: tuple[str, list[tuple[str, str]]]
) -> None:
    operation, query = case
    route = OPERATIONS[operation]
    before = database.rows()
    status, answer = await send(
        seeded.api, route, seeded.path(route), token=seeded.admin, query=query
    )
    assert database.changed(before) == []  # reading changes nothing, refused or not
    if status == 400:
        message = answer["error"]["message"]
        assert any(names_the_field(message, name) for name, _ in query), message


# Any segment but "." and "..", which clients resolve before sending (another route).
PATH_VALUES = (
    text(40, surrogates=True) | st.sampled_from(["", "%2F", "a/b", "x" * 500, "-1", OLD, ORG])
).filter(lambda segment: segment not in (".", ".."))


def path_cases() -> st.SearchStrategy[tuple[str, dict[str, str]]]:
    def paths(operation: str) -> st.SearchStrategy[dict[str, str]]:
        names = OPERATIONS[operation].path_params
        return st.fixed_dictionaries({name: PATH_VALUES for name in names})

    return st.sampled_from(PATH_ROUTES).flatmap(
        lambda operation: paths(operation).map(lambda path: (operation, path))
    )


@fuzz(120, app=True)
@given(case=path_cases())
@example(case=("setOrg", {"orgId": "{"}))  # aiohttp's {orgId} takes no brace: a 404
async def test_any_id_in_a_path_gets_an_answer_and_a_refusal_changes_nothing(
    seeded: Seeded, database: Database, case: tuple[str, dict[str, str]]
) -> None:
    operation, path = case
    route = OPERATIONS[operation]
    body = VALID.get(route.operation_id)
    before = database.rows()
    status, answer = await send(
        seeded.api, route, path, token=seeded.token(route), body=body if body else None
    )
    if status >= 400:
        assert database.changed(before) == [], answer
    elif route.method != "GET":
        await reads_back(seeded.api, seeded.admin)


# -- Heartbeats -------------------------------------------------------------------------------

IDS = st.sampled_from(["r-1", "org-1", "a", "A.b:c-d_e", "x" * 128, "x" * 129, "-a", ""]) | text(
    20, surrogates=True
)
COUNTS = st.integers(-1, 10**9 + 1) | st.sampled_from([0, 1, 10**9])
RUNTIMES = st.dictionaries(
    st.sampled_from(["codex", "claude_code", "gemini_cli", "Codex", "x" * 65])
    | text(10, surrogates=True),
    st.sampled_from(["1.0.0", "v2.0.0-rc.1", "1\u0661.0.0", "1.0", "", "x" * 101])
    | text(12, surrogates=True),
    max_size=5,
)


# What the watcher records and heartbeats keep: SemVer's own text, ASCII digits only.
STRICT_VERSION = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?",
    re.ASCII,
)


@st.composite
def heartbeats(draw: st.DrawFn) -> dict[str, Any]:
    body = {
        "runnerId": draw(IDS),
        "orgId": draw(st.just(ORG) | IDS),
        "bootId": draw(IDS),
        "buildId": draw(st.sampled_from([None, OLD, NEW, "unknown-build"]) | IDS),
        "runtimes": draw(RUNTIMES),
        "sessions": {k: draw(COUNTS) for k in ("started", "failed", "disconnected")},
    }
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2, unique=True)):
        del body[key]
    return body


@fuzz(160, app=True)
@given(body=heartbeats(), as_admin=st.booleans())
@example(  # a runtime whose name is half a surrogate pair came back in a warning
    body={
        "runnerId": "r",
        "orgId": ORG,
        "bootId": "b",
        "runtimes": {"\ud800": "1.0.0"},
        "sessions": {"started": 1, "failed": 0, "disconnected": 0},
    },
    as_admin=False,
)
@example(
    body={
        "runnerId": "r",
        "orgId": ORG,
        "bootId": "b",
        "runtimes": {"codex": "1\u0661.0.0"},
        "sessions": {"started": 1, "failed": 0, "disconnected": 0},
    },
    as_admin=False,
)
async def test_a_heartbeat_of_any_shape_counts_once_or_is_refused_naming_the_field(
    heartbeat_api: Seeded, database: Database, body: dict[str, Any], as_admin: bool
) -> None:
    seeded = heartbeat_api
    route = OPERATIONS["heartbeat"]
    before = database.rows()
    token = seeded.admin if as_admin else seeded.runner
    status, answer = await send(seeded.api, route, {}, token=token, body=body)
    if status >= 400:
        assert database.changed(before) == [], answer
        if status == 400:  # the schema's path, or the handler's, into the body
            assert answer["error"]["message"].startswith("body"), answer
        return
    assert status == 200
    counted = database.rows()["session_counts"]
    assert (await send(seeded.api, route, {}, token=token, body=body))[0] == 200
    assert database.rows()["session_counts"] == counted  # the same heartbeat again: nothing
    (stored,) = database.db.execute(
        "SELECT runtimes FROM runners WHERE org_id = ? AND runner_id = ?",
        (body["orgId"], body["runnerId"]),
    ).fetchone()
    versions = database.db.execute("SELECT provider_id, version FROM runtime_versions").fetchall()
    # Only known providers with semantic versions are kept; the rest are warned about.
    kept = json.loads(stored)
    assert set(kept) <= {"codex", "claude_code", "gemini_cli"}
    for provider, version in [*kept.items(), *versions]:
        # Kept as the runner wrote it (docs/fleet.md), which may pad it with spaces.
        assert STRICT_VERSION.fullmatch(version.strip().removeprefix("v")), (provider, version)
    dropped = set(body.get("runtimes", {})) - set(kept)
    assert len(answer["warnings"]) >= len(dropped)
    await reads_back(seeded.api, seeded.admin)


@pytest.fixture
async def heartbeat_api(make_api: MakeApi, settings: Settings) -> Seeded:
    """With the version watcher running, as in production: heartbeats record versions."""

    def watcher(services: Services) -> list[VersionWatcher]:
        providers = [p.id for p in services.settings.providers]
        return [
            VersionWatcher(
                services.store,
                services.bus,
                services.clock,
                providers,
                [],
                interval=timedelta(hours=1),
                polling=False,
            )
        ]

    return await seed(await make_api(build=watcher))


# -- Canary results -------------------------------------------------------------------------

RESULT_FIELDS = {
    "name": text(20, surrogates=True) | st.sampled_from(["", "x" * 301, "t"]),
    "provider": st.sampled_from(["codex", "claude_code", "other", "Codex", ""]),
    "status": st.sampled_from(["passed", "failed", "errored", "skipped", "PASSED", ""]),
    "sessionStartMs": st.none() | st.floats(-1, 1e8) | st.integers(-1, 10**8),
    "timeToFirstOutputMs": st.none() | st.floats(0, 1e8, allow_infinity=False),
    "disconnected": st.booleans() | st.sampled_from([0, "true", None]),
    "message": st.none() | text(40, surrogates=True) | st.just("m" * 4001),
}
RESULT = st.fixed_dictionaries(
    {k: RESULT_FIELDS[k] for k in ("name", "provider", "status")},
    optional={k: v for k, v in RESULT_FIELDS.items() if k not in ("name", "provider", "status")},
)
_build_numbers = itertools.count()


@fuzz(100, app=True)
@given(results=st.lists(RESULT, max_size=8) | wrong_values())
async def test_canary_results_of_any_shape_are_judged_or_refused_naming_the_field(
    seeded: Seeded, database: Database, results: Any
) -> None:
    api, admin = seeded.api, seeded.admin
    build = f"fuzz-canary-{next(_build_numbers)}"
    register = {"buildId": build, "runnerVersion": "1", "runtimeVersions": {"codex": "1.0.0"}}
    response, answer = await api.post("/builds", token=admin, json=register)
    assert response.status == 201, answer
    route = OPERATIONS["postCanaryResults"]
    before = database.rows()
    status, answer = await send(
        api, route, {"buildId": build}, token=admin, body={"results": results}
    )
    if status >= 400:
        assert database.changed(before) == [], answer
        if status == 400:
            assert "results" in answer["error"]["message"], answer
        return
    assert answer["status"] in ("passed", "failed", "errored")
    for path in (f"/canary/{build}/metrics", f"/canary/{build}/results", f"/builds/{build}"):
        response, shown = await api.get(path, token=admin)
        assert response.status == 200, shown
    await reads_back(api, admin)


# -- Webhooks ------------------------------------------------------------------------------

RUNNER, CONTROL = "acme/runner", "acme/control"
INSTALLATION = 4242
PAYLOADS = {
    path.stem: json.loads(path.read_text())
    for path in sorted(WEBHOOKS.glob("*.json"))
    if not path.name.startswith("ping.")
}
# What the handlers read: broken more often than the rest of a payload.
HOT = (
    "action",
    "installation",
    "repository",
    "sender",
    "comment",
    "issue",
    "pull_request",
    "check_run",
    "check_suite",
    "workflow_run",
    "commits",
    "ref",
    "after",
    "changes",
    "repositories",
    "repositories_added",
    "repositories_removed",
    "requested_action",
)


class Hooks:
    """The app with GitHub wired in (against the fake) but no worker running: each test
    hands the stored delivery to the processor itself and looks at what became of it."""

    def __init__(self, api: Api, processor: WebhookProcessor) -> None:
        self.api, self.processor = api, processor
        self.ids = itertools.count()

    async def deliver(self, event: str, body: bytes) -> tuple[int, Any]:
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": f"fuzz-{next(self.ids)}",
            "X-Hub-Signature-256": signature(body, WEBHOOK_SECRET),
        }
        response, answer = await self.api.post(HOOK, data=body, headers=headers)
        # Signed as GitHub signs: refused, if at all, for what the body is.
        assert response.status not in (401, 500), answer
        return response.status, answer

    async def process(self) -> sqlite3.Row:
        """Process what intake stored; the delivery's row afterwards."""
        store, clock = self.api.services.store, self.api.services.clock
        (delivery,) = await store.due_deliveries(clock.now(), limit=5)
        await self.processor.process(delivery)  # nothing may escape it
        # By id: newest-first pages sort ids as text ("fuzz-99" before "fuzz-100").
        with closing(sqlite3.connect(self.api.services.settings.db_path)) as db:
            db.row_factory = sqlite3.Row
            return db.execute(
                "SELECT status, attempts, last_error FROM webhook_deliveries WHERE delivery_id = ?",
                (delivery.delivery_id,),
            ).fetchone()


@pytest.fixture
async def hooks(
    make_api: MakeApi,
    github_settings: Settings,
    github: FakeGitHub,
    clock: ManualClock,
    github_sleep: RecordedSleep,
) -> Hooks:
    github.add_installation(account="acme", repos=[RUNNER, CONTROL], id=INSTALLATION)
    github.set_permission(CONTROL, "maintainer", "maintain")
    github.set_permission(RUNNER, "maintainer", "maintain")
    processors: list[WebhookProcessor] = []

    def wire(services: Services) -> list[Any]:
        # What serve() wires, with the pipeline off so that no worker races the test.
        services.github = GitHubApp.from_settings(services.settings, clock, sleep=github_sleep)
        processors.extend(c for c in github_components(services) if isinstance(c, WebhookProcessor))
        return []

    settings = github_settings.replace(
        enabled=False, runner_repo=RUNNER, control_repo=CONTROL, max_body_bytes=16 * 1024
    )
    api = await make_api(settings_override=settings, build=wire)
    (processor,) = processors
    return Hooks(api, processor)


def retarget(payload: dict[str, Any], repo: str) -> dict[str, Any]:
    """The payload as if from one of the repositories the app acts on, so handlers go
    past their first checks."""
    payload = copy.deepcopy(payload)
    if isinstance(payload.get("repository"), dict):
        payload["repository"]["full_name"] = repo
        payload["repository"]["default_branch"] = "main"
    if "installation" in payload or "repository" in payload:
        payload["installation"] = {"id": INSTALLATION}
    # Someone allowed to run commands (not a bot, whose comments are ignored).
    if isinstance(payload.get("comment"), dict) and isinstance(
        payload["comment"].get("user"), dict
    ):
        payload["comment"]["user"].update(login="maintainer", type="User")
    if isinstance(payload.get("sender"), dict):
        payload["sender"].update(login="maintainer", type="User")
    return payload


@st.composite
def broken_payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(event, payload): a real payload with one to three fields dropped or retyped, half
    of them among the fields handlers read."""
    name = draw(st.sampled_from(sorted(PAYLOADS)))
    payload = retarget(PAYLOADS[name], draw(st.sampled_from([RUNNER, CONTROL])))
    for _ in range(draw(st.integers(1, 3))):
        places = [w for w in locations(payload) if w]
        hot = [w for w in places if w[0] in HOT and len(w) <= 3]
        where = draw(
            st.sampled_from(hot or places)
            if hot and draw(st.booleans())
            else st.sampled_from(places)
        )
        container = parent(payload, where)
        if isinstance(container, dict) and draw(st.booleans()):
            del container[where[-1]]
        else:
            container[where[-1]] = draw(wrong_values(surrogates=False))
    return name.split(".")[0], payload


@fuzz(120, app=True)
@given(case=broken_payloads())
async def test_a_broken_webhook_payload_is_refused_or_fails_as_a_delivery_never_the_worker(
    hooks: Hooks, database: Database, case: tuple[str, dict[str, Any]]
) -> None:
    event_name, payload = case
    before = database.rows()
    status, answer = await hooks.deliver(event_name, dumps(payload))
    event(f"answered {status}")
    if status >= 400:
        assert database.changed(before) == [], answer
        return
    assert status == 202, answer
    after = await hooks.process()
    event(f"{event_name}: {after['status']}")
    if after["status"] != "done":
        # Failed, to be retried and then parked: the reason is one readable line.
        event(f"failed with {after['last_error']}")
        assert after["status"] in ("pending", "failed") and after["attempts"] == 1
        assert after["last_error"] and "\n" not in after["last_error"], after["last_error"]


@fuzz(30, app=True)
@given(body=RAW_BODIES | json_values(), event_name=st.sampled_from(["issue_comment", "push", "x"]))
# gidgethub's router looked for a key in the first and up the second's action in a dict,
# outside the worker's net: the exception ended the worker, and with it all processing.
@example(body=b"0", event_name="issue_comment")
@example(body={"action": []}, event_name="issue_comment")
async def test_a_body_that_is_no_payload_is_refused_and_could_not_stop_the_worker_anyway(
    hooks: Hooks, database: Database, body: Any, event_name: str
) -> None:
    raw = body if isinstance(body, bytes) else dumps(body)
    before = database.rows()
    status, answer = await hooks.deliver(event_name, raw)
    if status >= 400:
        assert database.changed(before) == [], answer
        if not isinstance(body, bytes):
            # Stored anyway (before intake checked payloads), it only fails its delivery.
            await hooks.api.services.deliveries.accept(
                event_name, f"stored-{next(hooks.ids)}", raw, action=None, installation_id=None
            )
            after = await hooks.process()
            assert after["status"] == "done" or after["last_error"], after
        return
    after = await hooks.process()
    assert after["status"] == "done" or after["last_error"], after


# -- Slash commands, end to end --------------------------------------------------------------

COMMAND_ARGS = text(60) | st.sampled_from(
    ["@octocat please", "#1 and @acme/oncall", "<img src=x>", "a" * 3000, "fuzz-old stable"]
)


@st.composite
def comment_bodies(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        name = draw(
            st.sampled_from(["freeze", "unfreeze", "rollout", "help", "pause", "sweep", "nope"])
        )
        args = draw(COMMAND_ARGS).replace("\r", " ").replace("\n", " ")
        lines.append(draw(st.sampled_from([f"/{name} {args}", f"/{name}", args, "```", ""])))
    return "\n".join(lines)


_comment_ids = itertools.count(1)
MENTION = re.compile(r"@(?!\u200d)[A-Za-z0-9]")


@fuzz(50, app=True)
@given(body=comment_bodies())
@example(body="/freeze " + "a" * 3000)  # longer than the API takes for a reason
async def test_slash_commands_of_any_text_are_answered_inertly_and_store_only_valid_state(
    hooks: Hooks, database: Database, body: str
) -> None:
    payload = retarget(PAYLOADS["issue_comment.created.0"], CONTROL)
    payload["comment"].update(body=body, id=next(_comment_ids))
    payload["issue"].pop("pull_request", None)
    status, answer = await hooks.deliver("issue_comment", dumps(payload))
    assert status == 202, answer
    after = await hooks.process()
    assert after["status"] == "done", after["last_error"]
    replies = [
        json.loads(row[0])
        for row in database.db.execute("SELECT payload FROM outbox WHERE kind = 'comment'")
    ]
    frozen = database.db.execute("SELECT reason FROM freeze").fetchall()
    for reply in replies:
        said = reply["body"]
        # Nobody is pinged by what the bot echoes, and GitHub takes the comment.
        assert not MENTION.search(said), said
        assert len(said) <= 65536
        # Whatever the text, a command is done or refused with a reason, never a crash.
        assert "internal error" not in said, said
    for (reason,) in frozen:
        assert 0 < len(reason) <= 500  # what POST /freeze would take
    response, shown = await hooks.api.get("/freeze", token=await hooks.api.token("viewer"))
    assert response.status == 200, shown
