"""Benchmark of webhook intake (POST /api/github/webhooks) against a bare aiohttp handler.

Run from the repository root: ``python bench/webhooks.py`` (``--help`` for the options).
docs/performance.md explains what is measured and how to read the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import importlib.metadata
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAYLOAD = REPO_ROOT.parent / "shared" / "conformance" / "webhooks" / "push.1.json"
ENDPOINT = "/api/github/webhooks"
HEALTH = "/api/update-pipeline/health"
SERVER_CPU = 0
CLIENT_CPU = 1
P99_TARGET_MS = 20.0
SHARE_TARGET = 0.75
# A run counts as disturbed when other work took this much of the server's core, or left
# the load generator's core this busy (the client then answers late and adds latency).
DISTURBED_SERVER_CORE = 0.10
DISTURBED_CLIENT_CORE = 0.90
SECRET = "bench-webhook-secret"
# `push` has no handler in the service, so a delivery costs intake only (plus, with the
# pipeline enabled, the worker marking it done), never a GitHub call.
EVENT = "push"
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Health checks go straight to the local port, whatever proxy the environment names.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- payloads


def padded_payload(path: Path, target_bytes: int) -> bytes:
    """A real push payload, grown to about ``target_bytes`` by adding commits.

    Commits rather than one filler string, so that parsing costs what a large real push
    costs: many small objects and strings."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such payload file (choose one with --payload)")
    data = json.loads(path.read_text())
    template = data["commits"][0] if data.get("commits") else data.get("head_commit")
    if not isinstance(template, dict):
        raise SystemExit(f"{path}: no commit to copy for padding")
    commits: list[dict[str, object]] = []
    body = b""
    for n in itertools.count():
        sha = hashlib.sha1(f"bench-{n}".encode(), usedforsecurity=False).hexdigest()
        commits.append({**template, "id": sha, "message": f"Bench commit {n}"})
        data["commits"] = commits
        body = json.dumps(data, separators=(",", ":")).encode()
        if len(body) >= target_bytes:
            return body
    raise AssertionError("unreachable")


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Workload:
    """One precomputed request; only the delivery id changes between requests.

    The signature covers the body alone, so one body and one signature serve every
    request, and the client's per-request work is a counter and two socket writes."""

    port: int
    head_prefix: bytes  # request line and headers, up to the X-GitHub-Delivery value
    body: bytes

    @classmethod
    def build(cls, port: int, body: bytes, event: str = EVENT) -> Workload:
        headers = [
            f"POST {ENDPOINT} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "User-Agent: GitHub-Hookshot/bench",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            f"X-GitHub-Event: {event}",
            f"X-Hub-Signature-256: {signature(body, SECRET)}",
            # Last, so a request's head is prefix + id + blank line, with no formatting.
            "X-GitHub-Delivery: ",
        ]
        return cls(port, "\r\n".join(headers).encode(), body)


# --------------------------------------------------------------------------- client


class Connection:
    """A keep-alive HTTP/1.1 connection speaking just enough HTTP for this bench.

    Raw streams rather than aiohttp's client: the load generator has a core of its own,
    but it must stay far below that core's capacity to measure the server, and aiohttp's
    client spends several times more CPU per request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> int:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.reader, self.writer
        try:
            writer.write(head)
            writer.write(body)
            await writer.drain()
            response_head = await reader.readuntil(b"\r\n\r\n")
            status = int(response_head[9:12])
            lowered = response_head.lower()
            start = lowered.find(b"\r\ncontent-length:")
            if start < 0:
                raise ConnectionError("response without Content-Length")
            end = lowered.index(b"\r\n", start + 2)
            await reader.readexactly(int(lowered[start + 17 : end]))
            if b"\r\nconnection: close" in lowered:
                await self.close()
            return status
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()
            raise

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):  # already broken: nothing left to release
                await writer.wait_closed()


@dataclass
class Run:
    """One timed run of all senders against one server."""

    seconds: float
    latencies: list[float] = field(default_factory=list)  # of 202 answers, in seconds
    statuses: Counter[int] = field(default_factory=Counter)  # 0: the connection failed
    client_cpu: float = 0.0  # CPU seconds, as a share of the run's span
    server_cpu: float | None = None  # same, for the server process
    others_server_core: float | None = None  # what else ran on the server's core
    others_client_core: float | None = None  # what else ran on the load generator's core

    @property
    def rps(self) -> float:
        return sum(self.statuses.values()) / self.seconds

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(workload: Workload, senders: int, seconds: float, ids: Iterator[int]) -> Run:
    """Closed loop: each sender sends its next request as soon as its answer is in."""
    run = Run(seconds)
    head_prefix, body = workload.head_prefix, workload.body

    async def sender(conn: Connection, deadline: float) -> None:
        try:
            while time.perf_counter() < deadline:
                head = head_prefix + b"%d\r\n\r\n" % next(ids)
                began = time.perf_counter()
                try:
                    status = await conn.request(head, body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status = 0  # counted; the next request opens a new connection
                if status == 202:
                    run.latencies.append(time.perf_counter() - began)
                run.statuses[status] += 1
        finally:
            await conn.close()

    connections = [Connection(workload.port) for _ in range(senders)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(sender(c, t0 + seconds) for c in connections))
    # The last answers arrive just after the deadline; divide by the real span.
    run.seconds = time.perf_counter() - t0
    run.client_cpu = (time.process_time() - cpu0) / run.seconds
    return run


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_bare(port: int, parser: str = "json") -> None:
    """The baseline: read the body, parse it, answer 202. Nothing else. ``parser`` is the
    standard library's (the baseline the targets are stated against) or orjson (the
    service's parser, to show how much of the gap is parsing)."""
    from aiohttp import web  # only this subprocess needs aiohttp

    loads: Callable[[bytes], object] = json.loads
    if parser == "orjson":
        import orjson

        loads = orjson.loads

    async def receive(request: web.Request) -> web.Response:
        loads(await request.read())
        return web.json_response({"accepted": True, "duplicate": False}, status=202)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"running": True})

    app = web.Application()
    app.router.add_post(ENDPOINT, receive)
    app.router.add_get(HEALTH, health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def process_ticks(pid: int) -> int | None:
    """User + system CPU of a process, all its threads included, in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


def core_busy_ticks() -> dict[int, int]:
    """Busy time per core (steal included: the hypervisor took it), in clock ticks."""
    busy = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
                busy[int(name[3:])] = user + nice + system + irq + softirq + steal
    return busy


@dataclass(frozen=True)
class CpuSample:
    """CPU used so far by the server, the load generator, and each core as a whole."""

    server: int | None
    client: int | None
    cores: dict[int, int]

    @classmethod
    def take(cls, server_pid: int) -> CpuSample:
        return cls(process_ticks(server_pid), process_ticks(os.getpid()), core_busy_ticks())

    def record(self, before: CpuSample, run: Run, *, pinned: bool) -> None:
        """Fill in the run's CPU shares from this sample and one taken before it."""

        def share(after: int | None, start: int | None) -> float | None:
            if after is None or start is None:
                return None
            return max(0.0, (after - start) / TICKS / run.seconds)

        def others(core: int, own: int | None, own_before: int | None) -> float | None:
            total, mine = (
                share(self.cores.get(core), before.cores.get(core)),
                share(own, own_before),
            )
            return None if total is None or mine is None else max(0.0, total - mine)

        run.server_cpu = share(self.server, before.server)
        if pinned:  # without pinning, no core belongs to anyone
            # Other work on the same cores (test runs, builds) makes the numbers noisy;
            # these say how much, so a reader can tell a disturbed run from a clean one.
            run.others_server_core = others(SERVER_CPU, self.server, before.server)
            run.others_client_core = others(CLIENT_CPU, self.client, before.client)


@dataclass
class Server:
    """A server under test in its own process, pinned to SERVER_CPU when possible."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, pin: bool) -> None:
        # taskset execs the server, so the process id stays the server's.
        prefix = ["taskset", "-c", str(SERVER_CPU)] if pin else []
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and script
                prefix + self.command,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        url = f"http://127.0.0.1:{self.port}{HEALTH}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                self.fail(f"exited with {self.process.returncode} during start-up")
            try:
                with NO_PROXY.open(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.fail(f"{url} did not answer within {timeout:.0f}s")

    def measured(self, run_load: Callable[[], Run], *, pinned: bool) -> Run:
        """Run a load and record the CPU the server, and anything else, used meanwhile."""
        assert self.process is not None
        before = CpuSample.take(self.process.pid)
        run = run_load()
        CpuSample.take(self.process.pid).record(before, run, pinned=pinned)
        return run

    def stop(self) -> int:
        """SIGTERM, as a supervisor would, and wait for the orderly shutdown to finish."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("did not exit within 60s of SIGTERM")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def fail(self, reason: str) -> NoReturn:
        self.kill()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{self.name}: {reason}\n--- its output, last lines ---\n{tail}")


def service_env(db: Path, port: int, *, pipeline: bool) -> dict[str, str]:
    # The caller's environment (PATH, virtual environment) minus anything that
    # configures the service, so a developer's own settings or App credentials cannot
    # change what is measured.
    prefixes = ("UPDATE_PIPELINE_", "GITHUB_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        UPDATE_PIPELINE_DB=str(db),
        UPDATE_PIPELINE_PORT=str(port),
        UPDATE_PIPELINE_HOST="127.0.0.1",
        UPDATE_PIPELINE_LOG_LEVEL="WARNING",
        GITHUB_WEBHOOK_SECRET=SECRET,
    )
    if pipeline:
        env["UPDATE_PIPELINE_ENABLED"] = "true"
    return env


def stored_deliveries(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM webhook_deliveries").fetchone()
        return int(count)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One row of the table: a server and the workload sent to it."""

    name: str
    server: Server
    workload: Workload
    runs: list[Run] = field(default_factory=list)
    answers: Counter[int] = field(default_factory=Counter)  # warm-up included

    def median(self, metric: Callable[[Run], float | None]) -> float | None:
        values = [v for v in map(metric, self.runs) if v is not None]
        return statistics.median(values) if values else None

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)

    def p99(self) -> float:
        return statistics.median(r.percentile_ms(0.99) for r in self.runs)

    def share_of(self, baseline: Case) -> float:
        # Ratio within each round, then the median: the two servers of a round ran
        # seconds apart, under the same conditions, so noise largely cancels.
        return statistics.median(
            mine.rps / base.rps for mine, base in zip(self.runs, baseline.runs, strict=True)
        )


def run_all(cases: list[Case], args: argparse.Namespace) -> None:
    """Warm every case up, then run rounds that each measure every case once.

    Interleaving rather than case after case: on a shared machine, load from elsewhere
    comes and goes, and should hit the baseline and the subject alike."""
    # Ids unique across the whole bench: a repeated X-GitHub-Delivery is a duplicate that
    # the service acknowledges but does not store, which would spoil the stored count.
    ids = itertools.count(time.time_ns())

    def timed(case: Case, seconds: float) -> Run:
        run = case.server.measured(
            lambda: asyncio.run(load(case.workload, args.senders, seconds, ids)), pinned=args.pin
        )
        case.answers += run.statuses
        return run

    for case in cases:
        progress(f"warm-up: {case.name}")
        timed(case, args.warmup)
    for n in range(args.repeat):
        for case in cases:
            run = timed(case, args.seconds)
            case.runs.append(run)
            progress(
                f"round {n + 1}: {case.name}: {run.rps:,.0f} req/s, "
                f"p99 {run.percentile_ms(0.99):.1f} ms, "
                f"other load on the cores: {others(run.others_server_core, run.others_client_core)}"
            )


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- report


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def others(server_core: float | None, client_core: float | None) -> str:
    if server_core is None and client_core is None:
        return "n/a"
    return f"{percent(server_core)} / {percent(client_core)}"


def print_table(cases: list[Case], baseline: Case, client_check: Case | None) -> None:
    print(
        "| case | req/s | p50 ms | p99 ms | share of bare | server CPU | client CPU "
        "| other load, server / client core | non-202 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        share = "—" if c is client_check else f"{c.share_of(baseline):.0%}"
        p50 = statistics.median(r.percentile_ms(0.50) for r in c.runs)
        non_202 = sum(n for status, n in c.answers.items() if status != 202)
        elsewhere = others(
            c.median(lambda r: r.others_server_core), c.median(lambda r: r.others_client_core)
        )
        print(
            f"| {c.name} | {c.rps:,.0f} | {p50:.1f} | {c.p99():.1f} | {share} "
            f"| {percent(c.median(lambda r: r.server_cpu))} "
            f"| {percent(c.median(lambda r: r.client_cpu))} "
            f"| {elsewhere} | {non_202:,} |"
        )
    print()


def check_service(
    service: Case, baseline: Case, stored: int, exit_code: int, args: argparse.Namespace
) -> bool:
    """Print the targets and the delivery checks; True when no delivery went missing."""
    p99, share, accepted = service.p99(), service.share_of(baseline), service.answers[202]
    refused = {status: n for status, n in service.answers.items() if status != 202}
    print(
        f"- p99 {p99:.1f} ms at {args.senders} senders (target: under {P99_TARGET_MS:g} ms): "
        + ("met" if p99 < P99_TARGET_MS else "**not met**")
    )
    print(
        f"- throughput {share:.0%} of the bare handler (target: at least {SHARE_TARGET:.0%}): "
        + ("met" if share >= SHARE_TARGET else "**not met**")
    )
    print(
        f"- stored {stored:,} deliveries for {accepted:,} answers 202 (warm-up included): "
        + ("all stored" if stored == accepted else "**MISMATCH**")
    )
    print(
        "- answers other than 202: "
        + (
            ", ".join(f"{n:,} x {status or 'connection failed'}" for status, n in refused.items())
            or "none"
        )
    )
    warnings = sum(
        1
        for line in service.server.log_path.read_text(errors="replace").splitlines()
        if "WARNING" in line or "ERROR" in line
    )
    print(f"- service exit code after SIGTERM: {exit_code}; warning/error log lines: {warnings}")
    return stored == accepted and not refused and exit_code == 0


def disturbed(run: Run) -> bool:
    if run.others_server_core is not None and run.others_server_core > DISTURBED_SERVER_CORE:
        return True
    client_core = (run.others_client_core or 0.0) + run.client_cpu
    return run.others_client_core is not None and client_core > DISTURBED_CLIENT_CORE


def print_client_headroom(cases: list[Case], client_check: Case | None) -> None:
    """Evidence that the rates are the servers' and not the load generator's."""
    loaded = [c for c in cases if c is not client_check]
    busiest = max(r.client_cpu for c in loaded for r in c.runs)
    line = f"- load generator: at most {busiest:.0%} of its core in the 25 KiB cases"
    if client_check is not None:
        fastest = max(c.rps for c in loaded)
        line += (
            f"; it drove {client_check.rps:,.0f} req/s against the tiny body, "
            f"{client_check.rps / fastest:.1f}x the fastest 25 KiB case"
        )
    print(line)


def print_disturbance(cases: list[Case]) -> None:
    runs = [run for case in cases for run in case.runs]
    bad = sum(map(disturbed, runs))
    if any(run.others_server_core is None for run in runs):
        print("- disturbance from other work: unknown (CPUs not pinned, or no /proc)")
    elif bad:
        print(
            f"- **{bad} of {len(runs)} runs disturbed** by other work (over "
            f"{DISTURBED_SERVER_CORE:.0%} of the server's core, or the load generator's core "
            f"over {DISTURBED_CLIENT_CORE:.0%} busy): run again on a quiet machine before "
            "trusting the numbers"
        )
    else:
        print(f"- disturbance from other work: none of the {len(runs)} runs")


def print_header(args: argparse.Namespace, payload_bytes: int) -> None:
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
        f"{args.senders} keep-alive senders, {payload_bytes / 1024:.1f} KiB signed "
        f"`{EVENT}` payload, {args.warmup:g} s warm-up, median of {args.repeat} "
        f"interleaved rounds of {args.seconds:g} s"
    )
    if args.pipeline:
        method += ", pipeline enabled (the delivery worker runs too)"
    print(f"## Webhook intake, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n")
    print(f"{machine}. {pinning}. {method}.\n")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure POST /api/github/webhooks of the real service (python -m app "
        "serve) against a bare aiohttp handler, in the same run. Prints a Markdown table; "
        "exits 1 if a delivery was answered other than 202 or was not stored.",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of timed runs (median)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per case")
    parser.add_argument("--senders", type=int, default=16, help="concurrent keep-alive senders")
    parser.add_argument("--payload", type=Path, default=DEFAULT_PAYLOAD, help="JSON to pad")
    parser.add_argument("--payload-kib", type=float, default=25.0, help="padded payload size")
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="also set UPDATE_PIPELINE_ENABLED=true, so the delivery worker processes "
        "deliveries (competing with intake) while the bench runs",
    )
    parser.add_argument("--no-client-check", action="store_true", help="skip the tiny-body case")
    # Internal: the bench runs itself again to host the baseline in a process of its own.
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--parser", default="json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def set_up_pinning(args: argparse.Namespace) -> None:
    args.pin, args.pin_problem = False, ""
    if (os.cpu_count() or 1) < 2:
        args.pin_problem = "fewer than 2 CPUs"
    elif shutil.which("taskset") is None:
        args.pin_problem = "taskset not found"
    elif not hasattr(os, "sched_setaffinity"):
        args.pin_problem = "no sched_setaffinity on this platform"
    else:
        # The load generator pins itself; servers start under taskset, which replaces
        # the affinity they would inherit from this process.
        os.sched_setaffinity(0, {CLIENT_CPU})
        args.pin = True
    if not args.pin:
        progress(f"warning: CPUs not pinned ({args.pin_problem}); numbers will be noisier")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare, args.parser)
        return 0
    body = padded_payload(args.payload, int(args.payload_kib * 1024))
    set_up_pinning(args)
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        tmp_path = Path(tmp)
        bare_port, fast_port, service_port = free_port(), free_port(), free_port()
        db = tmp_path / "bench.db"
        bare = Server(
            "bare handler",
            [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(bare_port)],
            dict(os.environ),
            bare_port,
            tmp_path / "bare.log",
        )
        fast = Server(
            "bare handler (orjson)",
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve-bare",
                str(fast_port),
                "--parser",
                "orjson",
            ],
            dict(os.environ),
            fast_port,
            tmp_path / "bare-orjson.log",
        )
        service = Server(
            "service",
            [sys.executable, "-m", "app", "serve"],
            service_env(db, service_port, pipeline=args.pipeline),
            service_port,
            tmp_path / "service.log",
        )
        size = f"{len(body) / 1024:.0f} KiB"
        baseline = Case(f"bare handler, {size}", bare, Workload.build(bare_port, body))
        subject = Case(
            f"service, {size} signed {EVENT}", service, Workload.build(service_port, body)
        )
        # Not a target: the service parses with orjson, so this row shows what a bare
        # handler with the same parser does, and how much of the share is parsing.
        fast_bare = Case(
            f"bare handler, {size}, orjson (informational)", fast, Workload.build(fast_port, body)
        )
        cases = [baseline, fast_bare, subject]
        client_check = None
        if not args.no_client_check:
            # The bare handler with a tiny body does far less work per request, so its
            # rate shows how far the load generator itself can go: that must sit well
            # above the other rates for them to be the servers' rates.
            tiny = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
            client_check = Case(
                "bare handler, tiny body (client check)", bare, Workload.build(bare_port, tiny)
            )
            cases.insert(0, client_check)
        try:
            for server in (bare, fast, service):
                progress(f"starting {server.name}")
                server.start(args.pin)
            run_all(cases, args)
            bare.stop()
            fast.stop()
            exit_code = service.stop()
        finally:
            bare.kill()
            fast.kill()
            service.kill()
        print_header(args, len(body))
        print_table(cases, baseline, client_check)
        ok = check_service(subject, baseline, stored_deliveries(db), exit_code, args)
        print_client_headroom(cases, client_check)
        print_disturbance(cases)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
