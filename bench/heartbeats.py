"""Benchmark of runner heartbeats (POST /api/update-pipeline/heartbeat) against a bare
aiohttp handler, then of how soon heartbeat answers carry an automatic rollback (the
rollback phase: staged rollouts pulled back by failing sessions under the same load).

Run from the repository root: ``python bench/heartbeats.py`` (``--help`` for the options).
It reuses the machinery of bench/webhooks.py (servers pinned to a core, CPU accounting,
the raw-streams client); docs/performance.md explains that machinery.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The shared machinery lives beside this script, in bench/webhooks.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from webhooks import (
    CLIENT_CPU,
    HEALTH,
    NO_PROXY,
    REPO_ROOT,
    SERVER_CPU,
    Connection,
    Run,
    Server,
    cpu_model,
    disturbed,
    free_port,
    others,
    package_version,
    percent,
    progress,
    service_env,
    set_up_pinning,
)

ENDPOINT = "/api/update-pipeline/heartbeat"
SHARE_TARGET = 0.70
P99_TARGET_MS = 30.0
RSS_TARGET_MB = 200.0
# What most of the fleet runs and reports; a few runners lag behind (see Fleet).
CURRENT_BUILD = "build-aaaaaaaaaaaa"
PREVIOUS_BUILD = "build-9999999999ab"
RUNTIMES = {"claude_code": "2.1.0", "codex": "0.40.0"}
LAGGING_RUNTIMES = {"claude_code": "2.0.9", "codex": "0.40.0"}
# The bare handler's answer: the shape the service answers with, with no rollout.
BARE_ANSWER: dict[str, object] = {
    "desiredBuildId": CURRENT_BUILD,
    "channel": "stable",
    "rolloutId": None,
    "pollAfterSeconds": 30,
    "warnings": [],
}


# --------------------------------------------------------------------------- workload


@dataclass(slots=True)
class Runner:
    """One runner's state: what it reports and what the server acknowledged last."""

    runner_id: str
    org_id: str
    build_id: str
    runtimes: dict[str, str]
    boot: int = 1
    started: int = 0
    failed: int = 0
    disconnected: int = 0
    prefix: bytes = b""  # the body up to the counters, rebuilt when the boot changes
    # (boot, started, failed, disconnected) of the last heartbeat answered 200
    acknowledged: tuple[int, int, int, int] | None = None
    heartbeats: int = 0  # answered 200
    # Sessions those heartbeats added (started, failed, disconnected): the positive
    # differences from the previous acknowledged heartbeat of the same boot.
    counted: list[int] = field(default_factory=lambda: [0, 0, 0])

    def __post_init__(self) -> None:
        self.rebuild()

    def acknowledge(self, counters: tuple[int, int, int, int]) -> None:
        last = self.acknowledged
        for i in range(3):
            before = last[i + 1] if last is not None and last[0] == counters[0] else 0
            self.counted[i] += max(0, counters[i + 1] - before)
        self.acknowledged = counters
        self.heartbeats += 1

    def rebuild(self) -> None:
        head = {
            "runnerId": self.runner_id,
            "orgId": self.org_id,
            "bootId": f"b-{self.boot}",
            "buildId": self.build_id,
            "runtimes": self.runtimes,
        }
        # Everything but the closing brace, then the sessions object, filled per request.
        self.prefix = json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"sessions":'


class Fleet:
    """Runners heartbeating in turn, each request from the next runner (round-robin).

    Counters are cumulative per boot and grow as a busy runner's would between two
    heartbeats: 0 to 3 new sessions, about 2% of them failed and 1% disconnected; once in
    a while a runner restarts (a new bootId, counters from zero). 5% of the runners run the
    previous build, 2% report an older runtime than the rest."""

    REBOOT_CHANCE = 1 / 20_000
    NEW_SESSIONS = (0, 0, 1, 1, 1, 2, 3)

    def __init__(self, runners: int, orgs: int, seed: int = 1) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - a workload, not a secret
        self.runners = [
            Runner(
                runner_id=f"r-{n:05d}",
                org_id=f"org-{n % orgs:04d}",
                build_id=PREVIOUS_BUILD if n % 20 == 7 else CURRENT_BUILD,
                runtimes=LAGGING_RUNTIMES if n % 50 == 3 else RUNTIMES,
            )
            for n in range(runners)
        ]
        self.cursor = 0
        self.reboots = 0

    def grows(self, runner: Runner) -> bool:
        """Whether the runner's next heartbeat may add sessions (see RolloutFleet)."""
        return True

    def next(self) -> tuple[Runner, bytes, tuple[int, int, int, int]]:
        """The next runner's heartbeat body, and the counters it reports."""
        runner = self.runners[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.runners)
        rng = self.rng
        if runner.started and rng.random() < self.REBOOT_CHANCE:
            runner.boot += 1
            runner.started = runner.failed = runner.disconnected = 0
            runner.rebuild()
            self.reboots += 1
        new = rng.choice(self.NEW_SESSIONS) if self.grows(runner) else 0
        if new:
            runner.started += new
            roll = rng.random()
            if roll < 0.02 * new:
                runner.failed += 1
            elif roll < 0.03 * new:
                runner.disconnected += 1
        body = runner.prefix + b'{"started":%d,"failed":%d,"disconnected":%d}}' % (
            runner.started,
            runner.failed,
            runner.disconnected,
        )
        return runner, body, (runner.boot, runner.started, runner.failed, runner.disconnected)


@dataclass
class Target:
    """Where the heartbeats go, and the token they carry."""

    port: int
    token: str

    def head_prefix(self) -> bytes:
        headers = [
            f"POST {ENDPOINT} HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "User-Agent: runner-bench",
            f"Authorization: Bearer {self.token}",
            "Content-Type: application/json",
            # Last, so a request's head is prefix + length + blank line.
            "Content-Length: ",
        ]
        return "\r\n".join(headers).encode()


# --------------------------------------------------------------------------- client


async def load(
    target: Target, fleet: Fleet, connections: int, seconds: float, at_least: int = 0
) -> Run:
    """Closed loop: each connection sends its next heartbeat as soon as its answer is in.

    Runs ``seconds``, or longer until ``at_least`` heartbeats were sent."""
    run = Run(seconds)
    prefix = target.head_prefix()
    sent = 0

    async def sender(conn: Connection, deadline: float) -> None:
        nonlocal sent
        try:
            while time.perf_counter() < deadline or sent < at_least:
                runner, body, counters = fleet.next()
                sent += 1
                # One write, so head and body leave in one segment, as a runner's small
                # request would (two writes are two sends with TCP_NODELAY).
                request = prefix + b"%d\r\n\r\n" % len(body) + body
                began = time.perf_counter()
                try:
                    status = await conn.request(request, b"")
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status = 0  # counted; the next request opens a new connection
                if status == 200:
                    run.latencies.append(time.perf_counter() - began)
                    runner.acknowledge(counters)
                run.statuses[status] += 1
        finally:
            await conn.close()

    conns = [Connection(target.port) for _ in range(connections)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(sender(c, t0 + seconds) for c in conns))
    run.seconds = time.perf_counter() - t0
    run.client_cpu = (time.process_time() - cpu0) / run.seconds
    return run


# --------------------------------------------------------------------------- servers


def serve_bare(port: int) -> None:
    """The baseline: read the body, parse it with json.loads, answer a small JSON."""
    from aiohttp import web  # only this subprocess needs aiohttp

    async def heartbeat(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.json_response(BARE_ANSWER)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"running": True})

    app = web.Application()
    app.router.add_post(ENDPOINT, heartbeat)
    app.router.add_get(HEALTH, health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), in MB (10^6 bytes)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return None


def create_admin_token(env: dict[str, str]) -> str:
    """`python -m app token create` on the (fresh) database; the secret is its last line."""
    done = subprocess.run(
        [sys.executable, "-m", "app", "token", "create", "--name", "bench", "--role", "admin"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("upt_"):
        raise SystemExit(f"token create failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return lines[-1].strip()


def schema_tables(db: Path) -> dict[str, list[str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        names = [
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return {
            name: [row[1] for row in conn.execute(f'PRAGMA table_info("{name}")')] for name in names
        }


@dataclass
class Stored:
    """What the database held after shutdown, against what was acknowledged."""

    ok: bool | None  # None: no way to check with this schema
    lines: list[str]


def check_stored(db: Path, fleet: Fleet) -> Stored:
    """Compare what the service stored with the heartbeats it answered 200.

    The schema keeps no row per heartbeat, so the count of heartbeats cannot be compared
    directly. What it keeps is checked instead: each runner's last state (``runners``:
    its boot and counters) must be those of its last heartbeat answered 200, and the
    sessions counted (``session_counts``) must add up to what those heartbeats added."""
    tables = schema_tables(db)
    if not {"runners", "session_counts"} <= tables.keys():
        related = [t for t in tables if "heartbeat" in t or "runner" in t or "session" in t]
        return Stored(
            None,
            [
                "stored heartbeats: not checked, no runners/session_counts tables "
                f"(tables that look related: {', '.join(related) or 'none'})"
            ],
        )
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        # Runners are kept per (org, runner id); the fleet's runner ids are unique anyway.
        rows = {
            (org_id, runner_id): (boot_id, started, failed, disconnected)
            for org_id, runner_id, boot_id, started, failed, disconnected in conn.execute(
                "SELECT org_id, runner_id, boot_id, started, failed, disconnected FROM runners"
            )
        }
        sums = conn.execute(
            "SELECT coalesce(sum(started), 0), coalesce(sum(failed), 0),"
            " coalesce(sum(disconnected), 0) FROM session_counts"
        ).fetchone()
    acked = {(r.org_id, r.runner_id): r for r in fleet.runners if r.acknowledged is not None}
    wrong = [
        f"{org_id}/{runner_id}"
        for (org_id, runner_id), runner in acked.items()
        if runner.acknowledged is not None
        and rows.get((org_id, runner_id))
        != (f"b-{runner.acknowledged[0]}", *runner.acknowledged[1:])
    ]
    unknown = sorted(rows.keys() - acked.keys())
    expected = tuple(sum(r.counted[i] for r in fleet.runners) for i in range(3))
    sessions_ok = tuple(sums) == expected
    lines = [
        f"stored runner states: {len(rows):,} rows for {len(acked):,} runners answered 200; "
        + (
            "each holds its runner's last acknowledged boot and counters"
            if not wrong and not unknown
            else f"**{len(wrong):,} differ** (e.g. {', '.join(wrong[:3])}), "
            f"**{len(unknown):,} never acknowledged**"
        ),
        "stored session counts (started, failed, disconnected): "
        f"{', '.join(f'{n:,}' for n in sums)} for {', '.join(f'{n:,}' for n in expected)} "
        "added by the heartbeats answered 200: " + ("equal" if sessions_ok else "**MISMATCH**"),
    ]
    return Stored(not wrong and not unknown and sessions_ok, lines)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One row of the table: a server and the fleet that heartbeats to it."""

    name: str
    server: Server
    target: Target
    fleet: Fleet
    runs: list[Run] = field(default_factory=list)
    answers: Counter[int] = field(default_factory=Counter)  # warm-up included
    rss_mb: float | None = None

    def median(self, metric: Callable[[Run], float | None]) -> float | None:
        values = [v for v in map(metric, self.runs) if v is not None]
        return statistics.median(values) if values else None

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)

    def p(self, q: float) -> float:
        return statistics.median(r.percentile_ms(q) for r in self.runs)

    def share_of(self, baseline: Case) -> float:
        # Ratio within each round, then the median (see bench/webhooks.py).
        return statistics.median(
            mine.rps / base.rps for mine, base in zip(self.runs, baseline.runs, strict=True)
        )


def run_all(cases: list[Case], args: argparse.Namespace) -> None:
    """Warm each case up until every runner has sent a heartbeat, then interleaved rounds."""

    def timed(case: Case, seconds: float, at_least: int = 0) -> Run:
        assert case.server.process is not None
        run = case.server.measured(
            lambda: asyncio.run(load(case.target, case.fleet, args.connections, seconds, at_least)),
            pinned=args.pin,
        )
        case.answers += run.statuses
        return run

    for case in cases:
        progress(f"warm-up: {case.name}")
        run = timed(case, args.warmup, at_least=args.runners)
        progress(f"  {sum(run.statuses.values()):,} heartbeats in {run.seconds:.1f} s")
    for n in range(args.repeat):
        for case in cases:
            run = timed(case, args.seconds)
            case.runs.append(run)
            progress(
                f"round {n + 1}: {case.name}: {run.rps:,.0f} req/s, "
                f"p99 {run.percentile_ms(0.99):.1f} ms, "
                f"other load on the cores: {others(run.others_server_core, run.others_client_core)}"
            )
    for case in cases:
        assert case.server.process is not None
        case.rss_mb = peak_rss_mb(case.server.process.pid)


# --------------------------------------------------------------------------- rollback phase

# The rollback phase: a staged rollout of a new build to half of the orgs at once, pulled
# back by the failing sessions of two of them. The thresholds are set explicitly (they are
# the service's defaults), so the breaching heartbeat computed here is the service's.
API = "/api/update-pipeline"
ROLLBACK_STAGES = "50%:1h,100%"
MIN_SESSIONS = 100
MAX_FAILURE_RATE = 0.10
# Each breacher org first reports this many healthy sessions, one per heartbeat.
HEALTHY_SESSIONS = 60
ROLLBACK_TARGET_MS = 1000.0
# The background load's throughput and p99 are taken over this long after the breaching
# heartbeat was sent, and over this long after every included runner was told, against
# the breach sequence before it.
WINDOW_S = 1.0
# Give up on a step of the phase after this long (a stuck phase is a failure, not a hang).
STEP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BreachPlan:
    """Two included orgs' heartbeats, one session each, sent one after the other's answer.

    First each org reports HEALTHY_SESSIONS healthy sessions (the stage passes once it
    has MIN_SESSIONS), then each heartbeat adds one failed session, the two orgs taking
    turns. ``breaching`` is the first heartbeat after which the stage's sessions call for
    a rollback, by the service's rule: at least MIN_SESSIONS sessions, a failure rate above
    MAX_FAILURE_RATE over all of them and in both orgs' own data."""

    steps: tuple[tuple[int, int, int], ...]  # (org 0 or 1, started, failed), cumulative
    breaching: int
    sessions: int  # the stage's sessions once the breaching heartbeat is counted

    @classmethod
    def build(cls) -> BreachPlan:
        counts = [[0, 0], [0, 0]]
        steps: list[tuple[int, int, int]] = []
        while True:
            org = len(steps) % 2
            counts[org][0] += 1
            if len(steps) >= 2 * HEALTHY_SESSIONS:
                counts[org][1] += 1
            steps.append((org, counts[org][0], counts[org][1]))
            started = counts[0][0] + counts[1][0]
            failed = counts[0][1] + counts[1][1]
            if (
                started >= MIN_SESSIONS
                and failed / started > MAX_FAILURE_RATE
                and all(f / s > MAX_FAILURE_RATE for s, f in counts)
            ):
                return cls(tuple(steps), len(steps) - 1, started)


class AnswerConnection(Connection):
    """bench/webhooks.py's connection, handing back the answer's body as well."""

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.reader, self.writer
        try:
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lowered = head.lower()
            start = lowered.find(b"\r\ncontent-length:")
            if start < 0:
                raise ConnectionError("response without Content-Length")
            end = lowered.index(b"\r\n", start + 2)
            body = await reader.readexactly(int(lowered[start + 17 : end]))
            if b"\r\nconnection: close" in lowered:
                await self.close()
            return status, body
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()
            raise


class RolloutFleet(Fleet):
    """The same fleet, every runner on the channel's build and doing as its answers say:
    it runs the build its last answer named from its next heartbeat on.

    Only runners on the channel's build add sessions. A runner on a rollout's target
    reports its counters unchanged (an idle runner), so the sessions a stage counts are
    the breachers' alone and the breaching heartbeat is known exactly (BreachPlan); the
    other runners of included orgs still heartbeat and read the answers."""

    def __init__(self, runners: int, orgs: int, channel_build: str) -> None:
        super().__init__(runners, orgs)
        self.channel_build = channel_build
        for runner in self.runners:
            runner.build_id, runner.runtimes = channel_build, RUNTIMES
            runner.rebuild()

    def grows(self, runner: Runner) -> bool:
        return runner.build_id == self.channel_build

    @staticmethod
    def obey(runner: Runner, desired: object) -> None:
        if isinstance(desired, str) and desired != runner.build_id:
            runner.build_id = desired
            runner.rebuild()


@dataclass
class Watch:
    """What the answers of one rollout showed, in the load generator's clock
    (time.perf_counter, seconds)."""

    rollout_id: str
    target: str  # the rollout's build
    previous: str  # the build included orgs ran before, which a rollback sends them back to
    included: frozenset[str]  # org ids
    learning: set[str]  # included runners not yet told the target
    waiting: set[str]  # included runners not yet told of the rollback
    breach_sent: float | None = None
    first_visible: float | None = None  # the first answer carrying the rollback, received
    all_told: float | None = None  # every included runner's answer has carried it
    early: int = 0  # answers carrying a rollback before the breaching heartbeat was sent
    stale: int = 0  # answers naming the rollout to heartbeats sent after first_visible
    odd: int = 0  # answers that fit neither the rollout nor its rollback
    samples: list[tuple[float, float]] = field(default_factory=list)  # background (at, rtt)

    def answer(self, org_id: str, runner_id: str, sent: float, received: float, data: Any) -> bool:
        """Record one answer; True when it carries the rollback."""
        rollout_id, desired = data.get("rolloutId"), data.get("desiredBuildId")
        if org_id not in self.included:
            if rollout_id is not None or desired != self.previous:
                self.odd += 1
            return False
        if rollout_id is None and desired == self.previous:
            if self.breach_sent is None:
                self.early += 1
            elif self.first_visible is None or received < self.first_visible:
                self.first_visible = received
            self.waiting.discard(runner_id)
            if not self.waiting and self.all_told is None and self.first_visible is not None:
                self.all_told = received
            return True
        if rollout_id == self.rollout_id and desired == self.target:
            self.learning.discard(runner_id)
            if self.first_visible is not None and sent > self.first_visible:
                self.stale += 1
        else:
            self.odd += 1
        return False


@dataclass
class Window:
    """The background load over a span: answers per second, p99 and slowest round trip."""

    rps: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples: list[tuple[float, float]], start: float, end: float) -> Window:
        rtts = sorted(rtt for at, rtt in samples if start <= at < end)
        if not rtts or end <= start:
            return cls(0.0, float("nan"), float("nan"))
        p99 = rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))]
        return cls(len(rtts) / (end - start), 1000 * p99, 1000 * rtts[-1])


@dataclass
class Outcome:
    """One rollout, from its start to every included runner told of its rollback."""

    rollout_id: str
    orgs: int  # included at the first stage
    runners: int  # background runners in those orgs
    breach_rtt_ms: float | None = None  # the breaching heartbeat's own round trip
    own: bool = False  # its own answer carried the rollback
    visible_ms: float | None = None  # breaching heartbeat sent -> first answer with rollback
    all_told_s: float | None = None  # breaching heartbeat sent -> every included runner told
    plain_ms: list[float] = field(default_factory=list)  # the breachers' other round trips
    before: Window | None = None  # the background load during the breach sequence
    window: Window | None = None  # in the WINDOW_S after the breaching heartbeat was sent
    settled: Window | None = None  # in the WINDOW_S after every included runner was told
    cycle_s: float | None = None  # one heartbeat from every runner, at the load's rate
    early: int = 0
    stale: int = 0
    odd: int = 0
    record: str = ""  # what the service recorded, checked against the plan
    record_ok: bool = False
    problem: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.problem
            and self.visible_ms is not None
            and self.all_told_s is not None
            and not self.early
            and not self.stale
            and not self.odd
            and self.record_ok
        )


def call_api(target: Target, method: str, path: str, body: object = None) -> tuple[int, Any]:
    """One admin API call (between timed runs: blocking is fine there)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{target.port}{API}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"},
    )
    try:
        with NO_PROXY.open(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def add_builds(db: Path, build_ids: list[str]) -> None:
    """Register builds known-good for every runtime they carry, straight into the
    database (before the service starts), as a canary that passed would leave them."""
    now = datetime.now(UTC)
    at = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    rows = [
        (
            f"bench-{build_id}",
            build_id,
            "1.0.0",
            at,
            json.dumps(RUNTIMES, sort_keys=True),
            json.dumps(sorted(RUNTIMES)),
            at,
        )
        for build_id in build_ids
    ]
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO runner_builds (id, build_id, runner_version, built_at,"
            " runtime_versions, known_good_for, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


async def until(done: Callable[[], bool], what: str, within: float = STEP_TIMEOUT_S) -> None:
    deadline = time.perf_counter() + within
    while not done():
        if time.perf_counter() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


async def watch_rollout(
    target: Target,
    fleet: RolloutFleet,
    plan: BreachPlan,
    watch: Watch,
    breach_orgs: tuple[str, str],
    outcome: Outcome,
    connections: int,
) -> Run:
    """Background load from the whole fleet, and once every included runner runs the
    target, the breach sequence on a connection of its own, until every included runner
    has been told of the rollback."""
    run = Run(0.0)
    prefix = target.head_prefix()
    stop = asyncio.Event()

    async def sender(conn: AnswerConnection) -> None:
        try:
            while not stop.is_set():
                runner, body, counters = fleet.next()
                request = prefix + b"%d\r\n\r\n" % len(body) + body
                began = time.perf_counter()
                try:
                    status, answer = await conn.exchange(request)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status, answer = 0, b""
                received = time.perf_counter()
                if status == 200:
                    run.latencies.append(received - began)
                    watch.samples.append((received, received - began))
                    runner.acknowledge(counters)
                    data = json.loads(answer)
                    watch.answer(runner.org_id, runner.runner_id, began, received, data)
                    fleet.obey(runner, data.get("desiredBuildId"))
                run.statuses[status] += 1
        finally:
            await conn.close()

    async def breach() -> None:
        conn = AnswerConnection(target.port)
        breachers = [
            Runner(f"breacher-{watch.rollout_id[:8]}-{n}", org, watch.target, RUNTIMES)
            for n, org in enumerate(breach_orgs)
        ]
        last = [(0, 0), (0, 0)]

        async def send(
            org: int, started: int, failed: int, *, breaching: bool = False
        ) -> tuple[float, float, bool]:
            runner = breachers[org]
            body = runner.prefix + b'{"started":%d,"failed":%d,"disconnected":0}}' % (
                started,
                failed,
            )
            began = time.perf_counter()
            if breaching:
                watch.breach_sent = began
            status, answer = await conn.exchange(prefix + b"%d\r\n\r\n" % len(body) + body)
            received = time.perf_counter()
            run.statuses[status] += 1
            if status != 200:
                raise RuntimeError(f"a breacher's heartbeat was answered {status}")
            data = json.loads(answer)
            shown = watch.answer(runner.org_id, runner.runner_id, began, received, data)
            return began, received, shown

        try:
            for step, (org, started, failed) in enumerate(plan.steps):
                breaching = step == plan.breaching
                began, received, shown = await send(org, started, failed, breaching=breaching)
                last[org] = (started, failed)
                if step < plan.breaching:
                    if shown or watch.early:
                        outcome.problem = (
                            f"rolled back by heartbeat {step + 1} of the breach sequence, "
                            f"before the breaching one ({plan.breaching + 1})"
                        )
                        return
                    outcome.plain_ms.append(1000 * (received - began))
                else:
                    outcome.breach_rtt_ms = 1000 * (received - began)
                    outcome.own = shown
            # Not on its own answer: poll (counters unchanged) until some answer has it.
            deadline = time.perf_counter() + STEP_TIMEOUT_S
            org = 0
            while watch.first_visible is None and time.perf_counter() < deadline:
                await send(org, *last[org])
                org = 1 - org
        finally:
            await conn.close()

    conns = [AnswerConnection(target.port) for _ in range(connections)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    senders = [asyncio.create_task(sender(c)) for c in conns]
    started = t0
    try:
        await until(lambda: not watch.learning, "included runners to learn the target build")
        started = time.perf_counter()
        await breach()
        if not outcome.problem:
            await until(lambda: watch.all_told is not None, "every included runner told")
            # The same load once every runner is back on the channel's build and adding
            # sessions again: what the window after the breach is compared with.
            await asyncio.sleep(WINDOW_S)
    except (TimeoutError, RuntimeError) as exc:
        outcome.problem = outcome.problem or f"gave up waiting for {exc}"
    finally:
        stop.set()
        await asyncio.gather(*senders)
    run.seconds = time.perf_counter() - t0
    run.client_cpu = (time.process_time() - cpu0) / run.seconds
    if watch.breach_sent is not None:
        outcome.before = Window.of(watch.samples, started, watch.breach_sent)
        outcome.window = Window.of(watch.samples, watch.breach_sent, watch.breach_sent + WINDOW_S)
        if outcome.before.rps:
            outcome.cycle_s = len(fleet.runners) / outcome.before.rps
        if watch.first_visible is not None:
            outcome.visible_ms = 1000 * (watch.first_visible - watch.breach_sent)
        if watch.all_told is not None:
            outcome.all_told_s = watch.all_told - watch.breach_sent
            outcome.settled = Window.of(watch.samples, watch.all_told, watch.all_told + WINDOW_S)
    outcome.early, outcome.stale, outcome.odd = watch.early, watch.stale, watch.odd
    return run


def included_orgs(target: Target, rollout_id: str) -> list[str]:
    orgs: list[str] = []
    cursor = None
    while True:
        query = f"?limit=500&cursor={cursor}" if cursor else "?limit=500"
        status, page = call_api(target, "GET", f"/rollouts/{rollout_id}/orgs{query}")
        if status != 200:
            raise SystemExit(f"GET /rollouts/{rollout_id}/orgs answered {status}: {page}")
        orgs += [item["orgId"] for item in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            return orgs


def roll_back_once(
    server: Server,
    target: Target,
    fleet: RolloutFleet,
    plan: BreachPlan,
    build_id: str,
    n: int,
    args: argparse.Namespace,
) -> tuple[Outcome, Run]:
    """Start a rollout of ``build_id``, have it rolled back, and say how fast it showed."""
    status, started = call_api(
        target, "POST", "/rollouts", {"buildId": build_id, "channel": "stable"}
    )
    if status != 201:
        server.fail(f"POST /rollouts answered {status}: {started}")
    rollout_id = started["rolloutId"]
    orgs = frozenset(included_orgs(target, rollout_id))
    if len(orgs) < 2:
        server.fail(f"rollout {rollout_id} included {len(orgs)} org(s); two are needed")
    # Two breacher orgs, chosen among the included ones the same way in every run.
    chosen = random.Random(n).sample(sorted(orgs), 2)  # noqa: S311 - not a secret
    breach_orgs = (chosen[0], chosen[1])
    runners = {r.runner_id for r in fleet.runners if r.org_id in orgs}
    watch = Watch(
        rollout_id,
        build_id,
        started.get("previousBuildId") or CURRENT_BUILD,
        orgs,
        learning=set(runners),
        waiting=set(runners),
    )
    outcome = Outcome(rollout_id, len(orgs), len(runners))
    run = server.measured(
        lambda: asyncio.run(
            watch_rollout(target, fleet, plan, watch, breach_orgs, outcome, args.connections)
        ),
        pinned=args.pin,
    )
    status, view = call_api(target, "GET", f"/rollouts/{rollout_id}")
    rollback = (view.get("rollback") or {}) if status == 200 else {}
    state = view.get("state") if status == 200 else f"unreadable ({status})"
    recorded_orgs = sorted(rollback.get("orgs") or [])
    outcome.record = (
        f"{state}, {rollback.get('sessions')} sessions, orgs {', '.join(recorded_orgs)}"
    )
    outcome.record_ok = (
        state == "rolled_back"
        and rollback.get("sessions") == plan.sessions
        and recorded_orgs == sorted(breach_orgs)
    )
    return outcome, run


@dataclass
class RollbackPhase:
    """The rollback phase's rollouts, and its service's end."""

    server: Server
    plan: BreachPlan
    outcomes: list[Outcome] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)  # one per rollout, warm-up excluded
    exit_code: int | None = None

    @property
    def answers(self) -> Counter[int]:
        return sum((run.statuses for run in self.runs), Counter())

    @property
    def ok(self) -> bool:
        answers = self.answers
        return (
            self.exit_code == 0
            and bool(self.outcomes)
            and all(o.ok for o in self.outcomes)
            and answers[200] == sum(answers.values())
        )


def rollback_phase(tmp_path: Path, args: argparse.Namespace) -> RollbackPhase:
    """A service of its own (fresh database, the short stage plan), its channel on the
    fleet's build, then ``--rollback-repeat`` rollouts, each rolled back."""
    port = free_port()
    db = tmp_path / "rollback.db"
    env = service_env(db, port, pipeline=True)
    env.update(
        UPDATE_PIPELINE_STAGES_STABLE=ROLLBACK_STAGES,
        UPDATE_PIPELINE_MIN_SESSION_COUNT=str(MIN_SESSIONS),
        UPDATE_PIPELINE_MAX_FAILURE_RATE=str(MAX_FAILURE_RATE),
    )
    server = Server(
        "service (rollback phase)",
        [sys.executable, "-m", "app", "serve"],
        env,
        port,
        tmp_path / "rollback.log",
    )
    phase = RollbackPhase(server, BreachPlan.build())
    progress("rollback phase: creating the admin token and the builds")
    target = Target(port, create_admin_token(env))
    builds = [f"build-rollback-{n + 1:02d}" for n in range(args.rollback_repeat)]
    add_builds(db, [CURRENT_BUILD, *builds])
    fleet = RolloutFleet(args.runners, args.orgs, CURRENT_BUILD)
    try:
        progress("starting the service for the rollback phase")
        server.start(args.pin)
        status, answer = call_api(
            target,
            "PUT",
            "/channels/stable",
            {"buildId": CURRENT_BUILD, "reason": "bench: the fleet's build"},
        )
        if status != 200:
            server.fail(f"PUT /channels/stable answered {status}: {answer}")
        progress("rollback phase: warm-up, one heartbeat per runner (the orgs come to exist)")
        warm = asyncio.run(load(target, fleet, args.connections, args.warmup, args.runners))
        if warm.statuses[200] != sum(warm.statuses.values()):
            server.fail(f"warm-up heartbeats answered {dict(warm.statuses)}")
        for n, build_id in enumerate(builds):
            outcome, run = roll_back_once(server, target, fleet, phase.plan, build_id, n, args)
            phase.outcomes.append(outcome)
            phase.runs.append(run)
            progress(
                f"rollout {n + 1}: rollback visible after {fmt_ms(outcome.visible_ms)} ms "
                f"(breaching heartbeat's round trip {fmt_ms(outcome.breach_rtt_ms)} ms, a plain "
                f"one's median {fmt_ms(median_or_none(outcome.plain_ms))} ms), every included "
                f"runner told after {fmt_s(outcome.all_told_s)} s, other load on the cores: "
                f"{others(run.others_server_core, run.others_client_core)}"
                + (f"; PROBLEM: {outcome.problem}" if outcome.problem else "")
            )
        phase.exit_code = server.stop()
    finally:
        server.kill()
    return phase


# --------------------------------------------------------------------------- report


def print_header(args: argparse.Namespace) -> None:
    pinning = (
        f"Servers pinned to CPU {SERVER_CPU} with taskset, load generator to CPU {CLIENT_CPU}"
        if args.pin
        else f"CPUs **not pinned** ({args.pin_problem})"
    )
    machine = (
        f"{os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"aiohttp {package_version('aiohttp')}, SQLite {sqlite3.sqlite_version}"
    )
    method = (
        f"{args.runners:,} runners in {args.orgs:,} orgs, {args.connections} keep-alive "
        "connections, each request the next runner's heartbeat (round-robin) with cumulative "
        "counters growing by 0-3 sessions (about 2% failed, 1% disconnected), 5% of the "
        "runners on the previous build, 2% reporting an older runtime, a rare restart (new "
        f"bootId); warm-up {args.warmup:g} s or one heartbeat per runner, whichever is "
        f"longer; median of {args.repeat} interleaved rounds of {args.seconds:g} s"
    )
    if not args.bare_only:
        method += (
            "; the service with the pipeline enabled, a fresh database and an admin token "
            "(`python -m app token create --role admin`)"
        )
    print(f"## Runner heartbeats, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n")
    print(f"{machine}. {pinning}. {method}.\n")
    print(
        "Not measured *during an active rollout*: these cases start none, so every "
        "heartbeat is answered from the channel's build alone (the rollback phase, when run, "
        "measures heartbeats during rollouts).\n"
    )


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MB"


def print_table(cases: list[Case], baseline: Case) -> None:
    print(
        "| case | req/s | p50 ms | p99 ms | share of bare | server CPU | client CPU "
        "| other load, server / client core | peak RSS | non-200 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        non_200 = sum(n for status, n in c.answers.items() if status != 200)
        elsewhere = others(
            c.median(lambda r: r.others_server_core), c.median(lambda r: r.others_client_core)
        )
        print(
            f"| {c.name} | {c.rps:,.0f} | {c.p(0.50):.1f} | {c.p(0.99):.1f} "
            f"| {c.share_of(baseline):.0%} "
            f"| {percent(c.median(lambda r: r.server_cpu))} "
            f"| {percent(c.median(lambda r: r.client_cpu))} "
            f"| {elsewhere} | {mb(c.rss_mb)} | {non_200:,} |"
        )
    print()


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def check_service(
    service: Case, baseline: Case, stored: Stored, exit_code: int, args: argparse.Namespace
) -> bool:
    """Print the targets and the checks; True when nothing was refused or lost."""
    p99, share = service.p(0.99), service.share_of(baseline)
    refused = {status: n for status, n in service.answers.items() if status != 200}
    print(
        f"- p99 {p99:.1f} ms at {args.connections} connections (target: under "
        f"{P99_TARGET_MS:g} ms): {met(p99 < P99_TARGET_MS)}"
    )
    print(
        f"- throughput {share:.0%} of the bare handler (target: at least "
        f"{SHARE_TARGET:.0%}): {met(share >= SHARE_TARGET)}"
    )
    rss = service.rss_mb
    print(
        f"- peak RSS of the service {mb(rss)} (target: under {RSS_TARGET_MB:g} MB): "
        + ("unknown" if rss is None else met(rss < RSS_TARGET_MB))
    )
    print(
        f"- answered 200: {service.answers[200]:,} heartbeats (warm-up included), from "
        f"{sum(1 for r in service.fleet.runners if r.heartbeats):,} runners; "
        f"{service.fleet.reboots} runner restarts (new bootId) on the way"
    )
    for line in stored.lines:
        print(f"- {line}")
    print(
        "- answers other than 200: "
        + (
            ", ".join(f"{n:,} x {status or 'connection failed'}" for status, n in refused.items())
            or "none"
        )
    )
    logged = [
        line
        for line in service.server.log_path.read_text(errors="replace").splitlines()
        if "WARNING" in line or "ERROR" in line
    ]
    # Runtime versions no upstream source announced (the service polls none here): one
    # warning per version, expected.
    drift = sum(1 for line in logged if "(drift)" in line)
    print(
        f"- service exit code after SIGTERM: {exit_code}; warning/error log lines: "
        f"{len(logged) - drift} (and {drift} drift warnings, one per runtime version reported)"
    )
    return stored.ok is not False and not refused and exit_code == 0


def print_client_headroom(cases: list[Case]) -> None:
    busiest = max(r.client_cpu for c in cases for r in c.runs)
    print(
        f"- load generator: at most {busiest:.0%} of its core (the bare handler's rate is "
        "the server's only while this stays well below 100%)"
    )


def print_disturbance(cases: list[Case]) -> None:
    print_disturbance_of([run for case in cases for run in case.runs])


def print_disturbance_of(runs: list[Run]) -> None:
    bad = sum(map(disturbed, runs))
    if any(run.others_server_core is None for run in runs):
        print("- disturbance from other work: unknown (CPUs not pinned, or no /proc)")
    elif bad:
        print(
            f"- **{bad} of {len(runs)} runs disturbed** by other work: run again on a quiet "
            "machine before trusting the numbers"
        )
    else:
        print(f"- disturbance from other work: none of the {len(runs)} runs")


def fmt_ms(value: float | None) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p99_or_none(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None


def print_rollback(phase: RollbackPhase, args: argparse.Namespace) -> None:
    plan, outcomes = phase.plan, phase.outcomes
    pinning = (
        f"Service pinned to CPU {SERVER_CPU} with taskset, load generator to CPU {CLIENT_CPU}"
        if args.pin
        else f"CPUs **not pinned** ({args.pin_problem})"
    )
    machine = (
        f"{os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"aiohttp {package_version('aiohttp')}, SQLite {sqlite3.sqlite_version}"
    )
    print(f"## Rollback latency, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n")
    print(
        f"{machine}. {pinning}. A service of its own (fresh database, pipeline enabled, "
        f"`UPDATE_PIPELINE_STAGES_STABLE={ROLLBACK_STAGES}`, at least {MIN_SESSIONS} "
        f"sessions and a failure rate above {MAX_FAILURE_RATE:.0%} to roll back), the "
        f"stable channel recommending `{CURRENT_BUILD}`, {args.runners:,} runners in "
        f"{args.orgs:,} orgs heartbeating round-robin over {args.connections} keep-alive "
        "connections, each runner running the build its last answer named and adding "
        "sessions only while on the channel's build. "
        f"{len(outcomes)} rollouts of a new build, one after the other: the first stage "
        "includes about half of the orgs; once every runner of those orgs has been told the "
        "target build, two breacher runners in two of those orgs send heartbeats on a "
        "connection of their own, each after the previous answer, one session per "
        f"heartbeat: {HEALTHY_SESSIONS} healthy sessions each, then one failed session per "
        f"heartbeat, taking turns, until heartbeat {plan.breaching + 1} brings the stage to "
        f"{plan.sessions} sessions with more than {MAX_FAILURE_RATE:.0%} failed overall and "
        "in both orgs: the breaching heartbeat, known in advance.\n"
    )
    print(
        "*Visible after*: from sending the breaching heartbeat to the first answer, to any "
        "runner of an included org, that carries the rollback (`rolloutId` null, "
        "`desiredBuildId` the build before the rollout). *Plain round trip*: the breachers' "
        "heartbeats before it, same connection, same load, no rollback. *Every included "
        "runner told*: until each runner of the included orgs has had such an answer, which "
        "takes one turn of the round-robin (*fleet cycle*: runners ÷ the load's rate; real "
        "runners poll every 30 s).\n"
    )
    print(
        "| rollout | orgs (runners) included | breaching heartbeat's round trip ms "
        "| rollback visible after ms | on its own answer | plain round trip ms, median / p99 "
        "| visible ÷ plain median | every included runner told after s (fleet cycle s) |"
    )
    print("|---:|---:|---:|---:|---|---:|---:|---:|")
    for n, o in enumerate(outcomes, 1):
        plain = median_or_none(o.plain_ms)
        ratio = f"{o.visible_ms / plain:.1f}x" if o.visible_ms is not None and plain else "n/a"
        print(
            f"| {n} | {o.orgs:,} ({o.runners:,}) | {fmt_ms(o.breach_rtt_ms)} "
            f"| {fmt_ms(o.visible_ms)} | {'yes' if o.own else '**no**'} "
            f"| {fmt_ms(plain)} / {fmt_ms(p99_or_none(o.plain_ms))} | {ratio} "
            f"| {fmt_s(o.all_told_s)} ({fmt_s(o.cycle_s)}) |"
        )
    print()
    print(
        "The background load around each rollback: during the breach sequence (half of the "
        f"runners idle on the target build), in the {WINDOW_S:g} s after the breaching "
        f"heartbeat was sent, and in the {WINDOW_S:g} s after every included runner was told "
        "(all of them back on the channel's build and adding sessions again).\n"
    )
    print(
        "| rollout | req/s: breach sequence / after the breach / after all told "
        "| p99 ms: breach sequence / after the breach / after all told "
        "| slowest ms after the breach |"
    )
    print("|---:|---:|---:|---:|")
    for n, o in enumerate(outcomes, 1):
        spans = [o.before, o.window, o.settled]
        print(
            f"| {n} | "
            + " / ".join("n/a" if w is None else f"{w.rps:,.0f}" for w in spans)
            + " | "
            + " / ".join("n/a" if w is None else fmt_ms(w.p99_ms) for w in spans)
            + f" | {'n/a' if o.window is None else fmt_ms(o.window.max_ms)} |"
        )
    print()
    visible = [o.visible_ms for o in outcomes if o.visible_ms is not None]
    plain_all = [ms for o in outcomes for ms in o.plain_ms]
    told = [o.all_told_s for o in outcomes if o.all_told_s is not None]
    if visible:
        worst = max(visible)
        plain = median_or_none(plain_all)
        print(
            f"- rollback visible after: median {fmt_ms(statistics.median(visible))} ms, max "
            f"{fmt_ms(worst)} ms over {len(visible)} rollouts (target: under "
            f"{ROLLBACK_TARGET_MS:,.0f} ms): "
            + met(len(visible) == len(outcomes) and worst < ROLLBACK_TARGET_MS)
        )
        if plain:
            print(
                f"- that is {statistics.median(visible) / plain:.1f}x (max "
                f"{worst / plain:.1f}x) the median round trip of a plain heartbeat from the "
                f"same runners in the same run ({fmt_ms(plain)} ms, p99 "
                f"{fmt_ms(p99_or_none(plain_all))} ms, {len(plain_all):,} heartbeats)"
            )
    else:
        print("- rollback visible after: **never seen**")
    own = sum(o.own for o in outcomes)
    print(
        f"- the breaching heartbeat's own answer carried the rollback in {own} of "
        f"{len(outcomes)} rollouts"
    )
    if told:
        cycles = [o.cycle_s for o in outcomes if o.cycle_s is not None]
        print(
            f"- every runner of the included orgs told: median {statistics.median(told):.1f} s, "
            f"max {max(told):.1f} s after the breaching heartbeat, against a fleet cycle of "
            f"{fmt_s(median_or_none(cycles))} s at the load's rate: each runner has it on its "
            "next heartbeat"
        )
    print(
        "- answers naming the rollout to heartbeats sent after the rollback was visible: "
        f"{sum(o.stale for o in outcomes)}; answers carrying a rollback before the breaching "
        f"heartbeat was sent: {sum(o.early for o in outcomes)}; answers fitting neither the "
        f"rollout nor its rollback: {sum(o.odd for o in outcomes)}"
    )
    matching = sum(o.record_ok for o in outcomes)
    print(
        f"- the service's record of each rollback (`GET /rollouts/{{id}}`) names the breach "
        f"computed here ({plan.sessions} sessions, the two breacher orgs): {matching} of "
        f"{len(outcomes)}"
        + (
            ""
            if matching == len(outcomes)
            else " (" + "; ".join(o.record for o in outcomes if not o.record_ok) + ")"
        )
    )
    for n, o in enumerate(outcomes, 1):
        if o.problem:
            print(f"- **rollout {n}: {o.problem}**")
    answers = phase.answers
    refused = {status: n for status, n in answers.items() if status != 200}
    print(
        f"- answered 200: {answers[200]:,} heartbeats (warm-up excluded); other answers: "
        + (
            ", ".join(f"{n:,} x {status or 'connection failed'}" for status, n in refused.items())
            or "none"
        )
    )
    logged = [
        line
        for line in phase.server.log_path.read_text(errors="replace").splitlines()
        if ("WARNING" in line or "ERROR" in line) and "(drift)" not in line
    ]
    rolled = sum(1 for line in logged if "rolled back by auto" in line)
    print(
        f"- service exit code after SIGTERM: {phase.exit_code}; warning/error log lines: "
        f"{len(logged)}, of which {rolled} the rollbacks themselves (drift warnings not "
        "counted)"
    )
    runs = phase.runs
    busiest = max((r.client_cpu for r in runs), default=0.0)
    print(f"- load generator: at most {busiest:.0%} of its core")
    print_disturbance_of(runs)
    print()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Measure POST {ENDPOINT} of the real service (python -m app serve) "
        "against a bare aiohttp handler, in the same run; then the rollback phase: how soon "
        "heartbeat answers carry an automatic rollback. Prints Markdown tables; exits 1 if a "
        "heartbeat was answered other than 200, an acknowledged one was not stored, or a "
        "rollback was not seen, seen too early, contradicted by a later answer or recorded "
        "otherwise than the bench computed.",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of timed runs (median)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="warm-up seconds per case (at least one heartbeat per runner)",
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="concurrent keep-alive connections"
    )
    parser.add_argument("--runners", type=int, default=10_000, help="runners in the fleet")
    parser.add_argument("--orgs", type=int, default=2_000, help="organisations they belong to")
    parser.add_argument(
        "--bare-only",
        action="store_true",
        help="measure the bare handler alone (no service, no database, no rollback phase)",
    )
    parser.add_argument(
        "--rollback-repeat",
        type=int,
        default=5,
        help="rollouts the rollback phase starts and has rolled back, after the throughput "
        "cases, to measure how soon heartbeat answers carry a rollback (0: skip the phase)",
    )
    parser.add_argument(
        "--rollback-only",
        action="store_true",
        help="run the rollback phase alone (no throughput cases)",
    )
    # Internal: the bench runs itself again to host the baseline in a process of its own.
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rollback_repeat < 0:
        parser.error("--rollback-repeat: 0 or more")
    if args.rollback_only and (args.bare_only or args.rollback_repeat == 0):
        parser.error("--rollback-only needs the service and --rollback-repeat of 1 or more")
    # bench/webhooks.py's helpers speak of senders.
    args.senders = args.connections
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return 0
    set_up_pinning(args)
    with tempfile.TemporaryDirectory(prefix="bench-heartbeats-") as tmp:
        tmp_path = Path(tmp)
        ok = True
        if not args.rollback_only:
            ok = throughput(tmp_path, args)
        if args.rollback_repeat and not args.bare_only:
            phase = rollback_phase(tmp_path, args)
            print_rollback(phase, args)
            ok = ok and phase.ok
    return 0 if ok else 1


def throughput(tmp_path: Path, args: argparse.Namespace) -> bool:
    """The throughput cases: the bare handler, and the service unless --bare-only."""
    bare_port, service_port = free_port(), free_port()
    db = tmp_path / "bench.db"
    env = service_env(db, service_port, pipeline=True)
    bare = Server(
        "bare handler",
        [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(bare_port)],
        dict(os.environ),
        bare_port,
        tmp_path / "bare.log",
    )
    service = Server(
        "service",
        [sys.executable, "-m", "app", "serve"],
        env,
        service_port,
        tmp_path / "service.log",
    )
    baseline = Case("bare handler", bare, Target(bare_port, "bare"), Fleet(args.runners, args.orgs))
    cases = [baseline]
    servers = [bare]
    subject = None
    if not args.bare_only:
        progress("creating the admin token")
        token = create_admin_token(env)
        subject = Case(
            "service, admin token",
            service,
            Target(service_port, token),
            Fleet(args.runners, args.orgs),
        )
        cases.append(subject)
        servers.append(service)
    try:
        for server in servers:
            progress(f"starting {server.name}")
            server.start(args.pin)
        if subject is not None:
            # The endpoint exists and takes the token: one heartbeat, counted.
            probe = asyncio.run(load(subject.target, subject.fleet, 1, 0.0, at_least=1))
            subject.answers += probe.statuses
            if probe.statuses[200] != 1:
                statuses = ", ".join(map(str, probe.statuses))
                service.fail(f"a heartbeat with the admin token was answered {statuses}")
        run_all(cases, args)
        bare.stop()
        exit_code = service.stop() if subject is not None else 0
    finally:
        for server in servers:
            server.kill()
    print_header(args)
    print_table(cases, baseline)
    ok = True
    if subject is not None:
        stored = check_stored(db, subject.fleet)
        ok = check_service(subject, baseline, stored, exit_code, args)
    print_client_headroom(cases)
    print_disturbance(cases)
    print()
    return ok


if __name__ == "__main__":
    sys.exit(main())
