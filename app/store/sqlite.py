"""The SQLite store: WAL mode, one writer connection behind a lock, one reader connection."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from app.clock import isoformat, parse_iso
from app.logs import get_logger
from app.store.base import (
    AlreadyDone,
    Approval,
    BuildRecord,
    CanaryOutcome,
    CanaryRun,
    ChannelChange,
    ChannelRecord,
    Conflict,
    DashboardSession,
    Delivery,
    Effect,
    EventRecord,
    FoundVersion,
    Freeze,
    Heartbeat,
    HistoryEntry,
    Inclusion,
    Installation,
    NewCanaryRun,
    NewEffect,
    NewToken,
    Org,
    OutboxStats,
    Repository,
    Rollout,
    RolloutChange,
    RunnerState,
    RuntimeVersionRecord,
    Settled,
    StageSessions,
    StaleRollout,
    StatusCounts,
    StoreBusy,
    StoreError,
    Sweep,
    SweepRepo,
    SweepRun,
    TokenRecord,
    TrackingIssue,
)
from app.store.migrations import MIGRATIONS, Migration

log = get_logger("store")

BUSY_TIMEOUT_MS = 5000
ACTIVE_ROLLOUT_STATES = ("pending", "rolling_out", "paused")
ACTIVE_CANARY_STATES = ("pending", "running")
ACTIVE_SWEEP_STATES = ("pending", "running")


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: transactions are opened explicitly with BEGIN IMMEDIATE,
    # so a writer takes SQLite's write lock up front instead of failing mid-transaction.
    connection = aiosqlite.connect(path, isolation_level=None)
    try:
        db = await connection
    except BaseException:
        # aiosqlite queues its worker thread's stop without waiting for it; wait here,
        # or the thread answers into a closed event loop when the command exits.
        await asyncio.to_thread(connection._thread.join, 1.0)
        raise
    try:
        db.row_factory = sqlite3.Row
        await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        # An unclosed connection keeps its worker thread, and so the process, alive.
        await db.close()
        raise
    return db


class SqliteStore:
    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        snapshots: aiosqlite.Connection,
    ):
        self.path = path
        self._w = writer
        # Single reads run in autocommit on the reader, so each sees the latest commit.
        # Reads that must agree with each other take a read transaction, on a connection
        # of their own: a transaction open on the shared reader would show every other
        # read that old snapshot too (a delivery already processed would look pending).
        self._r = _Reader(reader)
        self._s = snapshots
        self._write_lock = asyncio.Lock()
        self._snapshot_lock = asyncio.Lock()
        self._delivery_queue: list[tuple[Delivery, asyncio.Future[bool]]] = []
        self._delivery_writer: asyncio.Task[None] | None = None
        self._heartbeat_queue: list[tuple[Heartbeat, asyncio.Future[None]]] = []
        self._heartbeat_writer: asyncio.Task[None] | None = None
        self._interrupted = False

    @classmethod
    async def open(cls, path: Path, *, migrate: bool = True) -> SqliteStore:
        """Open (creating if needed) and bring the schema up to date."""
        try:
            writer = await _connect(path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        try:
            mode = await _scalar(writer, "PRAGMA journal_mode = WAL")
            if str(mode).lower() != "wal":
                raise StoreError(f"database {path} cannot use WAL mode (got {mode})")
            await _check_and_migrate(writer, path, apply=migrate)
            reader = await _connect(path)
            try:
                snapshots = await _connect(path)
            except BaseException:
                await reader.close()
                raise
        except sqlite3.DatabaseError as exc:
            await writer.close()
            raise StoreError(f"cannot use database {path}: {exc}") from None
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader, snapshots)

    async def close(self) -> None:
        for writer in (self._delivery_writer, self._heartbeat_writer):
            if writer is not None:
                await writer
        async with self._write_lock:
            await self._r.close()
            await self._s.close()
            # A clean checkpoint leaves a single self-contained file behind.
            try:
                await self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # another connection may still be reading
                log.warning("WAL checkpoint at close skipped: %s", exc)
            await self._w.close()

    async def ping(self) -> None:
        await _scalar(self._r, "SELECT 1")

    async def schema_version(self) -> int:
        return await _current_version(self._r)

    async def outside_writes(self) -> int:
        """A number that changes whenever another process commits to the database.

        Read on the writer connection: its own commits do not change it, and the reader
        never writes, so only other processes (the token CLI, say) move it."""
        async with self._write_lock:
            return int(await _scalar(self._w, "PRAGMA data_version"))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """Every multi-row change goes through here: all of it commits, or none of it."""
        async with self._write_lock:
            if self._interrupted:
                # A task cancelled mid-BEGIN or mid-COMMIT may have left its statements
                # queued on the connection: let them run, then undo what they left open.
                await self._w.execute("SELECT 1")
                if self._w.in_transaction:
                    await self._w.execute("ROLLBACK")
            self._interrupted = True
            try:
                await self._w.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    raise StoreBusy(
                        f"database {self.path.name} is locked by another connection"
                        f" (waited {BUSY_TIMEOUT_MS} ms)"
                    ) from exc
                raise
            try:
                yield self._w
            except BaseException:
                await self._w.execute("ROLLBACK")
                self._interrupted = False
                raise
            await self._w.execute("COMMIT")
            self._interrupted = False

    # -- API tokens -------------------------------------------------------------------

    async def add_tokens(self, tokens: Sequence[NewToken]) -> list[TokenRecord]:
        added: list[TokenRecord] = []
        async with self._transaction() as db:
            for token in tokens:
                try:
                    cursor = await db.execute(
                        "INSERT INTO api_tokens (name, token_hash, role, org_id, created_at,"
                        " expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            token.name,
                            token.token_hash,
                            token.role,
                            token.org_id,
                            isoformat(token.created_at),
                            _iso_or_none(token.expires_at),
                        ),
                    )
                except sqlite3.IntegrityError:
                    raise Conflict(
                        f"a token named {token.name!r} already exists", token.name
                    ) from None
                assert cursor.lastrowid is not None
                added.append(
                    TokenRecord(
                        id=cursor.lastrowid,
                        name=token.name,
                        role=token.role,
                        token_hash=token.token_hash,
                        org_id=token.org_id,
                        created_at=token.created_at,
                        expires_at=token.expires_at,
                        last_used_at=None,
                        revoked_at=None,
                    )
                )
        return added

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        async with self._r.execute(
            "SELECT * FROM api_tokens WHERE token_hash = ?", (token_hash,)
        ) as cursor:
            row = await cursor.fetchone()
        return _token(row) if row else None

    async def list_tokens(self, *, include_revoked: bool = False) -> list[TokenRecord]:
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        async with self._r.execute(f"SELECT * FROM api_tokens {where} ORDER BY name, id") as cur:  # noqa: S608
            return [_token(row) for row in await cur.fetchall()]

    async def revoke_token(self, name: str, at: datetime) -> TokenRecord | None:
        async with (
            self._transaction() as db,
            db.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL"
                " RETURNING *",
                (isoformat(at), name),
            ) as cursor,
        ):
            row = await cursor.fetchone()
        return _token(row) if row else None

    async def touch_token(self, token_id: int, at: datetime) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (isoformat(at), token_id)
            )

    # -- Dashboard sessions -------------------------------------------------------------

    async def add_session(self, session: DashboardSession) -> None:
        async with self._transaction() as db:
            # Expired sessions go as new ones arrive: no timer needed, and the table stays
            # the size of the sessions alive.
            await db.execute(
                "DELETE FROM dashboard_sessions WHERE expires_at <= ?",
                (isoformat(session.created_at),),
            )
            await db.execute(
                "INSERT INTO dashboard_sessions (id_hash, kind, login, level, token_id,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    session.id_hash,
                    session.kind,
                    session.login,
                    session.level,
                    session.token_id,
                    isoformat(session.created_at),
                    isoformat(session.expires_at),
                ),
            )

    async def session_by_hash(self, id_hash: str, now: datetime) -> DashboardSession | None:
        moment = isoformat(now)
        async with self._r.execute(
            "SELECT s.* FROM dashboard_sessions s WHERE s.id_hash = ? AND s.expires_at > ?"
            " AND (s.token_id IS NULL OR EXISTS (SELECT 1 FROM api_tokens t"
            " WHERE t.id = s.token_id AND t.revoked_at IS NULL"
            " AND (t.expires_at IS NULL OR t.expires_at > ?)))",
            (id_hash, moment, moment),
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        return DashboardSession(
            id_hash=row["id_hash"],
            kind=row["kind"],
            login=row["login"],
            level=row["level"],
            token_id=row["token_id"],
            created_at=parse_iso(row["created_at"]),
            expires_at=parse_iso(row["expires_at"]),
        )

    async def delete_session(self, id_hash: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM dashboard_sessions WHERE id_hash = ?", (id_hash,)
            )
            return cursor.rowcount > 0

    # -- Event log --------------------------------------------------------------------

    async def append_event(
        self, type: str, data: Mapping[str, Any], at: datetime, *, keep: int
    ) -> EventRecord:
        async with self._transaction() as db:
            return await _insert_event(db, type, data, at, keep)

    async def list_events(
        self, *, types: Sequence[str] = (), before_id: int | None = None, limit: int = 50
    ) -> list[EventRecord]:
        clauses: list[str] = []
        params: list[object] = []
        if types:
            clauses.append(f"type IN ({', '.join('?' * len(types))})")
            params.extend(types)
        if before_id is not None:
            clauses.append("id < ?")
            params.append(before_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?"  # noqa: S608
        async with self._r.execute(sql, (*params, limit)) as cursor:
            return [_event(row) for row in await cursor.fetchall()]

    async def events_after(self, after_id: int, *, limit: int = 500) -> list[EventRecord]:
        async with self._r.execute(
            "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        ) as cursor:
            return [_event(row) for row in await cursor.fetchall()]

    # -- Design models ----------------------------------------------------------------

    async def record_versions(
        self, found: Sequence[FoundVersion], at: datetime, *, keep_events: int
    ) -> list[EventRecord]:
        """Record upstream versions; one ``new_version_detected`` event for each version
        announced for the first time, written in the same transaction as its row, so a
        crash or a concurrent check can neither lose the event nor emit it twice.

        A version only runners had reported becomes an announced release here, taking
        the upstream release time."""
        events: list[EventRecord] = []
        async with self._transaction() as db:
            for version in found:
                row = await _insert_version(db, version, at, announced=True)
                if row is None:
                    async with db.execute(
                        "UPDATE runtime_versions SET released_at = ?, source = ?,"
                        " source_url = ?, prerelease = ?, announced_at = ?, baseline = ?"
                        " WHERE provider_id = ? AND version = ? AND announced_at IS NULL"
                        " RETURNING *",
                        (
                            isoformat(version.released_at),
                            version.source,
                            version.source_url,
                            int(version.prerelease),
                            isoformat(at),
                            int(version.baseline),
                            version.provider_id,
                            version.version,
                        ),
                    ) as cursor:
                        row = await cursor.fetchone()
                if row is not None and not version.baseline:
                    events.append(
                        await _insert_event(
                            db, "new_version_detected", _version_event(row), at, keep_events
                        )
                    )
        return events

    async def record_heartbeat_version(
        self, found: FoundVersion, at: datetime, *, keep_events: int
    ) -> EventRecord | None:
        """Record a version a runner reported; a ``version_drift_detected`` event when
        no source knew it."""
        async with self._transaction() as db:
            row = await _insert_version(db, found, at, announced=False)
            if row is None:
                return None
            return await _insert_event(
                db, "version_drift_detected", _version_event(row), at, keep_events
            )

    async def version_pairs(self) -> dict[tuple[str, str], bool]:
        """Every (provider, version) known, and whether a source announced it (False:
        only runners reported it)."""
        async with self._r.execute(
            "SELECT provider_id, version, announced_at IS NOT NULL FROM runtime_versions"
        ) as cursor:
            return {(row[0], row[1]): bool(row[2]) for row in await cursor.fetchall()}

    async def list_versions(
        self, *, provider_id: str | None, before: str | None, limit: int
    ) -> list[RuntimeVersionRecord]:
        """Newest release first; ``before`` is the id of the last row of the page before."""
        async with self._r.execute(
            "SELECT * FROM runtime_versions WHERE (?1 IS NULL OR provider_id = ?1)"
            " AND (?2 IS NULL OR (released_at, id) < (SELECT released_at, id"
            " FROM runtime_versions WHERE id = ?2)) ORDER BY released_at DESC, id DESC"
            " LIMIT ?3",
            (provider_id, before, limit),
        ) as cursor:
            return [_version(row) for row in await cursor.fetchall()]

    async def versions_for_canary(
        self, released_before: datetime, *, limit: int
    ) -> list[RuntimeVersionRecord]:
        """Announced versions not yet handed to the canary, released before the time."""
        async with self._r.execute(
            "SELECT * FROM runtime_versions WHERE announced_at IS NOT NULL"
            " AND handed_to_canary_at IS NULL AND baseline = 0 AND released_at <= ?"
            " ORDER BY released_at, id LIMIT ?",
            (isoformat(released_before), limit),
        ) as cursor:
            return [_version(row) for row in await cursor.fetchall()]

    async def next_canary_eligible(self) -> datetime | None:
        """The release time of the oldest version still waiting for the canary."""
        value = await _scalar(
            self._r,
            "SELECT min(released_at) FROM runtime_versions"
            " WHERE announced_at IS NOT NULL AND handed_to_canary_at IS NULL AND baseline = 0",
        )
        return parse_iso(value) if value else None

    async def mark_handed_to_canary(self, version_id: str, at: datetime) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE runtime_versions SET handed_to_canary_at = ? WHERE id = ?",
                (isoformat(at), version_id),
            )

    async def add_build(self, build: BuildRecord, at: datetime) -> None:
        async with self._transaction() as db:
            await _insert_build(db, build, at)

    async def register_build(
        self,
        build: BuildRecord,
        at: datetime,
        *,
        run: NewCanaryRun,
        keep_events: int,
        effects: Sequence[NewEffect] = (),
    ) -> tuple[BuildRecord, CanaryRun, list[EventRecord]]:
        """A new build and its first canary run, with the ``canary_started`` event and the
        run's GitHub side effects, in one transaction; Conflict when the id is taken."""
        async with self._transaction() as db:
            stored = await _insert_build(db, build, at)
            started, event = await _start_run(db, build, 1, run, at, keep_events)
            await _insert_effects(db, effects, at)
        return stored, started, [event]

    async def start_canary_run(
        self,
        build_id: str,
        attempt: int,
        at: datetime,
        *,
        run: NewCanaryRun,
        keep_events: int,
        effects: Sequence[NewEffect] = (),
    ) -> tuple[CanaryRun, list[EventRecord]]:
        """Another canary run of a build (a re-run); Conflict when this attempt exists."""
        async with self._transaction() as db:
            build = await _build_in(db, build_id)
            try:
                started, event = await _start_run(db, build, attempt, run, at, keep_events)
            except sqlite3.IntegrityError:
                raise Conflict(f"{build_id} already has run {attempt}", build_id) from None
            await _insert_effects(db, effects, at)
        return started, [event]

    async def bind_workflow_run(self, run_id: str, workflow_run_id: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE canary_runs SET workflow_run_id = ?,"
                " state = CASE state WHEN 'pending' THEN 'running' ELSE state END,"
                " started_at = coalesce(started_at, created_at)"
                " WHERE id = ? AND workflow_run_id IS NULL",
                (workflow_run_id, run_id),
            )

    async def canary_run_for_workflow(
        self, workflow_run_id: str, dispatch_keys: Sequence[str]
    ) -> CanaryRun | None:
        """The run a workflow run belongs to: bound by its id, or named by a dispatch key
        (its run name carries the key)."""
        async with self._r.execute(
            "SELECT * FROM canary_runs WHERE workflow_run_id = ?1 OR dispatch_key IN"
            " (SELECT value FROM json_each(?2)) ORDER BY workflow_run_id = ?1 DESC LIMIT 1",
            (workflow_run_id, json.dumps(list(dispatch_keys))),
        ) as cursor:
            row = await cursor.fetchone()
        return _canary_run(row) if row else None

    async def canary_run_by_check_key(self, check_key: str) -> CanaryRun | None:
        async with self._r.execute(
            "SELECT * FROM canary_runs WHERE check_key = ?", (check_key,)
        ) as cursor:
            row = await cursor.fetchone()
        return _canary_run(row) if row else None

    async def set_pull_request_build(
        self, repository: str, number: int, build_id: str, head_sha: str, at: datetime
    ) -> str | None:
        """Record the build a pull request carries now; the one it carried before."""
        async with self._transaction() as db:
            async with db.execute(
                "SELECT build_id FROM pull_request_builds WHERE repository = ? AND number = ?",
                (repository.lower(), number),
            ) as cursor:
                before = await cursor.fetchone()
            await db.execute(
                "INSERT INTO pull_request_builds (repository, number, build_id, head_sha,"
                " updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (repository, number) DO UPDATE"
                " SET build_id = excluded.build_id, head_sha = excluded.head_sha,"
                " updated_at = excluded.updated_at",
                (repository.lower(), number, build_id, head_sha, isoformat(at)),
            )
        return str(before[0]) if before else None

    async def forget_pull_request_build(self, repository: str, number: int) -> str | None:
        """The pull request no longer carries a build; the one it carried."""
        async with (
            self._transaction() as db,
            db.execute(
                "DELETE FROM pull_request_builds WHERE repository = ? AND number = ?"
                " RETURNING build_id",
                (repository.lower(), number),
            ) as cursor,
        ):
            row = await cursor.fetchone()
        return str(row[0]) if row else None

    async def pull_request_build(self, repository: str, number: int) -> str | None:
        value = await _scalar(
            self._r,
            "SELECT build_id FROM pull_request_builds WHERE repository = ? AND number = ?",
            (repository.lower(), number),
        )
        return str(value) if value is not None else None

    # -- Fleet ------------------------------------------------------------------------------

    async def add_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Write a heartbeat: the runner's state and the sessions it adds. Returns once
        committed; concurrent heartbeats share commits, as deliveries do."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._heartbeat_queue.append((heartbeat, waiter))
        if self._heartbeat_writer is None or self._heartbeat_writer.done():
            self._heartbeat_writer = asyncio.create_task(self._write_heartbeats())
        await waiter

    async def _write_heartbeats(self) -> None:
        batch: list[tuple[Heartbeat, asyncio.Future[None]]] = []
        try:
            while self._heartbeat_queue:
                batch = []
                try:
                    async with self._transaction() as db:
                        batch, self._heartbeat_queue = self._heartbeat_queue, []
                        await _insert_heartbeats(db, [h for h, _ in batch])
                except Exception as exc:
                    if not batch:  # it could not begin (locked): those waiting fail now
                        batch, self._heartbeat_queue = self._heartbeat_queue, []
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                for _, waiter in batch:
                    if not waiter.done():
                        waiter.set_result(None)
                batch = []
        except BaseException:
            for _, waiter in batch + self._heartbeat_queue:
                if not waiter.done():
                    waiter.set_exception(StoreError("the store is closing"))
            self._heartbeat_queue = []
            raise

    async def runner_state(self, org_id: str, runner_id: str) -> RunnerState | None:
        async with self._r.execute(
            "SELECT runner_id, org_id, boot_id, build_id, started, failed, disconnected"
            " FROM runners WHERE org_id = ? AND runner_id = ?",
            (org_id, runner_id),
        ) as cursor:
            row = await cursor.fetchone()
        return RunnerState(*row) if row else None

    async def list_orgs(self, *, channel: str | None, before: str | None, limit: int) -> list[Org]:
        async with self._r.execute(
            "SELECT * FROM orgs WHERE (?1 IS NULL OR channel = ?1) AND (?2 IS NULL OR org_id > ?2)"
            " ORDER BY org_id LIMIT ?3",
            (channel, before, limit),
        ) as cursor:
            return [_org(row) for row in await cursor.fetchall()]

    async def all_orgs(self) -> list[Org]:
        async with self._r.execute("SELECT * FROM orgs") as cursor:
            return [_org(row) for row in await cursor.fetchall()]

    async def get_org(self, org_id: str) -> Org | None:
        async with self._r.execute("SELECT * FROM orgs WHERE org_id = ?", (org_id,)) as cursor:
            row = await cursor.fetchone()
        return _org(row) if row else None

    async def save_org(self, org: Org) -> None:
        async with self._transaction() as db:
            await _upsert_org(db, org)

    async def fleet_counts(self) -> list[dict[str, Any]]:
        """Runners and orgs per (channel, build), with the last time one was seen."""
        async with self._r.execute(
            "SELECT coalesce(o.channel, 'stable') AS channel, r.build_id,"
            " count(*) AS runners, count(DISTINCT r.org_id) AS orgs,"
            " max(r.last_seen_at) AS last_seen_at"
            " FROM runners r LEFT JOIN orgs o ON o.org_id = r.org_id"
            " GROUP BY 1, 2 ORDER BY 1, 3 DESC"
        ) as cursor:
            return [dict(row) for row in await cursor.fetchall()]

    async def prune_sessions(self, older_than: datetime) -> int:
        """Forget session counts, and runners not seen, since ``older_than``."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM session_counts WHERE hour < ?", (_hour(older_than),)
            )
            await db.execute("DELETE FROM runners WHERE last_seen_at < ?", (isoformat(older_than),))
            return cursor.rowcount

    async def get_build(self, build_id: str) -> BuildRecord | None:
        async with self._r.execute(
            "SELECT * FROM runner_builds WHERE build_id = ?", (build_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return _build(row) if row else None

    async def list_builds(self, *, before: str | None, limit: int) -> list[BuildRecord]:
        """Newest first; ``before`` is the build id ending the previous page."""
        async with self._r.execute(
            "SELECT * FROM runner_builds WHERE ?1 IS NULL OR (created_at, build_id) <"
            " (SELECT created_at, build_id FROM runner_builds WHERE build_id = ?1)"
            " ORDER BY created_at DESC, build_id DESC LIMIT ?2",
            (before, limit),
        ) as cursor:
            return [_build(row) for row in await cursor.fetchall()]

    async def canary_results(self, run_id: str) -> list[dict[str, Any]] | None:
        """The results a run was judged on (None when it ended without any)."""
        value = await _scalar(self._r, "SELECT results FROM canary_runs WHERE id = ?", (run_id,))
        return json.loads(value) if value else None

    async def list_canary_runs(self, build_id: str) -> list[CanaryRun]:
        async with self._r.execute(
            "SELECT * FROM canary_runs WHERE build_id = ? ORDER BY attempt", (build_id,)
        ) as cursor:
            return [_canary_run(row) for row in await cursor.fetchall()]

    async def latest_canary_run(self, build_id: str) -> CanaryRun | None:
        async with self._r.execute(
            "SELECT * FROM canary_runs WHERE build_id = ? ORDER BY attempt DESC LIMIT 1",
            (build_id,),
        ) as cursor:
            row = await cursor.fetchone()
        return _canary_run(row) if row else None

    async def finish_canary(
        self,
        run_id: str,
        outcome: CanaryOutcome,
        at: datetime,
        *,
        keep_events: int,
        effects: Sequence[NewEffect] = (),
    ) -> tuple[CanaryRun, list[EventRecord]] | None:
        """Conclude a run that is still pending or running; None when it is not (a second
        report, or a report racing the timeout, loses cleanly). A pass marks the build
        known-good for its passing providers and their runtime versions canary-passed."""
        async with self._transaction() as db:
            async with db.execute(
                "UPDATE canary_runs SET state = ?, completed_at = ?,"
                " started_at = coalesce(started_at, ?), metrics = ?, results = ?, error = ?,"
                " reported_by = ? WHERE id = ? AND state IN ('pending', 'running') RETURNING *",
                (
                    outcome.state,
                    isoformat(at),
                    isoformat(at),
                    _json_or_none(outcome.metrics),
                    None if outcome.results is None else json.dumps(list(outcome.results)),
                    outcome.error,
                    outcome.reported_by,
                    run_id,
                ),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            run = _canary_run(row)
            build = await _build_in(db, run.build_id)
            good = sorted(set(build.known_good_for) | set(outcome.known_good_for))
            await db.execute(
                "UPDATE runner_builds SET known_good_for = ? WHERE build_id = ?",
                (json.dumps(good), run.build_id),
            )
            for provider in outcome.known_good_for:
                version = build.runtime_versions.get(provider)
                if version is None:
                    continue
                await db.execute(
                    "UPDATE runtime_versions SET canary_passed = 1,"
                    " canary_passed_at = coalesce(canary_passed_at, ?)"
                    " WHERE provider_id = ? AND version = ?",
                    (isoformat(at), provider, version),
                )
            event = await _insert_event(
                db,
                "canary_completed",
                {
                    "buildId": run.build_id,
                    "runId": run.id,
                    "attempt": run.attempt,
                    "status": outcome.state,
                    "knownGoodFor": list(outcome.known_good_for),
                    "error": outcome.error,
                },
                at,
                keep_events,
            )
            await _insert_effects(db, effects, at)
        return run, [event]

    async def expired_canaries(self, now: datetime, *, limit: int) -> list[CanaryRun]:
        async with self._r.execute(
            "SELECT * FROM canary_runs WHERE state IN ('pending', 'running')"
            " AND deadline_at <= ? ORDER BY deadline_at LIMIT ?",
            (isoformat(now), limit),
        ) as cursor:
            return [_canary_run(row) for row in await cursor.fetchall()]

    async def next_canary_deadline(self) -> datetime | None:
        value = await _scalar(
            self._r,
            "SELECT min(deadline_at) FROM canary_runs WHERE state IN ('pending', 'running')",
        )
        return parse_iso(value) if value else None

    async def set_channel(
        self,
        channel: str,
        build_id: str,
        at: datetime,
        *,
        reason: str,
        set_by: str,
        keep_events: int,
    ) -> tuple[ChannelRecord, list[EventRecord]]:
        async with self._transaction() as db:
            event = await _set_channel(
                db, channel, ChannelChange(build_id, reason, set_by), at, keep_events
            )
        return ChannelRecord(channel, build_id, parse_iso(isoformat(at)), reason, set_by), [event]

    async def list_channels(self) -> list[ChannelRecord]:
        async with self._r.execute("SELECT * FROM recommended_builds ORDER BY channel") as cursor:
            return [
                ChannelRecord(
                    row["channel"],
                    row["build_id"],
                    parse_iso(row["updated_at"]),
                    row["reason"],
                    row["set_by"],
                )
                for row in await cursor.fetchall()
            ]

    async def org_builds(self, org_ids: Sequence[str]) -> dict[str, str]:
        """The build most of each org's runners last reported (orgs with none left out)."""
        found: dict[str, str] = {}
        for chunk in _chunks(org_ids, 500):
            marks = ", ".join("?" * len(chunk))
            async with self._r.execute(
                "SELECT org_id, build_id, count(*) AS runners FROM runners"  # noqa: S608
                f" WHERE org_id IN ({marks}) AND build_id IS NOT NULL"
                " GROUP BY org_id, build_id ORDER BY org_id, runners DESC, build_id",
                tuple(chunk),
            ) as cursor:
                for row in await cursor.fetchall():
                    found.setdefault(row["org_id"], row["build_id"])
        return found

    # -- Rollouts ---------------------------------------------------------------------------

    async def write_rollout(
        self, change: RolloutChange, at: datetime, *, keep_events: int
    ) -> list[EventRecord]:
        """Write one rollout transition whole: the row (compare-and-set on its version),
        inclusions, an approval, the channel's recommendation, history and events."""
        r = change.rollout
        row = (
            r.build_id,
            r.channel,
            r.state,
            r.percentage,
            isoformat(r.started_at),
            isoformat(r.updated_at),
            r.plan,
            r.stage,
            _iso_or_none(r.stage_started_at),
            _iso_or_none(r.deadline_at),
            _iso_or_none(r.paused_at),
            r.remaining_seconds,
            r.previous_build_id,
            r.replaced_build_id,
            r.started_by,
            r.forced_reason,
            _iso_or_none(r.finished_at),
            json.dumps(dict(r.rollback)) if r.rollback is not None else None,
            r.version,
        )
        columns = (
            "target_build_id, channel, state, current_percentage, started_at, last_updated_at,"
            " plan, stage, stage_started_at, deadline_at, paused_at, remaining_seconds,"
            " previous_build_id, replaced_build_id, started_by, forced_reason, finished_at,"
            " rollback, version"
        )
        events: list[EventRecord] = []
        async with self._transaction() as db:
            if change.once is not None:
                cursor = await db.execute(
                    "INSERT INTO rollout_commands (key, rollout_id, at) VALUES (?, ?, ?)"
                    " ON CONFLICT (key) DO NOTHING",
                    (change.once, r.rollout_id, isoformat(at)),
                )
                if not cursor.rowcount:
                    done = await _scalar(
                        db, "SELECT rollout_id FROM rollout_commands WHERE key = ?", (change.once,)
                    )
                    raise AlreadyDone(f"{change.once} was acted on before", str(done))
            if change.expected_version is None:
                try:
                    await db.execute(
                        f"INSERT INTO active_rollouts (id, rollout_id, {columns}, created_at)"  # noqa: S608
                        f" VALUES ({', '.join('?' * (len(row) + 3))})",
                        (str(uuid.uuid4()), r.rollout_id, *row, isoformat(at)),
                    )
                except sqlite3.IntegrityError as exc:
                    if "active_rollouts.channel" in str(exc):
                        raise Conflict(
                            f"a rollout is already active on the {r.channel} channel", "channel"
                        ) from None
                    raise
            else:
                assignments = ", ".join(f"{c.strip()} = ?" for c in columns.split(","))
                cursor = await db.execute(
                    f"UPDATE active_rollouts SET {assignments}"  # noqa: S608
                    " WHERE rollout_id = ? AND version = ?",
                    (*row, r.rollout_id, change.expected_version),
                )
                if cursor.rowcount != 1:
                    raise StaleRollout(f"rollout {r.rollout_id} changed meanwhile")
            await db.executemany(
                "INSERT INTO rollout_orgs (rollout_id, org_id, stage, included_at,"
                " previous_build_id) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (rollout_id, org_id) DO NOTHING",
                [
                    (r.rollout_id, i.org_id, i.stage, isoformat(i.included_at), i.previous_build_id)
                    for i in change.inclusions
                ],
            )
            if change.approval is not None:
                a = change.approval
                await db.execute(
                    "INSERT INTO rollout_approvals (rollout_id, org_id, decision, decided_by,"
                    " decided_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (rollout_id, org_id)"
                    " DO UPDATE SET decision = excluded.decision,"
                    " decided_by = excluded.decided_by, decided_at = excluded.decided_at,"
                    " voided_at = NULL",
                    (r.rollout_id, a.org_id, a.decision, a.decided_by, isoformat(a.decided_at)),
                )
            if change.withdraw is not None:
                await db.execute(
                    "DELETE FROM rollout_approvals WHERE rollout_id = ? AND org_id = ?",
                    (r.rollout_id, change.withdraw),
                )
            if change.void_approvals:
                await db.execute(
                    "UPDATE rollout_approvals SET voided_at = ? WHERE rollout_id = ?"
                    " AND voided_at IS NULL",
                    (isoformat(at), r.rollout_id),
                )
            await db.executemany(
                "INSERT INTO rollout_history (rollout_id, at, actor, action, from_state,"
                " to_state, stage, percentage, reason, details)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.rollout_id,
                        isoformat(h.at),
                        h.actor,
                        h.action,
                        h.from_state,
                        h.to_state,
                        h.stage,
                        h.percentage,
                        h.reason,
                        json.dumps(dict(h.details), sort_keys=True),
                    )
                    for h in change.history
                ],
            )
            if change.channel is not None:
                events.append(
                    await _set_channel(
                        db, r.channel, change.channel, at, keep_events, by_rollout=r.rollout_id
                    )
                )
            for type_, data in change.events:
                events.append(await _insert_event(db, type_, data, at, keep_events))
            if change.tracking is not None:
                t = change.tracking
                await db.execute(
                    "INSERT INTO tracking_issues (rollout_id, repo, installation_id, issue_key,"
                    " issue_number, created_at) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (rollout_id) DO UPDATE SET repo = excluded.repo,"
                    " installation_id = excluded.installation_id,"
                    " issue_key = excluded.issue_key, issue_number = excluded.issue_number",
                    (
                        t.rollout_id,
                        t.repo.lower(),
                        t.installation_id,
                        t.key,
                        t.number,
                        isoformat(at),
                    ),
                )
            await _insert_effects(db, change.effects, at)
        return events

    async def command_done(self, key: str) -> str | None:
        """The rollout a command with this key acted on, if it did."""
        value = await _scalar(
            self._r, "SELECT rollout_id FROM rollout_commands WHERE key = ?", (key,)
        )
        return str(value) if value is not None else None

    async def tracking_issue(self, rollout_id: str) -> TrackingIssue | None:
        async with self._r.execute(
            "SELECT * FROM tracking_issues WHERE rollout_id = ?", (rollout_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return _tracking(row) if row else None

    async def tracking_issue_by_number(self, repo: str, number: int) -> TrackingIssue | None:
        async with self._r.execute(
            "SELECT * FROM tracking_issues WHERE repo = ? AND issue_number = ?",
            (repo.lower(), number),
        ) as cursor:
            row = await cursor.fetchone()
        return _tracking(row) if row else None

    async def unnumbered_tracking_issues(self, repo: str) -> list[TrackingIssue]:
        async with self._r.execute(
            "SELECT * FROM tracking_issues WHERE repo = ? AND issue_number IS NULL",
            (repo.lower(),),
        ) as cursor:
            return [_tracking(row) for row in await cursor.fetchall()]

    async def replace_tracking_issue(
        self, tracking: TrackingIssue, effects: Sequence[NewEffect], at: datetime
    ) -> None:
        """Point a rollout at a new tracking issue, with the entries that make it."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE tracking_issues SET issue_key = ?, issue_number = NULL"
                " WHERE rollout_id = ?",
                (tracking.key, tracking.rollout_id),
            )
            await _insert_effects(db, effects, at)

    async def set_tracking_number(self, rollout_id: str, key: str, number: int) -> None:
        """Record the number GitHub gave the issue made under ``key`` (unless the rollout's
        issue has been replaced by another since)."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE tracking_issues SET issue_number = ? WHERE rollout_id = ?"
                " AND issue_key = ?",
                (number, rollout_id, key),
            )

    async def include_org(self, rollout_id: str, inclusion: Inclusion, *, version: int) -> bool:
        """Add one org to a rollout rolling out at ``version`` (an org that appeared after
        its stage began); False when the rollout has moved on or the org is in already."""
        i = inclusion
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT INTO rollout_orgs (rollout_id, org_id, stage, included_at,"
                " previous_build_id) SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM"
                " active_rollouts WHERE rollout_id = ?1 AND version = ?6"
                " AND state = 'rolling_out') ON CONFLICT (rollout_id, org_id) DO NOTHING",
                (
                    rollout_id,
                    i.org_id,
                    i.stage,
                    isoformat(i.included_at),
                    i.previous_build_id,
                    version,
                ),
            )
            return cursor.rowcount == 1

    async def get_rollout(self, rollout_id: str) -> Rollout | None:
        async with self._r.execute(
            "SELECT * FROM active_rollouts WHERE rollout_id = ?", (rollout_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return _rollout(row) if row else None

    async def list_rollouts(
        self, *, state: str | None, channel: str | None, before: str | None, limit: int
    ) -> list[Rollout]:
        """Newest first; ``before`` is the rollout id ending the previous page."""
        async with self._r.execute(
            "SELECT * FROM active_rollouts WHERE (?1 IS NULL OR state = ?1)"
            " AND (?2 IS NULL OR channel = ?2) AND (?3 IS NULL OR (started_at, rollout_id) <"
            " (SELECT started_at, rollout_id FROM active_rollouts WHERE rollout_id = ?3))"
            " ORDER BY started_at DESC, rollout_id DESC LIMIT ?4",
            (state, channel, before, limit),
        ) as cursor:
            return [_rollout(row) for row in await cursor.fetchall()]

    async def live_rollouts(self) -> list[Rollout]:
        """Rollouts still moving: pending, rolling out or paused."""
        marks = ", ".join("?" * len(ACTIVE_ROLLOUT_STATES))
        async with self._r.execute(
            f"SELECT * FROM active_rollouts WHERE state IN ({marks})",  # noqa: S608
            ACTIVE_ROLLOUT_STATES,
        ) as cursor:
            return [_rollout(row) for row in await cursor.fetchall()]

    async def latest_rollout(self, channel: str) -> Rollout | None:
        async with self._r.execute(
            "SELECT * FROM active_rollouts WHERE channel = ?"
            " ORDER BY started_at DESC, rowid DESC LIMIT 1",
            (channel,),
        ) as cursor:
            row = await cursor.fetchone()
        return _rollout(row) if row else None

    async def rollout_orgs(
        self, rollout_id: str, *, after: str | None = None, limit: int | None = None
    ) -> list[Inclusion]:
        async with self._r.execute(
            "SELECT * FROM rollout_orgs WHERE rollout_id = ? AND (?2 IS NULL OR org_id > ?2)"
            " ORDER BY org_id LIMIT ?3",
            (rollout_id, after, -1 if limit is None else limit),
        ) as cursor:
            return [
                Inclusion(
                    row["org_id"],
                    row["stage"],
                    parse_iso(row["included_at"]),
                    row["previous_build_id"],
                )
                for row in await cursor.fetchall()
            ]

    async def rollout_approvals(self, rollout_id: str) -> list[Approval]:
        async with self._r.execute(
            "SELECT * FROM rollout_approvals WHERE rollout_id = ? ORDER BY org_id", (rollout_id,)
        ) as cursor:
            return [
                Approval(
                    row["org_id"],
                    row["decision"],
                    row["decided_by"],
                    parse_iso(row["decided_at"]),
                    _dt(row["voided_at"]),
                )
                for row in await cursor.fetchall()
            ]

    async def rollout_history(
        self, rollout_id: str, *, after_id: int | None, limit: int
    ) -> list[HistoryEntry]:
        async with self._r.execute(
            "SELECT * FROM rollout_history WHERE rollout_id = ? AND id > ? ORDER BY id LIMIT ?",
            (rollout_id, after_id or 0, limit),
        ) as cursor:
            return [
                HistoryEntry(
                    parse_iso(row["at"]),
                    row["actor"],
                    row["action"],
                    row["from_state"],
                    row["to_state"],
                    row["stage"],
                    row["percentage"],
                    row["reason"],
                    json.loads(row["details"]),
                    row["id"],
                )
                for row in await cursor.fetchall()
            ]

    async def stage_sessions(
        self, rollout_id: str, stage: int | None = None
    ) -> list[StageSessions]:
        """Sessions counted while the rollout was at a stage (every stage without one),
        per org and build, over all hours."""
        async with self._r.execute(
            "SELECT stage, org_id, build_id, sum(started), sum(failed), sum(disconnected)"
            " FROM session_counts WHERE rollout_id = ?1 AND (?2 IS NULL OR stage = ?2)"
            " GROUP BY stage, org_id, build_id",
            (rollout_id, stage),
        ) as cursor:
            return [StageSessions(*row) for row in await cursor.fetchall()]

    async def settled_orgs(self) -> dict[str, Settled]:
        """For each org some finished rollout included, where the newest such rollout left
        it; a rolled-back one still restores its previous build until its channel's
        recommendation is set again."""
        # Only rollouts that can still decide a build: rolled back ones whose restore
        # stands, and completed ones for enterprise orgs (others follow the channel).
        async with self._r.execute(
            "SELECT o.org_id, r.rollout_id, r.state, r.target_build_id, o.previous_build_id,"
            " r.channel FROM rollout_orgs o JOIN active_rollouts r ON r.rollout_id = o.rollout_id"
            " WHERE (r.state = 'rolled_back' AND r.restore_ended = 0)"
            " OR (r.state = 'completed'"
            "   AND o.org_id IN (SELECT org_id FROM orgs WHERE approval_required = 1))"
            " ORDER BY o.org_id, o.included_at DESC, r.rowid DESC"
        ) as cursor:
            settled: dict[str, Settled] = {}
            async for row in cursor:
                if row[0] not in settled:
                    settled[row[0]] = Settled(
                        row[1],
                        row[2],
                        row[3],
                        row[4],
                        restores=row[2] == "rolled_back",
                        channel=row[5],
                    )
        return settled

    async def get_freeze(self) -> Freeze | None:
        async with self._r.execute("SELECT * FROM freeze WHERE id = 1") as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        return Freeze(row["reason"], row["frozen_by"], parse_iso(row["frozen_at"]))

    async def set_freeze(
        self, freeze: Freeze | None, at: datetime, *, by: str, keep_events: int
    ) -> list[EventRecord]:
        """Freeze (or, with None, unfreeze) every rollout; an event when that changes."""
        async with self._transaction() as db:
            if freeze is None:
                cursor = await db.execute("DELETE FROM freeze WHERE id = 1")
                if not cursor.rowcount:
                    return []
                return [await _insert_event(db, "pipeline_unfrozen", {"by": by}, at, keep_events)]
            cursor = await db.execute(
                "INSERT INTO freeze (id, reason, frozen_by, frozen_at) VALUES (1, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                (freeze.reason, freeze.frozen_by, isoformat(freeze.frozen_at)),
            )
            if not cursor.rowcount:
                return []
            return [
                await _insert_event(
                    db, "pipeline_frozen", {"by": by, "reason": freeze.reason}, at, keep_events
                )
            ]

    async def metric_counts(self) -> dict[str, dict[str, int]]:
        """Rows per state (status) of the tables the metrics endpoint reports."""
        counts: dict[str, dict[str, int]] = {}
        for table, column in _METRIC_TABLES:
            async with self._r.execute(
                f"SELECT {column}, count(*) FROM {table} GROUP BY 1"  # noqa: S608
            ) as cursor:
                counts[table] = {str(row[0]): int(row[1]) for row in await cursor.fetchall()}
        return counts

    async def status_counts(self, providers: Sequence[str]) -> StatusCounts:
        # One read transaction, so the counts describe a single moment.
        async with self._snapshot_lock:
            return await self._status_snapshot(self._s, providers)

    async def _status_snapshot(
        self, db: aiosqlite.Connection, providers: Sequence[str]
    ) -> StatusCounts:
        await db.execute("BEGIN")
        try:
            rollouts = await _count(db, "active_rollouts", ACTIVE_ROLLOUT_STATES)
            canaries = await _count(db, "canary_runs", ACTIVE_CANARY_STATES)
            sweeps = await _count(db, "sweeps", ACTIVE_SWEEP_STATES)
            versions: dict[str, list[str]] = {p: [] for p in providers}
            marks = ", ".join("?" * len(providers))
            async with db.execute(
                f"SELECT provider_id, version FROM runtime_versions"  # noqa: S608
                f" WHERE provider_id IN ({marks}) AND announced_at IS NOT NULL"
                " AND prerelease = 0",
                tuple(providers),
            ) as cursor:
                for row in await cursor.fetchall():
                    versions[row["provider_id"]].append(row["version"])
            async with db.execute("SELECT channel, build_id FROM recommended_builds") as cursor:
                recommended = {row["channel"]: row["build_id"] for row in await cursor.fetchall()}
            async with db.execute("SELECT * FROM freeze WHERE id = 1") as cursor:
                found = await cursor.fetchone()
            frozen = (
                Freeze(found["reason"], found["frozen_by"], parse_iso(found["frozen_at"]))
                if found
                else None
            )
        finally:
            await db.execute("COMMIT")
        return StatusCounts(canaries, rollouts, sweeps, versions, recommended, frozen)

    # -- Sweeps ----------------------------------------------------------------------------

    async def save_sweep_repo(self, repo: SweepRepo) -> None:
        """Record what a repository's sweep config says; its exclusion and last result stay."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO sweep_repos (repo, installation_id, state, config, error, read_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (repo) DO UPDATE SET"
                " installation_id = excluded.installation_id, state = excluded.state,"
                " config = excluded.config, error = excluded.error, read_at = excluded.read_at",
                (
                    repo.repo.lower(),
                    repo.installation_id,
                    repo.state,
                    json.dumps(dict(repo.config)) if repo.config is not None else None,
                    repo.error,
                    _iso_or_none(repo.read_at),
                ),
            )

    async def get_sweep_repo(self, repo: str) -> SweepRepo | None:
        async with self._r.execute(
            "SELECT * FROM sweep_repos WHERE repo = ?", (repo.lower(),)
        ) as cursor:
            row = await cursor.fetchone()
        return _sweep_repo(row) if row else None

    async def list_sweep_repos(
        self, *, opted_in: bool, before: str | None, limit: int
    ) -> list[SweepRepo]:
        """By name; ``opted_in``: only those whose config opts in or is misconfigured (a
        repository trying to opt in), with the ones still covered by an installation."""
        async with self._r.execute(
            "SELECT s.* FROM sweep_repos s WHERE (?1 = 0 OR s.state IN"
            " ('opted_in', 'misconfigured')) AND (?2 IS NULL OR s.repo > ?2)"
            " AND EXISTS (SELECT 1 FROM installation_repositories r"
            "   WHERE lower(r.full_name) = s.repo)"
            " ORDER BY s.repo LIMIT ?3",
            (int(opted_in), before.lower() if before else None, limit),
        ) as cursor:
            return [_sweep_repo(row) for row in await cursor.fetchall()]

    async def set_sweep_exclusion(
        self, repo: str, at: datetime | None, by: str | None
    ) -> SweepRepo | None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE sweep_repos SET excluded_at = ?, excluded_by = ? WHERE repo = ?",
                (_iso_or_none(at), by, repo.lower()),
            )
        return await self.get_sweep_repo(repo)

    async def unread_sweep_repos(self, *, limit: int) -> list[tuple[str, int]]:
        """Installed repositories whose sweep config has not been read: (name, installation)."""
        async with self._r.execute(
            "SELECT r.full_name, r.installation_id FROM installation_repositories r"
            " JOIN installations i ON i.id = r.installation_id AND i.suspended = 0"
            " LEFT JOIN sweep_repos s ON s.repo = lower(r.full_name)"
            " WHERE s.repo IS NULL OR s.state = 'unread' ORDER BY r.full_name LIMIT ?",
            (limit,),
        ) as cursor:
            return [(row[0], row[1]) for row in await cursor.fetchall()]

    async def add_sweep(
        self, sweep: Sweep, runs: Sequence[SweepRun], at: datetime, *, keep_events: int
    ) -> list[EventRecord]:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO sweeps (id, state, created_at, provider, version, build_id,"
                " rollout_id, started_by, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sweep.sweep_id,
                    sweep.state,
                    isoformat(sweep.created_at),
                    sweep.provider,
                    sweep.version,
                    sweep.build_id,
                    sweep.rollout_id,
                    sweep.started_by,
                    isoformat(at),
                ),
            )
            await db.executemany(
                "INSERT INTO sweep_runs (sweep_id, repo, installation_id, workflow, ref, inputs,"
                " state, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run.sweep_id,
                        run.repo.lower(),
                        run.installation_id,
                        run.workflow,
                        run.ref,
                        json.dumps(dict(run.inputs), sort_keys=True),
                        run.state,
                        isoformat(at),
                    )
                    for run in runs
                ],
            )
            event = await _insert_event(
                db,
                "sweep_started",
                {
                    "sweepId": sweep.sweep_id,
                    "provider": sweep.provider,
                    "version": sweep.version,
                    "buildId": sweep.build_id,
                    "rolloutId": sweep.rollout_id,
                    "repositories": len(runs),
                    "by": sweep.started_by,
                },
                at,
                keep_events,
            )
        return [event]

    async def get_sweep(self, sweep_id: str) -> Sweep | None:
        async with self._r.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)) as cursor:
            row = await cursor.fetchone()
        return _sweep(row) if row else None

    async def list_sweeps(
        self, *, state: str | None, before: str | None, limit: int
    ) -> list[Sweep]:
        """Newest first; ``before`` is the sweep id ending the previous page."""
        async with self._r.execute(
            "SELECT * FROM sweeps WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR"
            " (created_at, id) < (SELECT created_at, id FROM sweeps WHERE id = ?2))"
            " ORDER BY created_at DESC, id DESC LIMIT ?3",
            (state, before, limit),
        ) as cursor:
            return [_sweep(row) for row in await cursor.fetchall()]

    async def live_sweeps(self) -> list[Sweep]:
        async with self._r.execute(
            "SELECT * FROM sweeps WHERE state IN ('pending', 'running') ORDER BY created_at, id"
        ) as cursor:
            return [_sweep(row) for row in await cursor.fetchall()]

    async def rollout_sweeps(self, rollout_id: str) -> list[Sweep]:
        """A rollout's sweeps, newest first."""
        async with self._r.execute(
            "SELECT * FROM sweeps WHERE rollout_id = ? ORDER BY created_at DESC, id DESC",
            (rollout_id,),
        ) as cursor:
            return [_sweep(row) for row in await cursor.fetchall()]

    async def sweep_runs(self, sweep_id: str) -> list[SweepRun]:
        async with self._r.execute(
            "SELECT * FROM sweep_runs WHERE sweep_id = ? ORDER BY repo", (sweep_id,)
        ) as cursor:
            return [_sweep_run(row) for row in await cursor.fetchall()]

    async def sweep_run_by_run_id(self, run_id: int) -> SweepRun | None:
        async with self._r.execute(
            "SELECT * FROM sweep_runs WHERE run_id = ? ORDER BY updated_at DESC LIMIT 1",
            (run_id,),
        ) as cursor:
            row = await cursor.fetchone()
        return _sweep_run(row) if row else None

    async def unmatched_sweep_runs(self, repo: str) -> list[SweepRun]:
        """A repository's dispatched runs whose workflow run is not known yet."""
        async with self._r.execute(
            "SELECT * FROM sweep_runs WHERE repo = ? AND run_id IS NULL"
            " AND state IN ('dispatching', 'queued') ORDER BY dispatched_at",
            (repo.lower(),),
        ) as cursor:
            return [_sweep_run(row) for row in await cursor.fetchall()]

    async def sweep_runs_in_flight(self) -> int:
        return int(
            await _scalar(
                self._r,
                "SELECT count(*) FROM sweep_runs WHERE state IN"
                " ('dispatching', 'queued', 'in_progress')",
            )
        )

    async def update_sweep_run(
        self,
        sweep_id: str,
        repo: str,
        changes: Mapping[str, Any],
        *,
        states: Sequence[str] = (),
        effects: Sequence[NewEffect] = (),
        at: datetime,
    ) -> bool:
        """Change a run's row, only while it is in one of ``states`` (any when empty),
        with the outbox entries that follow; whether it changed."""
        unknown = set(changes) - _SWEEP_RUN_COLUMNS
        if unknown:
            raise ValueError(f"not sweep_runs columns: {sorted(unknown)}")
        values = [_sweep_value(v) for v in changes.values()]
        assignments = ", ".join(f"{column} = ?" for column in changes)
        marks = ", ".join("?" * len(states))
        condition = f" AND state IN ({marks})" if states else ""
        async with self._transaction() as db:
            cursor = await db.execute(
                f"UPDATE sweep_runs SET {assignments}, updated_at = ?"  # noqa: S608
                f" WHERE sweep_id = ? AND repo = ?{condition}",
                (*values, isoformat(at), sweep_id, repo.lower(), *states),
            )
            if cursor.rowcount != 1:
                return False
            await _insert_effects(db, effects, at)
        return True

    async def finish_sweep(
        self,
        sweep_id: str,
        state: str,
        at: datetime,
        *,
        keep_events: int,
        data: Mapping[str, Any],
        effects: Sequence[NewEffect] = (),
    ) -> list[EventRecord]:
        """End a sweep (once): its state, each repository's last result, the event."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE sweeps SET state = ?, completed_at = ?, updated_at = ?"
                " WHERE id = ? AND state IN ('pending', 'running')",
                (state, isoformat(at), isoformat(at), sweep_id),
            )
            if cursor.rowcount != 1:
                return []
            await db.execute(
                "UPDATE sweep_repos SET last_sweep_id = ?1, last_conclusion = (SELECT"
                " coalesce(r.conclusion, r.state) FROM sweep_runs r WHERE r.sweep_id = ?1"
                " AND r.repo = sweep_repos.repo) WHERE repo IN"
                " (SELECT repo FROM sweep_runs WHERE sweep_id = ?1)",
                (sweep_id,),
            )
            await _insert_effects(db, effects, at)
            event = await _insert_event(db, "sweep_completed", data, at, keep_events)
        return [event]

    async def next_sweep_deadline(self) -> datetime | None:
        value = await _scalar(
            self._r,
            "SELECT min(deadline_at) FROM sweep_runs WHERE state IN"
            " ('dispatching', 'queued', 'in_progress')",
        )
        return parse_iso(value) if value else None

    # -- GitHub App installations ---------------------------------------------------------

    async def replace_installations(
        self, installations: Sequence[Installation], at: datetime
    ) -> None:
        """Make the table exactly this list (a reconcile with GitHub), in one transaction."""
        async with self._transaction() as db:
            keep = [i.id for i in installations]
            marks = ", ".join("?" * len(keep))
            await db.execute(
                f"DELETE FROM installations WHERE id NOT IN ({marks})",  # noqa: S608
                keep,
            )
            for installation in installations:
                await _save_installation(db, installation, at)
                await db.execute(
                    "DELETE FROM installation_repositories WHERE installation_id = ?",
                    (installation.id,),
                )
                await _insert_repositories(db, installation.id, installation.repositories)

    async def save_installation(self, installation: Installation, at: datetime) -> None:
        async with self._transaction() as db:
            await _save_installation(db, installation, at)
            await _insert_repositories(db, installation.id, installation.repositories)

    async def delete_installation(self, installation_id: int) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM installations WHERE id = ?", (installation_id,))
            return cursor.rowcount == 1

    async def set_installation_suspended(
        self, installation_id: int, suspended: bool, at: datetime
    ) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE installations SET suspended = ?, updated_at = ? WHERE id = ?",
                (int(suspended), isoformat(at), installation_id),
            )
            return cursor.rowcount == 1

    async def add_repositories(
        self, installation_id: int, repositories: Sequence[Repository]
    ) -> None:
        async with self._transaction() as db:
            await _insert_repositories(db, installation_id, repositories)

    async def remove_repositories(self, installation_id: int, repo_ids: Sequence[int]) -> None:
        async with self._transaction() as db:
            await db.executemany(
                "DELETE FROM installation_repositories WHERE installation_id = ? AND repo_id = ?",
                [(installation_id, repo_id) for repo_id in repo_ids],
            )

    async def list_installations(self) -> list[Installation]:
        async with self._r.execute("SELECT * FROM installations ORDER BY id") as cursor:
            rows = await cursor.fetchall()
        async with self._r.execute(
            "SELECT * FROM installation_repositories ORDER BY installation_id, full_name"
        ) as cursor:
            repos: dict[int, list[Repository]] = {}
            for repo in await cursor.fetchall():
                repos.setdefault(repo["installation_id"], []).append(
                    Repository(repo["repo_id"], repo["full_name"])
                )
        return [_installation(row, repos.get(row["id"], [])) for row in rows]

    async def repository_id(self, full_name: str) -> int | None:
        """A repository's id, when an installation of the App covers it."""
        value = await _scalar(
            self._r,
            "SELECT repo_id FROM installation_repositories WHERE full_name = ? COLLATE NOCASE"
            " LIMIT 1",
            (full_name,),
        )
        return int(value) if value is not None else None

    async def installation_for_repository(self, full_name: str) -> Installation | None:
        async with self._r.execute(
            "SELECT i.* FROM installations i JOIN installation_repositories r"
            " ON r.installation_id = i.id WHERE r.full_name = ? COLLATE NOCASE"
            " ORDER BY i.suspended, i.id LIMIT 1",
            (full_name,),
        ) as cursor:
            row = await cursor.fetchone()
        return _installation(row, []) if row else None

    # -- Webhook deliveries --------------------------------------------------------------

    async def add_delivery(self, delivery: Delivery) -> bool:
        """Store a delivery once; False when its id was seen before (a redelivery).

        Returns only once the delivery is committed. Concurrent callers share commits
        (group commit): whatever arrived while the writer was busy is written in its next
        transaction, so the cost of a commit is spread over all the deliveries in it and
        no one waits for a timer."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._delivery_queue.append((delivery, waiter))
        if self._delivery_writer is None or self._delivery_writer.done():
            self._delivery_writer = asyncio.create_task(self._write_deliveries())
        return await waiter

    async def _write_deliveries(self) -> None:
        batch: list[tuple[Delivery, asyncio.Future[bool]]] = []
        try:
            while self._delivery_queue:
                batch = []
                try:
                    async with self._transaction() as db:
                        # Taken with the write lock held: everything queued until the
                        # writer was free goes into this transaction.
                        batch, self._delivery_queue = self._delivery_queue, []
                        stored = await _insert_deliveries(db, [d for d, _ in batch])
                except Exception as exc:
                    if not batch:  # it could not begin (locked): those waiting fail now
                        batch, self._delivery_queue = self._delivery_queue, []
                    _settle(batch, exc)
                    continue
                for (_, waiter), new in zip(batch, stored, strict=True):
                    if not waiter.done():  # its request may have gone away meanwhile
                        waiter.set_result(new)
                batch = []
        except BaseException:
            # Cancelled (the loop is closing): no caller may wait for ever.
            _settle(batch + self._delivery_queue, StoreError("the store is closing"))
            self._delivery_queue = []
            raise

    async def due_deliveries(self, now: datetime, *, limit: int) -> list[Delivery]:
        async with self._r.execute(
            "SELECT * FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ?"
            " ORDER BY received_at, delivery_id LIMIT ?",
            (isoformat(now), limit),
        ) as cursor:
            return [_delivery(row) for row in await cursor.fetchall()]

    async def next_delivery_due(self) -> datetime | None:
        value = await _scalar(
            self._r, "SELECT min(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'"
        )
        return parse_iso(value) if value else None

    async def finish_delivery(
        self, delivery_id: str, at: datetime, effects: Sequence[NewEffect] = ()
    ) -> None:
        """Mark a delivery processed and queue the GitHub side effects its handlers chose,
        together: a crash leaves either both or neither.

        Only a pending delivery is completed. The worker can be handed one it has just
        completed (a read on the shared reader connection that overlaps another one still
        in progress sees that one's snapshot, from before the completion's commit); its
        handlers then ran again, which they tolerate, but their effects are not queued
        twice (they would be a second reply, and so on)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE webhook_deliveries SET status = 'done', attempts = attempts + 1,"
                " finished_at = ?, last_error = NULL WHERE delivery_id = ? AND status = 'pending'",
                (isoformat(at), delivery_id),
            )
            if cursor.rowcount == 0:
                log.warning("delivery %s was completed already; not completed again", delivery_id)
                return
            await _insert_effects(db, effects, at)

    async def fail_delivery(
        self, delivery_id: str, error: str, *, retry_at: datetime | None, at: datetime
    ) -> None:
        """Record a failed attempt: due again at ``retry_at``, or parked when None. A
        delivery no longer pending (completed, as ``finish_delivery`` explains) stays as
        it is."""
        async with self._transaction() as db:
            if retry_at is None:
                await db.execute(
                    "UPDATE webhook_deliveries SET status = 'failed', attempts = attempts + 1,"
                    " last_error = ?, finished_at = ? WHERE delivery_id = ? AND status = 'pending'",
                    (error, isoformat(at), delivery_id),
                )
            else:
                await db.execute(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, last_error = ?,"
                    " next_attempt_at = ? WHERE delivery_id = ? AND status = 'pending'",
                    (error, isoformat(retry_at), delivery_id),
                )

    async def requeue_delivery(self, delivery_id: str, at: datetime) -> Delivery | None:
        async with (
            self._transaction() as db,
            db.execute(
                "UPDATE webhook_deliveries SET status = 'pending', attempts = 0,"
                " next_attempt_at = ?, finished_at = NULL WHERE delivery_id = ?"
                # A processed delivery whose payload was dropped has nothing left to run.
                " AND payload != '{}' RETURNING *",
                (isoformat(at), delivery_id),
            ) as cursor,
        ):
            row = await cursor.fetchone()
        return _delivery(row) if row else None

    async def list_deliveries(
        self, *, status: str | None, before: str | None, limit: int
    ) -> list[Delivery]:
        clauses: list[str] = []
        params: list[object] = []
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        if before is not None:
            clauses.append(
                "(received_at, delivery_id) < (SELECT received_at, delivery_id"
                " FROM webhook_deliveries WHERE delivery_id = ?)"
            )
            params.append(before)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT * FROM webhook_deliveries {where}"  # noqa: S608
            " ORDER BY received_at DESC, delivery_id DESC LIMIT ?"
        )
        async with self._r.execute(sql, (*params, limit)) as cursor:
            return [_delivery(row) for row in await cursor.fetchall()]

    async def delivery_counts(self) -> dict[str, int]:
        """Deliveries per status (done ones included), for diagnostics."""
        async with self._r.execute(
            "SELECT status, count(*) FROM webhook_deliveries GROUP BY status"
        ) as cursor:
            return {row[0]: row[1] for row in await cursor.fetchall()}

    async def stored_delivery_ids(self, delivery_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        ids = list(delivery_ids)
        for start in range(0, len(ids), 500):  # well under SQLite's variable limit
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            async with self._r.execute(
                f"SELECT delivery_id FROM webhook_deliveries WHERE delivery_id IN ({marks})",  # noqa: S608
                chunk,
            ) as cursor:
                found.update(row[0] for row in await cursor.fetchall())
        return found

    async def prune_deliveries(
        self, older_than: datetime, *, payloads_before: datetime | None = None
    ) -> int:
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM webhook_deliveries WHERE status != 'pending' AND received_at < ?",
                (isoformat(older_than),),
            )
            pruned = cursor.rowcount
            if payloads_before is not None:
                # Only the id of a processed delivery matters after that (a copy of it
                # is not processed again); its payload is most of its size.
                await db.execute(
                    "UPDATE webhook_deliveries SET payload = '{}'"
                    " WHERE status = 'done' AND finished_at < ? AND payload != '{}'",
                    (isoformat(payloads_before),),
                )
            await db.execute("DELETE FROM comment_commands WHERE at < ?", (isoformat(older_than),))
            return pruned

    async def claim_comment(self, comment_id: int, delivery_id: str, at: datetime) -> str:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO comment_commands (comment_id, delivery_id, at) VALUES (?, ?, ?)"
                " ON CONFLICT (comment_id) DO NOTHING",
                (comment_id, delivery_id, isoformat(at)),
            )
            async with db.execute(
                "SELECT delivery_id FROM comment_commands WHERE comment_id = ?", (comment_id,)
            ) as cursor:
                row = await cursor.fetchone()
            assert row is not None  # inserted above, or there before
            return str(row[0])

    # -- Outbox ------------------------------------------------------------------------------

    async def add_effects(self, effects: Sequence[NewEffect], at: datetime) -> None:
        async with self._transaction() as db:
            await _insert_effects(db, effects, at)

    async def due_effects(
        self, now: datetime, *, limit: int, skip_installations: Sequence[int] = ()
    ) -> list[Effect]:
        """The first pending entry of each target, when it is due and its installation is
        not suspended: later entries of a target wait for the earlier ones."""
        async with self._r.execute(
            f"SELECT o.* FROM {_HEADS} AND o.next_attempt_at <= ? ORDER BY o.id LIMIT ?",  # noqa: S608
            (json.dumps(list(skip_installations)), isoformat(now), limit),
        ) as cursor:
            return [_effect(row) for row in await cursor.fetchall()]

    async def next_effect_due(self, *, skip_installations: Sequence[int] = ()) -> datetime | None:
        """When the next entry ``due_effects`` would give becomes due: entries behind
        another of their target wait for it, not for a time."""
        value = await _scalar(
            self._r,
            f"SELECT min(o.next_attempt_at) FROM {_HEADS}",  # noqa: S608
            (json.dumps(list(skip_installations)),),
        )
        return parse_iso(value) if value else None

    async def start_effect(self, effect_id: int, at: datetime) -> Effect | None:
        """Count an attempt before it is made, so that after a crash the next attempt
        knows an earlier one may have reached GitHub."""
        async with (
            self._transaction() as db,
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1 WHERE id = ? AND status = 'pending'"
                " RETURNING *",
                (effect_id,),
            ) as cursor,
        ):
            row = await cursor.fetchone()
        return _effect(row) if row else None

    async def finish_effect(
        self, effect: Effect, result: Mapping[str, Any] | None, at: datetime
    ) -> bool:
        """Mark an applied entry done; False (and left pending, due at once) when it was
        replaced by a newer revision while it was being applied."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE outbox SET status = 'done', finished_at = ?, last_error = NULL,"
                " result = ? WHERE id = ? AND revision = ?",
                (isoformat(at), _json_or_none(result), effect.id, effect.revision),
            )
            if cursor.rowcount == 1:
                return True
            await db.execute(
                "UPDATE outbox SET next_attempt_at = ?, result = ? WHERE id = ?",
                (isoformat(at), _json_or_none(result), effect.id),
            )
            return False

    async def fail_effect(
        self, effect_id: int, error: str, *, retry_at: datetime | None, at: datetime
    ) -> None:
        """Record a failed attempt: due again at ``retry_at``, or parked when None."""
        async with self._transaction() as db:
            if retry_at is None:
                await db.execute(
                    "UPDATE outbox SET status = 'failed', last_error = ?, finished_at = ?"
                    " WHERE id = ?",
                    (error, isoformat(at), effect_id),
                )
            else:
                await db.execute(
                    "UPDATE outbox SET last_error = ?, next_attempt_at = ? WHERE id = ?",
                    (error, isoformat(retry_at), effect_id),
                )

    async def effect_result(self, target: str, kind: str) -> Mapping[str, Any] | None:
        """What the newest applied entry of this kind for ``target`` returned (the number
        of an issue the outbox created, say)."""
        value = await _scalar(
            self._r,
            "SELECT result FROM outbox WHERE target = ? AND kind = ? AND status = 'done'"
            " AND result IS NOT NULL ORDER BY id DESC LIMIT 1",
            (target, kind),
        )
        return json.loads(value) if value else None

    async def replaceable_payload(self, replace_keys: Sequence[str]) -> Mapping[str, Any] | None:
        """The payload of the newest entry written under one of these replace keys,
        pending or applied (not parked)."""
        value = await _scalar(
            self._r,
            "SELECT payload FROM outbox WHERE replace_key IN (SELECT value FROM json_each(?))"
            " AND status != 'failed' ORDER BY id DESC LIMIT 1",
            (json.dumps(list(replace_keys)),),
        )
        return json.loads(value) if value else None

    async def effect_exists(self, target: str, kind: str) -> bool:
        """Whether an entry of this kind for ``target`` was ever queued (applied or not)."""
        value = await _scalar(
            self._r, "SELECT 1 FROM outbox WHERE target = ? AND kind = ? LIMIT 1", (target, kind)
        )
        return value is not None

    async def outbox_stats(self) -> OutboxStats:
        async with self._snapshot_lock:
            db = self._s
            await db.execute("BEGIN")
            try:
                async with db.execute(
                    "SELECT status, count(*) FROM outbox WHERE status != 'done' GROUP BY status"
                ) as cursor:
                    counts = {row[0]: row[1] for row in await cursor.fetchall()}
                async with db.execute(
                    "SELECT * FROM outbox WHERE status = 'pending' ORDER BY id LIMIT 1"
                ) as cursor:
                    oldest = await cursor.fetchone()
            finally:
                await db.execute("COMMIT")
        return OutboxStats(
            counts.get("pending", 0), counts.get("failed", 0), _effect(oldest) if oldest else None
        )

    async def list_effects(
        self, *, status: str | None, limit: int, before_id: int | None = None
    ) -> list[Effect]:
        async with self._r.execute(
            "SELECT * FROM outbox WHERE (? IS NULL OR status = ?) AND (? IS NULL OR id < ?)"
            " ORDER BY id DESC LIMIT ?",
            (status, status, before_id, before_id, limit),
        ) as cursor:
            return [_effect(row) for row in await cursor.fetchall()]

    async def retry_effect(self, effect_id: int, at: datetime) -> Effect | None:
        try:
            async with (
                self._transaction() as db,
                db.execute(
                    "UPDATE outbox SET status = 'pending', next_attempt_at = ?,"
                    " finished_at = NULL WHERE id = ? AND status = 'failed' RETURNING *",
                    (isoformat(at), effect_id),
                ) as cursor,
            ):
                row = await cursor.fetchone()
        except sqlite3.IntegrityError:
            # A newer entry with the same replace key is pending: it supersedes this one.
            raise Conflict(
                f"a newer pending entry replaces outbox entry {effect_id}", str(effect_id)
            ) from None
        return _effect(row) if row else None

    async def prune_effects(self, older_than: datetime) -> int:
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM outbox WHERE status = 'done' AND finished_at < ?",
                (isoformat(older_than),),
            )
            return cursor.rowcount


async def _insert_effects(
    db: aiosqlite.Connection, effects: Sequence[NewEffect], at: datetime
) -> None:
    for effect in effects:
        payload = json.dumps(effect.payload, separators=(",", ":"), sort_keys=True)
        if effect.replace_key is not None:
            waiting = await _scalar(
                db,
                "SELECT payload FROM outbox WHERE replace_key = ? AND status = 'pending'",
                (effect.replace_key,),
            )
            if waiting == payload:
                # The same change is already waiting: a new revision would only make an
                # attempt in progress count for nothing (after every restart, say).
                continue
            if waiting is not None:
                await db.execute(
                    "UPDATE outbox SET payload = ?, revision = revision + 1, next_attempt_at = ?"
                    " WHERE replace_key = ? AND status = 'pending'",
                    (payload, isoformat(at), effect.replace_key),
                )
                continue
        await db.execute(
            "INSERT INTO outbox (installation_id, target, kind, payload, replace_key,"
            " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                effect.installation_id,
                effect.target,
                effect.kind,
                payload,
                effect.replace_key,
                isoformat(at),
                isoformat(at),
            ),
        )


# The outbox entries that may be applied next: the first pending entry of each target,
# of an installation neither suspended nor skipped (parameter: a JSON list of ids). A
# tracking issue has two targets, its key's until GitHub has given it a number and that
# number's after (app/github/outbox.py writes them as "repo#key:KEY" and "repo#NUMBER"):
# an entry waits for the earlier entries of the other one too, so that what is said on
# the issue keeps the order it was written in.
_HEADS = (
    "outbox o JOIN (SELECT target, min(id) AS id FROM outbox WHERE status = 'pending'"
    " GROUP BY target) head ON head.id = o.id"
    " WHERE o.installation_id NOT IN (SELECT id FROM installations WHERE suspended = 1)"
    " AND o.installation_id NOT IN (SELECT value FROM json_each(?))"
    " AND NOT EXISTS (SELECT 1 FROM tracking_issues t JOIN outbox e ON e.status = 'pending'"
    " AND e.id < o.id AND e.target IN (t.repo || '#key:' || t.issue_key,"
    " t.repo || '#' || t.issue_number) WHERE t.issue_number IS NOT NULL"
    " AND o.target IN (t.repo || '#key:' || t.issue_key, t.repo || '#' || t.issue_number))"
)


def _effect(row: sqlite3.Row) -> Effect:
    return Effect(
        id=row["id"],
        installation_id=row["installation_id"],
        target=row["target"],
        kind=row["kind"],
        payload=json.loads(row["payload"]),
        replace_key=row["replace_key"],
        revision=row["revision"],
        status=row["status"],
        attempts=row["attempts"],
        next_attempt_at=parse_iso(row["next_attempt_at"]),
        last_error=row["last_error"],
        result=json.loads(row["result"]) if row["result"] else None,
        created_at=parse_iso(row["created_at"]),
        finished_at=_dt(row["finished_at"]),
    )


def _json_or_none(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


async def _insert_build(db: aiosqlite.Connection, build: BuildRecord, at: datetime) -> BuildRecord:
    try:
        async with db.execute(
            "INSERT INTO runner_builds (id, build_id, runner_version, built_at,"
            " runtime_versions, known_good_for, repository, commit_sha, manifest, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
            (
                str(uuid.uuid4()),
                build.build_id,
                build.runner_version,
                isoformat(build.built_at),
                json.dumps(dict(build.runtime_versions), sort_keys=True),
                json.dumps(sorted(build.known_good_for)),
                build.repository,
                build.commit_sha,
                build.manifest,
                isoformat(at),
            ),
        ) as cursor:
            row = await cursor.fetchone()
    except sqlite3.IntegrityError:
        raise Conflict(f"build {build.build_id!r} already exists", build.build_id) from None
    assert row is not None
    return _build(row)


async def _start_run(
    db: aiosqlite.Connection,
    build: BuildRecord,
    attempt: int,
    run: NewCanaryRun,
    at: datetime,
    keep_events: int,
) -> tuple[CanaryRun, EventRecord]:
    run_id = str(uuid.uuid4())
    async with db.execute(
        "INSERT INTO canary_runs (id, build_id, state, attempt, deadline_at, ref, check_key,"
        " dispatch_key, created_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?) RETURNING *",
        (
            run_id,
            build.build_id,
            attempt,
            isoformat(run.deadline_at),
            run.ref,
            run.check_key,
            run.dispatch_key,
            isoformat(at),
        ),
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    event = await _insert_event(
        db,
        "canary_started",
        {
            "buildId": build.build_id,
            "runId": run_id,
            "attempt": attempt,
            "runtimeVersions": dict(build.runtime_versions),
        },
        at,
        keep_events,
    )
    return _canary_run(row), event


async def _build_in(db: aiosqlite.Connection, build_id: str) -> BuildRecord:
    async with db.execute("SELECT * FROM runner_builds WHERE build_id = ?", (build_id,)) as cur:
        row = await cur.fetchone()
    assert row is not None, build_id
    return _build(row)


def _build(row: sqlite3.Row) -> BuildRecord:
    return BuildRecord(
        build_id=row["build_id"],
        runner_version=row["runner_version"],
        built_at=parse_iso(row["built_at"]),
        runtime_versions=json.loads(row["runtime_versions"]),
        known_good_for=json.loads(row["known_good_for"]),
        repository=row["repository"],
        commit_sha=row["commit_sha"],
        created_at=parse_iso(row["created_at"]),
        manifest=row["manifest"],
    )


def _canary_run(row: sqlite3.Row) -> CanaryRun:
    return CanaryRun(
        id=row["id"],
        build_id=row["build_id"],
        attempt=row["attempt"],
        state=row["state"],
        created_at=parse_iso(row["created_at"]),
        started_at=_dt(row["started_at"]),
        completed_at=_dt(row["completed_at"]),
        deadline_at=_dt(row["deadline_at"]),
        metrics=json.loads(row["metrics"]) if row["metrics"] else None,
        error=row["error"],
        workflow_run_id=row["workflow_run_id"],
        reported_by=row["reported_by"],
        ref=row["ref"],
        check_key=row["check_key"],
        dispatch_key=row["dispatch_key"],
    )


async def _insert_event(
    db: aiosqlite.Connection, type: str, data: Mapping[str, Any], at: datetime, keep: int
) -> EventRecord:
    payload = json.dumps(data, separators=(",", ":"), sort_keys=True)
    cursor = await db.execute(
        "INSERT INTO events (type, created_at, data) VALUES (?, ?, ?)",
        (type, isoformat(at), payload),
    )
    event_id = cursor.lastrowid
    assert event_id is not None
    # Ids only grow, so everything at or below (newest - keep) is older than the newest
    # `keep` rows; one indexed range delete, whatever the table's size.
    await db.execute("DELETE FROM events WHERE id <= ?", (event_id - keep,))
    return EventRecord(event_id, type, parse_iso(isoformat(at)), json.loads(payload))


async def _insert_version(
    db: aiosqlite.Connection, version: FoundVersion, at: datetime, *, announced: bool
) -> sqlite3.Row | None:
    async with db.execute(
        "INSERT INTO runtime_versions (id, provider_id, version, released_at, source_url,"
        " source, prerelease, announced_at, baseline, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (provider_id, version) DO NOTHING RETURNING *",
        (
            str(uuid.uuid4()),
            version.provider_id,
            version.version,
            isoformat(version.released_at),
            version.source_url,
            version.source,
            int(version.prerelease),
            isoformat(at) if announced else None,
            int(version.baseline),
            isoformat(at),
        ),
    ) as cursor:
        row: sqlite3.Row | None = await cursor.fetchone()
    return row


def _version(row: sqlite3.Row) -> RuntimeVersionRecord:
    return RuntimeVersionRecord(
        id=row["id"],
        provider_id=row["provider_id"],
        version=row["version"],
        released_at=parse_iso(row["released_at"]),
        source=row["source"],
        source_url=row["source_url"],
        prerelease=bool(row["prerelease"]),
        canary_passed=bool(row["canary_passed"]),
        canary_passed_at=_dt(row["canary_passed_at"]),
        announced_at=_dt(row["announced_at"]),
        handed_to_canary_at=_dt(row["handed_to_canary_at"]),
        baseline=bool(row["baseline"]),
        created_at=parse_iso(row["created_at"]),
    )


def _version_event(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "providerId": row["provider_id"],
        "version": row["version"],
        "releasedAt": row["released_at"],
        "source": row["source"],
        "sourceUrl": row["source_url"],
        "prerelease": bool(row["prerelease"]),
    }


def _hour(moment: datetime) -> str:
    return isoformat(moment.replace(minute=0, second=0, microsecond=0))


async def _upsert_org(db: aiosqlite.Connection, org: Org) -> None:
    await db.execute(
        "INSERT INTO orgs (org_id, channel, pinned_build_id, version_pins, approval_required,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (org_id) DO UPDATE"
        " SET channel = excluded.channel, pinned_build_id = excluded.pinned_build_id,"
        " version_pins = excluded.version_pins,"
        " approval_required = excluded.approval_required, updated_at = excluded.updated_at",
        (
            org.org_id,
            org.channel,
            org.pinned_build_id,
            json.dumps(dict(org.version_pins), sort_keys=True),
            int(org.approval_required),
            isoformat(org.created_at),
            isoformat(org.updated_at),
        ),
    )


async def _insert_heartbeats(db: aiosqlite.Connection, heartbeats: Sequence[Heartbeat]) -> None:
    for heartbeat in heartbeats:
        if heartbeat.new_org is not None:
            await db.execute(
                "INSERT INTO orgs (org_id, channel, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (org_id) DO NOTHING",
                (
                    heartbeat.new_org.org_id,
                    heartbeat.new_org.channel,
                    isoformat(heartbeat.received_at),
                    isoformat(heartbeat.received_at),
                ),
            )
    await db.executemany(
        "INSERT INTO runners (runner_id, org_id, boot_id, build_id, runtimes, started, failed,"
        " disconnected, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (org_id, runner_id) DO UPDATE SET boot_id = excluded.boot_id,"
        " build_id = excluded.build_id,"
        " runtimes = excluded.runtimes, started = excluded.started, failed = excluded.failed,"
        " disconnected = excluded.disconnected, last_seen_at = excluded.last_seen_at",
        [
            (
                h.runner.runner_id,
                h.runner.org_id,
                h.runner.boot_id,
                h.runner.build_id,
                json.dumps(dict(h.runtimes), sort_keys=True),
                h.runner.started,
                h.runner.failed,
                h.runner.disconnected,
                isoformat(h.received_at),
            )
            for h in heartbeats
        ],
    )
    await db.executemany(
        "INSERT INTO session_counts (rollout_id, stage, org_id, build_id, hour, started,"
        " failed, disconnected) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (rollout_id, stage, org_id, build_id, hour) DO UPDATE SET"
        " started = started + excluded.started, failed = failed + excluded.failed,"
        " disconnected = disconnected + excluded.disconnected",
        [
            (
                h.rollout_id,
                h.stage,
                h.runner.org_id,
                h.runner.build_id or "",
                _hour(h.received_at),
                *h.new_sessions,
            )
            for h in heartbeats
            if any(h.new_sessions)
        ],
    )


def _org(row: sqlite3.Row) -> Org:
    return Org(
        org_id=row["org_id"],
        channel=row["channel"],
        pinned_build_id=row["pinned_build_id"],
        version_pins=json.loads(row["version_pins"]),
        approval_required=bool(row["approval_required"]),
        created_at=parse_iso(row["created_at"]),
        updated_at=parse_iso(row["updated_at"]),
    )


def _settle(waiting: Sequence[tuple[Delivery, asyncio.Future[bool]]], exc: Exception) -> None:
    for _, waiter in waiting:
        if not waiter.done():
            waiter.set_exception(exc)


async def _insert_deliveries(
    db: aiosqlite.Connection, deliveries: Sequence[Delivery]
) -> list[bool]:
    """Insert new deliveries; for each, whether it was new (not stored before and not
    earlier in the same list). Two statements whatever the count."""
    ids = [d.delivery_id for d in deliveries]
    async with db.execute(
        "SELECT delivery_id FROM webhook_deliveries"
        " WHERE delivery_id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),),
    ) as cursor:
        seen = {row[0] for row in await cursor.fetchall()}
    new: list[bool] = []
    rows = []
    for delivery in deliveries:
        new.append(delivery.delivery_id not in seen)
        if new[-1]:
            seen.add(delivery.delivery_id)
            rows.append(
                (
                    delivery.delivery_id,
                    delivery.event,
                    delivery.action,
                    delivery.installation_id,
                    delivery.payload,
                    isoformat(delivery.next_attempt_at),
                    isoformat(delivery.received_at),
                )
            )
    await db.executemany(
        "INSERT INTO webhook_deliveries (delivery_id, event, action, installation_id,"
        " payload, status, attempts, next_attempt_at, received_at)"
        " VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
        rows,
    )
    return new


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        delivery_id=row["delivery_id"],
        event=row["event"],
        action=row["action"],
        installation_id=row["installation_id"],
        payload=row["payload"],
        status=row["status"],
        attempts=row["attempts"],
        next_attempt_at=parse_iso(row["next_attempt_at"]),
        last_error=row["last_error"],
        received_at=parse_iso(row["received_at"]),
        finished_at=_dt(row["finished_at"]),
    )


async def _save_installation(
    db: aiosqlite.Connection, installation: Installation, at: datetime
) -> None:
    await db.execute(
        "INSERT INTO installations (id, account_login, account_type, suspended, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
        # Some events carry only the installation's id: keep the account we knew.
        " account_login = coalesce(nullif(excluded.account_login, ''), account_login),"
        " account_type = coalesce(nullif(excluded.account_type, ''), account_type),"
        " suspended = excluded.suspended, updated_at = excluded.updated_at",
        (
            installation.id,
            installation.account_login,
            installation.account_type,
            int(installation.suspended),
            isoformat(at),
        ),
    )


async def _insert_repositories(
    db: aiosqlite.Connection, installation_id: int, repositories: Sequence[Repository]
) -> None:
    await db.executemany(
        "INSERT INTO installation_repositories (installation_id, repo_id, full_name)"
        " VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET full_name = excluded.full_name",
        [(installation_id, r.id, r.full_name) for r in repositories],
    )


def _installation(row: sqlite3.Row, repositories: Sequence[Repository]) -> Installation:
    return Installation(
        row["id"], row["account_login"], row["account_type"], bool(row["suspended"]), repositories
    )


async def _count(db: aiosqlite.Connection, table: str, states: Sequence[str]) -> int:
    marks = ", ".join("?" * len(states))
    sql = f"SELECT count(*) FROM {table} WHERE state IN ({marks})"  # noqa: S608
    return int(await _scalar(db, sql, tuple(states)))


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY (or LOCKED): another connection kept the lock past the busy timeout."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "locked" in str(exc)
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _Rows:
    """A query's rows, all read in the call that ran it: a cursor over them to iterate."""

    def __init__(self, rows: Iterable[sqlite3.Row]) -> None:
        self._rows = list(rows)
        self._next = 0

    async def __aenter__(self) -> _Rows:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def fetchone(self) -> sqlite3.Row | None:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    async def fetchall(self) -> list[sqlite3.Row]:
        rest, self._next = self._rows[self._next :], len(self._rows)
        return rest

    def __aiter__(self) -> _Rows:
        return self

    async def __anext__(self) -> sqlite3.Row:
        row = await self.fetchone()
        if row is None:
            raise StopAsyncIteration
        return row


class _Reader:
    """The shared reader connection, each query run to its end in one call.

    SQLite keeps a connection's read snapshot for as long as any of its statements is
    open. A cursor left open across an await (between a fetchone and the cursor's close,
    say) would let the queries other tasks run meanwhile see that old snapshot, so a write
    just committed could look undone. Reading every row in the call that runs the query
    closes the statement before anything else runs on the connection.
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Pending:
        return _Pending(self._db, sql, params)

    async def close(self) -> None:
        await self._db.close()


class _Pending:
    """``async with reader.execute(...) as cursor``, as with an aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> None:
        self._db, self._sql, self._params = db, sql, params

    async def __aenter__(self) -> _Rows:
        return _Rows(await self._db.execute_fetchall(self._sql, self._params))

    async def __aexit__(self, *exc: object) -> None:
        return None


async def _scalar(db: aiosqlite.Connection | _Reader, sql: str, params: Sequence[Any] = ()) -> Any:
    async with db.execute(sql, params) as cursor:
        row = await cursor.fetchone()
    return row[0] if row else None


async def _current_version(db: aiosqlite.Connection | _Reader) -> int:
    exists = await _scalar(
        db, "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    )
    if not exists:
        return 0
    return int(await _scalar(db, "SELECT coalesce(max(version), 0) FROM schema_version"))


async def _check_and_migrate(db: aiosqlite.Connection, path: Path, *, apply: bool) -> None:
    latest = MIGRATIONS[-1].version
    current = await _current_version(db)
    if current > latest:
        raise StoreError(
            f"database {path} has schema version {current}, newer than this update-pipeline"
            f" supports ({latest}); upgrade update-pipeline or use another database"
        )
    if current == latest or not apply:
        return
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    for migration in MIGRATIONS:
        await _apply(db, migration)


async def _apply(db: aiosqlite.Connection, migration: Migration) -> None:
    # BEGIN IMMEDIATE then re-check: another process may have migrated in the meantime.
    await db.execute("BEGIN IMMEDIATE")
    try:
        if await _current_version(db) >= migration.version:
            await db.execute("ROLLBACK")
            return
        for statement in _statements(migration.sql):
            await db.execute(statement)
        await db.execute(
            "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?,"
            " strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            (migration.version, migration.name),
        )
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")
    log.info("applied migration %d: %s", migration.version, migration.name)


def _statements(script: str) -> list[str]:
    """Split a migration into statements, so all of it runs inside our transaction
    (``executescript`` would commit first)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


def _iso_or_none(moment: datetime | None) -> str | None:
    return isoformat(moment) if moment else None


def _dt(text: str | None) -> datetime | None:
    return parse_iso(text) if text else None


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        id=row["id"],
        name=row["name"],
        role=row["role"],
        token_hash=row["token_hash"],
        org_id=row["org_id"],
        created_at=parse_iso(row["created_at"]),
        expires_at=_dt(row["expires_at"]),
        last_used_at=_dt(row["last_used_at"]),
        revoked_at=_dt(row["revoked_at"]),
    )


def _event(row: sqlite3.Row) -> EventRecord:
    return EventRecord(
        row["id"], row["type"], parse_iso(row["created_at"]), json.loads(row["data"])
    )


async def _set_channel(
    db: aiosqlite.Connection,
    channel: str,
    change: ChannelChange,
    at: datetime,
    keep: int,
    *,
    by_rollout: str | None = None,
) -> EventRecord:
    # A new recommendation ends what earlier rollbacks on the channel restored (the one
    # setting it, rolled back after completion, restores from now on).
    await db.execute(
        "UPDATE active_rollouts SET restore_ended = 1 WHERE channel = ? AND state = 'rolled_back'"
        " AND restore_ended = 0 AND rollout_id IS NOT ?",
        (channel, by_rollout),
    )
    async with db.execute(
        "SELECT build_id FROM recommended_builds WHERE channel = ?", (channel,)
    ) as cursor:
        before = await cursor.fetchone()
    if change.build_id is None:
        await db.execute("DELETE FROM recommended_builds WHERE channel = ?", (channel,))
    else:
        await db.execute(
            "INSERT INTO recommended_builds (channel, build_id, updated_at, reason, set_by)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (channel) DO UPDATE SET"
            " build_id = excluded.build_id, updated_at = excluded.updated_at,"
            " reason = excluded.reason, set_by = excluded.set_by",
            (channel, change.build_id, isoformat(at), change.reason, change.set_by),
        )
    return await _insert_event(
        db,
        "channel_updated",
        {
            "channel": channel,
            "buildId": change.build_id,
            "previousBuildId": before[0] if before else None,
            "reason": change.reason,
            "by": change.set_by,
        },
        at,
        keep,
    )


def _rollout(row: sqlite3.Row) -> Rollout:
    return Rollout(
        rollout_id=row["rollout_id"],
        build_id=row["target_build_id"],
        channel=row["channel"],
        state=row["state"],
        plan=row["plan"],
        stage=row["stage"],
        percentage=float(row["current_percentage"]),
        started_at=parse_iso(row["started_at"]),
        updated_at=parse_iso(row["last_updated_at"]),
        stage_started_at=_dt(row["stage_started_at"]),
        deadline_at=_dt(row["deadline_at"]),
        paused_at=_dt(row["paused_at"]),
        remaining_seconds=row["remaining_seconds"],
        previous_build_id=row["previous_build_id"],
        replaced_build_id=row["replaced_build_id"],
        started_by=row["started_by"],
        forced_reason=row["forced_reason"],
        finished_at=_dt(row["finished_at"]),
        rollback=json.loads(row["rollback"]) if row["rollback"] else None,
        version=row["version"],
    )


def _tracking(row: sqlite3.Row) -> TrackingIssue:
    return TrackingIssue(
        row["rollout_id"],
        row["repo"],
        row["installation_id"],
        row["issue_key"],
        row["issue_number"],
    )


# Tables (and their state column) whose rows per state the metrics endpoint reports;
# constants, never user input.
_METRIC_TABLES = (
    ("active_rollouts", "state"),
    ("canary_runs", "state"),
    ("sweeps", "state"),
    ("sweep_runs", "state"),
    ("webhook_deliveries", "status"),
)

_SWEEP_RUN_COLUMNS = frozenset(
    {
        "state",
        "run_id",
        "run_attempt",
        "run_url",
        "conclusion",
        "error",
        "results",
        "dispatched_at",
        "deadline_at",
        "finished_at",
    }
)


def _sweep_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return isoformat(value)
    if isinstance(value, Mapping):
        return json.dumps(dict(value), sort_keys=True)
    return value


def _sweep_repo(row: sqlite3.Row) -> SweepRepo:
    return SweepRepo(
        row["repo"],
        row["installation_id"],
        row["state"],
        json.loads(row["config"]) if row["config"] else None,
        row["error"],
        _dt(row["read_at"]),
        _dt(row["excluded_at"]),
        row["excluded_by"],
        row["last_sweep_id"],
        row["last_conclusion"],
    )


def _sweep(row: sqlite3.Row) -> Sweep:
    return Sweep(
        row["id"],
        row["state"],
        row["provider"],
        row["version"],
        row["build_id"],
        row["rollout_id"],
        row["started_by"],
        parse_iso(row["created_at"]),
        _dt(row["updated_at"]),
        _dt(row["completed_at"]),
    )


def _sweep_run(row: sqlite3.Row) -> SweepRun:
    return SweepRun(
        sweep_id=row["sweep_id"],
        repo=row["repo"],
        installation_id=row["installation_id"],
        workflow=row["workflow"],
        ref=row["ref"],
        inputs=json.loads(row["inputs"]),
        state=row["state"],
        updated_at=parse_iso(row["updated_at"]),
        run_id=row["run_id"],
        run_attempt=row["run_attempt"],
        run_url=row["run_url"],
        conclusion=row["conclusion"],
        error=row["error"],
        results=json.loads(row["results"]) if row["results"] else None,
        dispatched_at=_dt(row["dispatched_at"]),
        deadline_at=_dt(row["deadline_at"]),
        finished_at=_dt(row["finished_at"]),
    )


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
