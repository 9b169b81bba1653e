"""The durable outbox: GitHub side effects written with the change they follow, applied later.

A feature never calls GitHub to report a state change. It returns ``NewEffect``s (built
with the helpers below) that the store writes in the same transaction as the change; the
``OutboxWorker`` applies them. So a crash or a GitHub outage delays a side effect but
never loses it, and never applies one for a change that did not commit.

Delivery is at least once: an attempt is counted before it is made, and an attempt that
follows another (after a failure or a crash) first looks for what the earlier one may
have created. Issues and comments carry a hidden marker, check runs an ``external_id``.
Reactions, label additions and edits are idempotent by nature.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
from gidgethub import BadRequest, GitHubBroken

from app.clock import Clock, isoformat
from app.github.auth import InstallationSuspended
from app.github.client import GitHubClient, GitHubRateLimited, GitHubUnavailable
from app.logs import get_logger
from app.store import BUSY_PAUSE, Effect, NewEffect, Store, StoreBusy

if TYPE_CHECKING:
    from app.github.app import GitHubApp
    from app.pipeline import UpdatePipeline

log = get_logger("github.outbox")

RETRY_BASE = timedelta(seconds=2)
RETRY_CEILING = timedelta(minutes=10)
# GitHub refusing an entry (4xx) is retried a little, as a 404 or 422 can be a replica
# lagging behind a moment; after that the entry is parked for an operator to look at.
REFUSED_ATTEMPTS = 3
SUSPENDED_RECHECK = timedelta(minutes=10)
KEEP_DONE = timedelta(days=7)
BATCH = 200
# Look-ups for an earlier attempt's object search from a little before the entry was
# written: GitHub's clock and ours need not agree to the second.
CLOCK_MARGIN = timedelta(hours=1)

_MARKER_KEY = re.compile(r"[A-Za-z0-9_.:/#@+=-]{1,200}")


def marker(key: str) -> str:
    """The hidden HTML comment that identifies an issue or comment the outbox made."""
    if not _MARKER_KEY.fullmatch(key):
        raise ValueError(f"outbox key {key!r}: letters, digits and _.:/#@+=- only")
    return f"<!-- update-pipeline:{key} -->"


# -- building entries -----------------------------------------------------------------------


def issue_target(repo: str, number: int) -> str:
    return f"{repo.lower()}#{number}"


def add_reaction(
    installation_id: int,
    repo: str,
    issue_number: int,
    content: str,
    *,
    comment_id: int | None = None,
) -> NewEffect:
    """A reaction on a comment (``comment_id``) or else on the issue itself. Ordered with
    everything else said on that issue."""
    payload: dict[str, Any] = {"repo": repo, "issue_number": issue_number, "content": content}
    if comment_id is not None:
        payload["comment_id"] = comment_id
    return NewEffect(installation_id, issue_target(repo, issue_number), "reaction", payload)


def add_comment(
    installation_id: int, repo: str, issue_number: int, body: str, *, key: str
) -> NewEffect:
    """A comment, made once however often it is attempted: ``key`` must be unique to it."""
    marker(key)
    return NewEffect(
        installation_id,
        issue_target(repo, issue_number),
        "comment",
        {"repo": repo, "issue_number": issue_number, "body": body, "key": key},
    )


def open_issue(
    installation_id: int,
    repo: str,
    title: str,
    body: str,
    *,
    key: str,
    labels: Sequence[str] = (),
) -> NewEffect:
    """A new issue. Later entries for it use ``created_issue_target(repo, key)`` (the
    helpers below take ``issue_key=key`` instead of a number)."""
    marker(key)
    return NewEffect(
        installation_id,
        created_issue_target(repo, key),
        "issue",
        {"repo": repo, "title": title, "body": body, "key": key, "labels": list(labels)},
    )


def created_issue_target(repo: str, key: str) -> str:
    return f"{repo.lower()}#key:{key}"


def edit_issue(
    installation_id: int,
    repo: str,
    *,
    issue_number: int | None = None,
    issue_key: str | None = None,
    title: str | None = None,
    body: str | None = None,
    state: str | None = None,
    state_reason: str | None = None,
) -> NewEffect:
    """Edit an issue, by number or by the key of an issue the outbox opened. A body edit
    replaces any older body edit of the same issue still waiting to be applied."""
    target = _issue_ref(repo, issue_number, issue_key)
    given = {"title": title, "body": body, "state": state, "state_reason": state_reason}
    fields = {k: v for k, v in given.items() if v is not None}
    payload = {"repo": repo, "issue_number": issue_number, "issue_key": issue_key, **fields}
    replace_key = f"{target}:body" if body is not None and set(fields) == {"body"} else None
    return NewEffect(installation_id, target, "issue_edit", payload, replace_key)


def add_labels(
    installation_id: int,
    repo: str,
    labels: Sequence[str],
    *,
    issue_number: int | None = None,
    issue_key: str | None = None,
) -> NewEffect:
    target = _issue_ref(repo, issue_number, issue_key)
    payload = {
        "repo": repo,
        "issue_number": issue_number,
        "issue_key": issue_key,
        "labels": list(labels),
    }
    return NewEffect(installation_id, target, "labels", payload)


def create_check_run(
    installation_id: int,
    repo: str,
    head_sha: str,
    name: str,
    *,
    external_id: str,
    fields: Mapping[str, Any] | None = None,
) -> NewEffect:
    """A check run, found again by ``external_id`` (unique per repository) if an attempt
    is repeated. ``fields`` are the rest of GitHub's create body (status, output, ...)."""
    payload = {
        "repo": repo,
        "head_sha": head_sha,
        "name": name,
        "external_id": external_id,
        "fields": dict(fields or {}),
    }
    return NewEffect(installation_id, check_run_target(repo, external_id), "check_run", payload)


def update_check_run(
    installation_id: int, repo: str, external_id: str, fields: Mapping[str, Any]
) -> NewEffect:
    """Update the check run ``create_check_run`` made with this ``external_id``."""
    payload = {"repo": repo, "external_id": external_id, "fields": dict(fields)}
    return NewEffect(
        installation_id, check_run_target(repo, external_id), "check_run_edit", payload
    )


def dispatch_workflow(
    installation_id: int,
    repo: str,
    workflow: str,
    ref: str,
    *,
    key: str,
    inputs: Mapping[str, str] | None = None,
    key_input: str = "dispatch_id",
) -> NewEffect:
    """A ``workflow_dispatch`` of ``workflow`` (file name or id) on ``ref``, made once.

    GitHub gives a dispatch no id of its own, so ``key`` goes in as the input
    ``key_input``: the workflow must declare that input and show it in its ``run-name``
    (``run-name: canary ${{ inputs.dispatch_id }}``), so that a repeated attempt finds
    the run the earlier one started instead of starting another."""
    marker(key)
    payload = {
        "repo": repo,
        "workflow": workflow,
        "ref": ref,
        "key": key,
        "inputs": {**(inputs or {}), key_input: key},
    }
    return NewEffect(
        installation_id, f"{repo.lower()}@workflow:{workflow}:{key}", "workflow_dispatch", payload
    )


def check_run_target(repo: str, external_id: str) -> str:
    return f"{repo.lower()}@check:{external_id}"


def _issue_ref(repo: str, number: int | None, key: str | None) -> str:
    if (number is None) == (key is None):
        raise ValueError("give an issue number or the key of an issue the outbox opened")
    return issue_target(repo, number) if number is not None else created_issue_target(repo, key)  # type: ignore[arg-type]


# -- applying entries -------------------------------------------------------------------------


class Unresolved(Exception):
    """An entry refers to an object an earlier entry has not created (yet)."""


@dataclass
class Attempt:
    """One attempt at one entry: what an applier may use."""

    client: GitHubClient
    effect: Effect
    store: Store

    @property
    def payload(self) -> Mapping[str, Any]:
        return self.effect.payload

    @property
    def repeated(self) -> bool:
        """An earlier attempt was started and may have reached GitHub."""
        return self.effect.attempts > 1

    @property
    def repo_vars(self) -> dict[str, str]:
        owner, _, repo = str(self.payload["repo"]).partition("/")
        return {"owner": owner, "repo": repo}

    @property
    def since(self) -> str:
        return isoformat(self.effect.created_at - CLOCK_MARGIN)

    async def issue_number(self) -> int:
        number = self.payload.get("issue_number")
        if isinstance(number, int):
            return number
        key = str(self.payload["issue_key"])
        created = await self.store.effect_result(
            created_issue_target(str(self.payload["repo"]), key), "issue"
        )
        if created is None:
            raise Unresolved(f"issue {key!r} has not been opened")
        return int(created["number"])


Applier = Callable[[Attempt], Awaitable[Mapping[str, Any] | None]]
APPLIERS: dict[str, Applier] = {}


def applier(kind: str) -> Callable[[Applier], Applier]:
    def register(function: Applier) -> Applier:
        APPLIERS[kind] = function
        return function

    return register


def _with_marker(body: str, key: str) -> str:
    return f"{body}\n\n{marker(key)}"


@applier("reaction")
async def _reaction(attempt: Attempt) -> Mapping[str, Any]:
    p = attempt.payload
    content = {"content": p["content"]}
    if "comment_id" in p:
        url = "/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions"
        url_vars = {**attempt.repo_vars, "comment_id": str(p["comment_id"])}
    else:
        url = "/repos/{owner}/{repo}/issues/{issue_number}/reactions"
        url_vars = {**attempt.repo_vars, "issue_number": str(p["issue_number"])}
    # GitHub answers an existing (user, content) reaction with 200: repeating is harmless.
    reaction = await attempt.client.post(url, url_vars=url_vars, data=content)
    return {"id": reaction["id"]}


@applier("comment")
async def _comment(attempt: Attempt) -> Mapping[str, Any]:
    p = attempt.payload
    url_vars = {**attempt.repo_vars, "issue_number": str(await attempt.issue_number())}
    tag = marker(str(p["key"]))
    if attempt.repeated:
        async for comment in attempt.client.getiter(
            "/repos/{owner}/{repo}/issues/{issue_number}/comments{?since,per_page}",
            {**url_vars, "since": attempt.since, "per_page": "100"},
        ):
            if tag in (comment.get("body") or ""):
                return {"id": comment["id"], "url": comment["html_url"], "found": True}
    comment = await attempt.client.post(
        "/repos/{owner}/{repo}/issues/{issue_number}/comments",
        url_vars=url_vars,
        data={"body": _with_marker(str(p["body"]), str(p["key"]))},
    )
    return {"id": comment["id"], "url": comment["html_url"]}


@applier("issue")
async def _issue(attempt: Attempt) -> Mapping[str, Any]:
    p = attempt.payload
    tag = marker(str(p["key"]))
    if attempt.repeated:
        async for issue in attempt.client.getiter(
            "/repos/{owner}/{repo}/issues{?state,sort,direction,since,per_page}",
            {
                **attempt.repo_vars,
                "state": "all",
                "sort": "created",
                "direction": "desc",
                "since": attempt.since,
                "per_page": "100",
            },
        ):
            if tag in (issue.get("body") or ""):
                return {"number": issue["number"], "url": issue["html_url"], "found": True}
    data: dict[str, Any] = {
        "title": p["title"],
        "body": _with_marker(str(p["body"]), str(p["key"])),
    }
    if p.get("labels"):
        data["labels"] = list(p["labels"])
    issue = await attempt.client.post(
        "/repos/{owner}/{repo}/issues", url_vars=attempt.repo_vars, data=data
    )
    return {"number": issue["number"], "url": issue["html_url"]}


@applier("issue_edit")
async def _issue_edit(attempt: Attempt) -> None:
    p = attempt.payload
    data = {k: p[k] for k in ("title", "body", "state", "state_reason") if k in p}
    if "body" in data and p.get("issue_key"):
        # An issue the outbox opened keeps its marker, so it can always be found again.
        data["body"] = _with_marker(str(data["body"]), str(p["issue_key"]))
    await attempt.client.patch(
        "/repos/{owner}/{repo}/issues/{issue_number}",
        url_vars={**attempt.repo_vars, "issue_number": str(await attempt.issue_number())},
        data=data,
    )
    return None


@applier("labels")
async def _labels(attempt: Attempt) -> None:
    await attempt.client.post(
        "/repos/{owner}/{repo}/issues/{issue_number}/labels",
        url_vars={**attempt.repo_vars, "issue_number": str(await attempt.issue_number())},
        data={"labels": list(attempt.payload["labels"])},
    )
    return None


async def _find_check_run(attempt: Attempt, head_sha: str, name: str, external_id: str) -> Any:
    async for run in attempt.client.getiter(
        "/repos/{owner}/{repo}/commits/{ref}/check-runs{?check_name,filter,per_page}",
        {
            **attempt.repo_vars,
            "ref": head_sha,
            "check_name": name,
            "filter": "all",
            "per_page": "100",
        },
        iterable_key="check_runs",
    ):
        if run.get("external_id") == external_id:
            return run
    return None


@applier("check_run")
async def _check_run(attempt: Attempt) -> Mapping[str, Any]:
    p = attempt.payload
    if attempt.repeated:
        run = await _find_check_run(attempt, p["head_sha"], p["name"], p["external_id"])
        if run is not None:
            return {"id": run["id"], "url": run["html_url"], "found": True}
    data = {
        **p["fields"],
        "name": p["name"],
        "head_sha": p["head_sha"],
        "external_id": p["external_id"],
    }
    run = await attempt.client.post(
        "/repos/{owner}/{repo}/check-runs", url_vars=attempt.repo_vars, data=data
    )
    return {"id": run["id"], "url": run["html_url"]}


@applier("check_run_edit")
async def _check_run_edit(attempt: Attempt) -> None:
    p = attempt.payload
    created = await attempt.store.effect_result(
        check_run_target(str(p["repo"]), str(p["external_id"])), "check_run"
    )
    if created is None:
        raise Unresolved(f"check run {p['external_id']!r} has not been created")
    await attempt.client.patch(
        "/repos/{owner}/{repo}/check-runs/{check_run_id}",
        url_vars={**attempt.repo_vars, "check_run_id": str(created["id"])},
        data=dict(p["fields"]),
    )
    return None


@applier("workflow_dispatch")
async def _workflow_dispatch(attempt: Attempt) -> Mapping[str, Any]:
    p = attempt.payload
    url_vars = {**attempt.repo_vars, "workflow_id": str(p["workflow"])}
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
            if str(p["key"]) in (run.get("display_title") or ""):
                return {"run_id": run["id"], "url": run["html_url"], "found": True}
    started = await attempt.client.post(
        "/repos/{owner}/{repo}/actions/workflows/{workflow_id}/dispatches",
        url_vars=url_vars,
        data={"ref": p["ref"], "inputs": dict(p["inputs"]), "return_run_details": True},
    )
    if isinstance(started, Mapping) and "workflow_run_id" in started:
        return {"run_id": started["workflow_run_id"], "url": started.get("html_url")}
    return {}  # a GitHub that answers 204 names no run; it is found later by its key


# -- the queue and its worker -----------------------------------------------------------------


class Outbox:
    """Where features queue side effects that follow no other store change, and how the
    worker learns that there is work."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.wake = asyncio.Event()

    async def add(self, effects: Sequence[NewEffect]) -> None:
        if effects:
            await self.store.add_effects(effects, self.clock.now())
            self.wake.set()

    def written(self) -> None:
        """Tell the worker that a store change just committed entries."""
        self.wake.set()


def transient(exc: BaseException) -> bool:
    """Whether waiting can cure the failure: GitHub down, slow, limiting, or a token
    problem an operator can fix; as opposed to GitHub refusing this very request."""
    if isinstance(exc, GitHubUnavailable | GitHubRateLimited | GitHubBroken):
        return True
    if isinstance(exc, aiohttp.ClientError | TimeoutError | InstallationSuspended):
        return True
    if isinstance(exc, BadRequest):
        return exc.status_code in (401, 403, 408, 429) or exc.status_code >= 500
    return False


class OutboxWorker:
    """Pipeline component: applies due entries, one lane (task) per installation, so a
    rate-limited installation holds up only its own entries."""

    name = "outbox"

    def __init__(
        self,
        outbox: Outbox,
        github: GitHubApp,
        *,
        appliers: Mapping[str, Applier] | None = None,
        idle_check: float = 5.0,
    ) -> None:
        self.outbox = outbox
        self.store = outbox.store
        self.clock = outbox.clock
        self.github = github
        self.appliers = dict(APPLIERS if appliers is None else appliers)
        self.idle_check = idle_check
        self._lanes: dict[int, asyncio.Task[None]] = {}

    async def start(self, pipeline: UpdatePipeline) -> None:
        pipeline.spawn("outbox-worker", self._loop())

    async def stop(self) -> None:
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        self._lanes.clear()

    async def _loop(self) -> None:
        last_prune = None
        try:
            while True:
                self.outbox.wake.clear()
                try:
                    await self.run_once()
                    today = self.clock.now().date()
                    if last_prune != today:
                        pruned = await self.store.prune_effects(self.clock.now() - KEEP_DONE)
                        last_prune = today
                        if pruned:
                            log.info("forgot %d applied outbox entries older than 7 days", pruned)
                    await self._idle()
                except StoreBusy as exc:
                    # Another process holds the database; GitHub's changes wait a moment.
                    log.warning("outbox: %s; trying again in %.0fs", exc, BUSY_PAUSE)
                    await asyncio.sleep(BUSY_PAUSE)
        finally:
            await self.stop()

    async def run_once(self) -> None:
        """Start a lane for every installation with due entries and no lane running."""
        busy = [i for i, lane in self._lanes.items() if not lane.done()]
        due = await self.store.due_effects(self.clock.now(), limit=BATCH, skip_installations=busy)
        lanes: dict[int, list[Effect]] = {}
        for effect in due:
            lanes.setdefault(effect.installation_id, []).append(effect)
        for installation_id, effects in lanes.items():
            self._lanes[installation_id] = asyncio.create_task(
                self._lane(effects), name=f"outbox-{installation_id}"
            )

    async def drain(self) -> None:
        """Apply until nothing is due (tests, and a clean shutdown's last chance)."""
        while True:
            await self.run_once()
            running = [lane for lane in self._lanes.values() if not lane.done()]
            if not running:
                return
            await asyncio.gather(*running)

    async def _lane(self, effects: Sequence[Effect]) -> None:
        try:
            for effect in effects:
                await self.apply(effect)
        finally:
            # Applying one entry can make the next of its target due.
            self.outbox.wake.set()

    async def _idle(self) -> None:
        # A lane still applying its installation's entries wakes this loop when it ends;
        # counting its entries as due would make the loop spin until then.
        busy = [i for i, lane in self._lanes.items() if not lane.done()]
        due = await self.store.next_effect_due(skip_installations=busy)
        wait = self.idle_check
        if due is not None:
            wait = min(wait, max(0.0, (due - self.clock.now()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.outbox.wake.wait(), wait)

    async def apply(self, effect: Effect) -> None:
        apply = self.appliers.get(effect.kind)
        started = await self.store.start_effect(effect.id, self.clock.now())
        if started is None:  # applied or parked meanwhile
            return
        if apply is None:
            await self._park(started, f"no applier for kind {effect.kind!r}")
            return
        try:
            client = self.github.installation(started.installation_id)
            result = await apply(Attempt(client, started, self.store))
        except Exception as exc:
            await self._failed(started, exc)
            return
        if not await self.store.finish_effect(started, result, self.clock.now()):
            log.debug("outbox entry %d changed while applied; applying again", started.id)
            self.outbox.wake.set()

    async def _failed(self, effect: Effect, exc: Exception) -> None:
        error = _describe(exc)
        now = self.clock.now()
        if isinstance(exc, GitHubRateLimited):
            retry_at = now + timedelta(seconds=max(exc.reset_in, 1.0))
        elif isinstance(exc, InstallationSuspended):
            retry_at = now + SUSPENDED_RECHECK
        elif transient(exc) or isinstance(exc, Unresolved):
            # Never parked: an outage of any length delays entries, it does not drop them.
            retry_at = now + min(RETRY_CEILING, RETRY_BASE * 2 ** min(effect.attempts - 1, 20))
        elif effect.attempts >= REFUSED_ATTEMPTS or not isinstance(exc, BadRequest):
            await self._park(effect, error)
            return
        else:
            retry_at = now + RETRY_BASE * 2 ** (effect.attempts - 1)
        log.warning(
            "outbox entry %d (%s on %s) failed, retrying at %s: %s",
            effect.id,
            effect.kind,
            effect.target,
            isoformat(retry_at),
            error,
        )
        await self.store.fail_effect(effect.id, error, retry_at=retry_at, at=now)

    async def _park(self, effect: Effect, error: str) -> None:
        log.error(
            "outbox entry %d (%s on %s) parked after %d attempt(s): %s",
            effect.id,
            effect.kind,
            effect.target,
            effect.attempts,
            error,
        )
        await self.store.fail_effect(effect.id, error, retry_at=None, at=self.clock.now())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BadRequest | GitHubBroken):
        return f"GitHub answered {int(exc.status_code)}: {exc}"
    return f"{type(exc).__name__}: {exc}"
