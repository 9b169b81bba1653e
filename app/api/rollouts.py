"""Rollouts (design section 4.3): start, steer and read them; the global freeze."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from app.api.errors import ApiError, json_response
from app.api.fleet import _ID, ORG_ID
from app.api.routing import Call, QueryParam, Route, page_params
from app.auth import Access
from app.clock import isoformat
from app.pipeline import CHANNELS
from app.pipeline.canary.service import BUILD_ID_PATTERN
from app.rollouts.controller import (
    MAX_REASON,
    STATES,
    Gate,
    InvalidTransition,
    RolloutError,
    RolloutView,
    StageReport,
)
from app.rollouts.gates import Counts
from app.store import Freeze, HistoryEntry, Rollout, StaleRollout

_DATE = {"type": "string", "format": "date-time"}
_DATE_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_RATE = {"type": "number", "minimum": 0, "maximum": 1}
_REASON = {"type": "string", "minLength": 1, "maxLength": MAX_REASON}
# How many org ids a rollout's view lists; the rest are paged at /rollouts/{id}/orgs.
ORG_IDS_SHOWN = 1000

FREEZE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["reason", "by", "at"],
    "properties": {"reason": {"type": "string"}, "by": {"type": "string"}, "at": _DATE},
}
SUMMARY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "rolloutId",
        "buildId",
        "channel",
        "state",
        "currentPercentage",
        "startedAt",
        "lastUpdatedAt",
        "completedAt",
        "startedBy",
        "error",
    ],
    "properties": {
        "rolloutId": {"type": "string"},
        "buildId": {"type": "string"},
        "channel": {"enum": list(CHANNELS)},
        "state": {"enum": list(STATES)},
        "currentPercentage": {"type": "number"},
        "startedAt": _DATE,
        "lastUpdatedAt": _DATE,
        "completedAt": {
            **_DATE_OR_NULL,
            "description": "When it completed or was rolled back.",
        },
        "startedBy": {"type": "string"},
        "error": {
            "type": ["string", "null"],
            "description": "Why it was rolled back, if it was.",
        },
    },
}
_COUNTS = {
    "type": "object",
    "required": ["sessions", "failed", "disconnected", "failureRate", "disconnectRate"],
    "properties": {
        "sessions": {"type": "integer"},
        "failed": {"type": "integer"},
        "disconnected": {"type": "integer"},
        "failureRate": _RATE,
        "disconnectRate": _RATE,
    },
}
_INTERVAL = {
    "type": "object",
    "required": ["estimate", "low", "high"],
    "properties": {
        "estimate": {"type": "number"},
        "low": {"type": "number"},
        "high": {"type": "number"},
    },
}
_VERDICT = {
    "type": "object",
    "required": ["outcome", "text"],
    "properties": {
        "outcome": {"enum": ["insufficient", "pass", "held", "rollback"]},
        "text": {"type": "string"},
        "metric": {"type": "string"},
        "value": {"type": "number"},
        "threshold": {"type": "number"},
        "orgs": {"type": "array", "items": {"type": "string"}},
    },
}
ROLLOUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        *SUMMARY_SCHEMA["required"],
        "plan",
        "previousBuildId",
        "forced",
        "stage",
        "stages",
        "gate",
        "nextStep",
        "affectedOrgCount",
        "affectedOrgIds",
        "enterprise",
        "rollback",
        "frozen",
    ],
    "properties": {
        **SUMMARY_SCHEMA["properties"],
        "plan": {"type": "string", "examples": ["1%:1h,10%:2h,50%:4h,100%"]},
        "previousBuildId": {
            "type": ["string", "null"],
            "description": "The channel's recommended build when it started: the baseline.",
        },
        "forced": {
            "oneOf": [
                {"type": "null"},
                {"type": "object", "required": ["reason"], "properties": {"reason": _REASON}},
            ]
        },
        "stage": {
            "type": "object",
            "required": [
                "index",
                "percentage",
                "startedAt",
                "deadlineAt",
                "pausedAt",
                "remainingSeconds",
            ],
            "properties": {
                "index": {"type": "integer"},
                "percentage": {"type": "number"},
                "startedAt": _DATE_OR_NULL,
                "deadlineAt": _DATE_OR_NULL,
                "pausedAt": _DATE_OR_NULL,
                "remainingSeconds": {"type": ["number", "null"]},
            },
        },
        "stages": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "index",
                    "percentage",
                    "durationSeconds",
                    "startedAt",
                    "endedAt",
                    "target",
                    "orgsWithSessions",
                    "baseline",
                    "verdict",
                ],
                "properties": {
                    "index": {"type": "integer"},
                    "percentage": {"type": "number"},
                    "durationSeconds": {"type": ["number", "null"]},
                    "startedAt": _DATE_OR_NULL,
                    "endedAt": _DATE_OR_NULL,
                    "target": _COUNTS,
                    "orgsWithSessions": {"type": "integer"},
                    "baseline": _COUNTS,
                    "verdict": {"oneOf": [{"type": "null"}, _VERDICT]},
                },
            },
        },
        "gate": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["verdict", "thresholds", "baseline"],
                    "properties": {
                        "verdict": _VERDICT,
                        "thresholds": {
                            "type": "object",
                            "required": [
                                "maxFailureRate",
                                "maxDisconnectRate",
                                "minSessionCount",
                                "maxRelativeRegression",
                            ],
                        },
                        "baseline": {
                            "type": "object",
                            "required": [
                                "target",
                                "baseline",
                                "failureRateDifference",
                                "disconnectRateDifference",
                                "regression",
                            ],
                            "properties": {
                                "target": _COUNTS,
                                "baseline": _COUNTS,
                                "failureRateDifference": _INTERVAL,
                                "disconnectRateDifference": _INTERVAL,
                                "regression": {"oneOf": [{"type": "null"}, _VERDICT]},
                            },
                        },
                    },
                },
            ]
        },
        "nextStep": {
            "type": "object",
            "required": ["action", "at", "detail"],
            "properties": {
                "action": {"enum": ["advance", "complete", "resume", "none"]},
                "at": _DATE_OR_NULL,
                "detail": {"type": "string"},
            },
        },
        "affectedOrgCount": {"type": "integer"},
        "affectedOrgIds": {
            "type": "array",
            "items": {"type": "string"},
            "description": f"The first {ORG_IDS_SHOWN} included orgs by id; all of them,"
            " with their previous builds, at /rollouts/{rolloutId}/orgs.",
        },
        "enterprise": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["orgId", "decision", "by", "at", "voided", "applied"],
                "properties": {
                    "orgId": {"type": "string"},
                    "decision": {"enum": ["approved", "skipped", "pending"]},
                    "by": {"type": ["string", "null"]},
                    "at": _DATE_OR_NULL,
                    "voided": {"type": "boolean"},
                    "applied": {"type": "boolean"},
                },
            },
        },
        "rollback": {"type": ["object", "null"]},
        "frozen": {"oneOf": [{"type": "null"}, FREEZE_SCHEMA]},
    },
}
NEW_ROLLOUT: dict[str, Any] = {
    "type": "object",
    "required": ["buildId", "channel"],
    "additionalProperties": False,
    "properties": {
        "buildId": {"type": "string", "pattern": BUILD_ID_PATTERN},
        "channel": {"type": "string", "maxLength": 20},
        "force": {
            "type": "boolean",
            "description": "Roll out a build that is not known-good (needs a reason).",
        },
        "reason": _REASON,
    },
}
REASON_BODY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"reason": _REASON},
}
ADVANCE_BODY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "to": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 100,
            "description": "A later stage's percentage (100 promotes fully).",
        }
    },
}
APPROVE_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["orgId"],
    "additionalProperties": False,
    "properties": {
        "orgId": _ID,
        "skip": {"type": "boolean", "description": "The org keeps what it runs."},
    },
}
HISTORY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["items", "nextCursor"],
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "id",
                    "at",
                    "actor",
                    "action",
                    "fromState",
                    "toState",
                    "percentage",
                    "reason",
                    "details",
                ],
                "properties": {
                    "id": {"type": "integer"},
                    "at": _DATE,
                    "actor": {"type": "string"},
                    "action": {"type": "string"},
                    "fromState": {"type": ["string", "null"]},
                    "toState": {"enum": list(STATES)},
                    "percentage": {"type": "number"},
                    "reason": {"type": ["string", "null"]},
                    "details": {"type": "object"},
                },
            },
        },
        "nextCursor": {"type": ["string", "null"]},
    },
}


def _actor(call: Call) -> str:
    assert call.principal is not None
    return f"token {call.principal.name}"


def _error(exc: RolloutError) -> ApiError:
    return ApiError(exc.status, exc.code, str(exc))


def summary_json(r: Rollout) -> dict[str, Any]:
    return {
        "rolloutId": r.rollout_id,
        "buildId": r.build_id,
        "channel": r.channel,
        "state": r.state,
        "currentPercentage": r.percentage,
        "startedAt": isoformat(r.started_at),
        "lastUpdatedAt": isoformat(r.updated_at),
        "completedAt": isoformat(r.finished_at) if r.finished_at else None,
        "startedBy": r.started_by,
        "error": (r.rollback or {}).get("reason") if r.state == "rolled_back" else None,
    }


def _counts(c: Counts) -> dict[str, Any]:
    return {
        "sessions": c.started,
        "failed": c.failed,
        "disconnected": c.disconnected,
        "failureRate": c.failure_rate,
        "disconnectRate": c.disconnect_rate,
    }


def _verdict(v: Any) -> dict[str, Any] | None:
    if v is None:
        return None
    out: dict[str, Any] = {"outcome": v.outcome}
    if v.outcome == "insufficient":
        out["text"] = "insufficient data"
    elif v.outcome == "pass":
        out["text"] = "within thresholds"
    else:
        out["text"] = f"{v.metric} {v.value:.4f} above {v.threshold:g}"
        if v.outcome == "held":
            out["text"] += f" in one org's data only ({', '.join(v.orgs_over)}): held"
        out |= {"metric": v.metric, "value": v.value, "threshold": v.threshold}
        if v.orgs_over:
            out["orgs"] = list(v.orgs_over)
    return out


def _stage(s: StageReport) -> dict[str, Any]:
    return {
        "index": s.index,
        "percentage": s.percentage,
        "durationSeconds": s.duration.total_seconds() if s.duration else None,
        "startedAt": isoformat(s.started_at) if s.started_at else None,
        "endedAt": isoformat(s.ended_at) if s.ended_at else None,
        "target": _counts(s.target),
        "orgsWithSessions": s.orgs_with_sessions,
        "baseline": _counts(s.baseline),
        "verdict": _verdict(s.verdict),
    }


def _gate(call: Call, gate: Gate | None) -> dict[str, Any] | None:
    if gate is None:
        return None
    settings = call.services.settings
    c = gate.comparison

    def interval(values: tuple[float, float, float]) -> dict[str, float]:
        return {"estimate": values[0], "low": values[1], "high": values[2]}

    return {
        "verdict": _verdict(gate.verdict),
        "thresholds": {
            "maxFailureRate": settings.max_failure_rate,
            "maxDisconnectRate": settings.max_disconnect_rate,
            "minSessionCount": settings.min_session_count,
            "maxRelativeRegression": settings.max_relative_regression,
        },
        "baseline": {
            "target": _counts(c.target),
            "baseline": _counts(c.baseline),
            "failureRateDifference": interval(c.failure_difference),
            "disconnectRateDifference": interval(c.disconnect_difference),
            "regression": _verdict(gate.regression),
        },
    }


def freeze_json(f: Freeze | None) -> dict[str, Any] | None:
    if f is None:
        return None
    return {"reason": f.reason, "by": f.frozen_by, "at": isoformat(f.frozen_at)}


async def rollout_json(call: Call, view: RolloutView) -> dict[str, Any]:
    r = view.rollout
    shown = await call.services.store.rollout_orgs(r.rollout_id, limit=ORG_IDS_SHOWN)
    return {
        **summary_json(r),
        "plan": r.plan,
        "previousBuildId": r.previous_build_id,
        "forced": {"reason": r.forced_reason} if r.forced_reason else None,
        "stage": {
            "index": r.stage,
            "percentage": r.percentage,
            "startedAt": isoformat(r.stage_started_at) if r.stage_started_at else None,
            "deadlineAt": isoformat(r.deadline_at) if r.deadline_at else None,
            "pausedAt": isoformat(r.paused_at) if r.paused_at else None,
            "remainingSeconds": r.remaining_seconds,
        },
        "stages": [_stage(s) for s in view.stages],
        "gate": _gate(call, view.gate),
        "nextStep": {
            "action": view.next_step.action,
            "at": isoformat(view.next_step.at) if view.next_step.at else None,
            "detail": view.next_step.detail,
        },
        "affectedOrgCount": view.included,
        "affectedOrgIds": [i.org_id for i in shown],
        "enterprise": [
            {
                "orgId": e.org_id,
                "decision": e.decision,
                "by": e.decided_by,
                "at": isoformat(e.decided_at) if e.decided_at else None,
                "voided": e.voided_at is not None,
                "applied": e.applied,
            }
            for e in view.enterprise
        ],
        "rollback": dict(r.rollback) if r.rollback else None,
        "frozen": freeze_json(view.frozen),
    }


async def _respond(call: Call, rollout_id: str, status: int = 200) -> web.StreamResponse:
    view = await call.services.rollouts.view(rollout_id)
    return json_response(await rollout_json(call, view), status=status)


async def start(call: Call) -> web.StreamResponse:
    body = call.body
    try:
        rollout = await call.services.rollouts.start(
            body["buildId"],
            body["channel"],
            by=_actor(call),
            force=body.get("force", False),
            reason=body.get("reason"),
        )
    except RolloutError as exc:
        raise _error(exc) from None
    return await _respond(call, rollout.rollout_id, 201)


async def list_rollouts(call: Call) -> web.StreamResponse:
    limit = call.query.get("limit", 50)
    rows = await call.services.store.list_rollouts(
        state=call.query.get("state"),
        channel=call.query.get("channel"),
        before=call.query.get("cursor"),
        limit=limit + 1,
    )
    page = rows[:limit]
    return json_response(
        {
            "items": [summary_json(r) for r in page],
            "nextCursor": page[-1].rollout_id if len(rows) > limit else None,
        }
    )


async def get_rollout(call: Call) -> web.StreamResponse:
    try:
        return await _respond(call, call.path["rolloutId"])
    except RolloutError as exc:
        raise _error(exc) from None


def _history_json(h: HistoryEntry) -> dict[str, Any]:
    return {
        "id": h.id,
        "at": isoformat(h.at),
        "actor": h.actor,
        "action": h.action,
        "fromState": h.from_state,
        "toState": h.to_state,
        "percentage": h.percentage,
        "reason": h.reason,
        "details": dict(h.details),
    }


async def history(call: Call) -> web.StreamResponse:
    store = call.services.store
    rollout_id = call.path["rolloutId"]
    if await store.get_rollout(rollout_id) is None:
        raise ApiError(404, "NOT_FOUND", f"no rollout {rollout_id!r}")
    limit = call.query.get("limit", 50)
    cursor = call.query.get("cursor")
    if cursor is not None and not cursor.isdigit():
        raise ApiError(400, "INVALID_QUERY", "cursor: not a cursor this list gave out")
    rows = await store.rollout_history(
        rollout_id, after_id=int(cursor) if cursor else None, limit=limit + 1
    )
    page = rows[:limit]
    return json_response(
        {
            "items": [_history_json(h) for h in page],
            "nextCursor": str(page[-1].id) if len(rows) > limit else None,
        }
    )


async def rollout_orgs(call: Call) -> web.StreamResponse:
    store = call.services.store
    rollout_id = call.path["rolloutId"]
    if await store.get_rollout(rollout_id) is None:
        raise ApiError(404, "NOT_FOUND", f"no rollout {rollout_id!r}")
    limit = call.query.get("limit", 50)
    rows = await store.rollout_orgs(rollout_id, after=call.query.get("cursor"), limit=limit + 1)
    page = rows[:limit]
    return json_response(
        {
            "items": [
                {
                    "orgId": i.org_id,
                    "stage": i.stage,
                    "includedAt": isoformat(i.included_at),
                    "previousBuildId": i.previous_build_id,
                }
                for i in page
            ],
            "nextCursor": page[-1].org_id if len(rows) > limit else None,
        }
    )


async def pause(call: Call) -> web.StreamResponse:
    return await _command(call, "pause")


async def resume(call: Call) -> web.StreamResponse:
    return await _command(call, "resume")


async def advance(call: Call) -> web.StreamResponse:
    return await _command(call, "advance")


async def rollback(call: Call) -> web.StreamResponse:
    return await _command(call, "rollback")


async def approve(call: Call) -> web.StreamResponse:
    if not ORG_ID.fullmatch(call.body["orgId"]):
        raise ApiError(400, "VALIDATION_FAILED", "orgId: not an org id")
    return await _command(call, "approve")


async def _command(call: Call, action: str) -> web.StreamResponse:
    controller = call.services.rollouts
    rollout_id, by, body = call.path["rolloutId"], _actor(call), call.body
    try:
        if action == "pause":
            await controller.pause(rollout_id, by=by, reason=body.get("reason"))
        elif action == "resume":
            await controller.resume(rollout_id, by=by)
        elif action == "advance":
            await controller.advance(rollout_id, by=by, to=body.get("to"))
        elif action == "rollback":
            await controller.rollback(rollout_id, by=by, reason=body["reason"])
        else:
            await controller.approve(rollout_id, body["orgId"], by=by, skip=body.get("skip", False))
    except InvalidTransition as exc:
        raise ApiError(409, exc.code, str(exc), state=exc.state) from None
    except RolloutError as exc:
        raise _error(exc) from None
    except StaleRollout as exc:
        raise ApiError(409, "CONFLICT", f"{exc}; read it again and retry") from None
    return await _respond(call, rollout_id)


async def get_freeze(call: Call) -> web.StreamResponse:
    return json_response({"frozen": freeze_json(await call.services.store.get_freeze())})


async def set_freeze(call: Call) -> web.StreamResponse:
    try:
        freeze = await call.services.rollouts.freeze(call.body["reason"], by=_actor(call))
    except RolloutError as exc:
        raise _error(exc) from None
    return json_response({"frozen": freeze_json(freeze)})


async def delete_freeze(call: Call) -> web.StreamResponse:
    await call.services.rollouts.unfreeze(by=_actor(call))
    return json_response({"frozen": None})


_FREEZE_STATE = {
    "type": "object",
    "required": ["frozen"],
    "properties": {"frozen": {"oneOf": [{"type": "null"}, FREEZE_SCHEMA]}},
}
_ID_ERRORS = {404: "No rollout has this id."}
_TRANSITION = {
    404: "No rollout has this id.",
    409: "Not allowed in the rollout's current state (the error names it), or frozen.",
}


def _control(path: str, handler: Any, op: str, summary: str, **kw: Any) -> Route:
    return Route(
        "POST",
        f"/rollouts/{{rolloutId}}/{path}",
        Access.ADMIN,
        handler,
        op,
        summary,
        ROLLOUT_SCHEMA,
        errors=_TRANSITION,
        tag="rollouts",
        **kw,
    )


ROUTES = [
    Route(
        "POST",
        "/rollouts",
        Access.ADMIN,
        start,
        "startRollout",
        "Start rolling a build out on a channel; answers with its first stage committed",
        ROLLOUT_SCHEMA,
        status=201,
        request=NEW_ROLLOUT,
        errors={
            404: "No build has this id.",
            409: "A rollout is active on the channel, the build is not known-good (pass force"
            " with a reason), it is already the channel's build, or rollouts are frozen.",
        },
        tag="rollouts",
    ),
    Route(
        "GET",
        "/rollouts",
        Access.VIEWER,
        list_rollouts,
        "listRollouts",
        "Rollouts, newest first",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {"type": "array", "items": SUMMARY_SCHEMA},
                "nextCursor": {"type": ["string", "null"]},
            },
        },
        query=(
            QueryParam("state", {"enum": list(STATES)}, "Only rollouts in this state."),
            QueryParam("channel", {"enum": list(CHANNELS)}, "Only this channel's rollouts."),
            *page_params(cursor_length=64),
        ),
        tag="rollouts",
    ),
    Route(
        "GET",
        "/rollouts/{rolloutId}",
        Access.VIEWER,
        get_rollout,
        "getRollout",
        "One rollout: its stages with their metrics and gate verdicts, the baseline, the"
        " next automatic step, enterprise approvals",
        ROLLOUT_SCHEMA,
        errors=_ID_ERRORS,
        tag="rollouts",
    ),
    Route(
        "GET",
        "/rollouts/{rolloutId}/history",
        Access.VIEWER,
        history,
        "getRolloutHistory",
        "Every transition and command of a rollout, oldest first: who, when, from which"
        " state to which, and why",
        HISTORY_SCHEMA,
        query=page_params(cursor_length=20),
        errors=_ID_ERRORS,
        tag="rollouts",
    ),
    Route(
        "GET",
        "/rollouts/{rolloutId}/orgs",
        Access.VIEWER,
        rollout_orgs,
        "listRolloutOrgs",
        "The orgs a rollout included, by id, with the build each ran before",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["orgId", "stage", "includedAt", "previousBuildId"],
                        "properties": {
                            "orgId": {"type": "string"},
                            "stage": {"type": "integer"},
                            "includedAt": _DATE,
                            "previousBuildId": {"type": ["string", "null"]},
                        },
                    },
                },
                "nextCursor": {"type": ["string", "null"]},
            },
        },
        query=page_params(cursor_length=128),
        errors=_ID_ERRORS,
        tag="rollouts",
    ),
    _control(
        "pause",
        pause,
        "pauseRollout",
        "Halt at the current percentage (no new orgs; the stage's clock stops)",
        request=REASON_BODY,
        body_optional=True,
    ),
    _control(
        "resume",
        resume,
        "resumeRollout",
        "Continue a paused rollout where its stage's clock stopped",
        request={"type": "object", "additionalProperties": False, "properties": {}},
        body_optional=True,
    ),
    _control(
        "advance",
        advance,
        "advanceRollout",
        "Move to the next stage now, or to a later one with {to} (100: full promotion)",
        request=ADVANCE_BODY,
        body_optional=True,
    ),
    _control(
        "rollback",
        rollback,
        "rollbackRollout",
        "Send every included org back to the build it ran before (within the rollback"
        " window after completion, also restoring the channel's previous build)",
        request={**REASON_BODY, "required": ["reason"]},
    ),
    _control(
        "approve",
        approve,
        "approveRolloutOrg",
        "Record an enterprise org's approval (or skip); it takes effect at 100%",
        request=APPROVE_BODY,
    ),
    Route(
        "GET",
        "/freeze",
        Access.VIEWER,
        get_freeze,
        "getFreeze",
        "Whether rollouts are frozen, why and by whom",
        _FREEZE_STATE,
        tag="rollouts",
    ),
    Route(
        "POST",
        "/freeze",
        Access.ADMIN,
        set_freeze,
        "freezeRollouts",
        "Freeze: no rollout starts or advances until lifted (automatic rollbacks go on)",
        _FREEZE_STATE,
        request={**REASON_BODY, "required": ["reason"]},
        tag="rollouts",
    ),
    Route(
        "DELETE",
        "/freeze",
        Access.ADMIN,
        delete_freeze,
        "unfreezeRollouts",
        "Lift the freeze",
        _FREEZE_STATE,
        tag="rollouts",
    ),
]
