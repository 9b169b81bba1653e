"""The event log over HTTP: a paged list, and a live Server-Sent Events stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from app.api.errors import REQUEST_ID, ApiError, json_response
from app.api.routing import EVENT_STREAM, Call, QueryParam, Route, page_params
from app.auth import Access
from app.clock import isoformat
from app.pipeline.events import event_type, sse_name
from app.services import Services
from app.store import EventRecord

CATCH_UP_PAGE = 500
RETRY_MS = 3000

EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "type", "timestamp", "data"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer", "description": "Increases with every event."},
        "type": {"type": "string", "examples": ["rollout_initiated"]},
        "timestamp": {"type": "string", "format": "date-time"},
        "data": {"type": "object"},
    },
}


def event_json(event: EventRecord) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "timestamp": isoformat(event.created_at),
        "data": dict(event.data),
    }


async def list_events(call: Call) -> web.StreamResponse:
    types = sorted(
        {
            event_type(t.strip())
            for v in call.query.get("type", [])
            for t in v.split(",")
            if t.strip()
        }
    )
    before = _cursor(call.query.get("cursor"))
    limit = call.query.get("limit", 50)
    # One extra row tells whether another page exists without a count query.
    rows = await call.services.store.list_events(types=types, before_id=before, limit=limit + 1)
    page = rows[:limit]
    next_cursor = str(page[-1].id) if len(rows) > limit else None
    return json_response({"items": [event_json(e) for e in page], "nextCursor": next_cursor})


def _cursor(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not _is_id(raw):
        raise ApiError(400, "INVALID_QUERY", "cursor is not one this API handed out")
    return int(raw)


def _is_id(raw: str) -> bool:
    # isascii() too: isdigit() also accepts digits such as "²" that int() rejects.
    return raw.isascii() and raw.isdigit() and len(raw) <= 18


def _frame(event: EventRecord) -> bytes:
    data = json.dumps(event_json(event), separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.id}\nevent: {sse_name(event.type)}\ndata: {data}\n\n".encode()


async def stream_events(call: Call) -> web.StreamResponse:
    services = call.services
    last_id = _last_event_id(call)
    # Subscribe before catching up, so nothing published in between is missed;
    # duplicates are skipped by id below.
    subscription = services.bus.subscribe(on_drop=lambda: _hang_up(call.request))
    response = web.StreamResponse(
        headers={
            "Content-Type": EVENT_STREAM,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must not buffer a live stream
            "X-Request-Id": call.request[REQUEST_ID],
        }
    )
    try:
        await response.prepare(call.request)
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        sent = last_id if last_id is not None else 0
        if last_id is not None:
            while True:
                batch = await services.store.events_after(sent, limit=CATCH_UP_PAGE)
                for event in batch:
                    await response.write(_frame(event))
                    sent = event.id
                if len(batch) < CATCH_UP_PAGE:
                    break
            if sent == last_id and not await _known_id(services, last_id):
                # An id from another database (the file was replaced): nothing here is
                # "after" it, so go live rather than hide every event until ids catch up.
                sent = 0
        while True:
            try:
                live = await asyncio.wait_for(subscription.next(), services.sse_keepalive_seconds)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if live is None:  # the server is stopping, or this client fell behind
                break
            if live.id > sent:
                await response.write(_frame(live))
                sent = live.id
        return response
    except ConnectionResetError:  # the client went away; nothing to answer
        return response
    finally:
        services.bus.unsubscribe(subscription)


async def _known_id(services: Services, event_id: int) -> bool:
    newest = await services.store.list_events(limit=1)
    return bool(newest) and newest[0].id >= event_id


def _hang_up(request: web.Request) -> None:
    # A dropped client may be stuck in a write that never completes (it stopped reading),
    # so ending its queue alone would hold the connection, and shutdown, until it reads.
    # Aborting loses nothing: the client resumes with Last-Event-ID.
    transport = request.transport
    if transport is not None:
        transport.abort()


def _last_event_id(call: Call) -> int | None:
    raw, where = call.request.headers.get("Last-Event-ID"), "Last-Event-ID"
    if raw is None:
        raw, where = call.query.get("lastEventId"), "lastEventId (Last-Event-ID as a query)"
    if raw is None or raw == "":
        return None
    if not _is_id(raw):
        raise ApiError(400, "INVALID_LAST_EVENT_ID", f"{where} must be an event id")
    return int(raw)


# Event types are identifiers. The bounds keep the longest valid query (20 values of 100
# characters, each one percent-encoded to 3 bytes at worst) within the 8190 bytes aiohttp
# takes for a request line: a longer one is refused in plain text before the app sees it.
_TYPE_PARAM = QueryParam(
    "type",
    {
        "type": "array",
        "items": {"type": "string", "maxLength": 100, "pattern": "^[A-Za-z0-9_, ]*$"},
        "maxItems": 20,
    },
    "Only these event types (repeat, or separate with commas). Pipeline names "
    "(rollout_initiated) and stream names (update_rollout_started) both work.",
)

ROUTES = [
    Route(
        "GET",
        "/events",
        Access.VIEWER,
        list_events,
        "listEvents",
        "The event log, newest first, paged by cursor",
        {
            "type": "object",
            "required": ["items", "nextCursor"],
            "additionalProperties": False,
            "properties": {
                "items": {"type": "array", "items": EVENT_SCHEMA},
                "nextCursor": {
                    "type": ["string", "null"],
                    "description": "Pass as ?cursor= for the next (older) page; null at the end.",
                },
            },
        },
        query=(
            _TYPE_PARAM,
            *page_params(cursor_length=32),
        ),
        tag="events",
    ),
    Route(
        "GET",
        "/events/stream",
        Access.VIEWER,
        stream_events,
        "streamEvents",
        "Live events as Server-Sent Events",
        {"type": "string"},
        query=(
            QueryParam(
                "lastEventId",
                {"type": "string", "maxLength": 32},
                "Resume after this event id (the Last-Event-ID header does the same).",
            ),
        ),
        content_type=EVENT_STREAM,
        description=(
            "Each event's SSE name is its stream name (design section 3.2, e.g. "
            "update_rollout_started; update_<type> otherwise) and its data is the event JSON. "
            "Reconnect with Last-Event-ID to receive what was missed. A client that falls "
            "far behind is disconnected and can resume the same way. Without an "
            "Authorization header, a dashboard session cookie is taken instead."
        ),
        session_cookie=True,
        tag="events",
    ),
]
