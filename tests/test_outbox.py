"""The durable outbox: side effects reach the fake GitHub once each, in order per object,
through outages, crashes, refusals and suspensions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from app.clock import ManualClock
from app.github.app import GitHubApp
from app.github.outbox import (
    REFUSED_ATTEMPTS,
    Outbox,
    OutboxWorker,
    add_comment,
    add_labels,
    add_reaction,
    create_check_run,
    dispatch_workflow,
    edit_issue,
    marker,
    open_issue,
    update_check_run,
)
from app.store import Conflict, Effect, Installation, Repository, SqliteStore
from tests.fake_github import FakeGitHub

REPO = "acme/runner"
COMMENTS = "POST /repos/{owner}/{repo}/issues/{issue_number}/comments"
ISSUES = "POST /repos/{owner}/{repo}/issues"


@pytest.fixture
def outbox(store: SqliteStore, clock: ManualClock) -> Outbox:
    return Outbox(store, clock)


@pytest.fixture
async def worker(outbox: Outbox, app_github: GitHubApp) -> AsyncIterator[OutboxWorker]:
    worker = OutboxWorker(outbox, app_github)
    yield worker
    await worker.stop()


@pytest.fixture
def issue(github: FakeGitHub, installation: int) -> int:
    return github.add_issue(REPO, "Roll out build-1")


def bodies(github: FakeGitHub) -> list[str]:
    return [c["body"] for c in sorted(github.repo(REPO).comments.values(), key=lambda c: c["id"])]


async def pending(store: SqliteStore) -> list[Effect]:
    return await store.list_effects(status="pending", limit=100)


async def test_entries_are_applied_in_the_order_they_were_written(
    outbox: Outbox, worker: OutboxWorker, github: FakeGitHub, installation: int, issue: int
) -> None:
    comment = github.add_comment(REPO, issue, "/pause")
    await outbox.add(
        [
            add_reaction(installation, REPO, issue, "eyes", comment_id=comment),
            add_comment(installation, REPO, issue, "Paused.", key="reply-1"),
            add_labels(installation, REPO, ["paused"], issue_number=issue),
            add_reaction(installation, REPO, issue, "rocket", comment_id=comment),
        ]
    )
    await worker.drain()

    assert [c.operation for c in github.calls("POST /repos/*")] == [
        "POST /repos/{owner}/{repo}/issues/comments/{comment_id}/reactions",
        COMMENTS,
        "POST /repos/{owner}/{repo}/issues/{issue_number}/labels",
        "POST /repos/{owner}/{repo}/issues/comments/{comment_id}/reactions",
    ]
    assert bodies(github)[-1] == f"Paused.\n\n{marker('reply-1')}"
    assert [r["content"] for r in github.repo(REPO).reactions[("comment", comment)]] == [
        "eyes",
        "rocket",
    ]
    assert await pending(worker.store) == []


async def test_an_issue_the_outbox_opens_is_then_addressed_by_its_key(
    outbox: Outbox, worker: OutboxWorker, github: FakeGitHub, installation: int
) -> None:
    await outbox.add(
        [
            open_issue(installation, REPO, "Rollout r-1", "Stage 1 of 4", key="rollout-r-1"),
            edit_issue(installation, REPO, issue_key="rollout-r-1", body="Stage 2 of 4"),
            edit_issue(installation, REPO, issue_key="rollout-r-1", title="Rollout r-1 (50%)"),
        ]
    )
    await worker.drain()

    (issue,) = github.repo(REPO).issues.values()
    assert issue["title"] == "Rollout r-1 (50%)"
    assert issue["body"] == f"Stage 2 of 4\n\n{marker('rollout-r-1')}"


async def test_check_runs_are_created_with_an_external_id_and_updated_through_it(
    outbox: Outbox, worker: OutboxWorker, github: FakeGitHub, installation: int
) -> None:
    sha = "a" * 40
    await outbox.add(
        [
            create_check_run(
                installation,
                REPO,
                sha,
                "canary",
                external_id="canary-build-1",
                fields={"status": "in_progress"},
            ),
            update_check_run(
                installation,
                REPO,
                "canary-build-1",
                {"status": "completed", "conclusion": "success"},
            ),
        ]
    )
    await worker.drain()

    (run,) = github.repo(REPO).check_runs.values()
    assert (run["external_id"], run["head_sha"]) == ("canary-build-1", sha)
    assert (run["status"], run["conclusion"]) == ("completed", "success")


async def test_entries_wait_out_a_github_outage_and_all_arrive_in_order(
    outbox: Outbox,
    worker: OutboxWorker,
    github: FakeGitHub,
    installation: int,
    issue: int,
    clock: ManualClock,
) -> None:
    outage = github.inject(COMMENTS, status=502, times=None)
    await outbox.add(
        [add_comment(installation, REPO, issue, f"update {n}", key=f"u-{n}") for n in range(5)]
    )
    for _ in range(6):  # six rounds of failures, each waiting longer
        await worker.drain()
        clock.advance(timedelta(minutes=10))
    waiting, *rest = sorted(await pending(worker.store), key=lambda e: e.id)
    assert len(rest) == 4 and waiting.attempts == 6
    assert waiting.last_error is not None and "502" in waiting.last_error
    assert all(e.attempts == 0 for e in rest)  # held behind the first: order per issue
    assert await worker.store.list_effects(status="failed", limit=10) == []

    outage.times = 0  # GitHub is back
    await worker.drain()

    assert [b.split("\n")[0] for b in bodies(github)] == [f"update {n}" for n in range(5)]


async def test_one_issue_held_up_does_not_hold_up_another(
    outbox: Outbox, worker: OutboxWorker, github: FakeGitHub, installation: int, issue: int
) -> None:
    other = github.add_issue(REPO, "Another rollout")
    github.inject(f"POST /repos/{REPO}/issues/{issue}/comments", status=502, times=None)
    await outbox.add(
        [
            add_comment(installation, REPO, issue, "stuck", key="s-1"),
            add_comment(installation, REPO, other, "through", key="t-1"),
        ]
    )
    await worker.drain()
    assert [b.split("\n")[0] for b in bodies(github)] == ["through"]


async def test_a_workflow_is_dispatched_with_its_key_as_an_input(
    outbox: Outbox, worker: OutboxWorker, github: FakeGitHub, installation: int
) -> None:
    github.add_workflow(REPO, "canary.yml", run_name="canary ${{ inputs.dispatch_id }}")
    await outbox.add(
        [
            dispatch_workflow(
                installation, REPO, "canary.yml", "main", key="canary-b1", inputs={"build": "b1"}
            )
        ]
    )
    await worker.drain()

    (dispatch,) = github.repo(REPO).dispatches
    assert dispatch["inputs"] == {"build": "b1", "dispatch_id": "canary-b1"}
    (done,) = await worker.store.list_effects(status="done", limit=1)
    assert done.result == {"run_id": dispatch["run_id"], "url": ANY_URL}


class _AnyUrl:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith("http")


ANY_URL = _AnyUrl()


@pytest.mark.parametrize("kind", ["comment", "issue", "check_run", "workflow_dispatch"])
async def test_a_crash_between_githubs_201_and_the_local_commit_duplicates_nothing(
    kind: str,
    outbox: Outbox,
    app_github: GitHubApp,
    github: FakeGitHub,
    installation: int,
    issue: int,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    effect = {
        "comment": add_comment(installation, REPO, issue, "Paused.", key="reply-9"),
        "issue": open_issue(installation, REPO, "Rollout r-2", "Stage 1", key="rollout-r-2"),
        "check_run": create_check_run(installation, REPO, "b" * 40, "canary", external_id="c-2"),
        "workflow_dispatch": dispatch_workflow(installation, REPO, "canary.yml", "main", key="d-2"),
    }[kind]
    github.add_workflow(REPO, "canary.yml", run_name="canary ${{ inputs.dispatch_id }}")
    await outbox.add([effect])

    class Crash(BaseException):
        """The process dies: nothing after this point runs."""

    async def crash(*_: Any) -> bool:
        raise Crash

    first = OutboxWorker(outbox, app_github)
    monkeypatch.setattr(outbox.store, "finish_effect", crash)
    with pytest.raises(Crash):
        await first.drain()
    monkeypatch.undo()
    created = len(github.calls("POST /repos/*"))
    assert created == 1  # GitHub made the object; the store never heard of it

    clock.advance(timedelta(minutes=1))
    restarted = OutboxWorker(outbox, app_github)
    await restarted.drain()

    assert len(github.calls("GET /repos/*")) >= 1  # looked for the object first,
    assert len(github.calls("POST /repos/*")) == 1  # found it, and did not make another
    (done,) = await outbox.store.list_effects(status="done", limit=10)
    assert done.result is not None and done.result["found"] is True
    objects = {
        "comment": lambda: github.repo(REPO).comments,
        "issue": lambda: [i for i in github.repo(REPO).issues.values() if i["number"] != issue],
        "check_run": lambda: github.repo(REPO).check_runs,
        "workflow_dispatch": lambda: github.repo(REPO).runs,
    }[kind]()
    assert len(objects) == 1


async def test_a_newer_body_edit_replaces_an_older_one_still_waiting(
    outbox: Outbox, worker: OutboxWorker, github: FakeGitHub, installation: int, issue: int
) -> None:
    for stage in range(1, 4):
        await outbox.add(
            [edit_issue(installation, REPO, issue_number=issue, body=f"stage {stage}")]
        )
    (entry,) = await pending(worker.store)
    assert entry.payload["body"] == "stage 3" and entry.revision == 2

    await worker.drain()
    assert github.repo(REPO).issue(issue)["body"] == "stage 3"
    assert len(github.calls("PATCH /repos/{owner}/{repo}/issues/{issue_number}")) == 1


async def test_an_edit_replaced_while_it_is_being_applied_is_applied_again(
    outbox: Outbox, worker: OutboxWorker, github: FakeGitHub, installation: int, issue: int
) -> None:
    async def newer_edit_arrives(*_: Any) -> None:
        await outbox.add([edit_issue(installation, REPO, issue_number=issue, body="newer")])

    await outbox.add([edit_issue(installation, REPO, issue_number=issue, body="older")])
    (entry,) = await pending(worker.store)
    started = await worker.store.start_effect(entry.id, worker.clock.now())
    assert started is not None
    await newer_edit_arrives()
    assert not await worker.store.finish_effect(started, None, worker.clock.now())

    await worker.drain()
    assert github.repo(REPO).issue(issue)["body"] == "newer"


async def test_title_or_state_edits_are_never_merged_away(
    outbox: Outbox, worker: OutboxWorker, github: FakeGitHub, installation: int, issue: int
) -> None:
    await outbox.add(
        [
            edit_issue(installation, REPO, issue_number=issue, title="one"),
            edit_issue(installation, REPO, issue_number=issue, state="closed"),
        ]
    )
    assert len(await pending(worker.store)) == 2


async def test_a_refused_entry_is_parked_and_the_next_one_goes_ahead(
    outbox: Outbox,
    worker: OutboxWorker,
    github: FakeGitHub,
    installation: int,
    issue: int,
    clock: ManualClock,
) -> None:
    github.inject(COMMENTS, status=422, times=None)
    await outbox.add(
        [
            add_comment(installation, REPO, issue, "refused", key="r-1"),
            add_labels(installation, REPO, ["after"], issue_number=issue),
        ]
    )
    for _ in range(REFUSED_ATTEMPTS):
        await worker.drain()
        clock.advance(timedelta(minutes=1))
    await worker.drain()

    (parked,) = await worker.store.list_effects(status="failed", limit=10)
    assert parked.kind == "comment" and parked.attempts == REFUSED_ATTEMPTS
    assert parked.last_error is not None and "422" in parked.last_error
    assert [lab["name"] for lab in github.repo(REPO).issue(issue)["labels"]] == ["after"]

    github.clear_faults()
    retried = await worker.store.retry_effect(parked.id, clock.now())
    assert retried is not None and retried.status == "pending"
    await worker.drain()
    assert bodies(github) == [f"refused\n\n{marker('r-1')}"]


async def test_entries_of_a_suspended_installation_wait_for_it(
    outbox: Outbox,
    worker: OutboxWorker,
    store: SqliteStore,
    github: FakeGitHub,
    installation: int,
    issue: int,
    clock: ManualClock,
) -> None:
    account = Installation(installation, "acme", "Organization", True, [Repository(1, REPO)])
    await store.save_installation(account, clock.now())
    await outbox.add([add_comment(installation, REPO, issue, "later", key="l-1")])
    await worker.drain()
    assert github.calls("POST /repos/*") == []
    (waiting,) = await pending(store)
    assert waiting.attempts == 0

    await store.set_installation_suspended(installation, False, clock.now())
    await worker.drain()
    assert bodies(github) == [f"later\n\n{marker('l-1')}"]


async def test_a_rate_limited_entry_waits_for_the_reset(
    outbox: Outbox,
    worker: OutboxWorker,
    github: FakeGitHub,
    installation: int,
    issue: int,
    clock: ManualClock,
) -> None:
    github.set_rate_limit(remaining=0, reset_in=1800)
    await outbox.add([add_comment(installation, REPO, issue, "soon", key="s-1")])
    await worker.drain()
    (waiting,) = await pending(worker.store)
    assert waiting.next_attempt_at >= clock.now() + timedelta(minutes=29)
    assert bodies(github) == []


async def test_retrying_a_parked_edit_superseded_by_a_newer_one_is_a_conflict(
    outbox: Outbox, worker: OutboxWorker, github: FakeGitHub, installation: int, issue: int
) -> None:
    github.inject("PATCH *", status=404, times=None)
    await outbox.add([edit_issue(installation, REPO, issue_number=issue, body="old")])
    (entry,) = await pending(worker.store)
    await worker.store.fail_effect(entry.id, "gone", retry_at=None, at=worker.clock.now())
    await outbox.add([edit_issue(installation, REPO, issue_number=issue, body="new")])
    with pytest.raises(Conflict):
        await worker.store.retry_effect(entry.id, worker.clock.now())


def test_marker_keys_cannot_close_the_html_comment() -> None:
    assert marker("rollout-r-1") == "<!-- update-pipeline:rollout-r-1 -->"
    for key in ["a -->", "x>y", "", "a b", "x" * 201]:
        with pytest.raises(ValueError):
            marker(key)
