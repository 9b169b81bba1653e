"""Crash consistency of the whole rollout pipeline: the real ``update-pipeline serve``,
killed with SIGKILL at random moments and started again each time, while a fleet
heartbeats it, people comment on the control repository and steer rollouts with slash
commands on their tracking issues, and stages advance and roll back on seconds-long
plans, against the fake GitHub.

The promises checked at the end, against what the clients were told and what GitHub
recorded (tests/crash_harness.py has each check):

* every heartbeat answered 2xx is counted in the stored session counts, exactly once,
  in the rollout its answer named, and no stage was judged on more than it stored;
* every webhook delivery answered 2xx is stored once and completed once; each command
  acted at most once and was answered once, its reactions matching what it did;
* no rollout skipped a stage or advanced out of one twice, every change is in its
  history, and no deadline moved except as its history says (a pause keeps what was left);
* every outbox entry reached GitHub, in the order written per issue; no issue or comment
  was made twice (delivery is at least once, and a repeated create looks first); each
  rollout has one issue, one comment per transition, and the labels, state and body of
  its final state, a body being sent again only when it changed;
* ``PRAGMA integrity_check`` is ``ok`` after every kill and at the end, and no run of the
  service logged an error (a background task that died would otherwise be hidden by the
  next kill).

Kills are aimed, each at what there is to hit at the moment: anywhere; a heartbeat in
flight (its group commit about to begin, open, or committed and not yet answered); a
stage's deadline (an advance being made); a write GitHub is in the middle of (GitHub is
slowed so the window is wide, and the fake finishes the request after its caller died,
as GitHub would); a rollback coming (a bad build's stage filling up, or ``/rollback`` on
its way). Each kill is then classed by what it interrupted, as the database and GitHub
show, and the counts are printed with the other figures.

GitHub's writes are the scarce resource: the App spaces them about a second apart, as
GitHub asks, and a dead process writes nothing. So rollouts start through the API, an
operator pauses and resumes through it too, few commands are typed (each costs three
writes: 👀, a reply, 🚀), and the bulk of the webhook traffic is plain comments, which
are stored and processed but answered by no one.

The schedule comes from a seed: ``UPDATE_PIPELINE_CRASH_SEED`` (fixed by default, so
CI is reproducible) and ``UPDATE_PIPELINE_CRASH_KILLS`` (20 by default, about a minute
on an idle machine). A longer run, which gets through many more rollouts::

    UPDATE_PIPELINE_CRASH_KILLS=200 UPDATE_PIPELINE_CRASH_SEED=$RANDOM \\
        pytest tests/test_crash_rollout.py -s -k killed_at_random

A failure prints the seed, the figures, and where the service's logs and GitHub's
request log are; rerun with the same seed to replay the same schedule (timings still vary
with the machine, so a rare interleaving may take a few runs). The tests at the end pin
down, without a crash, what the first runs of this harness found.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.github.outbox import add_comment, created_issue_target, edit_issue, open_issue
from app.store import (
    BuildRecord,
    Delivery,
    Effect,
    NewEffect,
    Rollout,
    RolloutChange,
    SqliteStore,
    TrackingIssue,
)
from tests.conftest import START
from tests.crash_harness import (
    CLIENT_TIMEOUT,
    RETRY_PAUSE,
    TERMINAL,
    Commenter,
    Fleet,
    Observed,
    Said,
    bodies_current,
    command_problems,
    delivery_problems,
    effects,
    heartbeat_problems,
    integrity,
    logged_errors,
    observe_rollouts,
    outbox_problems,
    pending,
    query,
    rollout_problems,
    tracking_problems,
    until,
    when,
    write_requests,
)
from tests.fake_github import FakeGitHub
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock are POSIX-only")

SEED = int(os.environ.get("UPDATE_PIPELINE_CRASH_SEED", "20261127"))
KILLS = int(os.environ.get("UPDATE_PIPELINE_CRASH_KILLS", "20"))

CONTROL = "acme/control"
PERSON = "octocat"
ORGS, RUNNERS_PER_ORG = 8, 2
# Seconds-long stages, so that advances (and the deadlines a restart must keep) come
# often; 20 sessions make a stage's verdict in a second or two of heartbeats.
PLAN = "20%:2s,50%:2s,100%"
MIN_SESSIONS = 20
# Every change GitHub is asked for takes this long, so a kill often lands while GitHub
# holds a request: it completes it, and the service never hears the answer.
GITHUB_LATENCY = 0.2
# Rollout kinds in the order the scenario runs them, round and round.
KINDS = ("bad", "pulled", "steered", "good")
BACKLOG = 8  # outbox entries still to apply when the next rollout may start
WAIT = 60.0  # for any one thing, generous: the machine may be busy with other tests
STALLED = 30.0  # a rollout still live after this long is rolled back by hand


@dataclass
class Figures:
    kills: int = 0
    aims: Counter[str] = field(default_factory=Counter)
    interrupted: Counter[str] = field(default_factory=Counter)
    restarts: list[float] = field(default_factory=list)  # seconds from kill to healthy
    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)  # name -> seconds

    def phase(self, name: str) -> None:
        """The phase that has just ended, timed from the end of the one before."""
        self.phases[name] = time.monotonic() - self.started - sum(self.phases.values())


class Scenario:
    """Rollouts one after the other on the stable channel, each of a kind:

    * ``bad``: paused and resumed by an operator through the API as soon as it starts
      (its stage's clock stopped and restarted), then rolled back by the gates as the
      fleet's failures come in;
    * ``pulled``: runs through to completion, then someone rolls it back with
      ``/rollback`` on its issue (a rollback after completion reopens the issue);
    * ``steered``: paused through the API as it starts, then ``/resume`` and ``/advance``
      on its issue;
    * ``good``: runs through.

    The first two make a CI run (GitHub's writes are the scarce resource); longer runs
    cycle through all four. At ``last_call`` no new rollout starts; at ``finish`` the
    scenario stops, leaving a live rollout as it is."""

    def __init__(
        self,
        service: ServiceProcess,
        api: aiohttp.ClientSession,
        github: FakeGitHub,
        commenter: Commenter,
        builds: list[str],
        rng: random.Random,
        context: Callable[[], str],
    ) -> None:
        self.service = service
        self.api = api
        self.github = github
        self.commenter = commenter
        self.builds = builds
        self.rng = rng
        self.context = context
        self.last_call = asyncio.Event()
        self.finish = asyncio.Event()
        self.rollback_coming = False
        self.control_issue = github.add_issue(CONTROL, "Rollouts")

    @property
    def db(self) -> Path:
        return self.service.db

    def rollout(self, build: str) -> Any:
        rows = query(
            self.db,
            "SELECT rollout_id, state, stage FROM active_rollouts WHERE target_build_id = ?",
            (build,),
        )
        return rows[0] if rows else None

    def tracking_issue(self, build: str) -> int | None:
        title = f"Rollout {build} → stable"
        found = [n for n, i in self.github.repo(CONTROL).issues.items() if i["title"] == title]
        return found[0] if found else None

    async def say(self, issue: int, line: str) -> Said:
        return await self.commenter.say(issue, line, timeout=WAIT)

    async def processed(self, said: Said) -> None:
        await until(
            lambda: self.commenter.processed(self.db, said), WAIT, f"{said} processed", self.context
        )

    async def chatter(self, rng: random.Random) -> None:
        """People talking on the control repository: deliveries that change nothing."""
        for n in itertools.count(1):
            if self.finish.is_set():
                return
            await self.say(self.control_issue, f"Looks fine from here ({n}).")
            await asyncio.sleep(rng.uniform(0.2, 0.6))

    async def run(self) -> None:
        for build, kind in zip(self.builds, itertools.cycle(KINDS), strict=False):
            # GitHub takes about a write a second and a rollout makes a dozen or two: the
            # next one starts once the last one's are mostly out, so that the backlog,
            # and the wait for it at the end, stay short.
            while pending(self.db)[1] > BACKLOG and not self.last_call.is_set():
                await asyncio.sleep(0.1)
            if self.last_call.is_set():
                return
            self.rollback_coming = kind == "bad"
            await self.one(build, kind)
            self.rollback_coming = False
        raise AssertionError(f"the scenario ran out of builds ({len(self.builds)}); add more")

    async def one(self, build: str, kind: str) -> None:
        await self.start(build)
        if kind in ("bad", "steered"):
            await self.act(build, "pause", {"reason": "holding a moment"})
        if kind == "bad":
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            await self.act(build, "resume")
        # GitHub's writes lag behind the rollout's changes, the more so while the service
        # keeps dying: its issue may take a while (that it comes is checked at the end).
        while (issue := self.tracking_issue(build)) is None:
            if self.finish.is_set():
                return
            await asyncio.sleep(0.1)
        if kind == "steered":
            # Held until its issue is there, then moved on from it.
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            await self.processed(await self.say(issue, "/resume"))
            await self.say(issue, "/advance")
        if not await self.ended(build, issue):
            return
        if kind == "pulled" and self.rollout(build)["state"] == "completed":
            self.rollback_coming = True
            await self.processed(await self.say(issue, "/rollback pulled by hand"))

    async def ended(self, build: str, issue: int) -> bool:
        """Wait for the rollout to end; False when told to finish first."""
        started = time.monotonic()
        pulled = False
        while (state := self.rollout(build)["state"]) not in TERMINAL:
            if self.finish.is_set():
                return False
            if not pulled and time.monotonic() - started > STALLED:
                # Stuck, say on a gate held by one org's data: end it by hand.
                self.rollback_coming = pulled = True
                await self.say(issue, "/rollback stalled")
            elif state == "paused" and not pulled:
                await self.act(build, "resume")
            await asyncio.sleep(0.1)
            if time.monotonic() - started > STALLED + WAIT:
                raise AssertionError(f"rollout of {build} never ended; {self.context()}")
        return True

    async def start(self, build: str) -> None:
        """``POST /rollouts``, sent again while unanswered unless the rollout exists: an
        answer lost to a kill may have been a start."""
        while not self.rollout(build):
            status = await self._post("/rollouts", {"buildId": build, "channel": "stable"})
            if status == 409 and not self.rollout(build):
                raise AssertionError(f"the rollout of {build} was refused; {self.context()}")
            if status is None:
                await asyncio.sleep(RETRY_PAUSE)

    async def act(self, build: str, action: str, body: dict[str, Any] | None = None) -> None:
        """``POST /rollouts/{id}/{action}``, sent again while unanswered: a 409 (the
        rollout is no longer in a state for it) may be a lost answer's success."""
        rollout_id = self.rollout(build)["rollout_id"]
        while await self._post(f"/rollouts/{rollout_id}/{action}", body or {}) is None:
            await asyncio.sleep(RETRY_PAUSE)

    async def _post(self, path: str, body: dict[str, Any]) -> int | None:
        """The answer's status: 2xx or 409; None for no answer (or a 5xx)."""
        try:
            async with self.api.post(self.service.api_url(path), json=body) as response:
                if response.status >= 500:
                    return None
                assert response.status < 300 or response.status == 409, (
                    path,
                    response.status,
                    await response.text(),
                )
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return None


class Killer:
    """Chooses each kill's moment from the seed, kills, looks at what the crash left,
    and starts the service again."""

    def __init__(
        self,
        service: ServiceProcess,
        github: FakeGitHub,
        fleet: Fleet,
        scenario: Scenario,
        rng: random.Random,
        figures: Figures,
    ) -> None:
        self.service = service
        self.github = github
        self.fleet = fleet
        self.scenario = scenario
        self.rng = rng
        self.figures = figures
        self.observed: list[Observed] = []

    async def aim(self) -> str:
        """Wait for the moment to kill at; what it was aimed at."""
        await asyncio.sleep(self.rng.uniform(0.1, 0.3))  # let the new process get going
        # Aim at what is there to hit now: a deadline coming, a rollback coming, side
        # effects waiting; heartbeats and deliveries are always going.
        deadline = self._next_deadline()
        aims = {"anywhere": 1, "heartbeat commit": 1}
        if deadline is not None and 0 < deadline < 3:
            aims["stage deadline"] = 3
        if self.scenario.rollback_coming:
            aims["rollback"] = 3
        if pending(self.service.db)[1]:
            aims["GitHub call"] = 1
        (aim,) = self.rng.choices(list(aims), weights=list(aims.values()))
        if aim == "heartbeat commit":
            # Heartbeats are answered after their group commit: one in flight is a
            # transaction about to begin, open, or just committed and not yet answered.
            if await self._soon(lambda: self.fleet.in_flight > 0, timeout=1.0):
                return aim
        elif aim == "stage deadline" and deadline is not None:
            await asyncio.sleep(deadline + self.rng.uniform(0.0, 0.3))
            return aim
        elif aim == "GitHub call":
            if await self._soon(self._github_holding, timeout=2.0):
                await asyncio.sleep(self.rng.uniform(0.0, GITHUB_LATENCY / 2))
                return aim
        elif aim == "rollback" and self.scenario.rollback_coming:
            await asyncio.sleep(self.rng.uniform(0.05, 0.8))
            return aim
        await asyncio.sleep(self.rng.uniform(0.1, 1.0))
        return "anywhere"

    def _next_deadline(self) -> float | None:
        """Seconds until the next stage deadline of a rollout rolling out."""
        rows = query(
            self.service.db,
            "SELECT min(deadline_at) AS at FROM active_rollouts WHERE state = 'rolling_out'",
        )
        at = when(rows[0]["at"])
        return (at - datetime.now(UTC)).total_seconds() if at is not None else None

    def _github_holding(self) -> bool:
        """Whether GitHub is in the middle of a write the service asked for."""
        return any(
            r.status is None and r.method in ("POST", "PATCH", "DELETE")
            for r in self.github.requests[-10:]
        )

    @staticmethod
    async def _soon(condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    async def kill_once(self) -> None:
        aim = await self.aim()
        heartbeats, holding = self.fleet.in_flight, self._github_holding()
        killed_at = datetime.now(UTC)
        started = time.monotonic()
        await self.service.kill()
        self.figures.kills += 1
        self.figures.aims[aim] += 1
        db = self.service.db
        # The state exactly as the crash left it, before a restart repairs anything.
        problems = integrity(db)
        assert problems == ["ok"], f"after kill {self.figures.kills}: {problems}"
        self.observed += observe_rollouts(db, f"kill {self.figures.kills}")
        self._classify(killed_at, heartbeats, holding)
        await self.service.start()
        self.figures.restarts.append(time.monotonic() - started)
        self.observed += observe_rollouts(db, f"restart {self.figures.kills}")

    def _classify(self, killed_at: datetime, heartbeats: int, holding: bool) -> None:
        """What the kill interrupted, as far as the database (and GitHub) show."""
        db, seen = self.service.db, self.figures.interrupted
        if holding:
            seen["a GitHub write (made, its answer lost)"] += 1
        if query(db, "SELECT 1 FROM outbox WHERE status = 'pending' LIMIT 1"):
            seen["a committed change before its GitHub side effect"] += 1
        if pending(db)[0]:
            seen["deliveries acknowledged, not yet processed"] += 1
        if heartbeats:
            seen["heartbeats in flight (their commit or its answer)"] += 1
        live = query(db, "SELECT deadline_at FROM active_rollouts WHERE state = 'rolling_out'")
        if any((d := when(r["deadline_at"])) and d <= killed_at for r in live):
            seen["a stage advance due"] += 1
        if self._recent("advance", killed_at):
            seen["a stage advance just made"] += 1
        if self.scenario.rollback_coming and live:
            seen["a rollback coming"] += 1
        if self._recent("rollback", killed_at):
            seen["a rollback just made"] += 1

    def _recent(self, action: str, moment: datetime) -> bool:
        rows = query(
            self.service.db, "SELECT max(at) AS at FROM rollout_history WHERE action = ?", (action,)
        )
        at = when(rows[0]["at"])
        return at is not None and 0 <= (moment - at).total_seconds() < 1.0


def admin_token(service: ServiceProcess) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app", "token", "create", "--name", "crash", "--role", "admin"],
        env=service.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


async def call(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Any:
    async with session.request(method, url, **kw) as response:
        body = await response.json()
        assert response.status < 300, (method, url, response.status, body)
        return body


async def known_good(api: aiohttp.ClientSession, service: ServiceProcess, build: str) -> None:
    """Registered, then passed by its canary: the way a build becomes known-good."""
    await call(
        api,
        "POST",
        service.api_url("/builds"),
        json={"buildId": build, "runnerVersion": "1.0.0", "runtimeVersions": {"codex": "0.47.0"}},
    )
    results = [{"name": f"t{n}", "provider": "codex", "status": "passed"} for n in range(20)]
    await call(api, "POST", service.api_url(f"/canary/{build}/results"), json={"results": results})


def tally(db: Path) -> dict[str, int]:
    """The figures a run reports, from the database."""
    actions = Counter(
        (r["action"], r["actor"] == "auto")
        for r in query(db, "SELECT action, actor FROM rollout_history")
    )
    entries = effects(db)
    return {
        "rollouts": actions[("start", False)],
        "advances": actions[("advance", True)] + actions[("advance", False)],
        "advances by hand": actions[("advance", False)],
        "completions": actions[("complete", True)],
        "automatic rollbacks": actions[("rollback", True)],
        "rollbacks by hand": actions[("rollback", False)],
        "pauses": actions[("pause", False)],
        "side effects": len(entries),
        "side effects attempted again": sum(e.attempts > 1 for e in entries),
        "creates found by looking first": sum(bool((e.result or {}).get("found")) for e in entries),
    }


def summary(figures: Figures, fleet: Fleet, commenter: Commenter, db: Path) -> str:
    totals = tally(db) if db.exists() else {}
    restarts = figures.restarts or [0.0]
    return "\n".join(
        [
            f"crash run: seed {SEED} (UPDATE_PIPELINE_CRASH_SEED={SEED}"
            f" UPDATE_PIPELINE_CRASH_KILLS={KILLS}), {figures.kills} kills in"
            f" {time.monotonic() - figures.started:.1f}s (restarts took"
            f" {sum(restarts) / len(restarts):.1f}s on average, {max(restarts):.1f}s at most;"
            + "".join(f" {k} {v:.1f}s," for k, v in figures.phases.items()).rstrip(",")
            + ")",
            f"  heartbeats acknowledged: {fleet.ledger.acknowledged} (sent again after no"
            f" answer: {fleet.ledger.resent})",
            f"  deliveries acknowledged: {len(commenter.acknowledged)} (sent again:"
            f" {commenter.resent})",
            "  " + ", ".join(f"{k}: {v}" for k, v in totals.items()),
            "  kills aimed at: " + ", ".join(f"{k} {v}" for k, v in sorted(figures.aims.items())),
            "  kills that interrupted: "
            + ", ".join(f"{k} {v}" for k, v in sorted(figures.interrupted.items())),
        ]
    )


def _failure(task: asyncio.Task[Any]) -> BaseException | None:
    if task.done() and not task.cancelled():
        return task.exception()
    return None


async def test_rollouts_keep_their_promises_when_the_service_is_killed_at_random(
    tmp_path: Path,
) -> None:
    figures = Figures()
    builds = [f"build-{n:03d}" for n in range(1, KILLS // 2 + 8)]
    bad = {b for b, kind in zip(builds, itertools.cycle(KINDS), strict=False) if kind == "bad"}
    async with FakeGitHub() as github:
        installation = github.add_installation(account="acme", repos=[CONTROL])
        github.set_permission(CONTROL, PERSON, "maintain")
        for writes in ("POST /repos/*", "PATCH /repos/*", "DELETE /repos/*"):
            github.inject(writes, status=None, times=None, delay=GITHUB_LATENCY)
        env = {
            "GITHUB_APP_ID": str(github.app_id),
            "GITHUB_PRIVATE_KEY": github.private_key_pem,
            "GITHUB_API_URL": github.url,
            "UPDATE_PIPELINE_ENABLED": "true",
            "UPDATE_PIPELINE_CONTROL_REPO": CONTROL,
            "UPDATE_PIPELINE_STAGES_STABLE": PLAN,
            "UPDATE_PIPELINE_MIN_SESSION_COUNT": str(MIN_SESSIONS),
            "UPDATE_PIPELINE_HEARTBEAT_INTERVAL": "1s",
            # Named, so that the version watcher does not run npm at every start (polling
            # is off: nothing is fetched from it).
            "npm_config_registry": "http://127.0.0.1:9/",
        }
        async with (
            ServiceProcess(tmp_path, env=env) as service,
            aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
        ):
            await service.start()
            token = admin_token(service)
            api = aiohttp.ClientSession(
                timeout=CLIENT_TIMEOUT, headers={"Authorization": f"Bearer {token}"}
            )
            async with api:
                for build in ["build-000", *builds]:
                    await known_good(api, service, build)
                await call(
                    api,
                    "PUT",
                    service.api_url("/channels/stable"),
                    json={"buildId": "build-000", "reason": "the fleet's build"},
                )
                fleet = Fleet(
                    service,
                    token,
                    orgs=ORGS,
                    per_org=RUNNERS_PER_ORG,
                    build_id="build-000",
                    seed=SEED,
                    bad=bad,
                )
                commenter = Commenter(
                    github, service, session, installation=installation, repo=CONTROL, user=PERSON
                )

                def context() -> str:
                    return (
                        summary(figures, fleet, commenter, service.db)
                        + f"\nservice logs and GitHub's requests: {tmp_path}\n"
                        + service.output(last=1)[-3000:]
                    )

                # Each actor its own stream from the seed, so that one's pace does not
                # change another's choices.
                scenario = Scenario(
                    service, api, github, commenter, builds, random.Random(f"{SEED}/s"), context
                )
                killer = Killer(service, github, fleet, scenario, random.Random(SEED), figures)
                fleet.start(session)
                tasks: list[asyncio.Task[Any]] = []
                try:
                    await until(fleet.acknowledged_everyone, WAIT, "every runner heard", context)
                    await until(
                        lambda: query(
                            service.db,
                            "SELECT 1 FROM installation_repositories"
                            " WHERE full_name = ? COLLATE NOCASE",
                            (CONTROL,),
                        ),
                        WAIT,
                        "the App's installation on the control repository known",
                        context,
                    )
                    figures.phase("setup")
                    tasks = [
                        asyncio.create_task(scenario.run()),
                        asyncio.create_task(scenario.chatter(random.Random(f"{SEED}/c"))),
                    ]
                    for kill in range(KILLS):
                        if kill >= KILLS * 2 // 3:
                            scenario.last_call.set()
                        await killer.kill_once()
                        for failed in (fleet.failed(), *map(_failure, tasks)):
                            if failed is not None:
                                raise failed
                    figures.phase("kills")
                    scenario.finish.set()
                    await asyncio.wait_for(asyncio.gather(*tasks), STALLED + 2 * WAIT)
                    await fleet.stop(WAIT)
                    figures.phase("last rollout ended")

                    def settled() -> bool:
                        return pending(service.db) == (0, 0) and bodies_current(
                            service.db, github, CONTROL
                        )

                    await until(settled, WAIT, "deliveries and side effects all done", context)
                    await service.stop()
                    figures.phase("outbox drained")
                finally:
                    write_requests(github, tmp_path / "github-requests.txt")
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    await fleet.cancel()

        db = service.db
        report = summary(figures, fleet, commenter, db)
        print(f"\n{report}")
        checks: list[tuple[str, Callable[[], list[str]]]] = [
            ("integrity", lambda: [p for p in integrity(db) if p != "ok"]),
            ("heartbeats", lambda: heartbeat_problems(db, fleet.ledger)),
            ("deliveries", lambda: delivery_problems(db, commenter)),
            ("commands", lambda: command_problems(db, github, commenter)),
            ("rollouts", lambda: rollout_problems(db, killer.observed)),
            ("outbox", lambda: outbox_problems(db, github, CONTROL)),
            ("tracking issues", lambda: tracking_problems(db, github, CONTROL)),
            ("GitHub's view of the requests", lambda: list(github.violations)),
            ("errors the service logged", lambda: logged_errors(service)),
        ]
        failures = {name: problems for name, check in checks if (problems := check())}
        github.violations.clear()
        assert not failures, (
            f"{report}\nservice logs and GitHub's requests: {tmp_path}\n"
            + "\n".join(
                f"{name}:\n  " + "\n  ".join(problems[:15]) for name, problems in failures.items()
            )
        )
        # The run must have exercised what it claims to (how much of each depends on the
        # machine's pace; the figures above say).
        totals = tally(db)
        assert figures.kills == KILLS, report
        assert fleet.ledger.resent and commenter.resent, report
        assert totals["rollouts"] and totals["advances"] + totals["automatic rollbacks"], report


# -- what the harness found, pinned down without a crash ---------------------------------

REPO = CONTROL
KEY = "rollout-r1"


async def _tracked_rollout(store: SqliteStore, effects: list[NewEffect]) -> None:
    """A rollout whose tracking issue is being opened, with ``effects`` written with it
    (named by the issue's key, as they are until GitHub has given it a number)."""
    await store.add_build(BuildRecord("build-1", "1.0.0", START), START)
    rollout = Rollout("r1", "build-1", "stable", "rolling_out", "100%", 0, 100, START, START)
    opened = open_issue(1, REPO, "Rollout build-1 → stable", "...", key=KEY)
    await store.write_rollout(
        RolloutChange(
            rollout,
            None,
            [],
            effects=[opened, *effects],
            tracking=TrackingIssue("r1", REPO, 1, KEY),
        ),
        START,
        keep_events=10,
    )


async def _apply(store: SqliteStore, effect: Effect, result: dict[str, Any] | None = None) -> None:
    started = await store.start_effect(effect.id, START)
    assert started is not None
    assert await store.finish_effect(started, result, START)


async def test_a_tracking_issue_s_entries_apply_in_the_order_written_under_either_name(
    store: SqliteStore,
) -> None:
    # Comments written before GitHub made the issue name it by its key; once the number
    # is known, new ones name the number. The first crash runs applied a later comment
    # (by number) before earlier ones (by key): each name was its own queue.
    advanced = NewEffect(1, created_issue_target(REPO, KEY), "comment", {"key": f"{KEY}-v2"})
    completed = NewEffect(1, created_issue_target(REPO, KEY), "comment", {"key": f"{KEY}-v3"})
    await _tracked_rollout(store, [advanced, completed])
    (issue,) = await store.due_effects(START, limit=10)
    await _apply(store, issue, {"number": 7})
    await store.set_tracking_number("r1", KEY, 7)
    await store.add_effects([add_comment(1, REPO, 7, "Rolled back.", key=f"{KEY}-v4")], START)

    order = []
    while due := await store.due_effects(START, limit=10):
        assert len(due) == 1, [e.payload["key"] for e in due]
        order.append(due[0].payload["key"])
        await _apply(store, due[0])
    assert order == [f"{KEY}-v2", f"{KEY}-v3", f"{KEY}-v4"]


async def test_what_waits_behind_another_entry_is_not_due_by_its_own_time(
    store: SqliteStore,
) -> None:
    # The outbox worker sleeps until next_effect_due. Counting entries that wait behind
    # their target's first one (or behind a lane still applying its installation's)
    # made it poll the database in a busy loop for as long as they waited.
    first, second = (add_comment(1, REPO, 7, "hi", key=f"c{n}") for n in (1, 2))
    await store.add_effects([first, second], START)
    (head,) = await store.due_effects(START, limit=10)
    assert await store.next_effect_due() == START
    assert await store.next_effect_due(skip_installations=[1]) is None

    retry = START + timedelta(minutes=5)
    await store.fail_effect(head.id, "GitHub answered 502", retry_at=retry, at=START)
    assert await store.due_effects(START, limit=10) == []
    assert await store.next_effect_due() == retry


async def test_a_delivery_handed_out_again_after_its_completion_is_not_completed_twice(
    store: SqliteStore,
) -> None:
    # The worker reads due deliveries on the shared reader connection; a read that
    # overlaps another one still in progress sees that one's older snapshot, in which
    # the delivery it has just completed is still pending. A crash run caught it
    # processing a /rollback twice: two replies on GitHub.
    delivery = Delivery(
        "d1", "issue_comment", "created", 1, "{}", "pending", 0, START, None, START, None
    )
    assert await store.add_delivery(delivery)
    reply = add_comment(1, REPO, 7, "`/rollback`: done.", key="reply-1029")
    await store.finish_delivery("d1", START, [reply])
    await store.finish_delivery("d1", START, [reply])
    await store.fail_delivery("d1", "handler failed", retry_at=None, at=START)

    (stored,) = await store.list_deliveries(status=None, before=None, limit=10)
    assert (stored.status, stored.attempts) == ("done", 1)
    assert [e.payload["key"] for e in await store.due_effects(START, limit=10)] == ["reply-1029"]


async def test_an_edit_written_again_unchanged_leaves_the_waiting_one_alone(
    store: SqliteStore,
) -> None:
    # Every start renders the recent rollouts' bodies again. Bumping the revision of the
    # identical edit already waiting made the attempt in progress count for nothing:
    # killed every few seconds, the service applied that edit again and again, and what
    # was queued behind it on the issue never went out.
    edit = edit_issue(1, REPO, issue_number=7, body="**Rolling out** at **20%**")
    await store.add_effects([edit], START)
    (waiting,) = await store.due_effects(START, limit=10)
    started = await store.start_effect(waiting.id, START)
    assert started is not None
    await store.add_effects([edit], START + timedelta(seconds=1))
    assert await store.finish_effect(started, None, START)
    assert await store.replaceable_payload([f"{REPO}#7:body"]) == edit.payload
