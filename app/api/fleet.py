"""The runner heartbeat endpoint, organisations, and the fleet at a glance."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from app.api.errors import ApiError, json_response
from app.api.routing import Call, QueryParam, Route, page_params
from app.auth import Access, Role
from app.clock import isoformat
from app.fleet.service import Report
from app.pipeline import CHANNELS, VERSION_WATCHER
from app.pipeline.canary.service import BUILD_ID_PATTERN
from app.pipeline.version.semver import Version
from app.store import Org

ORG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # as _ID below allows
_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]*$",
}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 1_000_000_000}
HEARTBEAT_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["runnerId", "orgId", "bootId", "sessions"],
    "additionalProperties": False,
    "properties": {
        "runnerId": _ID,
        "orgId": _ID,
        "bootId": _ID,
        "buildId": {"type": ["string", "null"], "pattern": BUILD_ID_PATTERN},
        "runtimes": {
            "type": "object",
            "maxProperties": 20,
            "propertyNames": {"maxLength": 64},
            "additionalProperties": {"type": "string", "maxLength": 100},
        },
        "sessions": {
            "type": "object",
            "description": "Counted since bootId began; failed and disconnected count"
            " sessions that started, so neither may be more than started.",
            "required": ["started", "failed", "disconnected"],
            "additionalProperties": False,
            "properties": {"started": _COUNT, "failed": _COUNT, "disconnected": _COUNT},
        },
    },
}
INSTRUCTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["desiredBuildId", "channel", "rolloutId", "pollAfterSeconds", "warnings"],
    "properties": {
        "desiredBuildId": {"type": ["string", "null"]},
        "channel": {"enum": list(CHANNELS)},
        "rolloutId": {"type": ["string", "null"]},
        "pollAfterSeconds": {"type": "integer"},
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
}
ORG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["orgId", "channel", "pinnedBuildId", "versionPins", "enterprise", "updatedAt"],
    "properties": {
        "orgId": {"type": "string"},
        "channel": {"enum": list(CHANNELS)},
        "pinnedBuildId": {"type": ["string", "null"]},
        "versionPins": {"type": "object", "additionalProperties": {"type": "string"}},
        "enterprise": {
            "type": "object",
            "required": ["approvalRequired"],
            "properties": {"approvalRequired": {"type": "boolean"}},
        },
        "updatedAt": {"type": "string", "format": "date-time"},
    },
}
ORG_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["channel"],
    "additionalProperties": False,
    "properties": {
        "channel": {"type": "string"},
        "pinnedBuildId": {"type": ["string", "null"], "maxLength": 100},
        "versionPins": {
            "type": "object",
            "maxProperties": 20,
            "propertyNames": {"pattern": "^[a-z][a-z0-9_]*$", "maxLength": 64},
            "additionalProperties": {"type": "string", "minLength": 1, "maxLength": 50},
        },
        "enterprise": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"approvalRequired": {"type": "boolean"}},
        },
    },
}


async def heartbeat(call: Call) -> web.StreamResponse:
    body, services = call.body, call.services
    assert call.principal is not None
    if call.principal.role is Role.RUNNER and call.principal.org_id != body["orgId"]:
        raise ApiError(
            403,
            "FORBIDDEN",
            f"this runner token reports for org {call.principal.org_id}, not {body['orgId']}",
        )
    sessions = body["sessions"]
    for counter in ("failed", "disconnected"):
        # Rates are shares of started sessions: a larger count would make one above 1
        # (and the rollout gates' confidence intervals undefined).
        if sessions[counter] > sessions["started"]:
            raise ApiError(
                400,
                "VALIDATION_FAILED",
                f"body.sessions.{counter}: {sessions[counter]} is more than started"
                f" ({sessions['started']}); only sessions that started can {counter[:-2]}",
            )
    runtimes, warnings = await _runtimes(call, body.get("runtimes") or {})
    instruction = await services.fleet.heartbeat(
        Report(
            body["runnerId"],
            body["orgId"],
            body["bootId"],
            body.get("buildId"),
            runtimes,
            sessions["started"],
            sessions["failed"],
            sessions["disconnected"],
        )
    )
    return json_response(
        {
            "desiredBuildId": instruction.desired_build_id,
            "channel": instruction.channel,
            "rolloutId": instruction.rollout_id,
            "pollAfterSeconds": instruction.poll_after_seconds,
            "warnings": [*warnings, *instruction.warnings],
        }
    )


async def _runtimes(call: Call, reported: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The runtime versions worth keeping, and a warning for each one dropped. The
    heartbeat's counters count whatever happens to its versions."""
    pipeline = call.services.pipeline
    watcher = pipeline.component(VERSION_WATCHER) if pipeline is not None else None
    register = getattr(watcher, "register_heartbeat_version", None)
    known = {p.id for p in call.services.settings.providers}
    kept: dict[str, str] = {}
    warnings: list[str] = []
    for provider, version in reported.items():
        if register is not None:
            warning = await register(provider, version)
        elif provider not in known:
            warning = f"unknown provider {provider[:100]!r}; version not recorded"
        else:
            try:
                Version(version)
                warning = None
            except ValueError:
                warning = f"{version[:100]!r} is not a semantic version; not recorded"
        if warning is None:
            kept[provider] = version
        else:
            warnings.append(f"runtimes.{provider[:64]}: {warning}")
    return kept, warnings


def org_json(org: Org) -> dict[str, Any]:
    return {
        "orgId": org.org_id,
        "channel": org.channel,
        "pinnedBuildId": org.pinned_build_id,
        "versionPins": dict(org.version_pins),
        "enterprise": {"approvalRequired": org.approval_required},
        "updatedAt": isoformat(org.updated_at),
    }


async def list_orgs(call: Call) -> web.StreamResponse:
    limit = call.query.get("limit", 50)
    rows = await call.services.store.list_orgs(
        channel=call.query.get("channel"), before=call.query.get("cursor"), limit=limit + 1
    )
    page = rows[:limit]
    return json_response(
        {
            "items": [org_json(o) for o in page],
            "nextCursor": page[-1].org_id if len(rows) > limit else None,
        }
    )


async def get_org(call: Call) -> web.StreamResponse:
    org = await call.services.store.get_org(call.path["orgId"])
    if org is None:
        raise ApiError(404, "NOT_FOUND", f"no org {call.path['orgId']!r}")
    return json_response(org_json(org))


async def put_org(call: Call) -> web.StreamResponse:
    body = call.body
    if not ORG_ID.fullmatch(call.path["orgId"]):
        raise ApiError(400, "VALIDATION_FAILED", "orgId: not an org id a runner could send")
    try:
        org = await call.services.fleet.set_org(
            call.path["orgId"],
            channel=body["channel"],
            pinned_build_id=body.get("pinnedBuildId"),
            version_pins=body.get("versionPins") or {},
            approval_required=(body.get("enterprise") or {}).get("approvalRequired", False),
        )
    except ValueError as exc:
        raise ApiError(400, "VALIDATION_FAILED", str(exc)) from None
    return json_response(org_json(org))


async def fleet(call: Call) -> web.StreamResponse:
    rows = await call.services.store.fleet_counts()
    channels: dict[str, dict[str, Any]] = {}
    builds: dict[str, dict[str, Any]] = {}
    for row in rows:
        channel = channels.setdefault(row["channel"], {"runners": 0, "noBuild": 0, "builds": {}})
        channel["runners"] += row["runners"]
        build = row["build_id"]
        if build is None:  # runners that report no build yet
            channel["noBuild"] += row["runners"]
            continue
        channel["builds"][build] = {
            "runners": row["runners"],
            "orgs": row["orgs"],
            "lastSeenAt": row["last_seen_at"],
        }
        total = builds.setdefault(build, {"runners": 0, "orgs": 0, "lastSeenAt": None})
        total["runners"] += row["runners"]
        total["orgs"] += row["orgs"]
        total["lastSeenAt"] = max(filter(None, [total["lastSeenAt"], row["last_seen_at"]]))
    return json_response({"channels": channels, "builds": builds})


_BUILD_COUNTS = {
    "type": "object",
    "required": ["runners", "orgs", "lastSeenAt"],
    "properties": {
        "runners": {"type": "integer"},
        "orgs": {"type": "integer"},
        "lastSeenAt": {"type": ["string", "null"]},
    },
}
ROUTES = [
    Route(
        "POST",
        "/heartbeat",
        Access.RUNNER,
        heartbeat,
        "heartbeat",
        "A runner's heartbeat: its sessions since it booted, and which build it should run",
        INSTRUCTION_SCHEMA,
        request=HEARTBEAT_BODY,
        errors={403: "A runner token may only report for its own org."},
        description="Session counters are cumulative per bootId; only what is new since the "
        "runner's last heartbeat of the same boot counts, so a repeated heartbeat counts "
        "nothing twice. Runtime versions that cannot be recorded are dropped with a warning.",
        tag="fleet",
    ),
    Route(
        "GET",
        "/orgs",
        Access.VIEWER,
        list_orgs,
        "listOrgs",
        "Organisations, by id",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {"type": "array", "items": ORG_SCHEMA},
                "nextCursor": {"type": ["string", "null"]},
            },
        },
        query=(
            QueryParam("channel", {"enum": list(CHANNELS)}, "Only this channel's orgs."),
            *page_params(cursor_length=128),
        ),
        tag="fleet",
    ),
    Route(
        "GET",
        "/orgs/{orgId}",
        Access.VIEWER,
        get_org,
        "getOrg",
        "One organisation",
        ORG_SCHEMA,
        errors={404: "No org has this id."},
        tag="fleet",
    ),
    Route(
        "PUT",
        "/orgs/{orgId}",
        Access.ADMIN,
        put_org,
        "setOrg",
        "Set an organisation's channel, pin and enterprise approval",
        ORG_SCHEMA,
        request=ORG_BODY,
        tag="fleet",
    ),
    Route(
        "GET",
        "/fleet",
        Access.VIEWER,
        fleet,
        "getFleet",
        "Runners and orgs per channel and per build, with when they were last seen",
        {
            "type": "object",
            "required": ["channels", "builds"],
            "properties": {
                "channels": {"type": "object"},
                "builds": {"type": "object", "additionalProperties": _BUILD_COUNTS},
            },
        },
        tag="fleet",
    ),
]
