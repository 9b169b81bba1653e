"""The update-pipeline command: serve as a real process, migrate, and the token commands."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.__main__ import main
from app.auth import AuthError, Principal, Role, TokenService, hash_token
from app.clock import Clock, parse_iso
from app.store import InstanceLock, SqliteStore
from app.store.migrations import LATEST_SCHEMA, MIGRATIONS

LATEST = MIGRATIONS[-1].version
PREFIX = "/api/update-pipeline"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
OWN_VARIABLES = ("UPDATE_PIPELINE_", "GITHUB_")


def clean_env(**extra: str) -> dict[str, str]:
    """The test runner's environment without any of the app's own settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_VARIABLES)}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "app", *argv]


def run(
    argv: list[str], cwd: Path, *, timeout: float = 20, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout
    )


def error_line(stderr: str) -> str:
    """The whole of stderr, which must be exactly one line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("update-pipeline: error: ")
    return lines[0]


# -- serve as a real process ----------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}{path}"

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_healthy(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                status, body = self.get("/health")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
                continue
            assert status == 200, body
            assert isinstance(body, dict)
            return body
        pytest.fail(f"serve did not answer /health within {START_TIMEOUT}s:\n{self.stderr()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {STOP_TIMEOUT}s of {sig.name}")


@contextmanager
def serving(db: Path, cwd: Path, **env: str) -> Iterator[Server]:
    port = free_port()
    log = cwd / f"serve-{port}.log"
    with log.open("w", encoding="utf-8") as stderr:
        proc = subprocess.Popen(
            command("serve", "--port", str(port), "--db", str(db)),
            cwd=cwd,
            env=clean_env(UPDATE_PIPELINE_ENABLED="true", **env),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    try:
        server = Server(proc, port, log)
        server.wait_healthy()
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_serve_answers_health_then_exits_0_on_a_signal_leaving_a_sound_database(
    sig: signal.Signals, tmp_path: Path
) -> None:
    db = tmp_path / "x.db"

    with serving(db, tmp_path) as server:
        status, health = server.get("/health")
        ready_status, ready = server.get("/ready")
        code = server.stop(sig)

    assert status == 200
    assert set(health) == {"enabled", "running", "timestamp"}
    assert health["enabled"] is True
    assert health["running"] is True
    assert abs(parse_iso(health["timestamp"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert (ready_status, ready["ready"]) == (200, True)
    assert code == 0, server.stderr()
    assert "Traceback" not in server.stderr()
    assert "shutdown complete" in server.stderr()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version")]
        assert versions == [m.version for m in MIGRATIONS]
        events = [t for (t,) in conn.execute("SELECT type FROM events ORDER BY id")]
    assert "pipeline_started" in events
    assert events[-1] == "pipeline_stopped"
    # The store checkpointed on close: everything is in the main file.
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_a_second_serve_on_the_same_database_is_refused_while_the_first_runs(
    tmp_path: Path,
) -> None:
    db = tmp_path / "x.db"

    with serving(db, tmp_path) as first:
        second = run(
            command("serve", "--port", str(free_port()), "--db", str(db)),
            tmp_path,
            UPDATE_PIPELINE_ENABLED="true",
        )
        status, health = first.get("/health")
        code = first.stop()

    assert second.returncode == 1
    message = error_line(second.stderr)
    assert "in use" in message
    assert str(db) in message
    assert f"pid {first.proc.pid}" in message
    assert (status, health["running"]) == (200, True)
    assert code == 0


def test_serve_on_a_port_already_taken_exits_1_with_one_line_and_no_traceback(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run(command("serve", "--port", str(port), "--db", "x.db"), tmp_path)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("update-pipeline: error: ")
    assert f"127.0.0.1:{port}" in last
    assert "in use" in last
    # The database was opened before the bind failed; it must be closed cleanly.
    with closing(sqlite3.connect(tmp_path / "x.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# -- In-process commands --------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cli:
    def __init__(self, capsys: pytest.CaptureFixture[str], db: Path) -> None:
        self.capsys = capsys
        self.db = db

    def __call__(self, *argv: str) -> Result:
        self.capsys.readouterr()
        code = main([*argv, "--db", str(self.db)])
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def create(self, name: str, role: str = "admin", *extra: str) -> str:
        result = self("token", "create", "--name", name, "--role", role, *extra)
        assert result.code == 0, result.err
        return result.out.splitlines()[-1]


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    """main() reads the process environment and reconfigures logging: contain both."""
    for name in list(os.environ):
        if name.startswith(OWN_VARIABLES):
            monkeypatch.delenv(name)


@pytest.fixture
def cli(isolated: None, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    """The command against an already migrated database, so stderr holds only errors."""
    runner = Cli(capsys, tmp_path / "cli.db")
    assert runner("migrate").code == 0
    return runner


def authenticate(db: Path, secret: str) -> Principal:
    async def check() -> Principal:
        store = await SqliteStore.open(db)
        try:
            return await TokenService(store, Clock()).authenticate(secret)
        finally:
            await store.close()

    return asyncio.run(check())


def table(out: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line) for line in out.strip().splitlines()]


def test_token_create_prints_the_secret_alone_on_its_last_line_and_it_authenticates(
    cli: Cli,
) -> None:
    result = cli("token", "create", "--name", "ci-deployer", "--role", "admin")

    assert result.code == 0
    assert result.err == ""
    *notes, secret = result.out.splitlines()
    assert re.fullmatch(r"upt_[A-Za-z0-9_-]{43}", secret)
    assert all(secret not in line for line in notes)
    assert "ci-deployer" in notes[0]
    assert "expires never" in notes[0]
    principal = authenticate(cli.db, secret)
    assert (principal.name, principal.role, principal.org_id) == ("ci-deployer", Role.ADMIN, None)


def test_each_created_token_is_different(cli: Cli) -> None:
    assert cli.create("one", "viewer") != cli.create("two", "viewer")


def test_token_list_never_shows_a_secret_or_its_hash(cli: Cli) -> None:
    admin = cli.create("ops", "admin")
    runner = cli.create("runner-acme", "runner", "--org", "acme")
    authenticate(cli.db, admin)

    result = cli("token", "list")

    assert result.code == 0
    for secret in (admin, runner):
        assert secret not in result.out
        assert secret[4:] not in result.out
        assert hash_token(secret) not in result.out
    rows = table(result.out)
    assert rows[0] == ["NAME", "ROLE", "ORG", "STATE", "CREATED", "EXPIRES", "LAST USED"]
    by_name = {row[0]: row for row in rows[1:]}
    assert by_name["ops"][1:4] == ["admin", "-", "active"]
    assert by_name["runner-acme"][1:4] == ["runner", "acme", "active"]
    assert by_name["ops"][6] != "never"
    assert by_name["runner-acme"][6] == "never"


def test_token_list_says_so_when_there_are_none(cli: Cli) -> None:
    assert cli("token", "list").out.strip() == "no tokens"


def test_a_revoked_token_leaves_the_list_stays_in_the_full_list_and_stops_working(
    cli: Cli,
) -> None:
    secret = cli.create("temp", "viewer")
    cli.create("keep", "viewer")

    revoked = cli("token", "revoke", "temp")
    live = cli("token", "list")
    everything = cli("token", "list", "--all")

    assert revoked.code == 0
    assert "temp" in revoked.out
    assert [row[0] for row in table(live.out)[1:]] == ["keep"]
    states = {row[0]: row[3] for row in table(everything.out)[1:]}
    assert states == {"keep": "active", "temp": "revoked"}
    with pytest.raises(AuthError, match="revoked"):
        authenticate(cli.db, secret)


def test_a_revoked_name_can_be_issued_again(cli: Cli) -> None:
    cli.create("rotating", "viewer")
    assert cli("token", "revoke", "rotating").code == 0

    fresh = cli.create("rotating", "viewer")

    assert authenticate(cli.db, fresh).name == "rotating"


def test_revoking_an_unknown_token_exits_1_with_one_line(cli: Cli) -> None:
    result = cli("token", "revoke", "ghost")

    assert result.code == 1
    assert "ghost" in error_line(result.err)
    assert result.out == ""


def test_revoking_twice_fails_the_second_time(cli: Cli) -> None:
    cli.create("once", "viewer")
    assert cli("token", "revoke", "once").code == 0

    assert cli("token", "revoke", "once").code == 1


def test_a_duplicate_token_name_exits_1_and_keeps_the_first(cli: Cli) -> None:
    first = cli.create("dup", "admin")

    result = cli("token", "create", "--name", "dup", "--role", "viewer")

    assert result.code == 1
    assert "already exists" in error_line(result.err)
    assert "upt_" not in result.out
    assert authenticate(cli.db, first).role is Role.ADMIN


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--role", "runner"], "org"),
        (["--role", "admin", "--org", "acme"], "org"),
        (["--role", "viewer", "--org", "acme"], "org"),
        (["--role", "admin", "--expires", "0s"], "future"),
    ],
    ids=["runner-without-org", "admin-with-org", "viewer-with-org", "zero-expiry"],
)
def test_an_invalid_token_request_exits_1_with_one_line(
    cli: Cli, args: list[str], mentions: str
) -> None:
    result = cli("token", "create", "--name", "bad", *args)

    assert result.code == 1
    assert mentions in error_line(result.err)
    assert cli("token", "list", "--all").out.strip() == "no tokens"


@pytest.mark.parametrize("name", ["has space", "-leading-dash", "x" * 65])
def test_an_invalid_token_name_exits_1(cli: Cli, name: str) -> None:
    result = cli("token", "create", f"--name={name}", "--role", "viewer")

    assert result.code == 1
    assert "token name" in error_line(result.err)


def test_a_runner_token_belongs_to_its_org(cli: Cli) -> None:
    secret = cli.create("acme-runner", "runner", "--org", "acme")

    principal = authenticate(cli.db, secret)

    assert (principal.role, principal.org_id) == (Role.RUNNER, "acme")


def test_expires_90d_sets_an_expiry_90_days_ahead(cli: Cli) -> None:
    before = datetime.now(UTC)
    result = cli("token", "create", "--name", "quarterly", "--role", "viewer", "--expires", "90d")
    after = datetime.now(UTC)

    assert result.code == 0
    match = re.search(r"expires (\S+)$", result.out.splitlines()[0])
    assert match is not None
    expires = parse_iso(match.group(1))
    slack = timedelta(seconds=1)
    assert before + timedelta(days=90) - slack <= expires <= after + timedelta(days=90) + slack
    (row,) = table(cli("token", "list").out)[1:]
    assert row[5] == match.group(1)[:19] + "Z"


@pytest.mark.parametrize("expires", ["soon", "90", "1d1d", "-1d"])
def test_a_malformed_expiry_is_a_usage_error(
    isolated: None, capsys: pytest.CaptureFixture[str], expires: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["token", "create", "--name", "x", "--role", "admin", f"--expires={expires}"])

    assert exited.value.code == 2
    assert "--expires" in capsys.readouterr().err


def test_an_unknown_role_is_a_usage_error(
    isolated: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["token", "create", "--name", "x", "--role", "owner"])

    assert exited.value.code == 2
    assert "admin" in capsys.readouterr().err


# -- migrate --------------------------------------------------------------------------


def test_migrate_creates_the_schema_in_a_fresh_file_and_rerunning_changes_nothing(
    isolated: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "fresh.db"
    cli = Cli(capsys, db)

    first = cli("migrate")
    with closing(sqlite3.connect(db)) as conn:
        applied = conn.execute("SELECT * FROM schema_version").fetchall()
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        mode = conn.execute("PRAGMA journal_mode").fetchone()
    second = cli("migrate")

    assert first.code == 0
    assert first.out.strip() == f"database {db} is at schema version {LATEST}"
    assert "applied migration 1" in first.err
    assert {
        "schema_version",
        "runtime_versions",
        "runner_builds",
        "active_rollouts",
        "api_tokens",
        "events",
    } <= tables
    assert mode == ("wal",)
    assert second.code == 0
    assert second.out == first.out
    assert "applied migration" not in second.err
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT * FROM schema_version").fetchall() == applied
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@pytest.mark.parametrize("argv", [["migrate"], ["token", "list"], ["serve", "--port", "0"]])
def test_a_database_from_a_newer_version_is_refused_with_one_line(
    cli: Cli, argv: list[str]
) -> None:
    with closing(sqlite3.connect(cli.db)) as conn, conn:
        conn.execute(
            "INSERT INTO schema_version (version, name, applied_at) VALUES (?, 'future', 'now')",
            (LATEST + 1,),
        )

    # A subprocess, so a serve that wrongly starts is a timeout, not a hung test run.
    result = run(command(*argv, "--db", str(cli.db)), cli.db.parent)

    assert result.returncode == 1
    message = error_line(result.stderr)
    assert f"schema version {LATEST + 1}" in message
    assert "newer than this update-pipeline supports" in message


def test_migrate_refuses_a_file_that_is_not_a_database_and_exits(tmp_path: Path) -> None:
    db = tmp_path / "notes.txt"
    db.write_bytes(b"these are not the tables you are looking for\n" * 100)

    result = run(command("migrate", "--db", str(db)), tmp_path, timeout=5)

    assert result.returncode == 1
    message = error_line(result.stderr)
    assert str(db) in message
    assert "not a database" in message


def test_migrate_refuses_a_folder_as_database(
    isolated: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    result = Cli(capsys, tmp_path)("migrate")

    assert result.code == 1
    assert str(tmp_path) in error_line(result.err)


def test_serve_with_a_missing_database_folder_exits_1_with_one_line(tmp_path: Path) -> None:
    db = tmp_path / "missing" / "x.db"

    result = run(command("serve", "--port", "0", "--db", str(db)), tmp_path)

    assert result.returncode == 1
    assert "missing" in error_line(result.stderr)
    assert not db.parent.exists()


# -- The environment and --help -------------------------------------------------------


def test_an_invalid_environment_exits_1_naming_the_variable_before_touching_the_database(
    tmp_path: Path,
) -> None:
    result = run(command("migrate", "--db", "x.db"), tmp_path, UPDATE_PIPELINE_ENABLED="maybe")

    assert result.returncode == 1
    message = error_line(result.stderr)
    assert "UPDATE_PIPELINE_ENABLED" in message
    assert "'maybe'" in message
    assert "true, false, 1 or 0" in message
    assert not (tmp_path / "x.db").exists()


def test_every_invalid_variable_is_named_in_the_one_line(tmp_path: Path) -> None:
    result = run(
        command("serve", "--db", "x.db"),
        tmp_path,
        UPDATE_PIPELINE_POLLING="ture",
        UPDATE_PIPELINE_POLL_INTERVAL_MS="0",
        UPDATE_PIPELINE_PORT="70000",
    )

    assert result.returncode == 1
    message = error_line(result.stderr)
    for variable in (
        "UPDATE_PIPELINE_POLLING",
        "UPDATE_PIPELINE_POLL_INTERVAL_MS",
        "UPDATE_PIPELINE_PORT",
    ):
        assert variable in message


def test_a_port_flag_out_of_range_is_a_usage_error(
    isolated: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "70000"])

    assert exited.value.code == 2
    assert "0 to 65535" in capsys.readouterr().err


def test_python_dash_m_app_help_lists_the_commands(tmp_path: Path) -> None:
    result = run(command("--help"), tmp_path)

    assert result.returncode == 0
    for word in ("usage: update-pipeline", "serve", "migrate", "token", "--version"):
        assert word in result.stdout


def test_the_console_script_explains_serve_flags(tmp_path: Path) -> None:
    script = shutil.which("update-pipeline") or str(
        Path(sys.executable).with_name("update-pipeline")
    )

    result = run([script, "serve", "--help"], tmp_path)

    assert result.returncode == 0, result.stderr
    for flag in ("--host", "--port", "--db", "UPDATE_PIPELINE_PORT"):
        assert flag in result.stdout


def test_token_create_help_explains_every_flag(
    isolated: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["token", "create", "--help"])

    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--name", "--role", "--org", "--expires", "--db", "30s, 10m", "runner"):
        assert flag in out


def test_a_schema_upgrade_waits_until_no_server_holds_the_database(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend this build knows a newer schema than the file has.
    monkeypatch.setattr("app.__main__.LATEST_SCHEMA", LATEST_SCHEMA + 1)
    server = InstanceLock(cli.db)
    server.acquire()
    try:
        for argv in (("migrate",), ("token", "list")):
            result = cli(*argv)
            assert result.code == 1
            assert "in use by another update-pipeline process" in error_line(result.err)
            assert "needs upgrading" in error_line(result.err)
    finally:
        server.release()
    assert cli("token", "list").code == 0


def test_token_commands_leave_an_audit_event(cli: Cli) -> None:
    cli.create("audited", "viewer")
    assert cli("token", "revoke", "audited").code == 0

    async def events() -> list[tuple[str, dict[str, object]]]:
        store = await SqliteStore.open(cli.db)
        try:
            return [(e.type, dict(e.data)) for e in reversed(await store.list_events())]
        finally:
            await store.close()

    assert asyncio.run(events()) == [
        (
            "tokens_issued",
            {
                "tokens": [{"name": "audited", "role": "viewer", "orgId": None}],
                "by": "command line",
            },
        ),
        ("token_revoked", {"name": "audited", "by": "command line"}),
    ]
