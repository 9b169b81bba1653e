"""Logging: secrets are scrubbed from every line, and JSON mode writes one object per line."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from app.auth import new_secret
from app.config import Settings
from app.logs import ROOT, RedactingFilter, configure, get_logger

GITHUB_TOKENS = [
    "ghs_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "ghp_" + "abcdefghijklmnopqrstuvwxyz0123456789",
    "gho_" + "Z" * 36,
    "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnop",
]
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAx4J3mZq8Lh0cDb1bTfS9kT0rQ+/a\n"
    "Vu3yW2vb7Rj0G8yzRk1/Y9hLq==\n"
    "-----END RSA PRIVATE KEY-----"
)


pytestmark = pytest.mark.usefixtures("restore_logging")


def emitted(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


def test_component_loggers_live_under_one_root() -> None:
    assert get_logger("store").name == f"{ROOT}.store"
    assert get_logger("api.system").name == f"{ROOT}.api.system"


def test_known_secret_values_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    configure(secrets=["hunter2-webhook", "client-secret-xyz"])

    get_logger("test").info("webhook %s and client %s", "hunter2-webhook", "client-secret-xyz")

    out = emitted(capsys)
    assert "hunter2-webhook" not in out
    assert "client-secret-xyz" not in out
    assert out.count("[redacted]") == 2
    assert "webhook [redacted] and client [redacted]" in out


def test_a_secret_that_contains_another_is_scrubbed_whole() -> None:
    scrub = RedactingFilter(["abcdef", "abcdef-longer"]).scrub

    assert scrub("x abcdef-longer y") == "x [redacted] y"


def test_very_short_secret_values_are_not_used_for_scrubbing() -> None:
    # Scrubbing a two-letter value would mangle ordinary words in every line.
    scrub = RedactingFilter(["ab", ""]).scrub

    assert scrub("about abba") == "about abba"


def test_settings_secrets_are_scrubbed_once_configured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings.from_env(
        {"GITHUB_WEBHOOK_SECRET": "wh-s3cret-value", "GITHUB_CLIENT_SECRET": "cl-s3cret-value"}
    )
    configure(secrets=settings.secrets())

    get_logger("test").warning("bad signature for wh-s3cret-value / cl-s3cret-value")

    out = emitted(capsys)
    assert "s3cret" not in out
    assert "bad signature for [redacted] / [redacted]" in out


def test_api_tokens_are_scrubbed_by_shape(capsys: pytest.CaptureFixture[str]) -> None:
    token = new_secret()
    configure()

    get_logger("test").info("issued %s to ci", token)

    out = emitted(capsys)
    assert token not in out
    assert token[4:] not in out
    assert "issued [redacted] to ci" in out


@pytest.mark.parametrize("token", GITHUB_TOKENS)
def test_github_tokens_are_scrubbed_by_shape(
    token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure()

    get_logger("test").info("cloning https://x-access-token:%s@github.com/o/r.git", token)

    out = emitted(capsys)
    assert token not in out
    assert "https://x-access-token:[redacted]@github.com/o/r.git" in out


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_credentials_are_scrubbed(scheme: str, capsys: pytest.CaptureFixture[str]) -> None:
    configure()

    get_logger("test").info("header Authorization: %s eyJhbGciOi.J9eyJzdWIi.Oi0x", scheme)

    out = emitted(capsys)
    assert "eyJhbGciOi" not in out
    assert "header Authorization: [redacted]" in out


def test_pem_private_keys_are_scrubbed_whole(capsys: pytest.CaptureFixture[str]) -> None:
    configure()

    get_logger("test").error("loaded key %s from disk", PEM)

    out = emitted(capsys)
    assert "PRIVATE KEY" not in out
    assert "MIIEow" not in out
    assert "loaded key [redacted] from disk" in out


def test_an_unlabelled_pkcs8_key_is_scrubbed_too() -> None:
    key = PEM.replace("RSA PRIVATE KEY", "PRIVATE KEY")

    assert RedactingFilter().scrub(f"a {key} b") == "a [redacted] b"


def test_ordinary_messages_pass_through_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    configure()

    get_logger("test").info("rollout %s at %d%% (upt_ is the token prefix)", "r-1", 25)

    assert "rollout r-1 at 25% (upt_ is the token prefix)" in emitted(capsys)


def test_secrets_inside_exception_tracebacks_are_scrubbed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = new_secret()
    configure(secrets=["webhook-value-123"])

    try:
        raise RuntimeError(f"request with {token} and webhook-value-123 failed")
    except RuntimeError:
        get_logger("test").exception("call failed")

    out = emitted(capsys)
    assert "Traceback (most recent call last)" in out
    assert "RuntimeError: request with [redacted] and [redacted] failed" in out
    assert token not in out
    assert "webhook-value-123" not in out


def test_secrets_in_a_chained_exception_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    configure()

    try:
        try:
            raise ValueError(PEM)
        except ValueError as inner:
            raise RuntimeError("loading the key failed") from inner
    except RuntimeError:
        get_logger("test").exception("start-up failed")

    out = emitted(capsys)
    assert "ValueError: [redacted]" in out
    assert "MIIEow" not in out
    assert "RuntimeError: loading the key failed" in out


def test_a_malformed_logging_call_neither_raises_nor_leaks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = new_secret()
    configure()

    get_logger("test").info("token %s for %s", token)

    out = emitted(capsys)
    assert token not in out
    assert "token %s for %s" in out
    assert "[redacted]" in out


def test_json_lines_are_one_valid_object_per_record(capsys: pytest.CaptureFixture[str]) -> None:
    configure("json", "DEBUG")
    log = get_logger("json-test")
    before = datetime.now(UTC)

    log.debug("first")
    log.info("second with\nan embedded newline and ünïcode")
    log.warning("third %s", new_secret())
    after = datetime.now(UTC)

    lines = emitted(capsys).splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["message"].split()[0] for e in entries] == ["first", "second", "third"]
    assert [e["level"] for e in entries] == ["debug", "info", "warning"]
    assert entries[1]["message"] == "second with\nan embedded newline and ünïcode"
    assert entries[2]["message"] == "third [redacted]"
    for entry in entries:
        assert set(entry) == {"ts", "level", "logger", "message"}
        assert entry["logger"] == f"{ROOT}.json-test"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
        ts = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
        # Written in UTC: the timestamp falls between the wall-clock bounds.
        assert before - timedelta(seconds=1) <= ts <= after + timedelta(seconds=1)


def test_json_lines_carry_a_scrubbed_exception(capsys: pytest.CaptureFixture[str]) -> None:
    token = new_secret()
    configure("json")

    try:
        raise KeyError(token)
    except KeyError:
        get_logger("test").exception("lookup failed")

    (line,) = emitted(capsys).splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert entry["message"] == "lookup failed"
    assert "Traceback" in entry["exception"]
    assert "KeyError: '[redacted]'" in entry["exception"]
    assert token not in line


def test_text_lines_show_level_logger_and_message(capsys: pytest.CaptureFixture[str]) -> None:
    configure("text")

    get_logger("server").warning("listening on %s", "http://127.0.0.1:1")

    (line,) = emitted(capsys).splitlines()
    assert line.endswith(f"WARNING {ROOT}.server: listening on http://127.0.0.1:1")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_records_below_the_configured_level_are_dropped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("text", "WARNING")
    log = get_logger("test")

    log.info("quiet")
    log.warning("loud")

    out = emitted(capsys)
    assert "quiet" not in out
    assert "loud" in out


def test_configuring_again_replaces_the_handler_instead_of_adding_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("text")
    configure("json")

    get_logger("test").info("once")

    (line,) = emitted(capsys).splitlines()
    assert json.loads(line)["message"] == "once"
