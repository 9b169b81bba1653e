"""The store's interface and the records it hands out. Domain code depends on this only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


class StoreError(Exception):
    """The database cannot be used (locked by another instance, too new, unreadable)."""


class StoreBusy(StoreError):
    """Another connection held the database's write lock for longer than the busy
    timeout: nothing was written, and trying again shortly is the answer."""


# Seconds a background loop waits after StoreBusy before it tries again.
BUSY_PAUSE = 1.0


class Conflict(Exception):
    """A unique key is already taken; ``key`` names the clashing value."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class NewToken:
    name: str
    role: str
    token_hash: str
    org_id: str | None
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: int
    name: str
    role: str
    token_hash: str
    org_id: str | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class DashboardSession:
    """A signed-in dashboard browser, found by the SHA-256 of its cookie's session id."""

    id_hash: str
    kind: str  # github or token
    login: str  # the GitHub login, or the API token's name
    level: str  # a token's role, or the GitHub permission read at sign-in
    token_id: int | None  # the API token a token session was made from
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    type: str
    created_at: datetime
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class FoundVersion:
    """A version a source reported: an upstream release, or a runner's heartbeat."""

    provider_id: str
    version: str
    released_at: datetime
    source: str  # npm, github, heartbeat
    source_url: str | None = None
    prerelease: bool = False
    # Part of a provider's history, recorded by its first check: no event, no canary.
    baseline: bool = False


@dataclass(frozen=True, slots=True)
class RuntimeVersionRecord:
    """Design section 5.2's RuntimeVersion, with where it came from."""

    id: str
    provider_id: str
    version: str
    released_at: datetime
    source: str
    source_url: str | None
    prerelease: bool
    canary_passed: bool
    canary_passed_at: datetime | None
    announced_at: datetime | None  # None: only runners have reported it (drift)
    handed_to_canary_at: datetime | None
    baseline: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class BuildRecord:
    """Design section 5.2's RunnerBuild, with the commit it was built from."""

    build_id: str
    runner_version: str
    built_at: datetime
    runtime_versions: Mapping[str, str] = field(default_factory=dict)
    known_good_for: Sequence[str] = ()
    repository: str | None = None
    commit_sha: str | None = None
    created_at: datetime | None = None  # set by the store
    manifest: str | None = None  # the runtime manifest's text it was read from


@dataclass(frozen=True, slots=True)
class CanaryRun:
    id: str
    build_id: str
    attempt: int
    state: str  # pending, running, passed, failed, errored
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    deadline_at: datetime | None
    metrics: Mapping[str, Any] | None
    error: str | None
    workflow_run_id: str | None
    reported_by: str | None
    ref: str | None = None
    check_key: str | None = None
    dispatch_key: str | None = None


@dataclass(frozen=True, slots=True)
class NewCanaryRun:
    """A canary run to start: its deadline for results, and where its workflow runs."""

    deadline_at: datetime
    ref: str | None = None  # the branch its workflow is dispatched on
    check_key: str | None = None  # its check run's external_id
    dispatch_key: str | None = None  # the key its workflow run is found by


@dataclass(frozen=True, slots=True)
class CanaryOutcome:
    """What a finished canary run writes, all in one transaction."""

    state: str
    metrics: Mapping[str, Any] | None
    results: Sequence[Mapping[str, Any]] | None
    known_good_for: Sequence[str]
    error: str | None = None
    reported_by: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    channel: str
    build_id: str
    updated_at: datetime
    reason: str | None
    set_by: str | None


@dataclass(frozen=True, slots=True)
class Rollout:
    """Design section 5.2's ActiveRollout, with what a restart needs to resume it."""

    rollout_id: str
    build_id: str
    channel: str
    state: str  # pending, rolling_out, paused, completed, rolled_back
    plan: str  # the stage plan it started with (later changes to the setting do not move it)
    stage: int  # index into the plan
    percentage: float
    started_at: datetime
    updated_at: datetime
    stage_started_at: datetime | None = None
    deadline_at: datetime | None = None  # None while paused and at the last stage
    paused_at: datetime | None = None
    remaining_seconds: float | None = None  # of the stage's watch, kept while paused
    previous_build_id: str | None = None  # the channel's recommendation when it started
    replaced_build_id: str | None = None  # the recommendation its completion replaced
    started_by: str = ""
    forced_reason: str | None = None
    finished_at: datetime | None = None
    rollback: Mapping[str, Any] | None = None
    version: int = 0


@dataclass(frozen=True, slots=True)
class Inclusion:
    """An org a rollout included, and the build it ran before."""

    org_id: str
    stage: int
    included_at: datetime
    previous_build_id: str | None


@dataclass(frozen=True, slots=True)
class Approval:
    org_id: str
    decision: str  # approved, skipped
    decided_by: str
    decided_at: datetime
    voided_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: datetime
    actor: str
    action: str
    from_state: str | None
    to_state: str
    stage: int
    percentage: float
    reason: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    id: int = 0  # set by the store


@dataclass(frozen=True, slots=True)
class ChannelChange:
    """A channel's recommendation to write with a rollout change (None clears it)."""

    build_id: str | None
    reason: str
    set_by: str


@dataclass(frozen=True, slots=True)
class RolloutChange:
    """One rollout transition, written whole: the new row (refused if the stored one is
    no longer ``expected_version``; None creates it), what it records and announces."""

    rollout: Rollout
    expected_version: int | None
    history: Sequence[HistoryEntry]
    inclusions: Sequence[Inclusion] = ()
    approval: Approval | None = None
    void_approvals: bool = False
    channel: ChannelChange | None = None
    events: Sequence[tuple[str, Mapping[str, Any]]] = ()
    effects: Sequence[NewEffect] = ()  # GitHub side effects that follow the change
    tracking: TrackingIssue | None = None  # a tracking issue to record (or replace)
    once: str | None = None  # the key of the command making it: AlreadyDone if seen
    withdraw: str | None = None  # an org whose approval is taken back


@dataclass(frozen=True, slots=True)
class TrackingIssue:
    """The GitHub issue that tracks a rollout (its number None until GitHub made it)."""

    rollout_id: str
    repo: str
    installation_id: int
    key: str
    number: int | None = None


class AlreadyDone(Exception):
    """The command this change carries the key of was acted on before, on ``rollout_id``."""

    def __init__(self, message: str, rollout_id: str) -> None:
        super().__init__(message)
        self.rollout_id = rollout_id


class StaleRollout(Exception):
    """A rollout changed between the read a change was made from and its write."""


@dataclass(frozen=True, slots=True)
class StageSessions:
    """Sessions counted during one stage of a rollout, for one org on one build."""

    stage: int
    org_id: str
    build_id: str
    started: int
    failed: int
    disconnected: int


@dataclass(frozen=True, slots=True)
class Settled:
    """Where the last rollout that included an org left it."""

    rollout_id: str
    state: str  # completed or rolled_back
    build_id: str  # the rollout's target
    previous_build_id: str | None
    restores: bool  # rolled back, and the channel has not been set since
    channel: str = "stable"


@dataclass(frozen=True, slots=True)
class Freeze:
    reason: str
    frozen_by: str
    frozen_at: datetime


@dataclass(frozen=True, slots=True)
class Repository:
    id: int
    full_name: str


@dataclass(frozen=True, slots=True)
class Installation:
    id: int
    account_login: str
    account_type: str
    suspended: bool
    repositories: Sequence[Repository] = ()


@dataclass(frozen=True, slots=True)
class Delivery:
    delivery_id: str
    event: str
    action: str | None
    installation_id: int | None
    payload: str  # the JSON body exactly as GitHub sent it
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    received_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewEffect:
    """A GitHub side effect to apply after the change it follows has committed.

    ``target`` names the GitHub object it acts on (entries with one target apply in the
    order they were written); ``replace_key``, when set, makes a newer pending entry with
    the same key overwrite this one (an issue body edited twice needs only the last edit).
    """

    installation_id: int
    target: str
    kind: str
    payload: Mapping[str, Any]
    replace_key: str | None = None


@dataclass(frozen=True, slots=True)
class Effect:
    id: int
    installation_id: int
    target: str
    kind: str
    payload: Mapping[str, Any]
    replace_key: str | None
    revision: int
    status: str  # pending, done, failed
    attempts: int  # started attempts, counted before each one is made
    next_attempt_at: datetime
    last_error: str | None
    result: Mapping[str, Any] | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending: int
    failed: int
    oldest_pending: Effect | None


@dataclass(frozen=True, slots=True)
class Org:
    org_id: str
    channel: str
    pinned_build_id: str | None
    version_pins: Mapping[str, str]  # provider -> version prefix
    approval_required: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class RunnerState:
    runner_id: str
    org_id: str
    boot_id: str
    build_id: str | None
    started: int
    failed: int
    disconnected: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One accepted heartbeat, as written: the runner's new state, the sessions it adds
    (the positive difference from the last heartbeat of the same boot), and where they
    count."""

    runner: RunnerState
    runtimes: Mapping[str, str]
    received_at: datetime
    new_sessions: tuple[int, int, int]  # started, failed, disconnected
    rollout_id: str = ""
    stage: int = -1
    new_org: Org | None = None


@dataclass(frozen=True, slots=True)
class SweepRepo:
    """A repository where the App is installed, as far as sweeps go."""

    repo: str  # owner/name, lower case
    installation_id: int
    state: str  # unread, opted_in, absent, misconfigured, unreadable
    config: Mapping[str, Any] | None = None  # a SweepConfig as JSON, when opted in
    error: str | None = None
    read_at: datetime | None = None
    excluded_at: datetime | None = None
    excluded_by: str | None = None
    last_sweep_id: str | None = None
    last_conclusion: str | None = None


@dataclass(frozen=True, slots=True)
class Sweep:
    sweep_id: str
    state: str  # pending, running, completed, failed, cancelled
    provider: str | None
    version: str | None
    build_id: str | None
    rollout_id: str | None
    started_by: str
    created_at: datetime
    updated_at: datetime | None = None
    completed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SweepRun:
    """One repository of a sweep: its dispatch and the workflow run it started."""

    sweep_id: str
    repo: str
    installation_id: int
    workflow: str
    ref: str
    inputs: Mapping[str, str]
    state: str  # waiting, dispatching, queued, in_progress, completed, failed, timed_out
    updated_at: datetime
    run_id: int | None = None
    run_attempt: int | None = None
    run_url: str | None = None
    conclusion: str | None = None
    error: str | None = None
    results: Mapping[str, Any] | None = None
    dispatched_at: datetime | None = None
    deadline_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """What ``GET /status`` is computed from, read in one consistent snapshot."""

    active_canaries: int
    active_rollouts: int
    active_sweeps: int
    versions: Mapping[str, Sequence[str]]
    recommended_builds: Mapping[str, str]
    frozen: Freeze | None = None


class Store(Protocol):
    """Everything the app persists. All SQL lives behind this interface."""

    async def ping(self) -> None: ...
    async def close(self) -> None: ...
    async def schema_version(self) -> int: ...
    async def outside_writes(self) -> int: ...

    # API tokens
    async def add_tokens(self, tokens: Sequence[NewToken]) -> list[TokenRecord]: ...
    async def token_by_hash(self, token_hash: str) -> TokenRecord | None: ...
    async def list_tokens(self, *, include_revoked: bool = False) -> list[TokenRecord]: ...
    async def revoke_token(self, name: str, at: datetime) -> TokenRecord | None: ...
    async def touch_token(self, token_id: int, at: datetime) -> None: ...

    # Dashboard sessions
    async def add_session(self, session: DashboardSession) -> None:
        """Store a new session, deleting the expired ones in the same transaction."""
        ...

    async def session_by_hash(self, id_hash: str, now: datetime) -> DashboardSession | None:
        """The live session with this hash: not expired, and its token (if it was made
        from one) neither revoked nor expired."""
        ...

    async def delete_session(self, id_hash: str) -> bool: ...

    # Event log
    async def append_event(
        self, type: str, data: Mapping[str, Any], at: datetime, *, keep: int
    ) -> EventRecord: ...
    async def list_events(
        self, *, types: Sequence[str] = (), before_id: int | None = None, limit: int = 50
    ) -> list[EventRecord]: ...
    async def events_after(self, after_id: int, *, limit: int = 500) -> list[EventRecord]: ...

    # Design section 5.2 models
    async def record_versions(
        self, found: Sequence[FoundVersion], at: datetime, *, keep_events: int
    ) -> list[EventRecord]: ...
    async def record_heartbeat_version(
        self, found: FoundVersion, at: datetime, *, keep_events: int
    ) -> EventRecord | None: ...
    async def version_pairs(self) -> dict[tuple[str, str], bool]: ...
    async def list_versions(
        self, *, provider_id: str | None, before: str | None, limit: int
    ) -> list[RuntimeVersionRecord]: ...
    async def versions_for_canary(
        self, released_before: datetime, *, limit: int
    ) -> list[RuntimeVersionRecord]: ...
    async def next_canary_eligible(self) -> datetime | None: ...
    async def mark_handed_to_canary(self, version_id: str, at: datetime) -> None: ...
    async def add_build(self, build: BuildRecord, at: datetime) -> None: ...
    async def register_build(
        self,
        build: BuildRecord,
        at: datetime,
        *,
        run: NewCanaryRun,
        keep_events: int,
        effects: Sequence[NewEffect] = (),
    ) -> tuple[BuildRecord, CanaryRun, list[EventRecord]]: ...
    async def start_canary_run(
        self,
        build_id: str,
        attempt: int,
        at: datetime,
        *,
        run: NewCanaryRun,
        keep_events: int,
        effects: Sequence[NewEffect] = (),
    ) -> tuple[CanaryRun, list[EventRecord]]: ...
    async def bind_workflow_run(self, run_id: str, workflow_run_id: str) -> None: ...
    async def canary_run_for_workflow(
        self, workflow_run_id: str, dispatch_keys: Sequence[str]
    ) -> CanaryRun | None: ...
    async def canary_run_by_check_key(self, check_key: str) -> CanaryRun | None: ...
    async def set_pull_request_build(
        self, repository: str, number: int, build_id: str, head_sha: str, at: datetime
    ) -> str | None: ...
    async def pull_request_build(self, repository: str, number: int) -> str | None: ...
    async def forget_pull_request_build(self, repository: str, number: int) -> str | None: ...
    async def get_build(self, build_id: str) -> BuildRecord | None: ...
    async def list_builds(self, *, before: str | None, limit: int) -> list[BuildRecord]: ...
    async def latest_canary_run(self, build_id: str) -> CanaryRun | None: ...
    async def list_canary_runs(self, build_id: str) -> list[CanaryRun]: ...
    async def canary_results(self, run_id: str) -> list[dict[str, Any]] | None: ...
    async def finish_canary(
        self,
        run_id: str,
        outcome: CanaryOutcome,
        at: datetime,
        *,
        keep_events: int,
        effects: Sequence[NewEffect] = (),
    ) -> tuple[CanaryRun, list[EventRecord]] | None: ...
    async def expired_canaries(self, now: datetime, *, limit: int) -> list[CanaryRun]: ...
    async def next_canary_deadline(self) -> datetime | None: ...
    async def set_channel(
        self,
        channel: str,
        build_id: str,
        at: datetime,
        *,
        reason: str,
        set_by: str,
        keep_events: int,
    ) -> tuple[ChannelRecord, list[EventRecord]]: ...
    async def list_channels(self) -> list[ChannelRecord]: ...
    async def add_heartbeat(self, heartbeat: Heartbeat) -> None: ...
    async def runner_state(self, org_id: str, runner_id: str) -> RunnerState | None: ...
    async def list_orgs(
        self, *, channel: str | None, before: str | None, limit: int
    ) -> list[Org]: ...
    async def get_org(self, org_id: str) -> Org | None: ...
    async def save_org(self, org: Org) -> None: ...
    async def all_orgs(self) -> list[Org]: ...
    async def fleet_counts(self) -> list[dict[str, Any]]: ...
    async def prune_sessions(self, older_than: datetime) -> int: ...
    async def org_builds(self, org_ids: Sequence[str]) -> dict[str, str]: ...

    # Rollouts
    async def write_rollout(
        self, change: RolloutChange, at: datetime, *, keep_events: int
    ) -> list[EventRecord]: ...
    async def include_org(self, rollout_id: str, inclusion: Inclusion, *, version: int) -> bool: ...
    async def get_rollout(self, rollout_id: str) -> Rollout | None: ...
    async def command_done(self, key: str) -> str | None: ...
    async def tracking_issue(self, rollout_id: str) -> TrackingIssue | None: ...
    async def tracking_issue_by_number(self, repo: str, number: int) -> TrackingIssue | None: ...
    async def unnumbered_tracking_issues(self, repo: str) -> list[TrackingIssue]: ...
    async def set_tracking_number(self, rollout_id: str, key: str, number: int) -> None: ...
    async def replace_tracking_issue(
        self, tracking: TrackingIssue, effects: Sequence[NewEffect], at: datetime
    ) -> None: ...
    async def list_rollouts(
        self, *, state: str | None, channel: str | None, before: str | None, limit: int
    ) -> list[Rollout]: ...
    async def live_rollouts(self) -> list[Rollout]: ...
    async def latest_rollout(self, channel: str) -> Rollout | None: ...
    async def rollout_orgs(
        self, rollout_id: str, *, after: str | None = None, limit: int | None = None
    ) -> list[Inclusion]: ...
    async def rollout_approvals(self, rollout_id: str) -> list[Approval]: ...
    async def rollout_history(
        self, rollout_id: str, *, after_id: int | None, limit: int
    ) -> list[HistoryEntry]: ...
    async def stage_sessions(
        self, rollout_id: str, stage: int | None = None
    ) -> list[StageSessions]: ...
    async def settled_orgs(self) -> dict[str, Settled]: ...
    async def get_freeze(self) -> Freeze | None: ...
    async def set_freeze(
        self, freeze: Freeze | None, at: datetime, *, by: str, keep_events: int
    ) -> list[EventRecord]: ...
    async def status_counts(self, providers: Sequence[str]) -> StatusCounts: ...
    async def metric_counts(self) -> dict[str, dict[str, int]]: ...

    # Sweeps
    async def save_sweep_repo(self, repo: SweepRepo) -> None: ...
    async def get_sweep_repo(self, repo: str) -> SweepRepo | None: ...
    async def list_sweep_repos(
        self, *, opted_in: bool, before: str | None, limit: int
    ) -> list[SweepRepo]: ...
    async def set_sweep_exclusion(
        self, repo: str, at: datetime | None, by: str | None
    ) -> SweepRepo | None: ...
    async def unread_sweep_repos(self, *, limit: int) -> list[tuple[str, int]]: ...
    async def add_sweep(
        self, sweep: Sweep, runs: Sequence[SweepRun], at: datetime, *, keep_events: int
    ) -> list[EventRecord]: ...
    async def get_sweep(self, sweep_id: str) -> Sweep | None: ...
    async def list_sweeps(
        self, *, state: str | None, before: str | None, limit: int
    ) -> list[Sweep]: ...
    async def live_sweeps(self) -> list[Sweep]: ...
    async def rollout_sweeps(self, rollout_id: str) -> list[Sweep]: ...
    async def sweep_runs(self, sweep_id: str) -> list[SweepRun]: ...
    async def sweep_run_by_run_id(self, run_id: int) -> SweepRun | None: ...
    async def unmatched_sweep_runs(self, repo: str) -> list[SweepRun]: ...
    async def sweep_runs_in_flight(self) -> int: ...
    async def update_sweep_run(
        self,
        sweep_id: str,
        repo: str,
        changes: Mapping[str, Any],
        *,
        states: Sequence[str] = (),
        effects: Sequence[NewEffect] = (),
        at: datetime,
    ) -> bool: ...
    async def finish_sweep(
        self,
        sweep_id: str,
        state: str,
        at: datetime,
        *,
        keep_events: int,
        data: Mapping[str, Any],
        effects: Sequence[NewEffect] = (),
    ) -> list[EventRecord]: ...
    async def next_sweep_deadline(self) -> datetime | None: ...

    # GitHub App installations
    async def replace_installations(
        self, installations: Sequence[Installation], at: datetime
    ) -> None: ...
    async def save_installation(self, installation: Installation, at: datetime) -> None: ...
    async def delete_installation(self, installation_id: int) -> bool: ...
    async def set_installation_suspended(
        self, installation_id: int, suspended: bool, at: datetime
    ) -> bool: ...
    async def add_repositories(
        self, installation_id: int, repositories: Sequence[Repository]
    ) -> None: ...
    async def remove_repositories(self, installation_id: int, repo_ids: Sequence[int]) -> None: ...
    async def list_installations(self) -> list[Installation]: ...
    async def installation_for_repository(self, full_name: str) -> Installation | None: ...
    async def repository_id(self, full_name: str) -> int | None: ...

    # Webhook deliveries
    async def add_delivery(self, delivery: Delivery) -> bool: ...
    async def due_deliveries(self, now: datetime, *, limit: int) -> list[Delivery]: ...
    async def next_delivery_due(self) -> datetime | None: ...
    async def finish_delivery(
        self, delivery_id: str, at: datetime, effects: Sequence[NewEffect] = ()
    ) -> None: ...
    async def fail_delivery(
        self, delivery_id: str, error: str, *, retry_at: datetime | None, at: datetime
    ) -> None: ...
    async def requeue_delivery(self, delivery_id: str, at: datetime) -> Delivery | None: ...
    async def list_deliveries(
        self, *, status: str | None, before: str | None, limit: int
    ) -> list[Delivery]: ...
    async def prune_deliveries(
        self, older_than: datetime, *, payloads_before: datetime | None = None
    ) -> int:
        """Forget processed deliveries received before ``older_than``, and the payloads of
        those processed before ``payloads_before``; how many were forgotten."""
        ...

    async def claim_comment(self, comment_id: int, delivery_id: str, at: datetime) -> str:
        """Record ``delivery_id`` as the delivery acting on the comment's commands,
        unless one is already; the delivery that is."""
        ...

    async def delivery_counts(self) -> dict[str, int]: ...
    async def stored_delivery_ids(self, delivery_ids: Sequence[str]) -> set[str]: ...

    # Outbox
    async def add_effects(self, effects: Sequence[NewEffect], at: datetime) -> None: ...
    async def due_effects(
        self, now: datetime, *, limit: int, skip_installations: Sequence[int] = ()
    ) -> list[Effect]: ...
    async def next_effect_due(
        self, *, skip_installations: Sequence[int] = ()
    ) -> datetime | None: ...
    async def start_effect(self, effect_id: int, at: datetime) -> Effect | None: ...
    async def finish_effect(
        self, effect: Effect, result: Mapping[str, Any] | None, at: datetime
    ) -> bool: ...
    async def fail_effect(
        self, effect_id: int, error: str, *, retry_at: datetime | None, at: datetime
    ) -> None: ...
    async def effect_result(self, target: str, kind: str) -> Mapping[str, Any] | None: ...
    async def replaceable_payload(
        self, replace_keys: Sequence[str]
    ) -> Mapping[str, Any] | None: ...
    async def effect_exists(self, target: str, kind: str) -> bool: ...
    async def outbox_stats(self) -> OutboxStats: ...
    async def list_effects(
        self, *, status: str | None, limit: int, before_id: int | None = None
    ) -> list[Effect]: ...
    async def retry_effect(self, effect_id: int, at: datetime) -> Effect | None: ...
    async def prune_effects(self, older_than: datetime) -> int: ...
