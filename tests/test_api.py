"""The HTTP layer: the auth matrix derived from the route table, error bodies, OpenAPI."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from openapi_spec_validator import validate as validate_openapi

from app.api import build_route_table
from app.api.routing import PREFIX, Route, RouteTable
from app.auth import Access, Role, TokenSpec
from app.dashboard import is_dashboard_path
from tests.conftest import Api

ROUTES = build_route_table().routes
PROTECTED = [r for r in ROUTES if r.bearer]


def _concrete(route: Route) -> str:
    path = route.path if route.prefix else route.full_path
    for name in route.path_params:
        path = path.replace("{" + name + "}", "missing-thing")
    return path


async def _call(api: Api, route: Route, token: str | None) -> int:
    kwargs = {"json": {}} if route.request is not None else {}
    response, _ = await api.request(route.method, _concrete(route), token=token, **kwargs)
    status = response.status
    response.close()  # the event stream would otherwise stay open
    return status


def _id(route: Route) -> str:
    return f"{route.method} {route.path}"


@pytest.mark.parametrize("route", PROTECTED, ids=_id)
async def test_protected_route_without_token_is_401_with_a_challenge(api: Api, route: Route):
    response, body = await api.request(route.method, _concrete(route))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert body == {"error": {"code": "UNAUTHORIZED", "message": "missing bearer token"}}


@pytest.mark.parametrize("route", PROTECTED, ids=_id)
async def test_protected_route_with_unknown_revoked_or_expired_token_is_401(
    api: Api, route: Route, clock
):
    assert await _call(api, route, "upt_not-a-real-token") == 401

    revoked = await api.token("admin", name="soon-revoked")
    await api.services.tokens.revoke("soon-revoked", by="test")
    assert await _call(api, route, revoked) == 401

    (issued,) = await api.services.tokens.issue(
        [TokenSpec("short", Role.ADMIN, None, timedelta(minutes=5))], by="test"
    )
    assert await _call(api, route, issued.secret) != 401
    clock.advance(timedelta(minutes=5))
    assert await _call(api, route, issued.secret) == 401


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("route", PROTECTED, ids=_id)
async def test_each_role_reaches_exactly_the_routes_its_rule_allows(
    api: Api, route: Route, role: Role
):
    status = await _call(api, route, await api.token(role))
    if route.access.allows(role):
        assert status not in (401, 403), f"{role} should reach {_id(route)}"
    else:
        assert status == 403


@pytest.mark.parametrize("route", [r for r in ROUTES if r.access is Access.PUBLIC], ids=_id)
async def test_public_routes_need_no_token(api: Api, route: Route):
    assert await _call(api, route, None) == 200


async def test_malformed_token_header_is_401(api: Api):
    for header in ("Basic abc", "Bearer", "Bearer a b", "token"):
        response, body = await api.get("/status", headers={"Authorization": header})
        assert response.status == 401, header
        assert body["error"]["code"] == "UNAUTHORIZED"


def test_a_route_without_a_role_rule_cannot_be_registered():
    async def handler(call):  # pragma: no cover - never called
        raise AssertionError

    table = RouteTable()
    with pytest.raises(TypeError, match="must declare who may call it"):
        table.add(Route("GET", "/x", None, handler, "getX", "x", None))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        table.add(Route("GET", "/x", "admin", handler, "getX", "x", None))  # type: ignore[arg-type]


def test_a_route_cannot_be_declared_twice():
    table = RouteTable()
    route = ROUTES[0]
    table.add(route)
    with pytest.raises(ValueError, match="declared twice"):
        table.add(route)


# -- Error bodies ------------------------------------------------------------------------


async def test_malformed_json_is_400_naming_the_problem(api: Api):
    admin = await api.token("admin")
    response, body = await api.post(
        "/tokens", token=admin, data=b'{"name": "x",', headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert body["error"]["code"] == "INVALID_JSON"
    assert "line 1 column" in body["error"]["message"]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", "empty"),
        (b"\xff\xfe{}", "UTF-8"),
    ],
)
async def test_empty_or_undecodable_body_is_400(api: Api, payload: bytes, expected: str):
    admin = await api.token("admin")
    response, body = await api.post("/tokens", token=admin, data=payload)
    assert response.status == 400
    assert expected in body["error"]["message"]


async def test_body_failing_the_schema_is_400_with_its_location(api: Api):
    admin = await api.token("admin")
    response, body = await api.post("/tokens", token=admin, json={"name": "x", "role": "root"})
    assert response.status == 400
    assert body["error"]["code"] == "VALIDATION_FAILED"
    assert body["error"]["message"].startswith("body")


async def test_body_over_the_limit_is_413_whether_announced_or_chunked(api: Api):
    admin = await api.token("admin")
    big = b'{"name": "' + b"x" * 5000 + b'", "role": "admin"}'
    response, body = await api.post("/tokens", token=admin, data=big)
    assert response.status == 413
    assert body["error"]["code"] == "PAYLOAD_TOO_LARGE"

    async def chunks():
        for _ in range(10):
            yield b" " * 1000

    response, body = await api.post("/tokens", token=admin, data=chunks())
    assert response.status == 413
    assert (await api.services.tokens.list()) != []  # the admin token is still there


async def test_unknown_route_is_404_json(api: Api):
    response, body = await api.get("/api/update-pipeline/nothing-here")
    assert response.status == 404
    assert body == {
        "error": {"code": "NOT_FOUND", "message": "no route for /api/update-pipeline/nothing-here"}
    }


async def test_wrong_method_is_405_with_allow_header(api: Api):
    response, body = await api.request("PUT", "/status")
    assert response.status == 405
    assert response.headers["Allow"] == "GET"
    assert body["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_misspelt_query_parameter_is_400_naming_the_allowed_ones(api: Api):
    viewer = await api.token("viewer")
    response, body = await api.get("/events?limt=5", token=viewer)
    assert response.status == 400
    assert body["error"] == {
        "code": "INVALID_QUERY",
        "message": "unknown query parameter 'limt' (allowed: cursor, limit, type)",
    }


async def test_routes_without_query_parameters_ignore_a_query_string(api: Api):
    response, _ = await api.get("/health?_=12345")
    assert response.status == 200


async def test_unexpected_exception_is_500_with_request_id_and_no_traceback(
    api: Api, monkeypatch, caplog
):
    async def explode(**_):
        raise RuntimeError("disk on fire: secret-detail")

    monkeypatch.setattr(api.services.tokens, "list", explode)
    admin = await api.token("admin")
    with caplog.at_level(logging.ERROR):
        response, body = await api.get("/tokens", token=admin)
    assert response.status == 500
    request_id = response.headers["X-Request-Id"]
    assert body == {
        "error": {
            "code": "INTERNAL_ERROR",
            "message": "internal error; the server log has details",
            "requestId": request_id,
        }
    }
    assert "disk on fire" not in await response.text()
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None


async def test_every_response_carries_a_request_id_and_echoes_a_safe_one(api: Api):
    response, _ = await api.get("/health", headers={"X-Request-Id": "abc-123"})
    assert response.headers["X-Request-Id"] == "abc-123"
    response, _ = await api.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert response.headers["X-Request-Id"] != "bad id\twith spaces"
    assert len(response.headers["X-Request-Id"]) == 32


# -- OpenAPI -----------------------------------------------------------------------------


async def test_openapi_description_is_valid_openapi_3_1(api: Api):
    assert api.openapi["openapi"] == "3.1.0"
    validate_openapi(api.openapi)


async def test_every_registered_route_is_documented_and_nothing_else(api: Api):
    registered = {
        (route.method, route.resource.canonical)
        for route in api.client.app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        # The dashboard's HTML pages are not API operations (docs/dashboard.md).
        and not is_dashboard_path(route.resource.canonical)
    }
    documented = {
        (method.upper(), path)
        for path, operations in api.openapi["paths"].items()
        for method in operations
    }
    assert registered == documented
    # Below the prefix, GitHub's webhook route, and Prometheus' conventional /metrics.
    assert all(
        path.startswith((PREFIX, "/api/github/")) or path == "/metrics" for _, path in documented
    )


async def test_protected_operations_declare_bearer_auth_and_their_role(api: Api):
    for route in ROUTES:
        operation = api.openapi["paths"][route.full_path][route.method.lower()]
        assert operation["x-required-role"] == route.access.value
        if route.access is Access.GITHUB_SIGNATURE:
            assert operation["security"] == [{"githubSignature": []}]
        elif route.access is Access.PUBLIC:
            assert operation["security"] == []
            # Only a route that has its own optional secret (/metrics) may answer 401.
            assert "401" not in operation["responses"] or 401 in route.errors
        elif route.access is Access.ADMIN_OR_WORKFLOW:
            assert operation["security"] == [{"bearerToken": []}, {"githubActionsOidc": []}]
            assert {"401", "403"} <= set(operation["responses"])
        else:
            assert operation["security"] == [{"bearerToken": []}]
            assert {"401", "403"} <= set(operation["responses"])
