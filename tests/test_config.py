"""Settings from the environment: defaults, validation, durations and secrets."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from app.config import (
    ConfigError,
    Secret,
    Settings,
    format_duration,
    parse_bool,
    parse_duration,
    parse_port,
)

ENABLED = "UPDATE_PIPELINE_ENABLED"
POLL = "UPDATE_PIPELINE_POLL_INTERVAL_MS"
BOOLEANS = ("UPDATE_PIPELINE_ENABLED", "UPDATE_PIPELINE_AUTO_CANARY", "UPDATE_PIPELINE_POLLING")
FIELD_OF = {
    "UPDATE_PIPELINE_ENABLED": "enabled",
    "UPDATE_PIPELINE_AUTO_CANARY": "auto_canary",
    "UPDATE_PIPELINE_POLLING": "polling",
}
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n"


def config_error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    return caught.value


# -- Defaults -------------------------------------------------------------------------


def test_an_empty_environment_gives_the_documented_defaults() -> None:
    settings = Settings.from_env({})

    assert settings.enabled is False
    assert settings.auto_canary is False
    assert settings.polling is False
    assert settings.poll_interval == timedelta(milliseconds=3_600_000) == timedelta(hours=1)
    assert settings.db_path == Path("./update-pipeline.db")
    assert not settings.db_path.is_absolute()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.github_api_url == "https://api.github.com"
    assert settings.github_web_url == "https://github.com"
    assert settings.github_app_id is None
    assert settings.github_private_key is None
    assert settings.github_webhook_secret is None
    assert settings.github_client_id is None
    assert settings.github_client_secret is None
    assert settings.log_format == "text"
    assert settings.log_level == "INFO"
    assert [p.id for p in settings.providers] == ["claude_code", "codex", "gemini_cli"]
    assert settings.min_release_age == timedelta(0)
    assert settings.package_page_url is None


def test_without_an_argument_settings_are_read_from_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENABLED, "true")
    monkeypatch.setenv("UPDATE_PIPELINE_PORT", "9123")

    settings = Settings.from_env()

    assert settings.enabled is True
    assert settings.port == 9123


def test_every_documented_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "UPDATE_PIPELINE_ENABLED": "true",
            "UPDATE_PIPELINE_AUTO_CANARY": "1",
            "UPDATE_PIPELINE_POLLING": "TRUE",
            "UPDATE_PIPELINE_POLL_INTERVAL_MS": "90000",
            "UPDATE_PIPELINE_DB": "/var/lib/up/pipeline.db",
            "UPDATE_PIPELINE_HOST": " 0.0.0.0 ",
            "UPDATE_PIPELINE_PORT": "9000",
            "UPDATE_PIPELINE_MAX_BODY_BYTES": "2048",
            "UPDATE_PIPELINE_SHUTDOWN_TIMEOUT": "10s",
            "UPDATE_PIPELINE_LOG_FORMAT": "JSON",
            "UPDATE_PIPELINE_LOG_LEVEL": "debug",
            "GITHUB_APP_ID": "12345",
            "GITHUB_PRIVATE_KEY": "key-material",
            "GITHUB_WEBHOOK_SECRET": "webhook-secret",
            "GITHUB_CLIENT_ID": " Iv1.abc ",
            "GITHUB_CLIENT_SECRET": "client-secret",
            "GITHUB_API_URL": "https://ghe.example.com/api/v3/",
            "GITHUB_WEB_URL": "http://ghe.example.com",
            "UPDATE_PIPELINE_MIN_RELEASE_AGE": "3d",
            "UPDATE_PIPELINE_PACKAGE_PAGE_URL": "https://packages.example/{package}/v/{version}",
        }
    )

    assert settings == Settings(
        enabled=True,
        auto_canary=True,
        polling=True,
        poll_interval=timedelta(seconds=90),
        db_path=Path("/var/lib/up/pipeline.db"),
        host="0.0.0.0",
        port=9000,
        max_body_bytes=2048,
        shutdown_timeout=timedelta(seconds=10),
        log_format="json",
        log_level="DEBUG",
        github_app_id=12345,
        github_private_key=Secret("key-material"),
        github_webhook_secret=Secret("webhook-secret"),
        github_client_id="Iv1.abc",
        github_client_secret=Secret("client-secret"),
        github_api_url="https://ghe.example.com/api/v3",
        github_web_url="http://ghe.example.com",
        min_release_age=timedelta(days=3),
        package_page_url="https://packages.example/{package}/v/{version}",
    )


def test_settings_are_immutable_and_replace_returns_a_changed_copy() -> None:
    settings = Settings.from_env({})

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    changed = settings.replace(port=1234)

    assert changed.port == 1234
    assert settings.port == 8080


# -- Booleans -------------------------------------------------------------------------


@pytest.mark.parametrize("variable", BOOLEANS)
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("1", True),
        (" true ", True),
        ("false", False),
        ("FALSE", False),
        ("False", False),
        ("0", False),
    ],
)
def test_booleans_accept_true_false_1_and_0_in_any_case(
    variable: str, raw: str, expected: bool
) -> None:
    settings = Settings.from_env({variable: raw})

    assert getattr(settings, FIELD_OF[variable]) is expected


@pytest.mark.parametrize("variable", BOOLEANS)
@pytest.mark.parametrize("raw", ["yes", "no", "on", "off", "ture", "2", "t", "enabled", "", "  "])
def test_any_other_boolean_value_is_an_error_naming_the_variable_and_the_accepted_values(
    variable: str, raw: str
) -> None:
    # An empty value counts as a typo too: FLAG=${UNSET} must not silently mean false.
    error = config_error({variable: raw})

    assert len(error.problems) == 1
    (problem,) = error.problems
    assert problem.startswith(f"{variable}: ")
    for accepted in ("true", "false", "1", "0"):
        assert accepted in problem
    assert repr(raw) in problem


def test_parse_bool_rejects_what_it_does_not_know() -> None:
    assert parse_bool("1") is True
    assert parse_bool("0") is False
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("y")


def test_an_empty_non_boolean_variable_means_its_default() -> None:
    settings = Settings.from_env(
        {
            "UPDATE_PIPELINE_PORT": "",
            "UPDATE_PIPELINE_HOST": " ",
            POLL: "",
            "GITHUB_WEBHOOK_SECRET": "",
            "GITHUB_PRIVATE_KEY": "",
        }
    )

    assert settings.port == 8080
    assert settings.host == "127.0.0.1"
    assert settings.poll_interval == timedelta(hours=1)
    assert settings.github_webhook_secret is None
    assert settings.github_private_key is None


# -- Durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("30s", timedelta(seconds=30)),
        ("10m", timedelta(minutes=10)),
        ("2h", timedelta(hours=2)),
        ("3d", timedelta(days=3)),
        ("0s", timedelta(0)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
        ("30m1h", timedelta(hours=1, minutes=30)),
        ("1m1ms", timedelta(minutes=1, milliseconds=1)),
        ("90m", timedelta(minutes=90)),
        (" 45s ", timedelta(seconds=45)),
    ],
)
def test_every_duration_form_parses(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["1h2h", "5s10s", "1ms2ms", "1d1h1d"])
def test_a_duration_that_repeats_a_unit_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="repeats the unit"):
        parse_duration(text)


@pytest.mark.parametrize(
    "text",
    ["", " ", "soon", "10", "10x", "1.5h", "-5s", "h", "5 m", "1mm", "1h 30m", "1w", "5S", "ms"],
)
def test_a_malformed_duration_is_rejected_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="500ms, 30s, 10m, 2h, 3d"):
        parse_duration(text)


def test_a_bare_number_is_only_accepted_when_a_unit_is_implied() -> None:
    assert parse_duration("1500", bare_unit="ms") == timedelta(milliseconds=1500)
    assert parse_duration("2s", bare_unit="ms") == timedelta(seconds=2)
    with pytest.raises(ValueError):
        parse_duration("1500")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3600000", timedelta(hours=1)),
        ("5000", timedelta(seconds=5)),
        ("1", timedelta(milliseconds=1)),
        ("2h", timedelta(hours=2)),
        ("1m30s", timedelta(seconds=90)),
    ],
)
def test_the_poll_interval_takes_bare_milliseconds_or_any_duration(
    raw: str, expected: timedelta
) -> None:
    assert Settings.from_env({POLL: raw}).poll_interval == expected


@pytest.mark.parametrize("raw", ["0", "0ms", "0s", "0h0m"])
def test_a_zero_poll_interval_is_rejected(raw: str) -> None:
    (problem,) = config_error({POLL: raw}).problems

    assert problem.startswith(f"{POLL}: ")
    assert "greater than zero" in problem


@pytest.mark.parametrize("raw", ["soon", "-1", "1.5", "1h1h", "10x"])
def test_a_malformed_poll_interval_is_an_error_naming_the_variable(raw: str) -> None:
    (problem,) = config_error({POLL: raw}).problems

    assert problem.startswith(f"{POLL}: ")


def test_the_shutdown_timeout_uses_the_same_duration_syntax() -> None:
    assert Settings.from_env({"UPDATE_PIPELINE_SHUTDOWN_TIMEOUT": "1m"}).shutdown_timeout == (
        timedelta(minutes=1)
    )
    (problem,) = config_error({"UPDATE_PIPELINE_SHUTDOWN_TIMEOUT": "60"}).problems
    assert problem.startswith("UPDATE_PIPELINE_SHUTDOWN_TIMEOUT: ")


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(seconds=1, milliseconds=1), "1s1ms"),
        (timedelta(days=3, seconds=1), "3d1s"),
        (timedelta(milliseconds=3_600_000), "1h"),
    ],
)
def test_durations_format_with_the_largest_units_first(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text


@given(st.integers(min_value=0, max_value=10**15))
@example(1001)  # a float round trip through total_seconds() loses this one
@example(3 * 86_400_000 + 1)
def test_formatting_then_parsing_a_duration_gives_it_back(milliseconds: int) -> None:
    delta = timedelta(milliseconds=milliseconds)

    assert parse_duration(format_duration(delta)) == delta


@given(st.integers(min_value=0, max_value=10**15))
def test_a_formatted_duration_is_canonical(milliseconds: int) -> None:
    text = format_duration(timedelta(milliseconds=milliseconds))

    assert format_duration(parse_duration(text)) == text


# -- Numbers, URLs and choices --------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"), [("0", 0), ("1", 1), ("8080", 8080), ("65535", 65535)]
)
def test_ports_from_0_to_65535_are_accepted(raw: str, expected: int) -> None:
    assert Settings.from_env({"UPDATE_PIPELINE_PORT": raw}).port == expected
    assert parse_port(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "65536", "100000", "http", "80.5"])
def test_a_port_outside_the_range_is_an_error(raw: str) -> None:
    (problem,) = config_error({"UPDATE_PIPELINE_PORT": raw}).problems

    assert problem.startswith("UPDATE_PIPELINE_PORT: ")
    assert "0 to 65535" in problem


def test_the_body_limit_must_be_a_byte_count_of_at_least_1024() -> None:
    assert Settings.from_env({"UPDATE_PIPELINE_MAX_BODY_BYTES": "1024"}).max_body_bytes == 1024
    for raw in ("1023", "1MiB", "-2048"):
        (problem,) = config_error({"UPDATE_PIPELINE_MAX_BODY_BYTES": raw}).problems
        assert problem.startswith("UPDATE_PIPELINE_MAX_BODY_BYTES: ")


@pytest.mark.parametrize("raw", ["0", "abc", "-3"])
def test_the_app_id_must_be_a_positive_integer(raw: str) -> None:
    (problem,) = config_error({"GITHUB_APP_ID": raw}).problems

    assert problem.startswith("GITHUB_APP_ID: ")


@pytest.mark.parametrize("variable", ["GITHUB_API_URL", "GITHUB_WEB_URL"])
@pytest.mark.parametrize("raw", ["ftp://example.com", "example.com", "https://", "not a url"])
def test_github_urls_must_be_http_or_https(variable: str, raw: str) -> None:
    (problem,) = config_error({variable: raw}).problems

    assert problem.startswith(f"{variable}: ")
    assert "http(s) URL" in problem


@pytest.mark.parametrize(
    ("variable", "raw"),
    [("UPDATE_PIPELINE_LOG_FORMAT", "xml"), ("UPDATE_PIPELINE_LOG_LEVEL", "chatty")],
)
def test_log_settings_name_their_choices(variable: str, raw: str) -> None:
    (problem,) = config_error({variable: raw}).problems

    assert problem.startswith(f"{variable}: ")
    assert "one of" in problem


def test_every_problem_is_reported_at_once() -> None:
    error = config_error(
        {
            ENABLED: "maybe",
            "UPDATE_PIPELINE_PORT": "99999",
            POLL: "0",
            "GITHUB_API_URL": "ftp://x",
            "UPDATE_PIPELINE_HOST": "fine.example.com",
        }
    )

    named = sorted(problem.split(":", 1)[0] for problem in error.problems)
    assert named == sorted([ENABLED, "UPDATE_PIPELINE_PORT", POLL, "GITHUB_API_URL"])
    message = str(error)
    assert "\n" not in message
    for problem in error.problems:
        assert problem in message


# -- The private key and other secrets ------------------------------------------------


def test_an_inline_private_key_with_literal_backslash_n_gets_real_newlines() -> None:
    inline = PEM.strip().replace("\n", "\\n")

    key = Settings.from_env({"GITHUB_PRIVATE_KEY": inline, "GITHUB_APP_ID": "7"}).github_private_key

    assert key is not None
    assert key.reveal() == PEM.strip()
    assert key.reveal().count("\n") == 3


def test_the_private_key_can_be_read_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "app.pem"
    path.write_text(PEM, encoding="utf-8")

    env = {"GITHUB_PRIVATE_KEY_PATH": str(path), "GITHUB_APP_ID": "7"}
    key = Settings.from_env(env).github_private_key

    assert key is not None
    assert key.reveal() == PEM


def test_a_missing_private_key_file_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"

    (problem,) = config_error({"GITHUB_PRIVATE_KEY_PATH": str(missing)}).problems

    assert problem.startswith("GITHUB_PRIVATE_KEY_PATH: ")
    assert str(missing) in problem
    assert "No such file" in problem


def test_a_private_key_path_that_is_a_folder_is_an_error(tmp_path: Path) -> None:
    (problem,) = config_error({"GITHUB_PRIVATE_KEY_PATH": str(tmp_path)}).problems

    assert problem.startswith("GITHUB_PRIVATE_KEY_PATH: cannot read")


def test_a_private_key_file_that_is_not_text_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "key.der"
    path.write_bytes(b"\x30\x82\xff\xfe\x00")

    (problem,) = config_error({"GITHUB_PRIVATE_KEY_PATH": str(path)}).problems

    assert problem.startswith("GITHUB_PRIVATE_KEY_PATH: cannot read")


def test_setting_both_private_key_variables_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "app.pem"
    path.write_text(PEM, encoding="utf-8")

    (problem,) = config_error(
        {"GITHUB_PRIVATE_KEY": "inline", "GITHUB_PRIVATE_KEY_PATH": str(path)}
    ).problems

    assert "GITHUB_PRIVATE_KEY" in problem
    assert "GITHUB_PRIVATE_KEY_PATH" in problem
    assert "only one" in problem


def test_secrets_never_show_in_the_settings_repr_or_str() -> None:
    values = {
        "GITHUB_PRIVATE_KEY": "private-key-value-1",
        "GITHUB_WEBHOOK_SECRET": "webhook-secret-value-2",
        "GITHUB_CLIENT_SECRET": "client-secret-value-3",
    }

    settings = Settings.from_env({**values, "GITHUB_APP_ID": "7"})

    for text in (repr(settings), str(settings), repr(settings.github_webhook_secret)):
        for secret in values.values():
            assert secret not in text
    assert "Secret('***')" in repr(settings)
    assert sorted(settings.secrets()) == sorted(values.values())


def test_a_secret_compares_by_value_without_showing_it() -> None:
    secret = Secret("s3cret-value")

    assert secret == Secret("s3cret-value")
    assert secret != Secret("other-value")
    assert secret != "s3cret-value"
    assert hash(secret) == hash(Secret("s3cret-value"))
    assert "s3cret" not in f"{secret} {secret!r} {[secret]}"
    assert secret.reveal() == "s3cret-value"


def test_settings_list_no_secrets_when_none_are_set() -> None:
    assert Settings.from_env({}).secrets() == []


def test_shutdown_timeout_must_leave_some_grace():
    for value in ("0s", "0ms"):
        (problem,) = config_error({"UPDATE_PIPELINE_SHUTDOWN_TIMEOUT": value}).problems
        assert problem == f"UPDATE_PIPELINE_SHUTDOWN_TIMEOUT: {value!r} must be greater than zero"


@pytest.mark.parametrize(
    "env",
    [{"GITHUB_APP_ID": "7"}, {"GITHUB_PRIVATE_KEY": "pem"}],
    ids=["id without key", "key without id"],
)
def test_app_id_and_private_key_go_together(env: dict[str, str]) -> None:
    (problem,) = config_error(env).problems
    assert problem.startswith("GITHUB_APP_ID and a private key")


@pytest.mark.parametrize(
    "raw",
    [
        "https://x.example/{pkg}",
        "https://x.example/{0}",
        "https://x.example/{package",
        "ftp://x/{package}",
    ],
)
def test_the_package_page_template_takes_only_package_and_version(raw: str) -> None:
    (problem,) = config_error({"UPDATE_PIPELINE_PACKAGE_PAGE_URL": raw}).problems
    assert problem.startswith("UPDATE_PIPELINE_PACKAGE_PAGE_URL: ")


def test_the_minimum_release_age_is_a_duration_and_may_be_zero() -> None:
    assert Settings.from_env(
        {"UPDATE_PIPELINE_MIN_RELEASE_AGE": "0s"}
    ).min_release_age == timedelta(0)
    (problem,) = config_error({"UPDATE_PIPELINE_MIN_RELEASE_AGE": "three days"}).problems
    assert problem.startswith("UPDATE_PIPELINE_MIN_RELEASE_AGE: ")


def test_a_providers_file_adds_providers_and_its_problems_name_variable_and_line(
    tmp_path: Path,
) -> None:
    good = tmp_path / "providers.toml"
    good.write_text('[providers.aider]\nnpm = "aider-chat-bin"\n')
    settings = Settings.from_env({"UPDATE_PIPELINE_PROVIDERS_FILE": str(good)})
    assert [p.id for p in settings.providers][-1] == "aider"

    bad = tmp_path / "bad.toml"
    bad.write_text('[providers.aider]\nnmp = "typo"\n')
    (problem,) = config_error({"UPDATE_PIPELINE_PROVIDERS_FILE": str(bad)}).problems
    assert problem.startswith(f"UPDATE_PIPELINE_PROVIDERS_FILE: {bad}:2: ")


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("UPDATE_PIPELINE_OIDC_ISSUER", "http://issuer.example.com"),
        ("UPDATE_PIPELINE_RUNNER_REPO", "not a repo"),
        ("UPDATE_PIPELINE_CANARY_WORKFLOW", "canary"),
        ("UPDATE_PIPELINE_CANARY_MIN_PASS_RATE", "1.5"),
        ("UPDATE_PIPELINE_CANARY_MAX_DISCONNECT_RATE", "nan"),
        ("UPDATE_PIPELINE_CANARY_TIMEOUT", "0s"),
        ("UPDATE_PIPELINE_OIDC_AUDIENCE", "two words"),
        ("UPDATE_PIPELINE_PUBLIC_URL", "https://pipeline.example.com/?x=1"),
        ("UPDATE_PIPELINE_RUNTIME_MANIFEST", "../runtimes.json"),
    ],
)
def test_canary_settings_are_checked_at_start(variable: str, raw: str) -> None:
    (problem,) = config_error({variable: raw}).problems
    assert problem.startswith(f"{variable}: ")


def test_canary_settings_are_read() -> None:
    settings = Settings.from_env(
        {
            "UPDATE_PIPELINE_RUNNER_REPO": "acme/runners",
            "UPDATE_PIPELINE_CANARY_WORKFLOW": ".github/workflows/canary.yaml",
            "UPDATE_PIPELINE_CANARY_TIMEOUT": "90m",
            "UPDATE_PIPELINE_CANARY_MIN_PASS_RATE": "0.9",
            "UPDATE_PIPELINE_CANARY_MAX_DISCONNECT_RATE": "0.1",
            "UPDATE_PIPELINE_OIDC_ISSUER": "http://127.0.0.1:9999",
            "UPDATE_PIPELINE_OIDC_AUDIENCE": "pipeline-prod",
        }
    )
    assert (settings.runner_repo, settings.canary_workflow) == ("acme/runners", "canary.yaml")
    assert settings.canary_timeout == timedelta(minutes=90)
    assert (settings.canary_min_pass_rate, settings.canary_max_disconnect_rate) == (0.9, 0.1)
    assert (settings.oidc_issuer, settings.oidc_audience) == (
        "http://127.0.0.1:9999",
        "pipeline-prod",
    )


def test_rollout_tracking_settings_are_read_and_checked() -> None:
    settings = Settings.from_env(
        {
            "UPDATE_PIPELINE_CONTROL_REPO": " acme/releases ",
            "UPDATE_PIPELINE_NOTIFY_TEAM": "acme/oncall",
            "UPDATE_PIPELINE_COMMAND_PERMISSIONS": "/pause=Maintain, status=write,",
            "UPDATE_PIPELINE_HEARTBEAT_INTERVAL": "2s",
        }
    )
    assert (settings.control_repo, settings.notify_team) == ("acme/releases", "@acme/oncall")
    assert settings.command_permissions == (("pause", "maintain"), ("status", "write"))
    assert settings.heartbeat_interval == timedelta(seconds=2)
    for variable, raw in [
        ("UPDATE_PIPELINE_CONTROL_REPO", "releases"),
        ("UPDATE_PIPELINE_NOTIFY_TEAM", "@oncall"),
        ("UPDATE_PIPELINE_COMMAND_PERMISSIONS", "pause=owner"),
        ("UPDATE_PIPELINE_COMMAND_PERMISSIONS", "pause"),
        ("UPDATE_PIPELINE_HEARTBEAT_INTERVAL", "1500ms"),
        ("UPDATE_PIPELINE_HEARTBEAT_INTERVAL", "2h"),
    ]:
        (problem,) = config_error({variable: raw}).problems
        assert problem.startswith(f"{variable}: "), problem


def test_a_duration_too_long_for_any_clock_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="longer than any duration"):
        parse_duration("999999999999d")


def test_every_setting_the_app_reads_is_documented() -> None:
    """A variable added to the settings reader without a line in configuration.md would
    leave operators guessing; the reader's own source is the list."""
    root = Path(__file__).resolve().parent.parent
    source = (root / "app" / "config.py").read_text()
    read = set(re.findall(r"\"((?:UPDATE_PIPELINE|GITHUB)_[A-Z0-9_]+)\"", source))
    assert len(read) > 40, "the pattern no longer finds the settings"
    doc = (root / "docs" / "configuration.md").read_text()
    assert sorted(name for name in read if f"`{name}`" not in doc) == []
