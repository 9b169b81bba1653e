"""The aiohttp application factory and the serve lifecycle (start-up, signals, shutdown)."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
from aiohttp import web
from gidgethub import routing

from app.api import build_route_table
from app.api.errors import error_middleware
from app.api.openapi import build_openapi
from app.api.routing import OPENAPI, SERVICES
from app.clock import Clock
from app.config import Settings
from app.dashboard import install as install_dashboard
from app.fleet.service import retention
from app.github import canary, commands, installations, sweeps, tracking
from app.github.app import GitHubApp
from app.github.bump import BumpHandoff
from app.github.canary import GitHubCanaryReporter
from app.github.commands import CommandRegistry, PermissionCache
from app.github.installations import InstallationRegistry, InstallationSync
from app.github.oidc import OidcVerifier
from app.github.outbox import OutboxWorker
from app.github.redelivery import MissedDeliveries, MissedDeliverySweep
from app.github.webhooks import WebhookContext, WebhookProcessor
from app.logs import get_logger
from app.pipeline import Component, UpdatePipeline
from app.pipeline.canary.service import CanaryTimeouts
from app.pipeline.version.sources import upstream_sources
from app.pipeline.version.watcher import Source, VersionWatcher
from app.rollouts.controller import RolloutTimer
from app.services import Services
from app.store import InstanceLock, SqliteStore
from app.sweeps.service import SweepManager

log = get_logger("server")


class ServeError(Exception):
    """The service cannot start (for example, its port is taken); a one-line reason."""


@web.middleware
async def metrics_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Counts every answer by route template (never the path itself: ids would make one
    series per object), outside the error middleware so errors count as what was sent."""
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[SERVICES].metrics.answered(route, request.method, response.status)
    return response


def create_app(services: Services) -> web.Application:
    settings = services.settings
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware],
        # read_body enforces the limits, per route; aiohttp's own (1 MiB by default)
        # would refuse a body the settings allow, such as a large push delivery.
        client_max_size=max(settings.max_body_bytes, settings.webhook_max_bytes),
    )
    app[SERVICES] = services
    table = build_route_table()
    table.install(app)
    app[OPENAPI] = build_openapi(table)
    # The operator dashboard's pages at / and /dashboard/, beside the API.
    install_dashboard(app, services)

    async def end_streams(_: web.Application) -> None:
        # Live event streams never finish by themselves; end them so shutdown need
        # not wait out the grace period. Clients resume with Last-Event-ID.
        services.bus.close_all()

    app.on_shutdown.append(end_streams)
    return app


def github_components(
    services: Services, command_registry: CommandRegistry | None = None
) -> list[Component]:
    """The pipeline's GitHub parts. Deliveries are stored whatever happens here; the
    worker that processes them runs with the pipeline, and the outbox worker with it
    when the App is configured (entries wait in the store otherwise)."""
    registry = None
    components: list[Component] = []
    if services.github is not None:
        registry = InstallationRegistry(services.store, services.github, services.clock)
        components.append(InstallationSync(registry))
        if services.settings.github_webhook_secret is not None:
            missed = MissedDeliveries(services.store, services.github, services.clock)
            components.append(MissedDeliverySweep(missed))
        components.append(OutboxWorker(services.outbox, services.github))
    commands_registry = command_registry or CommandRegistry()
    services.commands = commands_registry
    routers: list[routing.Router] = []
    settings = services.settings
    if services.github is not None and settings.runner_repo is not None:
        # Canaries show on GitHub: check runs, dispatches, and /canary on pull requests.
        services.canary.reporter = GitHubCanaryReporter(services.store, settings, services.clock)
        services.canary.effects_written = services.outbox.written
        canary.register_commands(commands_registry, services.canary, settings)
    reporter = None
    if services.github is not None and settings.control_repo is not None:
        # Rollouts are tracked as issues in the control repository, and steered there.
        reporter = tracking.TrackingReporter(services.store, settings)
        services.rollouts.reporter = reporter
        services.rollouts.effects_written = services.outbox.written
        tracking.register_commands(commands_registry, services.rollouts, reporter)
        sync = tracking.TrackingSync(services.rollouts, reporter, services.outbox, services.clock)
        components.append(sync)
        routers.append(tracking.router_for(services.rollouts, reporter, sync))
    if services.github is not None:
        # Sweeps dispatch workflows in opted-in repositories and follow their runs.
        configs = sweeps.SweepConfigs(services.store, services.github, settings, services.clock)
        service = services.sweeps
        service.configs = configs
        service.reporter = sweeps.GitHubSweepReporter(services.store, settings, reporter)
        service.effects_written = services.outbox.written
        sweeps.wire(service)
        routers.append(sweeps.router_for(service, configs))
        components.append(SweepManager(service))
        if reporter is not None:
            sweeps.register_commands(commands_registry, service, reporter)
        if settings.auto_sweep:
            services.rollouts.listeners.append(sweeps.auto_sweep(service))
        if settings.sweep_gate is not None:
            services.rollouts.holds.append(service.hold)
            # A stage held for its sweep moves on as soon as the sweep ends.
            service.finished.append(lambda _sweep_id: services.rollouts.wake.set())
    # Every feature's router, merged here so one place shows all that reacts to GitHub;
    # features add their slash commands to the one registry.
    routers += [installations.router, commands.router, canary.router]
    context = WebhookContext(
        installations=registry,
        github=services.github,
        commands=commands_registry,
        permissions=PermissionCache(services.clock),
        canary=services.canary,
        settings=settings,
        store=services.store,
        clock=services.clock,
    )
    components.append(
        WebhookProcessor(
            services.deliveries,
            routers,
            context,
            outbox=services.outbox,
            metrics=services.metrics,
        )
    )
    return components


def version_watcher(services: Services, session: aiohttp.ClientSession) -> VersionWatcher:
    """The VersionWatcher; it finds the sources the providers name when it starts. With
    the App configured and a runner repository, a version ready for the canary becomes a
    bump pull request there (whose canary then runs like any pull request's)."""
    settings = services.settings

    async def sources() -> list[Source]:
        return await upstream_sources(
            settings, session, github=services.github, store=services.store
        )

    handoff = None
    if services.github is not None and settings.runner_repo is not None:
        handoff = BumpHandoff(
            services.outbox, services.store, settings.runner_repo, settings.runtime_manifest
        )
    return VersionWatcher(
        services.store,
        services.bus,
        services.clock,
        [p.id for p in settings.providers],
        [],
        load_sources=sources,
        interval=settings.poll_interval,
        polling=settings.polling,
        auto_canary=settings.auto_canary,
        min_release_age=settings.min_release_age,
        canary=handoff,
    )


async def start_pipeline(services: Services, components: Sequence[Component] = ()) -> None:
    """Start the pipeline if enabled. A failure is logged and leaves the API up with the
    pipeline off (design section 9.2); /ready and /status report it."""
    if not services.settings.enabled:
        log.info("pipeline disabled (set UPDATE_PIPELINE_ENABLED=true to enable)")
        return
    pipeline = UpdatePipeline(
        services.settings, services.store, services.bus, services.clock, components
    )
    try:
        await pipeline.start()
    except Exception as exc:
        log.exception("pipeline failed to start; serving the API with the pipeline disabled")
        services.pipeline_error = f"{type(exc).__name__}: {exc}"
        return
    services.pipeline = pipeline


async def serve(
    settings: Settings,
    *,
    clock: Clock | None = None,
    components: Sequence[Component] = (),
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM or SIGINT (or ``stop`` is set), then shut down in order:
    stop accepting, finish in-flight requests, stop the pipeline, close the database."""
    # Signals are caught from the first moment, so a SIGTERM during start-up still
    # leads through the orderly shutdown below.
    stop = stop or _signal_event()
    lock = InstanceLock(settings.db_path)
    lock.acquire()
    try:
        store = await SqliteStore.open(settings.db_path)
        try:
            services = Services.build(settings, store, clock or Clock())
            services.github = GitHubApp.from_settings(settings, services.clock)
            # Upstream registries and the OIDC issuer share a session, apart from GitHub's.
            upstream = aiohttp.ClientSession()
            services.oidc = OidcVerifier(settings.oidc_issuer, upstream, services.clock)
            try:
                own = github_components(services)
                if settings.enabled:
                    own.append(version_watcher(services, upstream))
                    own.append(CanaryTimeouts(services.canary))
                    own.append(retention(services.fleet))
                    own.append(RolloutTimer(services.rollouts))
                await start_pipeline(services, [*own, *components])
                await _run_http(services, stop)
            finally:
                await upstream.close()
                if services.github is not None:
                    await services.github.close()
        finally:
            await store.close()
    finally:
        lock.release()
    log.info("shutdown complete")


def _signal_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run_http(services: Services, stop: asyncio.Event) -> None:
    settings = services.settings
    timeout = settings.shutdown_timeout.total_seconds()
    runner = web.AppRunner(create_app(services), shutdown_timeout=timeout, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            raise ServeError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        for address in runner.addresses:
            log.info("listening on http://%s:%s", *address[:2])
        # Everything made during start-up lives as long as the process: moved out of the
        # garbage collector's sight, it no longer makes each full collection (which
        # stops every request in flight) walk the whole heap.
        gc.freeze()
        await stop.wait()
        log.info("stopping: no new connections, finishing requests in flight")
    finally:
        # One budget for the whole shutdown: what in-flight requests use up, the pipeline
        # does not get again (it always gets a moment to cancel its tasks).
        deadline = asyncio.get_running_loop().time() + timeout
        await runner.cleanup()
        if services.pipeline is not None:
            remaining = max(1.0, deadline - asyncio.get_running_loop().time())
            try:
                await asyncio.wait_for(services.pipeline.stop(), remaining)
            except TimeoutError:
                log.error("pipeline did not stop within %.1fs; exiting anyway", remaining)
