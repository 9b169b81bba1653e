"""The SQLite store: migrations, refusal of newer schemas, transactions, the instance lock."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from app.store import (
    BuildRecord,
    Conflict,
    Delivery,
    InstanceLock,
    NewToken,
    SqliteStore,
    StoreError,
)
from app.store import sqlite as sqlite_module
from app.store.migrations import MIGRATIONS, Migration
from tests.conftest import START

DESIGN_TABLES = {"runtime_versions", "runner_builds", "active_rollouts", "api_tokens", "events"}


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _token(name: str, digest: str) -> NewToken:
    return NewToken(name, "viewer", digest, None, START, None)


async def test_migrations_build_the_schema_from_an_empty_file(db_path: Path):
    store = await SqliteStore.open(db_path)
    assert await store.schema_version() == MIGRATIONS[-1].version
    await store.close()
    assert DESIGN_TABLES | {"schema_version"} <= _tables(db_path)
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = {r[1] for r in db.execute("PRAGMA table_info(active_rollouts)")}
    assert columns >= {
        "rollout_id",
        "target_build_id",
        "channel",
        "state",
        "current_percentage",
        "started_at",
        "last_updated_at",
        "affected_org_ids",
        "error",
        "created_at",
    }


async def test_reopening_applies_nothing_twice(db_path: Path):
    for _ in range(3):
        store = await SqliteStore.open(db_path)
        await store.close()
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT version FROM schema_version").fetchall()
    assert rows == [(m.version,) for m in MIGRATIONS]


async def test_a_database_from_a_newer_version_is_refused(db_path: Path):
    store = await SqliteStore.open(db_path)
    await store.close()
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO schema_version VALUES (99, 'from the future', 'x')")
    with pytest.raises(StoreError, match="schema version 99, newer than this update-pipeline"):
        await SqliteStore.open(db_path)


async def test_a_failing_migration_leaves_the_previous_schema_intact(db_path, monkeypatch):
    store = await SqliteStore.open(db_path)
    await store.close()
    broken = Migration(
        MIGRATIONS[-1].version + 1,
        "half broken",
        "CREATE TABLE half_done (id INTEGER);\nINSERT INTO no_such_table VALUES (1);",
    )
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*MIGRATIONS, broken))
    with pytest.raises(StoreError, match="no such table"):
        await SqliteStore.open(db_path)
    assert "half_done" not in _tables(db_path)
    monkeypatch.undo()
    store = await SqliteStore.open(db_path)
    assert await store.schema_version() == MIGRATIONS[-1].version
    await store.close()


async def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are not the pages you are looking for" * 100)
    with pytest.raises(StoreError, match=r"notes\.db"):
        await SqliteStore.open(path)


async def test_foreign_keys_are_enforced(store: SqliteStore):
    from app.store import Rollout, RolloutChange

    rollout = Rollout("r1", "build-missing", "stable", "pending", "100%", 0, 0, START, START)
    with pytest.raises(sqlite3.IntegrityError):
        await store.write_rollout(RolloutChange(rollout, None, []), START, keep_events=10)


async def test_a_batch_of_tokens_is_added_whole_or_not_at_all(store: SqliteStore):
    await store.add_tokens([_token("taken", "h0")])
    with pytest.raises(Conflict) as raised:
        await store.add_tokens(
            [_token("fresh-1", "h1"), _token("taken", "h2"), _token("fresh-3", "h3")]
        )
    assert raised.value.key == "taken"
    assert [t.name for t in await store.list_tokens()] == ["taken"]


async def test_a_revoked_name_can_be_issued_again(store: SqliteStore):
    await store.add_tokens([_token("ci", "h1")])
    assert await store.revoke_token("ci", START) is not None
    assert await store.revoke_token("ci", START) is None
    await store.add_tokens([_token("ci", "h2")])
    names = [(t.name, t.revoked_at is None) for t in await store.list_tokens(include_revoked=True)]
    assert names == [("ci", False), ("ci", True)]


async def test_duplicate_build_ids_conflict(store: SqliteStore):
    build = BuildRecord("build-abc", "1.0.0", START, {"codex": "1.0.0"}, ["codex"])
    await store.add_build(build, START)
    with pytest.raises(Conflict):
        await store.add_build(build, START)


async def test_events_are_pruned_to_the_newest_ones(store: SqliteStore):
    for i in range(30):
        await store.append_event("tick", {"i": i}, START, keep=10)
    events = await store.list_events(limit=100)
    assert [e.data["i"] for e in events] == list(range(29, 19, -1))


# -- One instance per database ---------------------------------------------------------


def test_a_second_instance_on_the_same_database_is_refused(db_path: Path):
    first, second = InstanceLock(db_path), InstanceLock(db_path)
    first.acquire()
    try:
        with pytest.raises(
            StoreError, match=rf"in use by another update-pipeline process \(pid {os.getpid()}\)"
        ):
            second.acquire()
    finally:
        first.release()
    second.acquire()  # free again once the first lets go
    second.release()


def test_the_lock_dies_with_a_crashed_holder(db_path: Path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from app.store import InstanceLock
                InstanceLock(Path({str(db_path)!r})).acquire()
                print("locked", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=f"pid {holder.pid}"):
            InstanceLock(db_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        lock = InstanceLock(db_path)
        lock.acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout:
            holder.stdout.close()


def test_a_database_in_a_missing_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(StoreError, match=r"cannot create lock file .*No such file or directory"):
        InstanceLock(tmp_path / "missing" / "x.db").acquire()


async def test_a_transaction_left_open_by_a_cancelled_task_is_rolled_back_first(
    store: SqliteStore,
):
    # What a task cancelled between BEGIN and COMMIT leaves behind: an open transaction
    # with a write in it, and the mark that something was interrupted.
    await store._w.execute("BEGIN IMMEDIATE")
    await store._w.execute(
        "INSERT INTO events (type, created_at, data) VALUES ('half', '2026-01-01', '{}')"
    )
    store._interrupted = True

    await store.add_tokens([_token("after", "h1")])

    assert [t.name for t in await store.list_tokens()] == ["after"]
    assert [e.type for e in await store.list_events()] == []


async def test_cancelling_writers_never_wedges_the_store(store: SqliteStore):
    import asyncio

    for i in range(40):
        task = asyncio.create_task(store.append_event("tick", {"i": i}, START, keep=100))
        await asyncio.sleep(0)
        if i % 2:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await store.append_event("last", {}, START, keep=100)
    assert (await store.list_events(limit=1))[0].type == "last"


async def test_consistent_snapshots_never_make_other_reads_stale(store: SqliteStore):
    # A multi-statement snapshot (the /status counts, the outbox figures) holds a read
    # transaction open; no other read may see the database as of that moment, or the
    # webhook worker would find a delivery it has just finished still pending.
    stop = asyncio.Event()

    async def snapshots() -> None:
        while not stop.is_set():
            await store.status_counts(["claude_code"])
            await store.outbox_stats()

    background = asyncio.create_task(snapshots())
    try:
        for n in range(100):
            delivery = Delivery(
                f"d-{n}", "push", None, None, "{}", "pending", 0, START, None, START, None
            )
            assert await store.add_delivery(delivery)
            await store.finish_delivery(delivery.delivery_id, START)
            assert await store.due_deliveries(START, limit=10) == []
    finally:
        stop.set()
        await background


async def test_concurrent_deliveries_share_commits_and_each_learns_if_it_was_new(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
):
    transactions = 0
    original = store._transaction

    def counted():  # type: ignore[no-untyped-def]
        nonlocal transactions
        transactions += 1
        return original()

    monkeypatch.setattr(store, "_transaction", counted)

    def delivery(n: int) -> Delivery:
        return Delivery(f"g-{n}", "push", None, None, "{}", "pending", 0, START, None, START, None)

    assert await store.add_delivery(delivery(0))  # stored before the burst
    ids = [n % 150 for n in range(200)]  # 50 repeats inside the burst, one of g-0
    answers = await asyncio.gather(*(store.add_delivery(delivery(n)) for n in ids))

    assert sum(answers) == 149  # g-1 .. g-149, each exactly once
    assert [n for n, new in zip(ids, answers, strict=True) if new] == list(range(1, 150))
    assert transactions < 10  # one commit for many deliveries, not one each
    assert len(await store.due_deliveries(START, limit=500)) == 150


def test_stored_times_are_fixed_width_in_every_year_and_out_of_range_ones_refused() -> None:
    from datetime import UTC, datetime

    from app.clock import isoformat, parse_iso

    early = datetime(80, 9, 13, 1, 2, 3, 4000, tzinfo=UTC)
    assert isoformat(early) == "0080-09-13T01:02:03.004Z"
    assert parse_iso(isoformat(early)) == early
    assert isoformat(early) < isoformat(datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="outside the years"):
        parse_iso("9999-12-31T23:00:00-05:00")


async def test_a_comment_is_claimed_by_its_first_delivery_until_pruned(store: SqliteStore):
    assert await store.claim_comment(7, "first", START) == "first"
    # The same delivery again (processed after a crash) finds itself; a copy does not.
    assert await store.claim_comment(7, "first", START) == "first"
    assert await store.claim_comment(7, "copy", START + timedelta(minutes=1)) == "first"
    assert await store.claim_comment(8, "copy", START) == "copy"

    # Kept as long as deliveries are: after that, GitHub's signatures are the guard.
    await store.prune_deliveries(START + timedelta(seconds=1))
    assert await store.claim_comment(7, "later", START + timedelta(days=1)) == "later"


async def test_processed_deliveries_lose_their_payload_first_and_their_id_later(
    store: SqliteStore,
):
    def delivery(name: str) -> Delivery:
        body = '{"action": "created", "big": "' + "x" * 1000 + '"}'
        return Delivery(
            name, "issue_comment", "created", 1, body, "pending", 0, START, None, START, None
        )

    for name in ("done", "failed", "pending"):
        assert await store.add_delivery(delivery(name))
    await store.finish_delivery("done", START)
    await store.fail_delivery("failed", "boom", retry_at=None, at=START)

    later = START + timedelta(days=2)
    assert await store.prune_deliveries(START - timedelta(days=30), payloads_before=later) == 0
    payloads = {
        d.delivery_id: d.payload
        for d in await store.list_deliveries(status=None, before=None, limit=10)
    }
    # The processed one keeps its id (a copy is still recognised), not its body; a failed
    # one keeps its body for a retry, and a pending one has yet to be processed.
    assert payloads["done"] == "{}"
    assert len(payloads["failed"]) > 1000 and len(payloads["pending"]) > 1000
    assert not await store.add_delivery(delivery("done"))
    # Nothing is left to run again; the failed one still can be.
    assert await store.requeue_delivery("done", later) is None
    assert await store.requeue_delivery("failed", later) is not None
    await store.fail_delivery("failed", "boom", retry_at=None, at=START)

    assert await store.prune_deliveries(later) == 2  # done and failed, by age
