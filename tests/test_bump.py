"""Bump pull requests: a version ready for the canary becomes one pull request in the runner
repository, kept up to date by newer versions, never duplicated, through crashes at any
step. Driven through the outbox against the fake GitHub."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest

from app.clock import ManualClock
from app.github.app import GitHubApp
from app.github.bump import BumpHandoff, bump_effect
from app.github.client import GitHubClient
from app.github.outbox import Outbox, OutboxWorker, marker
from app.pipeline.events import EventBus
from app.pipeline.version.watcher import Release, VersionWatcher
from app.store import (
    Effect,
    Installation,
    NewEffect,
    Repository,
    RuntimeVersionRecord,
    SqliteStore,
    Store,
)
from tests.conftest import START
from tests.fake_github import FakeGitHub, git_blob_sha

REPO = "acme/runner"
MANIFEST = "runtimes.json"
PREFIX = "update-pipeline/bump-"
BASE_TEXT = '{\n  "claude_code": "2.1.0",\n  "codex": "0.46.0",\n  "gemini_cli": "0.9.0"\n}\n'
RELEASED = START - timedelta(days=2)
CHANGES = ("POST", "PUT", "PATCH")


def source_url(version: str) -> str:
    return f"https://www.npmjs.com/package/@openai/codex/v/{version}"


def bump(installation: int, version: str, provider: str = "codex", **options: Any) -> NewEffect:
    options.setdefault("manifest_path", MANIFEST)
    options.setdefault("base_branch", None)
    options.setdefault("source_url", source_url(version))
    return bump_effect(
        installation, REPO, provider=provider, version=version, released_at=RELEASED, **options
    )


def with_version(text: str, provider: str, version: str) -> str:
    """``text`` with one provider's version changed, and nothing else."""
    old = json.loads(text)[provider]
    changed = text.replace(f'"{provider}": "{old}"', f'"{provider}": "{version}"')
    assert changed != text
    return changed


@pytest.fixture
def outbox(store: SqliteStore, clock: ManualClock) -> Outbox:
    return Outbox(store, clock)


@pytest.fixture
def runner(github: FakeGitHub, installation: int) -> int:
    """The runner repository with its manifest on main; the installation's id."""
    github.set_file(REPO, MANIFEST, BASE_TEXT)
    return installation


async def apply(outbox: Outbox, app_github: GitHubApp, *effects: NewEffect) -> list[Effect]:
    """Queue ``effects`` and drain the outbox; the entries applied, oldest first."""
    await outbox.add(list(effects))
    worker = OutboxWorker(outbox, app_github)
    try:
        await worker.drain()
    finally:
        await worker.stop()
    return await entries(outbox.store, "done")


async def entries(store: Store, status: str) -> list[Effect]:
    return sorted(await store.list_effects(status=status, limit=100), key=lambda e: e.id)


def bump_pulls(github: FakeGitHub) -> list[dict[str, Any]]:
    return [p for p in github.repo(REPO).pulls.values() if p["head"]["ref"].startswith(PREFIX)]


def bump_branches(github: FakeGitHub) -> list[str]:
    return sorted(
        ref.removeprefix("heads/")
        for ref in github.repo(REPO).refs
        if ref.startswith(f"heads/{PREFIX}")
    )


def file_on(github: FakeGitHub, branch: str) -> str:
    return github.repo(REPO).files[(branch, MANIFEST)].decode()


def commits_on(github: FakeGitHub, branch: str) -> int:
    """The commits the app made on ``branch`` (each accepted contents PUT is one)."""
    return sum(
        1
        for call in github.calls("PUT /repos/{owner}/{repo}/contents/{path}")
        if call.status in (200, 201) and call.json.get("branch") == branch
    )


def changes(github: FakeGitHub) -> list[str]:
    """The operations of every request that asked GitHub to change the repository."""
    return [
        str(call.operation)
        for call in github.calls()
        if call.method in CHANGES and call.path.startswith("/repos/")
    ]


class Crash(BaseException):
    """The process dies: nothing after this point runs."""


def die_after(monkeypatch: pytest.MonkeyPatch, outbox: Outbox, change: int | None) -> None:
    """The process dies right after GitHub accepted the ``change``-th change to the
    repository (None: once the applier returned, before the entry is marked done)."""
    if change is None:

        async def crash(*_: Any) -> bool:
            raise Crash

        monkeypatch.setattr(outbox.store, "finish_effect", crash)
        return
    original = GitHubClient._request
    made = 0

    async def request(
        self: GitHubClient, method: str, url: str, headers: Mapping[str, str], body: bytes = b""
    ) -> tuple[int, Mapping[str, str], bytes]:
        nonlocal made
        answer = await original(self, method, url, headers, body)
        if method in CHANGES and "/repos/" in url and answer[0] < 300:
            made += 1
            if made == change:
                raise Crash
        return answer

    monkeypatch.setattr(GitHubClient, "_request", request)


async def crash_then_restart(
    outbox: Outbox,
    app_github: GitHubApp,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    change: int | None,
    effect: NewEffect,
) -> Effect:
    await outbox.add([effect])
    die_after(monkeypatch, outbox, change)
    first = OutboxWorker(outbox, app_github)
    with pytest.raises(Crash):
        await first.drain()
    monkeypatch.undo()
    (left,) = await entries(outbox.store, "pending")  # the store never heard of the outcome
    clock.advance(timedelta(minutes=1))
    restarted = OutboxWorker(outbox, app_github)
    await restarted.drain()
    await restarted.stop()
    (done,) = [e for e in await entries(outbox.store, "done") if e.id == left.id]
    assert done.attempts == 2
    return done


# -- opening a bump pull request -------------------------------------------------------------


async def test_a_bump_opens_one_pull_request_that_changes_only_that_version(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    (done,) = await apply(outbox, app_github, bump(runner, "0.47.0"))

    branch = f"{PREFIX}codex-0.47.0"
    (pull,) = bump_pulls(github)
    assert (pull["head"]["ref"], pull["base"]["ref"]) == (branch, "main")
    assert pull["title"] == "Bump codex to 0.47.0"
    assert pull["body"] == (
        "Bumps `codex` in `runtimes.json` from `0.46.0` to `0.47.0`.\n"
        "\n"
        "- Released: 2026-02-27T12:00:00.000Z\n"
        f"- Source: <{source_url('0.47.0')}>\n"
        "\n"
        "update-pipeline opened this pull request because codex 0.47.0 is ready for the"
        " canary. It updates this pull request when a newer version is ready, rather than"
        " opening another.\n"
        "\n"
        f"{marker('bump-codex')}"
    )
    # The manifest keeps its order and layout: one line changes, on the branch only.
    assert file_on(github, branch) == with_version(BASE_TEXT, "codex", "0.47.0")
    assert file_on(github, "main") == BASE_TEXT
    assert bump_branches(github) == [branch]
    put = github.last("PUT /repos/{owner}/{repo}/contents/{path}")
    assert put.json["sha"] == git_blob_sha(BASE_TEXT.encode())
    assert put.json["message"] == "Bump codex to 0.47.0"
    assert pull["head"]["sha"] == github.repo(REPO).refs[f"heads/{branch}"]
    assert done.result == {
        "number": pull["number"],
        "url": pull["html_url"].replace("https://api.github.com", github.url),
        "version": "0.47.0",
        "branch": branch,
    }
    assert changes(github) == [
        "POST /repos/{owner}/{repo}/git/refs",
        "PUT /repos/{owner}/{repo}/contents/{path}",
        "POST /repos/{owner}/{repo}/pulls",
    ]


async def test_a_named_base_branch_and_a_manifest_in_a_folder(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    path = "config/runtimes.json"
    github.set_ref(REPO, "heads/release", "c" * 40)
    github.set_file(REPO, path, '{\n  "codex": "0.46.0"\n}\n', ref="release")
    await apply(
        outbox,
        app_github,
        bump(runner, "0.47.0", manifest_path=path, base_branch="release"),
    )

    (pull,) = bump_pulls(github)
    assert pull["base"]["ref"] == "release"
    assert github.repo(REPO).files[(pull["head"]["ref"], path)] == b'{\n  "codex": "0.47.0"\n}\n'
    assert github.calls("GET /repos/{owner}/{repo}") == []  # no need for the default branch


async def test_each_provider_gets_its_own_pull_request(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    await apply(
        outbox,
        app_github,
        bump(runner, "0.47.0"),
        bump(runner, "2.2.0", provider="claude_code"),
    )

    pulls = {p["title"]: p["head"]["ref"] for p in bump_pulls(github)}
    assert pulls == {
        "Bump codex to 0.47.0": f"{PREFIX}codex-0.47.0",
        "Bump claude_code to 2.2.0": f"{PREFIX}claude_code-2.2.0",
    }
    assert file_on(github, f"{PREFIX}claude_code-2.2.0") == with_version(
        BASE_TEXT, "claude_code", "2.2.0"
    )


# -- never twice ------------------------------------------------------------------------------


@pytest.mark.parametrize("change", [1, 2, 3, None], ids=["branch", "commit", "pull", "done"])
async def test_a_crash_after_any_step_of_opening_duplicates_nothing(
    change: int | None,
    outbox: Outbox,
    app_github: GitHubApp,
    github: FakeGitHub,
    runner: int,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    done = await crash_then_restart(
        outbox, app_github, clock, monkeypatch, change, bump(runner, "0.47.0")
    )

    branch = f"{PREFIX}codex-0.47.0"
    assert bump_branches(github) == [branch]
    (pull,) = bump_pulls(github)
    assert pull["head"]["ref"] == branch and pull["title"] == "Bump codex to 0.47.0"
    assert commits_on(github, branch) == 1
    assert file_on(github, branch) == with_version(BASE_TEXT, "codex", "0.47.0")
    assert done.result is not None and done.result["number"] == pull["number"]
    accepted = [str(c.operation) for c in github.calls("POST /repos/*") if c.status == 201]
    assert sorted(accepted) == [
        "POST /repos/{owner}/{repo}/git/refs",
        "POST /repos/{owner}/{repo}/pulls",
    ]
    # Only the branch is asked for again (and refused as existing), when nothing showed
    # an earlier attempt had got that far: the pull request, once open, is found first.
    again = [c.status for c in github.calls("POST /repos/{owner}/{repo}/git/refs")][1:]
    assert again == ([422] if change in (1, 2) else [])


async def test_the_same_version_handed_over_twice_is_found_not_opened_again(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    first, second = await apply(outbox, app_github, bump(runner, "0.47.0"), bump(runner, "0.47.0"))

    (pull,) = bump_pulls(github)
    assert second.result == {**(first.result or {}), "found": True}
    assert commits_on(github, pull["head"]["ref"]) == 1
    assert changes(github).count("PATCH /repos/{owner}/{repo}/pulls/{pull_number}") == 0


async def test_a_pull_request_github_did_not_list_yet_is_found_when_opening_it_fails(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    (first,) = await apply(outbox, app_github, bump(runner, "0.47.0"))
    # A replica that lags: the open pull requests are listed without it, once.
    github.inject("GET /repos/{owner}/{repo}/pulls", status=200, body=[])

    _, again = await apply(outbox, app_github, bump(runner, "0.47.0"))

    (pull,) = bump_pulls(github)
    assert again.result == {**(first.result or {}), "found": True}
    assert bump_branches(github) == [f"{PREFIX}codex-0.47.0"]
    assert commits_on(github, pull["head"]["ref"]) == 1
    refused = [c.status for c in github.calls("POST /repos/*")]
    assert refused == [201, 201, 422, 422]  # branch and pull: made, then refused as existing


# -- newer versions ---------------------------------------------------------------------------


async def test_a_newer_version_updates_the_open_pull_request_instead_of_opening_another(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    (first,) = await apply(outbox, app_github, bump(runner, "0.47.0"))
    _, second = await apply(outbox, app_github, bump(runner, "0.48.0"))

    branch = f"{PREFIX}codex-0.47.0"  # a pull request keeps its branch
    (pull,) = bump_pulls(github)
    assert first.result is not None and pull["number"] == first.result["number"]
    assert pull["title"] == "Bump codex to 0.48.0"
    assert "from `0.46.0` to `0.48.0`" in pull["body"]
    assert f"<{source_url('0.48.0')}>" in pull["body"]
    assert pull["body"].endswith(marker("bump-codex"))
    assert github.repo(REPO).issue(pull["number"])["title"] == "Bump codex to 0.48.0"
    assert file_on(github, branch) == with_version(BASE_TEXT, "codex", "0.48.0")
    assert file_on(github, "main") == BASE_TEXT
    assert bump_branches(github) == [branch]
    assert commits_on(github, branch) == 2
    assert second.result == {
        "number": pull["number"],
        "url": first.result["url"],
        "version": "0.48.0",
        "branch": branch,
        "updated_from": "0.47.0",
    }


async def test_versions_queued_together_end_in_one_pull_request_of_the_newest(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    versions = ["0.47.0", "0.47.1", "0.48.0"]
    done = await apply(outbox, app_github, *(bump(runner, v) for v in versions))

    assert [e.result and e.result["version"] for e in done] == versions  # in order
    (pull,) = bump_pulls(github)
    assert pull["title"] == "Bump codex to 0.48.0"
    assert file_on(github, pull["head"]["ref"]) == with_version(BASE_TEXT, "codex", "0.48.0")
    assert changes(github).count("POST /repos/{owner}/{repo}/pulls") == 1


@pytest.mark.parametrize("change", [1, 2, None], ids=["commit", "pull", "done"])
async def test_a_crash_after_any_step_of_updating_duplicates_nothing(
    change: int | None,
    outbox: Outbox,
    app_github: GitHubApp,
    github: FakeGitHub,
    runner: int,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await apply(outbox, app_github, bump(runner, "0.47.0"))
    done = await crash_then_restart(
        outbox, app_github, clock, monkeypatch, change, bump(runner, "0.48.0")
    )

    branch = f"{PREFIX}codex-0.47.0"
    (pull,) = bump_pulls(github)
    assert pull["title"] == "Bump codex to 0.48.0" and "to `0.48.0`" in pull["body"]
    assert file_on(github, branch) == with_version(BASE_TEXT, "codex", "0.48.0")
    assert commits_on(github, branch) == 2  # one per version
    assert bump_branches(github) == [branch]
    assert changes(github).count("POST /repos/{owner}/{repo}/pulls") == 1
    assert done.result is not None and done.result["number"] == pull["number"]


async def test_an_older_version_applied_after_a_newer_one_does_not_go_back(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    await apply(outbox, app_github, bump(runner, "0.48.0"))
    _, older = await apply(outbox, app_github, bump(runner, "0.47.0"))

    (pull,) = bump_pulls(github)
    assert pull["title"] == "Bump codex to 0.48.0"
    assert file_on(github, pull["head"]["ref"]) == with_version(BASE_TEXT, "codex", "0.48.0")
    assert older.result is not None and older.result["skipped"] == "superseded"
    assert older.result["open_version"] == "0.48.0"


async def test_the_open_pull_request_is_found_beyond_the_first_page(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    await apply(outbox, app_github, bump(runner, "0.47.0"))
    for n in range(120):  # newer pull requests come first: the bump is on page 2
        github.add_pull(REPO, f"Feature {n}", head=f"feature-{n}")
    await apply(outbox, app_github, bump(runner, "0.48.0"))

    (pull,) = bump_pulls(github)
    assert pull["title"] == "Bump codex to 0.48.0"
    assert any(c.query.get("page") == "2" for c in github.calls("GET /repos/{owner}/{repo}/pulls"))


async def test_other_pull_requests_are_left_alone(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    """Not a bump of this provider: another provider's, a branch that only looks like one,
    and a closed bump."""
    github.set_file(REPO, MANIFEST, BASE_TEXT, ref=f"{PREFIX}claude_code-2.2.0")
    github.add_pull(REPO, "Bump claude_code to 2.2.0", head=f"{PREFIX}claude_code-2.2.0")
    github.add_pull(REPO, "Tidy the bump script", head=f"{PREFIX}codex-script")
    github.add_pull(REPO, "Bump codex to 0.46.1", head=f"{PREFIX}codex-0.46.1", state="closed")
    await apply(outbox, app_github, bump(runner, "0.47.0"))

    titles = sorted(p["title"] for p in github.repo(REPO).pulls.values() if p["state"] == "open")
    assert titles == ["Bump claude_code to 2.2.0", "Bump codex to 0.47.0", "Tidy the bump script"]
    assert changes(github).count("PATCH /repos/{owner}/{repo}/pulls/{pull_number}") == 0


# -- nothing to do, or cannot be done ---------------------------------------------------------


@pytest.mark.parametrize("version", ["0.46.0", "0.45.2", "0.46.0-rc.1"])
async def test_a_version_the_base_branch_has_or_has_passed_does_nothing(
    version: str, outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    (done,) = await apply(outbox, app_github, bump(runner, version))

    assert done.result == {"skipped": "up_to_date", "version": version, "base_version": "0.46.0"}
    assert changes(github) == []
    assert bump_pulls(github) == [] and bump_branches(github) == []


async def test_a_provider_the_manifest_does_not_list_is_parked_with_the_reason(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    await apply(outbox, app_github, bump(runner, "1.0.0", provider="aider"))

    (parked,) = await entries(outbox.store, "failed")
    assert parked.attempts == 1  # waiting would not help
    assert parked.last_error is not None and "has no 'aider'" in parked.last_error
    assert changes(github) == []


async def test_a_manifest_that_is_not_json_is_parked(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    github.set_file(REPO, MANIFEST, "codex = 0.46.0\n")
    await apply(outbox, app_github, bump(runner, "0.47.0"))

    (parked,) = await entries(outbox.store, "failed")
    assert parked.last_error is not None and "is not JSON" in parked.last_error


def test_an_entry_needs_a_provider_id_and_a_semantic_version() -> None:
    with pytest.raises(ValueError):
        bump(1, "0.47.0", provider="Codex!")
    with pytest.raises(ValueError):
        bump(1, "latest")
    effect = bump(1, "v0.47.0")
    assert effect.payload["version"] == "0.47.0"
    assert effect.target == "acme/runner@bump:codex"
    assert bump(1, "0.48.0").target == effect.target  # one provider's bumps apply in order
    assert bump(1, "2.2.0", provider="claude_code").target != effect.target


async def test_a_source_link_that_is_not_a_plain_web_url_is_left_out(
    outbox: Outbox, app_github: GitHubApp, github: FakeGitHub, runner: int
) -> None:
    await apply(
        outbox, app_github, bump(runner, "0.47.0", source_url="javascript:alert(1) <b>x</b>")
    )

    (pull,) = bump_pulls(github)
    assert "Source" not in pull["body"] and "<b>" not in pull["body"]


# -- the hand-over from the version watcher ---------------------------------------------------


def record(version: str, *, prerelease: bool = False) -> RuntimeVersionRecord:
    return RuntimeVersionRecord(
        id=f"codex@{version}",
        provider_id="codex",
        version=version,
        released_at=RELEASED,
        source="npm",
        source_url=source_url(version),
        prerelease=prerelease,
        canary_passed=False,
        canary_passed_at=None,
        announced_at=START,
        handed_to_canary_at=None,
        baseline=False,
        created_at=START,
    )


async def install(store: SqliteStore, clock: ManualClock, installation: int) -> None:
    account = Installation(installation, "acme", "Organization", False, [Repository(1, REPO)])
    await store.save_installation(account, clock.now())


async def test_the_handoff_waits_while_the_app_is_not_installed_on_the_runner(
    outbox: Outbox, store: SqliteStore
) -> None:
    handoff = BumpHandoff(outbox, store, REPO, MANIFEST)
    assert await handoff.version_ready(record("0.47.0")) is False
    assert await entries(store, "pending") == []


async def test_the_handoff_queues_a_bump_and_skips_prereleases(
    outbox: Outbox, store: SqliteStore, clock: ManualClock
) -> None:
    await install(store, clock, 77)
    handoff = BumpHandoff(outbox, store, REPO, "config/runtimes.json", base_branch="release")

    assert await handoff.version_ready(record("0.48.0-beta.1", prerelease=True)) is True
    assert await handoff.version_ready(record("0.48.0-rc.1")) is True  # by its text too
    assert await entries(store, "pending") == []

    assert await handoff.version_ready(record("0.47.0")) is True
    (queued,) = await entries(store, "pending")
    assert (queued.installation_id, queued.kind) == (77, "bump_pull_request")
    assert dict(queued.payload) == {
        "repo": REPO,
        "provider": "codex",
        "version": "0.47.0",
        "released_at": "2026-02-27T12:00:00.000Z",
        "source_url": source_url("0.47.0"),
        "manifest_path": "config/runtimes.json",
        "base_branch": "release",
    }


class OneSource:
    key = "npm:@openai/codex"
    kind = "npm"
    provider_id = "codex"

    def __init__(self, *versions: str) -> None:
        self.releases = [
            Release(v, RELEASED + timedelta(hours=n), source_url=source_url(v))
            for n, v in enumerate(versions)
        ]

    async def fetch(self) -> list[Release] | None:
        return list(self.releases)


async def test_a_version_the_watcher_hands_over_becomes_a_bump_pull_request(
    outbox: Outbox,
    app_github: GitHubApp,
    github: FakeGitHub,
    runner: int,
    store: SqliteStore,
    clock: ManualClock,
) -> None:
    await install(store, clock, runner)
    watcher = VersionWatcher(
        store,
        EventBus(store, clock),
        clock,
        ["codex"],
        [OneSource("0.46.0", "0.47.0")],
        interval=timedelta(hours=1),
        polling=False,
        auto_canary=True,
        canary=BumpHandoff(outbox, store, REPO, MANIFEST),
        rng=random.Random(1),
    )
    await watcher.check()
    taken = await watcher.hand_over()
    assert [v.version for v in taken] == ["0.47.0"]  # 0.46.0 is history
    assert await watcher.hand_over() == []  # asked once

    await apply(outbox, app_github)
    (pull,) = bump_pulls(github)
    assert pull["title"] == "Bump codex to 0.47.0"
    assert file_on(github, pull["head"]["ref"]) == with_version(BASE_TEXT, "codex", "0.47.0")
