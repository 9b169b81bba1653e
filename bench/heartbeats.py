"""Benchmark of runner heartbeats (POST /api/update-pipeline/heartbeat) against a bare
aiohttp handler.

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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# The shared machinery lives beside this script, in bench/webhooks.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from webhooks import (
    CLIENT_CPU,
    HEALTH,
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
        new = rng.choice(self.NEW_SESSIONS)
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
        "Not measured *during an active rollout*: the service has no rollouts yet, so "
        "every heartbeat is answered from the channel's build alone.\n"
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
    runs = [run for case in cases for run in case.runs]
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


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Measure POST {ENDPOINT} of the real service (python -m app serve) "
        "against a bare aiohttp handler, in the same run. Prints a Markdown table; exits 1 "
        "if a heartbeat was answered other than 200 or an acknowledged one was not stored.",
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
        help="measure the bare handler alone (no service, no database)",
    )
    # Internal: the bench runs itself again to host the baseline in a process of its own.
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
        baseline = Case(
            "bare handler", bare, Target(bare_port, "bare"), Fleet(args.runners, args.orgs)
        )
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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
