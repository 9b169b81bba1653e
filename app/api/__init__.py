"""The HTTP API: thin handlers over the pipeline, one module per resource."""

from app.api import (
    builds,
    canary,
    diagnostics,
    events,
    fleet,
    rollouts,
    sweeps,
    system,
    tokens,
    versions,
    webhooks,
)
from app.api.routing import RouteTable


def build_route_table() -> RouteTable:
    """Every API route, in one place; later features add their module's ROUTES here."""
    table = RouteTable()
    table.extend(system.ROUTES)
    table.extend(tokens.ROUTES)
    table.extend(events.ROUTES)
    table.extend(webhooks.ROUTES)
    table.extend(diagnostics.ROUTES)
    table.extend(versions.ROUTES)
    table.extend(builds.ROUTES)
    table.extend(canary.ROUTES)
    table.extend(fleet.ROUTES)
    table.extend(rollouts.ROUTES)
    table.extend(sweeps.ROUTES)
    return table
