"""A pipeline component that repeats one piece of work on a fixed interval."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from app.logs import get_logger
from app.store import BUSY_PAUSE, StoreBusy

if TYPE_CHECKING:
    from app.pipeline import UpdatePipeline

log = get_logger("pipeline.periodic")


class Periodic:
    """Runs ``work`` at start and every ``interval`` after. An exception of a kind listed
    in ``survives`` (an outage, say) is logged and passed to ``on_error``, and the next
    round tries again; anything else ends the task and marks the pipeline unhealthy. A
    database kept locked by another process (StoreBusy) is tried again a second later."""

    def __init__(
        self,
        name: str,
        work: Callable[[], Awaitable[object]],
        interval: timedelta,
        *,
        survives: tuple[type[BaseException], ...],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self.work = work
        self.interval = interval
        self.survives = survives
        self.on_error = on_error

    async def start(self, pipeline: UpdatePipeline) -> None:
        pipeline.spawn(self.name, self._loop())

    async def stop(self) -> None:
        return None

    async def _loop(self) -> None:
        while True:
            try:
                await self.work()
            except StoreBusy as exc:
                # Another process held the database past the busy timeout: try again in
                # a moment rather than a whole interval later.
                log.warning("%s: %s; trying again in %.0fs", self.name, exc, BUSY_PAUSE)
                await asyncio.sleep(BUSY_PAUSE)
                continue
            except self.survives as exc:
                log.warning("%s failed, trying again in %s: %s", self.name, self.interval, exc)
                if self.on_error is not None:
                    self.on_error(exc)
            await asyncio.sleep(self.interval.total_seconds())
