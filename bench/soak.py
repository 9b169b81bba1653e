"""Soak benchmark: the real service under a steady heartbeat load plus webhook deliveries
and API calls for a long time, watched for growth (memory, file descriptors, database
size, table rows) and for latency drift.

Run from the repository root: ``python bench/soak.py`` (``--help`` for the options); the
documented run is ``python bench/soak.py --seconds 1800 --window 60 --warmup 300 --check``.
It reuses the machinery of bench/webhooks.py and bench/heartbeats.py (the service pinned
to a core, CPU accounting, the raw-streams client, the heartbeat fleet);
docs/performance.md explains what it measures and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.clock import isoformat
from app.config import Settings
from app.github.outbox import KEEP_DONE
from app.github.webhooks import KEEP_DELIVERIES, KEEP_PAYLOADS
from app.metrics import PREFIX
from app.pipeline.events import KEEP_EVENTS

# The shared machinery lives beside this script, in bench/webhooks.py and bench/heartbeats.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from heartbeats import (
    API,
    AnswerConnection,
    Fleet,
    Target,
    check_stored,
    create_admin_token,
    fmt_ms,
    median_or_none,
    met,
    p99_or_none,
)
from webhooks import (
    CLIENT_CPU,
    DISTURBED_CLIENT_CORE,
    DISTURBED_SERVER_CORE,
    NO_PROXY,
    REPO_ROOT,
    SERVER_CPU,
    CpuSample,
    Run,
    Server,
    Workload,
    cpu_model,
    disturbed,
    free_port,
    package_version,
    percent,
    progress,
    service_env,
    set_up_pinning,
)

PAYLOADS = REPO_ROOT.parent / "shared" / "conformance" / "webhooks"
P99_RATIO_TARGET = 1.20
# RSS may still settle after the warm-up (allocator arenas, SQLite's page caches filling
# as the database grows), so the bound is a share rather than zero.
RSS_GROWTH_LIMIT = 0.10
# A keep-alive connection closed and opened again can leave the count one off while the
# old socket is torn down.
FD_SLACK = 2
# Reads rotated through, one per API call: the paths operators and dashboards poll.
READS = (
    f"{API}/status",
    f"{API}/events?limit=50",
    f"{API}/fleet",
    f"{API}/webhooks/deliveries?limit=20",
    f"{API}/diagnostics",
    "/metrics",
)
# Rows written before the service starts with dates past their retention: the service's
# pruning, which runs at start and then hourly or daily (too rarely for a soak to see it
# happen), must have removed them all by the end.
EXPIRED_ROWS = 100
EXPIRED = "soak-expired"
# Log lines the workload causes by design: runtime versions no source announced, and the
# freeze being set and lifted (the writes that feed the event log).
EXPECTED_LOG = ("(drift)", "rollouts frozen by", "rollouts unfrozen by")


# --------------------------------------------------------------------------- database


@dataclass(frozen=True)
class Sample:
    """The service's process and database at one moment."""

    at: float  # seconds since the load started
    rss_mb: float | None
    fds: int | None
    db_mb: float  # the database file and its WAL, on disk
    wal_mb: float  # the WAL alone: it grows without bound if checkpoints never complete
    used_mb: float  # pages in use inside the database (freed pages excluded)
    rows: dict[str, int]
    pending_deliveries: int


def vm_rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def read_only(db: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10))


def table_rows(conn: sqlite3.Connection) -> dict[str, int]:
    names = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {
        # Names come from sqlite_master, not from outside.
        name: conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]  # noqa: S608
        for name in sorted(names)
    }


def sample(pid: int, db: Path, at: float) -> Sample:
    """Blocking (run in a thread): the counts take milliseconds on a large database."""
    wal = Path(f"{db}-wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    on_disk = db.stat().st_size + wal_bytes
    with read_only(db) as conn:
        rows = table_rows(conn)
        (pending,) = conn.execute(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
        ).fetchone()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    used = (pages - free) * page_size
    return Sample(
        at, vm_rss_mb(pid), open_fds(pid), on_disk / 1e6, wal_bytes / 1e6, used / 1e6, rows, pending
    )


def seed(db: Path, events: int) -> None:
    """Before the service starts: fill the event log (a long-running service's log sits
    at its cap, so every append prunes), and write rows that are past their retention."""
    now = datetime.now(UTC)
    long_ago = isoformat(now - KEEP_DELIVERIES - timedelta(days=1))
    retention = Settings().heartbeat_retention
    stale = now - retention - timedelta(days=1)
    stale_hour = isoformat(stale.replace(minute=0, second=0, microsecond=0))
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO events (type, created_at, data) VALUES ('soak_seed', ?, ?)",
            (
                (isoformat(now - timedelta(seconds=events - n)), f'{{"n":{n}}}')
                for n in range(events)
            ),
        )
        conn.executemany(
            "INSERT INTO webhook_deliveries (delivery_id, event, payload, status,"
            " next_attempt_at, received_at, finished_at) VALUES (?, 'push', '{}', 'done', ?, ?, ?)",
            ((f"{EXPIRED}-{n}", long_ago, long_ago, long_ago) for n in range(EXPIRED_ROWS)),
        )
        conn.executemany(
            "INSERT INTO session_counts (org_id, build_id, hour, started) VALUES (?, ?, ?, 1)",
            ((f"{EXPIRED}-{n}", "build-expired", stale_hour) for n in range(EXPIRED_ROWS)),
        )
        conn.executemany(
            "INSERT INTO runners (org_id, runner_id, boot_id, started, failed, disconnected,"
            " last_seen_at) VALUES (?, ?, 'b-1', 1, 0, 0, ?)",
            ((f"{EXPIRED}-org", f"{EXPIRED}-{n}", isoformat(stale)) for n in range(EXPIRED_ROWS)),
        )


def expired_left(db: Path) -> dict[str, int]:
    like = f"{EXPIRED}-%"
    with read_only(db) as conn:
        return {
            "webhook_deliveries": conn.execute(
                "SELECT count(*) FROM webhook_deliveries WHERE delivery_id LIKE ?", (like,)
            ).fetchone()[0],
            "session_counts": conn.execute(
                "SELECT count(*) FROM session_counts WHERE org_id LIKE ?", (like,)
            ).fetchone()[0],
            "runners": conn.execute(
                "SELECT count(*) FROM runners WHERE org_id LIKE ?", (like,)
            ).fetchone()[0],
        }


def settled_counters(port: int, db: Path) -> dict[str, int]:
    """Once the delivery worker has caught up: what the service counted, by its metrics.

    Deliveries processed must equal those done in the database: more means some were
    processed twice (a read that still saw a finished delivery as pending)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with read_only(db) as conn:
            (pending,) = conn.execute(
                "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
            ).fetchone()
        if not pending:
            break
        time.sleep(0.2)
    with NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        text = response.read().decode()
    counted: Counter[str] = Counter()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if (
            name.startswith(f"{PREFIX}_webhook_deliveries_total{{")
            and 'outcome="processed"' in name
        ):
            counted["deliveries processed"] += int(float(value))
        elif name == f'{PREFIX}_heartbeats_total{{outcome="accepted"}}':
            counted["heartbeats accepted"] += int(float(value))
    return dict(counted)


def delivery_states(db: Path) -> dict[str, int]:
    with read_only(db) as conn:
        return dict(
            conn.execute(
                "SELECT status, count(*) FROM webhook_deliveries"
                " WHERE delivery_id NOT LIKE ? GROUP BY status",
                (f"{EXPIRED}-%",),
            ).fetchall()
        )


# --------------------------------------------------------------------------- workload


def load_payloads(folder: Path, port: int) -> list[Workload]:
    """Every conformance payload (named EVENT.ACTION.N.json), compacted as GitHub sends
    it, signed once: only the delivery id changes between requests."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise SystemExit(f"{folder}: no webhook payloads (choose a folder with --payloads)")
    return [
        Workload.build(
            port,
            json.dumps(json.loads(path.read_text()), separators=(",", ":")).encode(),
            event=path.name.split(".", 1)[0],
        )
        for path in files
    ]


@dataclass
class Window:
    """What was sent in one window (by when it was due), and the service at its end."""

    index: int
    warmup: bool
    sent: Counter[str] = field(default_factory=Counter)  # by kind
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)  # status 0: no answer
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds
    lags: list[float] = field(default_factory=list)  # due -> written, seconds
    sample: Sample | None = None
    cpu: Run | None = None
    load1: float | None = None

    def ms(self, kind: str, q: float) -> float | None:
        values = self.latencies.get(kind, [])
        found = median_or_none(values) if q == 0.5 else p99_or_none(values)
        return None if found is None else 1000 * found

    @property
    def disturbed(self) -> bool:
        return self.cpu is not None and disturbed(self.cpu)

    def non_2xx(self) -> int:
        return sum(n for (_, status), n in self.answers.items() if not 200 <= status < 300)


class Soak:
    """Open loop: each kind of request leaves at its fixed rate whatever the answers do,
    so a slow answer shows as latency instead of as a lower rate (as in a closed loop at
    saturation, where latency measures the queue the load generator builds)."""

    def __init__(
        self,
        args: argparse.Namespace,
        server: Server,
        db: Path,
        target: Target,
        fleet: Fleet,
        payloads: list[Workload],
    ) -> None:
        self.args = args
        self.server = server
        self.db = db
        self.target = target
        self.fleet = fleet
        self.payloads = payloads
        count = int(args.seconds // args.window)
        warm = math.ceil(args.warmup / args.window)
        self.windows = [Window(n, n < warm) for n in range(count)]
        self.start_sample: Sample | None = None
        self.started_at = datetime.now(UTC)
        self.ended_at = self.started_at
        self.t0 = 0.0
        self.tasks: set[asyncio.Task[None]] = set()
        self.stored_expected = 0  # webhooks answered 202, not as duplicates
        self.counters_back = 0  # heartbeat answers saying the counters went back
        self.unfinished = 0  # requests still unanswered when the soak gave up waiting
        self.counted: dict[str, int] = {}  # the service's own counts, from its metrics

    @property
    def seconds(self) -> float:
        return len(self.windows) * float(self.args.window)

    async def run(self) -> None:
        args = self.args
        # Fixed pools, opened once: the service's open file descriptors then hold a
        # constant number of client sockets, and any change in them is the service's.
        pools = {
            "heartbeat": self.pool(args.connections),
            "webhook": self.pool(4),
            "api": self.pool(2),
        }
        heartbeat_prefix = self.target.head_prefix()
        host = f"Host: 127.0.0.1:{self.target.port}"
        auth = f"Authorization: Bearer {self.target.token}"
        reads = [f"GET {path} HTTP/1.1\r\n{host}\r\n{auth}\r\n\r\n".encode() for path in READS]
        freeze_body = b'{"reason":"soak: a write that feeds the event log"}'
        freeze = (
            f"POST {API}/freeze HTTP/1.1\r\n{host}\r\n{auth}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(freeze_body)}\r\n\r\n"
        ).encode() + freeze_body
        unfreeze = f"DELETE {API}/freeze HTTP/1.1\r\n{host}\r\n{auth}\r\n\r\n".encode()
        payloads, paths, writes = (
            itertools.cycle(self.payloads),
            itertools.cycle(reads),
            itertools.cycle([freeze, unfreeze]),
        )

        async def heartbeat(due: float) -> None:
            runner, body, counters = self.fleet.next()
            request = heartbeat_prefix + b"%d\r\n\r\n" % len(body) + body
            status, answer = await self.send("heartbeat", pools["heartbeat"], request, due)
            if status == 200:
                runner.acknowledge(counters)
                if b"counters went back" in answer:
                    self.counters_back += 1

        async def webhook(due: float) -> None:
            work = next(payloads)
            head = work.head_prefix + str(uuid.uuid4()).encode() + b"\r\n\r\n"
            status, answer = await self.send("webhook", pools["webhook"], head + work.body, due)
            if status == 202 and b'"duplicate":false' in answer:
                self.stored_expected += 1

        async def read(due: float) -> None:
            await self.send("read", pools["api"], next(paths), due)

        async def write(due: float) -> None:
            await self.send("write", pools["api"], next(writes), due)

        self.start_sample = await asyncio.to_thread(self.take, 0.0)
        self.started_at = datetime.now(UTC)
        self.t0 = time.perf_counter() + 0.05
        try:
            await asyncio.gather(
                self.stream(args.heartbeats_per_second, heartbeat),
                self.stream(args.webhooks_per_second, webhook),
                self.stream(args.reads_per_second, read),
                self.stream(args.writes_per_second, write),
                self.sampler(),
            )
            # Everything sent must be answered before the service stops, or the stored
            # counters would not match the acknowledged ones.
            if self.tasks:
                _, pending = await asyncio.wait(self.tasks, timeout=30)
                self.unfinished = len(pending)
                for task in pending:
                    task.cancel()
        finally:
            self.ended_at = datetime.now(UTC)
            for conns in pools.values():
                while not conns.empty():
                    await conns.get_nowait().close()

    def pool(self, size: int) -> asyncio.Queue[AnswerConnection]:
        conns: asyncio.Queue[AnswerConnection] = asyncio.Queue()
        for _ in range(size):
            conns.put_nowait(AnswerConnection(self.target.port))
        return conns

    async def stream(
        self, rate: float, issue: Callable[[float], Coroutine[Any, Any, None]]
    ) -> None:
        if rate <= 0:
            return
        end = self.t0 + self.seconds
        for n in range(math.ceil(self.seconds * rate)):
            due = self.t0 + n / rate
            if due >= end:
                return
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(issue(due))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def send(
        self, kind: str, pool: asyncio.Queue[AnswerConnection], request: bytes, due: float
    ) -> tuple[int, bytes]:
        """One request on a free connection of the pool; the latency is from writing it
        to the end of its answer, the lag from when it was due to writing it (the load
        generator running late, or every connection of the pool busy)."""
        window = self.windows[min(len(self.windows) - 1, int((due - self.t0) / self.args.window))]
        window.sent[kind] += 1
        conn = await pool.get()
        try:
            began = time.perf_counter()
            window.lags.append(began - due)
            try:
                status, answer = await conn.exchange(request)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status, answer = 0, b""  # counted; the connection opens again next time
            if 200 <= status < 300:
                window.latencies.setdefault(kind, []).append(time.perf_counter() - began)
            window.answers[kind, status] += 1
            return status, answer
        finally:
            pool.put_nowait(conn)

    def take(self, at: float) -> Sample:
        assert self.server.process is not None
        return sample(self.server.process.pid, self.db, at)

    async def sampler(self) -> None:
        assert self.server.process is not None
        pid = self.server.process.pid
        before = CpuSample.take(pid)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for window in self.windows:
            end = self.t0 + (window.index + 1) * self.args.window
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            after, cpu1, wall1 = CpuSample.take(pid), time.process_time(), time.perf_counter()
            window.cpu = Run(wall1 - wall0)
            window.cpu.client_cpu = (cpu1 - cpu0) / window.cpu.seconds
            after.record(before, window.cpu, pinned=self.args.pin)
            before, cpu0, wall0 = after, cpu1, wall1
            window.load1 = os.getloadavg()[0]
            # In a thread: the load generator's loop keeps its schedule meanwhile.
            window.sample = await asyncio.to_thread(self.take, wall1 - self.t0)
            progress(self.progress_line(window))

    def progress_line(self, w: Window) -> str:
        s = w.sample
        assert s is not None
        return (
            f"window {w.index + 1}/{len(self.windows)}{' (warm-up)' if w.warmup else ''}: "
            f"heartbeats p99 {fmt_ms(w.ms('heartbeat', 0.99))} ms, RSS {mb(s.rss_mb)}, "
            f"fds {s.fds}, db {s.db_mb:.1f} MB, events {s.rows.get('events', 0):,}, "
            f"deliveries {s.rows.get('webhook_deliveries', 0):,}, load {w.load1:.2f}"
        )


# --------------------------------------------------------------------------- summary


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} MB"


def num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


@dataclass
class Bound:
    """What keeps a table from growing forever, and the most rows it may hold now."""

    rule: str
    limit: int | None  # None: grows until a retention period longer than any soak
    steady: str = ""  # the size it settles at, for the report
    retention: str = ""  # with no limit: the period after which rows go


@dataclass
class TableRow:
    """One table's rows after the warm-up, at the end and at most, against its bound."""

    name: str
    start: int
    end: int
    peak: int
    bound: Bound | None

    @property
    def ok(self) -> bool:
        if self.bound is None:
            return self.end <= self.start
        return self.bound.limit is None or self.peak <= self.bound.limit

    @property
    def verdict(self) -> str:
        if self.bound is None:
            return "unchanged" if self.end == self.start else "**grew: no known bound**"
        if self.bound.limit is None:
            return f"grows until its retention ({self.bound.retention})"
        return "bounded" if self.ok else "**over its bound**"


@dataclass
class Summary:
    """Everything the report and --check need, also written as JSON (--json)."""

    data: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # correctness: always fatal
    missed: list[str] = field(default_factory=list)  # targets: fatal with --check


def ratio(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None or start == 0 else end / start


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares trend of (seconds, value) points, per hour."""
    if len(points) < 3:
        return None
    fit = statistics.linear_regression([t for t, _ in points], [v for _, v in points])
    return fit.slope * 3600


def id_row_bytes(db: Path) -> float:
    """An estimate of a processed delivery's size once it has shed its payload: its
    other columns, doubled for the indexes and the pages' own overhead."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (mean,) = conn.execute(
            "SELECT avg(length(delivery_id) + length(event) + coalesce(length(action), 0)"
            " + length(next_attempt_at) + length(received_at)"
            " + coalesce(length(finished_at), 0) + 16) FROM webhook_deliveries"
        ).fetchone()
    return 2 * float(mean or 0.0)


def bounds(soak: Soak, args: argparse.Namespace, sizes: dict[str, float]) -> dict[str, Bound]:
    fleet = soak.fleet
    pairs = len({(r.org_id, r.build_id) for r in fleet.runners})
    first = soak.started_at.replace(minute=0, second=0, microsecond=0)
    hours = int((soak.ended_at - first).total_seconds() // 3600) + 1
    retention = Settings().heartbeat_retention
    retention_hours = int(retention.total_seconds() // 3600)
    versions = len({(p, v) for r in fleet.runners for p, v in r.runtimes.items()})
    rate = sizes["delivery_rate"]
    kept = rate * KEEP_DELIVERIES.total_seconds()
    # A processed delivery keeps its payload for KEEP_PAYLOADS, then only its id and
    # times, so the month's rows are mostly small ones.
    with_payload = rate * KEEP_PAYLOADS.total_seconds()
    per_row = sizes["bytes_per_delivery"]
    per_id = sizes["id_row_bytes"]
    size = with_payload * per_row + max(kept - with_payload, 0.0) * per_id
    steady_deliveries = (
        f"≈ {kept / 1e6:,.1f} M rows"
        + (f", ≈ {size / 1e9:,.1f} GB" if per_row else "")
        + f" at {rate * 60:,.0f}/min"
    )
    return {
        "events": Bound(
            f"newest {KEEP_EVENTS:,}, pruned on every append", KEEP_EVENTS, f"{KEEP_EVENTS:,} rows"
        ),
        "webhook_deliveries": Bound(
            f"ids kept {KEEP_DELIVERIES.days} days, payloads of processed ones"
            f" {KEEP_PAYLOADS.days} day, pruned daily",
            None,
            steady_deliveries,
            f"{KEEP_DELIVERIES.days} days",
        ),
        "outbox": Bound(
            f"applied entries kept {KEEP_DONE.days} days; none written without the App",
            0,
            "0 rows here",
        ),
        "session_counts": Bound(
            f"one row per org, build and hour ({pairs:,} org-build pairs, {hours} hour(s) "
            f"touched), pruned after {retention.days} days",
            pairs * hours,
            f"≤ {pairs * retention_hours:,} rows",
        ),
        "runners": Bound(
            f"one row per runner, pruned {retention.days} days after its last heartbeat",
            len(fleet.runners),
            f"{len(fleet.runners):,} rows",
        ),
        "orgs": Bound(
            "one row per org, never pruned", args.orgs, f"{args.orgs:,} rows (the orgs that exist)"
        ),
        "runtime_versions": Bound(
            "one row per runtime version reported or announced, never pruned",
            versions,
            f"{versions} rows (the versions that exist)",
        ),
        "freeze": Bound("one row while frozen", 1, "≤ 1 row"),
    }


def summarise(
    soak: Soak, args: argparse.Namespace, exit_code: int, stored_lines: list[str], stored_ok: bool
) -> Summary:
    summary = Summary()
    data = summary.data
    windows = soak.windows
    measured = [w for w in windows if not w.warmup] or windows
    k = max(1, min(args.compare, len(measured) // 2))
    first, last = measured[:k], measured[-k:]
    base_index = measured[0].index - 1
    base = windows[base_index].sample if base_index >= 0 else soak.start_sample
    end = windows[-1].sample
    assert base is not None and end is not None
    span_s = max(1e-9, end.at - base.at)

    def median_of(ws: list[Window], kind: str, q: float) -> float | None:
        return median_or_none([v for w in ws if (v := w.ms(kind, q)) is not None])

    latency: dict[str, Any] = {}
    for kind in ("heartbeat", "webhook", "read"):
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            start_ms, end_ms = median_of(first, kind, q), median_of(last, kind, q)
            latency[f"{kind}_{name}"] = {
                "start_ms": start_ms,
                "end_ms": end_ms,
                "ratio": ratio(end_ms, start_ms),
            }
    data["latency"] = latency
    data["compared_windows"] = k
    compared = {w.index: w for w in first + last}  # the same windows when k is half
    data["compared_disturbed"] = sum(w.disturbed for w in compared.values())
    data["disturbed_windows"] = sum(w.disturbed for w in measured)
    data["measured_windows"] = len(measured)

    answers: Counter[tuple[str, int]] = sum((w.answers for w in windows), Counter())
    sent: Counter[str] = sum((w.sent for w in windows), Counter())
    data["sent"] = dict(sent)
    data["answers"] = {f"{kind} {status}": n for (kind, status), n in sorted(answers.items())}
    data["answers_heartbeat_200"] = answers["heartbeat", 200]
    data["5xx"] = sum(n for (_, status), n in answers.items() if status >= 500)
    data["non_2xx"] = sum(n for (_, status), n in answers.items() if not 200 <= status < 300)
    data["unfinished"] = soak.unfinished
    data["counters_went_back"] = soak.counters_back

    rss_points = [(w.sample.at, w.sample.rss_mb) for w in measured if w.sample and w.sample.rss_mb]
    rss_ratio = ratio(end.rss_mb, base.rss_mb)
    data["rss_mb"] = {
        "after_warmup": base.rss_mb,
        "end": end.rss_mb,
        "peak": max((p for _, p in rss_points), default=None),
        "growth": None if rss_ratio is None else rss_ratio - 1,
        # The trend tells a plateau (near 0) from a leak, which the growth alone cannot.
        "trend_mb_per_hour_second_half": slope_per_hour(rss_points[len(rss_points) // 2 :]),
    }
    data["fds"] = {
        "after_warmup": base.fds,
        "end": end.fds,
        "peak": max((w.sample.fds or 0 for w in measured if w.sample), default=None),
        "change": None if base.fds is None or end.fds is None else end.fds - base.fds,
    }
    delivery_growth = end.rows.get("webhook_deliveries", 0) - base.rows.get("webhook_deliveries", 0)
    sizes = {
        "delivery_rate": delivery_growth / span_s,
        # Everything that grew, over the deliveries that did: an upper bound, as the other
        # growing tables are tiny next to the payloads.
        "bytes_per_delivery": (end.used_mb - base.used_mb) * 1e6 / delivery_growth
        if delivery_growth > 0
        else 0.0,
        "id_row_bytes": id_row_bytes(soak.db),
    }
    data["db_mb"] = {
        "after_warmup": base.db_mb,
        "end": end.db_mb,
        "wal_peak": max(w.sample.wal_mb for w in windows if w.sample),
        "wal_end": end.wal_mb,
        "growth_mb_per_minute": (end.db_mb - base.db_mb) / span_s * 60,
        "used_growth_mb_per_minute": (end.used_mb - base.used_mb) / span_s * 60,
        "bytes_per_delivery": sizes["bytes_per_delivery"],
    }
    known = bounds(soak, args, sizes)
    tables = []
    for name in sorted(end.rows):
        peak = max(w.sample.rows.get(name, 0) for w in windows if w.sample)
        row = TableRow(name, base.rows.get(name, 0), end.rows[name], peak, known.get(name))
        if row.bound is not None or row.end != row.start:
            tables.append(row)
    data["tables"] = {
        t.name: {
            "after_warmup": t.start,
            "end": t.end,
            "peak": t.peak,
            "limit": t.bound.limit if t.bound else None,
            "verdict": t.verdict.strip("*"),
            "ok": t.ok,
        }
        for t in tables
    }
    data["table_rows"] = tables  # for the report; dropped from the JSON
    data["expired_left"] = expired_left(soak.db)
    states = delivery_states(soak.db)
    data["deliveries"] = {"stored": sum(states.values()), "by_state": states}
    data["deliveries_expected"] = soak.stored_expected
    data["service_counted"] = soak.counted
    loads = [w.load1 for w in windows if w.load1 is not None]
    server_others = [
        w.cpu.others_server_core for w in windows if w.cpu and w.cpu.others_server_core is not None
    ]
    client_others = [
        w.cpu.others_client_core for w in windows if w.cpu and w.cpu.others_client_core is not None
    ]
    data["load"] = {
        "loadavg_1m_median": median_or_none(loads),
        "loadavg_1m_max": max(loads, default=None),
        "others_server_core_median": median_or_none(server_others),
        "others_server_core_max": max(server_others, default=None),
        "others_client_core_median": median_or_none(client_others),
        "client_cpu_max": max((w.cpu.client_cpu for w in windows if w.cpu), default=None),
    }
    data["rates"] = {
        kind: sent[kind] / soak.seconds for kind in ("heartbeat", "webhook", "read", "write")
    }
    data["exit_code"] = exit_code
    data["stored_heartbeats_ok"] = stored_ok
    data["stored_lines"] = stored_lines
    logged = [
        line
        for line in soak.server.log_path.read_text(errors="replace").splitlines()
        if ("WARNING" in line or "ERROR" in line) and not any(e in line for e in EXPECTED_LOG)
    ]
    data["unexpected_log_lines"] = logged

    # Correctness: wrong whatever the machine's load.
    fail = summary.failures.append
    if data["non_2xx"]:
        fail(f"{data['non_2xx']:,} answers other than 2xx ({data['5xx']:,} of them 5xx)")
    if soak.unfinished:
        fail(f"{soak.unfinished:,} requests unanswered 30 s after the load stopped")
    if soak.counters_back:
        fail(f"{soak.counters_back:,} heartbeats answered 'counters went back'")
    if not stored_ok:
        fail("the stored heartbeats do not match the acknowledged ones")
    if data["deliveries"]["stored"] != soak.stored_expected:
        fail(
            f"{data['deliveries']['stored']:,} deliveries stored for "
            f"{soak.stored_expected:,} answered 202"
        )
    if states.get("failed"):
        fail(f"{states['failed']:,} deliveries failed in their handlers")
    processed = soak.counted.get("deliveries processed")
    if processed != states.get("done", 0):
        fail(f"the service processed deliveries {processed} times for {states.get('done', 0)}")
    accepted = soak.counted.get("heartbeats accepted")
    if accepted != answers["heartbeat", 200]:
        fail(f"the service counted {accepted} heartbeats for {answers['heartbeat', 200]}")
    for t in tables:
        if not t.ok:
            fail(f"table {t.name}: {t.verdict.strip('*')} ({t.peak:,} rows at most)")
    if any(data["expired_left"].values()):
        fail(f"rows past their retention not pruned: {data['expired_left']}")
    if exit_code != 0:
        fail(f"the service exited with {exit_code} after SIGTERM")
    # Targets: timing and growth, which a loaded machine can spoil.
    p99 = latency["heartbeat_p99"]["ratio"]
    if p99 is None or p99 > P99_RATIO_TARGET:
        summary.missed.append(f"heartbeat p99 at the end {num(p99, 2)}x the start")
    growth = data["rss_mb"]["growth"]
    if growth is None or growth > RSS_GROWTH_LIMIT:
        summary.missed.append(f"RSS grew {percent(growth)} after the warm-up")
    change = data["fds"]["change"]
    if change is None or change > FD_SLACK:
        summary.missed.append(f"open file descriptors grew by {change}")
    return summary


# --------------------------------------------------------------------------- report


def print_header(soak: Soak, args: argparse.Namespace) -> None:
    pinning = (
        f"Service pinned to CPU {SERVER_CPU} with taskset, load generator to CPU {CLIENT_CPU}"
        if args.pin
        else f"CPUs **not pinned** ({args.pin_problem})"
    )
    machine = (
        f"{os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"aiohttp {package_version('aiohttp')}, SQLite {sqlite3.sqlite_version}"
    )
    warm = sum(w.warmup for w in soak.windows)
    print(f"## Soak, {soak.started_at:%Y-%m-%d %H:%M} UTC, {soak.seconds / 60:g} minutes\n")
    print(
        f"{machine}. {pinning}. The service with the pipeline enabled, a fresh database "
        f"(event log filled to its {KEEP_EVENTS:,} entries first) and an admin token. Open "
        f"loop at fixed rates: {args.heartbeats_per_second:g} heartbeats/s from "
        f"{args.runners:,} runners in {args.orgs:,} orgs (each runner every "
        f"{args.runners / args.heartbeats_per_second:.0f} s, cumulative counters) over "
        f"{args.connections} connections; {args.webhooks_per_second:g} signed webhook "
        f"deliveries/s cycling through the {len(soak.payloads)} conformance payloads, each "
        f"with a fresh delivery id; {args.reads_per_second:g} API reads/s (status, events, "
        f"fleet, deliveries, diagnostics, metrics); {args.writes_per_second:g} writes/s "
        f"(freeze and unfreeze, one event each). Windows of {args.window:g} s, the first "
        f"{warm} a warm-up (marked w); windows marked ! were disturbed by other work (more "
        f"than {DISTURBED_SERVER_CORE:.0%} of the service's core, or the load generator's "
        f"core over {DISTURBED_CLIENT_CORE:.0%} busy).\n"
    )


def print_windows(soak: Soak) -> None:
    print(
        "| window | load 1m | server CPU | other load, server / client core | heartbeats "
        "| hb p50 ms | hb p99 ms | webhooks | wh p99 ms | API p99 ms | lag p99 ms | non-2xx "
        "| RSS MB | fds | db+WAL (WAL) MB | events | deliveries (pending) | session_counts "
        "| runners |"
    )
    print("|---" + "|---:" * 18 + "|")
    for w in soak.windows:
        s, cpu = w.sample, w.cpu
        if s is None or cpu is None:
            continue
        api = [x for kind in ("read", "write") for x in w.latencies.get(kind, [])]
        hb_ok = w.answers["heartbeat", 200]
        wh_ok = sum(
            n for (kind, status), n in w.answers.items() if kind == "webhook" and status < 300
        )
        elsewhere = f"{percent(cpu.others_server_core)} / {percent(cpu.others_client_core)}"
        lag = p99_or_none(w.lags)
        api_p99 = p99_or_none(api)
        print(
            f"| {w.index + 1}{' w' if w.warmup else ''}{' !' if w.disturbed else ''} "
            f"| {w.load1:.2f} "
            f"| {percent(cpu.server_cpu)} "
            f"| {elsewhere} | {hb_ok:,}/{w.sent['heartbeat']:,} "
            f"| {fmt_ms(w.ms('heartbeat', 0.5))} | {fmt_ms(w.ms('heartbeat', 0.99))} "
            f"| {wh_ok:,}/{w.sent['webhook']:,} | {fmt_ms(w.ms('webhook', 0.99))} "
            f"| {fmt_ms(None if api_p99 is None else 1000 * api_p99)} "
            f"| {fmt_ms(None if lag is None else 1000 * lag)} | {w.non_2xx():,} "
            f"| {num(s.rss_mb, 1)} | {s.fds} | {s.db_mb:.1f} ({s.wal_mb:.1f}) "
            f"| {s.rows.get('events', 0):,} "
            f"| {s.rows.get('webhook_deliveries', 0):,} ({s.pending_deliveries:,}) "
            f"| {s.rows.get('session_counts', 0):,} | {s.rows.get('runners', 0):,} |"
        )
    print()


def print_summary(soak: Soak, summary: Summary, args: argparse.Namespace) -> None:
    d = summary.data
    k = d["compared_windows"]
    load = d["load"]
    print(
        f"### Summary: {soak.seconds / 60:g} minutes, machine load (1-minute load average) "
        f"median {num(load['loadavg_1m_median'], 2)}, max {num(load['loadavg_1m_max'], 2)}; "
        f"other work on the service's core median "
        f"{percent(load['others_server_core_median'])}, max "
        f"{percent(load['others_server_core_max'])}\n"
    )
    windows = "window" if k == 1 else f"{k} windows"
    print(
        "Start: the state at the end of the warm-up, or for latencies the median of the "
        f"first {windows} after it; end: the last sample, or the median of the last "
        f"{windows}.\n"
    )
    print("| measure | start | end | change | target | verdict |")
    print("|---|---:|---:|---:|---|---|")
    lat = d["latency"]
    for key, label, target in (
        ("heartbeat_p99", "heartbeat p99 ms", P99_RATIO_TARGET),
        ("heartbeat_p50", "heartbeat p50 ms", None),
        ("webhook_p99", "webhook p99 ms", None),
        ("read_p99", "API read p99 ms", None),
    ):
        m = lat[key]
        r = m["ratio"]
        verdict = "—" if target is None else met(r is not None and r <= target)
        if target is not None and d["compared_disturbed"]:
            verdict += f" ({d['compared_disturbed']} of the {2 * k} windows compared disturbed)"
        print(
            f"| {label} | {fmt_ms(m['start_ms'])} | {fmt_ms(m['end_ms'])} "
            f"| {'n/a' if r is None else f'{r:.2f}x'} "
            f"| {f'≤ {target:.2f}x' if target else '—'} | {verdict} |"
        )
    rss = d["rss_mb"]
    trend = rss["trend_mb_per_hour_second_half"]
    growth = rss["growth"]
    print(
        f"| RSS MB (peak {num(rss['peak'], 1)}; trend over the second half "
        f"{'n/a' if trend is None else f'{trend:+.1f} MB/h'}) | {num(rss['after_warmup'], 1)} "
        f"| {num(rss['end'], 1)} | {'n/a' if growth is None else f'{growth:+.1%}'} "
        f"| ≤ +{RSS_GROWTH_LIMIT:.0%} | {met(growth is not None and growth <= RSS_GROWTH_LIMIT)} |"
    )
    fds = d["fds"]
    change = fds["change"]
    print(
        f"| open file descriptors | {fds['after_warmup']} | {fds['end']} "
        f"| {'n/a' if change is None else f'{change:+d}'} | ≤ +{FD_SLACK} "
        f"| {met(change is not None and change <= FD_SLACK)} |"
    )
    db = d["db_mb"]
    print(
        f"| database + WAL MB | {db['after_warmup']:.1f} | {db['end']:.1f} "
        f"| {db['growth_mb_per_minute']:+.2f} MB/min (pages in use "
        f"{db['used_growth_mb_per_minute']:+.2f} MB/min, ≈ "
        f"{db['bytes_per_delivery'] / 1000:.1f} KB per delivery) | — | — |"
    )
    print(
        f"| WAL MB (peak {db['wal_peak']:.1f}) | | {db['wal_end']:.1f} | | checkpoints keep "
        f"it from growing | — |"
    )
    for t in d["table_rows"]:
        bound = t.bound
        rule = "no known bound" if bound is None else bound.rule
        steady = f"; steady state {bound.steady}" if bound is not None and bound.steady else ""
        limit = f" (≤ {bound.limit:,} now)" if bound is not None and bound.limit is not None else ""
        print(
            f"| `{t.name}` rows | {t.start:,} | {t.end:,} | {t.end - t.start:+,} "
            f"| {rule}{limit}{steady} | {t.verdict} |"
        )
    rates = d["rates"]
    print(
        f"| answers other than 2xx (of which 5xx) | | {d['non_2xx']:,} ({d['5xx']:,}) | | 0 "
        f"| {met(d['non_2xx'] == 0)} |"
    )
    print(
        f"| rates sent, per second: heartbeats / webhooks / reads / writes | "
        f"| {rates['heartbeat']:,.1f} / {rates['webhook']:,.1f} / {rates['read']:,.2f} "
        f"/ {rates['write']:,.2f} | | — | — |"
    )
    print()
    print_checks(soak, summary, args)


def print_checks(soak: Soak, summary: Summary, args: argparse.Namespace) -> None:
    d = summary.data
    for line in d["stored_lines"]:
        print(f"- {line}")
    deliveries = d["deliveries"]
    print(
        f"- webhook deliveries stored: {deliveries['stored']:,} for "
        f"{d['deliveries_expected']:,} answered 202 (by state at shutdown: "
        + ", ".join(f"{n:,} {state}" for state, n in sorted(deliveries["by_state"].items()))
        + ")"
    )
    counted = d["service_counted"]
    print(
        "- the service's own counts (`GET /metrics`, once the delivery worker caught up): "
        f"deliveries processed {counted.get('deliveries processed', 0):,} for "
        f"{deliveries['by_state'].get('done', 0):,} done; heartbeats accepted "
        f"{counted.get('heartbeats accepted', 0):,} for {d['answers_heartbeat_200']:,} "
        "answered 200"
    )
    left = d["expired_left"]
    print(
        f"- rows written before the start already past their retention ({EXPIRED_ROWS} each "
        "of deliveries, session counts, runners): left at the end "
        + ", ".join(f"{name} {n}" for name, n in left.items())
        + (" (pruned)" if not any(left.values()) else " (**not pruned**)")
    )
    logged = d["unexpected_log_lines"]
    print(
        f"- service exit code after SIGTERM: {d['exit_code']}; warning/error log lines other "
        f"than drift and freeze notices: {len(logged)}"
        + "".join(f"\n  - `{line[:200]}`" for line in logged[:5])
    )
    load = d["load"]
    print(
        f"- load generator: at most {percent(load['client_cpu_max'])} of its core; other work "
        f"on its core median {percent(load['others_client_core_median'])}"
    )
    if d["disturbed_windows"]:
        print(
            f"- **{d['disturbed_windows']} of {d['measured_windows']} windows after the "
            "warm-up disturbed** by other work: latency drift is not conclusive, run again "
            "on a quiet machine"
        )
    else:
        print(f"- disturbance from other work: none of the {d['measured_windows']} windows")
    for failure in summary.failures:
        print(f"- **FAILED: {failure}**")
    for missed in summary.missed:
        print(f"- **target missed: {missed}**" + ("" if args.check else " (not checked)"))
    print()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the real service (python -m app serve, pipeline enabled) under a "
        "steady open-loop load of heartbeats, webhook deliveries and API calls, sample its "
        "memory, file descriptors, database and latency every window, and print Markdown "
        "tables. Exits 1 on an answer other than 2xx, a heartbeat or delivery not stored, "
        "a table over its bound, or rows not pruned; with --check also when the p99 drifts "
        f"more than {P99_RATIO_TARGET - 1:.0%}, RSS grows more than {RSS_GROWTH_LIMIT:.0%} "
        f"after the warm-up, or open file descriptors grow by more than {FD_SLACK}.",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--window", type=float, default=10.0, help="sampling window, seconds")
    parser.add_argument(
        "--warmup",
        type=float,
        default=30.0,
        help="seconds before the start state is taken (at least one heartbeat per runner)",
    )
    parser.add_argument(
        "--compare",
        type=int,
        default=3,
        help="windows whose median p99 is compared at the start and at the end",
    )
    parser.add_argument("--heartbeats-per-second", type=float, default=200.0)
    parser.add_argument("--webhooks-per-second", type=float, default=5.0)
    parser.add_argument(
        "--reads-per-second", type=float, default=1.0, help="API reads, rotating over six paths"
    )
    parser.add_argument(
        "--writes-per-second",
        type=float,
        default=0.5,
        help="freeze and unfreeze in turn: each appends to the event log",
    )
    parser.add_argument(
        "--runners",
        type=int,
        default=6_000,
        help="runners in the fleet (6,000 at 200/s: each every 30 s, the service's poll interval)",
    )
    parser.add_argument("--orgs", type=int, default=1_200, help="organisations they belong to")
    parser.add_argument(
        "--connections", type=int, default=32, help="keep-alive connections for heartbeats"
    )
    parser.add_argument("--payloads", type=Path, default=PAYLOADS, help="webhook payload folder")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a timing or growth target is missed"
    )
    parser.add_argument("--json", type=Path, help="also write the summary to this file as JSON")
    parser.add_argument("--log", type=Path, help="keep the service's log in this file")
    args = parser.parse_args(argv)
    if args.window <= 0 or args.seconds < 2 * args.window:
        parser.error("--seconds must be at least two windows")
    if args.warmup >= args.seconds - args.window:
        parser.error("--warmup must leave at least two windows")
    if args.heartbeats_per_second <= 0 or args.runners < 1 or args.orgs < 1:
        parser.error("heartbeats, runners and orgs: 1 or more")
    # The bookkeeping of acknowledged counters assumes one heartbeat per runner in flight.
    if args.runners / args.heartbeats_per_second < 2:
        parser.error("each runner must heartbeat at most every 2 s: more --runners")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_up_pinning(args)
    cycle = args.runners / args.heartbeats_per_second
    if args.warmup < cycle:
        # Until every runner has sent once, each heartbeat inserts a row and fills a cache
        # entry: growth that is the warm-up's, not the service's over time.
        progress(f"warning: the warm-up is shorter than one turn of the fleet ({cycle:g} s)")
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        tmp_path = Path(tmp)
        port = free_port()
        db = tmp_path / "soak.db"
        payloads = load_payloads(args.payloads, port)
        env = service_env(db, port, pipeline=True)
        progress("creating the admin token")
        target = Target(port, create_admin_token(env))
        seed(db, KEEP_EVENTS)
        server = Server(
            "service", [sys.executable, "-m", "app", "serve"], env, port, tmp_path / "service.log"
        )
        fleet = Fleet(args.runners, args.orgs)
        soak = Soak(args, server, db, target, fleet, payloads)
        try:
            progress("starting the service")
            server.start(args.pin)
            progress(f"soaking for {soak.seconds:g} s")
            asyncio.run(soak.run())
            soak.counted = settled_counters(port, db)
            exit_code = server.stop()
        finally:
            server.kill()
            if args.log is not None:
                shutil.copyfile(server.log_path, args.log)
        stored = check_stored(db, fleet)
        summary = summarise(soak, args, exit_code, stored.lines, stored.ok is not False)
        print_header(soak, args)
        print_windows(soak)
        print_summary(soak, summary, args)
        if args.json is not None:
            data = {k: v for k, v in summary.data.items() if k != "table_rows"}
            data["failures"], data["missed"] = summary.failures, summary.missed
            args.json.write_text(json.dumps(data, indent=2, default=str))
    return 1 if summary.failures or (args.check and summary.missed) else 0


if __name__ == "__main__":
    sys.exit(main())
