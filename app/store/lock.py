"""An exclusive lock beside the database file, so one process alone drives the pipeline."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from app.store.base import StoreError


class InstanceLock:
    """``flock`` on ``<db>.lock``: the kernel drops it when the holder dies, so a crash
    never leaves a stale lock behind for the next start to clean up."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"database {self.path.with_suffix('')} is in use by another update-pipeline "
                f"process (pid {holder}); stop it first or use another database"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
