"""Post-update sweeps against the fake GitHub: opt-in files, dispatches with their
inputs and the concurrency cap, following workflow runs, timeouts, exclusions, and the
summary on a rollout's tracking issue. Every request the app makes is checked against
GitHub's description by the fake."""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from app.clock import ManualClock
from app.config import Settings
from app.rollouts.gates import Counts
from app.store import BuildRecord
from tests.conftest import START, Api, MakeApi
from tests.fake_github import FakeGitHub, Reply
from tests.fake_oidc import FakeOidcIssuer
from tests.test_webhooks import HOOK, WEBHOOKS, headers_for, wait_until

OWNER = "acme"
WORKFLOW = "sweep.yml"
RUN_BASE = json.loads((WEBHOOKS / "workflow_run.completed.0.json").read_text())
DISPATCH = "POST /repos/{owner}/{repo}/actions/workflows/{workflow_id}/dispatches"


def opt_in(github: FakeGitHub, repo: str, text: str | None = None, **sweep: Any) -> None:
    if text is None:
        lines = ["sweep:", f"  workflow: {sweep.pop('workflow', WORKFLOW)}"]
        for key, value in sweep.items():
            lines.append(f"  {key}: {json.dumps(value)}")
        text = "\n".join(lines) + "\n"
    github.set_file(repo, ".github/update-pipeline.yml", text)
    github.add_workflow(
        repo, f".github/workflows/{WORKFLOW}", run_name="sweep ${{ inputs.sweep_id }}"
    )


class Sweeps:
    def __init__(self, api: Api, github: FakeGitHub, installation: int) -> None:
        self.api, self.github, self.installation = api, github, installation

    async def admin(self) -> str:
        return await self.api.token("admin", name=f"admin-{secrets.token_hex(4)}")

    async def settled(self) -> None:
        store = self.api.services.store

        async def quiet() -> bool:
            deliveries = await store.list_deliveries(status="pending", before=None, limit=1)
            return not deliveries and (await store.outbox_stats()).pending == 0

        await wait_until(quiet, timeout=20)

    async def start(self, *, settle: bool = True, **body: Any) -> dict[str, Any]:
        response, sweep = await self.api.post("/sweeps", token=await self.admin(), json=body)
        assert response.status == 201, sweep
        if settle:
            await self.settled()
        return sweep

    async def get(self, sweep_id: str) -> dict[str, Any]:
        _, sweep = await self.api.get(f"/sweeps/{sweep_id}", token=await self.admin())
        return sweep

    def dispatches(self, repo: str | None = None) -> list[dict[str, Any]]:
        repos = [self.github.repo(repo)] if repo else list(self.github.repos.values())
        return [d | {"repo": r.full_name} for r in repos for d in r.dispatches]

    async def run_event(
        self,
        repo: str,
        run_id: int,
        *,
        action: str = "completed",
        conclusion: str | None = "success",
        attempt: int = 1,
    ) -> None:
        stored = self.github.repo(repo).runs[run_id]
        status = {"requested": "queued", "in_progress": "in_progress"}.get(action, "completed")
        stored.update(status=status, conclusion=conclusion if status == "completed" else None)
        data = copy.deepcopy(RUN_BASE)
        data["action"] = action
        data["workflow_run"].update(
            id=run_id,
            path=stored["path"],
            display_title=stored["display_title"],
            status=status,
            conclusion=stored["conclusion"],
            event=stored["event"],
            html_url=stored["html_url"],
            created_at=stored["created_at"],
            run_attempt=attempt,
        )
        data["repository"] = {**data["repository"], "full_name": repo}
        data["installation"] = {"id": self.installation}
        body = json.dumps(data).encode()
        response, _ = await self.api.post(
            HOOK, data=body, headers=headers_for("workflow_run", body)
        )
        assert response.status == 202
        await self.settled()


REPOS = [f"{OWNER}/svc-{n}" for n in range(4)]


async def serving(
    make_api: MakeApi,
    settings: Settings,
    github: FakeGitHub,
    installation: int,
    *,
    repo: str = REPOS[0],
    **extra: Any,
) -> Sweeps:
    """The app with GitHub on ``settings``, once it knows ``repo``'s installation."""
    api = await make_api(settings_override=settings, with_github=True, **extra)

    async def installed() -> bool:
        return await api.services.store.repository_id(repo) is not None

    await wait_until(installed)
    return Sweeps(api, github, installation)


@pytest.fixture
def repos(github: FakeGitHub) -> int:
    installation = github.add_installation(account=OWNER, repos=REPOS)
    opt_in(github, REPOS[0], providers=["codex"], inputs={"suite": "smoke", "shards": 4})
    # REPOS[1] has no file.
    opt_in(github, REPOS[2], text="sweep:\n  workflow: [not, a, name]\n")
    opt_in(github, REPOS[3])
    return installation


@pytest.fixture
async def api(make_api: MakeApi, github_settings: Settings, repos: int) -> Api:
    api = await make_api(
        settings_override=github_settings.replace(sweep_concurrency=5), with_github=True
    )

    async def installed() -> bool:
        return await api.services.store.installation_for_repository(REPOS[0]) is not None

    await wait_until(installed)
    return api


@pytest.fixture
def sw(api: Api, github: FakeGitHub, repos: int) -> Sweeps:
    return Sweeps(api, github, repos)


async def test_opted_in_repositories_are_dispatched_with_the_standard_and_their_own_inputs(
    sw: Sweeps, api: Api
) -> None:
    sweep = await sw.start(provider="codex", version="0.47.0")
    assert sweep["state"] == "running"
    assert [r["repository"] for r in sweep["repositories"]] == [REPOS[0], REPOS[3]]
    (first,) = sw.dispatches(REPOS[0])
    assert first["workflow"] == f".github/workflows/{WORKFLOW}"
    assert first["ref"] == "main"  # the default branch, read from the repository
    assert first["inputs"] == {
        "sweep_id": sweep["sweepId"],
        "provider": "codex",
        "version": "0.47.0",
        "build_id": "",
        "suite": "smoke",
        "shards": "4",
    }
    assert sw.github.calls(DISPATCH)[0].json["return_run_details"] is True
    now = await sw.get(sweep["sweepId"])
    assert {r["repository"]: (r["state"], r["runId"] is not None) for r in now["repositories"]} == {
        REPOS[0]: ("queued", True),
        REPOS[3]: ("queued", True),
    }
    _, listed = await api.get("/sweeps/repos", token=await sw.admin())
    states = {r["repository"]: (r["state"], r["error"]) for r in listed["items"]}
    assert states[REPOS[0]] == ("opted_in", None)
    assert states[REPOS[2]][0] == "misconfigured" and "sweep.workflow" in states[REPOS[2]][1]
    assert REPOS[1] not in states
    _, status = await api.get("/status", token=await sw.admin())
    assert status["activeSweeps"] == 1


async def test_only_repositories_that_want_the_provider_are_swept(sw: Sweeps) -> None:
    sweep = await sw.start(provider="claude_code", version="2.1.0")
    assert [r["repository"] for r in sweep["repositories"]] == [REPOS[3]]


async def test_a_sweep_completes_when_every_repository_has_finished(sw: Sweeps, api: Api) -> None:
    sweep = await sw.start(provider="codex", version="0.47.0")
    runs = {d["repo"]: d["run_id"] for d in sw.dispatches()}
    await sw.run_event(REPOS[0], runs[REPOS[0]], action="in_progress", conclusion=None)
    assert (await sw.get(sweep["sweepId"]))["counts"] == {"in_progress": 1, "queued": 1}
    await sw.run_event(REPOS[0], runs[REPOS[0]], conclusion="failure")
    # A re-run of it: followed by its attempt, the latest counts.
    await sw.run_event(REPOS[0], runs[REPOS[0]], action="requested", conclusion=None, attempt=2)
    await sw.run_event(REPOS[0], runs[REPOS[0]], conclusion="success", attempt=2)
    await sw.run_event(REPOS[0], runs[REPOS[0]], conclusion="failure", attempt=1)  # late
    await sw.run_event(REPOS[3], runs[REPOS[3]], conclusion="success")
    done = await sw.get(sweep["sweepId"])
    assert done["state"] == "completed" and done["counts"] == {"success": 2}
    assert {r["runAttempt"] for r in done["repositories"]} == {1, 2}
    _, events = await api.get("/events?type=sweep_started,sweep_completed", token=await sw.admin())
    assert [e["type"] for e in events["items"]] == ["sweep_completed", "sweep_started"]
    _, listed = await api.get("/sweeps/repos", token=await sw.admin())
    assert {r["repository"]: r["lastResult"] for r in listed["items"]}[REPOS[0]] == "success"


async def _retrying(api: Api) -> bool:
    effects = await api.services.store.list_effects(status="pending", limit=10)
    return any(e.attempts >= 1 and e.last_error for e in effects)


async def test_a_missing_workflow_fails_that_repository_and_the_sweep_goes_on(
    sw: Sweeps, api: Api, github: FakeGitHub, clock: ManualClock
) -> None:
    github.inject(
        f"POST /repos/{REPOS[0]}/actions/workflows/*/dispatches",
        status=422,
        body={"message": 'Unexpected inputs provided: ["suite"]'},
    )
    github.inject(f"POST /repos/{REPOS[3]}/actions/workflows/*/dispatches", status=502)
    sweep = await sw.start(provider="codex", version="0.47.0", settle=False)
    await wait_until(lambda: _retrying(api))
    clock.advance(timedelta(seconds=5))  # past the retry's backoff
    api.services.outbox.written()
    await sw.settled()
    now = await sw.get(sweep["sweepId"])
    rows = {r["repository"]: r for r in now["repositories"]}
    assert rows[REPOS[0]]["state"] == "failed"
    assert "Unexpected inputs" in rows[REPOS[0]]["error"]
    assert rows[REPOS[3]]["state"] == "queued"  # the 502 was retried
    (run,) = sw.dispatches(REPOS[3])
    await sw.run_event(REPOS[3], run["run_id"])
    assert (await sw.get(sweep["sweepId"]))["counts"] == {"failed": 1, "success": 1}


async def test_without_run_details_the_run_is_found_by_its_title(
    sw: Sweeps, github: FakeGitHub
) -> None:
    original = github.handlers[DISPATCH].handler

    def older_github(ctx: Any) -> Any:
        original(ctx)
        return Reply(204)

    github.override(DISPATCH, older_github)
    sweep = await sw.start(provider="claude_code", version="2.1.0")
    (row,) = (await sw.get(sweep["sweepId"]))["repositories"]
    assert (row["state"], row["runId"]) == ("queued", None)
    (dispatch,) = sw.dispatches(REPOS[3])
    assert sweep["sweepId"] in github.repo(REPOS[3]).runs[dispatch["run_id"]]["display_title"]
    await sw.run_event(REPOS[3], dispatch["run_id"])
    done = await sw.get(sweep["sweepId"])
    assert done["repositories"][0]["runId"] == dispatch["run_id"]
    assert done["state"] == "completed"


async def test_a_repository_that_never_finishes_times_out(
    sw: Sweeps, api: Api, clock: ManualClock
) -> None:
    sweep = await sw.start(provider="claude_code", version="2.1.0")
    clock.advance(timedelta(hours=2))
    await api.services.sweeps.expire()
    done = await sw.get(sweep["sweepId"])
    assert done["state"] == "completed"
    assert done["repositories"][0]["state"] == "timed_out"


async def test_an_excluded_repository_is_left_out_until_included_again(
    sw: Sweeps, api: Api
) -> None:
    admin = await sw.admin()
    await sw.start(provider="claude_code", version="2.0.0")
    response, repo = await api.request("PUT", f"/sweeps/repos/{REPOS[3]}/exclusion", token=admin)
    assert response.status == 200 and repo["excluded"]["by"].startswith("token ")
    sweep = await sw.start(provider="claude_code", version="2.1.0")
    assert sweep["repositories"] == [] and sweep["state"] == "completed"
    await api.request("DELETE", f"/sweeps/repos/{REPOS[3]}/exclusion", token=admin)
    sweep = await sw.start(provider="claude_code", version="2.1.0")
    assert [r["repository"] for r in sweep["repositories"]] == [REPOS[3]]
    response, _ = await api.request("PUT", "/sweeps/repos/acme/unknown/exclusion", token=admin)
    assert response.status == 404


async def test_a_push_that_changes_the_file_reads_it_again(
    sw: Sweeps, api: Api, github: FakeGitHub
) -> None:
    await sw.start(provider="claude_code", version="2.1.0")
    opt_in(github, REPOS[1], providers=["claude_code"])
    data = json.loads((WEBHOOKS / "push.0.json").read_text())
    data.update(ref="refs/heads/main", installation={"id": sw.installation})
    data["repository"] = {**data["repository"], "full_name": REPOS[1], "default_branch": "main"}
    data["commits"] = [
        {"id": "a" * 40, "added": [".github/update-pipeline.yml"], "modified": [], "removed": []}
    ]
    body = json.dumps(data).encode()
    response, _ = await api.post(HOOK, data=body, headers=headers_for("push", body))
    assert response.status == 202
    await sw.settled()
    sweep = await sw.start(provider="claude_code", version="2.1.1")
    assert [r["repository"] for r in sweep["repositories"]] == [REPOS[1], REPOS[3]]


async def test_sweep_requests_are_checked(sw: Sweeps, api: Api) -> None:
    admin = await sw.admin()
    for body, status in [
        ({}, 400),
        ({"provider": "codex"}, 400),
        ({"provider": "nope", "version": "1"}, 400),
        ({"buildId": "build-nope"}, 404),
    ]:
        response, answer = await api.post("/sweeps", token=admin, json=body)
        assert response.status == status, (body, answer)
    response, _ = await api.get("/sweeps/nope", token=admin)
    assert response.status == 404


# -- at scale, from a rollout's issue ---------------------------------------------------------

MANY = [f"{OWNER}/app-{n:03d}" for n in range(100)]
CONTROL = f"{OWNER}/control"


@pytest.fixture
def fleet_of_repos(github: FakeGitHub) -> int:
    installation = github.add_installation(account=OWNER, repos=[*MANY, CONTROL])
    for repo in MANY:
        opt_in(github, repo)
    github.set_permission(CONTROL, "maintainer", "maintain")
    return installation


async def test_a_sweep_of_a_hundred_repositories_from_a_rollout_issue(
    make_api: MakeApi, github_settings: Settings, github: FakeGitHub, fleet_of_repos: int
) -> None:
    from tests.test_rollout_issues import Control

    settings = github_settings.replace(
        control_repo=CONTROL, sweep_concurrency=5, stages_stable="100%"
    )
    sw = await serving(make_api, settings, github, fleet_of_repos, repo=CONTROL)
    api = sw.api
    admin = await sw.admin()
    await api.services.store.add_build(
        BuildRecord("build-new", "1.0.0", START, {"codex": "0.47.0"}, known_good_for=["codex"]),
        START,
    )
    await api.post("/rollouts", token=admin, json={"buildId": "build-new", "channel": "stable"})
    gh = Control(api, github, fleet_of_repos)
    gh.github = github
    await sw.settled()
    number = gh.tracking()["number"]
    await gh.say(number, "/sweep")
    assert "started sweep" in gh.comments(number)[-1]
    _, page = await api.get("/sweeps", token=admin)
    sweep_id = page["items"][0]["sweepId"]

    finished: set[str] = set()
    most = 0
    for _ in range(200):
        dispatched = {d["repo"]: d["run_id"] for d in sw.dispatches()}
        running = {repo: run for repo, run in dispatched.items() if repo not in finished}
        most = max(most, len(running))
        assert len(running) <= 5  # never more runs in flight than the limit
        if not running:
            break
        for repo, run_id in sorted(running.items()):
            conclusion = "failure" if repo.endswith("7") else "success"
            await sw.run_event(repo, run_id, conclusion=conclusion)
            finished.add(repo)
    done = await sw.get(sweep_id)
    assert done["state"] == "completed"
    assert len(done["repositories"]) == 100 and len(finished) == 100
    assert sum(done["counts"].values()) == 100 and most == 5
    assert done["rolloutId"] is not None and done["buildId"] == "build-new"
    summary = next(c for c in gh.comments(number) if c.startswith("**Sweep**"))
    assert "finished over 100 repositories" in summary
    assert done["counts"] == {"failure": 10, "success": 90}
    assert summary.count("\n- `") == 10 and "`acme/app-007`: failure ([run](" in summary


# -- results from the workflow, by OIDC ---------------------------------------------------------


@pytest.fixture
async def issuer() -> AsyncIterator[FakeOidcIssuer]:
    async with FakeOidcIssuer() as fake:
        yield fake


async def test_a_sweep_workflow_posts_its_items_with_its_oidc_token(
    make_api: MakeApi,
    github_settings: Settings,
    github: FakeGitHub,
    repos: int,
    issuer: FakeOidcIssuer,
    clock: ManualClock,
) -> None:
    settings = github_settings.replace(oidc_issuer=issuer.url)
    sw = await serving(make_api, settings, github, repos, repo=REPOS[3], oidc_issuer=issuer.url)
    api = sw.api
    sweep = await sw.start(provider="claude_code", version="2.1.0")
    (dispatch,) = sw.dispatches(REPOS[3])

    def token(repo: str, run_id: int, **claims: Any) -> str:
        return issuer.mint(
            issuer.claims(
                clock.now(),
                repository=repo,
                repository_id=str(github.repo(repo).id),
                run_id=str(run_id),
                workflow_ref=f"{repo}/.github/workflows/{WORKFLOW}@refs/heads/main",
                **claims,
            )
        )

    items = [
        {"name": "login works", "status": "passed"},
        {"name": "checkout works", "status": "failed"},
        {"name": "slow test", "status": "skipped"},
    ]
    path = f"/sweeps/{sweep['sweepId']}/results"
    good = token(REPOS[3], dispatch["run_id"])
    response, row = await api.post(
        path, headers={"Authorization": f"Bearer {good}"}, json={"results": items}
    )
    assert response.status == 200, row
    assert row["results"] | {"reportedBy": None} == {
        "passed": 1,
        "failed": 1,
        "skipped": 1,
        "failures": ["checkout works"],
        "reportedBy": None,
    }
    # Another repository of the installation, not in this sweep; another run of the
    # right one; and a push run: all refused.
    for bad in (
        token(REPOS[0], dispatch["run_id"]),
        token(REPOS[3], dispatch["run_id"] + 1),
        token(REPOS[3], dispatch["run_id"], event_name="push"),
    ):
        response, body = await api.post(
            path, headers={"Authorization": f"Bearer {bad}"}, json={"results": items}
        )
        assert response.status == 401, body


# -- matching, restarts, automatic sweeps --------------------------------------------------------


async def test_a_run_is_matched_by_workflow_and_time_when_nothing_else_names_it(
    sw: Sweeps, github: FakeGitHub
) -> None:
    original = github.handlers[DISPATCH].handler

    def older_github(ctx: Any) -> Any:
        original(ctx)
        return Reply(204)

    github.override(DISPATCH, older_github)
    github.repo(REPOS[3]).run_names.clear()  # a workflow without the sweep id in its title
    sweep = await sw.start(provider="claude_code", version="2.1.0")
    (dispatch,) = sw.dispatches(REPOS[3])
    assert sweep["sweepId"] not in github.repo(REPOS[3]).runs[dispatch["run_id"]]["display_title"]
    await sw.run_event(REPOS[3], dispatch["run_id"], conclusion="failure")
    done = await sw.get(sweep["sweepId"])
    assert (done["state"], done["counts"]) == ("completed", {"failure": 1})


async def test_a_restart_mid_sweep_carries_on(
    make_api: MakeApi, github_settings: Settings, github: FakeGitHub, repos: int
) -> None:
    settings = github_settings.replace(sweep_concurrency=1)
    sw = await serving(make_api, settings, github, repos)
    sweep = await sw.start(provider="codex", version="0.47.0")
    assert len(sw.dispatches()) == 1  # one at a time
    # The same database, a new process's worth of objects: the second waits its turn.
    again = await make_api(settings_override=settings, with_github=True)
    sw.api = again
    first = sw.dispatches()[0]
    await sw.run_event(first["repo"], first["run_id"])
    await sw.settled()
    assert len(sw.dispatches()) == 2
    second = sw.dispatches()[1]
    await sw.run_event(second["repo"], second["run_id"])
    assert (await sw.get(sweep["sweepId"]))["counts"] == {"success": 2}


async def test_a_completed_rollout_is_swept_when_auto_sweep_is_on(
    make_api: MakeApi, github_settings: Settings, github: FakeGitHub, repos: int
) -> None:
    settings = github_settings.replace(auto_sweep=True, stages_stable="100%")
    sw = await serving(make_api, settings, github, repos)
    api = sw.api
    await api.services.store.add_build(
        BuildRecord("build-new", "1.0.0", START, {"codex": "0.47.0"}, known_good_for=["codex"]),
        START,
    )
    _, rollout = await api.post(
        "/rollouts", token=await sw.admin(), json={"buildId": "build-new", "channel": "stable"}
    )
    assert rollout["state"] == "completed"

    async def swept() -> bool:
        _, page = await api.get("/sweeps", token=await sw.admin())
        return bool(page["items"])

    await wait_until(swept)
    await sw.settled()
    response, page = await api.get("/sweeps", token=await sw.admin())
    assert response.status == 200, page
    (sweep,) = page["items"]
    assert (sweep["startedBy"], sweep["buildId"], sweep["rolloutId"]) == (
        "auto",
        "build-new",
        rollout["rolloutId"],
    )
    assert {d["inputs"]["build_id"] for d in sw.dispatches()} == {"build-new"}


async def test_the_sweep_gate_holds_a_rollout_whose_sweep_failed(
    make_api: MakeApi, github_settings: Settings, github: FakeGitHub, repos: int, clock: ManualClock
) -> None:
    settings = github_settings.replace(sweep_gate=0.25, stages_stable="50%:1h,100%")
    sw = await serving(make_api, settings, github, repos)
    api = sw.api
    await api.services.store.add_build(
        BuildRecord("build-new", "1.0.0", START, {"codex": "0.47.0"}, known_good_for=["codex"]),
        START,
    )
    admin = await sw.admin()
    _, rollout = await api.post(
        "/rollouts", token=admin, json={"buildId": "build-new", "channel": "stable"}
    )
    rollout_id = rollout["rolloutId"]
    view = await api.services.sweeps.start(by="test", build_id="build-new", rollout_id=rollout_id)
    await sw.settled()
    # Its first stage has the sessions it needs; the deadline passes while the sweep runs.
    api.services.fleet.tally(rollout_id, 0).add("org-x", Counts(200, 0, 0))  # type: ignore[union-attr]
    clock.advance(timedelta(hours=1))
    await api.services.rollouts.step_all()
    _, now = await api.get(f"/rollouts/{rollout_id}", token=admin)
    assert now["currentPercentage"] == 50
    assert now["nextStep"]["detail"] == f"held: waiting for sweep {view.sweep.sweep_id} to finish"
    runs = {d["repo"]: d["run_id"] for d in sw.dispatches()}
    api.services.rollouts.wake.clear()
    await sw.run_event(REPOS[0], runs[REPOS[0]], conclusion="failure")
    await sw.run_event(REPOS[3], runs[REPOS[3]], conclusion="success")
    # The sweep's end wakes the rollout timer, which need not wait for its next look.
    assert api.services.rollouts.wake.is_set()
    await api.services.rollouts.step_all()
    _, now = await api.get(f"/rollouts/{rollout_id}", token=admin)
    assert now["currentPercentage"] == 50
    assert "1 of 2 repositories did not succeed" in now["nextStep"]["detail"]
    # A new sweep that passes lets it move on.
    second = await api.services.sweeps.start(by="test", build_id="build-new", rollout_id=rollout_id)
    await sw.settled()
    for dispatch in sw.dispatches():
        if dispatch["inputs"]["sweep_id"] == second.sweep.sweep_id:
            await sw.run_event(dispatch["repo"], dispatch["run_id"])
    await api.services.rollouts.step_all()
    _, now = await api.get(f"/rollouts/{rollout_id}", token=admin)
    assert now["state"] == "completed"
