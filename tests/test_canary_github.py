"""The canary on GitHub, end to end against the fake GitHub: pull requests and pushes that
change the runtime manifest start canaries, shown as check runs and run by the canary
workflow, whose OIDC-authenticated results conclude them."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from app.clock import ManualClock
from app.config import Settings
from app.store import Installation, Repository
from tests.conftest import Api, MakeApi
from tests.fake_github import FakeGitHub
from tests.fake_oidc import FakeOidcIssuer
from tests.test_webhooks import HOOK, WEBHOOKS, headers_for

REPO = "acme/runners"
MANIFEST = '{\n  "claude_code": "2.1.0",\n  "codex": "0.46.0"\n}\n'
SHA = "a1" * 20
NEXT_SHA = "b2" * 20
BUILD = "build-" + SHA[:12]
CHECKS = "POST /repos/{owner}/{repo}/check-runs"
UPDATES = "PATCH /repos/{owner}/{repo}/check-runs/{check_run_id}"
DISPATCHES = "POST /repos/{owner}/{repo}/actions/workflows/{workflow_id}/dispatches"


def payload(name: str) -> dict[str, Any]:
    return json.loads((WEBHOOKS / name).read_text())


@pytest.fixture
async def issuer() -> AsyncIterator[FakeOidcIssuer]:
    async with FakeOidcIssuer() as fake:
        yield fake


@pytest.fixture
def runners(github: FakeGitHub) -> int:
    installation = github.add_installation(account="acme", repos=[REPO])
    github.add_workflow(
        REPO, "canary.yml", run_name="canary ${{ inputs.build_id }} ${{ inputs.dispatch_id }}"
    )
    github.set_permission(REPO, "octocat", "write")
    return installation


@pytest.fixture
async def api(
    make_api: MakeApi,
    github_settings: Settings,
    issuer: FakeOidcIssuer,
    runners: int,
    clock: ManualClock,
    github: FakeGitHub,
) -> Api:
    settings = github_settings.replace(
        runner_repo=REPO,
        oidc_issuer=issuer.url,
        max_body_bytes=1024 * 1024,
        public_url="https://pipeline.example.com",
    )
    api = await make_api(settings_override=settings, with_github=True, oidc_issuer=issuer.url)
    # As the installation sync has it, with the repository id tokens are checked on.
    repo_id = github.repo(REPO).id
    await api.services.store.save_installation(
        Installation(runners, "acme", "Organization", False, [Repository(repo_id, REPO)]),
        clock.now(),
    )
    return api


class Runner:
    """Drives the runner repository: pull requests, pushes, workflow runs, results."""

    def __init__(
        self,
        api: Api,
        github: FakeGitHub,
        installation: int,
        issuer: FakeOidcIssuer,
        clock: ManualClock,
    ) -> None:
        self.api, self.github, self.installation = api, github, installation
        self.issuer, self.clock = issuer, clock

    async def deliver(self, event: str, data: dict[str, Any], delivery: str | None = None) -> None:
        data["installation"] = {"id": self.installation}
        body = json.dumps(data).encode()
        headers = headers_for(event, body)
        if delivery:
            headers["X-GitHub-Delivery"] = delivery
        response, _ = await self.api.post(HOOK, data=body, headers=headers)
        assert response.status == 202
        await self.settled()

    async def settled(self) -> None:
        store = self.api.services.store
        for _ in range(500):
            pending = await store.list_deliveries(status="pending", before=None, limit=1)
            if not pending and (await store.outbox_stats()).pending == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("deliveries or outbox entries still pending")

    def open_pull(
        self,
        sha: str = SHA,
        *,
        head: str = "bump-codex",
        manifest: str = MANIFEST,
        fork: bool = False,
    ) -> dict[str, Any]:
        self.github.set_file(REPO, "runtimes.json", manifest, ref=sha)
        number = self.github.add_pull(REPO, head=head, head_sha=sha, files=["runtimes.json"])
        data = payload("pull_request.opened.0.json")
        pull = data["pull_request"]
        pull.update(number=number)
        pull["head"].update(sha=sha, ref=head)
        pull["head"]["repo"] = {
            **pull["head"]["repo"],
            "full_name": "someone/runners" if fork else REPO,
        }
        data.update(number=number)
        data["repository"] = {**data["repository"], "full_name": REPO, "default_branch": "main"}
        return data

    def check_run(self, external_id: str) -> dict[str, Any]:
        (run,) = [
            r for r in self.github.repo(REPO).check_runs.values() if r["external_id"] == external_id
        ]
        return run

    def dispatched(self) -> list[dict[str, Any]]:
        return self.github.repo(REPO).dispatches

    async def report(self, results: list[dict[str, Any]], *, run_id: str | None = None) -> Any:
        if run_id is None:
            run_id = str(self.dispatched()[-1]["run_id"])
        token = self.issuer.mint(
            self.issuer.claims(
                self.clock.now(),
                repository=REPO,
                repository_id=str(self.github.repo(REPO).id),
                run_id=run_id,
                workflow_ref=f"{REPO}/.github/workflows/canary.yml@refs/heads/bump-codex",
            )
        )
        response, body = await self.api.post(
            f"/canary/{BUILD}/results",
            headers={"Authorization": f"Bearer {token}"},
            json={"results": results},
        )
        await self.settled()
        return response, body


@pytest.fixture
def runner(
    api: Api, github: FakeGitHub, runners: int, issuer: FakeOidcIssuer, clock: ManualClock
) -> Runner:
    return Runner(api, github, runners, issuer, clock)


def passing() -> list[dict[str, Any]]:
    return [
        {"name": f"{p}-{n}", "provider": p, "status": "passed", "sessionStartMs": 400}
        for p in ("claude_code", "codex")
        for n in range(20)
    ]


async def test_a_pull_request_changing_the_manifest_runs_its_canary_to_a_green_check(
    runner: Runner, api: Api
) -> None:
    await runner.deliver("pull_request", runner.open_pull())

    check = runner.check_run(BUILD)
    assert (check["name"], check["head_sha"], check["status"]) == (
        "update-pipeline / canary",
        SHA,
        "in_progress",
    )
    (dispatch,) = runner.dispatched()
    assert dispatch["ref"] == "bump-codex"
    assert dispatch["inputs"] == {"build_id": BUILD, "sha": SHA, "dispatch_id": f"canary-{BUILD}-1"}
    (call,) = runner.github.calls(DISPATCHES)
    assert call.json["return_run_details"] is True

    response, body = await runner.report(passing())
    assert response.status == 200, body

    check = runner.check_run(BUILD)
    assert (check["status"], check["conclusion"]) == ("completed", "success")
    assert "codex" in check["output"]["summary"]
    _, build = await api.get(f"/builds/{BUILD}", token=await api.token("viewer"))
    assert build["knownGoodFor"] == ["claude_code", "codex"]
    assert build["runtimeVersions"] == {"claude_code": "2.1.0", "codex": "0.46.0"}


async def test_results_from_another_workflow_run_are_refused(runner: Runner) -> None:
    await runner.deliver("pull_request", runner.open_pull())
    response, body = await runner.report(passing(), run_id="1")
    assert response.status == 401
    assert "not the run dispatched" in body["error"]["message"]


async def test_a_failing_provider_fails_the_check_with_an_annotation_on_its_manifest_line(
    runner: Runner,
) -> None:
    await runner.deliver("pull_request", runner.open_pull())
    results = passing()
    for result in results[20:30]:  # half of codex's tests fail
        result["status"] = "failed"
        result["message"] = "session dropped"
    await runner.report(results)

    check = runner.check_run(BUILD)
    assert check["conclusion"] == "failure"
    (annotation,) = [
        a
        for call in runner.github.calls(UPDATES)
        for a in (call.json.get("output") or {}).get("annotations", [])
    ]
    assert (annotation["path"], annotation["start_line"]) == ("runtimes.json", 3)


async def test_a_new_head_supersedes_the_old_canary(runner: Runner) -> None:
    first = runner.open_pull()
    await runner.deliver("pull_request", first)
    old_run = runner.dispatched()[0]["run_id"]
    runner.github.set_file(
        REPO, "runtimes.json", MANIFEST.replace("0.46.0", "0.47.0"), ref=NEXT_SHA
    )
    moved = copy.deepcopy(first)
    moved["action"] = "synchronize"
    moved["pull_request"]["head"]["sha"] = NEXT_SHA
    await runner.deliver("pull_request", moved)

    assert runner.check_run(BUILD)["conclusion"] == "cancelled"
    assert runner.github.repo(REPO).runs[old_run]["conclusion"] == "cancelled"
    assert runner.check_run("build-" + NEXT_SHA[:12])["status"] == "in_progress"
    assert len(runner.dispatched()) == 2


async def test_a_pull_request_from_a_fork_gets_a_neutral_check_and_no_canary(
    runner: Runner, api: Api
) -> None:
    await runner.deliver("pull_request", runner.open_pull(fork=True))
    (check,) = runner.github.repo(REPO).check_runs.values()
    assert check["conclusion"] == "neutral"
    assert "fork" in check["output"]["summary"]
    assert runner.dispatched() == []
    response, _ = await api.get(f"/builds/{BUILD}", token=await api.token("viewer"))
    assert response.status == 404


async def test_a_pull_request_not_touching_the_manifest_is_left_alone(runner: Runner) -> None:
    data = runner.open_pull()
    runner.github.repo(REPO).pull_files[data["number"]] = []
    await runner.deliver("pull_request", data)
    assert runner.github.repo(REPO).check_runs == {}


async def test_a_push_to_the_default_branch_runs_the_merge_commits_canary(runner: Runner) -> None:
    runner.github.set_file(REPO, "runtimes.json", MANIFEST, ref=SHA)
    data = payload("push.0.json")
    data.update(ref="refs/heads/main", after=SHA, deleted=False)
    data["repository"] = {**data["repository"], "full_name": REPO, "default_branch": "main"}
    data["commits"] = (
        [{**data["commits"][0], "added": [], "modified": ["runtimes.json"], "removed": []}]
        if data.get("commits")
        else [{"id": SHA, "added": [], "modified": ["runtimes.json"], "removed": []}]
    )
    await runner.deliver("push", data)
    assert runner.check_run(BUILD)["head_sha"] == SHA
    assert runner.dispatched()[0]["ref"] == "main"


async def test_a_workflow_that_ends_without_results_fails_the_check(runner: Runner) -> None:
    await runner.deliver("pull_request", runner.open_pull())
    run_id = runner.dispatched()[0]["run_id"]
    data = payload("workflow_run.completed.0.json")
    data["workflow_run"].update(
        id=run_id, display_title=f"canary {BUILD} canary-{BUILD}-1", conclusion="failure"
    )
    data["repository"] = {**data["repository"], "full_name": REPO}
    await runner.deliver("workflow_run", data)

    check = runner.check_run(BUILD)
    assert check["conclusion"] == "failure"
    assert "without posting results" in check["output"]["summary"]


async def test_re_runs_start_a_new_run_with_a_new_check(runner: Runner, api: Api) -> None:
    await runner.deliver("pull_request", runner.open_pull())
    await runner.report(passing())
    check = runner.check_run(BUILD)
    data = payload("check_run.rerequested.0.json")
    data["check_run"].update(
        id=check["id"], name="update-pipeline / canary", external_id=BUILD, head_sha=SHA
    )
    data["repository"] = {**data["repository"], "full_name": REPO}
    delivery = str(uuid.uuid4())
    await runner.deliver("check_run", data, delivery=delivery)
    await runner.deliver("check_run", data, delivery=str(uuid.uuid4()))  # GitHub again

    assert runner.check_run(f"{BUILD}@2")["status"] == "in_progress"
    assert len(runner.dispatched()) == 2
    (run2,) = [r for r in await api.services.store.list_canary_runs(BUILD) if r.attempt == 2]
    assert run2.state in ("pending", "running")


async def test_a_canary_comment_re_runs_the_pull_requests_canary(runner: Runner) -> None:
    data = runner.open_pull()
    await runner.deliver("pull_request", data)
    comment_id = runner.github.add_comment(REPO, data["number"], "/canary", user="octocat")
    comment = payload("issue_comment.created.0.json")
    author = {**comment["comment"]["user"], "login": "octocat", "type": "User"}
    comment["comment"].update(id=comment_id, body="/canary", user=author)
    comment["sender"] = author
    comment["issue"].update(number=data["number"], labels=[], pull_request={"url": "x"})
    comment["repository"] = {**comment["repository"], "full_name": REPO}
    await runner.deliver("issue_comment", comment)
    runs = await runner.api.services.store.list_canary_runs(BUILD)
    described = [(r.attempt, r.state, r.error) for r in runs]
    assert runner.check_run(f"{BUILD}@2")["status"] == "in_progress", described
    assert runner.check_run(BUILD)["conclusion"] == "cancelled"


async def test_a_redelivered_pull_request_event_creates_nothing_twice(runner: Runner) -> None:
    data = runner.open_pull()
    delivery = str(uuid.uuid4())
    await runner.deliver("pull_request", data, delivery=delivery)
    await runner.deliver("pull_request", copy.deepcopy(data))  # a new delivery, same event
    assert len(runner.github.repo(REPO).check_runs) == 1
    assert len(runner.dispatched()) == 1


async def test_a_new_version_becomes_a_bump_pull_request_whose_canary_goes_green(
    runner: Runner, api: Api, github: FakeGitHub, clock: ManualClock
) -> None:
    """The whole loop: release, bump PR, canary, green check, known-good build."""
    from app.github.bump import BumpHandoff
    from app.pipeline.version.watcher import Release, VersionWatcher

    github.set_file(REPO, "runtimes.json", MANIFEST)  # on main
    github.set_ref(REPO, "heads/main", "c3" * 20)

    class Codex:
        key, kind, provider_id = "npm:@openai/codex", "npm", "codex"
        releases = [Release("0.46.0", clock.now()), Release("0.47.0", clock.now())]

        async def fetch(self) -> list[Release]:
            return self.releases

    services = api.services
    watcher = VersionWatcher(
        services.store,
        services.bus,
        clock,
        ["claude_code", "codex", "gemini_cli"],
        [Codex()],
        interval=timedelta(minutes=5),
        polling=False,
        auto_canary=True,
        canary=BumpHandoff(services.outbox, services.store, REPO, "runtimes.json"),
    )
    await watcher.check()  # 0.47.0 is announced
    assert [v.version for v in await watcher.hand_over()] == ["0.47.0"]
    await runner.settled()

    (pull,) = [p for p in github.repo(REPO).pulls.values() if p["state"] == "open"]
    assert pull["head"]["ref"] == "update-pipeline/bump-codex-0.47.0"
    assert pull["title"] == "Bump codex to 0.47.0"

    # GitHub tells the app about the pull request it opened; its canary starts.
    data = runner.open_pull(
        pull["head"]["sha"], head=pull["head"]["ref"], manifest=MANIFEST.replace("0.46.0", "0.47.0")
    )
    await runner.deliver("pull_request", data)
    build_id = "build-" + pull["head"]["sha"][:12]
    run_id = str(runner.dispatched()[-1]["run_id"])
    token = runner.issuer.mint(
        runner.issuer.claims(
            clock.now(),
            repository=REPO,
            repository_id=str(github.repo(REPO).id),
            run_id=run_id,
            workflow_ref=f"{REPO}/.github/workflows/canary.yml@refs/heads/{pull['head']['ref']}",
        )
    )
    response, body = await api.post(
        f"/canary/{build_id}/results",
        headers={"Authorization": f"Bearer {token}"},
        json={"results": passing()},
    )
    assert response.status == 200, body
    await runner.settled()
    assert runner.check_run(build_id)["conclusion"] == "success"
    _, build = await api.get(f"/builds/{build_id}", token=await api.token("viewer"))
    assert build["runtimeVersions"]["codex"] == "0.47.0"
    assert build["knownGoodFor"] == ["claude_code", "codex"]
    assert github.violations == []


@pytest.mark.parametrize(("identifier", "reruns"), [("rerun", True), ("something-else", False)])
async def test_the_re_run_button_starts_a_new_run(
    runner: Runner, identifier: str, reruns: bool
) -> None:
    await runner.deliver("pull_request", runner.open_pull())
    await runner.report(passing())
    check = runner.check_run(BUILD)
    data = payload("check_run.requested_action.0.json")
    data["check_run"].update(
        id=check["id"], name="update-pipeline / canary", external_id=BUILD, head_sha=SHA
    )
    data["requested_action"] = {"identifier": identifier}
    data["repository"] = {**data["repository"], "full_name": REPO}
    await runner.deliver("check_run", data)
    assert len(runner.dispatched()) == (2 if reruns else 1)


async def test_reopening_a_forks_pull_request_adds_no_second_notice(runner: Runner) -> None:
    data = runner.open_pull(fork=True)
    await runner.deliver("pull_request", data)
    again = copy.deepcopy(data)
    again["action"] = "reopened"
    await runner.deliver("pull_request", again)
    assert len(runner.github.repo(REPO).check_runs) == 1


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (None, "is not in commit"),
        ("{not json", "is not JSON"),
        ('{"aider": "1.0.0"}', "names none of the configured providers"),
        ('{"codex": "latest"}', "not a version"),
    ],
)
async def test_an_unusable_manifest_fails_the_check_and_starts_no_canary(
    runner: Runner, manifest: str | None, problem: str
) -> None:
    data = runner.open_pull()
    files = runner.github.repo(REPO).files
    if manifest is None:
        del files[(SHA, "runtimes.json")]
    else:
        files[(SHA, "runtimes.json")] = manifest.encode()
    await runner.deliver("pull_request", data)
    (check,) = runner.github.repo(REPO).check_runs.values()
    assert check["conclusion"] == "failure"
    assert problem in check["output"]["summary"]
    assert runner.dispatched() == []


async def test_every_result_of_a_run_can_be_read_back(runner: Runner, api: Api) -> None:
    await runner.deliver("pull_request", runner.open_pull())
    await runner.report(passing())
    response, body = await api.get(f"/canary/{BUILD}/results", token=await api.token("admin"))
    assert response.status == 200
    assert body["attempt"] == 1 and len(body["results"]) == 40


async def test_reverting_the_manifest_change_ends_the_pull_requests_canary(
    runner: Runner,
) -> None:
    data = runner.open_pull()
    await runner.deliver("pull_request", data)
    runner.github.repo(REPO).pull_files[data["number"]] = []  # the change was reverted
    moved = copy.deepcopy(data)
    moved["action"] = "synchronize"
    moved["pull_request"]["head"]["sha"] = NEXT_SHA
    await runner.deliver("pull_request", moved)
    assert runner.check_run(BUILD)["conclusion"] == "cancelled"
    assert await runner.api.services.store.pull_request_build(REPO, data["number"]) is None


async def test_re_running_all_checks_of_the_commit_re_runs_its_canary(runner: Runner) -> None:
    await runner.deliver("pull_request", runner.open_pull())
    await runner.report(passing())
    data = payload("check_suite.rerequested.0.json")
    data["check_suite"].update(head_sha=SHA)
    data["repository"] = {**data["repository"], "full_name": REPO}
    await runner.deliver("check_suite", data)
    await runner.deliver("check_suite", copy.deepcopy(data))  # again while it runs: nothing
    assert runner.check_run(f"{BUILD}@2")["status"] == "in_progress"
    assert len(runner.dispatched()) == 2
