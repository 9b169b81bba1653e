"""Which npm registry npm itself would ask for a package, read from npm's own
configuration: the environment, the project and user ``.npmrc``, then ``npm config get
registry``. The service so asks the same registry, mirror or proxy that ``npm install``
on this host would. No registry address is built in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from yarl import URL

from app.config import Secret
from app.logs import get_logger

log = get_logger("version.npmrc")

NPM_TIMEOUT = 10.0  # seconds for `npm config get registry`; a healthy npm answers in ~1s

# Runs a command (argv, env, cwd) and returns its standard output, or None on any failure.
CommandRunner = Callable[[Sequence[str], Mapping[str, str], Path], str | None]

_ENV_PREFIX = "npm_config_"
_ENV_REF = re.compile(r"(?<!\\)(\\*)\$\{([^${}?]+)(\?)?\}")
_INI_LINE = re.compile(r"^\[([^\]]*)\]\s*$|^([^=]+)(=(.*))?$")
# The characters npm's name rules allow (those encodeURIComponent leaves alone), not
# starting with a dot: every name the providers file accepts (such as @_/x or @a!b/c)
# has a registry URL, and none can leave its path segment.
_NAME_PART = r"[A-Za-z0-9_~!*'()-][A-Za-z0-9._~!*'()-]*"
_PACKAGE_NAME = re.compile(rf"^(?:(@{_NAME_PART})/)?({_NAME_PART})$")
_DEFAULT_PORTS = {"http": 80, "https": 443}

# A config key's value and where it was read ("environment npm_config_registry", a path).
_Layer = dict[str, tuple[str, str]]


# -- .npmrc ---------------------------------------------------------------------------


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` as npm does: an unset name stays as written, ``${NAME?}``
    becomes empty instead, and an odd number of backslashes before ``$`` escapes it."""

    def replace(match: re.Match[str]) -> str:
        escapes, name, optional = match[1], match[2], match[3]
        if len(escapes) % 2:
            return match[0][(len(escapes) + 1) // 2 :]
        value = env.get(name)
        if value is None:
            value = "" if optional else "${" + name + "}"
        return escapes[len(escapes) // 2 :] + value

    return _ENV_REF.sub(replace, text)


def _ini_value(raw: str) -> str:
    """Unquote a key or value the way npm's ini reader does."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        if text[0] == '"':
            with contextlib.suppress(ValueError):
                decoded = json.loads(text)
                if isinstance(decoded, str):
                    return decoded
        return text[1:-1]
    # Unquoted text ends at the first ; or # not escaped by a backslash.
    out: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            out.append(char if char in "\\;#" else "\\" + char)
            escaped = False
        elif char in ";#":
            break
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    if escaped:
        out.append("\\")
    return "".join(out).strip()


def parse_npmrc(text: str, env: Mapping[str, str]) -> dict[str, str]:
    """The top-level ``key=value`` settings of an ``.npmrc``, ``${VAR}`` expanded in keys
    and values. Later lines win; arrays (``key[]``) and ``[sections]`` are skipped, since
    npm reads neither as a registry or token setting."""
    values: dict[str, str] = {}
    in_section = False
    for line in re.split(r"[\r\n]+", text):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        match = _INI_LINE.match(line)
        if match is None:
            continue
        if match[1] is not None:
            in_section = True
            continue
        key = expand_env(_ini_value(match[2]), env)
        if in_section or not key or key.endswith("[]"):
            continue
        value = _ini_value(match[4]) if match[3] else "true"
        values[key] = expand_env(value, env)
    return values


def _env_layer(env: Mapping[str, str]) -> _Layer:
    """npm's ``npm_config_*`` variables, keyed as npm keys them."""
    names = [name for name in env if name.lower().startswith(_ENV_PREFIX)]
    # npm takes NPM_CONFIG_X and npm_config_x alike and lets the later one in the
    # environment win; putting the lowercase spelling last makes it win always, so the
    # answer does not hang on the environment's order (and npm's docs say Node prefers it).
    names.sort(key=lambda name: name.startswith(_ENV_PREFIX))
    layer: _Layer = {}
    for name in names:
        value = env[name]
        if not value:  # npm ignores empty values
            continue
        key = name[len(_ENV_PREFIX) :]
        if not key.startswith("//"):  # a registry-scoped key keeps its case and underscores
            key = (key[:1] + key[1:].replace("_", "-")).lower()
        layer[expand_env(key, env)] = (expand_env(value, env), f"environment {name}")
    return layer


def _file_layer(path: Path, env: Mapping[str, str]) -> _Layer:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("cannot read %s, ignoring it: %s", path, exc.strerror or type(exc).__name__)
        return {}
    except UnicodeDecodeError:  # its message would quote the file's bytes
        log.warning("cannot read %s, ignoring it: not UTF-8 text", path)
        return {}
    return {
        key: (value, str(path) if key == "registry" else f"{path} ({key})")
        for key, value in parse_npmrc(text, env).items()
    }


def _lookup(layers: Sequence[_Layer], key: str) -> tuple[str, str] | None:
    return next((layer[key] for layer in layers if key in layer), None)


# -- registry resolution ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NpmRegistry:
    """Where npm would fetch a package from, and the token it would send there."""

    url: str  # the base URL, ending with a slash
    origin: str  # where the URL was found, for the log
    token: Secret | None = None

    def package_url(self, package: str) -> str:
        return self.url + escape_package_name(package)

    def headers(self) -> dict[str, str]:
        return {} if self.token is None else {"Authorization": f"Bearer {self.token.reveal()}"}

    def describe(self) -> str:
        auth = ", with an auth token" if self.token is not None else ""
        return f"{self.url} (from {self.origin}{auth})"


def escape_package_name(package: str) -> str:
    """The name as it appears in the registry's URL: ``@scope%2fname``, as npm sends it."""
    if len(package) > 214 or _PACKAGE_NAME.match(package) is None:
        raise ValueError(f"{package[:80]!r} is not an npm package name")
    return package.replace("/", "%2f")


def package_scope(package: str) -> str | None:
    match = _PACKAGE_NAME.match(package)
    if match is None:
        raise ValueError(f"{package[:80]!r} is not an npm package name")
    return match[1]


def normalise_registry_url(value: str) -> str | None:
    """The registry's base URL with a trailing slash, or None unless it is a plain http(s)
    URL. Credentials inside the URL are refused: they would show in every log line."""
    try:
        url = URL(value.strip())
    except (TypeError, ValueError):
        return None
    if url.scheme not in _DEFAULT_PORTS or not url.host or url.user or url.password:
        return None
    if url.raw_query_string or url.raw_fragment:
        return None
    path = url.raw_path if url.raw_path.endswith("/") else url.raw_path + "/"
    return str(url.with_path(path, encoded=True))


def _nerf_darts(url: str) -> list[str]:
    """The keys npm tries for a registry's credentials, most specific first:
    ``//host:port/path/``, ``//host:port/path``, ... down to ``//host:port``."""
    parsed = URL(url)
    host = parsed.host_subcomponent or ""
    if parsed.explicit_port is not None and parsed.explicit_port != _DEFAULT_PORTS.get(
        parsed.scheme
    ):
        host += f":{parsed.explicit_port}"
    key = f"//{host}{parsed.raw_path}"
    keys = []
    while len(key) > 2:
        keys.append(key)
        key = re.sub(r"([^/]+|/)$", "", key)
    return keys


def _auth_token(layers: Sequence[_Layer], url: str) -> Secret | None:
    for prefix in _nerf_darts(url):
        found = _lookup(layers, f"{prefix}:_authToken")
        if found is not None and found[0]:
            return Secret(found[0])
    return None


def run_command(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path, *, timeout: float = NPM_TIMEOUT
) -> str | None:
    """A command's standard output, run without a shell; None if it cannot start, fails,
    or overruns ``timeout`` (then it is killed, with whatever it started)."""
    try:
        process = subprocess.Popen(  # noqa: S603 -- a fixed argv, no shell
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,  # its own process group, so a timeout kills it all
        )
    except OSError as exc:
        log.warning("cannot run %s: %s", argv[0], exc.strerror or type(exc).__name__)
        return None
    with process:
        try:
            stdout, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Killing the leader alone would leave node's children holding the pipe open.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            log.warning("%s did not answer within %ss", argv[0], timeout)
            return None
    if process.returncode != 0:
        log.warning("%s exited with status %s", argv[0], process.returncode)
        return None
    return stdout.decode("utf-8", "replace")


def _ask_npm(
    npm: str, env: Mapping[str, str], cwd: Path, run: CommandRunner
) -> tuple[str, str] | None:
    executable = shutil.which(npm, path=env.get("PATH", ""))
    if executable is None:
        log.debug("no %s on PATH, so no `npm config get registry`", npm)
        return None
    # The update check would reach out to a registry while we only want to read config.
    quiet_env = {**env, "npm_config_update_notifier": "false"}
    output = run([executable, "config", "get", "registry"], quiet_env, cwd)
    lines = [line.strip() for line in (output or "").splitlines() if line.strip()]
    if not lines or lines[-1] in ("undefined", "null"):
        return None
    return lines[-1], "npm config get registry"


def resolve_registry(
    package: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
    npm: str = "npm",
    run: CommandRunner | None = None,
    npm_timeout: float = NPM_TIMEOUT,
) -> NpmRegistry | None:
    """The registry npm would use for ``package``, or None when none can be found.

    In order: ``npm_config_registry`` in the environment (any case; the lowercase one
    wins), ``registry=`` in ``cwd/.npmrc``, then in the user ``.npmrc``
    (``npm_config_userconfig`` or ``home/.npmrc``), then ``npm config get registry``
    (``npm`` looked up on the PATH of ``env``). A ``@scope:registry`` setting from any of
    the first three beats them all for a package of that scope. The token is the
    ``//host/path/:_authToken`` whose prefix is the longest match for the registry's URL.

    Blocking (it reads files and may start npm): call it through ``asyncio.to_thread``.
    """
    scope = package_scope(package)
    environ = os.environ if env is None else env
    workdir = Path.cwd() if cwd is None else cwd
    home_dir = home or (Path(environ["HOME"]) if environ.get("HOME") else Path.home())
    env_layer = _env_layer(environ)
    project = _file_layer(workdir / ".npmrc", environ)
    user = _file_layer(_user_config(env_layer, project, home_dir, workdir), environ)
    layers = (env_layer, project, user)
    found = _lookup(layers, f"{scope}:registry") if scope else None
    if found is None:
        found = _lookup(layers, "registry")
    if found is None:
        runner = run or partial(run_command, timeout=npm_timeout)
        found = _ask_npm(npm, environ, workdir, runner)
    if found is None:
        return None
    value, origin = found
    url = normalise_registry_url(value)
    if url is None:
        # The value is not logged: it may carry credentials.
        log.warning("the npm registry set by %s is not a plain http(s) URL", origin)
        return None
    return NpmRegistry(url, origin, _auth_token(layers, url))


def _user_config(env_layer: _Layer, project: _Layer, home: Path, cwd: Path) -> Path:
    found = _lookup((env_layer, project), "userconfig")
    if found is None:
        return home / ".npmrc"
    text = found[0]
    if text == "~" or text.startswith("~/"):
        return home / text[2:]
    return cwd / text  # an absolute path replaces cwd
