"""update-pipeline backup: a consistent copy of the database, taken while the service runs.

The copy is made with SQLite's online backup API (``sqlite3.Connection.backup``), from
one read transaction on the source: in WAL mode a reader never blocks the server's
writers, and the snapshot makes the copy exactly the database as it was when the backup
began. Without it, every commit the server made between two backup steps would restart
the copy from the first page, and under a steady stream of heartbeats a large database
might never finish. The pages are copied a step at a time all the same, with a Python
callback after each step: Python handles Ctrl-C only when it runs Python code, so
without one an interrupt would wait for the whole copy to end.

While the copy runs, SQLite cannot start the server's ``-wal`` file over, so it grows
by what the server writes meanwhile. Once the backup ends, the next checkpoint lets
SQLite reuse that space; the file shrinks back when the service stops cleanly.

The backup does not take the instance lock (``app/store/lock.py``): that lock is for
processes that drive the pipeline, and a backup only reads.

The copy is written to a temporary file beside PATH (mode 0600: it holds token hashes
and installation data), switched to a rollback journal so it is one self-contained
file, checked with ``PRAGMA integrity_check``, flushed to disk, and only then renamed to
PATH. A failed or interrupted backup removes its temporary file and leaves PATH as it
was; a killed one may leave ``.PATH.*.tmp`` behind, which can be deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.config import ConfigError, Settings

PROG = "update-pipeline"

HELP = "copy the database to a file, safely while the service runs"
DESCRIPTION = (
    "Copy the database to PATH with SQLite's online backup API, while the service runs "
    "or not. The copy is the database as it was when the backup began; it is checked "
    "with PRAGMA integrity_check before it appears at PATH, with mode 0600. Prints the "
    "path, size, schema version and integrity check result. Exits 1 on any problem, "
    "leaving PATH untouched."
)

# Pages copied per step: 1024 pages of SQLite's default 4 KiB are 4 MiB.
PAGES_PER_STEP = 1024
BUSY_TIMEOUT_MS = 5000
# Files SQLite and the service keep beside a database.
_COMPANIONS = ("-wal", "-shm", "-journal", ".lock")

Progress = Callable[[int, int, int], object]


class BackupError(Exception):
    """A one-line message for the operator; the command exits 1."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    size: int
    schema_version: int
    integrity: str

    def summary(self) -> str:
        return (
            f"backed up to {self.path}: {self.size} bytes, schema version "
            f"{self.schema_version}, integrity_check {self.integrity}"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The backup command's arguments: PATH, --force and --db."""
    parser.add_argument(
        "path",
        metavar="PATH",
        type=Path,
        help="the backup file to write; its folder must exist",
    )
    parser.add_argument("--force", action="store_true", help="replace PATH if it exists")
    parser.add_argument(
        "--db",
        type=Path,
        help="SQLite database file (default: $UPDATE_PIPELINE_DB or ./update-pipeline.db)",
    )


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Run the command; the exit status. ``settings`` are the command's resolved settings
    (``--db`` already applied); without them they are read from the environment and
    ``args.db``. Errors are printed as one line on stderr."""
    try:
        if settings is None:
            settings = Settings.from_env()
            if getattr(args, "db", None) is not None:
                settings = settings.replace(db_path=args.db)
        result = backup(settings.db_path, args.path, force=args.force)
    except (BackupError, ConfigError) as exc:
        message = " ".join(str(exc).splitlines())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def backup(
    db_path: Path,
    dest: Path,
    *,
    force: bool = False,
    pages: int = PAGES_PER_STEP,
    progress: Progress | None = None,
) -> BackupResult:
    """Copy ``db_path`` to ``dest``; BackupError, with ``dest`` untouched, on any problem.

    ``progress(status, remaining, total)`` is called after each step, as
    ``sqlite3.Connection.backup`` calls it."""
    _check_source(db_path)
    _check_destination(db_path, dest, force=force)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise BackupError(f"cannot write in {dest.parent}: {_reason(exc)}") from None
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o600)
        os.close(fd)
        _copy(db_path, tmp, pages, progress)
        schema_version, integrity = _verify(tmp, db_path)
        if integrity != "ok":
            raise BackupError(f"the copy failed PRAGMA integrity_check: {integrity}")
        _fsync(tmp)
        size = tmp.stat().st_size
        _publish(tmp, dest, force=force)
    except sqlite3.Error as exc:
        _remove(tmp)
        raise BackupError(f"cannot back up {db_path}: {exc}") from None
    except OSError as exc:
        _remove(tmp)
        raise BackupError(f"cannot back up {db_path} to {dest}: {_reason(exc)}") from None
    except BaseException:
        _remove(tmp)
        raise
    return BackupResult(dest, size, schema_version, integrity)


def _check_source(db_path: Path) -> None:
    if not db_path.exists():
        raise BackupError(f"database {db_path} does not exist")
    if not db_path.is_file():
        raise BackupError(f"database {db_path} is not a file")


def _check_destination(db_path: Path, dest: Path, *, force: bool) -> None:
    resolved = dest.resolve()
    source = db_path.resolve()
    if resolved in {source, *(source.with_name(source.name + c) for c in _COMPANIONS)}:
        raise BackupError(f"{dest} is the database or one of its files; back up to another file")
    if dest.is_dir():
        raise BackupError(f"{dest} is a folder; give the backup file's name")
    if not dest.parent.is_dir():
        raise BackupError(f"folder {dest.parent} does not exist")
    if os.path.lexists(dest) and not force:
        raise BackupError(f"{dest} exists; pass --force to replace it")


def _copy(db_path: Path, tmp: Path, pages: int, progress: Progress | None) -> None:
    # mode=rw: never create a database that is not there; the connection only reads.
    source = sqlite3.connect(
        db_path.absolute().as_uri() + "?mode=rw", uri=True, isolation_level=None
    )
    try:
        source.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        wal = str(source.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"
        if wal:
            # One snapshot for the whole copy (see the module's docstring). Outside WAL
            # mode a read transaction would hold writers off, so steps go on their own.
            source.execute("BEGIN")
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        target = sqlite3.connect(tmp, isolation_level=None)
        try:
            source.backup(target, pages=pages, progress=progress or _between_steps)
            # The copied header says WAL; a rollback journal keeps the backup one file.
            mode = target.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            if str(mode).lower() != "delete":
                raise BackupError(f"cannot make the copy a single file (journal mode {mode})")
        finally:
            target.close()
        if wal:
            source.execute("COMMIT")
    finally:
        source.close()


def _between_steps(status: int, remaining: int, total: int) -> None:
    """Nothing to do; running it lets a pending Ctrl-C interrupt the copy."""


def _verify(tmp: Path, db_path: Path) -> tuple[int, str]:
    """The copy's schema version and integrity check result."""
    copy = sqlite3.connect(tmp, isolation_level=None)
    try:
        integrity = _integrity_check(copy)
        found = copy.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()[0]
        if not found:
            raise BackupError(
                f"database {db_path} has no schema_version table: it is not an"
                " update-pipeline database"
            )
        version = copy.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    finally:
        copy.close()
    return int(version[0]), integrity


def _integrity_check(db: sqlite3.Connection) -> str:
    """``ok``, or SQLite's first findings on one line."""
    rows = [" ".join(str(row[0]).split()) for row in db.execute("PRAGMA integrity_check(10)")]
    return "; ".join(rows) if rows else "no answer"


def _publish(tmp: Path, dest: Path, *, force: bool) -> None:
    if force:
        os.replace(tmp, dest)
    else:
        # A hard link never replaces a file that appeared while the copy ran.
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise BackupError(f"{dest} exists; pass --force to replace it") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # A file system without hard links: check, then rename.
            if os.path.lexists(dest):
                raise BackupError(f"{dest} exists; pass --force to replace it") from None
            os.replace(tmp, dest)
        else:
            # PATH is in place; a link left behind would only be a second name for it.
            with contextlib.suppress(OSError):
                tmp.unlink()
    _fsync_folder(dest.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; some file systems cannot sync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove(tmp: Path) -> None:
    for path in (tmp, *(tmp.with_name(tmp.name + c) for c in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
