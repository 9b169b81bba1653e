"""The event bus: every pipeline event is persisted, then fanned out to live subscribers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from app.clock import Clock
from app.logs import get_logger
from app.store import EventRecord, Store

log = get_logger("events")

KEEP_EVENTS = 10_000  # design section 5.1: the log keeps the newest 10K events

# Design section 3.2: pipeline event name -> name pushed to live clients.
SSE_NAMES: Mapping[str, str] = {
    "new_version_detected": "update_version_detected",
    "canary_started": "update_canary_started",
    "canary_completed": "update_canary_completed",
    "rollout_initiated": "update_rollout_started",
    "rollout_completed": "update_rollout_completed",
    "rollback_initiated": "update_rollback",
}
_FROM_SSE = {sse: name for name, sse in SSE_NAMES.items()}


def sse_name(event_type: str) -> str:
    return SSE_NAMES.get(event_type, f"update_{event_type}")


def event_type(name: str) -> str:
    """Accept either the pipeline's name or the live-stream name for an event type."""
    if name in _FROM_SSE:
        return _FROM_SSE[name]
    if name.startswith("update_") and name[len("update_") :] not in SSE_NAMES:
        return name[len("update_") :]
    return name


class Subscription:
    """One live listener with a bounded queue. ``None`` in the queue means: stream over."""

    def __init__(self, maxsize: int, on_drop: Callable[[], None] | None = None) -> None:
        self.queue: asyncio.Queue[EventRecord | None] = asyncio.Queue(maxsize)
        self.dropped = False
        self.on_drop = on_drop

    def offer(self, event: EventRecord) -> bool:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
            self.end()
            if self.on_drop is not None:
                # A listener this far behind may be stuck and never reach the end marker.
                self.on_drop()
            return False
        return True

    def end(self) -> None:
        # Room is made for the end marker. The listener resumes after the last event it
        # received, so the queue goes as a whole: discarding only the oldest entries
        # would leave a gap behind that id which it could never fetch again.
        if self.queue.full():
            while not self.queue.empty():
                self.queue.get_nowait()
        self.queue.put_nowait(None)

    async def next(self) -> EventRecord | None:
        return await self.queue.get()


class EventBus:
    def __init__(
        self, store: Store, clock: Clock, *, keep: int = KEEP_EVENTS, queue_size: int = 1000
    ) -> None:
        self.store = store
        self.clock = clock
        self.keep = keep
        self.queue_size = queue_size
        self._subscribers: set[Subscription] = set()

    async def publish(self, type: str, data: Mapping[str, Any] | None = None) -> EventRecord:
        event = await self.store.append_event(type, data or {}, self.clock.now(), keep=self.keep)
        self.deliver([event])
        return event

    def deliver(self, events: Sequence[EventRecord]) -> None:
        """Fan out events already stored, by a store method that wrote them in the same
        transaction as the change they report."""
        for event in events:
            self._offer(event)

    def _offer(self, event: EventRecord) -> None:
        for subscriber in list(self._subscribers):
            if not subscriber.offer(event):
                # A slow listener must never hold up the pipeline or other listeners.
                self._subscribers.discard(subscriber)
                log.warning(
                    "dropped a live event listener that fell %d events behind", self.queue_size
                )

    def subscribe(self, on_drop: Callable[[], None] | None = None) -> Subscription:
        """``on_drop`` runs (inside ``publish``, so it must not block) if the listener falls
        ``queue_size`` events behind and is dropped."""
        subscription = Subscription(self.queue_size, on_drop)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def close_all(self) -> None:
        for subscription in self._subscribers:
            subscription.end()
        self._subscribers.clear()
