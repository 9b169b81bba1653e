"""Registering the GitHub App from its manifest (``app.yml``): ``update-pipeline setup``.

GitHub's manifest flow, as this command runs it:

1. A small server on 127.0.0.1 serves a page (at a random path) whose form posts the
   manifest, as JSON, to ``{GITHUB_WEB_URL}/organizations/{org}/settings/apps/new`` (or
   ``/settings/apps/new`` for a personal account), with a random ``state``.
2. On GitHub, the person confirms (and may rename) the App. GitHub creates it and sends
   the browser to the manifest's ``redirect_url``, this server's ``/callback``, with a
   one-time ``code`` and the ``state``.
3. ``/callback`` checks the state, exchanges the code at
   ``POST {GITHUB_API_URL}/app-manifests/{code}/conversions`` for the App's id, private
   key, webhook secret and OAuth client credentials, writes them (files readable by
   their owner alone), and the server stops.

The pure parts (the manifest, GitHub's URL, the page, the env file) are separate
functions; ``ManifestFlow`` is the server, ``setup`` the whole command. See
docs/setup.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import ipaddress
import json
import os
import re
import secrets
import shlex
import sys
import threading
import webbrowser
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from app.config import ConfigError, Settings

if TYPE_CHECKING:  # imported where used, so the other commands do not load them
    import aiohttp
    from aiohttp import web

PROG = "update-pipeline"
# The manifest ships inside the package, so an installed wheel (the container) has it;
# app.yml at the repository root is a link to it, where people look for it.
MANIFEST_FILE = Path(__file__).resolve().parent / "app.yml"
DEFAULT_NAME = "update-pipeline"
DEFAULT_ENV_FILE = Path(".env.github-app")
KEY_FILE_SUFFIX = ".private-key.pem"
MAX_NAME_LENGTH = 34  # GitHub refuses longer App names
CALLBACK_PATH = "/callback"
API_VERSION = "2022-11-28"
CONVERSION_TIMEOUT = 30.0  # seconds
DEFAULT_API_URL = Settings().github_api_url
DEFAULT_WEB_URL = Settings().github_web_url

# The placeholders app.yml may use, filled in by build_manifest.
PLACEHOLDERS = ("PUBLIC_URL", "REDIRECT_URL")
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
# A GitHub account name: letters, digits and single hyphens inside, at most 39.
_LOGIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}")
# Env-file values written as they are; anything else is quoted for the shell.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./:@%+,-]+")
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SetupError(Exception):
    """A one-line reason the setup cannot go on (the command exits 1)."""


# -- the manifest ---------------------------------------------------------------------------


def load_manifest(path: Path = MANIFEST_FILE) -> dict[str, Any]:
    """app.yml as a dict, placeholders still in it."""
    import yaml  # type: ignore[import-untyped]

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SetupError(f"cannot read the App manifest {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SetupError(f"{path} is not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SetupError(f"{path} is not a mapping of App manifest fields")
    return data


def build_manifest(
    template: Mapping[str, Any],
    *,
    public_url: str,
    redirect_url: str,
    name: str | None = None,
) -> dict[str, Any]:
    """The manifest to send GitHub: ``template`` (app.yml) with ``${PUBLIC_URL}`` and
    ``${REDIRECT_URL}`` filled in, and ``name`` when given."""
    values = {"PUBLIC_URL": public_url.rstrip("/"), "REDIRECT_URL": redirect_url}

    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            known = ", ".join(f"${{{k}}}" for k in PLACEHOLDERS)
            raise SetupError(f"the App manifest uses ${{{key}}}; only {known} are filled in")
        return values[key]

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return _PLACEHOLDER.sub(substitute, value)
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    manifest: dict[str, Any] = fill(dict(template))
    if name is not None:
        manifest["name"] = name
    return manifest


def new_app_url(web_url: str, state: str, *, org: str | None) -> str:
    """GitHub's page that takes a manifest: an organisation's, or (``org`` None) the
    signed-in user's own."""
    page = (
        f"/organizations/{quote(org, safe='')}/settings/apps/new"
        if org is not None
        else "/settings/apps/new"
    )
    return f"{web_url.rstrip('/')}{page}?{urlencode({'state': state})}"


def form_page(action: str, manifest: Mapping[str, Any]) -> str:
    """A page that posts ``manifest`` to ``action`` at once (or on a click without
    JavaScript), as GitHub's manifest flow asks: a form field named ``manifest``."""
    manifest_json = html.escape(json.dumps(manifest), quote=True)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Create the GitHub App</title>
</head>
<body>
<form id="manifest-form" method="post" action="{html.escape(action, quote=True)}">
<input type="hidden" name="manifest" value="{manifest_json}">
<p>Sending the App's manifest to GitHub...</p>
<p><button type="submit">Continue to GitHub</button></p>
</form>
<script>document.getElementById("manifest-form").submit();</script>
</body>
</html>
"""


# -- the credentials --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppCredentials:
    """What GitHub returns for a new App. The secrets never show in ``repr``."""

    app_id: int
    slug: str
    name: str
    html_url: str
    client_id: str
    pem: str = field(repr=False)
    webhook_secret: str | None = field(repr=False)
    client_secret: str = field(repr=False)

    @property
    def install_url(self) -> str:
        return f"{self.html_url.rstrip('/')}/installations/new"


def parse_conversion(body: Any) -> AppCredentials:
    """The credentials in GitHub's answer to the code exchange."""
    if not isinstance(body, dict):
        raise SetupError("GitHub's answer to the code exchange is not a JSON object")

    def text(key: str, *, optional: bool = False) -> Any:
        value = body.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise SetupError(f"GitHub's answer to the code exchange has no {key}")
        return value

    app_id = body.get("id")
    if not isinstance(app_id, int) or isinstance(app_id, bool) or app_id <= 0:
        raise SetupError("GitHub's answer to the code exchange has no App id")
    slug, html_url = text("slug"), text("html_url")
    if not _SLUG.fullmatch(slug):
        raise SetupError(f"GitHub's answer to the code exchange has an odd slug {slug!r}")
    if urlsplit(html_url).scheme not in ("http", "https") or any(c.isspace() for c in html_url):
        raise SetupError(f"GitHub's answer to the code exchange has an odd html_url {html_url!r}")
    return AppCredentials(
        app_id=app_id,
        slug=slug,
        name=str(body.get("name") or slug),
        html_url=html_url,
        client_id=text("client_id"),
        pem=text("pem"),
        webhook_secret=text("webhook_secret", optional=True),
        client_secret=text("client_secret"),
    )


def default_key_file(env_file: Path) -> Path:
    """The private key's file: beside the env file, named after it."""
    return env_file.with_name(env_file.name + KEY_FILE_SUFFIX)


def env_file_text(
    credentials: AppCredentials,
    key_file: Path,
    *,
    api_url: str = DEFAULT_API_URL,
    web_url: str = DEFAULT_WEB_URL,
) -> str:
    """The env file: the App's settings as ``NAME=value`` lines (docs/configuration.md),
    readable by a POSIX shell (``set -a; . FILE``) and systemd's ``EnvironmentFile``.
    The key stays in its own file, named by ``GITHUB_PRIVATE_KEY_PATH``."""
    settings: list[tuple[str, str]] = [
        ("GITHUB_APP_ID", str(credentials.app_id)),
        ("GITHUB_PRIVATE_KEY_PATH", str(key_file)),
    ]
    if credentials.webhook_secret is not None:
        settings.append(("GITHUB_WEBHOOK_SECRET", credentials.webhook_secret))
    settings += [
        ("GITHUB_CLIENT_ID", credentials.client_id),
        ("GITHUB_CLIENT_SECRET", credentials.client_secret),
    ]
    # GitHub Enterprise Server: the service must talk to the same GitHub.
    if api_url != DEFAULT_API_URL:
        settings.append(("GITHUB_API_URL", api_url))
    if web_url != DEFAULT_WEB_URL:
        settings.append(("GITHUB_WEB_URL", web_url))
    lines = [
        f"# The GitHub App {credentials.slug} (id {credentials.app_id}), written by"
        f" `{PROG} setup`.",
        "# Secret: readable by its owner alone. The private key is in GITHUB_PRIVATE_KEY_PATH.",
        *(f"{name}={_env_value(value)}" for name, value in settings),
    ]
    return "\n".join(lines) + "\n"


def _env_value(value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise SetupError("a value for the env file spans lines")  # never from GitHub
    return value if _PLAIN_VALUE.fullmatch(value) else shlex.quote(value)


def check_writable(paths: list[Path], *, force: bool) -> None:
    """Refuse, before GitHub creates anything, what writing the files would refuse."""
    for path in paths:
        if path.is_dir():
            raise SetupError(f"{path} is a folder")
        if path.exists() and not force:
            raise SetupError(f"{path} exists: give --force to replace it, or choose another file")
        folder = path.parent
        if not folder.is_dir():
            raise SetupError(f"the folder of {path} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SetupError(f"cannot write in {folder}")


def write_private(path: Path, text: str, *, force: bool) -> None:
    """Write ``path`` readable and writable by its owner alone: the file is created with
    mode 0600, so no other user can open it even for a moment. Without ``force`` an
    existing file is refused; with it, the file is replaced at once (a new 0600 file,
    renamed over it), so the old file's mode is not kept."""
    data = text.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    target = path if not force else path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise SetupError(f"{path} exists: give --force to replace it") from None
    except OSError as exc:
        raise SetupError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if force:
            os.replace(target, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise SetupError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_credentials(
    credentials: AppCredentials,
    env_file: Path,
    key_file: Path,
    *,
    force: bool = False,
    api_url: str = DEFAULT_API_URL,
    web_url: str = DEFAULT_WEB_URL,
) -> None:
    """The key file first, then the env file that names it."""
    key_file = key_file.absolute()  # the service may start from another folder
    write_private(key_file, credentials.pem, force=force)
    text = env_file_text(credentials, key_file, api_url=api_url, web_url=web_url)
    try:
        write_private(env_file, text, force=force)
    except SetupError as exc:
        raise SetupError(
            f"{exc}; the private key is in {key_file}, and the webhook and client secrets"
            f" can be made again on the App's settings page ({credentials.html_url})"
        ) from None


# -- the flow -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetupOptions:
    public_url: str  # where GitHub sends webhooks: <public_url>/api/github/webhooks
    org: str | None  # None: the signed-in user's own account
    name: str | None = None  # None: app.yml's
    env_file: Path = DEFAULT_ENV_FILE
    key_file: Path | None = None  # None: beside the env file
    force: bool = False
    web_url: str = DEFAULT_WEB_URL
    api_url: str = DEFAULT_API_URL
    port: int = 0  # 0: a free one
    open_browser: bool = True
    manifest_file: Path = MANIFEST_FILE

    @property
    def key_path(self) -> Path:
        return self.key_file if self.key_file is not None else default_key_file(self.env_file)


class _Transient(Exception):
    """GitHub could not be asked; the same code may work when the page is reloaded."""


async def convert_code(session: aiohttp.ClientSession, api_url: str, code: str) -> Any:
    """Exchange the manifest flow's one-time code for the new App's credentials. No
    authentication: the code is the credential."""
    import aiohttp

    from app.github.client import REQUESTER  # the app's User-Agent

    url = f"{api_url.rstrip('/')}/app-manifests/{quote(code, safe='')}/conversions"
    headers = {
        "Accept": "application/vnd.github+json",
        "User-Agent": REQUESTER,
        "X-GitHub-Api-Version": API_VERSION,
    }
    try:
        async with session.post(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=CONVERSION_TIMEOUT)
        ) as response:
            status, text = response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _Transient(f"GitHub could not be reached: {exc or type(exc).__name__}") from None
    if status >= 500:
        raise _Transient(f"GitHub answered {status}")
    if status != 201:
        try:
            message = json.loads(text).get("message") or ""
        except (ValueError, AttributeError):
            message = ""
        raise SetupError(
            f"GitHub refused the code ({status}{': ' + message if message else ''});"
            " a code works once and for an hour: run the setup again"
        )
    try:
        return json.loads(text)
    except ValueError:
        raise SetupError("GitHub's answer to the code exchange is not JSON") from None


class ManifestFlow:
    """The local half of the manifest flow: the page that sends the manifest to GitHub,
    and the callback GitHub's redirect lands on. ``start``, then ``wait`` for the
    credentials (written by then), then ``close``."""

    def __init__(
        self,
        options: SetupOptions,
        template: Mapping[str, Any],
        session: aiohttp.ClientSession,
    ) -> None:
        self.options = options
        self.template = template
        self.session = session
        self.state = secrets.token_urlsafe(32)  # proves a callback comes from this run
        # The page's path, so only who has the printed link can read the state from it.
        self.page_path = "/" + secrets.token_urlsafe(16)
        self.manifest: dict[str, Any] = {}
        self.action = new_app_url(options.web_url, self.state, org=options.org)
        self._runner: web.AppRunner | None = None
        self._done: asyncio.Future[AppCredentials] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> str:
        """Listen on 127.0.0.1; the address of the page to open."""
        from aiohttp import web

        self._done = asyncio.get_running_loop().create_future()
        app = web.Application()
        app.router.add_get(self.page_path, self._page)
        app.router.add_get(CALLBACK_PATH, self._callback, allow_head=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, "127.0.0.1", self.options.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise SetupError(
                f"cannot listen on 127.0.0.1:{self.options.port}: {exc.strerror or exc}"
            ) from None
        port = self._runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        self.manifest = build_manifest(
            self.template,
            public_url=self.options.public_url,
            redirect_url=base + CALLBACK_PATH,
            name=self.options.name,
        )
        return base + self.page_path

    async def wait(self) -> AppCredentials:
        assert self._done is not None, "start() first"
        return await self._done

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _page(self, request: web.Request) -> web.Response:
        return _html(200, form_page(self.action, self.manifest))

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        assert self._done is not None
        state = request.query.get("state", "")
        if not secrets.compare_digest(state.encode(), self.state.encode()):
            return _message(
                400,
                "Wrong or missing state",
                "This link does not come from this run of the setup. Nothing was written.",
            )
        code = request.query.get("code", "")
        if not code:
            return _message(400, "No code", "GitHub's redirect carries a code; this has none.")
        async with self._lock:  # a reload while the exchange runs waits for it
            if self._done.done():
                return _message(410, "Already done", "This setup has finished.")
            try:
                credentials = await self._finish(code)
            except _Transient as exc:
                return _message(
                    502,
                    "GitHub could not be reached",
                    f"{exc}. Reload this page to try again (the code works for an hour).",
                )
            except Exception as exc:
                failed = _message(502, "The setup failed", f"{exc}.")
                await _send(request, failed)  # before the command stops the server
                self._done.set_exception(exc)
                return failed
            response = _message(
                200,
                f"Created the GitHub App {credentials.name}",
                "Its credentials are written; the command line says where. Next, install"
                " the App on the repositories it should work in.",
                link=(credentials.install_url, "Install the App"),
            )
            await _send(request, response)
            self._done.set_result(credentials)
            return response

    async def _finish(self, code: str) -> AppCredentials:
        body = await convert_code(self.session, self.options.api_url, code)
        credentials = parse_conversion(body)
        write_credentials(
            credentials,
            self.options.env_file,
            self.options.key_path,
            force=self.options.force,
            api_url=self.options.api_url,
            web_url=self.options.web_url,
        )
        return credentials


async def _send(request: web.Request, response: web.Response) -> None:
    await response.prepare(request)
    await response.write_eof()


def _html(status: int, text: str) -> web.Response:
    from aiohttp import web

    return web.Response(
        status=status,
        text=text,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _message(
    status: int, title: str, text: str, *, link: tuple[str, str] | None = None
) -> web.Response:
    more = (
        f'<p><a href="{html.escape(link[0], quote=True)}">{html.escape(link[1])}</a></p>\n'
        if link
        else ""
    )
    return _html(
        status,
        f'<!doctype html>\n<html lang="en">\n<head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        f"<p>{html.escape(text)}</p>\n{more}</body>\n</html>\n",
    )


async def setup(options: SetupOptions, *, out: Callable[[str], None] = print) -> AppCredentials:
    """The whole command: check the files can be written, run the flow until GitHub's
    redirect comes back, and say what to do next. Never prints a secret."""
    import aiohttp

    files = [options.env_file, options.key_path]
    check_writable(files, force=options.force)
    template = load_manifest(options.manifest_file)
    if _is_local(options.public_url):
        out(
            f"note: GitHub cannot send webhooks to {options.public_url}; give the address"
            " GitHub reaches the service at (a tunnel in development)"
        )
    async with aiohttp.ClientSession() as session:
        flow = ManifestFlow(options, template, session)
        url = await flow.start()
        try:
            where = f"the organisation {options.org}" if options.org else "your account"
            out(f"To create the GitHub App on {where}, open this page in your browser:")
            out(f"  {url}")
            out("Waiting for GitHub (Ctrl-C to give up)...")
            if options.open_browser:
                _open_browser(url)
            credentials = await flow.wait()
        finally:
            await flow.close()
    names = "GITHUB_APP_ID, GITHUB_PRIVATE_KEY_PATH, " + (
        "GITHUB_WEBHOOK_SECRET, " if credentials.webhook_secret is not None else ""
    )
    out(f"Created the GitHub App {credentials.name} (id {credentials.app_id}):")
    out(f"  {credentials.html_url}")
    out(f"Wrote {options.env_file} ({names}GITHUB_CLIENT_ID, GITHUB_CLIENT_SECRET)")
    out(f"and the private key {options.key_path}, both readable by you alone.")
    if credentials.webhook_secret is None:
        out(
            "warning: GitHub returned no webhook secret: set one on the App's settings page"
            " and in GITHUB_WEBHOOK_SECRET, or webhooks are refused"
        )
    out("Next:")
    out(
        "  1. Install the App on the runner repository, the control repository and the"
        " repositories that opt in to sweeps:"
    )
    out(f"     {credentials.install_url}")
    out(
        f"  2. Start the service with these settings, e.g. `set -a; . {_sourced(options.env_file)};"
        f" set +a; {PROG} serve` (see docs/setup.md)."
    )
    return credentials


def _sourced(path: Path) -> str:
    # `. FILE` looks FILE up on PATH when it has no slash.
    text = str(path)
    return shlex.quote(text if "/" in text else f"./{text}")


def _open_browser(url: str) -> None:
    # A thread of its own: a terminal browser may hold it until it quits, and the
    # server must answer meanwhile. A daemon, so the command need not wait for it.
    def open_it() -> None:
        with contextlib.suppress(webbrowser.Error):
            webbrowser.open(url)

    threading.Thread(target=open_it, name="open-browser", daemon=True).start()


def _is_local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the command ----------------------------------------------------------------------------


def _setting(variable: str, attribute: str) -> Callable[[str], str]:
    """An argparse type that reads a flag as the setting ``variable`` would be read."""

    def parse(text: str) -> str:
        try:
            value = getattr(Settings.from_env({variable: text}), attribute)
        except ConfigError as exc:
            message = exc.problems[0].removeprefix(f"{variable}: ")
            raise argparse.ArgumentTypeError(message) from None
        return str(value)

    return parse


def _login(text: str) -> str:
    if not _LOGIN.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a GitHub account name")
    return text.strip()


def _name(text: str) -> str:
    name = text.strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise argparse.ArgumentTypeError(
            f"an App name is 1 to {MAX_NAME_LENGTH} printable characters"
        )
    return name


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The setup command's flags."""
    owner = parser.add_mutually_exclusive_group(required=True)
    owner.add_argument(
        "--org", type=_login, metavar="ORG", help="create the App on this organisation"
    )
    owner.add_argument(
        "--user", action="store_true", help="create the App on your own (personal) account"
    )
    add = parser.add_argument
    add(
        "--public-url",
        required=True,
        type=_setting("UPDATE_PIPELINE_PUBLIC_URL", "public_url"),
        metavar="URL",
        help="the service's public address, where GitHub sends webhooks "
        "(URL/api/github/webhooks), e.g. https://update-pipeline.example.com",
    )
    add(
        "--name",
        type=_name,
        help=f"the App's name; unique across GitHub, which asks for another when it is "
        f"taken (default: app.yml's, {DEFAULT_NAME})",
    )
    add(
        "--env-file",
        type=Path,
        default=DEFAULT_ENV_FILE,
        metavar="FILE",
        help=f"where to write the App's settings (default: ./{DEFAULT_ENV_FILE})",
    )
    add(
        "--key-file",
        type=Path,
        metavar="FILE",
        help=f"where to write the App's private key (default: the env file's name followed "
        f"by {KEY_FILE_SUFFIX})",
    )
    add("--force", action="store_true", help="replace the env and key files if they exist")
    add(
        "--github-web-url",
        type=_setting("GITHUB_WEB_URL", "github_web_url"),
        metavar="URL",
        help="GitHub's web address (default: $GITHUB_WEB_URL or https://github.com)",
    )
    add(
        "--github-api-url",
        type=_setting("GITHUB_API_URL", "github_api_url"),
        metavar="URL",
        help="GitHub's API address (default: $GITHUB_API_URL or https://api.github.com)",
    )
    add(
        "--port",
        dest="local_port",
        type=_port,
        metavar="PORT",
        default=0,
        help="the local port of the page and of GitHub's redirect (default: a free one)",
    )
    add("--no-browser", action="store_true", help="print the page's address, do not open it")
    add(
        "--manifest",
        type=Path,
        default=MANIFEST_FILE,
        metavar="FILE",
        help="the App manifest to register (default: app.yml of this checkout)",
    )


def options_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> SetupOptions:
    """The options the flags ask for; the GitHub URLs default to the settings'."""
    environment = os.environ if env is None else env
    variables = ("GITHUB_WEB_URL", "GITHUB_API_URL")
    settings = Settings.from_env({k: environment[k] for k in variables if k in environment})
    return SetupOptions(
        public_url=args.public_url,
        org=None if args.user else args.org,
        name=args.name,
        env_file=args.env_file,
        key_file=args.key_file,
        force=args.force,
        web_url=args.github_web_url or settings.github_web_url,
        api_url=args.github_api_url or settings.github_api_url,
        port=args.local_port,
        open_browser=not args.no_browser,
        manifest_file=args.manifest,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``update-pipeline setup``; the exit status (0, 1 on an error, 130 when
    interrupted). Errors are one line on stderr."""
    try:
        asyncio.run(setup(options_from_args(args)))
    except (SetupError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0
