"""The route table: each route declared once; auth, validation and OpenAPI derive from it."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fastjsonschema
from aiohttp import web
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from app.api.errors import ApiError
from app.auth import TOKEN_PREFIX, Access, AuthError, Principal
from app.services import Services

PREFIX = "/api/update-pipeline"
SERVICES = web.AppKey("services", Services)
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
_PATH_PARAM = re.compile(r"\{(\w+)\}")
_BEARER = re.compile(r"^Bearer\s+(\S+)\s*$", re.IGNORECASE)
# Request bodies are at most three levels deep; JSON nested much deeper than that can only
# be meant to exhaust the stack of the parser or of the schema validators (a 500).
MAX_JSON_DEPTH = 32


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    schema: Mapping[str, Any]
    description: str
    required: bool = False


@dataclass(slots=True)
class Call:
    """What a handler gets: the request already authenticated, parsed and validated."""

    request: web.Request
    services: Services
    principal: Principal | None
    path: dict[str, str]
    query: dict[str, Any]
    body: Any
    # ADMIN_OR_WORKFLOW routes: who a workflow's token proved to be (principal is None
    # then), as the route's workflow_auth said.
    workflow: str | None = None


Handler = Callable[[Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # below PREFIX, with {name} placeholders
    access: Access
    handler: Handler
    operation_id: str
    summary: str
    response: Mapping[str, Any] | None  # schema of the success body (None: no body)
    status: int = 200
    request: Mapping[str, Any] | None = None
    # The body may be left out (an empty body then reads as {}).
    body_optional: bool = False
    query: tuple[QueryParam, ...] = ()
    errors: Mapping[int, str] = field(default_factory=dict)  # statuses beyond the automatic
    content_type: str = JSON
    description: str = ""
    tag: str = "pipeline"
    # Other non-error answers: status -> (description, body schema).
    also: Mapping[int, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)
    prefix: str = PREFIX
    # ADMIN_OR_WORKFLOW routes: checks a workflow's token (with the path's parameters)
    # before the body is read and returns who it proved to be (raising ApiError when it
    # proves nothing).
    workflow_auth: Callable[[Services, str, Mapping[str, str]], Awaitable[str]] | None = None
    # Also taken without a bearer token: the dashboard's session cookie (through
    # COOKIE_AUTH), for what a browser's EventSource reads, as it cannot send a header.
    session_cookie: bool = False

    @property
    def full_path(self) -> str:
        return self.prefix + self.path

    @property
    def bearer(self) -> bool:
        return self.access not in (Access.PUBLIC, Access.GITHUB_SIGNATURE)

    @property
    def path_params(self) -> list[str]:
        return _PATH_PARAM.findall(self.path)


class RouteTable:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, route: Route) -> Route:
        if not isinstance(route.access, Access):
            raise TypeError(f"route {route.method} {route.path} must declare who may call it")
        if any((r.method, r.path) == (route.method, route.path) for r in self.routes):
            raise ValueError(f"route {route.method} {route.path} is declared twice")
        if any(r.operation_id == route.operation_id for r in self.routes):
            raise ValueError(f"operation id {route.operation_id} is used twice")
        self.routes.append(route)
        return route

    def extend(self, routes: list[Route]) -> None:
        for route in routes:
            self.add(route)

    def install(self, app: web.Application) -> None:
        for route in self.routes:
            # aiohttp's own pattern for {name} leaves out "{" and "}", so an id holding one
            # would meet an undocumented 404 instead of its route's own answer.
            path = _PATH_PARAM.sub(r"{\1:[^/]+}", route.full_path)
            app.router.add_route(route.method, path, _endpoint(route))


def statuses(route: Route) -> dict[int, str]:
    """Every status a route can answer with, derived from what it declares."""
    found = {route.status: "Success."}
    # Path parameters alone are not validated here (an unknown id is a 404): a route that
    # refuses one with a 400 declares it in its errors.
    if route.request is not None or route.query:
        found[400] = "The request is malformed or fails validation."
    if route.bearer:
        found[401] = "No valid bearer token (missing, unknown, revoked or expired)."
        found[403] = f"The token's role may not call this route (needs {route.access.value})."
    for status, (description, _) in route.also.items():
        found[status] = description
    if route.request is not None:
        found[413] = "The body is larger than UPDATE_PIPELINE_MAX_BODY_BYTES."
    found.update(route.errors)
    # Any route may meet the database locked by another process for longer than the busy
    # timeout (a token's first use in a while writes too).
    found[503] = f"{found[503]} {DATABASE_BUSY}" if 503 in found else DATABASE_BUSY
    found[500] = "Unexpected server error; the body carries a request id."
    return found


DATABASE_BUSY = (
    "The database stayed locked by another process past the busy timeout"
    " (DATABASE_BUSY, with Retry-After); nothing was changed."
)


def _endpoint(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    body_validator = Draft202012Validator(route.request) if route.request is not None else None
    # The same schema compiled to Python code: about twenty times faster, so a valid body
    # (the common case, heartbeats above all) costs microseconds. jsonschema has the last
    # word on anything the fast check refuses, and says what is wrong with it.
    fast_check = fastjsonschema.compile(dict(route.request)) if route.request is not None else None
    query_validators = {q.name: Draft202012Validator(q.schema) for q in route.query}

    async def endpoint(request: web.Request) -> web.StreamResponse:
        services = request.app[SERVICES]
        principal = None
        workflow = None
        if route.access is Access.ADMIN_OR_WORKFLOW:
            bearer = _bearer(request)
            if bearer.startswith(TOKEN_PREFIX):
                principal = await _authenticate(request, services)
            elif route.workflow_auth is None:
                raise ApiError(401, "UNAUTHORIZED", "an API token is required", headers=CHALLENGE)
            else:
                # Before the body is read: an unproven caller costs no parsing.
                workflow = await route.workflow_auth(services, bearer, request.match_info)
        elif route.bearer:
            cookie_auth = request.app.get(COOKIE_AUTH)
            if route.session_cookie and cookie_auth is not None and not _has_bearer(request):
                principal = await cookie_auth(request)
            if principal is None:
                principal = await _authenticate(request, services)
        if principal is not None and not route.access.allows(principal.role):
            raise ApiError(
                403,
                "FORBIDDEN",
                f"a {principal.role.value} token may not call {route.method} {route.path}",
            )
        query = _parse_query(route, request, query_validators)
        body = None
        if body_validator is not None:
            body = await read_json(
                request, services.settings.max_body_bytes, optional=route.body_optional
            )
            if not _passes(fast_check, body):
                _validate(body_validator, body, "body")
        call = Call(request, services, principal, dict(request.match_info), query, body, workflow)
        return await route.handler(call)

    endpoint.__name__ = route.operation_id
    return endpoint


CHALLENGE = {"WWW-Authenticate": 'Bearer realm="update-pipeline"'}
# Who a request's session cookie signs in (None: no session), or an ApiError.
CookieAuth = Callable[[web.Request], Awaitable[Principal | None]]
COOKIE_AUTH: web.AppKey[CookieAuth] = web.AppKey("cookie_auth")


def _has_bearer(request: web.Request) -> bool:
    return "Authorization" in request.headers


def _bearer(request: web.Request) -> str:
    match = _BEARER.match(request.headers.get("Authorization", ""))
    if not match:
        raise ApiError(401, "UNAUTHORIZED", "missing bearer token", headers=CHALLENGE)
    return match[1]


async def _authenticate(request: web.Request, services: Services) -> Principal:
    token = _bearer(request)
    try:
        return await services.tokens.authenticate(token)
    except AuthError as exc:
        raise ApiError(401, "UNAUTHORIZED", str(exc), headers=CHALLENGE) from None


async def read_body(request: web.Request, limit: int, *, what: str = "request body") -> bytes:
    """The whole body, or 413 as soon as it is known to exceed ``limit`` (announced or
    streamed), so an oversized body is never held in memory."""
    too_large = ApiError(413, "PAYLOAD_TOO_LARGE", f"{what} is larger than {limit} bytes")
    if request.content_length is not None:
        if request.content_length > limit:
            raise too_large
        # The length is announced and allowed: aiohttp stops at it, no chunk loop needed.
        return await request.read()
    data = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)


def page_params(cursor_length: int) -> tuple[QueryParam, QueryParam]:
    """``limit`` and ``cursor``, the same on every paged list."""
    return (
        QueryParam(
            "limit", {"type": "integer", "minimum": 1, "maximum": 500}, "Page size (default 50)."
        ),
        QueryParam(
            "cursor",
            {"type": "string", "maxLength": cursor_length},
            "The nextCursor of the previous page.",
        ),
    )


async def read_json(request: web.Request, limit: int, *, optional: bool = False) -> Any:
    data = await read_body(request, limit)
    if optional and not data.strip():
        return {}
    if not data.strip():
        raise ApiError(400, "INVALID_JSON", "request body is empty; a JSON document is expected")
    try:
        # JSON on the wire is UTF-8 (RFC 8259); json.loads would guess other encodings.
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "INVALID_JSON", "request body is not UTF-8 text") from None
    too_deep = ApiError(
        400, "INVALID_JSON", f"the JSON nests more than {MAX_JSON_DEPTH} levels deep"
    )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            "INVALID_JSON",
            f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
        ) from None
    except RecursionError:  # the parser's own limit, far deeper than ours
        raise too_deep from None
    except ValueError:  # an integer longer than int() converts (4,300 digits)
        raise ApiError(400, "INVALID_JSON", "the JSON has a number too long to read") from None
    # Counting brackets is cheap and clears almost every body (a heartbeat has three);
    # only a body with more of them is walked.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise too_deep
    # Only a \ud800 to \udfff escape puts half of a UTF-16 pair in a string; no character
    # is one, so it could be neither stored nor served as UTF-8 (a 500 either way).
    if _SURROGATE_ESCAPE.search(text) and (where := _lone_surrogate(value)) is not None:
        raise ApiError(
            400, "INVALID_JSON", f"{where}: escapes a lone UTF-16 surrogate, which is no character"
        )
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> str | None:
    """Where in a parsed body a string, or an object's key, holds a lone surrogate."""
    stack: list[tuple[Any, str]] = [(value, "body")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where
        elif isinstance(item, dict):
            for key, inner in item.items():
                if _SURROGATE.search(key):
                    return f"{where} (one of its keys)"
                stack.append((inner, f"{where}.{key}"))
        elif isinstance(item, list):
            stack.extend((inner, f"{where}[{index}]") for index, inner in enumerate(item))
    return None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` has more than ``limit`` levels of lists and objects (without
    recursion: the point is to refuse what would exhaust the validators' stack)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _parse_query(
    route: Route, request: web.Request, validators: Mapping[str, Draft202012Validator]
) -> dict[str, Any]:
    if not route.query:
        return {}  # nothing to misspell; cache-busting query strings are harmless
    known = {q.name for q in route.query}
    unknown = sorted(set(request.query) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ApiError(
            400, "INVALID_QUERY", f"unknown query parameter {unknown[0]!r} (allowed: {allowed})"
        )
    values: dict[str, Any] = {}
    for param in route.query:
        raw = request.query.getall(param.name, [])
        if not raw:
            if param.required:
                raise ApiError(400, "INVALID_QUERY", f"query parameter {param.name!r} is required")
            continue
        value: Any = raw if param.schema.get("type") == "array" else raw[-1]
        value = _coerce(value, param.schema)
        _validate(validators[param.name], value, f"query parameter {param.name!r}")
        values[param.name] = value
    return values


def _coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    kind = schema.get("type")
    if isinstance(value, list):
        items = schema.get("items", {})
        return [_coerce(v, items) for v in value]
    if kind == "integer" and re.fullmatch(r"-?[0-9]{1,18}", value):
        return int(value)
    if kind == "boolean" and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    return value


def _passes(check: Callable[[Any], Any] | None, value: Any) -> bool:
    if check is None:
        return False
    try:
        check(value)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def _validate(validator: Draft202012Validator, value: Any, where: str) -> None:
    error: ValidationError | None = best_match(validator.iter_errors(value))
    if error is None:
        return
    location = where + _path(error.absolute_path)
    message = _message(error)
    message = message if len(message) <= 300 else message[:297] + "..."
    raise ApiError(400, "VALIDATION_FAILED", f"{location}: {message}")


def _path(parts: Iterable[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _message(error: ValidationError) -> str:
    """jsonschema's message, but for a oneOf or anyOf that fails as a whole: its own says
    only that the value fits none (or more than one) of its forms, naming no field; this
    says what each form lacks."""
    if error.validator not in ("oneOf", "anyOf"):
        return error.message
    if not error.context:  # a oneOf that more than one form fits
        alternatives: list[Any] = list(error.validator_value)  # type: ignore[arg-type]
        fitting = ", ".join(repr(form) for form in alternatives)
        return f"fits more than one of the forms it may take ({fitting}); give exactly one"
    forms: dict[Any, list[str]] = {}
    for problem in error.context:
        where = _path(problem.relative_path).removeprefix(".")
        said = f"{where}: {problem.message}" if where else problem.message
        forms.setdefault(problem.relative_schema_path[0], []).append(said)
    return "; or ".join(" and ".join(problems) for problems in forms.values())


OPENAPI = web.AppKey("openapi", dict)
