"""The one error body every response uses, and the middleware that guarantees it."""

from __future__ import annotations

import itertools
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from app.logs import get_logger
from app.store import StoreBusy

log = get_logger("api")

REQUEST_ID = web.RequestKey("request_id", str)
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Seconds a client is asked to wait when the database stayed locked past the busy timeout.
BUSY_RETRY_AFTER = 5

# Codes for statuses aiohttp raises itself (unknown route, wrong method, ...).
_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "examples": ["NOT_FOUND"]},
                "message": {"type": "string"},
                "requestId": {"type": "string", "description": "Quote it when reporting a 500."},
                "state": {
                    "type": "string",
                    "description": "A refused state change: the state the object is in now.",
                },
            },
        }
    },
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        state: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.state = state


def json_response(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode(),
        status=status,
        content_type="application/json",
    )


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    state: str | None = None,
) -> web.Response:
    error: dict[str, str] = {"code": code, "message": message}
    if request_id is not None:
        error["requestId"] = request_id
    if state is not None:
        error["state"] = state
    response = json_response({"error": error}, status=status)
    response.headers.update(headers or {})
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Unique across processes (the random half) and within one (the counter), and cheaper
# than a random id per request on the intake path.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else _new_request_id()
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(
            exc.status, exc.code, exc.message, headers=exc.headers, state=exc.state
        )
    except StoreBusy as exc:
        # Another process kept the database locked past the busy timeout: nothing was
        # written, and the same request will do once the lock is gone.
        log.warning("%s %s (request %s): %s", request.method, request.path, request_id, exc)
        response = error_response(
            503,
            "DATABASE_BUSY",
            "the database is busy (locked by another process); try again shortly",
            headers={"Retry-After": str(BUSY_RETRY_AFTER)},
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = error_response(
            exc.status, _CODES.get(exc.status, "ERROR"), _describe(exc, request), headers=headers
        )
    except Exception:
        # The log keeps the traceback; the client gets only an id to quote.
        log.exception(
            "unhandled error in %s %s (request %s)", request.method, request.path, request_id
        )
        response = error_response(
            500,
            "INTERNAL_ERROR",
            "internal error; the server log has details",
            request_id=request_id,
        )
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


def _describe(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 404:
        return f"no route for {request.path}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
    return exc.reason
