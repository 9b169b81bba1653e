"""Settings: read from the environment once at start, validated, immutable."""

from __future__ import annotations

import dataclasses
import os
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from app.pipeline.version.providers import (
    BUILTIN_PROVIDERS,
    Provider,
    ProvidersFileError,
    providers_from_env,
)

T = TypeVar("T")

_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_DURATION_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
}
DURATION_HELP = "a duration such as 500ms, 30s, 10m, 2h, 3d (or combined, like 1h30m)"


class ConfigError(ValueError):
    """One or more settings are invalid; each message names its variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_duration(text: str, *, bare_unit: str | None = None) -> timedelta:
    """Parse the one duration syntax every setting and command uses.

    ``bare_unit`` lets variables whose name already carries a unit (the design's
    ``UPDATE_PIPELINE_POLL_INTERVAL_MS``) keep accepting a plain number.
    """
    value = text.strip()
    try:
        if bare_unit is not None and value.isdigit():
            return int(value) * _DURATION_UNITS[bare_unit]
        if not value or _DURATION_PART.sub("", value) != "":
            raise ValueError(f"{text!r} is not {DURATION_HELP}")
        total = timedelta()
        seen: set[str] = set()
        for number, unit in _DURATION_PART.findall(value):
            if unit in seen:
                raise ValueError(f"{text!r} repeats the unit {unit!r}")
            seen.add(unit)
            total += int(number) * _DURATION_UNITS[unit]
        return total
    except OverflowError:
        raise ValueError(f"{text!r} is longer than any duration can be") from None


def format_duration(delta: timedelta) -> str:
    """The inverse of parse_duration, largest units first (``1h30m``)."""
    # Integer division: total_seconds() is a float and loses milliseconds (1.001s).
    ms = delta // _DURATION_UNITS["ms"]
    if ms == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        size = int(_DURATION_UNITS[unit].total_seconds() * 1000)
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true, false, 1 or 0)")


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Settings:
    enabled: bool = False
    auto_canary: bool = False
    polling: bool = False
    poll_interval: timedelta = timedelta(hours=1)
    db_path: Path = Path("update-pipeline.db")
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1024 * 1024
    webhook_max_bytes: int = 25 * 1024 * 1024  # GitHub caps payloads at 25 MiB
    shutdown_timeout: timedelta = timedelta(seconds=30)
    log_format: str = "text"
    log_level: str = "INFO"
    github_app_id: int | None = None
    github_private_key: Secret | None = None
    github_webhook_secret: Secret | None = None
    metrics_token: Secret | None = None  # a bearer token GET /metrics requires, when set
    github_client_id: str | None = None
    github_client_secret: Secret | None = None
    github_api_url: str = "https://api.github.com"
    github_web_url: str = "https://github.com"
    providers: tuple[Provider, ...] = BUILTIN_PROVIDERS
    min_release_age: timedelta = timedelta(0)
    package_page_url: str | None = None  # template with {package} and {version}
    runner_repo: str | None = None  # owner/name of the runner repository
    control_repo: str | None = None  # owner/name where rollouts are tracked as issues
    notify_team: str | None = None  # @org/team mentioned on automatic rollbacks
    sweep_concurrency: int = 5  # sweep workflow runs in flight at once
    sweep_timeout: timedelta = timedelta(hours=2)
    auto_sweep: bool = False  # sweep after each completed rollout
    sweep_gate: float | None = None  # the share of failed repositories that holds a rollout
    # Slash command -> the permission it needs, where it differs from the defaults.
    command_permissions: tuple[tuple[str, str], ...] = ()
    runtime_manifest: str = "runtimes.json"  # provider -> version, in the runner repository
    public_url: str | None = None  # where people reach this service, for links
    session_ttl: timedelta = timedelta(hours=12)  # how long a dashboard sign-in lasts
    canary_workflow: str = "canary.yml"
    canary_timeout: timedelta = timedelta(minutes=60)
    canary_min_pass_rate: float = 0.95
    canary_max_disconnect_rate: float = 0.05
    heartbeat_retention: timedelta = timedelta(days=7)
    heartbeat_interval: timedelta = timedelta(seconds=30)  # pollAfterSeconds
    stages_stable: str = "1%:1h,10%:2h,50%:4h,100%"  # design section 6.2
    stages_beta: str = "10%:30m,100%"
    max_failure_rate: float = 0.10  # design section 6.1
    max_disconnect_rate: float = 0.15
    min_session_count: int = 100
    max_relative_regression: float | None = None  # off unless set
    rollback_window: timedelta = timedelta(hours=24)
    oidc_issuer: str = "https://token.actions.githubusercontent.com"
    oidc_audience: str = "update-pipeline"

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def secrets(self) -> list[str]:
        """Every secret value, so the log filter can scrub them wherever they appear."""
        found = [
            self.github_webhook_secret,
            self.github_client_secret,
            self.github_private_key,
            self.metrics_token,
        ]
        return [s.reveal() for s in found if s is not None and s.reveal()]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        return _Reader(os.environ if env is None else env).settings()


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Reader:
    """Collects every problem at once, so an operator fixes them in one pass."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def get(
        self, name: str, parse: Callable[[str], T], default: T, *, empty_is_default: bool = True
    ) -> T:
        raw = self.env.get(name)
        if raw is None or (empty_is_default and raw.strip() == ""):
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            self.problems.append(f"{name}: {exc}")
            return default

    def flag(self, name: str, default: bool) -> bool:
        # An empty flag is usually an unset template variable (FLAG=${UNSET}); reading
        # it as the default would be the silent false the design rules out.
        return self.get(name, parse_bool, default, empty_is_default=False)

    def settings(self) -> Settings:
        d = Settings()
        key = self._private_key()
        values = Settings(
            enabled=self.flag("UPDATE_PIPELINE_ENABLED", d.enabled),
            auto_canary=self.flag("UPDATE_PIPELINE_AUTO_CANARY", d.auto_canary),
            polling=self.flag("UPDATE_PIPELINE_POLLING", d.polling),
            poll_interval=self.get(
                "UPDATE_PIPELINE_POLL_INTERVAL_MS", _positive_duration_ms, d.poll_interval
            ),
            db_path=self.get("UPDATE_PIPELINE_DB", Path, d.db_path),
            host=self.get("UPDATE_PIPELINE_HOST", str.strip, d.host),
            port=self.get("UPDATE_PIPELINE_PORT", parse_port, d.port),
            max_body_bytes=self.get(
                "UPDATE_PIPELINE_MAX_BODY_BYTES", _body_limit, d.max_body_bytes
            ),
            webhook_max_bytes=self.get(
                "UPDATE_PIPELINE_WEBHOOK_MAX_BYTES", _body_limit, d.webhook_max_bytes
            ),
            shutdown_timeout=self.get(
                "UPDATE_PIPELINE_SHUTDOWN_TIMEOUT", _positive_duration, d.shutdown_timeout
            ),
            log_format=self.get("UPDATE_PIPELINE_LOG_FORMAT", _choice(LOG_FORMATS), d.log_format),
            log_level=self.get(
                "UPDATE_PIPELINE_LOG_LEVEL", _choice(LOG_LEVELS, upper=True), d.log_level
            ),
            github_app_id=self.get("GITHUB_APP_ID", _app_id, d.github_app_id),
            github_private_key=key,
            github_webhook_secret=self.get("GITHUB_WEBHOOK_SECRET", Secret, None),
            metrics_token=self.get("UPDATE_PIPELINE_METRICS_TOKEN", Secret, None),
            github_client_id=self.get("GITHUB_CLIENT_ID", str.strip, None),
            github_client_secret=self.get("GITHUB_CLIENT_SECRET", Secret, None),
            github_api_url=self.get("GITHUB_API_URL", _base_url, d.github_api_url),
            github_web_url=self.get("GITHUB_WEB_URL", _base_url, d.github_web_url),
            providers=self._providers(),
            min_release_age=self.get(
                "UPDATE_PIPELINE_MIN_RELEASE_AGE", _duration, d.min_release_age
            ),
            package_page_url=self.get(
                "UPDATE_PIPELINE_PACKAGE_PAGE_URL", _page_template, d.package_page_url
            ),
            runner_repo=self.get("UPDATE_PIPELINE_RUNNER_REPO", _repo_name, d.runner_repo),
            control_repo=self.get("UPDATE_PIPELINE_CONTROL_REPO", _repo_name, d.control_repo),
            notify_team=self.get("UPDATE_PIPELINE_NOTIFY_TEAM", _team, d.notify_team),
            sweep_concurrency=self.get(
                "UPDATE_PIPELINE_SWEEP_CONCURRENCY", _positive_int, d.sweep_concurrency
            ),
            sweep_timeout=self.get(
                "UPDATE_PIPELINE_SWEEP_TIMEOUT", _positive_duration, d.sweep_timeout
            ),
            auto_sweep=self.flag("UPDATE_PIPELINE_AUTO_SWEEP", d.auto_sweep),
            sweep_gate=self.get("UPDATE_PIPELINE_SWEEP_GATE", _rate, d.sweep_gate),
            command_permissions=self.get(
                "UPDATE_PIPELINE_COMMAND_PERMISSIONS", _command_permissions, d.command_permissions
            ),
            runtime_manifest=self.get(
                "UPDATE_PIPELINE_RUNTIME_MANIFEST", _repo_path, d.runtime_manifest
            ),
            public_url=self.get("UPDATE_PIPELINE_PUBLIC_URL", _public_url, d.public_url),
            session_ttl=self.get("UPDATE_PIPELINE_SESSION_TTL", _positive_duration, d.session_ttl),
            canary_workflow=self.get(
                "UPDATE_PIPELINE_CANARY_WORKFLOW", _workflow_file, d.canary_workflow
            ),
            canary_timeout=self.get(
                "UPDATE_PIPELINE_CANARY_TIMEOUT", _positive_duration, d.canary_timeout
            ),
            canary_min_pass_rate=self.get(
                "UPDATE_PIPELINE_CANARY_MIN_PASS_RATE", _rate, d.canary_min_pass_rate
            ),
            canary_max_disconnect_rate=self.get(
                "UPDATE_PIPELINE_CANARY_MAX_DISCONNECT_RATE", _rate, d.canary_max_disconnect_rate
            ),
            heartbeat_retention=self.get(
                "UPDATE_PIPELINE_HEARTBEAT_RETENTION", _positive_duration, d.heartbeat_retention
            ),
            heartbeat_interval=self.get(
                "UPDATE_PIPELINE_HEARTBEAT_INTERVAL", _whole_seconds, d.heartbeat_interval
            ),
            stages_stable=self.get("UPDATE_PIPELINE_STAGES_STABLE", _stages, d.stages_stable),
            stages_beta=self.get("UPDATE_PIPELINE_STAGES_BETA", _stages, d.stages_beta),
            max_failure_rate=self.get(
                "UPDATE_PIPELINE_MAX_FAILURE_RATE", _rate, d.max_failure_rate
            ),
            max_disconnect_rate=self.get(
                "UPDATE_PIPELINE_MAX_DISCONNECT_RATE", _rate, d.max_disconnect_rate
            ),
            min_session_count=self.get(
                "UPDATE_PIPELINE_MIN_SESSION_COUNT", _positive_int, d.min_session_count
            ),
            max_relative_regression=self.get(
                "UPDATE_PIPELINE_MAX_RELATIVE_REGRESSION", _rate, d.max_relative_regression
            ),
            rollback_window=self.get(
                "UPDATE_PIPELINE_ROLLBACK_WINDOW", _duration, d.rollback_window
            ),
            oidc_issuer=self.get("UPDATE_PIPELINE_OIDC_ISSUER", _issuer, d.oidc_issuer),
            oidc_audience=self.get("UPDATE_PIPELINE_OIDC_AUDIENCE", _audience, d.oidc_audience),
        )
        if (values.github_app_id is None) != (values.github_private_key is None) and not any(
            p.startswith("GITHUB_PRIVATE_KEY") for p in self.problems
        ):
            self.problems.append(
                "GITHUB_APP_ID and a private key (GITHUB_PRIVATE_KEY or GITHUB_PRIVATE_KEY_PATH)"
                " go together: set both, or neither to run without GitHub"
            )
        if self.problems:
            raise ConfigError(self.problems)
        return values

    def _providers(self) -> tuple[Provider, ...]:
        try:
            return providers_from_env(self.env.get("UPDATE_PIPELINE_PROVIDERS_FILE"))
        except ProvidersFileError as exc:
            self.problems.extend(f"UPDATE_PIPELINE_PROVIDERS_FILE: {p}" for p in exc.problems)
            return BUILTIN_PROVIDERS

    def _private_key(self) -> Secret | None:
        inline = self.env.get("GITHUB_PRIVATE_KEY", "").strip()
        path = self.env.get("GITHUB_PRIVATE_KEY_PATH", "").strip()
        if inline and path:
            self.problems.append(
                "GITHUB_PRIVATE_KEY and GITHUB_PRIVATE_KEY_PATH are both set: use only one"
            )
            return None
        if inline:
            # Many secret stores cannot hold newlines, so a literal \n is accepted.
            return Secret(inline.replace("\\n", "\n"))
        if path:
            try:
                return Secret(Path(path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                self.problems.append(f"GITHUB_PRIVATE_KEY_PATH: cannot read {path}: {reason}")
        return None


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a port number (0 to 65535)") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a port number (0 to 65535)")
    return port


def _positive_duration_ms(text: str) -> timedelta:
    return _positive_duration(text, bare_unit="ms")


def _positive_duration(text: str, bare_unit: str | None = None) -> timedelta:
    value = parse_duration(text, bare_unit=bare_unit)
    if value <= timedelta(0):
        raise ValueError(f"{text!r} must be greater than zero")
    return value


_REPO = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")
_WORKFLOW = re.compile(r"^(?:\.github/workflows/)?[A-Za-z0-9._-]+\.ya?ml$")


def _repo_name(text: str) -> str:
    name = text.strip()
    if not _REPO.match(name) or name.endswith(("/.", "/..")):
        raise ValueError(f"{text!r} is not a repository as owner/name")
    return name


_TEAM = re.compile(r"^@?([A-Za-z0-9](?:[A-Za-z0-9-]{0,38}))/([A-Za-z0-9._-]{1,100})$")


def _team(text: str) -> str:
    match = _TEAM.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a team as @org/team-slug")
    return f"@{match[1]}/{match[2]}"


_LEVELS = ("read", "triage", "write", "maintain", "admin")
_COMMAND_NAME = re.compile(r"^/?([a-z][a-z0-9_-]*)$")


def _command_permissions(text: str) -> tuple[tuple[str, str], ...]:
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, level = (x.strip() for x in part.partition("="))
        match = _COMMAND_NAME.match(name.lower())
        if not sep or not match or level.lower() not in _LEVELS:
            raise ValueError(
                f"{part!r} is not COMMAND=LEVEL with LEVEL one of {', '.join(_LEVELS)}"
                " (such as pause=maintain)"
            )
        pairs[match[1]] = level.lower()
    return tuple(sorted(pairs.items()))


def _public_url(text: str) -> str:
    url = _base_url(text)
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: a base URL, without a query or fragment")
    return url


def _repo_path(text: str) -> str:
    path = text.strip().strip("/")
    parts = path.split("/")
    if not path or any(part in ("", ".", "..") for part in parts) or len(path) > 500:
        raise ValueError(f"{text!r} is not a file path in a repository")
    return path


def _workflow_file(text: str) -> str:
    name = text.strip()
    if not _WORKFLOW.match(name):
        raise ValueError(f"{text!r} is not a workflow file name such as canary.yml")
    return name.removeprefix(".github/workflows/")


def _issuer(text: str) -> str:
    # Imported here: the verifier's module is not needed to read settings otherwise.
    from app.github.oidc import issuer_problem

    url = _base_url(text)
    problem = issuer_problem(url)
    if problem is not None:
        raise ValueError(f"{text!r}: {problem}")
    return url


def _stages(text: str) -> str:
    # Imported here, like the issuer check: the rollout module is not needed otherwise.
    from app.rollouts.plan import format_stages, parse_stages

    return format_stages(parse_stages(text))


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number between 0 and 1") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text!r} is not a number between 0 and 1")
    return value


def _audience(text: str) -> str:
    value = text.strip()
    if not value or len(value) > 200 or any(c.isspace() for c in value):
        raise ValueError(f"{text!r} is not an audience (1 to 200 characters, no spaces)")
    return value


def _whole_seconds(text: str) -> timedelta:
    value = parse_duration(text)
    seconds = value.total_seconds()
    if seconds < 1 or seconds > 3600 or seconds != int(seconds):
        raise ValueError(f"{text!r} is not a whole number of seconds from 1s to 1h")
    return value


def _duration(text: str) -> timedelta:
    return parse_duration(text)


def _page_template(text: str) -> str:
    """A URL template with only {package} and {version} in it."""
    template = text.strip()
    if "{{" in template or "}}" in template:
        raise ValueError(f"{text!r}: braces may only enclose {{package}} or {{version}}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        template.format(package="p", version="1.0.0")
    except (ValueError, IndexError, KeyError):
        fields = {"?"}
    if not fields <= {"package", "version"}:
        raise ValueError(f"{text!r}: only {{package}} and {{version}} may appear in braces")
    try:
        _base_url(template.format(package="p", version="1.0.0"))
    except ValueError:
        raise ValueError(f"{text!r} is not an http(s) URL template") from None
    return template


def _body_limit(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1024:
        raise ValueError(f"{text!r} is not a byte count of at least 1024")
    return int(text)


def _app_id(text: str) -> int:
    if not text.strip().isdigit() or int(text) == 0:
        raise ValueError(f"{text!r} is not a GitHub App id (a positive integer)")
    return int(text)


def _base_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text.strip().rstrip("/")


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().upper() if upper else text.strip().lower()
        if value not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return value

    return parse
