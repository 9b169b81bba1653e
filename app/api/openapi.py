"""The OpenAPI 3.1 description, generated from the route table and nothing else."""

from __future__ import annotations

from typing import Any

from app import __version__
from app.api.errors import ERROR_SCHEMA
from app.api.routing import JSON, Route, RouteTable, statuses
from app.auth import Access

_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def build_openapi(table: RouteTable) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in table.routes:
        paths.setdefault(route.full_path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "update-pipeline",
            "version": __version__,
            "description": (
                "Version watching, canaries, staged rollouts and post-update sweeps for "
                "AI coding-agent runtimes. Errors always use the Error body."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {
                "bearerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token from `update-pipeline token create` or "
                    "`POST /api/update-pipeline/tokens`.",
                },
                "githubActionsOidc": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A GitHub Actions OIDC token of the trusted workflow "
                    "(see action.yml), for the routes that also take one.",
                },
                "githubSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Hub-Signature-256",
                    "description": "sha256=<HMAC-SHA256 of the body with GITHUB_WEBHOOK_SECRET>",
                },
            },
        },
    }


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
        "x-required-role": route.access.value,
        "responses": {},
    }
    if route.description:
        operation["description"] = route.description
    if route.access is Access.GITHUB_SIGNATURE:
        operation["security"] = [{"githubSignature": []}]
    elif route.access is Access.ADMIN_OR_WORKFLOW:
        operation["security"] = [{"bearerToken": []}, {"githubActionsOidc": []}]
    else:
        operation["security"] = [{"bearerToken": []}] if route.bearer else []
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.path_params
    ]
    parameters += [
        {
            "name": q.name,
            "in": "query",
            "required": q.required,
            "description": q.description,
            "schema": dict(q.schema),
            **({"explode": True} if q.schema.get("type") == "array" else {}),
        }
        for q in route.query
    ]
    if parameters:
        operation["parameters"] = parameters
    if route.request is not None:
        operation["requestBody"] = {
            "required": not route.body_optional,
            "content": {JSON: {"schema": dict(route.request)}},
        }
    for status, description in sorted(statuses(route).items()):
        response: dict[str, Any] = {"description": description}
        if status == route.status:
            if route.response is not None:
                response["content"] = {route.content_type: {"schema": dict(route.response)}}
        elif status in route.also:
            response["content"] = {JSON: {"schema": dict(route.also[status][1])}}
        else:
            response["content"] = {JSON: {"schema": _ERROR_REF}}
        operation["responses"][str(status)] = response
    return operation
