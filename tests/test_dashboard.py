"""The operator dashboard, server side: sign-in (API token and GitHub against the fake's
web endpoints), sessions and their cookie, access control, CSRF, the rollout buttons,
the event stream with a cookie, escaping, and pages showing real data."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from app.config import Secret, Settings
from app.store import Sweep, SweepRun
from tests.conftest import START, Api, MakeApi
from tests.fake_github import FakeGitHub
from tests.test_rollouts import NEW, Fleet, on_channel, start
from tests.test_webhooks import wait_until

ORGS = [f"org-{n:02d}" for n in range(10)]
CONTROL = "acme/control"
NASTY = '<script>alert("x")</script> & <b>bold</b>'
ESCAPED = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"


class Browser:
    """Plays a browser against the app: keeps the session cookie by hand (aiohttp's jar
    would not send a Secure cookie over http), sends this origin on posts."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.cookies: dict[str, str] = {}
        self.origin = str(api.client.make_url("")).rstrip("/")

    def keep(self, response: aiohttp.ClientResponse) -> None:
        for header in response.headers.getall("Set-Cookie", []):
            cookie = SimpleCookie(header)
            for name, morsel in cookie.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return headers

    async def get(self, path: str, **extra: str) -> tuple[aiohttp.ClientResponse, str]:
        response = await self.api.client.get(
            path, headers=self._headers(extra), allow_redirects=False
        )
        self.keep(response)
        return response, await response.text()

    async def post(
        self, path: str, form: dict[str, str], *, origin: str | None = "", **extra: str
    ) -> tuple[aiohttp.ClientResponse, str]:
        headers = self._headers(extra)
        if origin is not None:
            headers["Origin"] = origin or self.origin
        response = await self.api.client.post(
            path, data=form, headers=headers, allow_redirects=False
        )
        self.keep(response)
        return response, await response.text()

    async def sign_in(self, token: str) -> None:
        response, _ = await self.post("/dashboard/login", {"token": token, "next": "/"})
        assert response.status == 303, await response.text()

    async def csrf(self, path: str = "/") -> str:
        _, text = await self.get(path)
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', text)
        assert found, text
        return found[1]


def visible(html: str) -> str:
    """The page's text without tags, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(stages_stable="10%:1h,50%:1h,100%", min_session_count=20)


@pytest.fixture
async def rollout(api: Api) -> tuple[str, str, Fleet]:
    """An admin token (named ops), and a rollout of build-new on stable at its first
    stage, with some sessions counted."""
    admin, fleet = await on_channel(api, ORGS)
    body = await start(api, admin)
    await fleet.everyone(ORGS)  # the included org learns its new build
    await fleet.sessions(ORGS, 200, failed=0.05)
    return admin, body["rolloutId"], fleet


# -- access control and sign-in --------------------------------------------------------------


async def test_without_a_session_every_page_leads_to_the_sign_in_page(api: Api):
    browser = Browser(api)
    for path in ("/", "/dashboard/rollouts/r-1", "/dashboard/canaries/b", "/dashboard/sweeps/s"):
        response, _ = await browser.get(path)
        assert response.status == 303
        target = urlsplit(response.headers["Location"])
        assert target.path == "/dashboard/login"
        assert parse_qs(target.query)["next"] == [path]
    response, text = await browser.get("/dashboard/login?next=/dashboard/rollouts/r-1")
    assert response.status == 200
    assert 'name="token"' in text and "Sign in with GitHub" not in text
    assert 'value="/dashboard/rollouts/r-1"' in text
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    # A sign-in form cannot be made to send anyone elsewhere afterwards.
    _, text = await browser.get("/dashboard/login?next=//evil.example/x")
    assert 'name="next" value="/"' in text


async def test_a_token_signs_in_with_a_secure_http_only_cookie_kept_as_a_hash(api: Api):
    viewer = await api.token("viewer", name="watcher")
    browser = Browser(api)
    response, _ = await browser.post("/dashboard/login", {"token": viewer, "next": "/x?y=1"})
    assert response.status == 303 and response.headers["Location"] == "/x?y=1"
    header = response.headers["Set-Cookie"]
    assert header.startswith("up_session=")
    flags = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert {"httponly", "secure", "samesite", "path", "max-age"} <= flags
    assert "SameSite=Lax" in header and "Path=/" in header
    secret = browser.cookies["up_session"]
    with sqlite3.connect(api.services.settings.db_path) as db:
        stored = db.execute("SELECT id_hash, kind, login, level FROM dashboard_sessions").fetchall()
    assert stored == [(hashlib.sha256(secret.encode()).hexdigest(), "token", "watcher", "viewer")]
    response, text = await browser.get("/")
    assert response.status == 200
    assert "<h1>Overview</h1>" in text and "watcher (token)" in text
    assert response.headers["Cache-Control"] == "no-store"


async def test_tokens_that_cannot_sign_in_are_refused_and_revoking_ends_the_session(api: Api):
    browser = Browser(api)
    response, text = await browser.post("/dashboard/login", {"token": "upt_nonsense"})
    assert response.status == 401 and "unknown token" in text
    runner = await api.token("runner", org="org-1")
    response, text = await browser.post("/dashboard/login", {"token": runner})
    assert response.status == 403 and "Runner tokens cannot sign in" in text
    assert "up_session" not in browser.cookies
    viewer = await api.token("viewer", name="short-lived")
    await browser.sign_in(viewer)
    assert (await browser.get("/"))[0].status == 200
    await api.services.tokens.revoke("short-lived", by="test")
    assert (await browser.get("/"))[0].status == 303


async def test_a_viewer_sees_but_may_not_act_and_gets_403_pages(api: Api, rollout: Any):
    _, rollout_id, _ = rollout
    browser = Browser(api)
    await browser.sign_in(await api.token("viewer"))
    response, text = await browser.get(f"/dashboard/rollouts/{rollout_id}")
    assert response.status == 200
    assert "Pause…" not in text and "Roll back…" not in text
    response, text = await browser.get(f"/dashboard/rollouts/{rollout_id}/pause")
    assert response.status == 403 and "Not allowed" in text and "an admin token" in text
    csrf = await browser.csrf()
    response, _ = await browser.post(f"/dashboard/rollouts/{rollout_id}/pause", {"csrf": csrf})
    assert response.status == 403
    assert (await api.services.store.get_rollout(rollout_id)).state == "rolling_out"


async def test_unknown_objects_are_404_pages(api: Api):
    browser = Browser(api)
    await browser.sign_in(await api.token("admin"))
    for path in (
        "/dashboard/rollouts/nope",
        "/dashboard/canaries/nope",
        "/dashboard/sweeps/nope",
        "/dashboard/rollouts/nope/pause",
        "/dashboard/no/such/page",
    ):
        response, text = await browser.get(path)
        assert response.status == 404, path
        assert "<h1>Not found</h1>" in text and response.content_type == "text/html"


# -- the buttons -----------------------------------------------------------------------------


async def test_buttons_call_the_controller_with_the_signed_in_actor(api: Api, rollout: Any):
    _, rollout_id, _ = rollout
    browser = Browser(api)
    await browser.sign_in(await api.token("admin", name="alice-admin"))
    page = f"/dashboard/rollouts/{rollout_id}"
    _, text = await browser.get(page)
    assert "Pause…" in text and "Advance to the next stage…" in text and "Roll back…" in text
    response, text = await browser.get(f"{page}/pause")
    assert response.status == 200 and "Yes, pause" in text
    csrf = await browser.csrf(f"{page}/pause")

    response, _ = await browser.post(f"{page}/pause", {"csrf": csrf, "reason": "looking"})
    assert response.status == 303 and response.headers["Location"] == page
    assert (await api.services.store.get_rollout(rollout_id)).state == "paused"
    response, _ = await browser.post(f"{page}/resume", {"csrf": csrf})
    assert response.status == 303
    response, _ = await browser.post(f"{page}/advance", {"csrf": csrf})
    assert response.status == 303
    assert (await api.services.store.get_rollout(rollout_id)).percentage == 50
    # A rollback needs a reason: the form comes back saying so.
    response, text = await browser.post(f"{page}/rollback", {"csrf": csrf, "reason": " "})
    assert response.status == 400 and "A rollback needs a reason." in text
    response, _ = await browser.post(f"{page}/rollback", {"csrf": csrf, "reason": NASTY})
    assert response.status == 303
    after = await api.services.store.get_rollout(rollout_id)
    assert after.state == "rolled_back" and after.rollback["reason"] == NASTY
    history = await api.services.store.rollout_history(rollout_id, after_id=None, limit=50)
    assert [(h.action, h.actor) for h in history][1:] == [
        ("pause", "token alice-admin"),
        ("resume", "token alice-admin"),
        ("advance", "token alice-admin"),
        ("rollback", "token alice-admin"),
    ]
    # A command the state no longer allows is a page saying why, not a 500.
    response, text = await browser.post(f"{page}/pause", {"csrf": csrf})
    assert response.status == 409 and "it is rolled_back" in text

    # User text is escaped wherever it shows.
    for path in (page, "/"):
        _, text = await browser.get(path)
        assert NASTY not in text and "<script>alert" not in text
        assert (
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"
            in text
        )


async def test_posts_without_the_csrf_token_or_from_another_origin_are_refused(
    api: Api, rollout: Any
):
    _, rollout_id, _ = rollout
    browser = Browser(api)
    await browser.sign_in(await api.token("admin"))
    csrf = await browser.csrf()
    pause = f"/dashboard/rollouts/{rollout_id}/pause"
    attempts = [
        ({}, ""),  # no token
        ({"csrf": "0" * 64}, ""),  # a wrong one
        ({"csrf": csrf}, "https://evil.example"),  # another site's page
        ({"csrf": csrf}, None),  # neither Origin nor Referer
    ]
    for form, origin in attempts:
        response, text = await browser.post(pause, form, origin=origin)
        assert response.status == 403, (form, origin)
        assert "Refused" in text
    # A browser that sends only a Referer of this origin passes.
    response, _ = await browser.post(
        pause, {"csrf": csrf}, origin=None, Referer=f"{browser.origin}{pause}"
    )
    assert response.status == 303
    # Another session's token does not fit this session.
    other = Browser(api)
    await other.sign_in(await api.token("admin"))
    response, _ = await other.post(f"/dashboard/rollouts/{rollout_id}/resume", {"csrf": csrf})
    assert response.status == 403
    assert (await api.services.store.get_rollout(rollout_id)).state == "paused"


async def test_sign_out_deletes_the_session(api: Api):
    browser = Browser(api)
    await browser.sign_in(await api.token("viewer"))
    secret = browser.cookies["up_session"]
    csrf = await browser.csrf()
    response, _ = await browser.post("/dashboard/logout", {"csrf": "bad"})
    assert response.status == 403
    response, _ = await browser.post("/dashboard/logout", {"csrf": csrf})
    assert response.status == 303 and response.headers["Location"] == "/dashboard/login"
    assert "up_session" not in browser.cookies
    browser.cookies["up_session"] = secret  # the old cookie, kept by a careless browser
    assert (await browser.get("/"))[0].status == 303


# -- the event stream ------------------------------------------------------------------------


async def test_the_event_stream_takes_the_session_cookie(api: Api):
    browser = Browser(api)
    stream = "/api/update-pipeline/events/stream"
    response, _ = await api.get(stream)
    assert response.status == 401
    await browser.sign_in(await api.token("viewer"))
    async with api.client.get(stream, headers=browser._headers(None)) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert (await response.content.readline()).startswith(b"retry:")
    browser.cookies["up_session"] = "not-a-session"
    response, _ = await api.get(stream, headers=browser._headers(None))
    assert response.status == 401


# -- pages with real data --------------------------------------------------------------------


async def test_pages_show_the_fleet_rollouts_canaries_versions_and_sweeps(api: Api, rollout: Any):
    admin, rollout_id, _ = rollout
    store, clock = api.services.store, api.services.clock
    build = {
        "buildId": "build-canaried",
        "runnerVersion": "2.0.0",
        "runtimeVersions": {"codex": "0.48.0"},
    }
    response, _ = await api.post("/builds", token=admin, json=build)
    assert response.status == 201
    results = [
        {"name": f"t{i}", "provider": "codex", "status": "passed", "sessionStartMs": 900}
        for i in range(18)
    ] + [{"name": f"<i>broken {i}</i>", "provider": "codex", "status": "failed",
          "message": NASTY} for i in range(2)]  # fmt: skip
    response, body = await api.post(
        "/canary/build-canaried/results", token=admin, json={"results": results}
    )
    assert response.status == 200, body
    sweep = Sweep("sweep-1", "running", None, None, NEW, rollout_id, "ops", START)
    run = SweepRun("sweep-1", "acme/app", 1, "sweep.yml", "main", {}, "waiting", START)
    await store.add_sweep(sweep, [run], clock.now(), keep_events=1000)

    browser = Browser(api)
    await browser.sign_in(await api.token("viewer"))
    _, text = await browser.get("/")
    words = visible(text)
    assert "stable: 10 runner(s)" in words
    # Which orgs a 10% stage takes depends on the rollout's (random) id.
    included = len(await store.rollout_orgs(rollout_id))
    assert f"build-old {10 - included} runner(s)" in words
    assert f"build-new {included} runner(s)" in words
    assert "Stage 1 of 3, 10%" in words
    assert "Failure rate 5.0% (max 10.0%; baseline" in words
    assert f"Sessions {20 * included} of 20 needed" in words
    assert "pass: within thresholds" in words  # the verdict in words, not colour alone
    assert "build-canaried ✗ failed" in words
    assert "sweep-1" in words and "1 waiting" in words
    assert (
        'href="/dashboard/rollouts/' in text and 'href="/dashboard/canaries/build-canaried"' in text
    )
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT[\d:.]+Z" title="[\d :-]+ UTC">', text)

    _, text = await browser.get(f"/dashboard/rollouts/{rollout_id}")
    words = visible(text)
    assert "<svg" in text and "<caption>Rates per stage" in text
    assert f"10% {20 * included} 5.0% 0.0%" in words  # the table says what the chart shows
    assert "start" in words and "token ops" in words  # history with its actor

    _, text = await browser.get("/dashboard/canaries/build-canaried")
    words = visible(text)
    assert "Pass rate 90.0% 90.0%" in words and "Failed tests" in words
    assert "&lt;i&gt;broken 0&lt;/i&gt;" in text and NASTY not in text

    _, text = await browser.get("/dashboard/sweeps/sweep-1")
    assert 'href="https://github.com/acme/app"' in text and "waiting" in visible(text)


# -- signing in with GitHub ------------------------------------------------------------------


@pytest.fixture
async def github_api(
    make_api: MakeApi, github_settings: Settings, github: FakeGitHub, request: Any
) -> Api:
    github.add_installation(account="acme", repos=[CONTROL])
    for user, role in [("reader", "read"), ("writer", "write"), ("maintainer", "maintain")]:
        github.set_permission(CONTROL, user, role)
    marker = request.node.get_closest_marker("settings")
    settings = github_settings.replace(
        control_repo=CONTROL,
        github_client_id=github.oauth_client_id,
        github_client_secret=Secret(github.oauth_client_secret),
        github_web_url=github.url,
        **(marker.kwargs if marker else {}),
    )
    api = await make_api(settings_override=settings, with_github=True)

    async def installed() -> bool:
        return await api.services.store.installation_for_repository(CONTROL) is not None

    await wait_until(installed)
    return api


async def github_sign_in(
    api: Api, github: FakeGitHub, login: str | None, next_path: str = "/"
) -> tuple[Browser, aiohttp.ClientResponse, str]:
    """Through the authorize page and back; the last answer and the callback's URL."""
    github.oauth_login = login
    browser = Browser(api)
    response, _ = await browser.get(f"/dashboard/login/github?next={next_path}")
    assert response.status == 302
    authorize = response.headers["Location"]
    query = parse_qs(urlsplit(authorize).query)
    assert authorize.startswith(f"{github.url}/login/oauth/authorize?")
    assert query["client_id"] == [github.oauth_client_id]
    assert query["redirect_uri"] == [f"{browser.origin}/dashboard/login/github/callback"]
    assert browser.cookies["up_oauth_state"].startswith(query["state"][0] + ":")
    async with (
        aiohttp.ClientSession() as http,
        http.get(authorize, allow_redirects=False) as at_github,
    ):
        assert at_github.status == 302
        callback = at_github.headers["Location"]
    response, _ = await browser.get(callback.removeprefix(browser.origin))
    return browser, response, callback


async def test_github_sign_in_exchanges_the_code_once_and_reads_the_user(
    github_api: Api, github: FakeGitHub
):
    api = github_api
    browser, response, callback = await github_sign_in(api, github, "writer", "/x")
    assert response.status == 303 and response.headers["Location"] == "/x"
    assert "up_oauth_state" not in browser.cookies and "up_session" in browser.cookies
    assert len(github.oauth_exchanges) == 1
    exchange = github.oauth_exchanges[0]
    assert exchange["client_id"] == github.oauth_client_id
    assert exchange["redirect_uri"] == f"{browser.origin}/dashboard/login/github/callback"
    assert [r.operation for r in github.requests if r.operation == "GET /user"] == ["GET /user"]
    _, text = await browser.get("/")
    assert "writer (GitHub)" in text

    # The same callback again (a replay, or the back button): the state cookie is gone,
    # so nothing is exchanged a second time.
    replay = Browser(api)
    response, text = await replay.get(callback.removeprefix(replay.origin))
    assert response.status == 400 and "could not be tied to this browser" in text
    assert len(github.oauth_exchanges) == 1 and "up_session" not in replay.cookies


async def test_github_sign_in_refuses_a_state_that_does_not_match(
    github_api: Api, github: FakeGitHub
):
    api = github_api
    github.oauth_login = "writer"
    browser = Browser(api)
    await browser.get("/dashboard/login/github")
    browser.cookies["up_oauth_state"] = "someone-elses-state:%2F"
    response, _ = await browser.get(
        "/dashboard/login/github/callback?code=abc&state=attacker-state"
    )
    assert response.status == 400
    assert github.oauth_exchanges == [] and "up_session" not in browser.cookies
    # A declined authorisation signs no one in either.
    browser, response, _ = await github_sign_in(api, github, None)
    assert response.status == 401 and "declined" in await response.text()
    assert "up_session" not in browser.cookies


async def test_a_code_github_refuses_signs_no_one_in(github_api: Api, github: FakeGitHub):
    github.oauth_login = "writer"
    browser = Browser(github_api)
    response, _ = await browser.get("/dashboard/login/github")
    state = parse_qs(urlsplit(response.headers["Location"]).query)["state"][0]
    response, text = await browser.get(
        f"/dashboard/login/github/callback?code=made-up&state={state}"
    )
    assert response.status == 401 and "refused the sign-in code" in text
    assert len(github.oauth_exchanges) == 1 and "up_session" not in browser.cookies


async def test_github_permissions_follow_the_slash_command_table(
    github_api: Api, github: FakeGitHub
):
    api = github_api
    admin, _ = await on_channel(api, ORGS)
    rollout_id = (await start(api, admin))["rolloutId"]
    page = f"/dashboard/rollouts/{rollout_id}"

    reader, response, _ = await github_sign_in(api, github, "reader")
    response, text = await reader.get("/")
    assert response.status == 403
    assert "read on acme/control" in text and "you need triage on acme/control" in text
    response, _ = await api.get("/api/update-pipeline/events/stream", headers=reader._headers(None))
    assert response.status == 403

    writer, _, _ = await github_sign_in(api, github, "writer")
    _, text = await writer.get(page)
    assert "Pause…" in text and "Roll back…" in text and "Advance" not in text
    response, _ = await writer.get(f"{page}/advance")
    assert response.status == 403
    csrf = await writer.csrf(page)
    response, _ = await writer.post(f"{page}/advance", {"csrf": csrf})
    assert response.status == 403
    response, _ = await writer.post(f"{page}/pause", {"csrf": csrf, "reason": "hold on"})
    assert response.status == 303
    history = await api.services.store.rollout_history(rollout_id, after_id=None, limit=50)
    assert (history[-1].action, history[-1].actor, history[-1].reason) == (
        "pause",
        "writer",
        "hold on",
    )

    maintainer, _, _ = await github_sign_in(api, github, "maintainer")
    _, text = await maintainer.get(page)
    assert "Resume…" in text


@pytest.mark.settings(command_permissions=(("pause", "maintain"), ("status", "read")))
async def test_command_permission_overrides_apply_to_the_dashboard(
    github_api: Api, github: FakeGitHub
):
    api = github_api
    admin, _ = await on_channel(api, ORGS)
    rollout_id = (await start(api, admin))["rolloutId"]
    reader, _, _ = await github_sign_in(api, github, "reader")
    assert (await reader.get("/"))[0].status == 200  # status=read lets readers look
    writer, _, _ = await github_sign_in(api, github, "writer")
    _, text = await writer.get(f"/dashboard/rollouts/{rollout_id}")
    assert "Roll back…" in text and "Pause…" not in text
