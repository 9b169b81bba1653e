"""Sweeps on GitHub: reading repositories' opt-in files, dispatching their sweep
workflows through the outbox, following the runs by their workflow_run events, the
summary on a rollout's tracking issue, and /sweep."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from gidgethub import BadRequest, routing, sansio

from app.clock import Clock, parse_iso
from app.config import Settings
from app.github.app import GitHubApp, InstallationSuspended
from app.github.commands import (
    CommandRefused,
    CommandRegistry,
    Invocation,
    Permission,
    escape_for_comment,
)
from app.github.outbox import Attempt, add_comment, applier, marker
from app.github.tracking import ROLLOUT_LABEL, TrackingReporter
from app.github.webhooks import WebhookContext
from app.logs import get_logger
from app.store import EventRecord, NewEffect, Rollout, Store, Sweep, SweepRepo, SweepRun
from app.sweeps.config import CONFIG_PATH, ConfigError, parse_config
from app.sweeps.service import SweepError, SweepService, WorkflowRunEvent

log = get_logger("github.sweeps")

READ_CONCURRENCY = 5
READ_BATCH = 200
FAILED_SHOWN = 30


# -- opt-in files ----------------------------------------------------------------------------


class SweepConfigs:
    """Reads ``.github/update-pipeline.yml`` of repositories where the App is installed,
    and keeps what it says in the store (read again when a push changes it)."""

    def __init__(self, store: Store, github: GitHubApp, settings: Settings, clock: Clock) -> None:
        self.store = store
        self.github = github
        self.settings = settings
        self.clock = clock

    async def read(self, repo: str, installation_id: int) -> SweepRepo:
        try:
            client = self.github.installation(installation_id)
        except InstallationSuspended:
            found = SweepRepo(
                repo.lower(), installation_id, "unreadable", error="installation suspended"
            )
            await self.store.save_sweep_repo(found)
            return found
        owner, _, name = repo.partition("/")
        url_vars = {"owner": owner, "repo": name, "path": CONFIG_PATH}
        state, config, error = "absent", None, None
        try:
            file = await client.getitem("/repos/{owner}/{repo}/contents/{path}", url_vars=url_vars)
            text = _content(file)
            parsed = parse_config(text, [p.id for p in self.settings.providers])
            if parsed is not None:
                if parsed.ref is None:
                    info = await client.getitem(
                        "/repos/{owner}/{repo}", url_vars={"owner": owner, "repo": name}
                    )
                    parsed = dataclasses.replace(parsed, ref=str(info["default_branch"]))
                state, config = "opted_in", parsed.to_json()
        except ConfigError as exc:
            state, error = "misconfigured", str(exc)
        except BadRequest as exc:
            if exc.status_code != 404:
                state, error = "unreadable", f"GitHub answered {exc.status_code}: {exc}"[:500]
        found = SweepRepo(
            repo.lower(), installation_id, state, config, error, read_at=self.clock.now()
        )
        await self.store.save_sweep_repo(found)
        log.info("sweep config of %s: %s%s", repo, state, f" ({error})" if error else "")
        return found

    async def read_unread(self) -> int:
        """Read every installed repository's file not read yet; how many were read."""
        done = 0
        gate = asyncio.Semaphore(READ_CONCURRENCY)

        async def one(repo: str, installation_id: int) -> None:
            async with gate:
                try:
                    await self.read(repo, installation_id)
                except Exception as exc:
                    # GitHub down or rate limited: left unread, tried again next time; one
                    # repository must not hold up a sweep of the others.
                    log.warning("could not read the sweep config of %s: %s", repo, exc)
                    failed.add(repo)

        failed: set[str] = set()
        while True:
            batch = [
                (repo, inst)
                for repo, inst in await self.store.unread_sweep_repos(limit=READ_BATCH)
                if repo not in failed
            ]
            if not batch:
                return done
            await asyncio.gather(*(one(repo, inst) for repo, inst in batch))
            done += len(batch)


def _content(file: Any) -> bytes:
    if not isinstance(file, Mapping) or file.get("type") != "file":
        raise ConfigError(f"{CONFIG_PATH} is not a file")
    try:
        return base64.b64decode(str(file.get("content") or ""), validate=False)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{CONFIG_PATH}: GitHub sent content that is not base64") from None


# -- dispatching ------------------------------------------------------------------------------


class GitHubSweepReporter:
    """The SweepReporter: dispatches through the outbox, summaries on tracking issues."""

    def __init__(self, store: Store, settings: Settings, tracking: TrackingReporter | None) -> None:
        self.store = store
        self.settings = settings
        self.tracking = tracking

    def dispatch(self, run: SweepRun) -> NewEffect:
        key = f"sweep-{run.sweep_id}"
        marker(key)
        return NewEffect(
            run.installation_id,
            f"{run.repo}@sweep:{run.sweep_id}",
            "sweep_dispatch",
            {
                "repo": run.repo,
                "workflow": run.workflow,
                "ref": run.ref,
                "inputs": dict(run.inputs),
                "key": run.sweep_id,
                "sweep_id": run.sweep_id,
            },
        )

    async def finished(self, sweep: Sweep, runs: Sequence[SweepRun]) -> list[NewEffect]:
        if sweep.rollout_id is None or self.tracking is None:
            return []
        issue = await self.tracking.issue(sweep.rollout_id)
        if issue is None or issue.number is None:
            return []
        return [
            add_comment(
                issue.installation_id,
                issue.repo,
                issue.number,
                summary(sweep, runs),
                key=f"sweep-summary-{sweep.sweep_id}",
            )
        ]


def summary(sweep: Sweep, runs: Sequence[SweepRun]) -> str:
    """A finished sweep in a few lines: counts by outcome and the repositories that did
    not succeed, with links to their runs."""
    outcomes: dict[str, int] = {}
    for run in runs:
        outcome = run.conclusion if run.state == "completed" and run.conclusion else run.state
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    what = (
        f"build `{sweep.build_id}`"
        if sweep.build_id
        else f"{sweep.provider} {escape_for_comment(sweep.version or '', 100)}"
    )
    counts = ", ".join(
        f"{n} {outcome.replace('_', ' ')}" for outcome, n in sorted(outcomes.items())
    )
    lines = [f"**Sweep** of {what} finished over {len(runs)} repositories: {counts or 'none'}."]
    bad = [
        r
        for r in runs
        if not (r.state == "completed" and r.conclusion in ("success", "skipped", "neutral"))
    ]
    for run in bad[:FAILED_SHOWN]:
        outcome = run.conclusion or run.state.replace("_", " ")
        link = f" ([run]({run.run_url}))" if run.run_url else ""
        why = f": {escape_for_comment(run.error, 200)}" if run.error else ""
        lines.append(f"- `{run.repo}`: {outcome}{link}{why}")
    if len(bad) > FAILED_SHOWN:
        lines.append(f"- … and {len(bad) - FAILED_SHOWN} more: `GET /sweeps/{sweep.sweep_id}`.")
    return "\n".join(lines)


@applier("sweep_dispatch")
async def _sweep_dispatch(attempt: Attempt) -> Mapping[str, Any]:
    """Dispatch a repository's sweep workflow once, and record the run it started. A
    workflow that is missing, or refuses an input, fails that repository with GitHub's
    message; the sweep goes on."""
    p = attempt.payload
    sweep_id, repo = str(p["sweep_id"]), str(p["repo"])
    url_vars = {**attempt.repo_vars, "workflow_id": str(p["workflow"])}
    now = attempt.effect.created_at
    if attempt.repeated:
        async for run in attempt.client.getiter(
            "/repos/{owner}/{repo}/actions/workflows/{workflow_id}/runs{?event,created,per_page}",
            {
                **url_vars,
                "event": "workflow_dispatch",
                "created": f">={attempt.since}",
                "per_page": "100",
            },
            iterable_key="workflow_runs",
        ):
            if sweep_id in (run.get("display_title") or ""):
                await _record(attempt, sweep_id, repo, run["id"], run.get("html_url"), now)
                return {"run_id": run["id"], "found": True}
    try:
        started = await attempt.client.post(
            "/repos/{owner}/{repo}/actions/workflows/{workflow_id}/dispatches",
            url_vars=url_vars,
            data={"ref": p["ref"], "inputs": dict(p["inputs"]), "return_run_details": True},
        )
    except BadRequest as exc:
        if exc.status_code not in (404, 422):
            raise
        message = f"GitHub answered {exc.status_code}: {exc}"[:500]
        await attempt.store.update_sweep_run(
            sweep_id,
            repo,
            {"state": "failed", "error": message},
            states=("dispatching",),
            at=now,
        )
        _wake()
        return {"failed": message}
    if isinstance(started, Mapping) and "workflow_run_id" in started:
        run_id = int(started["workflow_run_id"])
        await _record(attempt, sweep_id, repo, run_id, started.get("html_url"), now)
        return {"run_id": run_id}
    # An older GitHub answers 204 and names no run: its workflow_run events find it.
    await attempt.store.update_sweep_run(
        sweep_id, repo, {"state": "queued"}, states=("dispatching",), at=now
    )
    return {}


async def _record(
    attempt: Attempt, sweep_id: str, repo: str, run_id: int, url: Any, at: datetime
) -> None:
    changes: dict[str, Any] = {"state": "queued", "run_id": int(run_id)}
    if url:
        changes["run_url"] = str(url)
    await attempt.store.update_sweep_run(sweep_id, repo, changes, states=("dispatching",), at=at)


# The sweep services to wake when a dispatch fails (the applier runs in the outbox worker).
_SERVICES: list[SweepService] = []


def _wake() -> None:
    for service in _SERVICES:
        service.wake.set()


# -- events -------------------------------------------------------------------------------------


def router_for(service: SweepService, configs: SweepConfigs) -> routing.Router:
    router = routing.Router()

    @router.register("workflow_run")
    async def workflow_run(event: sansio.Event, context: WebhookContext) -> None:
        data = event.data
        run = data.get("workflow_run") or {}
        if data.get("action") not in ("requested", "in_progress", "completed"):
            return
        created = run.get("created_at")
        await service.run_event(
            WorkflowRunEvent(
                repo=str(data["repository"]["full_name"]).lower(),
                run_id=int(run["id"]),
                run_attempt=int(run.get("run_attempt") or 1),
                workflow_path=str(run.get("path") or ""),
                display_title=str(run.get("display_title") or run.get("name") or ""),
                status=str(run.get("status") or data["action"]),
                conclusion=run.get("conclusion"),
                url=run.get("html_url"),
                created_at=parse_iso(created) if isinstance(created, str) else None,
                event=str(run.get("event") or ""),
            )
        )

    @router.register("push")
    async def push(event: sansio.Event, context: WebhookContext) -> None:
        data = event.data
        repository = data.get("repository") or {}
        default = repository.get("default_branch") or repository.get("master_branch")
        if data.get("ref") != f"refs/heads/{default}" or "installation" not in data:
            return
        touched = {
            path
            for commit in data.get("commits") or ()
            for path in [
                *commit.get("added", ()),
                *commit.get("modified", ()),
                *commit.get("removed", ()),
            ]
        }
        if CONFIG_PATH in touched:
            await configs.read(str(repository["full_name"]), int(data["installation"]["id"]))

    @router.register("installation_repositories", action="added")
    async def added(event: sansio.Event, context: WebhookContext) -> None:
        installation = int(event.data["installation"]["id"])
        for repository in event.data.get("repositories_added") or ():
            await configs.read(str(repository["full_name"]), installation)

    return router


# -- /sweep --------------------------------------------------------------------------------------


def register_commands(
    registry: CommandRegistry, service: SweepService, tracking: TrackingReporter
) -> None:
    repo = tracking.repo.lower()

    async def sweep(call: Invocation) -> str:
        store = service.store
        found = await store.tracking_issue_by_number(call.place.repo, call.place.issue_number)
        if found is None:
            for pending in await store.unnumbered_tracking_issues(call.place.repo):
                await tracking.issue(pending.rollout_id)
            found = await store.tracking_issue_by_number(call.place.repo, call.place.issue_number)
        if found is None:
            raise CommandRefused("this issue does not track a rollout.")
        rollout = await store.get_rollout(found.rollout_id)
        assert rollout is not None
        try:
            view = await service.start(
                by=call.actor, build_id=rollout.build_id, rollout_id=rollout.rollout_id
            )
        except SweepError as exc:
            raise CommandRefused(escape_for_comment(str(exc), 300)) from None
        return (
            f"started sweep `{view.sweep.sweep_id}` of `{rollout.build_id}` over"
            f" {len(view.runs)} repositories; its summary comes here when it finishes."
        )

    levels = dict(tracking.settings.command_permissions)
    registry.register(
        "sweep",
        Permission[levels.get("sweep", "maintain").upper()],
        "run the post-update sweep of this rollout's build",
        sweep,
        where=lambda place: place.repo.lower() == repo and ROLLOUT_LABEL in place.labels,
    )


def auto_sweep(service: SweepService) -> Callable[[Rollout, Sequence[EventRecord]], None]:
    """A rollout listener: each completed rollout's build is swept (UPDATE_PIPELINE_AUTO_SWEEP)."""
    running: set[asyncio.Task[None]] = set()

    async def sweep(rollout: Rollout) -> None:
        try:
            await service.start(by="auto", build_id=rollout.build_id, rollout_id=rollout.rollout_id)
        except Exception:
            log.exception("the automatic sweep after rollout %s failed", rollout.rollout_id)

    def listener(rollout: Rollout, events: Sequence[EventRecord]) -> None:
        if any(e.type == "rollout_completed" for e in events):
            task = asyncio.create_task(sweep(rollout))
            running.add(task)
            task.add_done_callback(running.discard)

    return listener


def wire(service: SweepService) -> None:
    """Let dispatch failures in the outbox wake this service."""
    if service not in _SERVICES:
        _SERVICES.append(service)
