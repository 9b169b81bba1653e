"""Fault injection: GitHub and the npm registry down, slow or rate limiting for a long
while, and the SQLite file locked by another connection. The service keeps answering its
runners and its API, GitHub side effects wait in the outbox and then arrive once each, in
order, and a locked database is a 503 to retry, never a 500.

Everything is real but time: the app runs in-process on a real test server, the fake
GitHub and the fake npm registry are real HTTP servers, the database a real SQLite file.

How minutes pass in seconds. The app reads time only from its clock, here a ManualClock
that the fakes read too, and every wait that matters is measured on it:

* the outbox schedules a failed entry's next attempt on that clock (2 s, doubling, at
  most 10 minutes apart); the tests move the clock in steps and wake the worker after
  each, so every step is a round of retries;
* the GitHub client's own waits (back-off between tries, pacing, rate-limit waits) go
  through an injected sleep that moves the clock by what was asked and returns at once;
* the fake GitHub's outages and rate-limit windows end at a moment of that clock
  (``inject(..., until=)``, ``set_rate_limit(reset_in=)``), and the version watcher backs
  off on it too.

So the 75-minute outage below climbs the outbox's whole back-off ladder, from 2 s to the
10-minute ceiling, in a few seconds of wall time. What still takes wall time is what
must: a client timeout (1 s each, two of them), GitHub answering slowly (2 s each, two
requests), a registry that does not answer (1 s), and SQLite's busy timeout (shortened to
1 s where the test exceeds it on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import re
import sqlite3
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator

from app.clock import ManualClock
from app.config import Secret, Settings
from app.github.app import GitHubApp
from app.github.client import REQUESTER, RetryPolicy
from app.github.keys import load_private_key
from app.github.tracking import ROLLOUT_LABEL
from app.pipeline.version import npm
from app.pipeline.version.providers import BUILTIN_PROVIDERS
from app.rollouts.controller import RolloutTimer
from app.server import github_components, version_watcher
from app.services import Services
from app.store import BuildRecord, Delivery, Effect
from app.store import sqlite as sqlite_store
from tests.conftest import START, Api, MakeApi
from tests.fake_github import FakeGitHub, Recorded
from tests.fake_npm_registry import FakeNpmRegistry
from tests.github_fixtures import WEBHOOK_SECRET
from tests.test_webhooks import HOOK, WEBHOOKS, headers_for

CONTROL = "acme/control"  # where rollouts are tracked as issues
RUNNER = "acme/runner"  # where canaries show as check runs
OLD, NEW = "build-old", "build-new"
ORGS = [f"org-{n:02d}" for n in range(10)]
CLIENT_TIMEOUT = 1.0  # seconds the GitHub client waits for one try
OUTAGE = timedelta(minutes=75)
STEP = timedelta(minutes=5)
CHECK_RUNS = "POST /repos/{owner}/{repo}/check-runs"
MARKER = re.compile(r"<!-- update-pipeline:([A-Za-z0-9_.:/#@+=-]+) -->")


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; the timeout is generous, for a loaded machine."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


class ClockSleep:
    """The GitHub client's sleep: moves the shared clock by what was asked and returns at
    once, so back-off, pacing and rate-limit waits take app time, not wall time."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(timedelta(seconds=seconds))
        await asyncio.sleep(0)


@pytest.fixture
def github_sleep(clock: ManualClock) -> ClockSleep:
    """Replaces tests/github_fixtures.py's, which returns at once without moving time."""
    return ClockSleep(clock)


@pytest.fixture
def acme(github: FakeGitHub) -> int:
    """One installation covering both repositories the service writes to."""
    installation = github.add_installation(account="acme", repos=[CONTROL, RUNNER])
    github.set_permission(CONTROL, "maintainer", "maintain")
    return installation


@pytest.fixture
def github_pipeline(github_settings: Settings) -> Settings:
    return github_settings.replace(
        control_repo=CONTROL, runner_repo=RUNNER, stages_stable="10%:30m,50%:30m,100%"
    )


async def start_service(
    make_api: MakeApi,
    settings: Settings,
    clock: ManualClock,
    sleep: ClockSleep,
    *,
    timeout: float = CLIENT_TIMEOUT,
) -> Api:
    """The app with its GitHub components, as serve() wires them, but with a short
    per-try timeout: a GitHub that hangs costs the test a second, not thirty."""

    def with_github(services: Services) -> list[Any]:
        key = load_private_key(settings)
        assert key is not None
        policy = RetryPolicy(timeout=timeout)
        services.github = GitHubApp(settings, key, clock, sleep=sleep, policy=policy)
        return github_components(services)

    api = await make_api(settings_override=settings, build=with_github)

    async def installed() -> bool:
        return await api.services.store.installation_for_repository(CONTROL) is not None

    await eventually(installed)
    return api


class Fleet:
    """What uses the service while GitHub misbehaves: one runner per org, doing what it is
    told, and an operator reading the API. Every call is timed; an answer that is not
    2xx fails the test there and then."""

    def __init__(self, api: Api, admin: str, viewer: str) -> None:
        self.api, self.admin, self.viewer = api, admin, viewer
        self.running = dict.fromkeys(ORGS, OLD)
        self.started = dict.fromkeys(ORGS, 0)
        self.timings: list[tuple[str, float]] = []  # (kind of call, seconds)
        self.rollout_id: str | None = None

    async def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        began = time.perf_counter()
        response, body = await self.api.request(method, path, token=token, **kw)
        kind = f"{method} {path}"
        if self.rollout_id is not None:
            kind = kind.replace(self.rollout_id, "{rolloutId}")
        self.timings.append((kind, time.perf_counter() - began))
        assert 200 <= response.status < 300, (method, path, response.status, body)
        return body

    async def beat(self, org: str, sessions: int) -> None:
        if self.running[org] == NEW:  # sessions on the new build are the stage's data
            self.started[org] += sessions
        answer = await self.call(
            "POST",
            "/heartbeat",
            self.admin,
            json={
                "runnerId": f"runner-{org}",
                "orgId": org,
                "bootId": "boot-1",
                "buildId": self.running[org],
                "sessions": {"started": self.started[org], "failed": 0, "disconnected": 0},
            },
        )
        self.running[org] = answer["desiredBuildId"]

    async def round(self, sessions: int = 30) -> None:
        """Every runner checks in, and an operator looks at the service, all at once."""
        reads = [
            ("/health", None),
            ("/ready", None),
            ("/status", self.viewer),
            ("/rollouts", self.viewer),
            ("/fleet", self.viewer),
            ("/diagnostics", self.admin),
        ]
        if self.rollout_id is not None:
            reads.append((f"/rollouts/{self.rollout_id}", self.viewer))
        await asyncio.gather(
            *(self.beat(org, sessions) for org in ORGS),
            *(self.call("GET", path, token) for path, token in reads),
        )

    async def pending(self) -> int:
        return int((await self.call("GET", "/diagnostics", self.admin))["outbox"]["pending"])


def assert_not_slowed(
    before: Sequence[tuple[str, float]], during: Sequence[tuple[str, float]]
) -> None:
    """Each kind of call answered about as fast as it did before: its median within three
    times its median before, plus 0.1 s. Medians, and generous ones, because the machine
    may be busy with other work that stalls every call of a moment alike; a kind of call
    that waited on GitHub would wait its timeout every time. And none hung."""
    usual: dict[str, list[float]] = {}
    for kind, seconds in before:
        usual.setdefault(kind, []).append(seconds)
    seen: dict[str, list[float]] = {}
    for kind, seconds in during:
        seen.setdefault(kind, []).append(seconds)
    for kind, times in seen.items():
        if kind not in usual:  # a command, made only during the fault: answered is enough
            continue
        bound = 3 * statistics.median(usual[kind]) + 0.1
        assert statistics.median(times) <= bound, (kind, sorted(times), usual[kind])
    assert max(seconds for _, seconds in during) < 10.0


async def fleet_on_old_build(api: Api) -> Fleet:
    """Builds old (the stable channel's) and new, both known-good, and every org's runner
    checked in on the old one."""
    admin = await api.token("admin", name="ops")
    viewer = await api.token("viewer", name="dashboard")
    for build, codex in ((OLD, "0.46.0"), (NEW, "0.47.0")):
        record = BuildRecord(build, "1.0.0", START, {"codex": codex}, known_good_for=["codex"])
        await api.services.store.add_build(record, START)
    fleet = Fleet(api, admin, viewer)
    await fleet.call(
        "PUT", "/channels/stable", admin, json={"buildId": OLD, "reason": "the fleet's build"}
    )
    await fleet.round(sessions=0)
    return fleet


async def start_rollout(fleet: Fleet) -> str:
    body = await fleet.call(
        "POST", "/rollouts", fleet.admin, json={"buildId": NEW, "channel": "stable"}
    )
    fleet.rollout_id = str(body["rolloutId"])
    return fleet.rollout_id


# -- the outbox, moved along by the clock -------------------------------------------------


async def settle(api: Api) -> None:
    """Wake the outbox worker and wait until it has taken every entry due now: applied
    it, or failed and scheduled it later on the clock."""
    store, clock = api.services.store, api.services.clock
    api.services.outbox.written()

    async def nothing_due() -> bool:
        return not await store.due_effects(clock.now(), limit=1)

    await eventually(nothing_due)


async def deliver_everything(api: Api, clock: ManualClock, step: timedelta) -> None:
    """Move the clock ``step`` at a time until the outbox is empty."""
    store = api.services.store
    for _ in range(100):
        await settle(api)
        if not await store.list_effects(status="pending", limit=1):
            return
        clock.advance(step)
    raise AssertionError("the outbox never emptied")


# -- what GitHub ended up with --------------------------------------------------------------


def app_requests(github: FakeGitHub, since: int = 0) -> list[Recorded]:
    """The requests the app's own client sent (tests talking to the fake send another
    User-Agent)."""
    return [r for r in github.requests[since:] if r.headers.get("User-Agent") == REQUESTER]


def markers(github: FakeGitHub, repo: str) -> Counter[str]:
    """How often each outbox key's hidden marker appears on the repository's issues and
    comments: twice would be a duplicate."""
    state = github.repo(repo)
    bodies = [i.get("body") or "" for i in state.issues.values()]
    bodies += [c.get("body") or "" for c in state.comments.values()]
    return Counter(key for body in bodies for key in MARKER.findall(body))


def tracking_issue(github: FakeGitHub) -> dict[str, Any]:
    """The rollout's issue: there must be exactly one."""
    title = f"Rollout {NEW} → stable"
    (issue,) = [i for i in github.repo(CONTROL).issues.values() if i["title"] == title]
    return issue


def labels(github: FakeGitHub, number: int) -> set[str]:
    return {label["name"] for label in github.repo(CONTROL).issue(number)["labels"]}


def comment_keys(github: FakeGitHub, number: int) -> list[str]:
    """The outbox keys of the service's comments on an issue, in the order GitHub made
    them (people's comments have none)."""
    state = github.repo(CONTROL)
    found = sorted(state.comments.values(), key=lambda c: c["id"])
    on_issue = [c for c in found if c["issue_url"].endswith(f"/issues/{number}")]
    return [key for c in on_issue for key in MARKER.findall(c["body"])]


def _fields(data: dict[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(k for k in ("title", "body", "state", "state_reason") if k in data))


def effect_step(effect: Effect) -> tuple[str, Any]:
    """An outbox entry on an issue, as the change it asks of GitHub."""
    p = effect.payload
    detail = {
        "issue": lambda: p["title"],
        "comment": lambda: p["key"],
        "labels": lambda: tuple(p["labels"]),
        "label_remove": lambda: p["label"],
        "issue_edit": lambda: _fields(dict(p)),
    }[effect.kind]()
    return effect.kind, detail


def request_step(request: Recorded) -> tuple[str, Any] | None:
    """A request GitHub carried out, as the change it made on an issue (None: another)."""
    if request.status is None or not 200 <= request.status < 300:
        return None
    body = request.json if isinstance(request.json, dict) else {}
    issue = "/repos/{owner}/{repo}/issues"
    steps: dict[str | None, Callable[[], tuple[str, Any]]] = {
        f"POST {issue}": lambda: ("issue", body["title"]),
        f"POST {issue}/{{issue_number}}/comments": lambda: (
            "comment",
            MARKER.findall(body["body"])[0],
        ),
        f"POST {issue}/{{issue_number}}/labels": lambda: ("labels", tuple(body["labels"])),
        f"DELETE {issue}/{{issue_number}}/labels/{{name}}": lambda: (
            "label_remove",
            request.params["name"],
        ),
        f"PATCH {issue}/{{issue_number}}": lambda: ("issue_edit", _fields(body)),
    }
    step = steps.get(request.operation)
    return step() if step is not None else None


def body_edit(step: tuple[str, Any]) -> bool:
    # Body edits replace each other while they wait (by design, across the issue's key
    # and number), so only the last body is checked, not each edit.
    return step == ("issue_edit", ("body",))


async def assert_applied_once_in_order(
    api: Api, github: FakeGitHub, number: int, since: int = 0
) -> list[Effect]:
    """Every entry for the tracking issue was applied, each once, in the order written:
    what GitHub carried out on the issue is exactly the outbox's list, step for step."""
    store = api.services.store
    assert await store.list_effects(status="pending", limit=10) == []
    assert await store.list_effects(status="failed", limit=10) == []
    done = await store.list_effects(status="done", limit=1000)
    on_issue = sorted(
        (
            e
            for e in done
            if e.target.startswith(f"{CONTROL}#")
            and (e.target == f"{CONTROL}#{number}" or "#key:" in e.target)
        ),
        key=lambda e: e.id,
    )
    written = [s for s in map(effect_step, on_issue) if not body_edit(s)]
    carried_out = []
    for request in app_requests(github, since):
        step = request_step(request)
        on_this_issue = request.params.get("issue_number") in (None, str(number))
        if step is not None and on_this_issue and not body_edit(step):
            carried_out.append(step)
    assert carried_out == written
    assert all(n == 1 for n in markers(github, CONTROL).values()), markers(github, CONTROL)
    return on_issue


# -- 1. a long GitHub outage during a rollout ------------------------------------------------


async def test_a_long_github_outage_during_a_rollout_delays_side_effects_but_loses_none(
    make_api: MakeApi,
    github_pipeline: Settings,
    github: FakeGitHub,
    acme: int,
    clock: ManualClock,
    github_sleep: ClockSleep,
) -> None:
    api = await start_service(make_api, github_pipeline, clock, github_sleep)
    fleet = await fleet_on_old_build(api)
    for _ in range(3):  # what the calls cost with GitHub well
        await fleet.round()
    before = list(fleet.timings)
    fleet.timings.clear()

    # GitHub goes away for 75 minutes of the app's time: the first two requests hang
    # past the client's timeout, reads have their connection reset, the rest get 502s.
    mark = len(github.requests)
    until = clock.now() + OUTAGE
    hanging = github.inject("*", status=504, delay=60, times=2, until=until)
    resets = github.inject("GET *", reset=True, times=None, until=until)
    bad_gateway = github.inject("*", status=502, times=None, until=until)

    rollout_id = await start_rollout(fleet)
    await fleet.call(
        "POST",
        "/builds",
        fleet.admin,
        json={
            "buildId": "build-canary",
            "runnerVersion": "1.0.1",
            "runtimeVersions": {"codex": "0.48.0"},
            "repository": RUNNER,
            "commitSha": "c" * 40,
        },
    )

    async def pause() -> None:
        path = f"/rollouts/{rollout_id}/pause"
        await fleet.call("POST", path, fleet.admin, json={"reason": "a report came in"})

    async def resume() -> None:
        await fleet.call("POST", f"/rollouts/{rollout_id}/resume", fleet.admin, json={})

    # The clock goes from one retry the outbox scheduled to the next (2 s, 4 s, ... up to
    # its 10-minute ceiling), at most 5 minutes at a time; each step, the runners check
    # in and an operator reads the API. Steps also do what RolloutTimer and
    # CanaryTimeouts do at deadlines (they wait in wall time, so the test steps them):
    # the stage advances at 30 minutes, the canary times out at 60, and the rollout,
    # paused from 40 to 45, completes at 65.
    began = clock.now()
    script = {timedelta(minutes=40): pause, timedelta(minutes=45): resume}
    depth = [await fleet.pending()]
    while True:
        due = await api.services.store.next_effect_due()
        step = STEP if due is None else min(STEP, max(due - clock.now(), timedelta(seconds=1)))
        if clock.now() + step >= until:
            break
        clock.advance(step)
        await api.services.rollouts.step_all()
        await api.services.canary.expire_due()
        for at in [at for at in script if clock.now() - began >= at]:
            await script.pop(at)()
        await settle(api)
        await fleet.round()
        depth.append(await fleet.pending())
    during = list(fleet.timings)

    # The service answered throughout (any other answer than 2xx fails the call), and
    # as fast as before.
    assert_not_slowed(before, during)
    view = await fleet.call("GET", f"/rollouts/{rollout_id}", fleet.viewer)
    assert (view["state"], view["currentPercentage"]) == ("completed", 100)
    # Nothing reached GitHub, and everything waited: none given up, the oldest entry as
    # old as the outage.
    outage = [r for r in app_requests(github, mark) if r.at is not None and r.at < until]
    assert not [
        (r.target, r.status, r.at) for r in outage if r.status is not None and r.status < 300
    ]
    assert (hanging.hits, resets.hits > 0, bad_gateway.hits > 0) == (2, True, True)
    assert depth[-1] > depth[0] and depth == sorted(depth), depth
    diagnostics = await fleet.call("GET", "/diagnostics", fleet.admin)
    assert diagnostics["outbox"]["failed"] == 0
    assert diagnostics["outbox"]["oldestPendingAgeSeconds"] >= (OUTAGE - STEP).total_seconds()
    waiting = await api.services.store.list_effects(status="pending", limit=100)
    assert max(e.attempts for e in waiting) >= 10  # the back-off ladder, climbed

    recovered = len(github.requests)
    await deliver_everything(api, clock, timedelta(minutes=10))

    issue = tracking_issue(github)
    applied = await assert_applied_once_in_order(api, github, issue["number"], recovered)
    assert comment_keys(github, issue["number"]) == [
        e.payload["key"] for e in applied if e.kind == "comment"
    ]
    assert len(comment_keys(github, issue["number"])) == 5  # 50%, pause, resume, 100%, done
    assert labels(github, issue["number"]) == {ROLLOUT_LABEL, "rollout:completed"}
    assert (issue["state"], issue["state_reason"]) == ("closed", "completed")
    (check_run,) = github.repo(RUNNER).check_runs.values()  # created once, then updated
    assert (check_run["status"], check_run["conclusion"]) == ("completed", "timed_out")
    created = [r for r in app_requests(github) if r.operation == CHECK_RUNS and r.status == 201]
    assert len(created) == 1


# -- 2. rate limits -------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """A rate limit GitHub imposes from the moment it is put in place: ``start`` puts it
    on the fake and returns when it lifts; ``told`` is the least time GitHub's answer
    asks the client to wait, and ``most`` how many requests may find the limit."""

    name: str
    start: Callable[[FakeGitHub, int, datetime], datetime]
    told: float
    most: int


def _primary_403(reset_in: float) -> Callable[[FakeGitHub, int, datetime], datetime]:
    def start(github: FakeGitHub, installation: int, now: datetime) -> datetime:
        github.set_rate_limit(0, installation_id=installation, reset_in=reset_in)
        reset = github.rate_windows[f"installation:{installation}"].reset
        return datetime.fromtimestamp(reset, UTC)

    return start


def _primary_429(github: FakeGitHub, installation: int, now: datetime) -> datetime:
    reset = int((now + timedelta(minutes=10)).timestamp())
    headers = {
        "X-RateLimit-Limit": "5000",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Used": "5000",
        "X-RateLimit-Reset": str(reset),
        "X-RateLimit-Resource": "core",
    }
    until = datetime.fromtimestamp(reset, UTC)
    github.inject("* /repos/*", status=429, headers=headers, times=None, until=until)
    return until


def _secondary(status: int, retry_after: int | None, lasts: timedelta) -> Any:
    def start(github: FakeGitHub, installation: int, now: datetime) -> datetime:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        # The fake's body for a 403 or 429 is GitHub's secondary rate limit message.
        github.inject("* /repos/*", status=status, headers=headers, times=None, until=now + lasts)
        return now + lasts

    return start


LIMITS = [
    # The primary limit, used up: the client waits until the reset it is given...
    Limit("primary 403, resets in 10 min", _primary_403(600), told=600, most=1),
    Limit("primary 429, resets in 10 min", _primary_429, told=600, most=1),
    # ... or, beyond the 15 minutes it waits itself, leaves the entry in the outbox until
    # then, and sends nothing meanwhile.
    Limit("primary 403, resets in 40 min", _primary_403(2400), told=2400, most=1),
    # A secondary limit: GitHub says how long, or the client waits a minute, then two.
    Limit("secondary 403, Retry-After 90", _secondary(403, 90, timedelta(seconds=90)), 90, 1),
    Limit("secondary 429, no hint", _secondary(429, None, timedelta(seconds=100)), 60, 2),
]


@pytest.mark.parametrize("limit", LIMITS, ids=[limit.name for limit in LIMITS])
async def test_a_rate_limited_github_is_waited_for_as_told_then_caught_up(
    limit: Limit,
    make_api: MakeApi,
    github_pipeline: Settings,
    github: FakeGitHub,
    acme: int,
    clock: ManualClock,
    github_sleep: ClockSleep,
) -> None:
    api = await start_service(make_api, github_pipeline, clock, github_sleep)
    fleet = await fleet_on_old_build(api)
    mark = len(github.requests)
    began = clock.now()
    lifts = limit.start(github, acme, began)

    # A rollout starts, is paused and resumed: an issue, two comments, four label changes.
    rollout_id = await start_rollout(fleet)
    path = f"/rollouts/{rollout_id}"
    await fleet.call("POST", f"{path}/pause", fleet.admin, json={"reason": "rate limited"})
    await fleet.call("POST", f"{path}/resume", fleet.admin, json={})
    # The clock moves a minute at a time and the outbox is woken each time: a client or a
    # worker that ignored the limit would send something every minute.
    await deliver_everything(api, clock, timedelta(minutes=1))
    assert clock.now() >= lifts

    sent = [r for r in app_requests(github, mark) if r.path.startswith("/repos/")]
    assert sent[0].at is not None
    limited = [r for r in sent if r.at is not None and r.at < lifts]
    assert 1 <= len(limited) <= limit.most, [(r.target, r.at) for r in limited]
    assert {r.status for r in limited} <= {403, 429}
    # No request came sooner than GitHub asked: from the first that met the limit to the
    # first that got through, each waited at least what it was told.
    through = next(n for n, r in enumerate(sent) if r.status is not None and r.status < 300)
    waits = [
        (b.at - a.at).total_seconds()  # type: ignore[operator]
        for a, b in itertools.pairwise(sent[: through + 1])
    ]
    assert waits and min(waits) >= limit.told - 1, waits
    _, diagnostics = await api.get("/diagnostics", token=fleet.admin)
    assert diagnostics["outbox"]["failed"] == 0

    issue = tracking_issue(github)
    await assert_applied_once_in_order(api, github, issue["number"], mark)
    assert len(comment_keys(github, issue["number"])) == 2
    assert labels(github, issue["number"]) == {ROLLOUT_LABEL, "rollout:rolling-out"}


# -- 3. slow responses -----------------------------------------------------------------------

SLOW = 2.0  # seconds GitHub takes to answer each of the first two requests
BASE_COMMENT = json.loads((WEBHOOKS / "issue_comment.created.0.json").read_text())


def comment_delivery(installation: int, issue: int, comment_id: int, body: str) -> bytes:
    """GitHub's issue_comment delivery for a comment ``maintainer`` just wrote."""
    payload = copy.deepcopy(BASE_COMMENT)
    author = {**payload["comment"]["user"], "login": "maintainer", "type": "User"}
    payload["comment"].update(id=comment_id, body=body, user=author)
    payload["sender"] = author
    payload["issue"].update(number=issue, labels=[], state="open")
    payload["issue"].pop("pull_request", None)
    payload["repository"]["full_name"] = CONTROL
    payload["installation"] = {"id": installation}
    return json.dumps(payload).encode()


async def test_slow_github_responses_do_not_slow_heartbeats_the_api_or_webhook_intake(
    make_api: MakeApi,
    github_pipeline: Settings,
    github: FakeGitHub,
    acme: int,
    clock: ManualClock,
    github_sleep: ClockSleep,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = await start_service(make_api, github_pipeline, clock, github_sleep, timeout=10 * SLOW)
    fleet = await fleet_on_old_build(api)
    lobby = github.add_issue(CONTROL, "Releases")
    for _ in range(3):
        await fleet.round()
    before = list(fleet.timings)
    fleet.timings.clear()

    store = api.services.store
    looked = 0
    due_effects = store.due_effects

    async def counted(*args: Any, **kwargs: Any) -> list[Effect]:
        nonlocal looked
        looked += 1
        return await due_effects(*args, **kwargs)

    monkeypatch.setattr(store, "due_effects", counted)

    mark = len(github.requests)
    slow = github.inject("* /repos/*", status=None, delay=SLOW, times=2)
    await start_rollout(fleet)
    # A slash command arrives meanwhile: its processing asks GitHub (slowly) who wrote
    # it, but the delivery itself is acknowledged at once.
    comment = github.add_comment(CONTROL, lobby, "/help", user="maintainer")
    delivery = comment_delivery(acme, lobby, comment, "/help")

    def in_flight() -> bool:
        return any(r.status is None for r in github.requests[mark:])

    async def waiting_on_github() -> bool:
        return in_flight()

    await eventually(waiting_on_github)
    began = time.perf_counter()
    response, _ = await api.post(
        HOOK, data=delivery, headers=headers_for("issue_comment", delivery)
    )
    fleet.timings.append(("POST /api/github/webhooks", time.perf_counter() - began))
    assert response.status == 202
    rounds = 0
    while in_flight() and rounds < 5:  # each round starts while GitHub is answering slowly
        await fleet.round()
        rounds += 1
    assert rounds >= 1
    during = list(fleet.timings)
    looked_while_slow = looked

    assert_not_slowed(before, during)
    assert all(seconds < SLOW for kind, seconds in during if kind.startswith("POST /api/github"))
    # Nor did the outbox worker spin while its lane waited on GitHub: the lane wakes it
    # when it is done.
    assert looked_while_slow <= 5

    async def handled() -> bool:
        return not await store.list_deliveries(status="pending", before=None, limit=1)

    await eventually(handled)
    await deliver_everything(api, clock, timedelta(minutes=1))
    assert slow.hits == 2
    issue = tracking_issue(github)
    await assert_applied_once_in_order(api, github, issue["number"], mark)
    assert len(comment_keys(github, lobby)) == 1  # /help answered once
    assert [r["content"] for r in github.repo(CONTROL).reactions[("comment", comment)]] == [
        "eyes",
        "rocket",
    ]


# -- 4. the npm registry answering junk ------------------------------------------------------

CODEX = next(p for p in BUILTIN_PROVIDERS if p.id == "codex")
PACKAGE = CODEX.npm_package
# What a registry (or a proxy in front of it) may answer, and what the watcher says of it.
JUNK: list[tuple[str, dict[str, Any], str]] = [
    (
        "invalid JSON",
        {"body": b'{"name": "@openai/codex", "versions": {"9.9.9": '},
        "is not JSON",
    ),
    (
        "wrong types",
        {
            "body": json.dumps(
                {
                    "name": PACKAGE,
                    "dist-tags": {"latest": "9.9.9"},
                    "versions": {"9.9.9": "a manifest should be an object"},
                    "time": {"9.9.9": 1767225600},
                }
            ).encode()
        },
        "no manifest object for version '9.9.9'",
    ),
    (
        "a version that is none",
        {
            "body": json.dumps(
                {
                    "name": PACKAGE,
                    "dist-tags": {"latest": "latest-and-greatest"},
                    "versions": {"latest-and-greatest": {}},
                    "time": {"latest-and-greatest": "2026-03-01T00:00:00.000Z"},
                }
            ).encode()
        },
        "not a semantic version",
    ),
    (
        "an HTML page",
        {
            "body": b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
            "content_type": "text/html",
        },
        "is not JSON",
    ),
    # Streamed without a length: only reading it shows it is too large, and reading stops.
    ("a huge body", {"size": npm.MAX_DOCUMENT_BYTES + 1}, "larger than"),
    ("a 500", {"status": 500}, "answered 500"),
    ("no answer", {"status": None, "delay": 30.0}, "no answer"),
]


@pytest.fixture
async def registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[FakeNpmRegistry]:
    async with FakeNpmRegistry() as fake:
        # npm's own configuration, as an operator would set it; nothing else leaks in.
        monkeypatch.setenv("npm_config_registry", fake.url)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.chdir(tmp_path)
        # A registry that does not answer costs the test a second, not a minute.
        monkeypatch.setattr(npm, "FETCH_TIMEOUT", 1.0)
        yield fake


async def test_a_registry_answering_junk_records_a_failed_poll_and_no_junk_version(
    make_api: MakeApi,
    settings: Settings,
    registry: FakeNpmRegistry,
    clock: ManualClock,
) -> None:
    assert PACKAGE is not None
    for n, version in enumerate(["1.0.0", "1.1.0"]):
        registry.publish(PACKAGE, version, START - timedelta(days=2 - n))
    async with aiohttp.ClientSession() as session:
        api = await make_api(
            settings_override=settings.replace(providers=(CODEX,)),
            build=lambda services: [version_watcher(services, session)],
        )
        admin = await api.token("admin")

        async def check() -> dict[str, Any]:
            # A poll is due again an hour after a failure (the watcher's back-off ceiling)
            # and 66 minutes at most after a success (the interval and its jitter).
            clock.advance(timedelta(minutes=70))
            response, body = await api.post("/versions/check", token=admin)
            assert response.status == 200, body
            (source,) = body["sources"]
            return dict(source)

        async def versions() -> list[str]:
            _, page = await api.get("/versions", token=admin)
            return [v["version"] for v in page["items"]]

        assert (await check())["newVersions"] == ["1.1.0"]
        for n, (what, fault, why) in enumerate(JUNK):
            # A release the junk hides until the next good answer shows it.
            hidden = f"1.{n + 2}.0"
            registry.publish(PACKAGE, hidden, START + timedelta(hours=n))
            known = await versions()
            registry.fail_next(**fault)
            failed = await check()
            assert failed["outcome"] == "error", (what, failed)
            assert why in failed["error"] and failed["newVersions"] == [], (what, failed)
            assert await versions() == known, what  # nothing kept from the junk, nothing lost
            recovered = await check()
            assert (recovered["outcome"], recovered["newVersions"]) == ("new", [hidden]), what

        _, status = await api.get("/status", token=admin)
        assert status["knownVersions"]["codex"] == f"1.{len(JUNK) + 1}.0"
        assert not {"9.9.9", "latest-and-greatest"} & set(await versions())
        metrics = await (await api.client.get("/metrics")).text()
        assert (
            f'update_pipeline_version_polls_total{{outcome="error",source="npm"}} {len(JUNK)}.0'
            in metrics
        )


# -- 5. SQLite locked by another connection ----------------------------------------------------


@contextlib.contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Another connection holds SQLite's write lock on the database file (BEGIN IMMEDIATE,
    as the token command or a second process would), from a thread of its own, until the
    block ends."""
    taken, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def hold() -> None:
        try:
            db = sqlite3.connect(path, isolation_level=None)
            try:
                db.execute("BEGIN IMMEDIATE")
                taken.set()
                release.wait(60)
                db.execute("ROLLBACK")
            finally:
                db.close()
        except BaseException as exc:  # reported by the test, not lost in the thread
            failed.append(exc)
            taken.set()

    thread = threading.Thread(target=hold, name="other-writer")
    thread.start()
    try:
        assert taken.wait(30) and not failed, failed
        yield
    finally:
        release.set()
        thread.join(30)


def heartbeat(org: str, started: int, boot: str = "boot-1") -> dict[str, Any]:
    return {
        "runnerId": f"runner-{org}",
        "orgId": org,
        "bootId": boot,
        "sessions": {"started": started, "failed": 0, "disconnected": 0},
    }


def sessions_counted(db_path: Path, org: str) -> int:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        row = db.execute(
            "SELECT coalesce(sum(started), 0) FROM session_counts WHERE org_id = ?", (org,)
        ).fetchone()
    return int(row[0])


async def answered_at(
    call: Awaitable[tuple[aiohttp.ClientResponse, Any]],
) -> tuple[int, Any, float]:
    """The status and body of a call, and when (``time.perf_counter()``) it was answered."""
    response, body = await call
    return response.status, body, time.perf_counter()


async def test_a_write_lock_held_briefly_makes_writes_wait_then_succeed(
    make_api: MakeApi, db_path: Path
) -> None:
    hold = 1.0  # seconds; well under the busy timeout
    assert hold * 1000 < sqlite_store.BUSY_TIMEOUT_MS
    api = await make_api()
    admin = await api.token("admin")
    viewer = await api.token("viewer")
    for token in (admin, viewer):  # their last use is recorded now, not under the lock
        await api.get("/status", token=token)

    with write_lock(db_path):
        began = time.perf_counter()
        beats = [api.post("/heartbeat", token=admin, json=heartbeat(org, 5)) for org in ORGS[:5]]
        put = api.request("PUT", "/orgs/org-new", token=admin, json={"channel": "beta"})
        writes = [asyncio.create_task(answered_at(call)) for call in [*beats, put]]
        # Reads answer while the lock is held: in WAL mode readers never wait for a writer.
        paths = ("/status", "/fleet", "/orgs", "/rollouts")
        reads = await asyncio.gather(*(api.get(path, token=viewer) for path in paths))
        assert [response.status for response, _ in reads] == [200] * len(paths)
        await asyncio.sleep(hold - (time.perf_counter() - began))
        let_go = time.perf_counter()

    answers = await asyncio.gather(*writes)
    assert [status for status, _, _ in answers] == [200] * len(writes), answers
    # Each write waited for the other connection's transaction, then went through once.
    assert min(at for _, _, at in answers) >= let_go
    assert [sessions_counted(db_path, org) for org in ORGS[:5]] == [5] * 5


async def test_a_write_lock_held_past_the_busy_timeout_is_a_503_to_retry_never_a_500(
    make_api: MakeApi, settings: Settings, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One second instead of five, so that outlasting it costs the test a second a write.
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 1000)
    api = await make_api(
        settings_override=settings.replace(github_webhook_secret=Secret(WEBHOOK_SECRET))
    )
    admin = await api.token("admin")
    await api.get("/status", token=admin)
    beat = heartbeat("org-01", 5)
    delivery = json.dumps({"action": "edited", "installation": {"id": 1}}).encode()
    signed = headers_for("issues", delivery)

    with write_lock(db_path):
        # A heartbeat and a webhook delivery (each written with whatever else arrives
        # at once) and an ordinary write: each waits the busy timeout, then gives up.
        answers = await asyncio.gather(
            api.post("/heartbeat", token=admin, json=beat, check_schema=False),
            api.post(HOOK, data=delivery, headers=signed, check_schema=False),
            api.request(
                "PUT", "/orgs/org-02", token=admin, json={"channel": "beta"}, check_schema=False
            ),
        )
        ready, _ = await api.get("/ready")  # reads still answer
        assert ready.status == 200

    error = api.openapi["components"]["schemas"]["Error"]
    for answer, answered in answers:
        assert answer.status == 503, answered
        Draft202012Validator(error).validate(answered)
        assert answered["error"]["code"] == "DATABASE_BUSY"
        assert int(answer.headers["Retry-After"]) >= 1
        assert answer.headers["X-Request-Id"]

    # The runner tries again once the lock is gone: counted once, not twice, not never.
    response, _ = await api.post("/heartbeat", token=admin, json=beat)
    assert response.status == 200
    assert sessions_counted(db_path, "org-01") == 5
    response, _ = await api.request("PUT", "/orgs/org-02", token=admin, json={"channel": "beta"})
    assert response.status == 200
    response, _ = await api.post(HOOK, data=delivery, headers=signed)
    assert response.status == 202  # GitHub's redelivery (or the missed-delivery sweep's)
    ready, _ = await api.get("/ready")
    assert ready.status == 200  # and nothing in the background gave up


async def test_background_work_that_meets_the_lock_waits_it_out(
    make_api: MakeApi,
    settings: Settings,
    db_path: Path,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 1000)

    def workers(services: Services) -> list[Any]:
        # Without App credentials: the webhook worker; and the rollout timer serve() adds.
        return [*github_components(services), RolloutTimer(services.rollouts)]

    api = await make_api(
        settings_override=settings.replace(
            github_webhook_secret=Secret(WEBHOOK_SECRET), stages_stable="10%:30m,100%"
        ),
        build=workers,
    )
    fleet = await fleet_on_old_build(api)
    rollout_id = await start_rollout(fleet)
    for _ in range(5):  # the included org takes the new build and runs 120 sessions on it
        await fleet.round()
    # A delivery the webhook worker takes half an hour from now, when the stage ends.
    now = clock.now()
    due = now + timedelta(minutes=30)
    await api.services.store.add_delivery(
        Delivery("locked-1", "issues", "edited", None, "{}", "pending", 0, due, None, now, None)
    )

    with write_lock(db_path):
        clock.advance(due - now)
        api.services.deliveries.wake.set()
        api.services.rollouts.wake.set()
        # Marking the delivery done and advancing the stage both meet the lock, which
        # outlasts the busy timeout twice over.
        await asyncio.sleep(2.5)

    async def caught_up() -> bool:
        done = await api.services.store.list_deliveries(status="done", before=None, limit=5)
        rollout = await api.services.store.get_rollout(rollout_id)
        return [d.delivery_id for d in done] == ["locked-1"] and (
            rollout is not None and rollout.state == "completed"
        )

    await eventually(caught_up)
    assert api.services.pipeline is not None and api.services.pipeline.health() is None
    ready, _ = await api.get("/ready")
    assert ready.status == 200


async def test_concurrent_load_beside_another_writer_never_gets_a_500(
    make_api: MakeApi, db_path: Path
) -> None:
    api = await make_api()
    admin = await api.token("admin")
    viewer = await api.token("viewer")
    runners = [f"load-{n:02d}" for n in range(40)]
    stop = threading.Event()
    outside = 0

    def other_writer() -> None:
        # Short transactions from another connection, as token commands run beside the
        # server: each holds the write lock a few milliseconds.
        nonlocal outside
        with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
            db.execute("PRAGMA busy_timeout = 5000")
            while not stop.is_set():
                db.execute("BEGIN IMMEDIATE")
                db.execute("UPDATE api_tokens SET last_used_at = last_used_at")
                time.sleep(0.005)
                db.execute("COMMIT")
                outside += 1
                time.sleep(0.005)

    async def runner(org: str) -> list[int]:
        statuses = []
        for n in range(1, 4):
            response, _ = await api.post("/heartbeat", token=admin, json=heartbeat(org, n))
            statuses.append(response.status)
        return statuses

    async def operator(n: int) -> list[int]:
        paths = ["/status", "/fleet", "/orgs", "/rollouts", "/events", "/versions", "/builds"]
        statuses = []
        for path in paths:
            response, _ = await api.get(path, token=viewer)
            statuses.append(response.status)
        response, _ = await api.request(
            "PUT", f"/orgs/load-{n:02d}", token=admin, json={"channel": "stable"}
        )
        return [*statuses, response.status]

    thread = threading.Thread(target=other_writer, name="other-writer")
    thread.start()
    try:
        answered = await asyncio.gather(
            *(runner(org) for org in runners), *(operator(n) for n in range(20))
        )
    finally:
        stop.set()
        thread.join(30)
    seen = Counter(status for answers in answered for status in answers)
    assert set(seen) == {200}, seen
    assert outside > 0  # the other writer did write meanwhile
    assert [sessions_counted(db_path, org) for org in runners] == [3] * len(runners)
