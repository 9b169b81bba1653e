"""A fleet simulator: many runners sending heartbeats to a running service.

``update-pipeline simulate`` plays N runners spread over M organisations. Each runner
has a boot id, a current build and session counters that are cumulative for its boot.
Every interval it adds the sessions it ran (with failures and disconnects at the rates
given for its build), sends its heartbeat, and obeys the answer: when the service wants
another build, the runner restarts on it (a new boot id, its counters back to 0).

The module is in two layers:

- a pure core, with no I/O and no clock: `SimulatedRunner` (a `Runner`'s state, the
  `SessionModel` that draws its sessions, its next heartbeat body, applying an answer,
  the delay before its next heartbeat), `make_fleet`, and the text of the progress line
  and the summary. Randomness comes from a `random.Random` that the caller gives, so a
  seed makes a run's choices reproducible;
- the I/O loop, `Simulator`: one aiohttp session with a connection limit, one asyncio task
  per runner, retries with backoff on connection errors and 5xx, and the live progress
  line. Its clock and its sleep can be replaced.

aiohttp is imported only when a simulation runs, so the other commands do not load it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import quote, urlsplit

from app import __version__
from app.clock import Clock
from app.config import DURATION_HELP, parse_duration
from app.logs import get_logger

if TYPE_CHECKING:
    import aiohttp

log = get_logger("simulator")

API_PREFIX = "/api/update-pipeline"  # as app.api.routing.PREFIX, without loading the API
DEFAULT_BUILD = "build-initial"
DEFAULT_FAIL_RATE = 0.01
DEFAULT_DISCONNECT_RATE = 0.005
DEFAULT_SESSIONS = 5.0
DEFAULT_RESTART_RATE = 0.002
DEFAULT_INTERVAL = 30.0
DEFAULT_CONNECTIONS = 64
ANY_BUILD = "*"  # in --fail-rate / --disconnect-rate: every build not named
JITTER = 0.2  # each wait is the interval +/- 20%
MAX_POLL_AFTER = 86_400.0  # a larger pollAfterSeconds is read as a day
MAX_RETRY_AFTER = 60.0
STOP_GRACE = 2.0  # at the end, heartbeats in flight get this long to be answered
TOP_BUILDS = 3


class SimulatorError(Exception):
    """A one-line reason the simulation cannot run (the command exits 1)."""


# -- the pure core ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionDraw:
    """The sessions one runner ran during one interval."""

    started: int
    failed: int
    disconnected: int


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw: Knuth's method for small means, a normal approximation above."""
    if mean <= 0:
        return 0
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def binomial(rng: random.Random, trials: int, probability: float) -> int:
    if probability <= 0:
        return 0
    if probability >= 1:
        return trials
    return sum(1 for _ in range(trials) if rng.random() < probability)


def rate_for(rates: Mapping[str, float], build_id: str, default: float) -> float:
    """The rate for a build: its own, else the ``*`` entry, else the default."""
    return rates.get(build_id, rates.get(ANY_BUILD, default))


@dataclass(frozen=True, slots=True)
class SessionModel:
    """How runners behave: sessions per interval, failure and disconnect rates per build
    (each session fails and disconnects independently), and random restarts."""

    mean_sessions: float = DEFAULT_SESSIONS
    fail_rates: Mapping[str, float] = field(default_factory=dict)
    disconnect_rates: Mapping[str, float] = field(default_factory=dict)
    restart_rate: float = DEFAULT_RESTART_RATE  # per interval

    def fail_rate(self, build_id: str) -> float:
        return rate_for(self.fail_rates, build_id, DEFAULT_FAIL_RATE)

    def disconnect_rate(self, build_id: str) -> float:
        return rate_for(self.disconnect_rates, build_id, DEFAULT_DISCONNECT_RATE)

    def draw(self, build_id: str, rng: random.Random) -> SessionDraw:
        started = poisson(rng, self.mean_sessions)
        return SessionDraw(
            started,
            binomial(rng, started, self.fail_rate(build_id)),
            binomial(rng, started, self.disconnect_rate(build_id)),
        )


def new_boot_id(rng: random.Random) -> str:
    return f"b-{rng.getrandbits(64):016x}"


@dataclass(frozen=True, slots=True)
class Answer:
    """The parts of a heartbeat's answer the simulator uses."""

    desired_build_id: str | None
    channel: str | None = None
    rollout_id: str | None = None
    poll_after: float | None = None
    warnings: tuple[str, ...] = ()


class BadAnswer(ValueError):
    """A 200 answer that is not the heartbeat's answer."""


def parse_answer(data: object) -> Answer:
    """Read an answer leniently: unknown fields are ignored, a wrong type is refused."""
    if not isinstance(data, dict):
        raise BadAnswer(f"expected a JSON object, got {type(data).__name__}")

    def text(key: str) -> str | None:
        value = data.get(key)
        if value is None or (isinstance(value, str) and value):
            return value
        raise BadAnswer(f"{key} is {value!r}, not a non-empty string or null")

    poll_after = data.get("pollAfterSeconds")
    if poll_after is not None and (
        isinstance(poll_after, bool)
        or not isinstance(poll_after, int | float)
        or not math.isfinite(poll_after)
        or poll_after < 0
    ):
        raise BadAnswer(f"pollAfterSeconds is {poll_after!r}, not a number of seconds")
    warnings = data.get("warnings") or []
    if not isinstance(warnings, list):
        raise BadAnswer(f"warnings is {warnings!r}, not a list")
    return Answer(
        desired_build_id=text("desiredBuildId"),
        channel=text("channel"),
        rollout_id=text("rolloutId"),
        poll_after=None if poll_after is None else min(float(poll_after), MAX_POLL_AFTER),
        warnings=tuple(str(w) for w in warnings),
    )


@dataclass(slots=True)
class Runner:
    """What one runner knows: who it is, what it runs, and its counters for this boot."""

    runner_id: str
    org_id: str
    build_id: str
    boot_id: str
    started: int = 0
    failed: int = 0
    disconnected: int = 0
    boots: int = 1  # processes started so far, the first one included
    channel: str | None = None
    rollout_id: str | None = None
    poll_after: float | None = None

    def add(self, draw: SessionDraw) -> None:
        self.started += draw.started
        self.failed += draw.failed
        self.disconnected += draw.disconnected

    def restart(self, boot_id: str, build_id: str | None = None) -> None:
        """A new process: a new boot id, counters from 0, on ``build_id`` if given."""
        if boot_id == self.boot_id:
            raise ValueError("a restart needs a new boot id")
        self.boot_id = boot_id
        if build_id is not None:
            self.build_id = build_id
        self.started = self.failed = self.disconnected = 0
        self.boots += 1

    def heartbeat(self, runtimes: Mapping[str, str]) -> dict[str, Any]:
        return {
            "runnerId": self.runner_id,
            "orgId": self.org_id,
            "bootId": self.boot_id,
            "buildId": self.build_id,
            "runtimes": dict(runtimes),
            "sessions": {
                "started": self.started,
                "failed": self.failed,
                "disconnected": self.disconnected,
            },
        }


@dataclass(frozen=True, slots=True)
class Tick:
    draw: SessionDraw
    restarted: bool  # a random restart happened before these sessions


def next_delay(
    interval: float, poll_after: float | None, rng: random.Random, jitter: float = JITTER
) -> float:
    """The wait before the next heartbeat: the interval +/- jitter, but never sooner than
    the server's pollAfterSeconds (then up to ``jitter`` later, so runners stay spread)."""
    delay = interval * rng.uniform(1 - jitter, 1 + jitter)
    if poll_after is not None and delay < poll_after:
        delay = poll_after * rng.uniform(1, 1 + jitter)
    return delay


class SimulatedRunner:
    """A runner with its behaviour and its own random source: everything but I/O."""

    __slots__ = ("model", "rng", "runner")

    def __init__(self, runner: Runner, model: SessionModel, rng: random.Random) -> None:
        self.runner = runner
        self.model = model
        self.rng = rng

    def tick(self) -> Tick:
        """One interval: maybe a random restart, then the sessions it ran."""
        restarted = self.rng.random() < self.model.restart_rate
        if restarted:
            self.runner.restart(self._new_boot_id())
        draw = self.model.draw(self.runner.build_id, self.rng)
        self.runner.add(draw)
        return Tick(draw, restarted)

    def heartbeat(self, runtimes: Mapping[str, str] | None = None) -> dict[str, Any]:
        return self.runner.heartbeat(runtimes or {})

    def apply(self, answer: Answer) -> str | None:
        """Obey an answer. Returns the build switched away from, or None."""
        runner = self.runner
        runner.channel, runner.rollout_id = answer.channel, answer.rollout_id
        runner.poll_after = answer.poll_after
        desired = answer.desired_build_id
        if desired is None or desired == runner.build_id:
            return None
        previous = runner.build_id
        runner.restart(self._new_boot_id(), desired)
        return previous

    def next_delay(self, interval: float) -> float:
        return next_delay(interval, self.runner.poll_after, self.rng)

    def _new_boot_id(self) -> str:
        while (boot_id := new_boot_id(self.rng)) == self.runner.boot_id:
            pass  # pragma: no cover - one chance in 2**64
        return boot_id


def runner_rng(seed: int, runner_id: str) -> random.Random:
    """Each runner's own random source, so its draws do not depend on the order in which
    the network lets runners run (string seeds are hashed the same in every process)."""
    return random.Random(f"{seed}/{runner_id}")  # noqa: S311 - a simulation, not a secret


def make_fleet(
    runners: int,
    orgs: int,
    seed: int,
    model: SessionModel,
    *,
    start_build: str = DEFAULT_BUILD,
    org_id: str | None = None,
) -> list[SimulatedRunner]:
    """Runners r-0001... spread evenly over org-0001... (or all in ``org_id``), which
    runner goes to which org shuffled by the seed."""
    if org_id is not None:
        org_ids = [org_id] * runners
    else:
        org_ids = [f"org-{i % orgs + 1:04d}" for i in range(runners)]
        random.Random(f"{seed}/orgs").shuffle(org_ids)  # noqa: S311 - as above
    fleet = []
    for index, org in enumerate(org_ids, start=1):
        runner_id = f"r-{index:04d}"
        rng = runner_rng(seed, runner_id)
        fleet.append(
            SimulatedRunner(Runner(runner_id, org, start_build, new_boot_id(rng)), model, rng)
        )
    return fleet


# -- statistics and their text ----------------------------------------------------------


@dataclass(slots=True)
class BuildStats:
    """Sessions the runners ran on one build."""

    started: int = 0
    failed: int = 0
    disconnected: int = 0
    first_seen: float | None = None  # seconds into the run

    def fail_rate(self) -> float:
        return self.failed / self.started if self.started else 0.0

    def disconnect_rate(self) -> float:
        return self.disconnected / self.started if self.started else 0.0

    def sessions_per_second(self, elapsed: float) -> float:
        span = elapsed - (self.first_seen or 0.0)
        return self.started / span if span > 0 else 0.0


@dataclass(slots=True)
class HeartbeatStats:
    """Heartbeat requests: every attempt counts, retries included."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    connection_errors: int = 0
    server_errors: int = 0
    rejected: Counter[int] = field(default_factory=Counter)  # 4xx (and other non-2xx) by status
    retries: int = 0
    given_up: int = 0  # heartbeats dropped after the last retry
    bad_answers: int = 0
    warnings: int = 0

    @property
    def in_flight(self) -> int:
        return self.sent - self.ok - self.failed


@dataclass(slots=True)
class SimulationReport:
    """A run's figures; live while it runs, final once `Simulator.run` returns."""

    runners: int
    orgs: int
    seed: int
    elapsed: float = 0.0
    heartbeats: HeartbeatStats = field(default_factory=HeartbeatStats)
    builds: dict[str, BuildStats] = field(default_factory=dict)
    fleet: dict[str, int] = field(default_factory=dict)  # runners per build, at the end
    switches: Counter[tuple[str, str]] = field(default_factory=Counter)  # (from, to)
    restarts: int = 0  # random restarts (switches not included)
    crashed: int = 0  # runner tasks stopped by a bug in the simulator

    @property
    def succeeded(self) -> bool:
        return self.heartbeats.ok > 0

    def record(self, build_id: str, tick: Tick, elapsed: float) -> None:
        stats = self.builds.get(build_id)
        if stats is None:
            stats = self.builds[build_id] = BuildStats(first_seen=elapsed)
        stats.started += tick.draw.started
        stats.failed += tick.draw.failed
        stats.disconnected += tick.draw.disconnected
        self.restarts += tick.restarted


def fleet_shares(runners: Iterable[Runner]) -> dict[str, int]:
    """Runners per build, most first (ties by build id)."""
    counts = Counter(r.build_id for r in runners)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _count(value: float) -> str:
    if value >= 10_000_000:
        return f"{value / 1_000_000:.0f}M"
    if value >= 10_000:
        return f"{value / 1_000:.0f}k"
    return f"{value:.0f}"


def _clock_text(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(
    report: SimulationReport, shares: Mapping[str, int], top: int = TOP_BUILDS
) -> str:
    """One line: elapsed, heartbeats, and for the builds most runners run, their share
    of the fleet and the sessions, failures and disconnects observed on them."""
    hb = report.heartbeats
    parts = [
        f"{_clock_text(report.elapsed)} hb {_count(hb.sent)} sent {_count(hb.ok)} ok "
        f"{_count(hb.failed)} failed"
    ]
    total = sum(shares.values()) or 1
    for build_id, count in list(shares.items())[:top]:
        stats = report.builds.get(build_id, BuildStats())
        parts.append(
            f"{build_id} {100 * count / total:.0f}% "
            f"{stats.sessions_per_second(report.elapsed):.1f} sess/s "
            f"fail {100 * stats.fail_rate():.1f}% disc {100 * stats.disconnect_rate():.1f}%"
        )
    if len(shares) > top:
        parts.append(f"+{len(shares) - top} more")
    return " | ".join(parts)


def summary_lines(report: SimulationReport) -> list[str]:
    hb = report.heartbeats
    orgs = "1 org" if report.orgs == 1 else f"{report.orgs} orgs"
    lines = [
        f"simulated {report.runners} runners in {orgs} for {report.elapsed:.1f}s "
        f"(seed {report.seed})",
    ]
    problems = [
        f"{hb.connection_errors} connection errors",
        f"{hb.server_errors} server errors",
        f"{sum(hb.rejected.values())} rejected"
        + (
            " (" + ", ".join(f"{s}: {n}" for s, n in sorted(hb.rejected.items())) + ")"
            if hb.rejected
            else ""
        ),
    ]
    lines.append(
        f"heartbeats: {hb.sent} sent, {hb.ok} ok, {hb.failed} failed ({', '.join(problems)}); "
        f"{hb.retries} retries, {hb.given_up} given up, {hb.in_flight} in flight at the end"
    )
    if hb.bad_answers or hb.warnings:
        lines.append(f"answers: {hb.bad_answers} unreadable, {hb.warnings} warnings")
    switched = sum(report.switches.values())
    lines.append(f"restarts: {switched} build switches, {report.restarts} random restarts")
    for (old, new), count in sorted(report.switches.items(), key=lambda item: -item[1]):
        lines.append(f"  {old} -> {new}: {count}")
    if report.crashed:
        lines.append(f"{report.crashed} runners stopped on a simulator error (see the log)")
    lines.append("builds (runners at the end, sessions, failure and disconnect rates):")
    total = sum(report.fleet.values()) or 1
    builds = list(report.fleet) + sorted(b for b in report.builds if b not in report.fleet)
    width = max((len(b) for b in builds), default=0)
    for build_id in builds:
        count = report.fleet.get(build_id, 0)
        stats = report.builds.get(build_id, BuildStats())
        lines.append(
            f"  {build_id:<{width}}  {count:>6} runners ({100 * count / total:5.1f}%)  "
            f"{stats.started:>9} sessions  fail {100 * stats.fail_rate():5.2f}%  "
            f"disconnect {100 * stats.disconnect_rate():5.2f}%"
        )
    return lines


# -- the progress line --------------------------------------------------------------------


class ProgressDisplay:
    """A one-line display: rewritten in place on a terminal (every second by default);
    elsewhere one line at a time (every 5 seconds by default), so logs stay readable."""

    def __init__(
        self, stream: TextIO | None = None, *, tty: bool | None = None, every: float | None = None
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.every = every if every is not None else (1.0 if tty else 5.0)
        self._shown = False

    def show(self, line: str) -> None:
        if self.tty:
            width = max(20, shutil.get_terminal_size().columns - 1)  # no wrap, or \r fails
            self.stream.write("\r" + line[:width] + "\x1b[K")
            self._shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Blank the line, before something else is written to the terminal."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


class _ClearProgressFirst(logging.Filter):
    """On a handler writing to the display's terminal: clear the progress line before a
    log line is written over it (the next refresh draws it again)."""

    def __init__(self, display: ProgressDisplay) -> None:
        super().__init__()
        self.display = display

    def filter(self, record: logging.LogRecord) -> bool:
        self.display.clear()
        return True


# -- the I/O loop -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    url: str  # the service's base address, e.g. http://127.0.0.1:8080
    token: str
    runners: int
    orgs: int = 1
    interval: float = DEFAULT_INTERVAL
    duration: float | None = None  # None: until stop() (Ctrl-C in the command)
    seed: int = 0
    start_build: str = DEFAULT_BUILD
    org_id: str | None = None  # every runner in this org (a runner token's)
    model: SessionModel = field(default_factory=SessionModel)
    # Reported runtime versions; None: the build's runtimeVersions from GET /builds/{id}
    # when the token may read it, else none.
    runtimes: Mapping[str, str] | None = None
    connections: int = DEFAULT_CONNECTIONS
    max_attempts: int = 4  # per heartbeat, the first included
    retry_base: float = 0.5  # seconds; doubles on each retry
    request_timeout: float = 10.0
    check_token: bool = True  # ask GET /status first, to explain a refused token

    def endpoint(self, path: str) -> str:
        return self.url.rstrip("/") + API_PREFIX + path


class Simulator:
    """Drives a fleet against the service until the duration ends or stop() is called."""

    def __init__(
        self,
        options: SimulatorOptions,
        *,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        display: ProgressDisplay | None = None,
    ) -> None:
        self.options = options
        self.clock = clock or Clock()
        self.sleep = sleep
        self.display = display
        self.fleet = make_fleet(
            options.runners,
            options.orgs,
            options.seed,
            options.model,
            start_build=options.start_build,
            org_id=options.org_id,
        )
        self.report = SimulationReport(
            options.runners,
            1 if options.org_id else min(options.orgs, options.runners),
            options.seed,
        )
        self._stop = asyncio.Event()
        self._start = 0.0
        self._runtimes: dict[str, asyncio.Task[Mapping[str, str]]] = {}
        self._logged: set[object] = set()
        self._sending: set[asyncio.Task[Any]] = set()  # runners waiting for an answer
        self._session: aiohttp.ClientSession | None = None

    def stop(self) -> None:
        self._stop.set()

    def elapsed(self) -> float:
        return self.clock.monotonic() - self._start

    def shares(self) -> dict[str, int]:
        return fleet_shares(sim.runner for sim in self.fleet)

    async def run(self) -> SimulationReport:
        import aiohttp

        options = self.options
        connector = aiohttp.TCPConnector(limit=options.connections)
        # No total timeout: waiting for one of the pool's connections is not the server's
        # fault. Connecting and each read are bounded.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=options.request_timeout, sock_read=options.request_timeout
        )
        headers = {
            "Authorization": f"Bearer {options.token}",
            "User-Agent": f"update-pipeline-simulator/{__version__}",
        }
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers
        ) as session:
            self._session = session
            if options.check_token:
                await self._check_token()
            filters = self._watch_logging()
            self._start = self.clock.monotonic()
            tasks: list[asyncio.Task[Any]] = [
                asyncio.create_task(self._drive(sim)) for sim in self.fleet
            ]
            if self.display is not None:
                tasks.append(asyncio.create_task(self._show_progress(self.display)))
            try:
                await self._until_done()
            finally:
                # Runners that wait for an answer get it (briefly); the others stop now.
                self._stop.set()
                sending = set(self._sending)
                for task in tasks:
                    if task not in sending:
                        task.cancel()
                if sending:
                    await asyncio.wait(sending, timeout=STOP_GRACE)
                tasks.extend(self._runtimes.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.report.elapsed = self.elapsed()
                self.report.fleet = self.shares()
                if self.display is not None:
                    self.display.clear()
                for handler, log_filter in filters:
                    handler.removeFilter(log_filter)
                self._session = None
        return self.report

    async def _until_done(self) -> None:
        if self.options.duration is None:
            await self._stop.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self.options.duration)

    def _watch_logging(self) -> list[tuple[logging.Handler, logging.Filter]]:
        display = self.display
        if display is None or not display.tty:
            return []
        added: list[tuple[logging.Handler, logging.Filter]] = []
        for handler in logging.getLogger().handlers:
            if getattr(handler, "stream", None) is display.stream:
                log_filter = _ClearProgressFirst(display)
                handler.addFilter(log_filter)
                added.append((handler, log_filter))
        return added

    async def _show_progress(self, display: ProgressDisplay) -> None:
        while True:
            await self.sleep(display.every)
            self.report.elapsed = self.elapsed()
            display.show(progress_line(self.report, self.shares()))

    async def _check_token(self) -> None:
        """GET /status (viewer or admin) says what kind of token this is: a runner token
        is refused with 403, and it reports for one org only, which must be given."""
        import aiohttp

        assert self._session is not None
        try:
            async with self._session.get(self.options.endpoint("/status")) as response:
                status, message = response.status, await _error_message(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot reach %s (%s); simulating anyway", self.options.url, exc)
            return
        if status == 401:
            raise SimulatorError(f"the service refused the token: {message}")
        if status == 403 and self.options.org_id is None:
            raise SimulatorError(
                "the token may not read /status, so it is a runner token, which reports for "
                "one organisation only: give that organisation with --org-id (an admin token "
                "may report for many)"
            )

    async def _drive(self, sim: SimulatedRunner) -> None:
        options, report = self.options, self.report
        me = asyncio.current_task()
        assert me is not None
        try:
            await self.sleep(sim.rng.uniform(0, options.interval))  # spread the first ones
            while not self._stop.is_set():
                tick = sim.tick()
                report.record(sim.runner.build_id, tick, self.elapsed())
                self._sending.add(me)
                try:
                    answer = await self._heartbeat(sim)
                finally:
                    self._sending.discard(me)
                if answer is not None:
                    previous = sim.apply(answer)
                    if previous is not None:
                        report.switches[(previous, sim.runner.build_id)] += 1
                if self._stop.is_set():
                    break
                await self.sleep(sim.next_delay(options.interval))
        except asyncio.CancelledError:
            raise
        except Exception:
            report.crashed += 1
            log.exception("runner %s stopped on an error", sim.runner.runner_id)

    async def _heartbeat(self, sim: SimulatedRunner) -> Answer | None:
        """Send one heartbeat, retrying connection errors and 5xx with backoff. The body
        is the same on every attempt: counters are cumulative, so a repeat counts nothing
        twice, and the next heartbeat carries whatever a lost one had."""
        import aiohttp
        import orjson

        assert self._session is not None
        options, hb = self.options, self.report.heartbeats
        runtimes = await self._runtimes_for(sim.runner.build_id)
        payload = orjson.dumps(sim.heartbeat(runtimes))
        url = options.endpoint("/heartbeat")
        for attempt in range(1, options.max_attempts + 1):
            hb.sent += 1
            retry_after: float | None = None
            try:
                async with self._session.post(
                    url, data=payload, headers={"Content-Type": "application/json"}
                ) as response:
                    status = response.status
                    if 200 <= status < 300:
                        hb.ok += 1
                        return self._read_answer(await response.read())
                    hb.failed += 1
                    message = await _error_message(response)
                    if status < 500:
                        hb.rejected[status] += 1
                        self._log_once(
                            ("status", status, message.split(":")[0]),
                            "heartbeat of %s refused with %s: %s",
                            sim.runner.runner_id,
                            status,
                            message,
                        )
                        return None
                    hb.server_errors += 1
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                    reason = f"{status}: {message}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                hb.failed += 1
                hb.connection_errors += 1
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self._stop.is_set():
                return None  # the run is over: no retry
            if attempt == options.max_attempts:
                break
            hb.retries += 1
            log.debug("heartbeat of %s failed (%s); retrying", sim.runner.runner_id, reason)
            backoff = options.retry_base * 2 ** (attempt - 1) * sim.rng.uniform(0.5, 1.0)
            await self.sleep(retry_after if retry_after is not None else backoff)
        hb.given_up += 1
        self._log_once(
            ("given up", reason.split(":")[0]),
            "heartbeat of %s given up after %s attempts: %s",
            sim.runner.runner_id,
            options.max_attempts,
            reason,
        )
        return None

    def _read_answer(self, raw: bytes) -> Answer | None:
        import orjson

        hb = self.report.heartbeats
        try:
            answer = parse_answer(orjson.loads(raw))
        except (orjson.JSONDecodeError, BadAnswer) as exc:
            hb.bad_answers += 1
            self._log_once(("bad answer", str(exc)), "unreadable heartbeat answer: %s", exc)
            return None
        hb.warnings += len(answer.warnings)
        for warning in answer.warnings:
            self._log_once(("warning", warning), "the service warns: %s", warning)
        return answer

    def _log_once(self, key: object, message: str, *args: object) -> None:
        """Warn about each kind of problem once; repeats go to the debug log (the counts
        are in the progress line and the summary)."""
        if key in self._logged or len(self._logged) >= 1000:
            log.debug(message, *args)
            return
        self._logged.add(key)
        log.warning(message, *args)

    async def _runtimes_for(self, build_id: str) -> Mapping[str, str]:
        """The runtime versions a runner on this build reports: those given, else the
        build's own (asked once per build), so the simulation never reports versions
        the service would record as new."""
        if self.options.runtimes is not None:
            return self.options.runtimes
        task = self._runtimes.get(build_id)
        if task is None:
            task = self._runtimes[build_id] = asyncio.create_task(self._lookup(build_id))
        return await asyncio.shield(task)

    async def _lookup(self, build_id: str) -> Mapping[str, str]:
        import aiohttp

        assert self._session is not None
        url = self.options.endpoint("/builds/" + quote(build_id, safe=""))
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    return {}
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self._runtimes.pop(build_id, None)  # ask again next time
            return {}
        versions = data.get("runtimeVersions") if isinstance(data, dict) else None
        if not isinstance(versions, dict):
            return {}
        return {str(k): str(v) for k, v in versions.items()}


async def _error_message(response: aiohttp.ClientResponse) -> str:
    """The message of the API's error body, or the start of whatever came instead."""
    raw = await response.read()
    try:
        import orjson

        body = orjson.loads(raw)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return f"{error.get('code', '?')}: {error['message']}"
    except ValueError:
        pass
    text = raw[:200].decode("utf-8", "replace").strip()
    return text or (response.reason or "no body")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(seconds, MAX_RETRY_AFTER) if math.isfinite(seconds) and seconds >= 0 else None


# -- the command --------------------------------------------------------------------------


def parse_rate(text: str) -> tuple[str, float]:
    """``BUILD=RATE``, RATE from 0 to 1; BUILD ``*`` means every build not named."""
    build, sep, rate_text = text.rpartition("=")
    build = build.strip()
    try:
        rate = float(rate_text) if sep and build else math.nan
    except ValueError:
        rate = math.nan
    if not 0 <= rate <= 1:  # NaN fails this too
        raise ValueError(
            f"{text!r} is not BUILD=RATE with a RATE from 0 to 1, like build-abc123=0.05"
            f" (or *=0.02 for every other build)"
        )
    return build, rate


def parse_pair(text: str) -> tuple[str, str]:
    """``PROVIDER=VERSION``."""
    key, sep, value = text.partition("=")
    if not (sep and key.strip() and value.strip()):
        raise ValueError(f"{text!r} is not PROVIDER=VERSION, like claude_code=2.1.0")
    return key.strip(), value.strip()


class _MapAction(argparse.Action):
    """Repeatable KEY=VALUE options collected into a dict; a key given twice is an error."""

    def __init__(self, *args: Any, parse: Callable[[str], tuple[str, Any]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parse = parse

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        try:
            key, value = self.parse(str(values))
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        current = dict(getattr(namespace, self.dest, None) or {})
        if key in current:
            raise argparse.ArgumentError(self, f"{key!r} is given twice")
        current[key] = value
        setattr(namespace, self.dest, current)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def parse_seconds(text: str) -> float:
    """A number of seconds (``30``, ``0.5``) or a duration (``500ms``, ``2m``); above 0."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parse_duration(value).total_seconds()
        except ValueError:
            raise ValueError(
                f"{text!r} is neither a number of seconds nor {DURATION_HELP}"
            ) from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{text!r} is not more than 0 seconds")
    return seconds


def parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{text!r} is less than 1")
    return value


def _number_between(text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # NaN is never between
        raise ValueError(f"{text!r} is not a number from {low:g} to {high:g}")
    return value


def parse_probability(text: str) -> float:
    return _number_between(text, 0, 1)


def parse_mean(text: str) -> float:
    return _number_between(text, 0, 1_000_000)


def parse_base_url(text: str) -> str:
    """The service's address; a trailing /api/update-pipeline is accepted and dropped."""
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{text!r} is not an http(s) address like http://127.0.0.1:8080")
    if parts.username or parts.password:
        raise ValueError("the address must not carry credentials; use --token")
    return url.removesuffix(API_PREFIX)


def parse_build_id(text: str) -> str:
    value = text.strip()
    if not value or len(value) > 100:
        raise ValueError(f"{text!r} is not a build id (1 to 100 characters)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulate command's flags."""
    add = parser.add_argument
    add(
        "--url",
        required=True,
        type=_argument_type(parse_base_url),
        help="the service's address, e.g. http://127.0.0.1:8080",
    )
    add(
        "--token",
        default=None,
        help="an admin token (runners may then report for many orgs), or a runner token, "
        "which reports for its one org: give that org with --org-id. Default: the "
        "environment variable UPDATE_PIPELINE_TOKEN, which, unlike an argument, other "
        "users of the machine cannot read in the process list",
    )
    add(
        "--runners",
        required=True,
        type=_argument_type(parse_count),
        metavar="N",
        help="how many runners (r-0001, r-0002, ...)",
    )
    add(
        "--orgs",
        type=_argument_type(parse_count),
        metavar="M",
        help="spread the runners over org-0001 ... org-M, by the seed (default: 1); "
        "needs an admin token when M > 1",
    )
    add(
        "--org-id",
        metavar="ORG_ID",
        help="put every runner in this org (needed with a runner token)",
    )
    add(
        "--interval",
        type=_argument_type(parse_seconds),
        default=DEFAULT_INTERVAL,
        metavar="S",
        help="seconds between a runner's heartbeats, +/-20%%, never sooner than the "
        "service's pollAfterSeconds; a number (0.5) or a duration (500ms, 1m) (default: 30)",
    )
    add(
        "--duration",
        type=_argument_type(parse_seconds),
        metavar="S",
        help="stop after this long, in the same form as --interval (default: until Ctrl-C)",
    )
    add(
        "--fail-rate",
        action=_MapAction,
        parse=parse_rate,
        default={},
        metavar="BUILD=RATE",
        help=f"probability that a session on BUILD fails, 0 to 1; repeat for more builds; "
        f"BUILD * for every build not named (default: {DEFAULT_FAIL_RATE})",
    )
    add(
        "--disconnect-rate",
        action=_MapAction,
        parse=parse_rate,
        default={},
        metavar="BUILD=RATE",
        help=f"probability that a session on BUILD disconnects, as --fail-rate "
        f"(default: {DEFAULT_DISCONNECT_RATE})",
    )
    add(
        "--seed",
        type=int,
        help="make the runners' choices reproducible (default: random, printed in the summary)",
    )
    add(
        "--start-build",
        type=_argument_type(parse_build_id),
        default=DEFAULT_BUILD,
        metavar="BUILD",
        help=f"the build every runner runs at first (default: {DEFAULT_BUILD})",
    )
    add(
        "--sessions",
        type=_argument_type(parse_mean),
        default=DEFAULT_SESSIONS,
        metavar="MEAN",
        help="mean sessions a runner starts per interval, Poisson-distributed "
        f"(default: {DEFAULT_SESSIONS:g})",
    )
    add(
        "--restart-rate",
        type=_argument_type(parse_probability),
        default=DEFAULT_RESTART_RATE,
        metavar="P",
        help="probability per interval that a runner restarts by itself "
        f"(default: {DEFAULT_RESTART_RATE})",
    )
    add(
        "--runtime",
        action=_MapAction,
        parse=parse_pair,
        default=None,
        metavar="PROVIDER=VERSION",
        help="a runtime version every runner reports; repeat for more (default: the "
        "runtimeVersions of the runner's build, from GET /builds/{id}, when the token "
        "may read it; else none)",
    )
    add(
        "--connections",
        type=_argument_type(parse_count),
        default=DEFAULT_CONNECTIONS,
        metavar="N",
        help=f"most requests in flight at once (default: {DEFAULT_CONNECTIONS})",
    )


def options_from_args(args: argparse.Namespace) -> SimulatorOptions:
    token = args.token or os.environ.get("UPDATE_PIPELINE_TOKEN", "").strip()
    if not token:
        raise SimulatorError(
            "give a token: --token, or the environment variable UPDATE_PIPELINE_TOKEN"
        )
    if args.org_id is not None and args.orgs is not None and args.orgs > 1:
        raise SimulatorError("--org-id puts every runner in one org; it cannot go with --orgs > 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    return SimulatorOptions(
        url=args.url,
        token=token,
        runners=args.runners,
        orgs=args.orgs or 1,
        interval=args.interval,
        duration=args.duration,
        seed=seed,
        start_build=args.start_build,
        org_id=args.org_id,
        model=SessionModel(
            mean_sessions=args.sessions,
            fail_rates=dict(args.fail_rate),
            disconnect_rates=dict(args.disconnect_rate),
            restart_rate=args.restart_rate,
        ),
        runtimes=args.runtime,
        connections=args.connections,
    )


async def simulate(
    options: SimulatorOptions,
    *,
    out: TextIO | None = None,
    display: ProgressDisplay | None = None,
    handle_signals: bool = True,
) -> SimulationReport:
    """The command: run with a progress line on stderr until the duration ends or
    SIGINT/SIGTERM, then print the summary (to stdout)."""
    simulator = Simulator(options, display=display or ProgressDisplay())
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, simulator.stop)
                handled.append(sig)
    try:
        report = await simulator.run()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    stream = sys.stdout if out is None else out
    for line in summary_lines(report):
        print(line, file=stream)
    stream.flush()
    return report
