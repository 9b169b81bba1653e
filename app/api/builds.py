"""Runner builds (design section 5.2) and the channels' recommended builds."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from app.api.errors import ApiError, json_response
from app.api.routing import Call, Route, page_params
from app.auth import Access
from app.clock import isoformat, parse_iso
from app.pipeline import CHANNELS
from app.pipeline.canary.service import BUILD_ID_PATTERN, CanaryError
from app.store import BuildRecord, CanaryRun, ChannelRecord, Conflict

_VERSION = {"type": "string", "minLength": 1, "maxLength": 100}
_DATE = {"type": "string", "format": "date-time"}
_DATE_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
PROVIDER_MAP = {
    "type": "object",
    "propertyNames": {"pattern": "^[a-z][a-z0-9_]*$", "maxLength": 64},
    "additionalProperties": _VERSION,
    "maxProperties": 50,
}
RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["state", "attempt", "startedAt", "completedAt", "deadlineAt", "error"],
    "properties": {
        "state": {"enum": ["pending", "running", "passed", "failed", "errored"]},
        "attempt": {"type": "integer"},
        "startedAt": _DATE_OR_NULL,
        "completedAt": _DATE_OR_NULL,
        "deadlineAt": _DATE_OR_NULL,
        "error": {"type": ["string", "null"]},
    },
}
BUILD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "buildId",
        "runnerVersion",
        "builtAt",
        "runtimeVersions",
        "knownGoodFor",
        "repository",
        "commitSha",
        "createdAt",
        "canary",
    ],
    "properties": {
        "buildId": {"type": "string"},
        "runnerVersion": {"type": "string"},
        "builtAt": _DATE,
        "runtimeVersions": PROVIDER_MAP,
        "knownGoodFor": {"type": "array", "items": {"type": "string"}},
        "repository": {"type": ["string", "null"]},
        "commitSha": {"type": ["string", "null"]},
        "createdAt": _DATE,
        "canary": {"oneOf": [RUN_SCHEMA, {"type": "null"}]},
    },
}
NEW_BUILD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["buildId", "runnerVersion", "runtimeVersions"],
    "additionalProperties": False,
    "properties": {
        "buildId": {"type": "string", "pattern": BUILD_ID_PATTERN},
        "runnerVersion": _VERSION,
        "builtAt": _DATE,
        "runtimeVersions": {**PROVIDER_MAP, "minProperties": 1},
        "repository": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,39}/[A-Za-z0-9._-]{1,100}$"},
        "commitSha": {"type": "string", "pattern": "^[0-9a-f]{40}([0-9a-f]{24})?$"},
    },
}
CHANNEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["channel", "buildId", "updatedAt", "reason", "setBy"],
    "properties": {
        "channel": {"enum": list(CHANNELS)},
        "buildId": {"type": ["string", "null"]},
        "updatedAt": _DATE_OR_NULL,
        "reason": {"type": ["string", "null"]},
        "setBy": {"type": ["string", "null"]},
    },
}
SET_CHANNEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["buildId", "reason"],
    "additionalProperties": False,
    "properties": {
        "buildId": {"type": "string", "pattern": BUILD_ID_PATTERN},
        "reason": {"type": "string", "minLength": 1, "maxLength": 500},
        "force": {"type": "boolean", "description": "Recommend a build not known-good."},
    },
}


def run_json(run: CanaryRun | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "state": run.state,
        "attempt": run.attempt,
        "startedAt": isoformat(run.started_at) if run.started_at else None,
        "completedAt": isoformat(run.completed_at) if run.completed_at else None,
        "deadlineAt": isoformat(run.deadline_at) if run.deadline_at else None,
        "error": run.error,
    }


def build_json(build: BuildRecord, run: CanaryRun | None) -> dict[str, Any]:
    assert build.created_at is not None
    return {
        "buildId": build.build_id,
        "runnerVersion": build.runner_version,
        "builtAt": isoformat(build.built_at),
        "runtimeVersions": dict(build.runtime_versions),
        "knownGoodFor": list(build.known_good_for),
        "repository": build.repository,
        "commitSha": build.commit_sha,
        "createdAt": isoformat(build.created_at),
        "canary": run_json(run),
    }


def canary_error(exc: CanaryError) -> ApiError:
    codes = {404: "NOT_FOUND", 409: "CONFLICT"}
    return ApiError(exc.status, codes.get(exc.status, "VALIDATION_FAILED"), str(exc))


def _built_at(text: str) -> datetime:
    """builtAt as UTC. Years before 1000 are refused: the store writes four-digit years
    (so times sort as text) and could not read such a date back."""
    try:
        moment = parse_iso(text)
    except (ValueError, OverflowError):  # overflow: the offset moves it out of 1..9999
        raise ApiError(400, "VALIDATION_FAILED", "builtAt: not a date-time") from None
    if moment.year < 1000:
        raise ApiError(400, "VALIDATION_FAILED", "builtAt: years before 1000 are not taken")
    return moment


async def add_build(call: Call) -> web.StreamResponse:
    body, services = call.body, call.services
    assert call.principal is not None
    built_at = _built_at(body["builtAt"]) if "builtAt" in body else services.clock.now()
    build = BuildRecord(
        build_id=body["buildId"],
        runner_version=body["runnerVersion"],
        built_at=built_at,
        runtime_versions=body["runtimeVersions"],
        repository=body.get("repository"),
        commit_sha=body.get("commitSha"),
    )
    try:
        stored, run = await services.canary.register(build)
    except Conflict as exc:
        raise ApiError(409, "CONFLICT", str(exc)) from None
    except CanaryError as exc:
        raise canary_error(exc) from None
    return json_response(build_json(stored, run), status=201)


async def list_builds(call: Call) -> web.StreamResponse:
    limit = call.query.get("limit", 50)
    store = call.services.store
    rows = await store.list_builds(before=call.query.get("cursor"), limit=limit + 1)
    page = rows[:limit]
    items = [build_json(b, await store.latest_canary_run(b.build_id)) for b in page]
    return json_response(
        {"items": items, "nextCursor": page[-1].build_id if len(rows) > limit else None}
    )


async def get_build(call: Call) -> web.StreamResponse:
    try:
        build, run = await call.services.canary.build(call.path["buildId"])
    except CanaryError as exc:
        raise canary_error(exc) from None
    return json_response(build_json(build, run))


def channel_json(channel: str, record: ChannelRecord | None) -> dict[str, Any]:
    return {
        "channel": channel,
        "buildId": record.build_id if record else None,
        "updatedAt": isoformat(record.updated_at) if record else None,
        "reason": record.reason if record else None,
        "setBy": record.set_by if record else None,
    }


async def list_channels(call: Call) -> web.StreamResponse:
    known = {c.channel: c for c in await call.services.store.list_channels()}
    return json_response({"items": [channel_json(c, known.get(c)) for c in CHANNELS]})


async def set_channel(call: Call) -> web.StreamResponse:
    channel = call.path["channel"]
    if channel not in CHANNELS:
        raise ApiError(404, "NOT_FOUND", f"no channel {channel!r} (one of {', '.join(CHANNELS)})")
    assert call.principal is not None
    try:
        record = await call.services.canary.recommend(
            channel,
            call.body["buildId"],
            reason=call.body["reason"],
            by=f"token {call.principal.name}",
            force=call.body.get("force", False),
        )
    except CanaryError as exc:
        raise canary_error(exc) from None
    return json_response(channel_json(channel, record))


ROUTES = [
    Route(
        "POST",
        "/builds",
        Access.ADMIN,
        add_build,
        "registerBuild",
        "Register a runner build; its canary run starts at once",
        BUILD_SCHEMA,
        status=201,
        request=NEW_BUILD_SCHEMA,
        errors={409: "A build with this id exists."},
        tag="canary",
    ),
    Route(
        "GET",
        "/builds",
        Access.VIEWER,
        list_builds,
        "listBuilds",
        "Runner builds, newest first, each with its latest canary run",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {"type": "array", "items": BUILD_SCHEMA},
                "nextCursor": {"type": ["string", "null"]},
            },
        },
        query=page_params(cursor_length=100),
        tag="canary",
    ),
    Route(
        "GET",
        "/builds/{buildId}",
        Access.VIEWER,
        get_build,
        "getBuild",
        "One runner build and its latest canary run",
        BUILD_SCHEMA,
        errors={404: "No build has this id."},
        tag="canary",
    ),
    Route(
        "GET",
        "/channels",
        Access.VIEWER,
        list_channels,
        "listChannels",
        "Each channel's recommended build, with why and by whom",
        {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": CHANNEL_SCHEMA}},
        },
        tag="canary",
    ),
    Route(
        "PUT",
        "/channels/{channel}",
        Access.ADMIN,
        set_channel,
        "setChannel",
        "Recommend a known-good build on a channel (force, with a reason, for any build)",
        CHANNEL_SCHEMA,
        request=SET_CHANNEL_SCHEMA,
        errors={
            404: "No such channel, or no such build.",
            409: "The build is not known-good for every provider it carries (use force).",
        },
        tag="canary",
    ),
]
