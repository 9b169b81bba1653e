"""Canary results intake (admin token or the canary workflow's OIDC token) and metrics
(design section 7.3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from app.api.builds import canary_error
from app.api.errors import ApiError, json_response
from app.api.routing import Call, Route
from app.auth import Access
from app.clock import isoformat
from app.github.oidc import OidcPolicy, OidcRejected
from app.pipeline.canary.metrics import TEST_STATUSES, TestResult
from app.pipeline.canary.service import CanaryError
from app.services import Services
from app.store import BuildRecord, CanaryRun

MAX_RESULTS = 5000
_MS = {"type": ["number", "null"], "minimum": 0, "maximum": 86_400_000}
RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "provider", "status"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 300},
        "provider": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$", "maxLength": 64},
        "status": {"enum": list(TEST_STATUSES)},
        "sessionStartMs": _MS,
        "timeToFirstOutputMs": _MS,
        "disconnected": {"type": "boolean"},
        "message": {"type": ["string", "null"], "maxLength": 4000},
    },
}
RESULTS_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["results"],
    "additionalProperties": False,
    "properties": {"results": {"type": "array", "items": RESULT_SCHEMA, "maxItems": MAX_RESULTS}},
}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
METRICS_FIELDS: dict[str, Any] = {
    "totalTests": {"type": "integer"},
    "passed": {"type": "integer"},
    "failed": {"type": "integer"},
    "errored": {"type": "integer"},
    "skipped": {"type": "integer"},
    "passRate": {"type": "number", "minimum": 0, "maximum": 1},
    "avgSessionStartMs": _NUMBER_OR_NULL,
    "avgTimeToFirstOutputMs": _NUMBER_OR_NULL,
    "disconnectRate": {"type": "number", "minimum": 0, "maximum": 1},
}
PROVIDER_METRICS: dict[str, Any] = {
    "type": "object",
    "required": list(METRICS_FIELDS),
    "properties": METRICS_FIELDS,
}
METRICS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [*METRICS_FIELDS, "perProvider"],
    "properties": {
        **METRICS_FIELDS,
        "perProvider": {"type": "object", "additionalProperties": PROVIDER_METRICS},
    },
}
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["buildId", "status", "startedAt", "completedAt", "metrics"],
    "properties": {
        "buildId": {"type": "string"},
        "status": {"enum": ["pending", "running", "passed", "failed", "errored"]},
        "startedAt": {"type": ["string", "null"], "format": "date-time"},
        "completedAt": {"type": ["string", "null"], "format": "date-time"},
        "metrics": {"oneOf": [METRICS_SCHEMA, {"type": "null"}]},
        "knownGoodFor": {"type": "array", "items": {"type": "string"}},
        "error": {"type": ["string", "null"]},
    },
}


async def post_results(call: Call) -> web.StreamResponse:
    services, build_id = call.services, call.path["buildId"]
    # A workflow's token was checked before the body was read or the build looked up, so
    # nobody learns which builds exist without proving who they are.
    run_id = call.workflow
    if run_id is not None:
        reporter = f"workflow run {run_id}"
    else:
        assert call.principal is not None
        reporter = f"token {call.principal.name}"
    try:
        _, run = await services.canary.build(build_id)
        # Once the dispatch is known, only that very run may report for the build.
        bound = await services.canary.bound_workflow_run(run) if run is not None else None
        if run_id is not None and bound not in (None, run_id):
            raise ApiError(
                401,
                "UNAUTHORIZED",
                f"the token is from workflow run {run_id}, not the run dispatched for {build_id}",
            )
        results = [TestResult.from_json(r) for r in call.body["results"]]
        run, verdict = await services.canary.record_results(build_id, results, reported_by=reporter)
    except CanaryError as exc:
        raise canary_error(exc) from None
    return json_response(
        {
            "buildId": build_id,
            "status": run.state,
            "startedAt": isoformat(run.started_at) if run.started_at else None,
            "completedAt": isoformat(run.completed_at) if run.completed_at else None,
            "metrics": verdict.metrics_json(),
            "knownGoodFor": list(verdict.known_good_for),
            "error": run.error,
        }
    )


async def verify_workflow(services: Services, token: str, path: Mapping[str, str]) -> str:
    """Verify the canary workflow's OIDC token; the id of the workflow run it is from."""
    settings = services.settings
    if services.oidc is None or settings.runner_repo is None:
        raise ApiError(
            401,
            "UNAUTHORIZED",
            "workflow tokens are not accepted: UPDATE_PIPELINE_RUNNER_REPO is not set",
        )
    repository_id = await services.store.repository_id(settings.runner_repo)
    if repository_id is None:
        # The name alone is not proof: a deleted or renamed repository's name can be
        # taken by someone else. Its id is learned from the App's installation.
        raise ApiError(
            401,
            "UNAUTHORIZED",
            f"workflow tokens are not accepted until the GitHub App is installed on"
            f" {settings.runner_repo} (its repository id is needed to check the token)",
        )
    policy = OidcPolicy(
        audience=settings.oidc_audience,
        repository=settings.runner_repo,
        repository_id=repository_id,
        workflow=settings.canary_workflow,
    )
    try:
        claims = await services.oidc.verify(token, policy)
    except OidcRejected as exc:
        if exc.status == 503:
            raise ApiError(
                503, "SERVICE_UNAVAILABLE", exc.reason, headers={"Retry-After": "60"}
            ) from None
        raise ApiError(401, "UNAUTHORIZED", exc.reason) from None
    return claims.run_id


async def _latest_run(call: Call) -> tuple[BuildRecord, CanaryRun]:
    try:
        build, run = await call.services.canary.build(call.path["buildId"])
    except CanaryError as exc:
        raise canary_error(exc) from None
    if run is None:
        raise ApiError(404, "NOT_FOUND", f"build {build.build_id} has no canary run")
    return build, run


async def get_metrics(call: Call) -> web.StreamResponse:
    build, run = await _latest_run(call)
    return json_response(
        {
            "buildId": build.build_id,
            "status": run.state,
            "startedAt": isoformat(run.started_at or run.created_at),
            "completedAt": isoformat(run.completed_at) if run.completed_at else None,
            "metrics": dict(run.metrics) if run.metrics is not None else None,
            "knownGoodFor": list(build.known_good_for),
            "error": run.error,
        }
    )


async def get_results(call: Call) -> web.StreamResponse:
    build, run = await _latest_run(call)
    results = await call.services.store.canary_results(run.id)
    return json_response(
        {"buildId": build.build_id, "attempt": run.attempt, "results": results or []}
    )


ROUTES = [
    Route(
        "POST",
        "/canary/{buildId}/results",
        Access.ADMIN_OR_WORKFLOW,
        post_results,
        "postCanaryResults",
        "Report a build's canary results (admin token, or the canary workflow's OIDC token)",
        REPORT_SCHEMA,
        request=RESULTS_BODY,
        workflow_auth=verify_workflow,
        errors={
            404: "No build has this id.",
            409: "The build's canary run has finished; results are taken once.",
            503: "The OIDC issuer's keys cannot be fetched; try again.",
        },
        description="Results are judged at once: the run passes iff every provider the "
        "build carries met UPDATE_PIPELINE_CANARY_MIN_PASS_RATE and "
        "UPDATE_PIPELINE_CANARY_MAX_DISCONNECT_RATE on its own tests.",
        tag="canary",
    ),
    Route(
        "GET",
        "/canary/{buildId}/metrics",
        Access.ADMIN,
        get_metrics,
        "getCanaryMetrics",
        "A build's canary verdict and metrics (design section 7.3), per provider too",
        REPORT_SCHEMA,
        errors={404: "No build has this id."},
        tag="canary",
    ),
    Route(
        "GET",
        "/canary/{buildId}/results",
        Access.ADMIN,
        get_results,
        "getCanaryResults",
        "Every test result the latest canary run of a build was judged on",
        {
            "type": "object",
            "required": ["buildId", "attempt", "results"],
            "properties": {
                "buildId": {"type": "string"},
                "attempt": {"type": "integer"},
                "results": {"type": "array", "items": RESULT_SCHEMA},
            },
        },
        errors={404: "No build has this id."},
        tag="canary",
    ),
]
