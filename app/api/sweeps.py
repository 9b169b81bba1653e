"""Post-update sweeps: start one, follow it, and the repositories that opted in."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import jwt
from aiohttp import web

from app.api.errors import ApiError, json_response
from app.api.routing import Call, QueryParam, Route, page_params
from app.auth import Access
from app.clock import isoformat
from app.github.oidc import OidcPolicy, OidcRejected
from app.pipeline.canary.service import BUILD_ID_PATTERN
from app.services import Services
from app.store import Sweep, SweepRepo, SweepRun
from app.sweeps.service import SweepError, SweepView

_DATE = {"type": "string", "format": "date-time"}
_DATE_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_STR_OR_NULL = {"type": ["string", "null"]}
_REPO = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")
SWEEP_STATES = ["pending", "running", "completed", "failed", "cancelled"]

RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "repository",
        "workflow",
        "ref",
        "state",
        "conclusion",
        "runId",
        "runAttempt",
        "runUrl",
        "error",
        "dispatchedAt",
        "deadlineAt",
        "finishedAt",
        "results",
    ],
    "properties": {
        "repository": {"type": "string"},
        "workflow": {"type": "string"},
        "ref": {"type": "string"},
        "state": {
            "enum": [
                "waiting",
                "dispatching",
                "queued",
                "in_progress",
                "completed",
                "failed",
                "timed_out",
            ]
        },
        "conclusion": _STR_OR_NULL,
        "runId": {"type": ["integer", "null"]},
        "runAttempt": {"type": ["integer", "null"]},
        "runUrl": _STR_OR_NULL,
        "error": _STR_OR_NULL,
        "dispatchedAt": _DATE_OR_NULL,
        "deadlineAt": _DATE_OR_NULL,
        "finishedAt": _DATE_OR_NULL,
        "results": {
            "type": ["object", "null"],
            "description": "What the sweep workflow posted: passed, failed and skipped"
            " counts and the first failed items' names.",
        },
    },
}
SUMMARY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "sweepId",
        "state",
        "provider",
        "version",
        "buildId",
        "rolloutId",
        "startedBy",
        "startedAt",
        "completedAt",
    ],
    "properties": {
        "sweepId": {"type": "string"},
        "state": {"enum": SWEEP_STATES},
        "provider": _STR_OR_NULL,
        "version": _STR_OR_NULL,
        "buildId": _STR_OR_NULL,
        "rolloutId": _STR_OR_NULL,
        "startedBy": {"type": "string"},
        "startedAt": _DATE,
        "completedAt": _DATE_OR_NULL,
    },
}
SWEEP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [*SUMMARY_SCHEMA["required"], "counts", "repositories"],
    "properties": {
        **SUMMARY_SCHEMA["properties"],
        "counts": {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "description": "Repositories by outcome: the run's conclusion (success, failure,"
            " cancelled, ...) once it completed, else its state.",
        },
        "repositories": {"type": "array", "items": RUN_SCHEMA},
    },
}
REPO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "repository",
        "state",
        "config",
        "error",
        "readAt",
        "excluded",
        "lastSweepId",
        "lastResult",
    ],
    "properties": {
        "repository": {"type": "string"},
        "state": {"enum": ["unread", "opted_in", "absent", "misconfigured", "unreadable"]},
        "config": {"type": ["object", "null"]},
        "error": _STR_OR_NULL,
        "readAt": _DATE_OR_NULL,
        "excluded": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["by", "at"],
                    "properties": {"by": _STR_OR_NULL, "at": _DATE},
                },
            ]
        },
        "lastSweepId": _STR_OR_NULL,
        "lastResult": _STR_OR_NULL,
    },
}
NEW_SWEEP: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "provider": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"},
        "version": {"type": "string", "minLength": 1, "maxLength": 100},
        "buildId": {"type": "string", "pattern": BUILD_ID_PATTERN},
    },
    "oneOf": [{"required": ["provider", "version"]}, {"required": ["buildId"]}],
}


def _run(run: SweepRun) -> dict[str, Any]:
    return {
        "repository": run.repo,
        "workflow": run.workflow,
        "ref": run.ref,
        "state": run.state,
        "conclusion": run.conclusion,
        "runId": run.run_id,
        "runAttempt": run.run_attempt,
        "runUrl": run.run_url,
        "error": run.error,
        "dispatchedAt": isoformat(run.dispatched_at) if run.dispatched_at else None,
        "deadlineAt": isoformat(run.deadline_at) if run.deadline_at else None,
        "finishedAt": isoformat(run.finished_at) if run.finished_at else None,
        "results": dict(run.results) if run.results is not None else None,
    }


def summary_json(sweep: Sweep) -> dict[str, Any]:
    return {
        "sweepId": sweep.sweep_id,
        "state": sweep.state,
        "provider": sweep.provider,
        "version": sweep.version,
        "buildId": sweep.build_id,
        "rolloutId": sweep.rollout_id,
        "startedBy": sweep.started_by,
        "startedAt": isoformat(sweep.created_at),
        "completedAt": isoformat(sweep.completed_at) if sweep.completed_at else None,
    }


def sweep_json(view: SweepView) -> dict[str, Any]:
    return {
        **summary_json(view.sweep),
        "counts": view.counts,
        "repositories": [_run(r) for r in view.runs],
    }


def repo_json(repo: SweepRepo) -> dict[str, Any]:
    return {
        "repository": repo.repo,
        "state": repo.state,
        "config": dict(repo.config) if repo.config is not None else None,
        "error": repo.error,
        "readAt": isoformat(repo.read_at) if repo.read_at else None,
        "excluded": (
            {"by": repo.excluded_by, "at": isoformat(repo.excluded_at)}
            if repo.excluded_at
            else None
        ),
        "lastSweepId": repo.last_sweep_id,
        "lastResult": repo.last_conclusion,
    }


RESULTS_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["results"],
    "additionalProperties": False,
    "properties": {
        "repository": {
            "type": "string",
            "maxLength": 141,
            "description": "Which repository's results (admin tokens only; a workflow's token"
            " says it).",
        },
        "results": {
            "type": "array",
            "maxItems": 5000,
            "items": {
                "type": "object",
                "required": ["name", "status"],
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 500},
                    "status": {"enum": ["passed", "failed", "skipped"]},
                },
            },
        },
    },
}
FAILURES_KEPT = 50


async def verify_sweep_workflow(services: Services, token: str, path: Mapping[str, str]) -> str:
    """A sweep workflow's OIDC token: from one of the sweep's repositories (name and id),
    its sweep workflow, a workflow_dispatch run, and the run the dispatch started when it
    is known. Returns the repository."""
    denied = ApiError(401, "UNAUTHORIZED", "this token may not report for this sweep")
    if services.oidc is None:
        raise ApiError(401, "UNAUTHORIZED", "workflow tokens are not accepted here")
    try:
        claimed = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise ApiError(401, "UNAUTHORIZED", "the token is not a JWT") from None
    repo = str(claimed.get("repository") or "").lower()
    runs = {r.repo: r for r in await services.store.sweep_runs(path.get("sweepId", ""))}
    run = runs.get(repo)
    if run is None:
        raise denied
    repository_id = await services.store.repository_id(repo)
    if repository_id is None:
        raise denied
    policy = OidcPolicy(
        audience=services.settings.oidc_audience,
        repository=repo,
        repository_id=repository_id,
        workflow=run.workflow,
        run_id=str(run.run_id) if run.run_id is not None else None,
    )
    try:
        await services.oidc.verify(token, policy)
    except OidcRejected as exc:
        if exc.status == 503:
            raise ApiError(
                503, "SERVICE_UNAVAILABLE", exc.reason, headers={"Retry-After": "60"}
            ) from None
        raise ApiError(401, "UNAUTHORIZED", exc.reason) from None
    return repo


async def post_results(call: Call) -> web.StreamResponse:
    sweep_id = call.path["sweepId"]
    store = call.services.store
    repo = call.workflow or str(call.body.get("repository") or "").lower()
    if not repo:
        raise ApiError(400, "VALIDATION_FAILED", "repository: required with an admin token")
    runs = {r.repo: r for r in await store.sweep_runs(sweep_id)}
    if repo not in runs:
        if await store.get_sweep(sweep_id) is None:
            raise ApiError(404, "NOT_FOUND", f"no sweep {sweep_id!r}")
        raise ApiError(404, "NOT_FOUND", f"{repo} is not part of sweep {sweep_id}")
    items = call.body["results"]
    counts = Counter(str(item["status"]) for item in items)
    results = {
        "passed": counts["passed"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
        "failures": [str(i["name"]) for i in items if i["status"] == "failed"][:FAILURES_KEPT],
        "reportedBy": (
            "its workflow"
            if call.workflow
            else f"token {call.principal.name}"
            if call.principal is not None
            else "unknown"
        ),
    }
    await store.update_sweep_run(sweep_id, repo, {"results": results}, at=call.services.clock.now())
    view = await call.services.sweeps.view(sweep_id)
    row = next(r for r in view.runs if r.repo == repo)
    return json_response(_run(row))


def _error(exc: SweepError) -> ApiError:
    return ApiError(exc.status, exc.code, str(exc))


async def start(call: Call) -> web.StreamResponse:
    assert call.principal is not None
    body = call.body
    try:
        view = await call.services.sweeps.start(
            by=f"token {call.principal.name}",
            provider=body.get("provider"),
            version=body.get("version"),
            build_id=body.get("buildId"),
        )
    except SweepError as exc:
        raise _error(exc) from None
    return json_response(sweep_json(view), status=201)


async def list_sweeps(call: Call) -> web.StreamResponse:
    limit = call.query.get("limit", 50)
    rows = await call.services.store.list_sweeps(
        state=call.query.get("state"), before=call.query.get("cursor"), limit=limit + 1
    )
    page = rows[:limit]
    return json_response(
        {
            "items": [summary_json(s) for s in page],
            "nextCursor": page[-1].sweep_id if len(rows) > limit else None,
        }
    )


async def get_sweep(call: Call) -> web.StreamResponse:
    try:
        view = await call.services.sweeps.view(call.path["sweepId"])
    except SweepError as exc:
        raise _error(exc) from None
    return json_response(sweep_json(view))


async def list_repos(call: Call) -> web.StreamResponse:
    limit = call.query.get("limit", 50)
    rows = await call.services.store.list_sweep_repos(
        opted_in=not call.query.get("all", False),
        before=call.query.get("cursor"),
        limit=limit + 1,
    )
    page = rows[:limit]
    return json_response(
        {
            "items": [repo_json(r) for r in page],
            "nextCursor": page[-1].repo if len(rows) > limit else None,
        }
    )


async def _exclusion(call: Call, exclude: bool) -> web.StreamResponse:
    assert call.principal is not None
    name = f"{call.path['owner']}/{call.path['repo']}"
    if not _REPO.match(name):
        raise ApiError(400, "VALIDATION_FAILED", f"{name!r} is not a repository as owner/name")
    store, clock = call.services.store, call.services.clock
    if await store.get_sweep_repo(name) is None:
        raise ApiError(404, "NOT_FOUND", f"no repository {name!r} is known to sweeps")
    found = await store.set_sweep_exclusion(
        name,
        clock.now() if exclude else None,
        f"token {call.principal.name}" if exclude else None,
    )
    assert found is not None
    return json_response(repo_json(found))


async def exclude(call: Call) -> web.StreamResponse:
    return await _exclusion(call, True)


async def include(call: Call) -> web.StreamResponse:
    return await _exclusion(call, False)


_NOT_FOUND = {404: "No sweep has this id."}
_REPO_ERRORS = {
    400: "owner/repo is not a repository name.",
    404: "No repository with this name is known to sweeps.",
}
ROUTES = [
    Route(
        "POST",
        "/sweeps",
        Access.ADMIN,
        start,
        "startSweep",
        "Sweep the opted-in repositories for a provider's version or a build",
        SWEEP_SCHEMA,
        status=201,
        request=NEW_SWEEP,
        errors={
            404: "No build has this id.",
            503: "The GitHub App is not configured: sweeps dispatch workflows on GitHub.",
        },
        tag="sweeps",
    ),
    Route(
        "GET",
        "/sweeps",
        Access.VIEWER,
        list_sweeps,
        "listSweeps",
        "Sweeps, newest first",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {"type": "array", "items": SUMMARY_SCHEMA},
                "nextCursor": _STR_OR_NULL,
            },
        },
        query=(
            QueryParam("state", {"enum": SWEEP_STATES}, "Only sweeps in this state."),
            *page_params(cursor_length=64),
        ),
        tag="sweeps",
    ),
    Route(
        "GET",
        "/sweeps/repos",
        Access.VIEWER,
        list_repos,
        "listSweepRepos",
        "Repositories that opted in to sweeps (or tried to), with their config and last result",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {"type": "array", "items": REPO_SCHEMA},
                "nextCursor": _STR_OR_NULL,
            },
        },
        query=(
            QueryParam(
                "all",
                {"type": "boolean"},
                "Every installed repository read so far, opted in or not.",
            ),
            *page_params(cursor_length=141),
        ),
        tag="sweeps",
    ),
    Route(
        "PUT",
        "/sweeps/repos/{owner}/{repo}/exclusion",
        Access.ADMIN,
        exclude,
        "excludeSweepRepo",
        "Leave a repository out of sweeps, whatever its config says",
        REPO_SCHEMA,
        errors=_REPO_ERRORS,
        tag="sweeps",
    ),
    Route(
        "DELETE",
        "/sweeps/repos/{owner}/{repo}/exclusion",
        Access.ADMIN,
        include,
        "includeSweepRepo",
        "Let an excluded repository be swept again",
        REPO_SCHEMA,
        errors=_REPO_ERRORS,
        tag="sweeps",
    ),
    Route(
        "POST",
        "/sweeps/{sweepId}/results",
        Access.ADMIN_OR_WORKFLOW,
        post_results,
        "postSweepResults",
        "A repository's sweep workflow reports its items (passed, failed, skipped)",
        RUN_SCHEMA,
        request=RESULTS_BODY,
        errors={
            404: "No sweep has this id, or the repository is not part of it.",
            503: "The OIDC issuer cannot be reached (Retry-After: 60).",
        },
        description="A workflow's OIDC token must come from one of the sweep's"
        " repositories (name and id), its configured sweep workflow, a workflow_dispatch"
        " run, and, once known, the very run the sweep dispatched (see action.yml, mode"
        " sweep). An admin token may post too, naming the repository.",
        workflow_auth=verify_sweep_workflow,
        tag="sweeps",
    ),
    Route(
        "GET",
        "/sweeps/{sweepId}",
        Access.VIEWER,
        get_sweep,
        "getSweep",
        "One sweep: each repository's state, run and conclusion, and counts by outcome",
        SWEEP_SCHEMA,
        errors=_NOT_FOUND,
        tag="sweeps",
    ),
]
