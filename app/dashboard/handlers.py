"""The dashboard's HTTP handlers: thin layers over the domain, like the API's.

Every page needs a session (none: to the sign-in page) with the right to look (else a
403 page). The rollout buttons lead to a confirmation page whose form posts back with
the session's CSRF token; the post is checked for its Origin, its token and the
person's right again, then calls the same ``RolloutController`` method as the API and
the slash commands, recorded with the person as actor.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from app.auth import TOKEN_PREFIX, AuthError, Role
from app.dashboard import oauth, views
from app.dashboard.render import Chrome, esc, page, path
from app.dashboard.sessions import VIEW, Sessions, Viewer, is_loopback, same_origin
from app.github.commands import Permission
from app.logs import get_logger
from app.pipeline.canary.service import CanaryError
from app.pipeline.events import sse_name
from app.rollouts.controller import MAX_REASON, RolloutError
from app.services import Services
from app.store import StaleRollout
from app.sweeps.service import SweepError

log = get_logger("dashboard")

LOGIN = "/dashboard/login"
MAX_FORM_BYTES = 8192
# What makes a page fetch itself again: every change the overview or a detail page shows.
LIVE_EVENTS = tuple(
    sse_name(t)
    for t in (
        "rollout_initiated",
        "rollout_stage_advanced",
        "rollout_paused",
        "rollout_resumed",
        "rollout_org_approved",
        "rollout_org_skipped",
        "rollout_org_withdrawn",
        "rollout_completed",
        "rollback_initiated",
        "pipeline_frozen",
        "pipeline_unfrozen",
        "canary_started",
        "canary_completed",
        "channel_updated",
        "new_version_detected",
        "sweep_started",
        "sweep_completed",
        "pipeline_started",
        "pipeline_stopped",
    )
)


@dataclass(frozen=True, slots=True)
class Dashboard:
    services: Services
    sessions: Sessions


DASHBOARD = web.AppKey("dashboard", Dashboard)
Handler = Callable[[web.Request, Dashboard, Viewer], Awaitable[web.StreamResponse]]


def chrome(viewer: Viewer | None, *, live: bool = False) -> Chrome:
    if viewer is None:
        return Chrome(None, None)
    return Chrome(viewer.who, viewer.csrf, LIVE_EVENTS if live else ())


def safe_next(value: str | None) -> str:
    """A path on this service to return to after sign-in; anything else (another host,
    a scheme, a protocol-relative or backslashed path) becomes the overview."""
    if not value or not value.startswith("/") or value.startswith("//"):
        return "/"
    if "\\" in value or re.search(r"[\x00-\x20\x7f]", value):
        return "/"
    return value


def login_redirect(request: web.Request) -> web.HTTPSeeOther:
    target = request.path_qs if request.method == "GET" else "/"
    return web.HTTPSeeOther(f"{LOGIN}?{URL.build(query={'next': target}).query_string}")


def message_page(
    title: str, text: str, viewer: Viewer | None, status: int, *, back: str = "/"
) -> web.Response:
    body = (
        f"<h1>{esc(title)}</h1><p>{esc(text)}</p>"
        f'<p><a href="{esc(back)}">Back to {"the overview" if back == "/" else "the page"}</a></p>'
    )
    return page(title, body, chrome(viewer), status=status)


def forbidden(dash: Dashboard, viewer: Viewer, ability: str) -> web.Response:
    if viewer.session.kind == "github":
        need = f"{dash.sessions.needs(ability)} on {dash.services.settings.control_repo}"
    else:
        need = "an admin token"
    what = "view the dashboard" if ability == VIEW else f"{ability} rollouts"
    return message_page(
        "Not allowed",
        f"You are signed in as {viewer.who} with {viewer.standing}. To {what} you need {need}.",
        viewer,
        403,
    )


def guarded(
    ability: str,
) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """A handler for signed-in people with ``ability``: others are sent to sign in, or
    get the 403 page."""

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def endpoint(request: web.Request) -> web.StreamResponse:
            dash = request.app[DASHBOARD]
            viewer = await dash.sessions.current(request)
            if viewer is None:
                raise login_redirect(request)
            if not viewer.may(ability):
                return forbidden(dash, viewer, ability)
            return await handler(request, dash, viewer)

        endpoint.__name__ = handler.__name__
        return endpoint

    return wrap


# -- pages ------------------------------------------------------------------------------------


@guarded(VIEW)
async def overview(request: web.Request, dash: Dashboard, viewer: Viewer) -> web.StreamResponse:
    body = await views.overview(dash.services)
    return page("Overview", body, chrome(viewer, live=True))


@guarded(VIEW)
async def rollout(request: web.Request, dash: Dashboard, viewer: Viewer) -> web.StreamResponse:
    rollout_id = request.match_info["rolloutId"]
    try:
        view = await dash.services.rollouts.view(rollout_id)
    except RolloutError:
        return message_page("Not found", f"No rollout {rollout_id}.", viewer, 404)
    body = await views.rollout(dash.services, view, viewer)
    return page(f"Rollout {rollout_id}", body, chrome(viewer, live=True))


@guarded(VIEW)
async def canary(request: web.Request, dash: Dashboard, viewer: Viewer) -> web.StreamResponse:
    build_id = request.match_info["buildId"]
    try:
        build, run = await dash.services.canary.build(build_id)
    except CanaryError:
        return message_page("Not found", f"No build {build_id}.", viewer, 404)
    body = await views.canary(dash.services, build, run)
    return page(f"Canary of {build_id}", body, chrome(viewer, live=True))


@guarded(VIEW)
async def sweep(request: web.Request, dash: Dashboard, viewer: Viewer) -> web.StreamResponse:
    sweep_id = request.match_info["sweepId"]
    try:
        view = await dash.services.sweeps.view(sweep_id)
    except SweepError:
        return message_page("Not found", f"No sweep {sweep_id}.", viewer, 404)
    return page(f"Sweep {sweep_id}", views.sweep(dash.services, view), chrome(viewer, live=True))


# -- rollout buttons ----------------------------------------------------------------------------

ASKS = {
    "pause": "Pause this rollout? No organisation joins while it is paused; those included"
    " stay on the build, and a failing build is still rolled back automatically.",
    "resume": "Resume this rollout? Its stage's clock goes on from where it stopped.",
    "advance": "Move this rollout to its next stage now, whatever the clock and the gate say?",
    "rollback": "Roll this rollout back? Every included organisation goes back to the build"
    " it ran before.",
}


def confirm_page(
    viewer: Viewer, r_id: str, action: str, *, error: str | None = None, reason: str = ""
) -> web.Response:
    needs_reason = action == "rollback"
    field = ""
    if action in ("pause", "rollback"):
        required = " required" if needs_reason else ""
        label = "Reason (required)" if needs_reason else "Reason (optional)"
        field = (
            f'<p><label for="reason">{label}</label>'
            f'<textarea id="reason" name="reason" rows="3" maxlength="{MAX_REASON}"{required}>'
            f"{esc(reason)}</textarea></p>"
        )
    alert = f'<p class="alert" role="alert">{esc(error)}</p>' if error else ""
    back = path("rollouts", r_id)
    body = (
        f"<h1>{esc(views.LABELS[action])}: rollout <code>{esc(r_id)}</code></h1>{alert}"
        f"<p>{esc(ASKS[action])}</p>"
        f'<form method="post" action="{path("rollouts", r_id, action)}" class="confirm">'
        f'<input type="hidden" name="csrf" value="{esc(viewer.csrf)}">{field}'
        f'<p><button type="submit" class="button button-{action}">'
        f"Yes, {esc(views.LABELS[action].lower())}</button> "
        f'<a href="{back}">Cancel</a></p></form>'
    )
    return page(
        f"{views.LABELS[action]} {r_id}", body, chrome(viewer), status=400 if error else 200
    )


async def confirm(request: web.Request) -> web.StreamResponse:
    action = request.match_info["action"]

    @guarded(action)
    async def show(request: web.Request, dash: Dashboard, viewer: Viewer) -> web.StreamResponse:
        r_id = request.match_info["rolloutId"]
        if await dash.services.store.get_rollout(r_id) is None:
            return message_page("Not found", f"No rollout {r_id}.", viewer, 404)
        return confirm_page(viewer, r_id, action)

    return await show(request)


async def read_form(request: web.Request) -> dict[str, str]:
    if request.content_length is None or request.content_length > MAX_FORM_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_FORM_BYTES, request.content_length or 0)
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def act(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASHBOARD]
    action = request.match_info["action"]
    r_id = request.match_info["rolloutId"]
    viewer = await dash.sessions.current(request)
    if viewer is None:
        raise login_redirect(request)
    if not same_origin(request, dash.services.settings.public_url):
        return message_page(
            "Refused", "This request did not come from this dashboard.", viewer, 403
        )
    form = await read_form(request)
    if not viewer.csrf_ok(form.get("csrf")):
        return message_page(
            "Refused", "The form was stale or forged; open the page again.", viewer, 403
        )
    if not viewer.may(action):
        return forbidden(dash, viewer, action)
    reason = form.get("reason", "").strip()
    if action == "rollback" and not reason:
        return confirm_page(viewer, r_id, action, error="A rollback needs a reason.")
    controller, by = dash.services.rollouts, viewer.actor
    try:
        if action == "pause":
            await controller.pause(r_id, by=by, reason=reason or None)
        elif action == "resume":
            await controller.resume(r_id, by=by)
        elif action == "advance":
            await controller.advance(r_id, by=by)
        else:
            await controller.rollback(r_id, by=by, reason=reason)
    except RolloutError as exc:
        status = 404 if exc.status == 404 else 409
        return message_page("Not done", str(exc), viewer, status, back=path("rollouts", r_id))
    except StaleRollout as exc:
        return message_page(
            "Not done", f"{exc}; try again", viewer, 409, back=path("rollouts", r_id)
        )
    log.info("dashboard: %s %s rollout %s", by, action, r_id)
    raise web.HTTPSeeOther(path("rollouts", r_id))


# -- signing in and out -----------------------------------------------------------------------


def login_page(
    request: web.Request, dash: Dashboard, *, error: str | None = None, status: int = 200
) -> web.Response:
    settings = dash.services.settings
    next_path = safe_next(request.query.get("next"))
    parts = ["<h1>Sign in</h1>"]
    if error:
        parts.append(f'<p class="alert" role="alert">{esc(error)}</p>')
    insecure = (
        not (settings.public_url or "").startswith("https://")
        and not request.secure
        and not is_loopback(request.host.rsplit(":", 1)[0])
    )
    if insecure:
        parts.append(
            '<p class="alert" role="note">This page was reached over plain http: browsers keep'
            " the sign-in cookie (marked Secure) only over https or on localhost. Serve the"
            " dashboard behind TLS.</p>"
        )
    if oauth.available(dash.services):
        start = f"{oauth.START_PATH}?{URL.build(query={'next': next_path}).query_string}"
        parts.append(
            f'<p><a class="button" href="{esc(start)}">Sign in with GitHub</a></p>'
            f"<p>Your permission on <code>{esc(settings.control_repo)}</code> decides what you"
            " may see and do, as for the slash commands.</p>"
        )
    parts.append(
        f'<form method="post" action="{LOGIN}" class="login">'
        f'<input type="hidden" name="next" value="{esc(next_path)}">'
        '<p><label for="token">API token</label>'
        '<input id="token" name="token" type="password" autocomplete="off" required'
        ' spellcheck="false"></p>'
        '<p class="hint">A viewer token lets you look; an admin token also lets you pause,'
        " resume, advance and roll back.</p>"
        '<p><button type="submit">Sign in with a token</button></p></form>'
    )
    return page("Sign in", "".join(parts), Chrome(None, None), status=status)


async def login(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASHBOARD]
    if await dash.sessions.current(request) is not None:
        raise web.HTTPSeeOther(safe_next(request.query.get("next")))
    return login_page(request, dash)


async def login_token(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASHBOARD]
    if not same_origin(request, dash.services.settings.public_url):
        return login_page(request, dash, error="This form did not come from this page.", status=403)
    form = await read_form(request)
    token = form.get("token", "").strip()
    if not token.startswith(TOKEN_PREFIX):
        return login_page(request, dash, error="That is not an API token.", status=401)
    try:
        principal = await dash.services.tokens.authenticate(token)
    except AuthError as exc:
        return login_page(request, dash, error=f"Not signed in: {exc}.", status=401)
    if principal.role not in (Role.ADMIN, Role.VIEWER):
        return login_page(
            request, dash, error="Runner tokens cannot sign in to the dashboard.", status=403
        )
    secret = await dash.sessions.create(
        "token", principal.name, principal.role.value, principal.token_id
    )
    redirect = web.HTTPSeeOther(safe_next(form.get("next")))
    dash.sessions.set_cookie(redirect, secret)
    raise redirect


async def github_start(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASHBOARD]
    if not oauth.available(dash.services):
        return login_page(request, dash, error="Signing in with GitHub is not set up.", status=404)
    raise oauth.start(request, dash.services, safe_next(request.query.get("next")))


async def github_callback(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASHBOARD]
    if not oauth.available(dash.services):
        return login_page(request, dash, error="Signing in with GitHub is not set up.", status=404)
    try:
        user = await oauth.finish(request, dash.services)
    except oauth.SignInRefused as exc:
        response = login_page(request, dash, error=str(exc), status=exc.status)
        response.del_cookie(oauth.STATE_COOKIE, path=oauth.START_PATH)
        return response
    permission = await dash.sessions.github_permission(user.login, Permission.NONE)
    secret = await dash.sessions.create("github", user.login, str(permission))
    redirect = web.HTTPSeeOther(safe_next(user.next_path))
    redirect.del_cookie(oauth.STATE_COOKIE, path=oauth.START_PATH)
    dash.sessions.set_cookie(redirect, secret)
    raise redirect


async def logout(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASHBOARD]
    viewer = await dash.sessions.current(request)
    if viewer is None:
        raise web.HTTPSeeOther(LOGIN)
    if not same_origin(request, dash.services.settings.public_url):
        return message_page(
            "Refused", "This request did not come from this dashboard.", viewer, 403
        )
    form = await read_form(request)
    if not viewer.csrf_ok(form.get("csrf")):
        return message_page("Refused", "The form was stale or forged.", viewer, 403)
    await dash.sessions.end(viewer)
    redirect = web.HTTPSeeOther(LOGIN)
    dash.sessions.clear_cookie(redirect)
    raise redirect


@guarded(VIEW)
async def not_found(request: web.Request, dash: Dashboard, viewer: Viewer) -> web.StreamResponse:
    return message_page("Not found", "No page has this address.", viewer, 404)
