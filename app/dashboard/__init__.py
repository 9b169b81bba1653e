"""The operator dashboard: server-rendered pages at ``/`` and below ``/dashboard/``,
with a small stylesheet and script served by the app itself (no CDN, no build step),
kept live by the API's event stream. See docs/dashboard.md.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from app.api.routing import COOKIE_AUTH
from app.dashboard import handlers
from app.dashboard.handlers import DASHBOARD, Dashboard
from app.dashboard.oauth import CALLBACK_PATH, START_PATH
from app.dashboard.render import STATIC
from app.dashboard.sessions import ACTIONS, Sessions
from app.services import Services

STATIC_DIR = Path(__file__).parent / "static"


def is_dashboard_path(route_path: str) -> bool:
    """Whether a route belongs to the dashboard (pages, not API operations)."""
    return route_path == "/" or route_path.startswith("/dashboard/")


def install(app: web.Application, services: Services) -> None:
    """Add the dashboard's routes and let the event stream take its session cookie."""
    sessions = Sessions(services)
    app[DASHBOARD] = Dashboard(services, sessions)
    app[COOKIE_AUTH] = sessions.principal
    actions = "|".join(ACTIONS)
    router = app.router
    router.add_get("/", handlers.overview)
    router.add_get(handlers.LOGIN, handlers.login)
    router.add_post(handlers.LOGIN, handlers.login_token)
    router.add_get(START_PATH, handlers.github_start)
    router.add_get(CALLBACK_PATH, handlers.github_callback)
    router.add_post("/dashboard/logout", handlers.logout)
    router.add_get("/dashboard/rollouts/{rolloutId}", handlers.rollout)
    router.add_get(f"/dashboard/rollouts/{{rolloutId}}/{{action:{actions}}}", handlers.confirm)
    router.add_post(f"/dashboard/rollouts/{{rolloutId}}/{{action:{actions}}}", handlers.act)
    router.add_get("/dashboard/canaries/{buildId}", handlers.canary)
    router.add_get("/dashboard/sweeps/{sweepId}", handlers.sweep)
    router.add_static(STATIC, STATIC_DIR, append_version=False)
    # Last, so it takes only what nothing above does: a page, not the API's JSON 404.
    router.add_get("/dashboard/{rest:.*}", handlers.not_found)
