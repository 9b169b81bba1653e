"""The fleet simulator: its pure core, its loop against a real local server, and the
simulate command's arguments."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.__main__ import main
from app.fleet.simulator import (
    Answer,
    BadAnswer,
    ProgressDisplay,
    Runner,
    SessionDraw,
    SessionModel,
    SimulatedRunner,
    SimulationReport,
    Simulator,
    SimulatorError,
    SimulatorOptions,
    Tick,
    fleet_shares,
    make_fleet,
    next_delay,
    parse_answer,
    parse_rate,
    progress_line,
    simulate,
    summary_lines,
)

PREFIX = "/api/update-pipeline"
TOKEN = "upt_simulator-test-token-0123456789"
OWN_VARIABLES = ("UPDATE_PIPELINE_", "GITHUB_")

# -- the pure core ----------------------------------------------------------------------


def runner_sim(model: SessionModel | None = None, seed: int = 1) -> SimulatedRunner:
    rng = random.Random(seed)
    return SimulatedRunner(
        Runner("r-0001", "org-0001", "build-a", "b-first"), model or SessionModel(), rng
    )


def sessions(body: dict[str, Any]) -> tuple[int, int, int]:
    s = body["sessions"]
    return s["started"], s["failed"], s["disconnected"]


def test_counters_are_cumulative_within_a_boot() -> None:
    sim = runner_sim(
        SessionModel(fail_rates={"*": 0.3}, disconnect_rates={"*": 0.2}, restart_rate=0)
    )
    total = [0, 0, 0]
    previous = (0, 0, 0)
    for _ in range(50):
        tick = sim.tick()
        assert not tick.restarted
        total = [
            total[0] + tick.draw.started,
            total[1] + tick.draw.failed,
            total[2] + tick.draw.disconnected,
        ]
        body = sim.heartbeat()
        assert sessions(body) == tuple(total)
        assert all(now >= before for now, before in zip(sessions(body), previous, strict=True))
        assert tick.draw.failed <= tick.draw.started and tick.draw.disconnected <= tick.draw.started
        previous = sessions(body)
        assert body["bootId"] == "b-first"
    assert total[0] > 100 and total[1] > 0 and total[2] > 0


def test_the_heartbeat_body_has_the_endpoints_fields_only() -> None:
    sim = runner_sim()
    sim.runner.add(SessionDraw(7, 2, 1))

    body = sim.heartbeat({"claude_code": "2.1.0"})

    assert body == {
        "runnerId": "r-0001",
        "orgId": "org-0001",
        "bootId": "b-first",
        "buildId": "build-a",
        "runtimes": {"claude_code": "2.1.0"},
        "sessions": {"started": 7, "failed": 2, "disconnected": 1},
    }


def test_a_restart_resets_the_counters_under_a_new_boot_id() -> None:
    sim = runner_sim(SessionModel(restart_rate=0))
    for _ in range(3):
        sim.tick()
    assert sim.runner.started > 0

    sim.runner.restart("b-second")
    assert (sim.runner.boot_id, sessions(sim.heartbeat()), sim.runner.boots) == (
        "b-second",
        (0, 0, 0),
        2,
    )
    assert sim.runner.build_id == "build-a"
    with pytest.raises(ValueError, match="new boot id"):
        sim.runner.restart("b-second")


def test_random_restarts_start_each_boot_from_its_own_sessions() -> None:
    sim = runner_sim(SessionModel(restart_rate=1.0))  # a restart every interval
    boots = set()
    for _ in range(20):
        tick = sim.tick()
        assert tick.restarted
        assert sessions(sim.heartbeat()) == (
            tick.draw.started,
            tick.draw.failed,
            tick.draw.disconnected,
        )
        boots.add(sim.runner.boot_id)
    assert len(boots) == 20 and sim.runner.boots == 21


def test_it_obeys_the_desired_build() -> None:
    sim = runner_sim()
    sim.tick()
    first_boot = sim.runner.boot_id

    assert sim.apply(Answer(None, "stable", None, 30.0)) is None
    assert sim.apply(Answer("build-a", "stable", None, 30.0)) is None  # already on it
    assert sim.runner.boot_id == first_boot and sim.runner.started > 0

    assert sim.apply(Answer("build-b", "beta", "ro-1", 45.0)) == "build-a"
    runner = sim.runner
    assert (runner.build_id, runner.channel, runner.rollout_id, runner.poll_after) == (
        "build-b",
        "beta",
        "ro-1",
        45.0,
    )
    assert runner.boot_id != first_boot and sessions(sim.heartbeat()) == (0, 0, 0)
    assert sim.heartbeat()["buildId"] == "build-b"


def test_failure_and_disconnect_rates_are_honoured_per_build_over_many_draws() -> None:
    model = SessionModel(
        mean_sessions=5,
        fail_rates={"build-bad": 0.2},
        disconnect_rates={"build-bad": 0.1, "*": 0.02},
    )
    rng = random.Random(42)
    for build, fail, disconnect in [("build-bad", 0.2, 0.1), ("build-ok", 0.01, 0.02)]:
        draws = [model.draw(build, rng) for _ in range(20_000)]
        started = sum(d.started for d in draws)
        assert started / len(draws) == pytest.approx(5, rel=0.03)
        assert sum(d.failed for d in draws) / started == pytest.approx(fail, rel=0.1)
        assert sum(d.disconnected for d in draws) / started == pytest.approx(disconnect, rel=0.1)
    assert model.disconnect_rate("anything") == 0.02 and model.fail_rate("anything") == 0.01


def test_random_restarts_happen_at_the_given_rate() -> None:
    sim = runner_sim(SessionModel(restart_rate=0.05), seed=3)
    restarts = sum(sim.tick().restarted for _ in range(10_000))
    assert restarts == pytest.approx(500, rel=0.15)


def test_the_next_heartbeat_is_jittered_and_never_sooner_than_the_server_asks() -> None:
    rng = random.Random(5)
    plain = [next_delay(10, None, rng) for _ in range(2000)]
    assert 8 <= min(plain) < 8.2 and 11.8 < max(plain) <= 12
    slower = [next_delay(10, 30, rng) for _ in range(2000)]
    assert min(slower) >= 30 and max(slower) <= 36
    close = [next_delay(10, 10.5, rng) for _ in range(2000)]
    assert min(close) >= 10.5


def test_the_fleet_is_spread_over_orgs_the_same_way_for_the_same_seed() -> None:
    fleet = make_fleet(10, 3, seed=7, model=SessionModel())
    again = make_fleet(10, 3, seed=7, model=SessionModel())
    other = make_fleet(10, 3, seed=8, model=SessionModel())

    ids = [(s.runner.runner_id, s.runner.org_id, s.runner.boot_id) for s in fleet]
    assert ids == [(s.runner.runner_id, s.runner.org_id, s.runner.boot_id) for s in again]
    assert ids != [(s.runner.runner_id, s.runner.org_id, s.runner.boot_id) for s in other]
    assert [i[0] for i in ids] == [f"r-{n:04d}" for n in range(1, 11)]
    assert sorted(Counter(i[1] for i in ids).values()) == [3, 3, 4]
    assert {s.runner.build_id for s in fleet} == {"build-initial"}
    assert len({i[2] for i in ids}) == 10

    forced = make_fleet(5, 1, seed=1, model=SessionModel(), org_id="acme", start_build="b-9")
    assert {(s.runner.org_id, s.runner.build_id) for s in forced} == {("acme", "b-9")}


def test_answers_are_read_leniently_but_wrong_types_are_refused() -> None:
    answer = parse_answer(
        {
            "desiredBuildId": "build-x",
            "channel": "beta",
            "rolloutId": None,
            "pollAfterSeconds": 30,
            "warnings": ["w"],
            "extra": 1,
        }
    )
    assert answer == Answer("build-x", "beta", None, 30.0, ("w",))
    assert parse_answer({}) == Answer(None)
    for bad in [
        [],
        {"desiredBuildId": 3},
        {"desiredBuildId": ""},
        {"pollAfterSeconds": -1},
        {"pollAfterSeconds": True},
        {"warnings": "x"},
    ]:
        with pytest.raises(BadAnswer):
            parse_answer(bad)


def test_the_progress_line_shows_the_top_three_builds_and_the_summary_all() -> None:
    report = SimulationReport(runners=10, orgs=2, seed=1, elapsed=12)
    for build, started, failed in [
        ("b-1", 100, 1),
        ("b-2", 100, 10),
        ("b-3", 50, 0),
        ("b-4", 10, 0),
    ]:
        report.record(build, Tick(SessionDraw(started, failed, 0), False), 2.0)
    report.heartbeats.sent, report.heartbeats.ok, report.heartbeats.failed = 40, 38, 2
    runners = [
        Runner(f"r-{i}", "o", b, "x")
        for i, b in enumerate(["b-2"] * 5 + ["b-1"] * 3 + ["b-3", "b-4"])
    ]
    shares = fleet_shares(runners)
    assert list(shares) == ["b-2", "b-1", "b-3", "b-4"]

    line = progress_line(report, shares)

    assert "\n" not in line
    assert line.startswith("0:12 hb 40 sent 38 ok 2 failed")
    assert "b-2 50% 10.0 sess/s fail 10.0%" in line and "b-1 30%" in line and "b-3 10%" in line
    assert "b-4" not in line and line.endswith("+1 more")

    report.fleet = shares
    summary = "\n".join(summary_lines(report))
    assert "simulated 10 runners in 2 orgs for 12.0s (seed 1)" in summary
    assert "b-4" in summary and "fail 10.00%" in summary


def test_the_display_rewrites_one_line_on_a_terminal_and_prints_lines_elsewhere() -> None:
    class Stream:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    tty, pipe = Stream(), Stream()
    on_tty = ProgressDisplay(tty, tty=True)  # type: ignore[arg-type]
    piped = ProgressDisplay(pipe, tty=False)  # type: ignore[arg-type]
    assert (on_tty.every, piped.every) == (1.0, 5.0)
    for display in (on_tty, piped):
        display.show("one")
        display.show("two")
        display.clear()
    assert tty.text == "\rone\x1b[K\rtwo\x1b[K\r\x1b[K"
    assert pipe.text == "one\ntwo\n"


# -- the loop, against a real local server ----------------------------------------------


class FakeService:
    """A minimal heartbeat endpoint: records each accepted body and, once ``switch_after``
    heartbeats were accepted, asks every runner for ``new_build``."""

    def __init__(
        self,
        *,
        switch_after: int | None = None,
        new_build: str = "build-next",
        status_status: int = 404,
        fail_first: int = 0,
        reject: Callable[[dict[str, Any]], bool] = lambda body: False,
        builds: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.switch_after = switch_after
        self.new_build = new_build
        self.status_status = status_status
        self.fail_first = fail_first
        self.reject = reject
        self.builds = builds or {}
        self.bodies: list[dict[str, Any]] = []
        self.failed_bodies: list[dict[str, Any]] = []
        self.attempts: Counter[str] = Counter()
        self.auth: set[str | None] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(PREFIX + "/heartbeat", self.heartbeat)
        app.router.add_get(PREFIX + "/status", self.status)
        app.router.add_get(PREFIX + "/builds/{buildId}", self.build)
        return app

    @staticmethod
    def error(status: int, code: str) -> web.Response:
        return web.json_response(
            {"error": {"code": code, "message": f"test {code}"}}, status=status
        )

    async def status(self, request: web.Request) -> web.Response:
        if self.status_status != 200:
            return self.error(self.status_status, "NOPE")
        return web.json_response({"running": True})

    async def build(self, request: web.Request) -> web.Response:
        versions = self.builds.get(request.match_info["buildId"])
        if versions is None:
            return self.error(404, "NOT_FOUND")
        return web.json_response(
            {"buildId": request.match_info["buildId"], "runtimeVersions": versions}
        )

    async def heartbeat(self, request: web.Request) -> web.Response:
        self.auth.add(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.error(401, "UNAUTHORIZED")
        body = await request.json()
        self.attempts[body["runnerId"]] += 1
        if self.attempts[body["runnerId"]] <= self.fail_first:
            self.failed_bodies.append(body)
            return self.error(503, "SERVICE_UNAVAILABLE")
        if self.reject(body):
            return self.error(400, "VALIDATION_FAILED")
        self.bodies.append(body)
        switched = self.switch_after is not None and len(self.bodies) > self.switch_after
        return web.json_response(
            {
                "desiredBuildId": self.new_build if switched else None,
                "channel": "stable",
                "rolloutId": "ro-1" if switched else None,
                "pollAfterSeconds": 0,
                "warnings": [],
            }
        )


Serve = Callable[[FakeService], Awaitable[str]]


@pytest.fixture
async def serve() -> Any:
    servers: list[TestServer] = []

    async def start(service: FakeService) -> str:
        server = TestServer(service.app())
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def options(url: str, **overrides: Any) -> SimulatorOptions:
    base = SimulatorOptions(
        url=url,
        token=TOKEN,
        runners=12,
        orgs=3,
        interval=0.02,
        duration=0.5,
        seed=11,
        model=SessionModel(restart_rate=0),
        retry_base=0.005,
    )
    return replace(base, **overrides)


def by_boot(bodies: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """runnerId -> bootId -> bodies, in the order received (boots in order too)."""
    runners: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    for body in bodies:
        runners[body["runnerId"]].setdefault(body["bootId"], []).append(body)
    return runners


async def test_runners_switch_builds_midway_with_cumulative_counters_per_boot(serve: Serve) -> None:
    service = FakeService(switch_after=60, builds={"build-initial": {"claude_code": "2.1.0"}})
    url = await serve(service)
    simulator = Simulator(options(url))

    started = time.monotonic()
    report = await simulator.run()
    took = time.monotonic() - started

    # --duration stops it, and nothing is sent afterwards.
    assert 0.5 <= took < 1.5
    count = len(service.bodies)
    await asyncio.sleep(0.1)
    assert len(service.bodies) == count

    runners = by_boot(service.bodies)
    assert sorted(runners) == [f"r-{i:04d}" for i in range(1, 13)]
    assert {b["orgId"] for b in service.bodies} == {"org-0001", "org-0002", "org-0003"}
    assert service.auth == {f"Bearer {TOKEN}"}
    for runner_id, boots in runners.items():
        # one boot on the first build, then a restart onto the new one
        assert len(boots) == 2, runner_id
        old_bodies, new_bodies = boots.values()
        assert {b["buildId"] for b in old_bodies} == {"build-initial"}
        assert {b["buildId"] for b in new_bodies} == {"build-next"}
        assert {str(b["runtimes"]) for b in old_bodies} == {"{'claude_code': '2.1.0'}"}
        assert {str(b["runtimes"]) for b in new_bodies} == {"{}"}  # the server knows no such build
        for bodies in (old_bodies, new_bodies):
            counters = [sessions(b) for b in bodies]
            for before, after in itertools.pairwise(counters):
                assert all(a >= b for a, b in zip(after, before, strict=True)), (
                    runner_id,
                    counters,
                )
    assert report.fleet == {"build-next": 12}
    assert report.switches == Counter({("build-initial", "build-next"): 12})
    # heartbeats in flight at the end were answered before it returned
    hb = report.heartbeats
    assert hb.ok == len(service.bodies) == hb.sent and hb.failed == hb.in_flight == 0
    assert report.builds["build-next"].started > 0 and report.succeeded
    assert [r.runner.build_id for r in simulator.fleet] == ["build-next"] * 12


async def test_server_errors_are_retried_with_the_same_body_and_4xx_are_counted(
    serve: Serve,
) -> None:
    service = FakeService(fail_first=2, reject=lambda body: body["runnerId"] == "r-0002")
    url = await serve(service)

    report = await Simulator(options(url, runners=4, duration=0.3)).run()

    hb = report.heartbeats
    assert hb.server_errors == 8 and hb.retries >= 8 and hb.given_up == 0
    assert hb.rejected[400] > 0 and hb.ok == len(service.bodies) > 0
    assert hb.sent == hb.ok + hb.failed + hb.in_flight
    assert "r-0002" not in {b["runnerId"] for b in service.bodies}
    # the first accepted heartbeat of each runner is the one that failed twice before it
    for runner_id in ("r-0001", "r-0003", "r-0004"):
        failed = [b for b in service.failed_bodies if b["runnerId"] == runner_id]
        accepted = next(b for b in service.bodies if b["runnerId"] == runner_id)
        assert failed == [accepted, accepted]


async def test_an_unreachable_service_is_retried_and_nothing_succeeds(unused_tcp_port: int) -> None:
    report = await Simulator(
        options(f"http://127.0.0.1:{unused_tcp_port}", runners=3, duration=0.2, max_attempts=3)
    ).run()

    hb = report.heartbeats
    assert not report.succeeded and hb.ok == 0
    assert hb.connection_errors > 0 and hb.retries > 0 and hb.given_up > 0


async def test_a_runner_token_needs_an_org_and_then_every_runner_reports_for_it(
    serve: Serve,
) -> None:
    service = FakeService(status_status=403)
    url = await serve(service)

    with pytest.raises(SimulatorError, match="--org-id"):
        await Simulator(options(url)).run()
    assert service.bodies == []

    report = await Simulator(options(url, org_id="org-acme", duration=0.2)).run()
    assert report.succeeded and report.orgs == 1
    assert {b["orgId"] for b in service.bodies} == {"org-acme"}


async def test_a_refused_token_stops_before_any_heartbeat(serve: Serve) -> None:
    service = FakeService(status_status=401)
    url = await serve(service)

    with pytest.raises(SimulatorError, match="refused the token: NOPE"):
        await Simulator(options(url)).run()


async def test_given_runtimes_are_reported_and_the_stop_method_ends_a_run_without_duration(
    serve: Serve,
) -> None:
    service = FakeService()
    url = await serve(service)
    simulator = Simulator(options(url, runners=2, duration=None, runtimes={"codex": "0.46.0"}))

    task = asyncio.create_task(simulator.run())
    await asyncio.sleep(0.2)
    simulator.stop()
    report = await asyncio.wait_for(task, 1)

    assert report.succeeded and 0.15 <= report.elapsed < 0.6
    assert {str(b["runtimes"]) for b in service.bodies} == {"{'codex': '0.46.0'}"}


# -- the command --------------------------------------------------------------------------


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    """main() reads the process environment and reconfigures logging: contain both."""
    for name in list(os.environ):
        if name.startswith(OWN_VARIABLES):
            monkeypatch.delenv(name)


@contextmanager
def serving_in_a_thread(service: FakeService) -> Iterator[str]:
    """The fake service on its own loop, for main(), which runs its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(service.app(), access_log=None)  # its lines would race ours
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def simulate_args(url: str, *extra: str) -> list[str]:
    return [
        "simulate",
        "--url",
        url,
        "--token",
        TOKEN,
        "--runners",
        "5",
        "--interval",
        "20ms",
        "--duration",
        "0.3",
        "--seed",
        "3",
        *extra,
    ]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--fail-rate", "build-a"], "--fail-rate: 'build-a' is not BUILD=RATE"),
        (["--fail-rate", "build-a=lots"], "--fail-rate: 'build-a=lots' is not BUILD=RATE"),
        (["--fail-rate", "build-a=1.5"], "RATE from 0 to 1"),
        (["--fail-rate", "=0.1"], "is not BUILD=RATE"),
        (
            ["--disconnect-rate", "b=0.1", "--disconnect-rate", "b=0.2"],
            "--disconnect-rate: 'b' is given twice",
        ),
        (["--interval", "soon"], "--interval: 'soon' is neither a number of seconds"),
        (["--duration", "0"], "--duration: '0' is not more than 0 seconds"),
        (["--runners", "0"], "--runners: '0' is less than 1"),
        (["--url", "ftp://x"], "--url: 'ftp://x' is not an http(s) address"),
        (["--runtime", "codex"], "is not PROVIDER=VERSION"),
    ],
)
def test_bad_flags_are_usage_errors_that_say_what_is_wrong(
    isolated: None, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(simulate_args("http://127.0.0.1:1", *flags))

    assert exited.value.code == 2
    assert expected in capsys.readouterr().err


def test_rates_parse_and_star_means_every_other_build() -> None:
    assert parse_rate("build-abc123=0.05") == ("build-abc123", 0.05)
    assert parse_rate("*=1") == ("*", 1.0)
    with pytest.raises(ValueError, match="BUILD=RATE"):
        parse_rate("build=nan")


def test_org_id_with_many_orgs_exits_1_with_one_line(
    isolated: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(simulate_args("http://127.0.0.1:1", "--org-id", "acme", "--orgs", "3")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("update-pipeline: error: --org-id puts every runner in one org")


def test_the_command_simulates_and_prints_a_summary(
    isolated: None, capsys: pytest.CaptureFixture[str]
) -> None:
    service = FakeService(switch_after=20)
    with serving_in_a_thread(service) as url:
        code = main(
            simulate_args(
                url, "--orgs", "2", "--fail-rate", "build-next=0.5", "--restart-rate", "0"
            )
        )

    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("simulated 5 runners in 2 orgs for 0.3s (seed 3)\n")
    assert "build-initial -> build-next: 5" in out
    assert {b["orgId"] for b in service.bodies} == {"org-0001", "org-0002"}


def test_the_command_exits_1_when_no_heartbeat_succeeds(
    isolated: None, capsys: pytest.CaptureFixture[str]
) -> None:
    service = FakeService(reject=lambda body: True)
    with serving_in_a_thread(service) as url:
        code = main(simulate_args(url))

    captured = capsys.readouterr()
    assert code == 1
    assert "0 ok" in captured.out and "400: " in captured.out
    assert captured.err.strip().splitlines()[-1] == "update-pipeline: error: no heartbeat succeeded"
    assert "heartbeat of r-" in captured.err and "VALIDATION_FAILED" in captured.err  # logged once


async def test_simulate_prints_the_summary_to_the_given_stream(serve: Serve) -> None:
    service = FakeService()
    url = await serve(service)

    class Out:
        text = ""

        def write(self, text: str) -> None:
            Out.text += text

        def flush(self) -> None:
            pass

    report = await simulate(
        options(url, runners=2, duration=0.1),
        out=Out(),  # type: ignore[arg-type]
        display=ProgressDisplay(Out(), tty=False),  # type: ignore[arg-type]
        handle_signals=False,
    )
    assert report.succeeded and Out.text.startswith("simulated 2 runners in 2 orgs")


def test_the_token_can_come_from_the_environment_and_one_is_required(
    isolated: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def without_token(url: str) -> list[str]:
        args = simulate_args(url)
        return [*args[:3], *args[5:]]

    assert main(without_token("http://127.0.0.1:1")) == 1
    assert "UPDATE_PIPELINE_TOKEN" in capsys.readouterr().err

    service = FakeService()
    monkeypatch.setenv("UPDATE_PIPELINE_TOKEN", TOKEN)
    with serving_in_a_thread(service) as url:
        code = main(without_token(url))
    assert code == 0
    assert service.bodies
