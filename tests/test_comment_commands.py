"""Slash commands end to end: a signed issue_comment delivery goes in, the commands run
with the commenter's permission checked, and the answer (reactions, one escaped reply)
reaches the fake GitHub through the outbox."""

from __future__ import annotations

import copy
import json
import uuid

import pytest

from app.github.commands import (
    CommandRefused,
    CommandRegistry,
    Invocation,
    Permission,
    escape_for_comment,
)
from app.github.outbox import add_labels, marker
from tests.conftest import Api, MakeApi
from tests.fake_github import FakeGitHub
from tests.test_webhooks import HOOK, WEBHOOKS, headers_for, wait_until

REPO = "acme/runner"
BASE = json.loads((WEBHOOKS / "issue_comment.created.0.json").read_text())


class Feature:
    """A feature with a few commands, recording what ran."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str, str]] = []
        self.registry = CommandRegistry()
        self.registry.register("deploy", Permission.WRITE, "deploy a version", self.deploy)
        self.registry.register("status", Permission.READ, "say where things stand", self.status)
        self.registry.register("boom", Permission.READ, "fail unexpectedly", self.boom)
        self.registry.register(
            "pause",
            Permission.WRITE,
            "pause this rollout",
            self.status,
            where=lambda place: "rollout" in place.labels,
        )

    async def deploy(self, call: Invocation) -> str:
        self.ran.append(("deploy", call.command.args, call.actor))
        if not call.command.args:
            raise CommandRefused("which version? Usage: `/deploy <version>`")
        if call.command.args.startswith("@"):
            raise CommandRefused(f"no version {escape_for_comment(call.command.args)}")
        call.effects.append(
            add_labels(
                call.installation_id,
                call.place.repo,
                ["deploying"],
                issue_number=call.place.issue_number,
            )
        )
        return f"deploying {escape_for_comment(call.command.args)}"

    async def status(self, call: Invocation) -> None:
        self.ran.append(("status", call.command.args, call.actor))

    async def boom(self, call: Invocation) -> None:
        raise RuntimeError("the handler has a bug")


@pytest.fixture
def feature() -> Feature:
    return Feature()


@pytest.fixture
async def api(
    make_api: MakeApi, github_settings, github: FakeGitHub, installation: int, feature: Feature
) -> Api:
    return await make_api(
        settings_override=github_settings, with_github=True, commands=feature.registry
    )


@pytest.fixture
def issue(github: FakeGitHub, installation: int) -> int:
    return github.add_issue(REPO, "Roll out build-1", labels=["rollout"])


class Thread:
    """Comments on one issue, posted as GitHub would deliver them."""

    def __init__(
        self,
        api: Api,
        github: FakeGitHub,
        installation: int,
        issue: int,
        labels: tuple[str, ...] = ("rollout",),
    ) -> None:
        self.api, self.github, self.installation, self.issue = api, github, installation, issue
        self.labels = labels

    async def say(
        self,
        body: str,
        *,
        user: str = "octocat",
        bot: bool = False,
        action: str = "created",
        delivery: str | None = None,
        comment_id: int | None = None,
    ) -> int:
        if comment_id is None:
            comment_id = self.github.add_comment(REPO, self.issue, body, user=user)
        payload = copy.deepcopy(BASE)
        author = {**payload["comment"]["user"], "login": user, "type": "Bot" if bot else "User"}
        payload["action"] = action
        payload["comment"].update(id=comment_id, body=body, user=author)
        payload["sender"] = author
        payload["issue"].update(number=self.issue, labels=[{"name": n} for n in self.labels])
        payload["issue"].pop("pull_request", None)
        payload["repository"]["full_name"] = REPO
        payload["installation"] = {"id": self.installation}
        data = json.dumps(payload).encode()
        headers = headers_for("issue_comment", data)
        if delivery is not None:
            headers["X-GitHub-Delivery"] = delivery
        response, _ = await self.api.post(HOOK, data=data, headers=headers)
        assert response.status == 202
        await self.settled()
        return comment_id

    async def settled(self) -> None:
        store = self.api.services.store

        async def quiet() -> bool:
            deliveries = await store.list_deliveries(status="pending", before=None, limit=1)
            stats = await store.outbox_stats()
            return not deliveries and stats.pending == 0

        await wait_until(quiet)

    def reactions(self, comment_id: int) -> list[str]:
        found = self.github.repo(REPO).reactions.get(("comment", comment_id), [])
        return [r["content"] for r in found]

    def replies(self) -> list[str]:
        comments = sorted(self.github.repo(REPO).comments.values(), key=lambda c: c["id"])
        return [c["body"] for c in comments if c["user"]["type"] == "Bot"]


@pytest.fixture
def thread(api: Api, github: FakeGitHub, installation: int, issue: int) -> Thread:
    return Thread(api, github, installation, issue)


async def test_a_writer_runs_a_command_and_sees_eyes_the_reply_then_a_rocket(
    thread: Thread, github: FakeGitHub, feature: Feature
) -> None:
    github.set_permission(REPO, "octocat", "write")
    comment = await thread.say("Shipping it.\n/deploy 2.1.0")

    assert feature.ran == [("deploy", "2.1.0", "octocat")]
    assert thread.reactions(comment) == ["eyes", "rocket"]
    assert thread.replies() == [f"`/deploy`: deploying 2\\.1\\.0\n\n{marker(f'reply-{comment}')}"]
    writes = [c.operation for c in github.calls("POST /repos/*")]
    assert writes == [
        "POST /repos/{owner}/{repo}/issues/comments/{comment_id}/reactions",  # 👀 first
        "POST /repos/{owner}/{repo}/issues/{issue_number}/labels",  # the command's effect
        "POST /repos/{owner}/{repo}/issues/{issue_number}/comments",  # the reply
        "POST /repos/{owner}/{repo}/issues/comments/{comment_id}/reactions",  # 🚀 last
    ]


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        ("read", False),
        ("triage", False),
        ("write", True),
        ("maintain", True),
        ("admin", True),
        (None, False),  # not a collaborator: GitHub answers 404
    ],
)
async def test_the_permission_check_follows_the_commenters_role(
    thread: Thread, github: FakeGitHub, feature: Feature, role: str | None, allowed: bool
) -> None:
    if role is not None:
        github.set_permission(REPO, "octocat", role)
    comment = await thread.say("/deploy 2.1.0")

    assert bool(feature.ran) is allowed
    if allowed:
        assert thread.reactions(comment) == ["eyes", "rocket"]
    else:
        assert thread.reactions(comment) == ["eyes", "confused"]
        (reply,) = thread.replies()
        assert reply.startswith(
            f"`/deploy` needs **write** permission on this repository; octocat has"
            f" **{role or 'none'}**."
        )


@pytest.mark.parametrize(("base", "allowed"), [("write", True), ("triage", False)])
async def test_a_custom_role_counts_as_its_base_permission(
    thread: Thread, github: FakeGitHub, feature: Feature, base: str, allowed: bool
) -> None:
    github.set_permission(REPO, "octocat", "release-manager", base=base)
    await thread.say("/deploy 2.1.0")
    assert bool(feature.ran) is allowed


async def test_several_commands_run_in_order_and_share_one_reply(
    thread: Thread, github: FakeGitHub, feature: Feature
) -> None:
    github.set_permission(REPO, "octocat", "write")
    comment = await thread.say(
        "/status\n/deploy\n```\n/deploy 9.9.9\n```\n> /deploy 8\n\n/deploy 3"
    )

    assert feature.ran == [
        ("status", "", "octocat"),
        ("deploy", "", "octocat"),
        ("deploy", "3", "octocat"),
    ]
    (reply,) = thread.replies()
    assert reply.split("\n\n")[:2] == [
        "`/deploy`: which version? Usage: `/deploy <version>`",
        "`/deploy`: deploying 3",
    ]
    assert thread.reactions(comment) == ["eyes", "rocket", "confused"]


async def test_help_lists_what_the_commenter_can_use_here(
    thread: Thread, github: FakeGitHub
) -> None:
    github.set_permission(REPO, "octocat", "read")
    await thread.say("/help")
    (reply,) = thread.replies()
    assert "your permission: read" in reply
    assert "`/status`" in reply and "`/boom`" in reply
    assert "`/deploy" not in reply and "`/pause" not in reply
    assert "2 more command(s) need a higher permission" in reply


async def test_a_command_that_does_not_apply_here_says_so(
    thread: Thread, github: FakeGitHub, feature: Feature, api: Api, installation: int
) -> None:
    github.set_permission(REPO, "octocat", "admin")
    bug = Thread(api, github, installation, github.add_issue(REPO, "A bug"), labels=())
    comment = await bug.say("/pause")
    assert feature.ran == []
    assert bug.reactions(comment) == ["eyes", "confused"]
    assert bug.replies()[0].startswith("`/pause` is not available here; `/help` lists what is.")

    await thread.say("/pause")  # on the rollout's issue it runs
    assert feature.ran == [("status", "", "octocat")]


async def test_echoed_text_pings_no_one_and_renders_no_html(
    thread: Thread, github: FakeGitHub
) -> None:
    github.set_permission(REPO, "octocat", "write")
    await thread.say("/deploy @admins <script>alert(1)</script> [x](http://evil)")
    (reply,) = thread.replies()
    assert "@admins" not in reply and "<script>" not in reply and "](http" not in reply
    assert "@\u200dadmins" in reply and "&lt;script&gt;" in reply


async def test_a_handler_bug_is_reported_and_later_commands_still_run(
    thread: Thread, github: FakeGitHub, feature: Feature
) -> None:
    github.set_permission(REPO, "octocat", "write")
    comment = await thread.say("/boom\n/status")
    assert feature.ran == [("status", "", "octocat")]
    (reply,) = thread.replies()
    assert reply.startswith("`/boom` failed with an internal error")
    assert "the handler has a bug" not in reply  # details stay in the log
    assert thread.reactions(comment) == ["eyes", "rocket", "confused"]


@pytest.mark.parametrize("who", ["bot", "app"])
async def test_comments_by_bots_are_ignored(
    thread: Thread, github: FakeGitHub, feature: Feature, who: str
) -> None:
    user = f"{github.bot_login}" if who == "app" else "dependabot[bot]"
    await thread.say("/status", user=user, bot=True)
    assert feature.ran == []
    assert github.calls("POST /repos/*") == []


@pytest.mark.parametrize("action", ["edited", "deleted"])
async def test_edited_and_deleted_comments_run_nothing(
    thread: Thread, github: FakeGitHub, feature: Feature, action: str
) -> None:
    github.set_permission(REPO, "octocat", "write")
    await thread.say("/deploy 1", action=action)
    assert feature.ran == []
    assert github.calls("POST /repos/*") == []


async def test_a_redelivered_comment_acts_once(
    thread: Thread, github: FakeGitHub, feature: Feature
) -> None:
    github.set_permission(REPO, "octocat", "write")
    delivery = str(uuid.uuid4())
    comment = await thread.say("/deploy 1", delivery=delivery)
    await thread.say("/deploy 1", delivery=delivery, comment_id=comment)
    assert feature.ran == [("deploy", "1", "octocat")]
    assert len(thread.replies()) == 1


async def test_comments_without_commands_cost_no_github_call(
    thread: Thread, github: FakeGitHub
) -> None:
    await thread.say("Looks good to me. Use /deploy later, please.")
    assert [c for c in github.calls() if c.path.startswith("/repos/")] == []
