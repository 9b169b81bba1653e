"""Health, readiness, pipeline status (design sections 4.1 and 9.3) and the API description."""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import Any

from aiohttp import web

from app.api.errors import ApiError, json_response
from app.api.routing import OPENAPI, Call, Route
from app.auth import Access
from app.clock import isoformat
from app.logs import get_logger
from app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = get_logger("api.system")

READY_DB_TIMEOUT_SECONDS = 2.0
NOT_ENABLED = "Update pipeline is not enabled"
UNAVAILABLE = "Update pipeline status unavailable"

HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["enabled", "running", "timestamp"],
    "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean", "description": "The pipeline is configured and started."},
        "running": {"type": "boolean"},
        "timestamp": {"type": "string", "format": "date-time"},
    },
}

READY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["ready", "checks"],
    "additionalProperties": False,
    "properties": {
        "ready": {"const": True},
        "checks": {
            "type": "object",
            "required": ["database", "pipeline"],
            "properties": {
                "database": {"const": "ok"},
                "pipeline": {"enum": ["ok", "disabled"]},
            },
        },
    },
}

_NULLABLE_STRING = {"type": ["string", "null"]}
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "running",
        "versionWatcherActive",
        "activeCanaryTests",
        "activeRollouts",
        "activeSweeps",
        "knownVersions",
        "recommendedBuilds",
        "frozen",
        "trackingIssues",
        "github",
    ],
    "additionalProperties": False,
    "properties": {
        "running": {"type": "boolean"},
        "versionWatcherActive": {"type": "boolean"},
        "activeCanaryTests": {"type": "integer", "minimum": 0},
        "activeRollouts": {"type": "integer", "minimum": 0},
        "activeSweeps": {"type": "integer", "minimum": 0},
        "knownVersions": {
            "type": "object",
            "description": "Newest known version per provider; null when none is known.",
            "additionalProperties": _NULLABLE_STRING,
        },
        "recommendedBuilds": {
            "type": "object",
            "required": ["stable", "beta"],
            "additionalProperties": False,
            "properties": {"stable": _NULLABLE_STRING, "beta": _NULLABLE_STRING},
        },
        "frozen": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["reason", "by", "at"],
                    "properties": {
                        "reason": {"type": "string"},
                        "by": {"type": "string"},
                        "at": {"type": "string", "format": "date-time"},
                    },
                },
            ],
            "description": "The global rollout freeze, when on: why, by whom, since when.",
        },
        "trackingIssues": {
            "type": "string",
            "description": "Where rollouts are tracked as GitHub issues: the control repository"
            " (owner/name), or 'off' (UPDATE_PIPELINE_CONTROL_REPO unset or the App not"
            " configured).",
        },
        "github": {
            "type": "string",
            "description": "GitHub App connection: 'not configured', 'connecting', 'ok', or"
            " 'error: <reason>'.",
        },
    },
}


async def health(call: Call) -> web.StreamResponse:
    pipeline = call.services.pipeline
    return json_response(
        {
            "enabled": pipeline is not None,
            "running": bool(pipeline and pipeline.running),
            "timestamp": isoformat(call.services.clock.now()),
        }
    )


async def ready(call: Call) -> web.StreamResponse:
    services = call.services
    try:
        await asyncio.wait_for(services.store.ping(), READY_DB_TIMEOUT_SECONDS)
    except Exception as exc:
        raise ApiError(503, "NOT_READY", f"database is not answering: {exc}") from None
    if services.pipeline_error is not None:
        raise ApiError(503, "NOT_READY", f"pipeline failed to start: {services.pipeline_error}")
    pipeline_check = "disabled"
    if services.pipeline is not None:
        problem = services.pipeline.health()
        if problem is not None:
            raise ApiError(503, "NOT_READY", problem)
        pipeline_check = "ok"
    return json_response({"ready": True, "checks": {"database": "ok", "pipeline": pipeline_check}})


async def status(call: Call) -> web.StreamResponse:
    services = call.services
    if services.pipeline is None:
        message = NOT_ENABLED if services.pipeline_error is None else UNAVAILABLE
        raise ApiError(503, "SERVICE_UNAVAILABLE", message)
    try:
        body = {
            **await services.pipeline.status(),
            "trackingIssues": services.tracking_issues,
            "github": services.github_state,
        }
    except Exception:
        log.exception("computing the pipeline status failed")
        raise ApiError(503, "SERVICE_UNAVAILABLE", UNAVAILABLE) from None
    return json_response(body)


async def metrics(call: Call) -> web.StreamResponse:
    services = call.services
    expected = services.settings.metrics_token
    if expected is not None:
        match = re.match(r"^Bearer\s+(\S+)\s*$", call.request.headers.get("Authorization", ""))
        given = match[1] if match else ""
        if not hmac.compare_digest(given.encode(), expected.reveal().encode()):
            raise ApiError(
                401,
                "UNAUTHORIZED",
                "GET /metrics needs the bearer token UPDATE_PIPELINE_METRICS_TOKEN",
                headers={"WWW-Authenticate": 'Bearer realm="update-pipeline metrics"'},
            )
    await services.metrics.refresh(services)
    return web.Response(
        body=services.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE}
    )


async def openapi(call: Call) -> web.StreamResponse:
    return json_response(call.request.app[OPENAPI])


ROUTES = [
    Route(
        "GET",
        "/health",
        Access.PUBLIC,
        health,
        "getHealth",
        "Liveness and whether the pipeline is enabled and running",
        HEALTH_SCHEMA,
        tag="system",
    ),
    Route(
        "GET",
        "/ready",
        Access.PUBLIC,
        ready,
        "getReady",
        "Readiness for load balancers: the database answers and background workers are alive",
        READY_SCHEMA,
        errors={503: "Not ready; the message says why."},
        tag="system",
    ),
    Route(
        "GET",
        "/status",
        Access.VIEWER,
        status,
        "getStatus",
        "Pipeline status (design section 4.1), computed from the store",
        STATUS_SCHEMA,
        errors={503: "The pipeline is not enabled, or its status is unavailable."},
    ),
    Route(
        "GET",
        "/openapi.json",
        Access.PUBLIC,
        openapi,
        "getOpenApi",
        "This API's OpenAPI 3.1 description",
        {"type": "object"},
        tag="system",
    ),
    Route(
        "GET",
        "/metrics",
        Access.PUBLIC,
        metrics,
        "getMetrics",
        "Prometheus metrics, in the text exposition format",
        {"type": "string"},
        content_type="text/plain",
        errors={401: "UPDATE_PIPELINE_METRICS_TOKEN is set and the bearer token is not it."},
        description="Public unless UPDATE_PIPELINE_METRICS_TOKEN is set; keep it off the"
        " internet either way (docs/deploy.md).",
        prefix="",
        tag="system",
    ),
]
