"""UpdatePipeline: the orchestrator that owns the components and their background tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from app.clock import Clock, isoformat
from app.logs import get_logger
from app.pipeline.events import EventBus
from app.pipeline.version.semver import newest
from app.store import Store

if TYPE_CHECKING:  # app.config reads the providers file, from this package
    from app.config import Settings

log = get_logger("pipeline")

CHANNELS = ("stable", "beta")
VERSION_WATCHER = "version_watcher"


class Component(Protocol):
    """A part of the pipeline (VersionWatcher, CanaryRunner, RolloutController, ...).

    ``start`` may spawn background work through ``pipeline.spawn``; the pipeline cancels
    it on stop, so a component's ``stop`` only releases what it holds itself.
    """

    name: str

    async def start(self, pipeline: UpdatePipeline) -> None: ...

    async def stop(self) -> None: ...


class UpdatePipeline:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        bus: EventBus,
        clock: Clock,
        components: Sequence[Component] = (),
    ) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.clock = clock
        self.components = list(components)
        self.providers = [p.id for p in settings.providers]
        self._started: list[Component] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self.running = False

    def component(self, name: str) -> Component | None:
        return next((c for c in self._started if c.name == name), None)

    async def start(self) -> None:
        async with self._lock:
            if self.running:
                return
            try:
                for component in self.components:
                    await component.start(self)
                    self._started.append(component)
                    log.info("started %s", component.name)
            except BaseException:
                await self._shutdown()
                raise
            self.running = True
        await self.bus.publish("pipeline_started", {"components": [c.name for c in self._started]})
        log.info("pipeline running with %d component(s)", len(self._started))

    async def stop(self) -> None:
        async with self._lock:
            if not self.running and not self._started:
                return
            self.running = False
            await self._shutdown()
        await self.bus.publish("pipeline_stopped", {})
        log.info("pipeline stopped")

    async def _shutdown(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for component in reversed(self._started):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", component.name)
        self._started.clear()

    def spawn(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` in the background, owned by the pipeline and cancelled on stop.

        A task that ends with an exception marks the pipeline unhealthy (see ``health``)."""
        if name in self._tasks and not self._tasks[name].done():
            work.close()
            raise ValueError(f"a background task named {name!r} is already running")
        task = asyncio.create_task(work, name=f"update-pipeline:{name}")
        self._tasks[name] = task
        self._failures.pop(name, None)
        task.add_done_callback(lambda done: self._task_done(name, done))
        return task

    def _task_done(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._failures[name] = f"{type(error).__name__}: {error}"
            log.error("background task %s failed", name, exc_info=error)
        elif self.running:
            self._failures[name] = "stopped unexpectedly"
            log.error("background task %s ended while the pipeline was running", name)

    def health(self) -> str | None:
        """None when every background task is alive, else why not."""
        if not self.running:
            return "pipeline is not running"
        if self._failures:
            return "; ".join(f"{n}: {why}" for n, why in sorted(self._failures.items()))
        return None

    async def status(self) -> dict[str, Any]:
        """Design section 4.1, computed from the store on every call."""
        counts = await self.store.status_counts(self.providers)
        return {
            "running": self.running,
            # True exactly while the watcher polls (it may run without polling, to take
            # heartbeat versions and manual checks).
            "versionWatcherActive": self.running
            and bool(getattr(self.component(VERSION_WATCHER), "active", False)),
            "activeCanaryTests": counts.active_canaries,
            "activeRollouts": counts.active_rollouts,
            "activeSweeps": counts.active_sweeps,
            "knownVersions": {
                p: newest(counts.versions.get(p, ()), stable=True) for p in self.providers
            },
            "recommendedBuilds": {c: counts.recommended_builds.get(c) for c in CHANNELS},
            "frozen": (
                {
                    "reason": counts.frozen.reason,
                    "by": counts.frozen.frozen_by,
                    "at": isoformat(counts.frozen.frozen_at),
                }
                if counts.frozen is not None
                else None
            ),
        }
