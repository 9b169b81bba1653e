"""The canary on GitHub: pull requests and pushes of the runner repository that change its
runtime manifest start canaries, which show as check runs and run the canary workflow.

Every change on GitHub goes through the outbox, written with the canary change it
reports. Webhook handlers here may see a delivery twice; registering a build that exists,
or ending a run that ended, does nothing the second time.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gidgethub import BadRequest, routing, sansio

from app.clock import Clock, isoformat
from app.config import Settings
from app.github.commands import CommandRefused, CommandRegistry, Invocation, Permission, Place
from app.github.outbox import (
    Attempt,
    applier,
    create_check_run,
    dispatch_workflow,
    update_check_run,
)
from app.logs import get_logger
from app.pipeline.canary.metrics import TestResult, Thresholds, Verdict
from app.pipeline.canary.report import annotation_batches, check_output
from app.pipeline.canary.service import (
    CanaryError,
    CanaryService,
    build_id_for_commit,
)
from app.pipeline.version.semver import Version
from app.store import (
    BuildRecord,
    CanaryOutcome,
    CanaryRun,
    Conflict,
    NewCanaryRun,
    NewEffect,
    Store,
)

if TYPE_CHECKING:
    from app.github.webhooks import WebhookContext

log = get_logger("github.canary")

CHECK_NAME = "update-pipeline / canary"
RERUN = "rerun"
router = routing.Router()


# -- check runs and dispatches ----------------------------------------------------------


class GitHubCanaryReporter:
    """The CanaryReporter for builds of the runner repository."""

    def __init__(self, store: Store, settings: Settings, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.thresholds = Thresholds(
            settings.canary_min_pass_rate, settings.canary_max_disconnect_rate
        )

    async def _installation(self, build: BuildRecord) -> int | None:
        if build.repository is None:
            return None
        installation = await self.store.installation_for_repository(build.repository)
        if installation is None:
            log.warning("no installation covers %s: its canary is not on GitHub", build.repository)
            return None
        return installation.id

    async def started(self, build: BuildRecord, attempt: int, run: NewCanaryRun) -> list[NewEffect]:
        installation = await self._installation(build)
        if installation is None or build.commit_sha is None or run.check_key is None:
            return []
        assert build.repository is not None
        waiting = "the canary workflow is starting" if run.ref else "results are awaited"
        effects = [
            create_check_run(
                installation,
                build.repository,
                build.commit_sha,
                CHECK_NAME,
                external_id=run.check_key,
                fields={
                    "status": "in_progress",
                    "started_at": isoformat(run.deadline_at - self.settings.canary_timeout),
                    "output": {
                        "title": f"Canary of {build.build_id} running",
                        "summary": f"Run {attempt} of the canary of `{build.build_id}`: {waiting}."
                        f" Results are due by {isoformat(run.deadline_at)}.",
                    },
                    "actions": [_rerun_action()],
                },
            )
        ]
        if run.ref is not None and run.dispatch_key is not None:
            effects.append(
                dispatch_workflow(
                    installation,
                    build.repository,
                    self.settings.canary_workflow,
                    run.ref,
                    key=run.dispatch_key,
                    inputs={"build_id": build.build_id, "sha": build.commit_sha},
                )
            )
        return effects

    async def finished(
        self,
        build: BuildRecord,
        run: CanaryRun,
        outcome: CanaryOutcome,
        verdict: Verdict | None,
        *,
        ended_by: str,
    ) -> list[NewEffect]:
        installation = await self._installation(build)
        if installation is None or run.check_key is None:
            return []
        assert build.repository is not None
        results = [TestResult.from_json(r) for r in outcome.results or ()]
        output = check_output(
            build.build_id,
            verdict,
            state=outcome.state,
            results=results,
            thresholds=self.thresholds,
            runtime_versions=build.runtime_versions,
            metrics_url=self._metrics_url(build.build_id),
            error=outcome.error,
            manifest_path=self.settings.runtime_manifest,
            manifest_text=build.manifest,
            timed_out=ended_by == "timeout",
            cancelled=ended_by == "superseded",
        )
        batches = annotation_batches(output.annotations) or [[]]
        effects = [
            update_check_run(
                installation,
                build.repository,
                run.check_key,
                {
                    "status": "completed",
                    "conclusion": output.conclusion,
                    "completed_at": isoformat(self.clock.now()),
                    "output": output.output(batches[0]),
                    "actions": [_rerun_action()],
                },
            )
        ]
        # GitHub takes 50 annotations a request and adds each request's to the run's.
        effects += [
            update_check_run(
                installation,
                build.repository,
                run.check_key,
                {"output": output.output(batch)},
            )
            for batch in batches[1:]
        ]
        if ended_by == "superseded" and run.dispatch_key is not None:
            effects.append(
                cancel_workflow_run(
                    installation, build.repository, self.settings.canary_workflow, run
                )
            )
        return effects

    async def dispatched_run_id(self, run: CanaryRun) -> str | None:
        if run.dispatch_key is None:
            return None
        build = await self.store.get_build(run.build_id)
        if build is None or build.repository is None:
            return None
        target = dispatch_workflow(
            0, build.repository, self.settings.canary_workflow, "", key=run.dispatch_key
        ).target
        result = await self.store.effect_result(target, "workflow_dispatch")
        run_id = result.get("run_id") if result else None
        return str(run_id) if run_id is not None else None

    def _metrics_url(self, build_id: str) -> str | None:
        base = self.settings.public_url
        return f"{base}/api/update-pipeline/canary/{build_id}/metrics" if base else None


def _rerun_action() -> dict[str, str]:
    return {
        "label": "Re-run canary",
        "description": "Run this build's canary again",
        "identifier": RERUN,
    }


def cancel_workflow_run(
    installation_id: int, repo: str, workflow: str, run: CanaryRun
) -> NewEffect:
    """Cancel the workflow run dispatched for ``run`` (ordered after its dispatch)."""
    assert run.dispatch_key is not None
    dispatch = dispatch_workflow(installation_id, repo, workflow, "", key=run.dispatch_key)
    return NewEffect(
        installation_id,
        dispatch.target,
        "workflow_cancel",
        {"repo": repo, "dispatch_target": dispatch.target, "run_id": run.workflow_run_id},
    )


@applier("workflow_cancel")
async def _cancel(attempt: Attempt) -> Mapping[str, Any] | None:
    p = attempt.payload
    run_id = p.get("run_id")
    if run_id is None:
        dispatched = await attempt.store.effect_result(
            str(p["dispatch_target"]), "workflow_dispatch"
        )
        run_id = dispatched.get("run_id") if dispatched else None
    if run_id is None:
        return {"cancelled": False, "reason": "the dispatch named no run"}
    try:
        await attempt.client.post(
            "/repos/{owner}/{repo}/actions/runs/{run_id}/cancel",
            url_vars={**attempt.repo_vars, "run_id": str(run_id)},
            data={},
        )
    except BadRequest as exc:
        if exc.status_code == 409:  # it finished already: nothing left to cancel
            return {"cancelled": False, "reason": "already completed"}
        raise
    return {"cancelled": True, "run_id": run_id}


# -- webhooks ----------------------------------------------------------------------------


def _is_runner_repo(context: WebhookContext, data: Mapping[str, Any]) -> bool:
    runner = context.settings.runner_repo if context.settings else None
    name = (data.get("repository") or {}).get("full_name", "")
    return runner is not None and isinstance(name, str) and name.lower() == runner.lower()


async def _manifest_versions(
    context: WebhookContext, installation_id: int, repo: str, sha: str
) -> tuple[dict[str, str], str]:
    """The runtime manifest at ``sha``: provider -> version for the known providers, and
    its text."""
    assert context.github is not None and context.settings is not None
    client = context.github.installation(installation_id)
    owner, _, name = repo.partition("/")
    path = context.settings.runtime_manifest
    try:
        document = await client.getitem(
            "/repos/{owner}/{repo}/contents/{path}{?ref}",
            {"owner": owner, "repo": name, "path": path, "ref": sha},
        )
    except BadRequest as exc:
        if exc.status_code == 404:  # the change deleted or renamed it
            raise CanaryError(f"{path} is not in commit {sha[:12]}") from None
        raise
    try:
        text = base64.b64decode(document.get("content", "")).decode("utf-8")
        data = json.loads(text)
    except (binascii.Error, ValueError) as exc:
        raise CanaryError(f"{path} at {sha[:12]} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CanaryError(f"{path} at {sha[:12]} is not an object of provider: version")
    known = {p.id for p in context.settings.providers}
    versions: dict[str, str] = {}
    for provider, version in data.items():
        if provider not in known:
            log.info("%s names provider %r, which is not configured; ignored", path, provider)
            continue
        try:
            versions[provider] = Version(str(version)).canonical
        except ValueError:
            raise CanaryError(f"{path}: {provider} has {version!r}, not a version") from None
    if not versions:
        raise CanaryError(
            f"{path} names none of the configured providers ({', '.join(sorted(known))})"
        )
    return versions, text


async def _start(
    context: WebhookContext,
    installation_id: int,
    repo: str,
    sha: str,
    ref: str,
) -> BuildRecord | None:
    """Register the build of ``sha`` and start its canary (once, however often asked)."""
    assert context.canary is not None
    build_id = build_id_for_commit(sha)
    existing = await context.canary.store.get_build(build_id)
    if existing is not None:
        return existing
    versions, manifest = await _manifest_versions(context, installation_id, repo, sha)
    build = BuildRecord(
        build_id,
        runner_version=sha[:12],
        built_at=context.canary.clock.now(),
        runtime_versions=versions,
        repository=repo,
        commit_sha=sha,
        manifest=manifest,
    )
    try:
        stored, _ = await context.canary.register(build, ref=ref)
    except Conflict:  # registered meanwhile by a redelivery or another pull request
        return await context.canary.store.get_build(build_id)
    return stored


async def _touches_manifest(
    context: WebhookContext, installation_id: int, repo: str, number: int
) -> bool:
    assert context.github is not None and context.settings is not None
    client = context.github.installation(installation_id)
    owner, _, name = repo.partition("/")
    async for changed in client.getiter(
        "/repos/{owner}/{repo}/pulls/{pull_number}/files{?per_page}",
        {"owner": owner, "repo": name, "pull_number": str(number), "per_page": "100"},
        iterable_key=None,
    ):
        if changed.get("filename") == context.settings.runtime_manifest or (
            changed.get("previous_filename") == context.settings.runtime_manifest
        ):
            return True
    return False


@router.register("pull_request", action="opened")
@router.register("pull_request", action="synchronize")
@router.register("pull_request", action="reopened")
async def pull_request_changed(event: sansio.Event, context: WebhookContext) -> None:
    data = event.data
    if context.canary is None or context.github is None or not _is_runner_repo(context, data):
        return
    pull = data["pull_request"]
    repo = str(data["repository"]["full_name"])
    installation_id = int(data["installation"]["id"])
    number = int(pull["number"])
    head = pull["head"]
    sha = str(head["sha"])
    if not await _touches_manifest(context, installation_id, repo, number):
        # The pull request no longer changes the runtimes (the change was reverted): its
        # earlier build is not what it would ship, and /canary must not run it again.
        previous = await context.canary.store.forget_pull_request_build(repo, number)
        if previous is not None:
            _, run = await context.canary.build(previous)
            if run is not None and run.state in ("pending", "running"):
                await context.canary.supersede(
                    run, reason=f"the pull request no longer changes the manifest ({sha[:12]})"
                )
        return
    if (head.get("repo") or {}).get("full_name", "").lower() != repo.lower():
        await _notice(context, _fork_notice(installation_id, repo, sha))
        return
    try:
        build = await _start(context, installation_id, repo, sha, str(head["ref"]))
    except CanaryError as exc:
        await _notice(context, _manifest_problem(installation_id, repo, sha, str(exc)))
        return
    if build is None:
        return
    previous = await context.canary.store.set_pull_request_build(
        repo, number, build.build_id, sha, context.canary.clock.now()
    )
    if previous is not None and previous != build.build_id:
        _, run = await context.canary.build(previous)
        if run is not None and run.state in ("pending", "running"):
            await context.canary.supersede(run, reason=f"superseded by {sha[:12]}")


@router.register("push")
async def pushed(event: sansio.Event, context: WebhookContext) -> None:
    """A merge to the default branch: the build that ships gets its own canary."""
    data = event.data
    if context.canary is None or context.github is None or not _is_runner_repo(context, data):
        return
    assert context.settings is not None
    default = data["repository"].get("default_branch")
    if data.get("ref") != f"refs/heads/{default}" or data.get("deleted"):
        return
    manifest = context.settings.runtime_manifest
    changed = any(
        manifest in (commit.get("added") or []) + (commit.get("modified") or [])
        for commit in data.get("commits") or []
    )
    if not changed:
        return
    installation_id = int(data["installation"]["id"])
    repo = str(data["repository"]["full_name"])
    try:
        await _start(context, installation_id, repo, str(data["after"]), str(default))
    except CanaryError as exc:
        context.effects.append(
            _manifest_problem(installation_id, repo, str(data["after"]), str(exc))
        )


@router.register("check_run", action="rerequested")
async def check_rerequested(event: sansio.Event, context: WebhookContext) -> None:
    await _rerun_from_check(event.data, context)


@router.register("check_run", action="requested_action")
async def check_action(event: sansio.Event, context: WebhookContext) -> None:
    if (event.data.get("requested_action") or {}).get("identifier") == RERUN:
        await _rerun_from_check(event.data, context)


async def _rerun_from_check(data: Mapping[str, Any], context: WebhookContext) -> None:
    if context.canary is None or not _is_runner_repo(context, data):
        return
    check = data.get("check_run") or {}
    if check.get("name") != CHECK_NAME or not check.get("external_id"):
        return
    run = await context.canary.store.canary_run_by_check_key(str(check["external_id"]))
    if run is None:
        return
    _, latest = await context.canary.build(run.build_id)
    if latest is not None and latest.attempt > run.attempt:
        return  # a redelivery: this check run was re-run already
    await context.canary.rerun(run.build_id)


@router.register("check_suite", action="rerequested")
async def suite_rerequested(event: sansio.Event, context: WebhookContext) -> None:
    """ "Re-run all checks" on a commit: the canary of the build made from it runs again."""
    data = event.data
    if context.canary is None or not _is_runner_repo(context, data):
        return
    sha = str((data.get("check_suite") or {}).get("head_sha") or "")
    try:
        build_id = build_id_for_commit(sha)
    except ValueError:
        return
    _, latest = (
        await context.canary.build(build_id)
        if await context.canary.store.get_build(build_id)
        else (None, None)
    )
    if latest is None or latest.state in ("pending", "running"):
        return  # no canary for this commit, or one is going (a redelivery)
    await context.canary.rerun(build_id)


@router.register("workflow_run", action="completed")
async def workflow_completed(event: sansio.Event, context: WebhookContext) -> None:
    data = event.data
    if context.canary is None or not _is_runner_repo(context, data):
        return
    workflow_run = data["workflow_run"]
    title = str(workflow_run.get("display_title") or workflow_run.get("name") or "")
    keys = [word for word in title.split() if word.startswith("canary-build-")]
    await context.canary.workflow_finished(
        str(workflow_run["id"]), keys, workflow_run.get("conclusion")
    )


async def _notice(context: WebhookContext, effect: NewEffect) -> None:
    """A one-off check run (fork, bad manifest) for a commit: made once, however often
    the pull request is reopened or the event redelivered."""
    assert context.canary is not None
    if not await context.canary.store.effect_exists(effect.target, effect.kind):
        context.effects.append(effect)


def _fork_notice(installation_id: int, repo: str, sha: str) -> NewEffect:
    return create_check_run(
        installation_id,
        repo,
        sha,
        CHECK_NAME,
        external_id=f"fork-{sha[:12]}",
        fields={
            "status": "completed",
            "conclusion": "neutral",
            "output": {
                "title": "Canary not run for a fork",
                "summary": "Canaries run only for branches of this repository: the canary"
                " workflow cannot be started on a fork's branch. Push the change to a branch"
                " here to have its build tested.",
            },
        },
    )


def _manifest_problem(installation_id: int, repo: str, sha: str, problem: str) -> NewEffect:
    return create_check_run(
        installation_id,
        repo,
        sha,
        CHECK_NAME,
        external_id=f"manifest-{sha[:12]}",
        fields={
            "status": "completed",
            "conclusion": "failure",
            "output": {"title": "Runtime manifest not usable", "summary": problem},
        },
    )


# -- the /canary command -------------------------------------------------------------------


def register_commands(commands: CommandRegistry, canary: CanaryService, settings: Settings) -> None:
    def on_runner_pull_request(place: Place) -> bool:
        runner = settings.runner_repo
        return place.is_pull_request and runner is not None and place.repo.lower() == runner.lower()

    async def rerun(call: Invocation) -> str:
        build_id = await canary.store.pull_request_build(call.place.repo, call.place.issue_number)
        if build_id is None:
            raise CommandRefused(
                "this pull request has no canary: it does not change the runtime manifest"
            )
        run = await canary.rerun(build_id)
        return f"started run {run.attempt} of the canary of `{build_id}`."

    commands.register(
        "canary",
        Permission.WRITE,
        "run the canary of this pull request's build again",
        rerun,
        where=on_runner_pull_request,
    )
