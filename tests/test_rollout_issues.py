"""Rollouts as tracked GitHub issues: the issue, its comments and labels, its body, and
the slash commands that steer the rollout from it; against the fake GitHub, which checks
every request against GitHub's description."""

from __future__ import annotations

import copy
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.github.tracking import MAX_BODY, ROLLOUT_LABEL, TrackingSync, render_body
from app.rollouts.controller import EnterpriseOrg, Gate, NextStep, RolloutView, StageReport
from app.rollouts.gates import Counts, Thresholds, compare, judge_stage
from app.store import BuildRecord, Rollout
from tests.conftest import START, Api, MakeApi
from tests.fake_github import FakeGitHub
from tests.test_webhooks import HOOK, WEBHOOKS, headers_for, wait_until

CONTROL = "acme/control"
OLD, NEW = "build-old", "build-new"
ORGS = [f"org-{n:02d}" for n in range(20)]
BASE = json.loads((WEBHOOKS / "issue_comment.created.0.json").read_text())


@pytest.fixture
def control(github: FakeGitHub) -> int:
    installation = github.add_installation(account="acme", repos=[CONTROL])
    for user, role in [
        ("reader", "read"),
        ("triager", "triage"),
        ("writer", "write"),
        ("maintainer", "maintain"),
        ("owner", "admin"),
    ]:
        github.set_permission(CONTROL, user, role)
    github.set_permission(CONTROL, "releaser", "release-manager", base="maintain")
    return installation


@pytest.fixture
async def api(
    make_api: MakeApi,
    github_settings: Settings,
    github: FakeGitHub,
    control: int,
    request: pytest.FixtureRequest,
) -> Api:
    marker = request.node.get_closest_marker("settings")
    settings = github_settings.replace(
        control_repo=CONTROL,
        stages_stable="50%:1h,100%",
        notify_team="@acme/oncall",
        **(marker.kwargs if marker else {}),
    )
    api = await make_api(settings_override=settings, with_github=True)
    admin = await api.token("admin", name="ops")
    for build in (OLD, NEW):
        runtimes = {"codex": "0.47.0" if build == NEW else "0.46.0"}
        await api.services.store.add_build(
            BuildRecord(build, "1.0.0", START, runtimes, known_good_for=["codex"]), START
        )
    await api.request(
        "PUT", "/channels/stable", token=admin, json={"buildId": OLD, "reason": "today"}
    )
    for org in ORGS:
        body = {
            "runnerId": "r1",
            "orgId": org,
            "bootId": "b1",
            "buildId": OLD,
            "sessions": {"started": 0, "failed": 0, "disconnected": 0},
        }
        response, _ = await api.post("/heartbeat", token=admin, json=body)
        assert response.status == 200
    await wait_until(lambda: _installed(api))
    return api


async def _installed(api: Api) -> bool:
    return await api.services.store.installation_for_repository(CONTROL) is not None


class Control:
    """Comments on the control repository's issues, delivered as GitHub would."""

    def __init__(self, api: Api, github: FakeGitHub, installation: int) -> None:
        self.api, self.github, self.installation = api, github, installation

    async def say(
        self, issue: int, body: str, *, user: str = "maintainer", comment_id: int | None = None
    ) -> int:
        """Post a comment (or, with ``comment_id``, deliver that comment again as a new
        delivery, as after a crash that lost the first one's outcome)."""
        if comment_id is None:
            comment_id = self.github.add_comment(CONTROL, issue, body, user=user)
        stored = self.github.repo(CONTROL).issue(issue)
        payload = copy.deepcopy(BASE)
        author = {**payload["comment"]["user"], "login": user, "type": "User"}
        payload["comment"].update(id=comment_id, body=body, user=author)
        payload["sender"] = author
        payload["issue"].update(
            number=issue,
            labels=[{"name": label["name"]} for label in stored["labels"]],
            state=stored["state"],
        )
        payload["issue"].pop("pull_request", None)
        payload["repository"]["full_name"] = CONTROL
        payload["installation"] = {"id": self.installation}
        data = json.dumps(payload).encode()
        response, _ = await self.api.post(
            HOOK, data=data, headers=headers_for("issue_comment", data)
        )
        assert response.status == 202
        await self.settled()
        return comment_id

    async def settled(self) -> None:
        store = self.api.services.store

        async def quiet() -> bool:
            deliveries = await store.list_deliveries(status="pending", before=None, limit=1)
            return not deliveries and (await store.outbox_stats()).pending == 0

        await wait_until(quiet)

    def issues(self) -> list[dict[str, Any]]:
        return list(self.github.repo(CONTROL).issues.values())

    def tracking(self) -> dict[str, Any]:
        found = [i for i in self.issues() if i["title"].startswith("Rollout ")]
        assert len(found) == 1, [i["title"] for i in self.issues()]
        return found[0]

    def comments(self, issue: int) -> list[str]:
        return [
            c["body"]
            for c in self.github.repo(CONTROL).comments.values()
            if c["issue_url"].endswith(f"/issues/{issue}")
        ]

    def labels(self, issue: int) -> set[str]:
        return {label["name"] for label in self.github.repo(CONTROL).issue(issue)["labels"]}

    def reactions(self, comment_id: int) -> list[str]:
        return [
            r["content"]
            for r in self.github.repo(CONTROL).reactions.get(("comment", comment_id), [])
        ]

    async def render(self) -> None:
        sync = self.api.services.pipeline.component("tracking_sync")  # type: ignore[union-attr]
        assert isinstance(sync, TrackingSync)
        await sync.sync()
        await self.settled()


@pytest.fixture
def gh(api: Api, github: FakeGitHub, control: int) -> Control:
    return Control(api, github, control)


async def rollout(api: Api) -> dict[str, Any]:
    _, page = await api.get("/rollouts", token=await api.token("viewer"))
    assert len(page["items"]) == 1
    return page["items"][0]


async def test_a_rollout_driven_from_its_issue_alone(api: Api, gh: Control, github: FakeGitHub):
    lobby = github.add_issue(CONTROL, "Releases")
    said = await gh.say(lobby, "/rollout build-new stable")
    assert gh.reactions(said) == ["eyes", "rocket"]
    issue = gh.tracking()
    number = issue["number"]
    assert issue["title"] == "Rollout build-new → stable"
    assert gh.labels(number) == {ROLLOUT_LABEL, "rollout:rolling-out"}
    assert "started rollout" in gh.comments(lobby)[-1]
    r = await rollout(api)
    assert (r["state"], r["startedBy"]) == ("rolling_out", "maintainer")

    await gh.render()
    body = github.repo(CONTROL).issue(number)["body"]
    assert "**Rolling out** at **50%**" in body and "| 1 ◀ | 50%" in body

    said = await gh.say(number, "/pause looking at a report", user="writer")
    assert gh.reactions(said) == ["eyes", "rocket"]
    assert gh.labels(number) == {ROLLOUT_LABEL, "rollout:paused"}
    assert "Paused at 50% by writer: looking at a report." in gh.comments(number)[-2]
    await gh.say(number, "/resume")
    assert (await rollout(api))["state"] == "rolling_out"
    await gh.say(number, "/advance full")
    r = await rollout(api)
    assert (r["state"], r["currentPercentage"]) == ("completed", 100)
    stored = github.repo(CONTROL).issue(number)
    assert (stored["state"], stored["state_reason"]) == ("closed", "completed")
    assert gh.labels(number) == {ROLLOUT_LABEL, "rollout:completed"}
    assert any("Completed: `build-new`" in c for c in gh.comments(number))

    # Closed: commands there change nothing. A late rollback through the API reopens it.
    said = await gh.say(number, "/pause")
    assert gh.reactions(said) == ["eyes", "confused"]
    assert "closed" in gh.comments(number)[-1]
    admin = await api.token("admin", name="oncall")
    response, _ = await api.post(
        f"/rollouts/{r['rolloutId']}/rollback", token=admin, json={"reason": "late bug"}
    )
    assert response.status == 200
    await gh.settled()
    assert github.repo(CONTROL).issue(number)["state"] == "open"
    assert gh.labels(number) == {ROLLOUT_LABEL, "rollout:rolled-back"}
    _, history = await api.get(f"/rollouts/{r['rolloutId']}/history", token=admin)
    assert [(h["action"], h["actor"]) for h in history["items"]] == [
        ("start", "maintainer"),
        ("pause", "writer"),
        ("resume", "maintainer"),
        ("advance", "maintainer"),
        ("complete", "auto"),
        ("rollback", "token oncall"),
    ]


# Each command, the role just below what it needs and the role it needs.
BELOW = {"triage": "reader", "write": "triager", "maintain": "writer"}
AT = {"triage": "triager", "write": "writer", "maintain": "maintainer"}
NEEDS = [
    ("/status", "triage"),
    ("/pause", "write"),
    ("/rollback broken", "write"),
    ("/resume", "maintain"),
    ("/advance", "maintain"),
    ("/approve org-01", "maintain"),
    ("/skip org-01", "maintain"),
    ("/rollout build-new beta", "maintain"),
    ("/freeze calm down", "maintain"),
    ("/unfreeze", "maintain"),
]


@pytest.mark.parametrize(
    ("command", "user", "allowed"),
    [(c, BELOW[level], False) for c, level in NEEDS]
    + [(c, AT[level], True) for c, level in NEEDS]
    + [("/advance", "releaser", True), ("/advance", "owner", True)],
)
async def test_the_permission_each_command_needs(
    api: Api, gh: Control, github: FakeGitHub, command: str, user: str, allowed: bool
):
    admin = await api.token("admin")
    await api.post("/rollouts", token=admin, json={"buildId": NEW, "channel": "stable"})
    await gh.settled()
    number = gh.tracking()["number"]
    before = await rollout(api)
    await gh.say(number, command, user=user)
    reply = gh.comments(number)[-1]
    # Allowed: whatever the command then says, it is not about permission.
    assert ("needs **" in reply) is not allowed, reply
    if not allowed:
        assert await rollout(api) == before
        _, frozen = await api.get("/freeze", token=admin)
        assert frozen["frozen"] is None


@pytest.mark.settings(command_permissions=(("pause", "maintain"), ("status", "write")))
async def test_the_permissions_can_be_changed(api: Api, gh: Control, github: FakeGitHub):
    admin = await api.token("admin")
    await api.post("/rollouts", token=admin, json={"buildId": NEW, "channel": "stable"})
    await gh.settled()
    number = gh.tracking()["number"]
    said = await gh.say(number, "/pause", user="writer")
    assert gh.reactions(said)[-1] == "confused"
    assert "`/pause` needs **maintain**" in gh.comments(number)[-1]
    said = await gh.say(number, "/status", user="triager")
    assert gh.reactions(said)[-1] == "confused"
    said = await gh.say(number, "/pause", user="maintainer")
    assert gh.reactions(said)[-1] == "rocket"


async def test_a_redelivered_or_repeated_command_acts_once(
    api: Api, gh: Control, github: FakeGitHub
):
    admin = await api.token("admin")
    await api.post("/rollouts", token=admin, json={"buildId": NEW, "channel": "stable"})
    await gh.settled()
    number = gh.tracking()["number"]
    await gh.say(number, "/pause first\n\n```\n/rollback inside a code block\n```")
    assert (await rollout(api))["state"] == "paused"
    _, history = await api.get(
        f"/rollouts/{(await rollout(api))['rolloutId']}/history", token=admin
    )
    assert [h["action"] for h in history["items"]] == ["start", "pause"]
    # /rollback without a reason is refused; /resume then /pause in one comment both run.
    said = await gh.say(number, "/rollback\n/resume\n/pause again")
    assert gh.reactions(said) == ["eyes", "rocket", "confused"]
    assert "needs a reason" in gh.comments(number)[-1]
    assert (await rollout(api))["state"] == "paused"


async def test_the_same_comment_processed_again_does_not_act_twice(
    api: Api, gh: Control, github: FakeGitHub
):
    admin = await api.token("admin")
    await api.post("/rollouts", token=admin, json={"buildId": NEW, "channel": "stable"})
    await gh.settled()
    number = gh.tracking()["number"]
    first = await gh.say(number, "/advance")
    assert (await rollout(api))["currentPercentage"] == 100
    await gh.say(number, "/advance", comment_id=first)  # a second delivery of it
    r = await rollout(api)
    _, history = await api.get(f"/rollouts/{r['rolloutId']}/history", token=admin)
    assert [h["action"] for h in history["items"]] == ["start", "advance", "complete"]


async def test_approve_skip_status_freeze_and_unfreeze_by_command(
    api: Api, gh: Control, github: FakeGitHub
):
    admin = await api.token("admin")
    for org in ("ent-a", "ent-b"):
        await api.request(
            "PUT",
            f"/orgs/{org}",
            token=admin,
            json={"channel": "stable", "enterprise": {"approvalRequired": True}},
        )
    lobby = github.add_issue(CONTROL, "Releases")
    await gh.say(lobby, "/rollout build-new")
    assert "usage: `/rollout <buildId> <channel>`" in gh.comments(lobby)[-1]
    await gh.say(lobby, "/rollout build-new stable")
    number = gh.tracking()["number"]
    await gh.say(number, "/approve ent-a\n/skip ent-b\n/approve nobody")
    reply = gh.comments(number)[-1]
    assert "`ent-a` approved" in reply and "`ent-b` skipped" in reply
    assert "`/approve`: no org" in reply
    await gh.say(number, "/status", user="triager")
    assert "rolling out at 50%" in gh.comments(number)[-1]
    await gh.say(lobby, "/freeze release week")
    said = await gh.say(number, "/advance")
    assert gh.reactions(said)[-1] == "confused"
    assert "frozen" in gh.comments(number)[-1]
    await gh.say(lobby, "/unfreeze")
    await gh.say(number, "/advance full")
    r = await rollout(api)
    assert r["state"] == "completed"  # both enterprise orgs had decided
    _, view = await api.get(f"/rollouts/{r['rolloutId']}", token=admin)
    assert {e["orgId"]: e["decision"] for e in view["enterprise"]} == {
        "ent-a": "approved",
        "ent-b": "skipped",
    }


async def test_commands_outside_a_tracking_issue_say_so(api: Api, gh: Control, github: FakeGitHub):
    elsewhere = github.add_issue(CONTROL, "Not a rollout", labels=[ROLLOUT_LABEL])
    said = await gh.say(elsewhere, "/pause")
    assert gh.reactions(said) == ["eyes", "confused"]
    assert "does not track a rollout" in gh.comments(elsewhere)[-1]
    plain = github.add_issue(CONTROL, "Chat")
    said = await gh.say(plain, "/pause")
    assert "not available here" in gh.comments(plain)[-1]


async def test_an_automatic_rollback_says_what_tripped_it_and_calls_the_team(
    api: Api, gh: Control, github: FakeGitHub
):
    admin = await api.token("admin")
    _, started = await api.post(
        "/rollouts", token=admin, json={"buildId": NEW, "channel": "stable"}
    )
    await gh.settled()
    number = gh.tracking()["number"]
    for org in started["affectedOrgIds"]:
        for n, (total, failed) in enumerate([(0, 0), (60, 30)]):
            await api.post(
                "/heartbeat",
                token=admin,
                json={
                    "runnerId": "r1",
                    "orgId": org,
                    "bootId": f"b{n + 2}",
                    "buildId": NEW,
                    "sessions": {"started": total, "failed": failed, "disconnected": 0},
                },
            )
    await gh.settled()
    assert (await rollout(api))["state"] == "rolled_back"
    comment = next(c for c in gh.comments(number) if "Rolled back automatically" in c)
    assert comment.startswith("@acme/oncall **Rolled back automatically** at 50%: failure rate")
    assert "threshold 0.1 after" in comment
    stored = github.repo(CONTROL).issue(number)
    assert (stored["state"], stored["state_reason"]) == ("closed", "not_planned")


async def test_body_edits_are_coalesced_and_end_on_the_latest_state(
    api: Api, gh: Control, github: FakeGitHub
):
    admin = await api.token("admin")
    _, started = await api.post(
        "/rollouts", token=admin, json={"buildId": NEW, "channel": "stable"}
    )
    await gh.settled()
    number = gh.tracking()["number"]
    rollout_id = started["rolloutId"]
    edits_before = sum(
        1 for r in github.requests if r.method == "PATCH" and r.path.endswith(f"/issues/{number}")
    )
    for n in range(25):
        await api.post(f"/rollouts/{rollout_id}/pause", token=admin, json={"reason": f"p{n}"})
        await api.post(f"/rollouts/{rollout_id}/resume", token=admin)
    await gh.render()
    await gh.render()  # nothing changed since: no edit
    edits = sum(
        1 for r in github.requests if r.method == "PATCH" and r.path.endswith(f"/issues/{number}")
    )
    # The background sync may have sent one more while the commands ran; never fifty.
    assert 1 <= edits - edits_before <= 3
    assert "**Rolling out** at **50%**" in github.repo(CONTROL).issue(number)["body"]


# -- the body, as a pure function -------------------------------------------------------------

EXPECTED = Path(__file__).parent / "expected" / "rollout_issue_body.md"


def fixed_view(enterprise: int = 2) -> RolloutView:
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    rollout = Rollout(
        "r-1",
        NEW,
        "stable",
        "rolling_out",
        "1%:1h,10%:2h,50%:4h,100%",
        1,
        10,
        at,
        at + timedelta(hours=1),
        stage_started_at=at + timedelta(hours=1),
        deadline_at=at + timedelta(hours=3),
        previous_build_id=OLD,
        started_by="maintainer",
    )
    limits = Thresholds()
    stages = (
        StageReport(
            0,
            1,
            timedelta(hours=1),
            at,
            at + timedelta(hours=1),
            Counts(120, 3, 1),
            1,
            Counts(4000, 80, 20),
            judge_stage({"a": Counts(120, 3, 1)}, limits),
        ),
        StageReport(
            1,
            10,
            timedelta(hours=2),
            at + timedelta(hours=1),
            None,
            Counts(40, 1, 0),
            3,
            Counts(900, 20, 5),
            judge_stage({"a": Counts(40, 1, 0)}, limits),
        ),
        StageReport(2, 50, timedelta(hours=4), None, None, Counts(), 0, Counts(), None),
        StageReport(3, 100, None, None, None, Counts(), 0, Counts(), None),
    )
    comparison = compare(Counts(40, 1, 0), Counts(900, 20, 5))
    gate = Gate(stages[1].verdict, comparison, None)  # type: ignore[arg-type]
    orgs = tuple(
        EnterpriseOrg(
            f"ent-{n:03d}",
            "approved" if n % 2 else "pending",
            "maintainer" if n % 2 else None,
            at if n % 2 else None,
            None,
            False,
        )
        for n in range(enterprise)
    )
    step = NextStep(
        "advance",
        at + timedelta(hours=3),
        "to 50% at the deadline if 100 sessions are in (40 so far) and rates are within thresholds",
    )
    return RolloutView(rollout, stages, gate, step, 3, orgs, None)


def test_the_body_renders_a_fixed_state_as_expected(settings: Settings) -> None:
    body = render_body(
        fixed_view(),
        settings,
        {"codex": "0.47.0"},
        "passed (run 1)",
        api_url="https://pipeline.example/api/update-pipeline/rollouts/r-1",
    )
    if os.environ.get("UPDATE_EXPECTED"):  # after a deliberate change: rewrite, then review
        EXPECTED.write_text(body)
    assert body == EXPECTED.read_text()


def test_a_body_over_githubs_limit_is_cut_with_a_pointer_to_the_api(settings: Settings) -> None:
    body = render_body(
        fixed_view(enterprise=5000),
        settings,
        {"codex": "0.47.0"},
        None,
        api_url="https://pipeline.example/api/update-pipeline/rollouts/r-1",
    )
    assert len(body) <= MAX_BODY - 500
    assert "… and 4800 more: see [the API](https://pipeline.example" in body


# -- the issue's own events -------------------------------------------------------------------

ISSUES_BASE = json.loads((WEBHOOKS / "issues.edited.0.json").read_text())


async def issue_event(
    gh: Control, action: str, number: int, *, user: str, changes: dict[str, Any] | None = None
) -> None:
    stored = gh.github.repo(CONTROL).issue(number)
    payload = copy.deepcopy(ISSUES_BASE)
    sender = {**payload["sender"], "login": user, "type": "User"}
    payload.update(action=action, sender=sender, changes=changes or {})
    payload["issue"].update(
        number=number,
        body=stored["body"],
        state=stored["state"],
        labels=[{"name": label["name"]} for label in stored["labels"]],
    )
    payload["repository"]["full_name"] = CONTROL
    payload["installation"] = {"id": gh.installation}
    data = json.dumps(payload).encode()
    response, _ = await gh.api.post(HOOK, data=data, headers=headers_for("issues", data))
    assert response.status == 202
    await gh.settled()


async def tick(gh: Control, number: int, org: str, *, user: str, mark: str = "x") -> None:
    """``user`` edits the issue on GitHub, ticking (or, with mark " ", unticking) a box."""
    stored = gh.github.repo(CONTROL).issue(number)
    before = stored["body"]
    other = " " if mark == "x" else "x"
    stored["body"] = before.replace(f"- [{other}] `{org}`", f"- [{mark}] `{org}`")
    assert stored["body"] != before
    await issue_event(gh, "edited", number, user=user, changes={"body": {"from": before}})


@pytest.fixture
async def with_enterprise(api: Api, gh: Control) -> tuple[str, int]:
    admin = await api.token("admin")
    for org in ("ent-a", "ent-b"):
        await api.request(
            "PUT",
            f"/orgs/{org}",
            token=admin,
            json={"channel": "stable", "enterprise": {"approvalRequired": True}},
        )
    _, started = await api.post(
        "/rollouts", token=admin, json={"buildId": NEW, "channel": "stable"}
    )
    await gh.settled()
    await gh.render()
    return started["rolloutId"], gh.tracking()["number"]


async def test_ticking_a_box_approves_and_unticking_withdraws(
    api: Api, gh: Control, with_enterprise: tuple[str, int]
):
    rollout_id, number = with_enterprise
    assert "- [ ] `ent-a`: waiting" in gh.github.repo(CONTROL).issue(number)["body"]
    await tick(gh, number, "ent-a", user="maintainer")
    view = await gh.api.get(f"/rollouts/{rollout_id}", token=await api.token("viewer"))
    decisions = {e["orgId"]: (e["decision"], e["by"]) for e in view[1]["enterprise"]}
    assert decisions["ent-a"] == ("approved", "maintainer")
    await gh.render()
    assert "- [x] `ent-a`: approved by maintainer" in gh.github.repo(CONTROL).issue(number)["body"]
    await tick(gh, number, "ent-a", user="maintainer", mark=" ")
    view = await gh.api.get(f"/rollouts/{rollout_id}", token=await api.token("viewer"))
    assert {e["orgId"]: e["decision"] for e in view[1]["enterprise"]}["ent-a"] == "pending"
    assert any("decision withdrawn by maintainer" in c for c in gh.comments(number))


async def test_a_tick_without_permission_is_put_back_with_a_comment(
    api: Api, gh: Control, with_enterprise: tuple[str, int]
):
    rollout_id, number = with_enterprise
    await tick(gh, number, "ent-b", user="writer")
    _, view = await gh.api.get(f"/rollouts/{rollout_id}", token=await api.token("viewer"))
    assert {e["orgId"]: e["decision"] for e in view["enterprise"]}["ent-b"] == "pending"
    assert "needs **maintain** permission" in gh.comments(number)[-1]
    await gh.render()
    assert "- [ ] `ent-b`: waiting" in gh.github.repo(CONTROL).issue(number)["body"]


async def test_a_tracking_issue_closed_by_hand_is_reopened(
    api: Api, gh: Control, with_enterprise: tuple[str, int]
):
    _, number = with_enterprise
    stored = gh.github.repo(CONTROL).issue(number)
    stored["state"] = "closed"
    await issue_event(gh, "closed", number, user="writer")
    assert stored["state"] == "open"
    assert (
        "Reopened: this issue tracks a rollout that is still rolling out" in gh.comments(number)[-1]
    )
    assert (await rollout(api))["state"] == "rolling_out"


async def test_a_deleted_tracking_issue_is_made_again_and_works(
    api: Api, gh: Control, with_enterprise: tuple[str, int]
):
    _, number = with_enterprise
    await issue_event(gh, "deleted", number, user="owner")
    del gh.github.repo(CONTROL).issues[number]
    await gh.settled()
    again = gh.tracking()
    assert again["number"] != number
    assert f"#{number} was deleted" in again["body"]
    said = await gh.say(again["number"], "/pause after the deletion", user="writer")
    assert gh.reactions(said)[-1] == "rocket"
    assert (await rollout(api))["state"] == "paused"
