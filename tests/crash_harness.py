"""The parts of the crash-consistency harness (tests/test_crash_rollout.py) that do not
depend on its scenario: a fleet of runners that keeps its own ledger of what the service
acknowledged, slash commands delivered as GitHub delivers them, read-only looks at the
service's database, and the invariants checked at the end, each a function that returns
the problems it found (an empty list when the promise held).

Nothing here trusts the service's own account: what was acknowledged is what the runners
and the webhook sender saw answered 2xx, what reached GitHub is what the fake GitHub
recorded, and the database is read with the service's real schema.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
import random
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from app.clock import parse_iso
from app.github.outbox import created_issue_target, marker
from app.github.tracking import ROLLOUT_LABEL, STATE_LABELS
from app.rollouts.plan import Stage, parse_stages
from tests.fake_github import FakeGitHub, Recorded
from tests.service_process import ServiceProcess, post_webhook

WEBHOOKS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "webhooks"
COMMENT_DELIVERY = json.loads((WEBHOOKS / "issue_comment.created.0.json").read_text())
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)
RETRY_PAUSE = 0.25  # seconds between attempts while the service is down
# The controller reads the clock for a deadline a few database reads before it reads it
# again for the history entry; on a busy machine those reads can take a while.
CLOCK_SLACK = timedelta(seconds=2)
TERMINAL = ("completed", "rolled_back")
MARKER = re.compile(r"<!-- update-pipeline:(\S+) -->")


# -- reading the database from outside the service ----------------------------------------


def connect(db: Path) -> sqlite3.Connection:
    # Read-only, so looking never changes what the service finds on its next start.
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    with closing(connect(db)) as conn:
        return conn.execute(sql, params).fetchall()


def integrity(db: Path) -> list[str]:
    """``PRAGMA integrity_check`` (``["ok"]`` when sound) and any foreign key broken."""
    with closing(connect(db)) as conn:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        problems += [repr(tuple(row)) for row in conn.execute("PRAGMA foreign_key_check")]
    return problems


def when(text: str | None) -> datetime | None:
    return parse_iso(text) if text else None


async def until(
    condition: Callable[[], Any], timeout: float, what: str, context: Callable[[], str]
) -> Any:
    """Poll ``condition`` until it returns something truthy; that value. The service may
    be down for part of the wait: conditions read the database, not the API."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = condition()
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s; {context()}")
        await asyncio.sleep(0.05)


# -- sessions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sessions:
    started: int = 0
    failed: int = 0
    disconnected: int = 0

    def __add__(self, other: Sessions) -> Sessions:
        return Sessions(
            self.started + other.started,
            self.failed + other.failed,
            self.disconnected + other.disconnected,
        )

    def __sub__(self, other: Sessions) -> Sessions:
        return Sessions(
            self.started - other.started,
            self.failed - other.failed,
            self.disconnected - other.disconnected,
        )

    def covers(self, other: Sessions) -> bool:
        return (
            self.started >= other.started
            and self.failed >= other.failed
            and self.disconnected >= other.disconnected
        )


def _add(table: dict[Any, Sessions], key: Any, sessions: Sessions) -> None:
    table[key] = table.get(key, Sessions()) + sessions


# -- the fleet ------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the runners were told: every heartbeat answered 2xx and the sessions it
    carried (the difference from the same boot's previous acknowledged heartbeat)."""

    acknowledged: int = 0
    resent: int = 0  # posts left unanswered by a kill (or answered 5xx), then sent again
    by_build: dict[tuple[str, str], Sessions] = field(default_factory=dict)  # (org, build)
    # (the rollout the answer named, org, build): what the runner was told it counted for
    by_rollout: dict[tuple[str, str, str], Sessions] = field(default_factory=dict)
    last: dict[tuple[str, str], tuple[str, Sessions]] = field(default_factory=dict)


@dataclass
class Runner:
    org_id: str
    runner_id: str
    build_id: str
    rng: random.Random
    boot: int = 1
    total: Sessions = Sessions()  # this boot's counters, as sent
    acked: Sessions = Sessions()  # this boot's counters, as last acknowledged

    @property
    def boot_id(self) -> str:
        return f"{self.runner_id}-boot{self.boot}"


class Fleet:
    """Runners that heartbeat the service as the design asks: cumulative counters per
    boot; a heartbeat left unanswered is sent again as it was, so the service counts it
    once, or not at all if it never committed it; a runner told another build restarts on
    it with a new boot. Each runner has its own seeded stream of sessions, and builds in
    ``bad`` fail most of theirs."""

    def __init__(
        self,
        service: ServiceProcess,
        token: str,
        *,
        orgs: int,
        per_org: int,
        build_id: str,
        seed: int,
        bad: set[str],
        interval: tuple[float, float] = (0.3, 0.5),
    ) -> None:
        self.service = service
        self.headers = {"Authorization": f"Bearer {token}"}
        self.bad = bad
        self.interval = interval
        self.runners = [
            Runner(
                f"org-{o:02d}", f"runner-{o:02d}-{r}", build_id, random.Random(f"{seed}/{o}/{r}")
            )
            for o in range(orgs)
            for r in range(per_org)
        ]
        self.ledger = Ledger()
        self.in_flight = 0  # heartbeats posted and not yet answered
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def orgs(self) -> list[str]:
        return sorted({r.org_id for r in self.runners})

    def start(self, session: aiohttp.ClientSession) -> None:
        self._tasks = [asyncio.create_task(self._run(session, r)) for r in self.runners]

    async def stop(self, timeout: float) -> None:
        """Let every runner finish the heartbeat it is sending (until acknowledged)."""
        self.stopping.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def failed(self) -> BaseException | None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    def acknowledged_everyone(self) -> bool:
        return all((r.org_id, r.runner_id) in self.ledger.last for r in self.runners)

    async def _run(self, session: aiohttp.ClientSession, runner: Runner) -> None:
        report: dict[str, Any] | None = None
        while True:
            if report is None:
                if self.stopping.is_set():
                    return
                report = self._next_report(runner)
            reply = await self._post(session, report)
            if reply is None:
                self.ledger.resent += 1
                await asyncio.sleep(RETRY_PAUSE)
                continue
            self._acknowledged(runner, reply)
            report = None
            await asyncio.sleep(runner.rng.uniform(*self.interval))

    def _next_report(self, runner: Runner) -> dict[str, Any]:
        started = runner.rng.randint(1, 3)
        rate = 0.6 if runner.build_id in self.bad else 0.0
        failed = sum(runner.rng.random() < rate for _ in range(started))
        runner.total = runner.total + Sessions(started, failed, 0)
        return {
            "runnerId": runner.runner_id,
            "orgId": runner.org_id,
            "bootId": runner.boot_id,
            "buildId": runner.build_id,
            "sessions": {
                "started": runner.total.started,
                "failed": runner.total.failed,
                "disconnected": runner.total.disconnected,
            },
        }

    async def _post(
        self, session: aiohttp.ClientSession, report: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The answer, or None when there was none to trust (no answer, or a 5xx)."""
        self.in_flight += 1
        try:
            async with session.post(
                self.service.api_url("/heartbeat"), json=report, headers=self.headers
            ) as response:
                body = await response.json(content_type=None)
                if response.status >= 500:
                    return None
                if response.status >= 300:
                    raise AssertionError(f"heartbeat {report} answered {response.status} {body}")
                answer: dict[str, Any] = body
                return answer
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return None
        finally:
            self.in_flight -= 1

    def _acknowledged(self, runner: Runner, answer: Mapping[str, Any]) -> None:
        ledger = self.ledger
        added = runner.total - runner.acked
        runner.acked = runner.total
        ledger.acknowledged += 1
        _add(ledger.by_build, (runner.org_id, runner.build_id), added)
        rollout = answer.get("rolloutId") or ""
        _add(ledger.by_rollout, (rollout, runner.org_id, runner.build_id), added)
        ledger.last[(runner.org_id, runner.runner_id)] = (runner.boot_id, runner.total)
        desired = answer.get("desiredBuildId")
        if desired and desired != runner.build_id:
            # Restarting on the new build: a new boot, its counters from zero.
            runner.build_id = desired
            runner.boot += 1
            runner.total = runner.acked = Sessions()


# -- slash commands, delivered as GitHub would ----------------------------------------------


@dataclass(frozen=True)
class Said:
    delivery_id: str
    comment_id: int
    issue: int
    line: str

    @property
    def command(self) -> str:
        return self.line.split()[0].lstrip("/")


class Commenter:
    """A person typing commands on the control repository's issues: each is a comment on
    the fake GitHub and an ``issue_comment`` delivery signed and posted to the service,
    sent again under the same delivery id until it is acknowledged."""

    def __init__(
        self,
        github: FakeGitHub,
        service: ServiceProcess,
        session: aiohttp.ClientSession,
        *,
        installation: int,
        repo: str,
        user: str,
    ) -> None:
        self.github = github
        self.service = service
        self.session = session
        self.installation = installation
        self.repo = repo
        self.user = user
        self.acknowledged: dict[str, Said] = {}
        self.bodies: dict[str, bytes] = {}
        self.resent = 0
        self._ids = itertools.count(1)

    async def say(self, issue: int, line: str, *, timeout: float) -> Said:
        comment_id = self.github.add_comment(self.repo, issue, line, user=self.user)
        said = Said(f"crash-comment-{next(self._ids)}", comment_id, issue, line)
        body = self._delivery(said)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            reply = await post_webhook(
                self.session,
                self.service.webhook_url,
                event="issue_comment",
                delivery_id=said.delivery_id,
                body=body,
                secret=self.service.webhook_secret,
            )
            if reply is not None and reply.status == 202:
                break
            if reply is not None and reply.status < 500:
                raise AssertionError(f"{said}: answered {reply.status} {reply.body}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{said}: not acknowledged within {timeout:g}s")
            self.resent += 1
            await asyncio.sleep(RETRY_PAUSE)
        self.acknowledged[said.delivery_id] = said
        self.bodies[said.delivery_id] = body
        return said

    def _delivery(self, said: Said) -> bytes:
        payload = copy.deepcopy(COMMENT_DELIVERY)
        issue = self.github.repo(self.repo).issue(said.issue)
        author = {**payload["comment"]["user"], "login": self.user, "type": "User"}
        payload["comment"].update(id=said.comment_id, body=said.line, user=author)
        payload["sender"] = author
        payload["issue"].update(
            number=said.issue,
            labels=[{"name": label["name"]} for label in issue["labels"]],
            state=issue["state"],
        )
        payload["issue"].pop("pull_request", None)
        payload["repository"]["full_name"] = self.repo
        payload["installation"] = {"id": self.installation}
        return json.dumps(payload).encode()

    def processed(self, db: Path, said: Said) -> bool:
        rows = query(
            db, "SELECT status FROM webhook_deliveries WHERE delivery_id = ?", (said.delivery_id,)
        )
        return bool(rows) and rows[0]["status"] != "pending"


# -- rollouts, as stored --------------------------------------------------------------------

ROW = (
    "rollout_id, target_build_id, state, stage, plan, version, stage_started_at, deadline_at,"
    " paused_at, remaining_seconds, finished_at"
)


@dataclass(frozen=True)
class Observed:
    """A rollout's row as seen at one moment (a kill, a restart, the end)."""

    moment: str
    rollout_id: str
    version: int
    state: str
    stage: int
    deadline_at: datetime | None
    stage_started_at: datetime | None


def observe_rollouts(db: Path, moment: str) -> list[Observed]:
    return [
        Observed(
            moment,
            row["rollout_id"],
            row["version"],
            row["state"],
            row["stage"],
            when(row["deadline_at"]),
            when(row["stage_started_at"]),
        )
        for row in query(db, f"SELECT {ROW} FROM active_rollouts")
    ]


@dataclass(frozen=True)
class Entry:
    id: int
    at: datetime
    actor: str
    action: str
    from_state: str | None
    to_state: str
    stage: int
    details: dict[str, Any]


def history(db: Path, rollout_id: str) -> list[Entry]:
    return [
        Entry(
            row["id"],
            parse_iso(row["at"]),
            row["actor"],
            row["action"],
            row["from_state"],
            row["to_state"],
            row["stage"],
            json.loads(row["details"]),
        )
        for row in query(
            db,
            "SELECT id, at, actor, action, from_state, to_state, stage, details"
            " FROM rollout_history WHERE rollout_id = ? ORDER BY id",
            (rollout_id,),
        )
    ]


# The transitions the scenario makes, as (action, from, to); the stage rule is checked apart.
TRANSITIONS = {
    ("start", "pending", "rolling_out"),
    ("advance", "rolling_out", "rolling_out"),
    ("pause", "rolling_out", "paused"),
    ("resume", "paused", "rolling_out"),
    ("complete", "rolling_out", "completed"),
    ("rollback", "rolling_out", "rolled_back"),
    ("rollback", "paused", "rolled_back"),
    ("rollback", "completed", "rolled_back"),  # within the rollback window
}


def deadlines(entries: Sequence[Entry], stages: Sequence[Stage]) -> list[datetime | None]:
    """The deadline each version of a rollout should carry (index 0: version 1), replayed
    from its history alone: a stage's start sets it, a pause keeps what was left, a resume
    sets it from what was left, the end clears it."""
    deadline: datetime | None = None
    left: timedelta | None = None
    found: list[datetime | None] = []
    for e in entries:
        if e.action in ("start", "advance"):
            duration = stages[e.stage].duration
            deadline = e.at + duration if duration is not None else None
        elif e.action == "pause":
            left = max(deadline - e.at, timedelta(0)) if deadline is not None else None
            deadline = None
        elif e.action == "resume":
            deadline = e.at + left if left is not None else None
        elif e.action in ("complete", "rollback"):
            deadline = None
        found.append(deadline)
    return found


def _close_enough(a: datetime | None, b: datetime | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= CLOCK_SLACK


def _transition_problems(name: str, entries: Sequence[Entry], last_stage: int) -> list[str]:
    """Each entry a transition the state it follows allows; a stage entered only from the
    one before it, and left at most once; completion only from the last."""
    problems = []
    state, stage = "pending", 0
    advanced_from: Counter[int] = Counter()
    for e in entries:
        step = (e.action, e.from_state, e.to_state)
        if step not in TRANSITIONS or e.from_state != state:
            problems.append(f"{name}: {step} follows state {state}")
        if e.action == "advance":
            advanced_from[stage] += 1
            if e.stage != stage + 1:
                problems.append(f"{name}: advanced from stage {stage} to {e.stage}")
        elif e.action != "start" and e.stage != stage:
            problems.append(f"{name}: {e.action} moved the stage from {stage} to {e.stage}")
        if e.action == "complete" and e.stage != last_stage:
            problems.append(f"{name}: completed at stage {e.stage} of {last_stage + 1}")
        state, stage = e.to_state, e.stage
    problems += [
        f"{name}: advanced out of stage {s} {n} times" for s, n in advanced_from.items() if n > 1
    ]
    return problems


def _deadline_problems(
    name: str, entries: Sequence[Entry], stages: Sequence[Stage], seen: Sequence[Observed]
) -> list[str]:
    """Every look at the row found the state and deadline its history gives: exactly the
    stage's start plus its duration while the stage has not been paused, and what its
    history replays to (within the controller's clock reads) after a pause."""
    problems = []
    expected = deadlines(entries, stages)
    paused = [False] * len(entries)  # whether the stage had been paused by each version
    for index, e in enumerate(entries):
        earlier = paused[index - 1] if index else False
        paused[index] = e.action == "pause" or (earlier and e.action not in ("start", "advance"))
    for o in seen:
        if not 1 <= o.version <= len(entries):
            continue
        entry, due = entries[o.version - 1], expected[o.version - 1]
        duration = stages[o.stage].duration
        if (o.state, o.stage) != (entry.to_state, entry.stage):
            problems.append(f"{name}: at {o.moment} the row was {o}, its history {entry}")
        elif o.state == "rolling_out" and not paused[o.version - 1] and duration is not None:
            assert o.stage_started_at is not None
            if o.deadline_at != o.stage_started_at + duration:
                problems.append(
                    f"{name}: at {o.moment}, stage {o.stage} started {o.stage_started_at} has"
                    f" deadline {o.deadline_at}, not {duration} later (a deadline reset?)"
                )
        if not _close_enough(o.deadline_at, due):
            problems.append(
                f"{name}: at {o.moment}, version {o.version} had deadline {o.deadline_at};"
                f" its history gives {due} (a deadline reset?)"
            )
    for index, e in enumerate(entries):
        due = expected[index - 1] if index else None
        if (
            e.action == "advance"
            and e.actor == "auto"
            and (due is None or e.at + CLOCK_SLACK < due)
        ):
            problems.append(f"{name}: advanced automatically at {e.at}, due at {due}")
    return problems


def rollout_problems(db: Path, observed: Iterable[Observed]) -> list[str]:
    """No stage skipped, none advanced out of twice, every change recorded (one history
    entry per version of the row, and a row never changed without a new version), and
    each deadline the one its history gives, at every moment the row was looked at:
    after each kill, after each restart, and at the end."""
    problems: list[str] = []
    first_seen: dict[tuple[str, int], Observed] = {}
    by_rollout: dict[str, list[Observed]] = {}
    for o in [*observed, *observe_rollouts(db, "the end")]:
        by_rollout.setdefault(o.rollout_id, []).append(o)
        first = first_seen.setdefault((o.rollout_id, o.version), o)
        if dataclasses.replace(first, moment="") != dataclasses.replace(o, moment=""):
            problems.append(
                f"rollout {o.rollout_id} version {o.version} changed without a new version:"
                f" {first} then {o}"
            )
    for row in query(db, f"SELECT {ROW} FROM active_rollouts"):
        rollout_id, stages = row["rollout_id"], parse_stages(row["plan"])
        entries = history(db, rollout_id)
        name = f"rollout {rollout_id} ({row['target_build_id']})"
        if len(entries) != row["version"]:
            problems.append(f"{name}: version {row['version']} but {len(entries)} history entries")
        if not entries or entries[0].action != "start" or entries[0].stage != 0:
            problems.append(f"{name}: does not begin with a start at stage 0: {entries[:1]}")
            continue
        problems += _transition_problems(name, entries, len(stages) - 1)
        problems += _deadline_problems(name, entries, stages, by_rollout.get(rollout_id, []))
    return problems


# -- heartbeats ------------------------------------------------------------------------------


def stage_targets(db: Path, rollout_id: str) -> dict[int, Sessions]:
    """Each stage's target sessions as the rollout's view counts them: orgs included by
    then, on the rollout's build."""
    rows = query(
        db,
        "SELECT s.stage, sum(s.started) AS started, sum(s.failed) AS failed,"
        " sum(s.disconnected) AS disconnected FROM session_counts s"
        " JOIN active_rollouts r ON r.rollout_id = s.rollout_id"
        " JOIN rollout_orgs o ON o.rollout_id = s.rollout_id AND o.org_id = s.org_id"
        " WHERE s.rollout_id = ? AND s.build_id = r.target_build_id AND o.stage <= s.stage"
        " GROUP BY s.stage",
        (rollout_id,),
    )
    return {r["stage"]: Sessions(r["started"], r["failed"], r["disconnected"]) for r in rows}


def heartbeat_problems(db: Path, ledger: Ledger) -> list[str]:
    """Every acknowledged heartbeat's sessions are in the stored counts, exactly once; the
    ones the answer said were in a rollout are in that rollout's counts; and what a stage
    was judged on (its tally when it advanced or tripped) was never more than what it
    stored."""
    problems = []
    stored: dict[tuple[str, str], Sessions] = {}
    for row in query(
        db,
        "SELECT org_id, build_id, sum(started) AS started, sum(failed) AS failed,"
        " sum(disconnected) AS disconnected FROM session_counts GROUP BY org_id, build_id",
    ):
        stored[(row["org_id"], row["build_id"])] = Sessions(
            row["started"], row["failed"], row["disconnected"]
        )
    for key in sorted(stored.keys() | ledger.by_build.keys()):
        if stored.get(key, Sessions()) != ledger.by_build.get(key, Sessions()):
            problems.append(
                f"sessions of {key}: {ledger.by_build.get(key)} acknowledged,"
                f" {stored.get(key)} stored"
            )
    for row in query(
        db, "SELECT org_id, runner_id, boot_id, started, failed, disconnected FROM runners"
    ):
        boot, total = ledger.last.get((row["org_id"], row["runner_id"]), ("", Sessions()))
        kept = Sessions(row["started"], row["failed"], row["disconnected"])
        if (row["boot_id"], kept) != (boot, total):
            problems.append(
                f"runner {row['runner_id']}: stored {dict(row)}, last acknowledged {boot} {total}"
            )
    targets = {
        r["rollout_id"]: r["target_build_id"]
        for r in query(db, "SELECT rollout_id, target_build_id FROM active_rollouts")
    }
    counted: dict[tuple[str, str, str], Sessions] = {}
    for row in query(
        db,
        "SELECT rollout_id, org_id, build_id, sum(started) AS started, sum(failed) AS failed,"
        " sum(disconnected) AS disconnected FROM session_counts"
        " GROUP BY rollout_id, org_id, build_id",
    ):
        counted[(row["rollout_id"], row["org_id"], row["build_id"])] = Sessions(
            row["started"], row["failed"], row["disconnected"]
        )
    for (rollout_id, org_id, build_id), told in ledger.by_rollout.items():
        if not rollout_id or targets.get(rollout_id) != build_id:
            continue
        if not counted.get((rollout_id, org_id, build_id), Sessions()).covers(told):
            problems.append(
                f"org {org_id} was told {told} counted in rollout {rollout_id},"
                f" which stored {counted.get((rollout_id, org_id, build_id))}"
            )
    for rollout_id in targets:
        reached = max(e.stage for e in history(db, rollout_id))
        per_stage = stage_targets(db, rollout_id)
        for row in query(
            db, "SELECT DISTINCT stage FROM session_counts WHERE rollout_id = ?", (rollout_id,)
        ):
            if row["stage"] > reached:
                problems.append(
                    f"rollout {rollout_id}: sessions counted in unreached stage {row['stage']}"
                )
        for e in history(db, rollout_id):
            judged = e.details.get("sessions")
            if judged is None:
                continue
            stage = e.stage - 1 if e.action == "advance" else e.stage
            if judged > per_stage.get(stage, Sessions()).started:
                problems.append(
                    f"rollout {rollout_id}: stage {stage} was judged on {judged} sessions at"
                    f" {e.action}, but stores {per_stage.get(stage)}"
                )
    return problems


# -- webhook deliveries -----------------------------------------------------------------------


def delivery_problems(db: Path, commenter: Commenter) -> list[str]:
    """Every acknowledged delivery stored once, intact, and completed once; nothing stored
    that was not sent."""
    problems = []
    stored: dict[str, list[sqlite3.Row]] = {}
    for row in query(db, "SELECT delivery_id, status, attempts, payload FROM webhook_deliveries"):
        stored.setdefault(row["delivery_id"], []).append(row)
    for delivery_id, said in commenter.acknowledged.items():
        rows = stored.get(delivery_id, [])
        if len(rows) != 1:
            problems.append(f"{said}: stored {len(rows)} times")
            continue
        (row,) = rows
        if (row["status"], row["attempts"]) != ("done", 1):
            problems.append(f"{said}: status {row['status']}, attempts {row['attempts']}")
        if row["payload"].encode() != commenter.bodies[delivery_id]:
            problems.append(f"{said}: the stored payload differs from the one sent")
    problems += [f"{d}: stored, never acknowledged" for d in stored.keys() - commenter.acknowledged]
    return problems


ACTING = {"rollout", "pause", "resume", "advance", "rollback"}


def command_problems(db: Path, github: FakeGitHub, commenter: Commenter) -> list[str]:
    """Each command acted at most once (the key of its comment recorded with the one
    change it made), was answered once, and its reactions say what happened."""
    problems = []
    acted = {r["key"] for r in query(db, "SELECT key FROM rollout_commands")}
    by_people = query(
        db, "SELECT count(*) AS n FROM rollout_history WHERE actor = ?", (commenter.user,)
    )[0]["n"]
    if by_people != len(acted):
        problems.append(
            f"{by_people} history entries by {commenter.user}, {len(acted)} commands acted"
        )
    repo = github.repo(commenter.repo)
    for said in commenter.acknowledged.values():
        replies = [
            c for c in repo.comments.values() if marker(f"reply-{said.comment_id}") in c["body"]
        ]
        reactions = [r["content"] for r in repo.reactions.get(("comment", said.comment_id), [])]
        if not said.line.startswith("/"):
            if replies or reactions:
                problems.append(f"{said}: a plain comment was answered")
            continue
        if len(replies) != 1:
            problems.append(f"{said}: {len(replies)} replies")
            continue
        key = f"comment-{said.comment_id}-line-1"
        succeeded = reactions == ["eyes", "rocket"]
        if not succeeded and reactions != ["eyes", "confused"]:
            problems.append(f"{said}: reactions {reactions}")
        if said.command in ACTING and succeeded != (key in acted):
            problems.append(
                f"{said}: answered {'🚀' if succeeded else '😕'} but the command"
                f" {'did' if key in acted else 'did not'} act: {replies[0]['body'][:200]!r}"
            )
        if said.command not in ACTING and key in acted:
            problems.append(f"{said}: a /{said.command} changed a rollout")
    return problems


# -- GitHub: the outbox's side effects ---------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    id: int
    target: str
    kind: str
    payload: dict[str, Any]
    status: str
    attempts: int
    result: dict[str, Any] | None


def effects(db: Path) -> list[Effect]:
    return [
        Effect(
            row["id"],
            row["target"],
            row["kind"],
            json.loads(row["payload"]),
            row["status"],
            row["attempts"],
            json.loads(row["result"]) if row["result"] else None,
        )
        for row in query(
            db, "SELECT id, target, kind, payload, status, attempts, result FROM outbox ORDER BY id"
        )
    ]


def _issue_numbers(entries: Sequence[Effect]) -> dict[str, int]:
    """Issue number by outbox target, for both ways an entry names an issue: its number
    (``acme/control#7``), or the key of an issue the outbox opened, once it is made."""
    numbers: dict[str, int] = {}
    for e in entries:
        if e.kind == "issue" and e.result is not None:
            numbers[e.target] = int(e.result["number"])
        elif "#key:" not in e.target:
            numbers[e.target] = int(e.target.rsplit("#", 1)[1])
    return numbers


def _applied_by(e: Effect, number: int, request: Recorded) -> bool:
    """Whether this request to GitHub is (one attempt at) applying this entry."""
    status = request.status or 0
    ok = 200 <= status < 300 or (e.kind == "label_remove" and status == 404)
    if not ok:
        return False
    p = e.payload
    issues = f"/repos/{p['repo']}/issues"
    body = request.json if isinstance(request.json, dict) else {}
    if e.kind == "issue":
        return request.target == f"POST {issues}" and marker(p["key"]) in str(body.get("body"))
    if e.kind == "comment":
        return request.target == f"POST {issues}/{number}/comments" and marker(p["key"]) in str(
            body.get("body")
        )
    if e.kind == "reaction":
        on = f"{issues}/comments/{p['comment_id']}" if "comment_id" in p else f"{issues}/{number}"
        return request.target == f"POST {on}/reactions" and body == {"content": p["content"]}
    if e.kind == "labels":
        return request.target == f"POST {issues}/{number}/labels" and body == {
            "labels": p["labels"]
        }
    if e.kind == "label_remove":
        return request.target == f"DELETE {issues}/{number}/labels/{p['label']}"
    if e.kind == "issue_edit":
        data = {k: p[k] for k in ("title", "body", "state", "state_reason") if k in p}
        if "body" in data and p.get("issue_key"):
            data["body"] = f"{data['body']}\n\n{marker(p['issue_key'])}"
        return request.target == f"PATCH {issues}/{number}" and body == data
    raise AssertionError(f"the harness does not know outbox entries of kind {e.kind!r}")


def outbox_problems(db: Path, github: FakeGitHub, repo: str) -> list[str]:
    """Every entry applied; each issue and comment made once on GitHub (at least once
    delivery, but a repeated attempt looks before it creates), and nothing made by the App
    that no entry asked for; a body sent again only when it changed; each issue's entries
    applied in the order they were written."""
    entries = effects(db)
    numbers = _issue_numbers(entries)
    problems = [
        f"outbox entry {e.id} ({e.kind} on {e.target}) is {e.status} after {e.attempts} attempt(s)"
        for e in entries
        if e.status != "done"
    ]
    problems += [
        f"outbox entry {e.id} names an issue never made: {e.target}"
        for e in entries
        if e.target not in numbers
    ]
    return (
        problems
        + _made_twice_or_unasked(entries, github, repo)
        + _unchanged_bodies(entries, numbers)
        + _out_of_order(entries, numbers, github)
    )


def _made_twice_or_unasked(entries: Sequence[Effect], github: FakeGitHub, repo: str) -> list[str]:
    problems = []
    made_with: Counter[str] = Counter(
        key
        for r in github.requests
        if r.method == "POST" and r.status == 201 and isinstance(r.json, dict)
        for key in MARKER.findall(str(r.json.get("body", "")))
    )
    creates = [e for e in entries if e.kind in ("issue", "comment")]
    for e in creates:
        if made_with[e.payload["key"]] != 1:
            problems.append(
                f"outbox entry {e.id} ({e.kind} {e.payload['key']}) made"
                f" {made_with[e.payload['key']]} objects on GitHub"
            )
    state = github.repo(repo)
    asked = {e.payload["key"] for e in creates}
    # Tracking issues lose their marker once their body is edited by number.
    made = [c["body"] for c in state.comments.values() if c["user"]["type"] == "Bot"]
    made += [
        i["body"] or ""
        for i in state.issues.values()
        if i["user"]["type"] == "Bot" and not i["title"].startswith("Rollout ")
    ]
    problems += [
        f"made by the App, asked by no entry: {m[:120]!r}"
        for m in made
        if not set(MARKER.findall(m)) & asked
    ]
    return problems


def _unchanged_bodies(entries: Sequence[Effect], numbers: Mapping[str, int]) -> list[str]:
    """Body edits that repeat the body the one before them on the issue sent."""
    problems = []
    last: dict[int, str] = {}
    for e in entries:
        if e.kind == "issue_edit" and "body" in e.payload and e.target in numbers:
            number = numbers[e.target]
            if last.get(number) == e.payload["body"]:
                problems.append(f"issue #{number}: outbox entry {e.id} sends an unchanged body")
            last[number] = e.payload["body"]
    return problems


def _out_of_order(
    entries: Sequence[Effect], numbers: Mapping[str, int], github: FakeGitHub
) -> list[str]:
    """Entries of one issue whose requests to GitHub are not in the order the entries
    were written (each entry matched to its first request after the previous entry's)."""
    problems = []
    per_issue: dict[int, list[Effect]] = {}
    for e in entries:
        if e.target in numbers:
            per_issue.setdefault(numbers[e.target], []).append(e)
    writes = [r for r in github.requests if r.method != "GET" and r.path.startswith("/repos/")]
    for number, queue in sorted(per_issue.items()):
        at = -1
        for e in queue:
            found = next(
                (i for i in range(at + 1, len(writes)) if _applied_by(e, number, writes[i])), None
            )
            if found is not None:
                at = found
                continue
            earlier = any(_applied_by(e, number, w) for w in writes)
            what = (
                "reached GitHub before an entry written ahead of it"
                if earlier
                else "never reached GitHub"
            )
            problems.append(
                f"issue #{number}: outbox entry {e.id} ({e.kind}"
                f" {json.dumps(e.payload)[:160]}) {what}"
            )
    return problems


def tracking_problems(db: Path, github: FakeGitHub, repo: str) -> list[str]:
    """One issue per rollout; on it one comment per transition, in the order of the
    transitions; its labels, state and body those of the rollout's final state."""
    problems: list[str] = []
    entries = effects(db)
    numbers = _issue_numbers(entries)
    state = github.repo(repo)
    rollouts = query(
        db,
        "SELECT rollout_id, target_build_id, state, version, current_percentage"
        " FROM active_rollouts",
    )
    tracked = [i for i in state.issues.values() if i["title"].startswith("Rollout ")]
    if len(tracked) != len(rollouts):
        problems.append(f"{len(rollouts)} rollouts, {len(tracked)} tracking issues")
    for r in rollouts:
        key = f"rollout-{r['rollout_id']}"
        number = numbers.get(created_issue_target(repo, key))
        if number is None:
            problems.append(f"rollout {r['rollout_id']}: no tracking issue was made")
            continue
        issue = state.issue(number)
        name = f"#{number} (rollout of {r['target_build_id']}, {r['state']})"
        comments = sorted(
            (c for c in state.comments.values() if c["issue_url"] == issue["url"]),
            key=lambda c: c["id"],
        )
        versions = [
            v
            for c in comments
            for v in range(2, r["version"] + 1)
            if marker(f"{key}-v{v}") in c["body"]
        ]
        if versions != list(range(2, r["version"] + 1)):
            problems.append(
                f"{name}: transition comments for versions {versions}, expected 2..{r['version']}"
            )
        labels = {label["name"] for label in issue["labels"]}
        if labels != {ROLLOUT_LABEL, STATE_LABELS[r["state"]]}:
            problems.append(f"{name}: labels {sorted(labels)}")
        closed = {"completed": "completed", "rolled_back": "not_planned"}.get(r["state"])
        if [e.action for e in history(db, r["rollout_id"])][-2:] == ["complete", "rollback"]:
            closed = None  # a rollback after completion reopens the issue (rollouts.md)
        shown = (issue["state"], issue["state_reason"]) if closed else (issue["state"],)
        if shown != (("closed", closed) if closed else ("open",)):
            problems.append(f"{name}: the issue is {shown}")
        heading = (
            f"**{r['state'].replace('_', ' ').capitalize()}** at **{r['current_percentage']:g}%**"
        )
        if not (issue["body"] or "").startswith(heading):
            problems.append(
                f"{name}: the body begins {(issue['body'] or '')[:80]!r}, not {heading!r}"
            )
    return problems


def bodies_current(db: Path, github: FakeGitHub, repo: str) -> bool:
    """Whether every tracking issue's body shows its rollout's current state (the last
    render after the last change has been applied)."""
    return not [p for p in tracking_problems(db, github, repo) if "the body begins" in p]


def pending(db: Path) -> tuple[int, int]:
    """Deliveries and outbox entries still to do."""
    deliveries = query(db, "SELECT count(*) AS n FROM webhook_deliveries WHERE status = 'pending'")
    outbox = query(db, "SELECT count(*) AS n FROM outbox WHERE status = 'pending'")
    return deliveries[0]["n"], outbox[0]["n"]


def logged_errors(service: ServiceProcess) -> list[str]:
    """What any run of the service logged as an error: a background task that died (the
    next kill would hide it), an outbox entry parked, and the like."""
    found = []
    for run, log in enumerate(service.logs, start=1):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                found.append(f"run {run}: {line[:300]}")  # a traceback, say
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                found.append(f"run {run}: {entry.get('message')} {entry.get('exception', '')}")
    return found


def write_requests(github: FakeGitHub, path: Path) -> None:
    """GitHub's side of the story, one request a line, for reading after a failure."""
    with path.open("w", encoding="utf-8") as out:
        for index, r in enumerate(github.requests):
            body = json.dumps(r.json)[:300] if r.json is not None else ""
            out.write(f"{index} {r.status} {r.method} {r.path} {body}\n")
