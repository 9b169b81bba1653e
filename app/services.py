"""The long-lived objects a running server shares: settings, store, clock, bus, pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.auth import TokenService
from app.clock import Clock
from app.config import Settings
from app.fleet.service import Fleet
from app.github.app import NOT_CONFIGURED, GitHubApp
from app.github.commands import CommandRegistry
from app.github.oidc import OidcVerifier
from app.github.outbox import Outbox
from app.github.webhooks import Deliveries
from app.metrics import Metrics
from app.pipeline import UpdatePipeline
from app.pipeline.canary.service import CanaryService
from app.pipeline.events import EventBus
from app.rollouts.controller import RolloutController
from app.store import Store
from app.sweeps.service import SweepService


@dataclass
class Services:
    settings: Settings
    store: Store
    clock: Clock
    bus: EventBus
    tokens: TokenService
    deliveries: Deliveries
    outbox: Outbox
    canary: CanaryService
    fleet: Fleet
    rollouts: RolloutController
    sweeps: SweepService
    pipeline: UpdatePipeline | None = None
    github: GitHubApp | None = None
    # Verifies GitHub Actions OIDC tokens (canary results); set by serve.
    oidc: OidcVerifier | None = None
    # Why an enabled pipeline is not running (its start failed), for /ready and /status.
    pipeline_error: str | None = None
    # The slash commands and the permission each needs: the dashboard's buttons follow
    # the same table (set by github_components).
    commands: CommandRegistry | None = None
    sse_keepalive_seconds: float = 15.0
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def tracking_issues(self) -> str:
        repo = self.settings.control_repo
        return repo if repo is not None and self.github is not None else "off"

    @property
    def github_state(self) -> str:
        return self.github.state if self.github is not None else NOT_CONFIGURED

    @classmethod
    def build(cls, settings: Settings, store: Store, clock: Clock) -> Services:
        bus = EventBus(store, clock)
        canary = CanaryService(store, bus, clock, settings)
        fleet = Fleet(store, clock, settings)
        canary.listeners.append(fleet.invalidate)
        rollouts = RolloutController(store, fleet, bus, clock, settings)
        return cls(
            settings,
            store,
            clock,
            bus,
            TokenService(store, clock, bus),
            Deliveries(store, clock),
            Outbox(store, clock),
            canary,
            fleet,
            rollouts,
            SweepService(store, bus, clock, settings),
        )
