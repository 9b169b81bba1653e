"""Runtime versions (design section 4.2) and checking upstream by hand."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from app.api.errors import ApiError, json_response
from app.api.routing import Call, QueryParam, Route, page_params
from app.auth import Access
from app.clock import isoformat
from app.pipeline import VERSION_WATCHER
from app.pipeline.version.watcher import SourceOutcome, VersionWatcher
from app.store import RuntimeVersionRecord

_DATE_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
VERSION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "providerId",
        "version",
        "releasedAt",
        "sourceUrl",
        "canaryPassed",
        "canaryPassedAt",
        "source",
        "prerelease",
        "announced",
        "canary",
    ],
    "properties": {
        "providerId": {"type": "string", "examples": ["claude_code"]},
        "version": {"type": "string", "examples": ["1.2.3"]},
        "releasedAt": {
            "type": "string",
            "format": "date-time",
            "description": "Upstream's release time; when first seen for a version only "
            "runners have reported.",
        },
        "sourceUrl": {"type": ["string", "null"]},
        "canaryPassed": {"type": "boolean"},
        "canaryPassedAt": _DATE_OR_NULL,
        "source": {
            "enum": ["npm", "github", "heartbeat"],
            "description": "The source that announced it; heartbeat while only runners report it.",
        },
        "prerelease": {"type": "boolean", "description": "A beta candidate."},
        "announced": {
            "type": "boolean",
            "description": "A source announced it (false: only runners report it, drift).",
        },
        "canary": {
            "type": "object",
            "required": ["state", "eligibleAt", "handedOverAt"],
            "properties": {
                "state": {
                    "enum": ["history", "not_announced", "off", "waiting", "handed_over"],
                    "description": "history: recorded by a provider's first check, never "
                    "tested; waiting: younger than UPDATE_PIPELINE_MIN_RELEASE_AGE (see "
                    "eligibleAt) or no canary runner took it yet; off: auto-canary is off.",
                },
                "eligibleAt": _DATE_OR_NULL,
                "handedOverAt": _DATE_OR_NULL,
            },
        },
    },
}
OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["source", "providerId", "outcome", "newVersions", "error", "nextCheckAt"],
    "properties": {
        "source": {"type": "string", "examples": ["npm:@openai/codex"]},
        "providerId": {"type": "string"},
        "outcome": {"enum": ["new", "unchanged", "not_modified", "skipped", "error"]},
        "newVersions": {"type": "array", "items": {"type": "string"}},
        "error": {"type": ["string", "null"]},
        "nextCheckAt": _DATE_OR_NULL,
    },
}


def version_json(version: RuntimeVersionRecord, watcher: VersionWatcher | None) -> dict[str, Any]:
    return {
        "providerId": version.provider_id,
        "version": version.version,
        "releasedAt": isoformat(version.released_at),
        "sourceUrl": version.source_url,
        "canaryPassed": version.canary_passed,
        "canaryPassedAt": isoformat(version.canary_passed_at) if version.canary_passed_at else None,
        "source": version.source,
        "prerelease": version.prerelease,
        "announced": version.announced_at is not None,
        "canary": _canary(version, watcher),
    }


def _canary(version: RuntimeVersionRecord, watcher: VersionWatcher | None) -> dict[str, Any]:
    handed = version.handed_to_canary_at
    eligible = watcher.canary_eligible_at(version) if watcher is not None else None
    if version.baseline:
        state = "history"
    elif version.announced_at is None:
        state = "not_announced"
    elif handed is not None:
        state = "handed_over"
    elif watcher is None or not watcher.auto_canary:
        state = "off"
    else:
        state = "waiting"
    return {
        "state": state,
        "eligibleAt": isoformat(eligible) if eligible else None,
        "handedOverAt": isoformat(handed) if handed else None,
    }


def _watcher(call: Call) -> VersionWatcher | None:
    pipeline = call.services.pipeline
    component = pipeline.component(VERSION_WATCHER) if pipeline is not None else None
    return component if isinstance(component, VersionWatcher) else None


async def list_versions(call: Call) -> web.StreamResponse:
    limit = call.query.get("limit", 50)
    rows = await call.services.store.list_versions(
        provider_id=call.query.get("providerId"), before=call.query.get("cursor"), limit=limit + 1
    )
    page = rows[:limit]
    watcher = _watcher(call)
    return json_response(
        {
            "items": [version_json(v, watcher) for v in page],
            "nextCursor": page[-1].id if len(rows) > limit else None,
        }
    )


def outcome_json(outcome: SourceOutcome) -> dict[str, Any]:
    return {
        "source": outcome.source,
        "providerId": outcome.provider_id,
        "outcome": outcome.outcome,
        "newVersions": list(outcome.new_versions),
        "error": outcome.error,
        "nextCheckAt": isoformat(outcome.next_check_at) if outcome.next_check_at else None,
    }


async def check_versions(call: Call) -> web.StreamResponse:
    watcher = _watcher(call)
    if watcher is None:
        raise ApiError(503, "SERVICE_UNAVAILABLE", "Update pipeline is not enabled")
    report = await watcher.check()
    return json_response(
        {
            "checkedAt": isoformat(report.checked_at),
            "sources": [outcome_json(o) for o in report.outcomes],
        }
    )


ROUTES = [
    Route(
        "GET",
        "/versions",
        Access.VIEWER,
        list_versions,
        "listVersions",
        "Known runtime versions, newest release first",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {"type": "array", "items": VERSION_SCHEMA},
                "nextCursor": {"type": ["string", "null"]},
            },
        },
        query=(
            QueryParam(
                "providerId",
                {"type": "string", "pattern": "^[a-z][a-z0-9_]*$", "maxLength": 64},
                "Only this provider's versions.",
            ),
            *page_params(cursor_length=36),
        ),
        description="Design section 4.2, with where each version came from and where it "
        "stands with the canary.",
        tag="versions",
    ),
    Route(
        "POST",
        "/versions/check",
        Access.ADMIN,
        check_versions,
        "checkVersions",
        "Ask the version sources now; each source is still asked at most once per interval",
        {
            "type": "object",
            "required": ["checkedAt", "sources"],
            "properties": {
                "checkedAt": {"type": "string", "format": "date-time"},
                "sources": {"type": "array", "items": OUTCOME_SCHEMA},
            },
        },
        errors={503: "The pipeline is not enabled."},
        tag="versions",
    ),
]
