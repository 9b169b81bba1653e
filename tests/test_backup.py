"""update-pipeline backup on real SQLite files, and the container image's Dockerfile.

The backup is called through ``app.backup.run`` (as the command calls it), against
databases the app's own store made and, in one test, keeps writing to while the copy
runs. The command line itself is tested through ``python -m app backup`` beside a real
server once the command is wired into ``app/__main__.py``; until then that test skips.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import json
import os
import re
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from app import backup as backup_module
from app.auth import hash_token, new_secret
from app.config import Settings
from app.store import BuildRecord, InstanceLock, NewToken, SqliteStore
from app.store.migrations import LATEST_SCHEMA
from tests.service_process import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OWN_VARIABLES = ("UPDATE_PIPELINE_", "GITHUB_")
ERROR = "update-pipeline: error: "


def token(name: str) -> NewToken:
    return NewToken(name, "viewer", hash_token(new_secret()), None, NOW, None)


def build(build_id: str) -> BuildRecord:
    return BuildRecord(build_id, "2.1.0", NOW, {"claude_code": "1.0.0", "codex": "0.46.0"})


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="update-pipeline backup")
    backup_module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def call(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``run()`` as the command calls it, with the database given; the exit status,
    stdout and stderr."""

    def call(db: Path, dest: Path, *flags: str) -> tuple[int, str, str]:
        code = backup_module.run(parse(str(dest), *flags), Settings(db_path=db))
        out, err = capsys.readouterr()
        return code, out, err

    return call


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute(sql).fetchall()


def token_names(path: Path) -> list[str]:
    return [str(r[0]) for r in rows(path, "SELECT name FROM api_tokens ORDER BY id")]


def assert_error(err: str, *fragments: str) -> None:
    assert err.startswith(ERROR), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
async def database(db_path: Path) -> Path:
    """A database made by the store, with rows written through it, then closed."""
    store = await SqliteStore.open(db_path)
    try:
        await store.add_tokens([token("admin"), token("viewer")])
        await store.add_build(build("build-1"), NOW)
    finally:
        await store.close()
    return db_path


@pytest.fixture
def backups(tmp_path: Path) -> Path:
    folder = tmp_path / "backups"
    folder.mkdir()
    return folder


# -- the copy ---------------------------------------------------------------------------


async def test_backup_while_a_writer_writes_holds_everything_committed_before_it(
    store: SqliteStore,
    db_path: Path,
    backups: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await store.add_tokens([token(f"seed-{i:04d}") for i in range(300)])
    await store.add_build(build("build-1"), NOW)
    committed: list[str] = []
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            name = f"live-{len(committed):05d}"
            await store.add_tokens([token(name)])
            committed.append(name)

    steps: list[int] = []

    def between_steps(status: int, remaining: int, total: int) -> None:
        # Runs in the backup's thread after every page: wait for the writer to commit
        # again, so each step of the copy has a commit behind it. A copy restarted by
        # each commit would never end; the bound turns that into a failure.
        steps.append(remaining)
        assert len(steps) <= 2 * total + 10, "the copy keeps restarting"
        seen, deadline = len(committed), time.monotonic() + 10
        while len(committed) == seen:
            assert time.monotonic() < deadline, "the writer stopped writing"
            time.sleep(0.001)

    monkeypatch.setattr(
        backup_module,
        "backup",
        functools.partial(backup_module.backup, pages=1, progress=between_steps),
    )
    dest = backups / "copy.db"
    task = asyncio.create_task(writer())
    # The serving process's lock, held as a running server holds it: the backup must
    # not need it.
    lock = InstanceLock(db_path)
    lock.acquire()
    try:
        while len(committed) < 5:
            await asyncio.sleep(0.001)
        before = list(committed)
        code = await asyncio.to_thread(
            backup_module.run, parse(str(dest)), Settings(db_path=db_path)
        )
    finally:
        lock.release()
        stop.set()
        await task

    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    assert len(steps) > 100  # one page a step: many steps, each with commits between
    # The copy is the database at one moment: every row committed before the backup
    # started, the later ones in the order they were committed, and none written while
    # it ran.
    names = token_names(dest)
    seeded = [f"seed-{i:04d}" for i in range(300)]
    assert names[:300] == seeded
    live = names[300:]
    assert live == committed[: len(live)]
    assert set(before) <= set(live)
    assert len(live) < len(committed)
    assert rows(dest, "SELECT build_id FROM runner_builds") == [("build-1",)]
    assert rows(dest, "PRAGMA integrity_check") == [("ok",)]
    assert rows(dest, "SELECT max(version) FROM schema_version") == [(LATEST_SCHEMA,)]
    assert await store.schema_version() == LATEST_SCHEMA
    # One self-contained file, private to its owner, and the one line that says so.
    assert rows(dest, "PRAGMA journal_mode") == [("delete",)]
    assert sorted(p.name for p in backups.iterdir()) == ["copy.db"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    size = dest.stat().st_size
    assert out == (
        f"backed up to {dest}: {size} bytes, schema version {LATEST_SCHEMA}, integrity_check ok\n"
    )
    # The server's database goes on as before.
    assert len(await store.list_tokens()) == 300 + len(committed)


async def test_the_copy_opens_with_the_store_as_a_restored_database(
    database: Path, backups: Path, call: Callable[..., tuple[int, str, str]]
) -> None:
    dest = backups / "copy.db"
    code, _, err = call(database, dest)
    assert code == 0, err
    restored = await SqliteStore.open(dest)
    try:
        assert await restored.schema_version() == LATEST_SCHEMA
        assert [t.name for t in await restored.list_tokens()] == ["admin", "viewer"]
        found = await restored.get_build("build-1")
        assert found is not None and dict(found.runtime_versions) == {
            "claude_code": "1.0.0",
            "codex": "0.46.0",
        }
    finally:
        await restored.close()


async def test_the_copy_is_private_whatever_the_umask(
    database: Path, backups: Path, call: Callable[..., tuple[int, str, str]]
) -> None:
    previous = os.umask(0)
    try:
        code, _, err = call(database, backups / "copy.db")
    finally:
        os.umask(previous)
    assert code == 0, err
    assert stat.S_IMODE((backups / "copy.db").stat().st_mode) == 0o600


# -- refusals ---------------------------------------------------------------------------


async def test_an_existing_file_is_kept_without_force(
    database: Path, backups: Path, call: Callable[..., tuple[int, str, str]]
) -> None:
    dest = backups / "copy.db"
    dest.write_text("an older backup")
    code, out, err = call(database, dest)
    assert code == 1
    assert out == ""
    assert_error(err, f"{dest} exists; pass --force to replace it")
    assert dest.read_text() == "an older backup"
    assert sorted(p.name for p in backups.iterdir()) == ["copy.db"]


async def test_force_replaces_an_existing_file(
    database: Path, backups: Path, call: Callable[..., tuple[int, str, str]]
) -> None:
    dest = backups / "copy.db"
    dest.write_text("an older backup")
    dest.chmod(0o644)
    code, out, err = call(database, dest, "--force")
    assert code == 0, err
    assert out.startswith(f"backed up to {dest}: ")
    assert token_names(dest) == ["admin", "viewer"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(p.name for p in backups.iterdir()) == ["copy.db"]


async def test_a_missing_database_is_an_error_and_is_not_created(
    tmp_path: Path, backups: Path, call: Callable[..., tuple[int, str, str]]
) -> None:
    missing = tmp_path / "nowhere.db"
    code, out, err = call(missing, backups / "copy.db")
    assert code == 1
    assert out == ""
    assert_error(err, f"database {missing} does not exist")
    assert not missing.exists()
    assert list(backups.iterdir()) == []


@pytest.mark.parametrize("companion", ["", "-wal", "-shm", ".lock"])
async def test_the_database_and_its_files_are_never_the_destination(
    database: Path, call: Callable[..., tuple[int, str, str]], companion: str
) -> None:
    before = database.read_bytes()
    dest = database.with_name(database.name + companion)
    code, _, err = call(database, dest, "--force")
    assert code == 1
    assert_error(err, "is the database or one of its files")
    assert database.read_bytes() == before


async def test_a_missing_folder_or_a_folder_as_path_is_an_error(
    database: Path, tmp_path: Path, backups: Path, call: Callable[..., tuple[int, str, str]]
) -> None:
    code, _, err = call(database, tmp_path / "absent" / "copy.db")
    assert code == 1
    assert_error(err, f"folder {tmp_path / 'absent'} does not exist")
    code, _, err = call(database, backups, "--force")
    assert code == 1
    assert_error(err, f"{backups} is a folder")


async def test_a_file_that_is_not_an_update_pipeline_database_is_refused(
    tmp_path: Path, backups: Path, call: Callable[..., tuple[int, str, str]]
) -> None:
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    code, _, err = call(other, backups / "copy.db")
    assert code == 1
    assert_error(err, "no schema_version table")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all, " * 200)
    code, _, err = call(garbage, backups / "copy.db")
    assert code == 1
    assert_error(err, f"cannot back up {garbage}: file is not a database")
    assert list(backups.iterdir()) == []


# -- failures leave nothing behind -------------------------------------------------------


async def test_a_copy_that_fails_the_integrity_check_is_removed(
    database: Path, backups: Path, call: Callable[..., tuple[int, str, str]]
) -> None:
    # Damage the tokens table's page in the (checkpointed) database file: the backup
    # copies pages as they are, so the copy carries the damage.
    with closing(sqlite3.connect(database)) as db:
        page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'api_tokens'")
        (root,) = page.fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
    with database.open("r+b") as file:
        file.seek(root * size - 200)
        file.write(b"\xff" * 200)
    code, out, err = call(database, backups / "copy.db")
    assert code == 1
    assert out == ""
    assert_error(
        err,
        "the copy failed PRAGMA integrity_check: *** in database main *** On tree page"
        f" {root} cell 0: ",
    )
    assert list(backups.iterdir()) == []


def failing_after(steps: int, exc: BaseException) -> Callable[[int, int, int], None]:
    seen: list[int] = []

    def progress(status: int, remaining: int, total: int) -> None:
        seen.append(remaining)
        if len(seen) >= steps:
            raise exc

    return progress


async def test_a_copy_that_fails_half_way_leaves_nothing(
    database: Path,
    backups: Path,
    call: Callable[..., tuple[int, str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(
        backup_module,
        "backup",
        functools.partial(backup_module.backup, pages=1, progress=failing_after(3, full)),
    )
    dest = backups / "copy.db"
    code, _, err = call(database, dest)
    assert code == 1
    assert_error(err, f"to {dest}: {os.strerror(errno.ENOSPC)}")
    assert list(backups.iterdir()) == []
    # An older backup at PATH is untouched by a failed --force.
    dest.write_text("an older backup")
    code, _, _ = call(database, dest, "--force")
    assert code == 1
    assert dest.read_text() == "an older backup"
    assert sorted(p.name for p in backups.iterdir()) == ["copy.db"]


async def test_an_interrupted_copy_leaves_nothing(
    database: Path, backups: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        backup_module,
        "backup",
        functools.partial(
            backup_module.backup, pages=1, progress=failing_after(2, KeyboardInterrupt())
        ),
    )
    with pytest.raises(KeyboardInterrupt):  # the command answers it with status 130
        backup_module.run(parse(str(backups / "copy.db")), Settings(db_path=database))
    assert list(backups.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
async def test_a_read_only_folder_is_an_error_and_leaves_nothing(
    database: Path, backups: Path, call: Callable[..., tuple[int, str, str]]
) -> None:
    backups.chmod(0o500)
    try:
        code, _, err = call(database, backups / "copy.db")
    finally:
        backups.chmod(0o700)
    assert code == 1
    assert_error(err, f"cannot write in {backups}: {os.strerror(errno.EACCES)}")
    assert list(backups.iterdir()) == []


# -- settings ---------------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(OWN_VARIABLES):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_environment")
async def test_without_settings_the_database_comes_from_db_or_the_environment(
    database: Path,
    tmp_path: Path,
    backups: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("UPDATE_PIPELINE_DB", str(database))
    assert backup_module.run(parse(str(backups / "env.db"))) == 0
    assert token_names(backups / "env.db") == ["admin", "viewer"]
    # --db wins over the variable.
    code = backup_module.run(parse(str(backups / "flag.db"), "--db", str(tmp_path / "no.db")))
    assert code == 1
    assert_error(capsys.readouterr().err, f"database {tmp_path / 'no.db'} does not exist")
    # Every command checks every setting.
    monkeypatch.setenv("UPDATE_PIPELINE_PORT", "80x")
    assert backup_module.run(parse(str(backups / "bad.db"))) == 1
    assert_error(capsys.readouterr().err, "UPDATE_PIPELINE_PORT: '80x' is not a port number")


def test_arguments() -> None:
    args = parse("copy.db", "--force", "--db", "live.db")
    assert (args.path, args.force, args.db) == (Path("copy.db"), True, Path("live.db"))
    args = parse("copy.db")
    assert (args.force, args.db) == (False, None)


# -- the command, beside a real server ---------------------------------------------------


@functools.cache
def backup_command_wired() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "app", "backup", "--help"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0


def command_env(db: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_VARIABLES)}
    env["UPDATE_PIPELINE_DB"] = str(db)
    return env


def cli(*argv: str, db: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *argv],
        cwd=cwd,
        env=command_env(db),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_command_backs_up_the_database_of_a_running_server(tmp_path: Path) -> None:
    if not backup_command_wired():
        pytest.skip("`update-pipeline backup` is not wired into app/__main__.py yet")
    backups = tmp_path / "backups"
    backups.mkdir()
    async with ServiceProcess(tmp_path) as service:
        await service.start()
        created = cli(
            "token", "create", "--name", "ops", "--role", "admin", db=service.db, cwd=tmp_path
        )
        assert created.returncode == 0, created.stderr

        dest = backups / "first.db"
        done = cli("backup", str(dest), db=service.db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert re.fullmatch(
            rf"backed up to {re.escape(str(dest))}: \d+ bytes, schema version "
            rf"{LATEST_SCHEMA}, integrity_check ok\n",
            done.stdout,
        ), done.stdout
        assert token_names(dest) == ["ops"]
        assert stat.S_IMODE(dest.stat().st_mode) == 0o600

        again = cli("backup", str(dest), db=service.db, cwd=tmp_path)
        assert again.returncode == 1
        assert_error(again.stderr, "exists; pass --force to replace it")
        forced = cli(
            "backup",
            str(dest),
            "--force",
            "--db",
            str(service.db),
            cwd=tmp_path,
            db=tmp_path / "x.db",
        )
        assert forced.returncode == 0, forced.stderr

        missing = cli("backup", str(backups / "second.db"), db=tmp_path / "absent.db", cwd=tmp_path)
        assert missing.returncode == 1
        assert_error(missing.stderr, "does not exist")

        assert service.running
        await service.stop()
    assert sorted(p.name for p in backups.iterdir()) == ["first.db"]


# -- the container image ----------------------------------------------------------------


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""
    assert not logical, "the Dockerfile ends inside a continued line"


def stages(text: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def healthcheck_argv(dockerfile: str) -> list[str]:
    (rest,) = [r for k, r in instructions(dockerfile) if k == "HEALTHCHECK"]
    argv: list[str] = json.loads(rest[rest.index("CMD") + len("CMD") :])
    return argv


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                values[key] = value
    return values


def test_dockerfile_builds_a_wheel_then_a_runtime_stage(dockerfile: str) -> None:
    build, runtime = stages(dockerfile)
    assert build[0][1].endswith(" AS build")
    assert any(k == "RUN" and "pip wheel" in r and "/wheels" in r for k, r in build)
    (arg,) = [r for k, r in instructions(dockerfile) if k == "ARG"]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[12]-slim(-\w+)?", arg), arg
    installs = [r for k, r in runtime if k == "RUN" and "pip install" in r]
    assert installs and all("--no-cache-dir" in r and "--no-index" in r for r in installs)
    assert not any(k == "COPY" and "--from" not in r for k, r in runtime), "runtime copies source"


def test_dockerfile_runs_as_a_fixed_non_root_user(dockerfile: str) -> None:
    runtime = stages(dockerfile)[-1]
    users = [r for k, r in runtime if k == "USER"]
    assert users, "no USER in the final stage"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) >= 1000, users
    assert group.isdigit() and int(group) >= 1000, users
    assert any(k == "RUN" and f"chown {user}:{group} /data" in r for k, r in runtime)


def test_dockerfile_keeps_the_database_on_a_volume(dockerfile: str) -> None:
    runtime = stages(dockerfile)[-1]
    volumes = [
        json.loads(r) if r.startswith("[") else r.split() for k, r in runtime if k == "VOLUME"
    ]
    assert ["/data"] in volumes
    env = env_of(runtime)
    defaults = Settings()
    assert Path(env["UPDATE_PIPELINE_DB"]).parent == Path("/data")
    assert env["UPDATE_PIPELINE_HOST"] == "0.0.0.0"
    assert env["UPDATE_PIPELINE_PORT"] == str(defaults.port)
    assert env["UPDATE_PIPELINE_LOG_FORMAT"] == "json"
    assert Settings.from_env(env).db_path == Path("/data/update-pipeline.db")
    assert [r for k, r in runtime if k == "EXPOSE"] == [str(defaults.port)]


def test_dockerfile_starts_the_console_script(dockerfile: str) -> None:
    runtime = stages(dockerfile)[-1]
    assert [json.loads(r) for k, r in runtime if k == "ENTRYPOINT"] == [["update-pipeline"]]
    assert [json.loads(r) for k, r in runtime if k == "CMD"] == [["serve"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["update-pipeline"] == "app.__main__:main"


def test_dockerfile_checks_health_on_the_ready_route_with_python(dockerfile: str) -> None:
    argv = healthcheck_argv(dockerfile)
    assert argv[:2] == ["python", "-c"]
    assert "/api/update-pipeline/ready" in argv[2]
    commands = " ".join(rest for _, rest in instructions(dockerfile))
    assert "curl" not in commands and "wget" not in commands
    compile(argv[2], "HEALTHCHECK", "exec")


def test_dockerfile_holds_no_secrets_and_fetches_nothing_by_url(dockerfile: str) -> None:
    for keyword, rest in instructions(dockerfile):
        assert not (keyword == "ADD" and re.search(r"https?://", rest)), rest
        if keyword in ("ENV", "ARG"):
            assert "GITHUB_" not in rest, rest
            assert not re.search(r"SECRET|TOKEN|PASSWORD|PRIVATE_KEY", rest, re.I), rest


def test_dockerignore_keeps_out_history_databases_and_secrets() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".git", "**/*.db", "**/*.db-wal", "**/.env", "**/.env.*", "**/__pycache__"):
        assert needed in patterns, needed
    # Nothing the image is built from is left out.
    for kept in ("app", "pyproject.toml", "README.md"):
        assert kept not in patterns


async def test_the_healthcheck_passes_while_ready_and_fails_when_down(
    tmp_path: Path, dockerfile: str
) -> None:
    script = healthcheck_argv(dockerfile)[2]
    async with ServiceProcess(tmp_path) as service:
        # A proxy for outbound calls must not catch the check (this one refuses all).
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "UPDATE_PIPELINE_PORT": str(service.port),
            "HTTP_PROXY": "http://127.0.0.1:9",
            "http_proxy": "http://127.0.0.1:9",
        }

        def check() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", script],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )

        await service.start()
        up = await asyncio.to_thread(check)
        assert up.returncode == 0, up.stderr
        await service.stop()
        down = await asyncio.to_thread(check)
        assert down.returncode == 1, down.stderr


# -- docs/deploy.md ---------------------------------------------------------------------


def test_deploy_doc_exposes_exactly_the_routes_callers_outside_use() -> None:
    """The routes docs/deploy.md says must be reachable from outside are the ones GitHub,
    workflows and runners call, and its nginx example lets through those alone."""
    from app.api import build_route_table
    from app.auth import Access

    outside = {Access.GITHUB_SIGNATURE, Access.ADMIN_OR_WORKFLOW, Access.RUNNER}
    routes = build_route_table().routes
    wanted = {(r.method, r.full_path) for r in routes if r.access in outside}
    doc = (ROOT / "docs" / "deploy.md").read_text()
    section = doc[doc.index("## TLS and what to expose") : doc.index("## Backups")]
    listed = set(re.findall(r"^\| `([A-Z]+) (/\S+)` \|", section, re.M))
    assert listed == wanted

    nginx = section[section.index("```nginx") :]
    nginx = nginx[: nginx.index("\n```\n")]
    blocks = re.findall(r"location (=|~) (\S+) \{(.*?)\n    \}", nginx, re.S)
    passed = [(kind, target) for kind, target, body in blocks if "proxy_pass" in body]
    assert all("limit_except POST" in body for _, _, body in blocks if "proxy_pass" in body)

    def through(method: str, path: str) -> bool:
        sample = re.sub(r"\{[^}]+\}", "x-1", path)
        return method == "POST" and any(
            sample == target if kind == "=" else re.search(target, sample)
            for kind, target in passed
        )

    for route in routes:
        assert through(route.method, route.full_path) == (
            (route.method, route.full_path) in wanted
        ), route.full_path


# -- what the image installs -------------------------------------------------------------


def test_the_wheel_the_image_installs_serves_on_its_own(tmp_path: Path, dockerfile: str) -> None:
    """No Docker engine runs where the tests run, so the image's build is followed step
    by step instead: the wheel `pip wheel .` makes from the files the build stage copies,
    installed alone, must serve and pass the image's health check. A module or data file
    left out of the wheel (the manifest `setup` reads, say) fails here, not in a
    container."""
    build = stages(dockerfile)[0]
    copied = [
        word
        for keyword, rest in build
        if keyword == "COPY"
        for word in rest.split()[:-1]  # the last word is the destination
    ]
    source = tmp_path / "src"
    source.mkdir()
    for name in copied:
        target = source / name
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, target)

    def pip(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    # As in the image, the build backend comes from the index (in an isolated build
    # environment); the dependencies are this environment's, so only the project's own
    # wheel is built.
    pip("wheel", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"), str(source))
    (wheel,) = (tmp_path / "wheels").glob("update_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "app/github/app.yml" in names
    # The dashboard serves its own assets (no CDN), so they must travel in the wheel.
    for asset in (ROOT / "app" / "dashboard" / "static").iterdir():
        assert f"app/dashboard/static/{asset.name}" in names
    assert not any(n.startswith("tests/") for n in names), "the wheel carries the tests"
    site = tmp_path / "site"
    pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel))

    env = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import app.github.manifest as m; print(m.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    # The ENTRYPOINT: the console script the wheel installs.
    helped = subprocess.run(
        [str(site / "bin" / "update-pipeline"), "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr

    async def serve_and_check() -> None:
        async with ServiceProcess(tmp_path, env={"PYTHONPATH": str(site)}) as service:
            await service.start()
            checked = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", healthcheck_argv(dockerfile)[2]],
                env={**env, "UPDATE_PIPELINE_PORT": str(service.port)},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert checked.returncode == 0, checked.stderr + service.output()
            # The dashboard's stylesheet, served from the installed package.
            async with (
                aiohttp.ClientSession() as session,
                session.get(service.url + "/dashboard/static/dashboard.css") as response,
            ):
                assert response.status == 200
                assert response.content_type == "text/css"
            await service.stop()

    asyncio.run(serve_and_check())
