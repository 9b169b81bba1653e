"""The orchestrator's lifecycle: components, owned background tasks, idempotent start/stop."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from app.clock import ManualClock
from app.config import Settings
from app.pipeline import UpdatePipeline
from app.pipeline.events import EventBus
from app.pipeline.periodic import Periodic
from app.store import SqliteStore, StoreBusy, StoreError


class Recorder:
    def __init__(self, name: str, journal: list[str], *, fail: bool = False) -> None:
        self.name = name
        self.journal = journal
        self.fail = fail
        self.task: asyncio.Task[None] | None = None

    async def start(self, pipeline: UpdatePipeline) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        self.journal.append(f"start {self.name}")
        self.task = pipeline.spawn(self.name, asyncio.sleep(3600))

    async def stop(self) -> None:
        self.journal.append(f"stop {self.name}")


@pytest.fixture
def make_pipeline(settings: Settings, store: SqliteStore, clock: ManualClock):
    def make(*components: Recorder) -> UpdatePipeline:
        return UpdatePipeline(settings, store, EventBus(store, clock), clock, components)

    return make


async def test_components_start_in_order_and_stop_in_reverse(make_pipeline):
    journal: list[str] = []
    pipeline = make_pipeline(Recorder("a", journal), Recorder("b", journal))
    await pipeline.start()
    await pipeline.stop()
    assert journal == ["start a", "start b", "stop b", "stop a"]


async def test_start_and_stop_are_idempotent(make_pipeline, store):
    journal: list[str] = []
    pipeline = make_pipeline(Recorder("a", journal))
    await pipeline.start()
    await pipeline.start()
    assert pipeline.running
    await pipeline.stop()
    await pipeline.stop()
    assert not pipeline.running
    assert journal == ["start a", "stop a"]
    types = [e.type for e in await store.list_events()]
    assert types == ["pipeline_stopped", "pipeline_started"]


async def test_stop_cancels_every_background_task(make_pipeline):
    journal: list[str] = []
    first, second = Recorder("a", journal), Recorder("b", journal)
    pipeline = make_pipeline(first, second)
    await pipeline.start()
    assert first.task is not None and second.task is not None
    await pipeline.stop()
    assert first.task.cancelled() and second.task.cancelled()
    assert pipeline.health() == "pipeline is not running"


async def test_a_component_that_fails_to_start_undoes_the_ones_before_it(make_pipeline):
    journal: list[str] = []
    good = Recorder("good", journal)
    pipeline = make_pipeline(good, Recorder("bad", journal, fail=True))
    with pytest.raises(RuntimeError, match="bad cannot start"):
        await pipeline.start()
    assert not pipeline.running
    assert journal == ["start good", "stop good"]
    assert good.task is not None and good.task.cancelled()


async def test_a_background_task_that_ends_marks_the_pipeline_unhealthy(make_pipeline):
    pipeline = make_pipeline()
    await pipeline.start()
    assert pipeline.health() is None

    async def quits() -> None:
        return None

    await pipeline.spawn("quitter", quits())
    assert pipeline.health() == "quitter: stopped unexpectedly"
    await pipeline.stop()


async def test_two_tasks_cannot_share_a_name(make_pipeline):
    pipeline = make_pipeline()
    await pipeline.start()
    pipeline.spawn("loop", asyncio.sleep(3600))
    with pytest.raises(ValueError, match="already running"):
        pipeline.spawn("loop", asyncio.sleep(3600))
    await pipeline.stop()


async def test_a_periodic_task_meeting_a_locked_database_tries_again_within_seconds() -> None:
    calls = 0
    done = asyncio.Event()

    async def work() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreBusy("database is locked")
        done.set()

    # An interval of a day: only the busy retry can bring the second call this soon.
    periodic = Periodic("retention", work, timedelta(days=1), survives=(StoreError,))
    task = asyncio.create_task(periodic._loop())
    try:
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        task.cancel()
    assert calls == 2
