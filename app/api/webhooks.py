"""GitHub's webhook endpoint, and the admin view of stored deliveries."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from app.api.errors import ApiError, json_response
from app.api.routing import Call, QueryParam, Route, page_params, read_body
from app.auth import Access
from app.clock import isoformat
from app.github.webhooks import delivery_fields, payload_problem, signature_valid
from app.logs import get_logger
from app.store import Delivery

log = get_logger("api.webhooks")

ACK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["accepted", "duplicate"],
    "additionalProperties": False,
    "properties": {"accepted": {"type": "boolean"}, "duplicate": {"type": "boolean"}},
}
PONG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["pong"],
    "properties": {"pong": {"const": True}},
}
DELIVERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "event", "action", "status", "attempts", "receivedAt", "lastError"],
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string"},
        "action": {"type": ["string", "null"]},
        "installationId": {"type": ["integer", "null"]},
        "status": {"enum": ["pending", "done", "failed"]},
        "attempts": {"type": "integer"},
        "receivedAt": {"type": "string", "format": "date-time"},
        "nextAttemptAt": {"type": "string", "format": "date-time"},
        "finishedAt": {"type": ["string", "null"], "format": "date-time"},
        "lastError": {"type": ["string", "null"]},
    },
}


async def receive(call: Call) -> web.StreamResponse:
    request, services = call.request, call.services
    secret = services.settings.github_webhook_secret
    if secret is None:
        raise ApiError(
            503, "SERVICE_UNAVAILABLE", "webhooks are off: GITHUB_WEBHOOK_SECRET is unset"
        )
    signature = request.headers.get("X-Hub-Signature-256")
    if signature is None:
        legacy = "X-Hub-Signature" in request.headers
        raise ApiError(
            401,
            "UNAUTHORIZED",
            "only SHA-256 signatures are accepted (X-Hub-Signature-256)"
            if legacy
            else "missing X-Hub-Signature-256",
        )
    body = await read_body(request, services.settings.webhook_max_bytes, what="delivery")
    # The signature is checked before anything else reads the body.
    if not signature_valid(secret.reveal(), body, signature):
        raise ApiError(401, "UNAUTHORIZED", "signature does not match the body")
    if request.content_type != "application/json":
        raise ApiError(
            400,
            "BAD_REQUEST",
            f"content type {request.content_type!r}: set the webhook to application/json",
        )
    event = request.headers.get("X-GitHub-Event", "")
    delivery_id = request.headers.get("X-GitHub-Delivery", "")
    if not event or not delivery_id or len(delivery_id) > 100:
        raise ApiError(400, "BAD_REQUEST", "X-GitHub-Event and X-GitHub-Delivery are required")
    try:
        # Parsed only to refuse what is not JSON and to index two fields; orjson because
        # this is the costliest step of intake (it also refuses text that is not UTF-8).
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "INVALID_JSON", f"body is not JSON: {exc}") from None
    if event == "ping":
        return json_response({"pong": True})
    # What no handler could use is never stored (nor retried, nor sent back to GitHub).
    problem = payload_problem(payload)
    if problem is not None:
        raise ApiError(400, "VALIDATION_FAILED", f"payload: {problem}")
    action, installation_id = delivery_fields(payload)
    stored = await services.deliveries.accept(
        event, delivery_id, body, action=action, installation_id=installation_id
    )
    if not stored:
        log.info("delivery %s seen before; not processed again", delivery_id)
    return json_response({"accepted": True, "duplicate": not stored}, status=202)


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.delivery_id,
        "event": delivery.event,
        "action": delivery.action,
        "installationId": delivery.installation_id,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "receivedAt": isoformat(delivery.received_at),
        "nextAttemptAt": isoformat(delivery.next_attempt_at),
        "finishedAt": isoformat(delivery.finished_at) if delivery.finished_at else None,
        "lastError": delivery.last_error,
    }


async def list_deliveries(call: Call) -> web.StreamResponse:
    limit = call.query.get("limit", 50)
    rows = await call.services.store.list_deliveries(
        status=call.query.get("status"), before=call.query.get("cursor"), limit=limit + 1
    )
    page = rows[:limit]
    next_cursor = page[-1].delivery_id if len(rows) > limit else None
    return json_response({"items": [delivery_json(d) for d in page], "nextCursor": next_cursor})


async def retry_delivery(call: Call) -> web.StreamResponse:
    services = call.services
    delivery = await services.store.requeue_delivery(call.path["id"], services.clock.now())
    if delivery is None:
        raise ApiError(
            404,
            "NOT_FOUND",
            f"no delivery {call.path['id']!r} with its payload (a processed delivery keeps"
            " it for a day)",
        )
    services.deliveries.wake.set()
    return json_response(delivery_json(delivery))


ROUTES = [
    Route(
        "POST",
        "/webhooks",
        Access.GITHUB_SIGNATURE,
        receive,
        "receiveWebhook",
        "GitHub webhook deliveries (signed with GITHUB_WEBHOOK_SECRET)",
        ACK_SCHEMA,
        status=202,
        prefix="/api/github",
        errors={
            400: "Not JSON, missing X-GitHub-Event / X-GitHub-Delivery, or a payload whose"
            " action, installation id, repository names or sender are of the wrong type.",
            401: "Missing or wrong X-Hub-Signature-256 (SHA-1 alone is refused).",
            413: "Larger than UPDATE_PIPELINE_WEBHOOK_MAX_BYTES.",
            503: "GITHUB_WEBHOOK_SECRET is not set.",
        },
        also={200: ("A ping, answered.", PONG_SCHEMA)},
        description="Stored durably and acknowledged before any processing; a delivery id "
        "seen before is acknowledged with duplicate=true and not processed again.",
        tag="github",
    ),
    Route(
        "GET",
        "/webhooks/deliveries",
        Access.ADMIN,
        list_deliveries,
        "listWebhookDeliveries",
        "Stored webhook deliveries, newest first (e.g. ?status=failed)",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {"type": "array", "items": DELIVERY_SCHEMA},
                "nextCursor": {"type": ["string", "null"]},
            },
        },
        query=(
            QueryParam("status", {"enum": ["pending", "done", "failed"]}, "Only this status."),
            *page_params(cursor_length=100),
        ),
        tag="github",
    ),
    Route(
        "POST",
        "/webhooks/deliveries/{id}/retry",
        Access.ADMIN,
        retry_delivery,
        "retryWebhookDelivery",
        "Queue a stored delivery (typically a failed one) for processing again",
        DELIVERY_SCHEMA,
        errors={404: "No stored delivery has this id."},
        tag="github",
    ),
]
