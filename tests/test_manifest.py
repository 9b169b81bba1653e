"""The GitHub App manifest (app.yml) and `update-pipeline setup`, which registers the App
from it through GitHub's manifest flow.

app.yml must ask for exactly what the app uses:

* permissions: OPERATION_PERMISSIONS below says which permission each GitHub REST
  operation the app makes needs. tests/github_fixtures.py records, across the whole
  session, every operation the app's own client sent to a fake GitHub, and checks them
  with ``permission_problems`` at the end: an operation missing from the table, or
  needing a permission app.yml does not grant, fails any run; a permission no operation
  needed fails a run of the whole suite (see ``_whole_suite`` there);
* events: the events the webhook routers handle, as gidgethub records them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import stat
import subprocess
from collections.abc import AsyncIterator, Iterable, Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.clock import ManualClock
from app.config import Settings
from app.github.app import GitHubApp
from app.github.keys import load_private_key
from app.github.manifest import (
    MANIFEST_FILE,
    AppCredentials,
    ManifestFlow,
    SetupError,
    SetupOptions,
    add_arguments,
    build_manifest,
    env_file_text,
    form_page,
    load_manifest,
    new_app_url,
    options_from_args,
    run,
    setup,
    write_private,
)
from app.github.webhooks import WebhookProcessor
from app.server import github_components
from app.services import Services
from app.store import SqliteStore
from tests.fake_github import OPERATIONS, FakeGitHub

PUBLIC_URL = "https://update-pipeline.example"
ACCESS = {"read": 1, "write": 2}
CONVERSION = "POST /app-manifests/{code}/conversions"

# Each GitHub REST operation the app makes (the conformance subset's key) and the App
# permission GitHub requires for it, from GitHub's "Permissions required for GitHub
# Apps"; None where none is needed: calls made as the App itself (a JWT) and the manifest
# code exchange (the code is the credential). Writing to an issue's comments, reactions
# or labels takes Issues, also on a pull request.
OPERATION_PERMISSIONS: dict[str, tuple[str, str] | None] = {
    # The App itself, its installations and webhook deliveries.
    "GET /app": None,
    "GET /app/installations": None,
    "POST /app/installations/{installation_id}/access_tokens": None,
    "GET /installation/repositories": None,  # any installation token
    "GET /app/hook/deliveries": None,
    "POST /app/hook/deliveries/{delivery_id}/attempts": None,
    CONVERSION: None,
    # The dashboard's GitHub sign-in reads who signed in with the user's own token: a
    # user-to-server call, which needs no App permission.
    "GET /user": None,
    # Metadata.
    "GET /repos/{owner}/{repo}": ("metadata", "read"),
    "GET /repos/{owner}/{repo}/topics": ("metadata", "read"),  # the client's own tests
    "GET /repos/{owner}/{repo}/collaborators/{username}/permission": ("metadata", "read"),
    # Checks: the canary's check runs.
    "GET /repos/{owner}/{repo}/commits/{ref}/check-runs": ("checks", "read"),
    "POST /repos/{owner}/{repo}/check-runs": ("checks", "write"),
    "PATCH /repos/{owner}/{repo}/check-runs/{check_run_id}": ("checks", "write"),
    # Issues: slash commands and rollout tracking issues.
    "GET /repos/{owner}/{repo}/issues": ("issues", "read"),
    "POST /repos/{owner}/{repo}/issues": ("issues", "write"),
    "PATCH /repos/{owner}/{repo}/issues/{issue_number}": ("issues", "write"),
    "GET /repos/{owner}/{repo}/issues/{issue_number}/comments": ("issues", "read"),
    "POST /repos/{owner}/{repo}/issues/{issue_number}/comments": ("issues", "write"),
    "POST /repos/{owner}/{repo}/issues/{issue_number}/labels": ("issues", "write"),
    "DELETE /repos/{owner}/{repo}/issues/{issue_number}/labels/{name}": ("issues", "write"),
    "POST /repos/{owner}/{repo}/issues/{issue_number}/reactions": ("issues", "write"),
    "POST /repos/{owner}/{repo}/issues/comments/{comment_id}/reactions": ("issues", "write"),
    # Pull requests: canaries read their files; bump pull requests.
    "GET /repos/{owner}/{repo}/pulls": ("pull_requests", "read"),
    "GET /repos/{owner}/{repo}/pulls/{pull_number}/files": ("pull_requests", "read"),
    "POST /repos/{owner}/{repo}/pulls": ("pull_requests", "write"),
    "PATCH /repos/{owner}/{repo}/pulls/{pull_number}": ("pull_requests", "write"),
    # Contents: the runtime manifest, sweep opt-in files, releases; bump commits.
    "GET /repos/{owner}/{repo}/contents/{path}": ("contents", "read"),
    "GET /repos/{owner}/{repo}/releases": ("contents", "read"),
    "GET /repos/{owner}/{repo}/git/ref/{ref}": ("contents", "read"),
    "POST /repos/{owner}/{repo}/git/refs": ("contents", "write"),
    "PUT /repos/{owner}/{repo}/contents/{path}": ("contents", "write"),
    # Actions: canary and sweep workflows.
    "GET /repos/{owner}/{repo}/actions/workflows/{workflow_id}/runs": ("actions", "read"),
    "POST /repos/{owner}/{repo}/actions/workflows/{workflow_id}/dispatches": (
        "actions",
        "write",
    ),
    "POST /repos/{owner}/{repo}/actions/runs/{run_id}/cancel": ("actions", "write"),
}

# The permission GitHub requires to subscribe an App to each event it takes.
EVENT_PERMISSIONS = {
    "check_run": "checks",
    "check_suite": "checks",
    "issue_comment": "issues",
    "issues": "issues",
    "pull_request": "pull_requests",
    "push": "contents",
    "workflow_run": "actions",
}
# Events every App receives without subscribing to them (and cannot subscribe to).
WITHOUT_SUBSCRIPTION = {"installation", "installation_repositories"}


def app_yml() -> dict[str, Any]:
    return load_manifest(MANIFEST_FILE)


def permission_problems(
    operations: Iterable[str], *, complete: bool, manifest: Mapping[str, Any] | None = None
) -> list[str]:
    """Why app.yml's permissions do not fit ``operations`` (what the app called): an
    operation the table does not know, or one needing more than app.yml grants; with
    ``complete`` (they are all the app calls), also a permission granted beyond need."""
    granted: dict[str, str] = dict((manifest or app_yml())["default_permissions"])
    problems: list[str] = []
    needed: dict[str, str] = {}
    for operation in sorted(set(operations)):
        if operation not in OPERATION_PERMISSIONS:
            problems.append(
                f"{operation}: the app calls it, and OPERATION_PERMISSIONS does not say which"
                " permission it needs (add it, and to app.yml if it is new)"
            )
            continue
        need = OPERATION_PERMISSIONS[operation]
        if need is None:
            continue
        permission, access = need
        if ACCESS.get(granted.get(permission, ""), 0) < ACCESS[access]:
            has = granted.get(permission, "nothing")
            problems.append(f"{operation} needs {permission}: {access}; app.yml grants {has}")
        if ACCESS[access] > ACCESS.get(needed.get(permission, ""), 0):
            needed[permission] = access
    if complete:
        for permission, access in sorted(granted.items()):
            if permission not in needed:
                problems.append(
                    f"app.yml grants {permission}: {access}, and no call the app made needs it"
                )
            elif ACCESS[needed[permission]] < ACCESS.get(access, 0):
                problems.append(
                    f"app.yml grants {permission}: {access}; the app's calls need only"
                    f" {needed[permission]}"
                )
    return problems


# -- app.yml --------------------------------------------------------------------------------


def test_app_yml_grants_what_the_operations_the_app_makes_need_and_nothing_more():
    assert permission_problems(OPERATION_PERMISSIONS, complete=True) == []


def test_the_operation_table_names_operations_of_the_conformance_subset():
    assert set(OPERATION_PERMISSIONS) <= set(OPERATIONS)


def test_app_yml_asks_for_the_documented_permissions():
    # docs/github.md, "What the App needs" (Contents and Pull requests with the write
    # that bump pull requests need).
    assert app_yml()["default_permissions"] == {
        "metadata": "read",
        "checks": "write",
        "issues": "write",
        "pull_requests": "write",
        "contents": "write",
        "actions": "write",
    }


def test_the_permission_check_finds_missing_unused_and_unknown():
    manifest = {"default_permissions": {"metadata": "read", "issues": "read", "actions": "write"}}
    calls = ["POST /repos/{owner}/{repo}/issues", "GET /repos/{owner}/{repo}", "GET /nowhere"]
    partial = permission_problems(calls, complete=False, manifest=manifest)
    assert partial == [
        "GET /nowhere: the app calls it, and OPERATION_PERMISSIONS does not say which"
        " permission it needs (add it, and to app.yml if it is new)",
        "POST /repos/{owner}/{repo}/issues needs issues: write; app.yml grants read",
    ]
    complete = permission_problems(calls, complete=True, manifest=manifest)
    assert complete[len(partial) :] == [
        "app.yml grants actions: write, and no call the app made needs it"
    ]
    broad = {"default_permissions": {"metadata": "write"}}
    assert permission_problems(["GET /repos/{owner}/{repo}"], complete=True, manifest=broad) == [
        "app.yml grants metadata: write; the app's calls need only read"
    ]


def test_each_event_has_the_permission_github_requires_for_it():
    manifest = app_yml()
    for event in manifest["default_events"]:
        assert EVENT_PERMISSIONS[event] in manifest["default_permissions"], event


async def test_app_yml_subscribes_to_exactly_the_events_the_webhook_routers_handle(
    github_settings: Settings, store: SqliteStore, clock: ManualClock, app_github: GitHubApp
):
    # Every router: the runner and control repositories switch on canaries and tracking.
    settings = github_settings.replace(runner_repo="acme/runner", control_repo="acme/control")
    services = Services.build(settings, store, clock)
    services.github = app_github
    (processor,) = [c for c in github_components(services) if isinstance(c, WebhookProcessor)]
    router = processor.router
    handled = set(router._shallow_routes) | set(router._deep_routes)
    assert handled >= WITHOUT_SUBSCRIPTION
    assert sorted(app_yml()["default_events"]) == sorted(handled - WITHOUT_SUBSCRIPTION)


def test_app_yml_has_the_manifest_fields_with_placeholders_for_the_urls():
    manifest = app_yml()
    assert manifest["name"] == "update-pipeline"
    assert manifest["url"] == "${PUBLIC_URL}"
    assert manifest["hook_attributes"] == {
        "url": "${PUBLIC_URL}/api/github/webhooks",
        "active": True,
    }
    assert manifest["redirect_url"] == "${REDIRECT_URL}"
    assert manifest["public"] is False
    known = {
        "name",
        "description",
        "url",
        "hook_attributes",
        "redirect_url",
        "callback_urls",
        "public",
        "default_permissions",
        "default_events",
        "setup_url",
        "setup_on_update",
        "request_oauth_on_install",
    }
    assert set(manifest) <= known


# -- the pure parts -------------------------------------------------------------------------


def test_the_manifest_is_filled_in_with_the_urls_and_the_name():
    manifest = build_manifest(
        app_yml(),
        public_url=PUBLIC_URL + "/",
        redirect_url="http://127.0.0.1:5000/callback",
        name="pipeline-staging",
    )
    assert manifest["name"] == "pipeline-staging"
    assert manifest["url"] == PUBLIC_URL
    assert manifest["hook_attributes"]["url"] == f"{PUBLIC_URL}/api/github/webhooks"
    assert manifest["redirect_url"] == "http://127.0.0.1:5000/callback"
    assert "${" not in json.dumps(manifest)
    assert build_manifest(app_yml(), public_url=PUBLIC_URL, redirect_url="x")["name"] == (
        "update-pipeline"
    )


def test_an_unknown_placeholder_is_refused():
    with pytest.raises(SetupError, match=r"\$\{SECRET\}; only \$\{PUBLIC_URL\}"):
        build_manifest({"url": "${SECRET}"}, public_url=PUBLIC_URL, redirect_url="x")


def test_github_urls_for_an_organisation_and_a_personal_account():
    assert (
        new_app_url("https://github.com", "s t", org="acme")
        == "https://github.com/organizations/acme/settings/apps/new?state=s+t"
    )
    assert (
        new_app_url("https://ghe.example/", "abc", org=None)
        == "https://ghe.example/settings/apps/new?state=abc"
    )


class _Form(HTMLParser):
    """The form's action and fields, unescaped as a browser reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.method = ""
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action, self.method = values["action"], values["method"]
        elif tag == "input":
            self.fields[values["name"]] = values["value"]


def read_form(page: str) -> _Form:
    form = _Form()
    form.feed(page)
    return form


def test_the_form_carries_the_manifest_escaped():
    manifest = {"name": '"><script>alert(1)</script>', "url": "https://x.example/?a=1&b=2"}
    page = form_page("https://github.com/settings/apps/new?state=a&b", manifest)
    assert "<script>alert" not in page
    assert "&b=" not in page  # the action's & is escaped too
    form = read_form(page)
    assert form.method == "post"
    assert form.action == "https://github.com/settings/apps/new?state=a&b"
    assert json.loads(form.fields["manifest"]) == manifest


def credentials(**changes: Any) -> AppCredentials:
    values: dict[str, Any] = {
        "app_id": 123,
        "slug": "update-pipeline",
        "name": "update-pipeline",
        "html_url": "https://github.com/apps/update-pipeline",
        "client_id": "Iv23liABC",
        "pem": "-----BEGIN RSA PRIVATE KEY-----\n...\n-----END RSA PRIVATE KEY-----\n",
        "webhook_secret": "whsec",
        "client_secret": "csec",
        **changes,
    }
    return AppCredentials(**values)


def test_credentials_never_show_their_secrets():
    shown = repr(credentials())
    assert "whsec" not in shown and "csec" not in shown and "PRIVATE" not in shown
    assert "Iv23liABC" in shown


def test_the_env_file_reads_back_in_a_shell_even_with_a_space_in_the_key_path(tmp_path):
    key = tmp_path / "my keys" / "app's.pem"
    text = env_file_text(credentials(), key, api_url="https://ghe.example/api/v3")
    assert "GITHUB_WEB_URL" not in text  # the default is left out
    file = tmp_path / "env"
    file.write_text(text)
    script = 'set -a; . "$1"; printf "%s|%s|%s" "$GITHUB_PRIVATE_KEY_PATH" "$GITHUB_APP_ID"'
    script += ' "$GITHUB_API_URL"'
    shown = subprocess.run(
        ["sh", "-c", script, "sh", str(file)], capture_output=True, text=True, check=True
    ).stdout
    assert shown == f"{key}|123|https://ghe.example/api/v3"


def test_a_private_file_is_0600_from_the_start_and_not_overwritten(tmp_path):
    path = tmp_path / "secret"
    old = os.umask(0)  # even with a permissive umask
    try:
        write_private(path, "one", force=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(SetupError, match="exists: give --force"):
        write_private(path, "two", force=False)
    assert path.read_text() == "one"


def test_force_replaces_a_file_and_its_loose_mode(tmp_path):
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "new", force=True)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]  # no temporary left


# -- the flow against the fake GitHub ---------------------------------------------------------


@pytest.fixture
def options(tmp_path: Path, github: FakeGitHub) -> SetupOptions:
    return SetupOptions(
        public_url=PUBLIC_URL,
        org="acme",
        env_file=tmp_path / ".env.github-app",
        web_url=github.url,  # where the form goes; the test plays the browser
        api_url=github.url,
        open_browser=False,
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def started(
    options: SetupOptions, session: aiohttp.ClientSession
) -> tuple[ManifestFlow, str]:
    flow = ManifestFlow(options, app_yml(), session)
    return flow, await flow.start()


async def confirm_on_github(
    http: aiohttp.ClientSession, page_url: str, github: FakeGitHub
) -> tuple[str, str]:
    """Play the browser and GitHub: open the page, read the form it posts, and return
    the code GitHub would redirect back with, and the state."""
    async with http.get(page_url) as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        form = read_form(await response.text())
    action, _, query = form.action.partition("?")
    assert action == f"{github.url}/organizations/acme/settings/apps/new"
    (state,) = re.findall(r"^state=([A-Za-z0-9_-]{40,})$", query)
    return github.manifest_code(json.loads(form.fields["manifest"])), state


def env_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            (values[name],) = shlex.split(value)
    return values


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_flow_registers_the_app_and_writes_credentials_the_service_accepts(
    options: SetupOptions, github: FakeGitHub, http: aiohttp.ClientSession, clock: ManualClock
):
    flow, page = await started(options, http)
    try:
        assert page.startswith("http://127.0.0.1:")
        code, state = await confirm_on_github(http, page, github)
        # GitHub got the manifest of app.yml, filled in for this run.
        manifest = github.manifest_codes[code]
        port = page.split(":")[2].split("/")[0]
        assert manifest["redirect_url"] == f"http://127.0.0.1:{port}/callback"
        assert manifest["hook_attributes"]["url"] == f"{PUBLIC_URL}/api/github/webhooks"
        assert manifest["default_permissions"] == app_yml()["default_permissions"]
        callback = f"http://127.0.0.1:{port}/callback"

        # A redirect that does not carry this run's state is refused, and writes nothing.
        for params in ({"code": code, "state": "forged"}, {"code": code}):
            async with http.get(callback, params=params) as response:
                assert response.status == 400
        assert not options.env_file.exists() and not options.key_path.exists()
        assert not github.calls(CONVERSION)

        async with http.get(callback, params={"code": code, "state": state}) as response:
            assert response.status == 200
            assert "https://github.com/apps/update-pipeline/installations/new" in (
                await response.text()
            )
        created = await flow.wait()
    finally:
        await flow.close()

    (app,) = github.created_apps
    assert created.app_id == github.app_id
    assert mode(options.env_file) == mode(options.key_path) == 0o600
    assert options.key_path == options.env_file.with_name(".env.github-app.private-key.pem")
    assert options.key_path.read_text() == github.private_key_pem
    values = env_values(options.env_file)
    assert values == {
        "GITHUB_APP_ID": str(github.app_id),
        "GITHUB_PRIVATE_KEY_PATH": str(options.key_path),
        "GITHUB_WEBHOOK_SECRET": app["webhook_secret"],
        "GITHUB_CLIENT_ID": app["client_id"],
        "GITHUB_CLIENT_SECRET": app["client_secret"],
        "GITHUB_API_URL": github.url,  # not github.com's: written
        "GITHUB_WEB_URL": github.url,
    }

    # The service reads them, and GitHub accepts the App's JWT signed with the key.
    settings = Settings.from_env(values)
    assert settings.github_app_id == github.app_id
    assert settings.github_client_id == app["client_id"]
    assert load_private_key(settings) is not None
    service = GitHubApp.from_settings(settings, clock)
    assert service is not None
    try:
        assert (await service.app.getitem("/app"))["id"] == github.app_id
    finally:
        await service.close()


async def test_a_code_github_refuses_ends_the_setup_with_nothing_written(
    options: SetupOptions, github: FakeGitHub, http: aiohttp.ClientSession
):
    flow, page = await started(options, http)
    try:
        _, state = await confirm_on_github(http, page, github)
        callback = page.rsplit("/", 1)[0] + "/callback"
        async with http.get(callback, params={"code": "used-or-expired", "state": state}) as r:
            assert r.status == 502
        with pytest.raises(SetupError, match=r"GitHub refused the code \(404: Not Found\)"):
            await flow.wait()
    finally:
        await flow.close()
    assert not options.env_file.exists() and not options.key_path.exists()


async def test_when_github_fails_the_page_can_be_reloaded(
    options: SetupOptions, github: FakeGitHub, http: aiohttp.ClientSession
):
    github.inject(CONVERSION, 502)
    flow, page = await started(options, http)
    try:
        code, state = await confirm_on_github(http, page, github)
        callback = page.rsplit("/", 1)[0] + "/callback"
        params = {"code": code, "state": state}
        async with http.get(callback, params=params) as response:
            assert response.status == 502
            assert "Reload this page" in await response.text()
        assert not options.env_file.exists()
        async with http.get(callback, params=params) as response:
            assert response.status == 200
        await flow.wait()
        async with http.get(callback, params=params) as response:
            assert response.status == 410  # done: the code is not exchanged again
    finally:
        await flow.close()
    assert len(github.calls(CONVERSION)) == 2


async def test_a_personal_account_gets_the_user_settings_page(
    options: SetupOptions, github: FakeGitHub, http: aiohttp.ClientSession
):
    flow, page = await started(SetupOptions(**{**_fields(options), "org": None}), http)
    try:
        async with http.get(page) as response:
            form = read_form(await response.text())
        assert form.action.startswith(f"{github.url}/settings/apps/new?state=")
        async with http.get(page.rsplit("/", 1)[0] + "/") as response:
            assert response.status == 404  # the page is only at its random path
    finally:
        await flow.close()


def _fields(options: SetupOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in SetupOptions.__dataclass_fields__}


async def test_existing_files_are_refused_before_anything_happens_on_github(
    options: SetupOptions, github: FakeGitHub
):
    options.env_file.write_text("GITHUB_APP_ID=1\n")
    with pytest.raises(SetupError, match=r"\.env\.github-app exists: give --force"):
        await setup(options, out=lambda line: None)
    assert options.env_file.read_text() == "GITHUB_APP_ID=1\n"
    assert not github.requests


# -- the command ------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="update-pipeline setup")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_the_command_needs_an_owner_and_the_public_url(capsys):
    for argv in (["--public-url", PUBLIC_URL], ["--org", "acme"], ["--org", "a", "--user"]):
        with pytest.raises(SystemExit):
            parse(*argv)
    with pytest.raises(SystemExit):
        parse("--org", "acme", "--public-url", "ftp://x")
    assert "is not an http(s) URL" in capsys.readouterr().err


def test_the_github_urls_default_to_the_settings(tmp_path):
    args = parse("--user", "--public-url", PUBLIC_URL + "/")
    options = options_from_args(args, env={"GITHUB_WEB_URL": "https://ghe.example/"})
    assert options.org is None
    assert options.public_url == PUBLIC_URL
    assert options.web_url == "https://ghe.example"
    assert options.api_url == "https://api.github.com"
    assert options.env_file == Path(".env.github-app")
    assert options.name is None and options.port == 0 and options.open_browser
    assert options.manifest_file == MANIFEST_FILE


async def test_setup_end_to_end_prints_the_next_steps_and_no_secret(
    tmp_path: Path, github: FakeGitHub, http: aiohttp.ClientSession, capsys
):
    env_file = tmp_path / "app.env"
    argv = [
        "--org",
        "acme",
        "--public-url",
        PUBLIC_URL,
        "--name",
        "pipeline-staging",
        "--env-file",
        str(env_file),
        "--github-web-url",
        github.url,
        "--github-api-url",
        github.url,
        "--no-browser",
    ]
    # The command runs its own event loop, in a thread; this one plays browser and GitHub.
    command = asyncio.create_task(asyncio.to_thread(run, parse(*argv)))
    printed = ""
    while "http://127.0.0.1:" not in printed:
        assert not command.done(), capsys.readouterr()
        await asyncio.sleep(0.02)
        printed += capsys.readouterr().out
    (page,) = re.findall(r"http://127\.0\.0\.1:\d+/\S+", printed)
    code, state = await confirm_on_github(http, page, github)
    assert github.manifest_codes[code]["name"] == "pipeline-staging"
    async with http.get(
        page.rsplit("/", 1)[0] + "/callback", params={"code": code, "state": state}
    ) as response:
        assert response.status == 200
    assert await command == 0
    printed += capsys.readouterr().out
    (app,) = github.created_apps
    for secret in (app["webhook_secret"], app["client_secret"], "PRIVATE KEY", state):
        assert secret not in printed
    assert "Created the GitHub App pipeline-staging" in printed
    assert "https://github.com/apps/pipeline-staging/installations/new" in printed
    assert str(env_file) in printed and f"{env_file}.private-key.pem" in printed
    assert mode(env_file) == 0o600


def test_an_error_is_one_line_and_exit_1(tmp_path, capsys):
    env_file = tmp_path / "app.env"
    env_file.write_text("")
    argv = ["--user", "--public-url", PUBLIC_URL, "--env-file", str(env_file), "--no-browser"]
    assert run(parse(*argv)) == 1
    err = capsys.readouterr().err
    assert err == (
        f"update-pipeline: error: {env_file} exists: give --force to replace it,"
        " or choose another file\n"
    )
