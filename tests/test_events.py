"""The event log: the bus, pruning to the newest 10,000, the paged list and the live stream.

Streams are read from the real test server; every wait is on a condition with a bound, so
a broken stream fails a test quickly instead of hanging it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.api.routing import PREFIX
from app.clock import ManualClock
from app.pipeline.events import KEEP_EVENTS, EventBus, event_type, sse_name
from app.store import EventRecord, SqliteStore
from tests.conftest import Api

STREAM = PREFIX + "/events/stream"
WAIT = 5.0  # upper bound for anything that should happen "promptly"

# Design section 3.2, copied rather than imported so a wrong mapping in the app fails here.
DESIGN_SSE_NAMES = [
    ("new_version_detected", "update_version_detected"),
    ("canary_started", "update_canary_started"),
    ("canary_completed", "update_canary_completed"),
    ("rollout_initiated", "update_rollout_started"),
    ("rollout_completed", "update_rollout_completed"),
    ("rollback_initiated", "update_rollback"),
]


# -- helpers -------------------------------------------------------------------------------


async def eventually(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Frame:
    fields: dict[str, str] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Received:
    id: int
    event: str
    data: dict[str, Any]


class SseReader:
    """A minimal Server-Sent Events parser over a live aiohttp response."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self._buffer = b""
        self.comments: list[str] = []
        self.hung_up = False  # the server cut the connection instead of ending the stream

    async def frame(self, timeout: float = WAIT) -> Frame | None:
        """The next blank-line-terminated block, or None when the server ended the stream
        (an incomplete block at the end is discarded, as EventSource does)."""
        async with asyncio.timeout(timeout):
            while b"\n\n" not in self._buffer:
                try:
                    chunk = await self.response.content.readany()
                except aiohttp.ClientPayloadError:
                    self.hung_up = True
                    return None
                if not chunk:
                    return None
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\n\n", 1)
        frame = Frame()
        for line in raw.decode().split("\n"):
            if line.startswith(":"):
                frame.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in frame.fields:
                value = frame.fields["data"] + "\n" + value
            frame.fields[name] = value
        self.comments.extend(frame.comments)
        return frame

    async def event(self, timeout: float = WAIT) -> Received:
        """The next frame that carries an event (skipping retry and keepalive frames)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frame(timeout=timeout)
                assert frame is not None, "the stream ended while an event was expected"
                if "data" in frame.fields:
                    return Received(
                        int(frame.fields["id"]),
                        frame.fields["event"],
                        json.loads(frame.fields["data"]),
                    )

    async def events(self, count: int, timeout: float = WAIT) -> list[Received]:
        return [await self.event(timeout) for _ in range(count)]

    async def end(self, timeout: float = WAIT) -> list[Frame]:
        """Read until the server closes the stream; returns what came before the end."""
        frames = []
        while (frame := await self.frame(timeout)) is not None:
            frames.append(frame)
        return frames


@asynccontextmanager
async def stream(
    api: Api,
    token: str,
    *,
    last_event_id: str | None = None,
    query: dict[str, str] | None = None,
) -> AsyncIterator[SseReader]:
    headers = {"Authorization": f"Bearer {token}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    response = await api.client.get(STREAM, headers=headers, params=query)
    try:
        assert response.status == 200, await response.text()
        yield SseReader(response)
    finally:
        response.close()


def ids(events: list[Received] | list[EventRecord]) -> list[int]:
    return [e.id for e in events]


def ids_of(body: dict[str, Any]) -> list[int]:
    return [item["id"] for item in body["items"]]


def insert_rows(db_path: Path, count: int, type: str = "bulk") -> None:
    """Fill the log directly, for the sizes where a publish per row would be too slow."""
    with closing(sqlite3.connect(db_path, timeout=5)) as db, db:
        db.executemany(
            "INSERT INTO events (type, created_at, data) VALUES (?, ?, ?)",
            ((type, "2026-03-01T11:00:00.000Z", json.dumps({"n": n})) for n in range(count)),
        )


async def newest_id(api: Api) -> int:
    (newest,) = await api.services.store.list_events(limit=1)
    return newest.id


# -- the bus -------------------------------------------------------------------------------


async def test_publish_persists_the_event_and_returns_its_record(
    store: SqliteStore, clock: ManualClock, db_path: Path
):
    bus = EventBus(store, clock)
    first = await bus.publish("rollout_initiated", {"rolloutId": "r-1", "percentage": 10})
    clock.advance(timedelta(seconds=3))
    second = await bus.publish("rollout_completed")

    assert first.type == "rollout_initiated"
    assert first.data == {"rolloutId": "r-1", "percentage": 10}
    assert first.created_at == clock.now() - timedelta(seconds=3)
    assert second.data == {}
    assert second.created_at == clock.now()
    assert second.id > first.id
    assert await store.list_events() == [second, first]

    # Persisted, not just held in memory: another connection to the file sees both.
    reopened = await SqliteStore.open(db_path)
    try:
        assert await reopened.list_events() == [second, first]
    finally:
        await reopened.close()


async def test_publish_with_no_listeners_still_records_the_event(
    store: SqliteStore, clock: ManualClock
):
    bus = EventBus(store, clock)
    assert bus.subscriber_count == 0
    event = await bus.publish("canary_started", {"buildId": "b-7"})
    assert await store.events_after(0) == [event]


async def test_every_subscriber_gets_every_event_in_order(store: SqliteStore, clock: ManualClock):
    bus = EventBus(store, clock)
    one, two = bus.subscribe(), bus.subscribe()
    published = [await bus.publish("canary_started", {"n": n}) for n in range(3)]
    for subscription in (one, two):
        assert [await subscription.next() for _ in range(3)] == published
        assert subscription.queue.empty()


async def test_unsubscribed_listener_gets_nothing_more(store: SqliteStore, clock: ManualClock):
    bus = EventBus(store, clock)
    subscription = bus.subscribe()
    bus.unsubscribe(subscription)
    await bus.publish("canary_started")
    assert bus.subscriber_count == 0
    assert subscription.queue.empty()


async def test_a_full_listener_is_dropped_and_told_so_without_blocking_publish(
    store: SqliteStore, clock: ManualClock
):
    bus = EventBus(store, clock, queue_size=2)
    drops: list[str] = []
    slow = bus.subscribe(on_drop=lambda: drops.append("dropped"))
    keeping_up = bus.subscribe()
    for n in range(5):
        event = await asyncio.wait_for(bus.publish("canary_started", {"n": n}), WAIT)
        assert await keeping_up.next() == event
    assert slow.dropped
    assert not keeping_up.dropped
    assert bus.subscriber_count == 1
    assert drops == ["dropped"]  # told once, at the publish that found its queue full
    # Only the end marker is left: handing over the queued events but not the one that
    # did not fit would leave a gap the listener cannot see when it resumes by id.
    assert slow.queue.qsize() == 1
    assert await slow.next() is None


async def test_close_all_ends_every_subscription_after_what_it_already_holds(
    store: SqliteStore, clock: ManualClock
):
    bus = EventBus(store, clock)
    subscriptions = [bus.subscribe() for _ in range(3)]
    queued = await bus.publish("canary_started")
    bus.close_all()
    assert bus.subscriber_count == 0
    for subscription in subscriptions:
        assert await asyncio.wait_for(subscription.next(), WAIT) == queued
        assert await asyncio.wait_for(subscription.next(), WAIT) is None


@pytest.mark.parametrize(("pipeline_name", "stream_name"), DESIGN_SSE_NAMES)
def test_design_events_use_the_section_3_2_stream_names(pipeline_name: str, stream_name: str):
    assert sse_name(pipeline_name) == stream_name


@pytest.mark.parametrize("name", ["pipeline_started", "sweep_completed", "heartbeat"])
def test_events_the_design_does_not_map_stream_as_update_name(name: str):
    assert sse_name(name) == f"update_{name}"


@pytest.mark.parametrize(("pipeline_name", "stream_name"), DESIGN_SSE_NAMES)
def test_event_type_accepts_both_names_of_a_design_event(pipeline_name: str, stream_name: str):
    assert event_type(pipeline_name) == pipeline_name
    assert event_type(stream_name) == pipeline_name


@pytest.mark.parametrize("name", ["pipeline_started", "sweep_completed"])
def test_event_type_accepts_both_names_of_an_unmapped_event(name: str):
    assert event_type(name) == name
    assert event_type(f"update_{name}") == name


# -- pruning -------------------------------------------------------------------------------


async def test_log_keeps_exactly_the_newest_10000_events(
    store: SqliteStore, clock: ManualClock, db_path: Path
):
    bus = EventBus(store, clock)  # the default limit, as the server builds it
    assert bus.keep == KEEP_EVENTS == 10_000
    insert_rows(db_path, 9_999)

    at_limit = await bus.publish("canary_started")
    assert at_limit.id == 10_000
    kept = await store.list_events(limit=20_000)
    assert len(kept) == 10_000
    assert kept[-1].id == 1  # nothing pruned while the log is not over the limit

    newest = [await bus.publish("canary_completed", {"n": n}) for n in range(3)]
    kept = await store.list_events(limit=20_000)
    assert len(kept) == 10_000
    assert ids(kept) == list(range(10_003, 3, -1))
    assert kept[:3] == newest[::-1]
    assert await store.events_after(0, limit=1) == [kept[-1]]  # ids 1-3 are gone


async def test_pruning_keeps_the_newest_when_a_smaller_limit_is_set(
    store: SqliteStore, clock: ManualClock
):
    bus = EventBus(store, clock, keep=4)
    published = [await bus.publish("canary_started", {"n": n}) for n in range(11)]
    assert await store.list_events() == published[:-5:-1]


async def test_the_server_bus_keeps_10000_events(api: Api):
    assert api.services.bus.keep == 10_000


# -- GET /events ---------------------------------------------------------------------------


async def test_event_list_is_newest_first_in_the_documented_shape(api: Api, clock: ManualClock):
    viewer = await api.token("viewer")
    clock.advance(timedelta(minutes=1))
    await api.services.bus.publish("new_version_detected", {"providerId": "codex", "v": "1.2.0"})
    clock.advance(timedelta(minutes=1))
    await api.services.bus.publish("rollout_initiated", {"rolloutId": "r-1"})

    response, body = await api.get("/events", token=viewer)
    assert response.status == 200
    assert body["nextCursor"] is None
    items = body["items"]
    assert [i["type"] for i in items] == [
        "rollout_initiated",
        "new_version_detected",
        "pipeline_started",  # the fixture starts the pipeline, which says so
    ]
    assert items[0] == {
        "id": items[1]["id"] + 1,
        "type": "rollout_initiated",
        "timestamp": "2026-03-01T12:02:00.000Z",
        "data": {"rolloutId": "r-1"},
    }
    assert items[1]["timestamp"] == "2026-03-01T12:01:00.000Z"
    assert items[1]["data"] == {"providerId": "codex", "v": "1.2.0"}


async def test_admin_can_list_events_and_no_token_cannot(api: Api):
    response, _ = await api.get("/events", token=await api.token("admin"))
    assert response.status == 200
    response, body = await api.get("/events")
    assert response.status == 401
    assert body["error"]["code"] == "UNAUTHORIZED"


@pytest.fixture
async def mixed_log(api: Api) -> dict[str, list[int]]:
    """A log with several types; returns the ids of each type, newest first."""
    by_type: dict[str, list[int]] = {}
    for name in [
        "rollout_initiated",
        "canary_started",
        "rollout_initiated",
        "rollback_initiated",
        "sweep_started",
        "canary_started",
    ]:
        event = await api.services.bus.publish(name, {})
        by_type.setdefault(name, []).insert(0, event.id)
    return by_type


def _merged(by_type: dict[str, list[int]], *names: str) -> list[int]:
    return sorted((i for n in names for i in by_type[n]), reverse=True)


@pytest.mark.parametrize(
    ("query", "expected_types"),
    [
        ([("type", "rollout_initiated")], ["rollout_initiated"]),
        ([("type", "update_rollout_started")], ["rollout_initiated"]),
        ([("type", "update_rollback")], ["rollback_initiated"]),
        ([("type", "update_sweep_started")], ["sweep_started"]),
        (
            [("type", "canary_started"), ("type", "rollback_initiated")],
            ["canary_started", "rollback_initiated"],
        ),
        ([("type", "canary_started,update_rollback")], ["canary_started", "rollback_initiated"]),
        (
            [("type", " rollout_initiated , ,update_canary_started"), ("type", "sweep_started")],
            ["rollout_initiated", "canary_started", "sweep_started"],
        ),
        ([("type", "canary_completed")], []),
    ],
)
async def test_type_filter_returns_only_those_types_newest_first(
    api: Api,
    mixed_log: dict[str, list[int]],
    query: list[tuple[str, str]],
    expected_types: list[str],
):
    response, body = await api.get("/events", token=await api.token("viewer"), params=query)
    assert response.status == 200
    assert ids_of(body) == _merged(mixed_log, *expected_types)
    assert {i["type"] for i in body["items"]} == set(expected_types)
    assert body["nextCursor"] is None


async def test_limit_caps_the_page_and_defaults_to_50(api: Api):
    viewer = await api.token("viewer")
    for n in range(60):
        await api.services.bus.publish("canary_started", {"n": n})
    newest = await newest_id(api)

    _, body = await api.get("/events", token=viewer, params={"limit": "3"})
    assert ids_of(body) == [newest, newest - 1, newest - 2]
    assert body["nextCursor"] is not None

    _, body = await api.get("/events", token=viewer)
    assert ids_of(body) == list(range(newest, newest - 50, -1))

    _, body = await api.get("/events", token=viewer, params={"limit": "500"})
    assert len(body["items"]) == 61  # 60 and the pipeline's start
    assert body["nextCursor"] is None


async def _walk(api: Api, token: str, params: dict[str, str]) -> list[list[int]]:
    pages, cursor = [], None
    for _ in range(100):
        query = dict(params) if cursor is None else {**params, "cursor": cursor}
        response, body = await api.get("/events", token=token, params=query)
        assert response.status == 200
        pages.append(ids_of(body))
        cursor = body["nextCursor"]
        if cursor is None:
            return pages
        assert isinstance(cursor, str)
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize("limit", [1, 5, 7, 24, 25, 500])
async def test_cursor_pagination_walks_every_event_exactly_once(api: Api, limit: int):
    for n in range(23):  # with the pipeline's start: 24 events, so 24 is an exact fit
        await api.services.bus.publish("canary_started", {"n": n})
    everything = ids(await api.services.store.list_events(limit=1000))
    assert len(everything) == 24

    pages = await _walk(api, await api.token("viewer"), {"limit": str(limit)})
    walked = [i for page in pages for i in page]
    assert walked == everything
    assert all(len(page) == limit for page in pages[:-1])
    assert 0 < len(pages[-1]) <= limit
    assert len(pages) == -(-24 // limit)  # no trailing empty page on an exact fit


async def test_pagination_with_a_type_filter_walks_only_that_type(api: Api):
    for n in range(9):
        await api.services.bus.publish("canary_started" if n % 3 else "rollout_initiated", {})
    wanted = ids(await api.services.store.list_events(types=["rollout_initiated"]))
    assert len(wanted) == 3
    pages = await _walk(
        api, await api.token("viewer"), {"limit": "2", "type": "update_rollout_started"}
    )
    assert pages == [wanted[:2], wanted[2:]]


async def test_events_published_during_a_walk_do_not_shift_its_pages(api: Api):
    viewer = await api.token("viewer")
    for n in range(5):
        await api.services.bus.publish("canary_started", {"n": n})
    before = ids(await api.services.store.list_events())

    _, first = await api.get("/events", token=viewer, params={"limit": "3"})
    for n in range(4):
        await api.services.bus.publish("canary_completed", {"n": n})
    _, second = await api.get(
        "/events", token=viewer, params={"limit": "3", "cursor": first["nextCursor"]}
    )
    assert ids_of(first) + ids_of(second) == before
    assert second["nextCursor"] is None


@pytest.mark.parametrize(
    ("query", "code", "named"),
    [
        ([("cursor", "abc")], "INVALID_QUERY", "cursor"),
        ([("cursor", "-5")], "INVALID_QUERY", "cursor"),
        ([("cursor", "1.5")], "INVALID_QUERY", "cursor"),
        ([("cursor", "\u00b2")], "INVALID_QUERY", "cursor"),  # a digit, but not a number
        ([("cursor", "1234567890123456789")], "INVALID_QUERY", "cursor"),
        ([("limit", "0")], "VALIDATION_FAILED", "limit"),
        ([("limit", "501")], "VALIDATION_FAILED", "limit"),
        ([("limit", "-1")], "VALIDATION_FAILED", "limit"),
        ([("limit", "ten")], "VALIDATION_FAILED", "limit"),
        ([("since", "5")], "INVALID_QUERY", "since"),
        ([("type", "canary_started")] * 21, "VALIDATION_FAILED", "type"),
        ([("type", "x" * 201)], "VALIDATION_FAILED", "type"),
    ],
)
async def test_bad_list_query_is_400_naming_the_parameter(
    api: Api, query: list[tuple[str, str]], code: str, named: str
):
    response, body = await api.get("/events", token=await api.token("viewer"), params=query)
    assert response.status == 400
    assert body["error"]["code"] == code
    assert named in body["error"]["message"]


# -- GET /events/stream --------------------------------------------------------------------


async def test_stream_delivers_an_event_published_after_connecting(api: Api, clock: ManualClock):
    viewer = await api.token("viewer")
    async with stream(api, viewer) as sse:
        assert sse.response.headers["Content-Type"].startswith("text/event-stream")
        assert sse.response.headers["Cache-Control"] == "no-cache"
        first = await sse.frame()
        assert first is not None
        assert first.fields == {"retry": "3000"}

        clock.advance(timedelta(seconds=30))
        published = await api.services.bus.publish(
            "rollout_initiated", {"rolloutId": "r-9", "channel": "beta", "note": "caf\u00e9"}
        )
        received = await sse.event()

    assert received == Received(
        published.id,
        "update_rollout_started",
        {
            "id": published.id,
            "type": "rollout_initiated",
            "timestamp": "2026-03-01T12:00:30.000Z",
            "data": {"rolloutId": "r-9", "channel": "beta", "note": "caf\u00e9"},
        },
    )
    # The stream and the list describe an event identically.
    _, body = await api.get("/events", token=viewer, params={"limit": "1"})
    assert body["items"] == [received.data]


async def test_stream_uses_the_design_name_or_update_name_for_each_type(api: Api):
    names = [p for p, _ in DESIGN_SSE_NAMES] + ["sweep_started"]
    async with stream(api, await api.token("viewer")) as sse:
        for name in names:
            await api.services.bus.publish(name, {})
        received = await sse.events(len(names))
    assert [r.event for r in received] == [s for _, s in DESIGN_SSE_NAMES] + [
        "update_sweep_started"
    ]
    assert [r.data["type"] for r in received] == names


async def test_every_connected_client_receives_every_event(api: Api):
    viewer = await api.token("viewer")
    async with stream(api, viewer) as one, stream(api, viewer) as two:
        published = [await api.services.bus.publish("canary_started", {"n": n}) for n in range(5)]
        assert ids(await one.events(5)) == ids(published)
        assert ids(await two.events(5)) == ids(published)


async def test_reconnecting_with_last_event_id_replays_what_was_missed_then_goes_live(api: Api):
    viewer = await api.token("viewer")
    bus = api.services.bus
    async with stream(api, viewer) as sse:
        seen = await bus.publish("canary_started", {"n": 0})
        assert (await sse.event()).id == seen.id
    await eventually(lambda: bus.subscriber_count == 0, "the closed stream to unsubscribe")

    missed = [await bus.publish("canary_completed", {"n": n}) for n in range(1, 4)]
    async with stream(api, viewer, last_event_id=str(seen.id)) as sse:
        replayed = await sse.events(3)
        live = await bus.publish("rollout_initiated", {"n": 4})
        # The very next event is the live one: nothing replayed twice, nothing skipped.
        after = await sse.event()

    assert ids(replayed) == ids(missed)
    assert [r.data["data"] for r in replayed] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [r.event for r in replayed] == ["update_canary_completed"] * 3
    assert after.id == live.id
    assert after.event == "update_rollout_started"


async def test_last_event_id_query_parameter_resumes_like_the_header(api: Api):
    first = await api.services.bus.publish("canary_started", {})
    missed = [await api.services.bus.publish("canary_completed", {"n": n}) for n in range(2)]
    async with stream(api, await api.token("viewer"), query={"lastEventId": str(first.id)}) as sse:
        assert ids(await sse.events(2)) == ids(missed)
        live = await api.services.bus.publish("rollout_completed", {})
        assert (await sse.event()).id == live.id


async def test_last_event_id_zero_replays_the_whole_log(api: Api):
    everything = await api.services.store.events_after(0)
    assert everything  # at least the pipeline's start
    async with stream(api, await api.token("viewer"), last_event_id="0") as sse:
        assert ids(await sse.events(len(everything))) == ids(everything)


async def test_without_last_event_id_nothing_old_is_replayed(api: Api):
    await api.services.bus.publish("canary_started", {})
    async with stream(api, await api.token("viewer")) as sse:
        live = await api.services.bus.publish("canary_completed", {})
        assert (await sse.event()).id == live.id


async def test_long_replay_while_publishing_has_no_gap_and_no_duplicate(api: Api, db_path: Path):
    """Replay spans several store pages while new events keep arriving."""
    bus = api.services.bus
    resume_from = await newest_id(api)
    insert_rows(db_path, 1_234)

    async def keep_publishing() -> list[EventRecord]:
        published = []
        for n in range(40):
            published.append(await bus.publish("canary_started", {"live": n}))
            await asyncio.sleep(0)
        return published

    async with stream(api, await api.token("viewer"), last_event_id=str(resume_from)) as sse:
        publisher = asyncio.create_task(keep_publishing())
        received = await sse.events(1_234 + 40)
        published = await publisher
        marker = await bus.publish("canary_completed", {})
        assert (await sse.event()).id == marker.id

    assert ids(received) == list(range(resume_from + 1, published[-1].id + 1))
    assert [r.data["data"] for r in received[-40:]] == [{"live": n} for n in range(40)]


@pytest.mark.parametrize(
    "bad", ["abc", "-1", "1.5", "0x10", "\u00b2", "1234567890123456789", "12 34"]
)
@pytest.mark.parametrize("form", ["header", "query"])
async def test_invalid_last_event_id_is_400_and_subscribes_nothing(api: Api, bad: str, form: str):
    kwargs: dict[str, Any] = (
        {"headers": {"Last-Event-ID": bad}}
        if form == "header"
        else {"params": {"lastEventId": bad}}
    )
    response, body = await api.get("/events/stream", token=await api.token("viewer"), **kwargs)
    assert response.status == 400
    assert body["error"]["code"] == "INVALID_LAST_EVENT_ID"
    assert "Last-Event-ID" in body["error"]["message"]
    assert api.services.bus.subscriber_count == 0


async def test_stream_rejects_an_unknown_query_parameter(api: Api):
    response, body = await api.get(
        "/events/stream", token=await api.token("viewer"), params={"since": "3"}
    )
    assert response.status == 400
    assert body["error"]["code"] == "INVALID_QUERY"
    assert api.services.bus.subscriber_count == 0


async def test_idle_stream_sends_keepalive_comments_and_stays_open(api: Api):
    assert api.services.sse_keepalive_seconds == 0.2
    async with stream(api, await api.token("viewer")) as sse:
        keepalives = 0
        while keepalives < 2:
            frame = await sse.frame(timeout=WAIT)
            assert frame is not None, "the idle stream ended"
            assert "data" not in frame.fields
            keepalives += frame.comments.count("keepalive")
        event = await api.services.bus.publish("canary_started", {})
        assert (await sse.event()).id == event.id


async def test_a_client_that_goes_away_is_unsubscribed(api: Api):
    async with stream(api, await api.token("viewer")):
        assert api.services.bus.subscriber_count == 1
    await eventually(lambda: api.services.bus.subscriber_count == 0, "the subscription to end")


@pytest.mark.parametrize("role", ["viewer", "admin"])
async def test_viewer_and_admin_may_stream(api: Api, role: str):
    async with stream(api, await api.token(role)) as sse:
        event = await api.services.bus.publish("canary_started", {})
        assert (await sse.event()).id == event.id


async def test_runner_token_may_not_stream(api: Api):
    response, body = await api.get("/events/stream", token=await api.token("runner"))
    assert response.status == 403
    assert body["error"]["code"] == "FORBIDDEN"
    assert api.services.bus.subscriber_count == 0


async def test_stream_without_token_is_401(api: Api):
    response, body = await api.get("/events/stream")
    assert response.status == 401
    assert body["error"]["code"] == "UNAUTHORIZED"
    assert api.services.bus.subscriber_count == 0


# -- slow clients and shutdown -------------------------------------------------------------


@asynccontextmanager
async def never_reading_stream(api: Api, token: str) -> AsyncIterator[socket.socket]:
    """A stream client that sends its request and then never reads a byte."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    with closing(sock):
        await loop.sock_connect(sock, (api.client.host, api.client.port))
        request = (
            f"GET {STREAM} HTTP/1.1\r\nHost: {api.client.host}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        yield sock


BIG = "x" * 32_000  # big events fill the never-reading client's socket buffers quickly


async def test_slow_client_is_dropped_while_others_receive_every_event(api: Api):
    bus = api.services.bus
    bus.queue_size = 5
    viewer = await api.token("viewer")

    async with stream(api, viewer) as reader, never_reading_stream(api, viewer):
        await eventually(lambda: bus.subscriber_count == 2, "both clients to subscribe")
        received: list[Received] = []

        async def read_until_done() -> None:
            while True:
                event = await reader.event(timeout=30)
                received.append(event)
                if event.data["type"] == "done":
                    return

        reading = asyncio.create_task(read_until_done())
        published = []
        try:
            for n in range(2_000):
                started = time.monotonic()
                published.append(await bus.publish("canary_started", {"n": n, "pad": BIG}))
                assert time.monotonic() - started < 2, "publish waited on a client"
                if bus.subscriber_count < 2:
                    break
                # Let the reading client keep up, as a healthy client does.
                await eventually(lambda: len(received) == len(published), "the reader")
            else:
                raise AssertionError("the never-reading client was never dropped")
            assert bus.subscriber_count == 1  # only the reading client is left

            published.append(await bus.publish("done", {}))
            await asyncio.wait_for(reading, WAIT)
        finally:
            reading.cancel()
            with suppress(asyncio.CancelledError):
                await reading

    assert ids(received) == ids(published)


async def test_a_dropped_client_is_disconnected_and_can_resume_from_its_last_event(api: Api):
    bus = api.services.bus
    bus.queue_size = 5
    viewer = await api.token("viewer")
    async with stream(api, viewer) as lagging:
        await eventually(lambda: bus.subscriber_count == 1, "the client to subscribe")
        # Not reading: its buffers fill, its handler blocks in a write, its queue fills.
        published = []
        for n in range(2_000):
            published.append(await bus.publish("canary_started", {"n": n, "pad": BIG}))
            if bus.subscriber_count == 0:
                break
        assert bus.subscriber_count == 0, "the lagging client was never dropped"
        # The server hangs up: what arrived before is an unbroken prefix of the log.
        got: list[Received] = []
        for frame in await lagging.end():
            if "data" in frame.fields:
                got.append(Received(int(frame.fields["id"]), frame.fields["event"], {}))
        assert lagging.hung_up
    assert ids(got) == ids(published[: len(got)])

    last = str(got[-1].id) if got else str(published[0].id - 1)
    async with stream(api, viewer, last_event_id=last) as resumed:
        rest = await resumed.events(len(published) - len(got))
    assert ids(got) + ids(rest) == ids(published)


async def test_stopping_the_server_ends_open_streams_promptly(api: Api):
    viewer = await api.token("viewer")
    admin = await api.token("admin")
    async with stream(api, viewer) as one, stream(api, admin) as two:
        event = await api.services.bus.publish("canary_started", {})
        assert (await one.event()).id == event.id
        assert (await two.event()).id == event.id

        started = time.monotonic()
        await asyncio.wait_for(api.client.server.close(), WAIT)
        assert time.monotonic() - started < 2
        for sse in (one, two):
            assert all("data" not in frame.fields for frame in await sse.end())
            assert not sse.hung_up  # ended cleanly, not cut off
    assert api.services.bus.subscriber_count == 0


async def test_a_dropped_never_reading_client_does_not_hold_up_shutdown(api: Api):
    bus = api.services.bus
    bus.queue_size = 5
    async with never_reading_stream(api, await api.token("viewer")):
        await eventually(lambda: bus.subscriber_count == 1, "the client to subscribe")
        for n in range(2_000):
            await bus.publish("canary_started", {"n": n, "pad": BIG})
            if bus.subscriber_count == 0:
                break
        assert bus.subscriber_count == 0, "the never-reading client was never dropped"
        started = time.monotonic()
        await asyncio.wait_for(api.client.server.close(), WAIT)
        assert time.monotonic() - started < 2


async def test_a_last_event_id_from_another_database_goes_live_instead_of_hiding_events(
    api: Api,
):
    stale = await newest_id(api) + 1000
    async with stream(api, await api.token("viewer"), last_event_id=str(stale)) as sse:
        live = await api.services.bus.publish("canary_started", {})
        assert (await sse.event()).id == live.id
