"""Token management over the API (admin): list, issue (one or many at once), revoke."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web

from app.api.errors import ApiError, json_response
from app.api.routing import Call, QueryParam, Route
from app.auth import NAME_PATTERN, Access, Role, TokenSpec, TokenSpecError, token_state
from app.clock import isoformat
from app.config import DURATION_HELP, parse_duration
from app.store import Conflict, TokenRecord

MAX_TOKENS_PER_REQUEST = 1000
MAX_LIFETIME_YEARS = 100
_DATETIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}

TOKEN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "role", "orgId", "state", "createdAt", "expiresAt", "lastUsedAt"],
    "properties": {
        "name": {"type": "string"},
        "role": {"enum": [r.value for r in Role]},
        "orgId": {"type": ["string", "null"]},
        "state": {"enum": ["active", "expired", "revoked"]},
        "createdAt": {"type": "string", "format": "date-time"},
        "expiresAt": _DATETIME_OR_NULL,
        "lastUsedAt": _DATETIME_OR_NULL,
        "revokedAt": _DATETIME_OR_NULL,
    },
}
ISSUED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [*TOKEN_SCHEMA["required"], "token"],
    "properties": {
        **TOKEN_SCHEMA["properties"],
        "token": {"type": "string", "description": "The secret. Shown only in this response."},
    },
}
TOKEN_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["name", "role"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "role": {"enum": [r.value for r in Role]},
        "orgId": {
            "type": "string",
            "minLength": 1,
            "maxLength": 128,
            "description": "The organisation a runner token reports for (runner only).",
        },
        "expiresIn": {
            "type": "string",
            "description": f"Lifetime: {DURATION_HELP}; at most {MAX_LIFETIME_YEARS} years.",
        },
    },
}
ISSUE_REQUEST: dict[str, Any] = {
    "oneOf": [
        TOKEN_REQUEST,
        {
            "type": "array",
            "items": TOKEN_REQUEST,
            "minItems": 1,
            "maxItems": MAX_TOKENS_PER_REQUEST,
        },
    ]
}


def token_json(record: TokenRecord, now: Any) -> dict[str, Any]:
    return {
        "name": record.name,
        "role": record.role,
        "orgId": record.org_id,
        "state": token_state(record, now),
        "createdAt": isoformat(record.created_at),
        "expiresAt": isoformat(record.expires_at) if record.expires_at else None,
        "lastUsedAt": isoformat(record.last_used_at) if record.last_used_at else None,
        "revokedAt": isoformat(record.revoked_at) if record.revoked_at else None,
    }


async def list_tokens(call: Call) -> web.StreamResponse:
    services = call.services
    records = await services.tokens.list(include_revoked=call.query.get("includeRevoked", False))
    now = services.clock.now()
    return json_response({"items": [token_json(r, now) for r in records]})


async def issue_tokens(call: Call) -> web.StreamResponse:
    requests = call.body if isinstance(call.body, list) else [call.body]
    try:
        specs = [_spec(item) for item in requests]
        issued = await call.services.tokens.issue(specs, by=_actor(call))
    except TokenSpecError as exc:
        raise ApiError(400, "VALIDATION_FAILED", str(exc)) from None
    except Conflict as exc:
        raise ApiError(409, "CONFLICT", str(exc)) from None
    now = call.services.clock.now()
    items = [{**token_json(t.record, now), "token": t.secret} for t in issued]
    return json_response({"items": items}, status=201)


async def revoke_token(call: Call) -> web.StreamResponse:
    record = await call.services.tokens.revoke(call.path["name"], by=_actor(call))
    if record is None:
        raise ApiError(404, "NOT_FOUND", f"no active token named {call.path['name']!r}")
    return json_response(token_json(record, call.services.clock.now()))


def _actor(call: Call) -> str:
    assert call.principal is not None  # admin-only routes are authenticated
    return f"token:{call.principal.name}"


def _spec(item: dict[str, Any]) -> TokenSpec:
    expires_in = None
    if "expiresIn" in item:
        # The bound also keeps the expiry date within what a datetime holds (year 9999).
        too_long = TokenSpecError(f"expiresIn: at most {MAX_LIFETIME_YEARS} years")
        try:
            expires_in = parse_duration(item["expiresIn"])
        except ValueError as exc:
            raise TokenSpecError(f"expiresIn: {exc}") from None
        except OverflowError:  # more days than a timedelta holds
            raise too_long from None
        if expires_in > timedelta(days=365 * MAX_LIFETIME_YEARS):
            raise too_long
    return TokenSpec(item["name"], Role(item["role"]), item.get("orgId"), expires_in)


ROUTES = [
    Route(
        "GET",
        "/tokens",
        Access.ADMIN,
        list_tokens,
        "listTokens",
        "List API tokens (never their secrets)",
        {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": TOKEN_SCHEMA}},
        },
        query=(QueryParam("includeRevoked", {"type": "boolean"}, "Include revoked tokens."),),
        tag="tokens",
    ),
    Route(
        "POST",
        "/tokens",
        Access.ADMIN,
        issue_tokens,
        "issueTokens",
        "Issue one token, or a list of them at once (all or none)",
        {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": ISSUED_SCHEMA}},
        },
        status=201,
        request=ISSUE_REQUEST,
        errors={409: "A live token already has one of the names."},
        description="The secrets appear in this response only; store them now.",
        tag="tokens",
    ),
    Route(
        "DELETE",
        "/tokens/{name}",
        Access.ADMIN,
        revoke_token,
        "revokeToken",
        "Revoke the live token with this name",
        TOKEN_SCHEMA,
        errors={404: "No live token has this name."},
        tag="tokens",
    ),
]
