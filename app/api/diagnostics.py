"""What an operator looks at when GitHub side effects lag: the outbox, the webhook queue,
and the GitHub client's counters; and the parked outbox entries, to retry one."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from app.api.errors import ApiError, json_response
from app.api.routing import Call, QueryParam, Route, page_params
from app.auth import Access
from app.clock import isoformat
from app.store import Conflict, Effect

_STRING_OR_NULL = {"type": ["string", "null"]}
EFFECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "id",
        "installationId",
        "target",
        "kind",
        "status",
        "attempts",
        "createdAt",
        "nextAttemptAt",
        "finishedAt",
        "lastError",
    ],
    "properties": {
        "id": {"type": "integer"},
        "installationId": {"type": "integer"},
        "target": {"type": "string", "description": "The GitHub object it acts on."},
        "kind": {"type": "string", "examples": ["comment", "reaction", "check_run"]},
        "status": {"enum": ["pending", "done", "failed"]},
        "attempts": {"type": "integer", "description": "Attempts started so far."},
        "createdAt": {"type": "string", "format": "date-time"},
        "nextAttemptAt": {"type": "string", "format": "date-time"},
        "finishedAt": {"type": ["string", "null"], "format": "date-time"},
        "lastError": _STRING_OR_NULL,
    },
}
DIAGNOSTICS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["outbox", "webhooks", "github"],
    "properties": {
        "outbox": {
            "type": "object",
            "required": ["pending", "failed", "oldestPendingAgeSeconds", "oldestPending"],
            "properties": {
                "pending": {"type": "integer", "description": "Entries waiting to be applied."},
                "failed": {"type": "integer", "description": "Entries parked after refusals."},
                "oldestPendingAgeSeconds": {"type": ["number", "null"]},
                "oldestPending": {"oneOf": [EFFECT_SCHEMA, {"type": "null"}]},
            },
        },
        "webhooks": {
            "type": "object",
            "required": ["pending", "failed", "done"],
            "properties": {
                "pending": {"type": "integer"},
                "failed": {"type": "integer"},
                "done": {"type": "integer"},
            },
        },
        "github": {
            "type": "object",
            "required": ["state", "calls", "errors", "retries", "rateLimitWaits", "headroom"],
            "properties": {
                "state": {"type": "string"},
                "calls": {"type": "integer", "description": "Responses received, all statuses."},
                "errors": {"type": "integer", "description": "Requests that got no response."},
                "retries": {"type": "integer"},
                "rateLimitWaits": {"type": "integer"},
                "headroom": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["credential", "resource", "remaining", "limit", "resetAt"],
                        "properties": {
                            "credential": {"type": "string"},
                            "resource": {"type": "string"},
                            "remaining": {"type": "integer"},
                            "limit": {"type": "integer"},
                            "resetAt": {"type": "string", "format": "date-time"},
                        },
                    },
                },
            },
        },
    },
}


def effect_json(effect: Effect) -> dict[str, Any]:
    # The payload is left out: it can hold what people wrote, and it is not needed to
    # see what is stuck where.
    return {
        "id": effect.id,
        "installationId": effect.installation_id,
        "target": effect.target,
        "kind": effect.kind,
        "status": effect.status,
        "attempts": effect.attempts,
        "createdAt": isoformat(effect.created_at),
        "nextAttemptAt": isoformat(effect.next_attempt_at),
        "finishedAt": isoformat(effect.finished_at) if effect.finished_at else None,
        "lastError": effect.last_error,
    }


async def diagnostics(call: Call) -> web.StreamResponse:
    services = call.services
    now = services.clock.now()
    outbox = await services.store.outbox_stats()
    deliveries = await services.store.delivery_counts()
    oldest = outbox.oldest_pending
    github: dict[str, Any] = {
        "state": services.github_state,
        "calls": 0,
        "errors": 0,
        "retries": 0,
        "rateLimitWaits": 0,
        "headroom": [],
    }
    if services.github is not None:
        stats = services.github.stats
        github.update(
            calls=sum(stats.calls.values()),
            errors=sum(stats.errors.values()),
            retries=stats.retries,
            rateLimitWaits=stats.rate_limit_waits,
            headroom=[
                {
                    "credential": credential,
                    "resource": resource,
                    "remaining": remaining,
                    "limit": limit,
                    "resetAt": isoformat(datetime.fromtimestamp(reset, UTC)),
                }
                for (credential, resource), (remaining, limit, reset) in sorted(
                    stats.headroom.items()
                )
            ],
        )
    return json_response(
        {
            "outbox": {
                "pending": outbox.pending,
                "failed": outbox.failed,
                "oldestPendingAgeSeconds": (
                    max(0.0, (now - oldest.created_at).total_seconds()) if oldest else None
                ),
                "oldestPending": effect_json(oldest) if oldest else None,
            },
            "webhooks": {s: deliveries.get(s, 0) for s in ("pending", "failed", "done")},
            "github": github,
        }
    )


async def list_outbox(call: Call) -> web.StreamResponse:
    limit = call.query.get("limit", 50)
    cursor = call.query.get("cursor")
    # isascii() too: isdigit() also accepts digits such as "²" that int() refuses.
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise ApiError(400, "INVALID_QUERY", "cursor is not one this API handed out")
    rows = await call.services.store.list_effects(
        status=call.query.get("status"),
        before_id=int(cursor) if cursor is not None else None,
        limit=limit + 1,
    )
    page = rows[:limit]
    next_cursor = str(page[-1].id) if len(rows) > limit else None
    return json_response({"items": [effect_json(e) for e in page], "nextCursor": next_cursor})


async def retry_outbox_entry(call: Call) -> web.StreamResponse:
    services = call.services
    try:
        entry_id = int(call.path["id"])
    except ValueError:
        raise ApiError(404, "NOT_FOUND", f"no outbox entry {call.path['id']!r}") from None
    try:
        effect = await services.store.retry_effect(entry_id, services.clock.now())
    except Conflict as exc:
        raise ApiError(409, "CONFLICT", str(exc)) from None
    if effect is None:
        raise ApiError(404, "NOT_FOUND", f"no parked outbox entry {entry_id}")
    services.outbox.written()
    return json_response(effect_json(effect))


ROUTES = [
    Route(
        "GET",
        "/diagnostics",
        Access.ADMIN,
        diagnostics,
        "getDiagnostics",
        "Outbox depth and oldest entry, webhook queue, GitHub client counters",
        DIAGNOSTICS_SCHEMA,
        tag="operations",
    ),
    Route(
        "GET",
        "/outbox",
        Access.ADMIN,
        list_outbox,
        "listOutbox",
        "Outbox entries, newest first (e.g. ?status=failed for the parked ones)",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {"type": "array", "items": EFFECT_SCHEMA},
                "nextCursor": {"type": ["string", "null"]},
            },
        },
        query=(
            QueryParam("status", {"enum": ["pending", "done", "failed"]}, "Only this status."),
            *page_params(cursor_length=20),
        ),
        errors={400: "A cursor that is not a nextCursor."},
        tag="operations",
    ),
    Route(
        "POST",
        "/outbox/{id}/retry",
        Access.ADMIN,
        retry_outbox_entry,
        "retryOutboxEntry",
        "Queue a parked outbox entry again",
        EFFECT_SCHEMA,
        errors={
            404: "No parked entry has this id.",
            409: "A newer pending edit of the same object replaces this entry.",
        },
        tag="operations",
    ),
]
