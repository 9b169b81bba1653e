"""Versioned schema migrations. Append only: a released migration is never edited."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        """
        -- Design section 5.2: RuntimeVersion.
        CREATE TABLE runtime_versions (
            id               TEXT PRIMARY KEY,
            provider_id      TEXT NOT NULL,
            version          TEXT NOT NULL,
            released_at      TEXT NOT NULL,
            source_url       TEXT,
            canary_passed    INTEGER NOT NULL DEFAULT 0 CHECK (canary_passed IN (0, 1)),
            canary_passed_at TEXT,
            created_at       TEXT NOT NULL,
            UNIQUE (provider_id, version)
        );
        CREATE INDEX runtime_versions_provider ON runtime_versions (provider_id);

        -- Design section 5.2: RunnerBuild. JSON columns hold objects and lists.
        CREATE TABLE runner_builds (
            id               TEXT PRIMARY KEY,
            build_id         TEXT NOT NULL UNIQUE,
            runner_version   TEXT NOT NULL,
            built_at         TEXT NOT NULL,
            runtime_versions TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(runtime_versions)),
            known_good_for   TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(known_good_for)),
            created_at       TEXT NOT NULL
        );

        -- Design section 5.2: ActiveRollout.
        CREATE TABLE active_rollouts (
            id                 TEXT PRIMARY KEY,
            rollout_id         TEXT NOT NULL UNIQUE,
            target_build_id    TEXT NOT NULL REFERENCES runner_builds (build_id),
            channel            TEXT NOT NULL,
            state              TEXT NOT NULL CHECK (state IN
                ('pending', 'rolling_out', 'paused', 'completed', 'rolled_back')),
            current_percentage INTEGER NOT NULL DEFAULT 0
                CHECK (current_percentage BETWEEN 0 AND 100),
            started_at         TEXT NOT NULL,
            last_updated_at    TEXT NOT NULL,
            affected_org_ids   TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(affected_org_ids)),
            error              TEXT,
            created_at         TEXT NOT NULL
        );
        CREATE INDEX active_rollouts_channel ON active_rollouts (channel);
        CREATE INDEX active_rollouts_state ON active_rollouts (state);

        -- The known-good registry's recommendation per channel (stable, beta).
        CREATE TABLE recommended_builds (
            channel    TEXT PRIMARY KEY,
            build_id   TEXT NOT NULL REFERENCES runner_builds (build_id),
            updated_at TEXT NOT NULL
        );

        -- One canary run per build; later migrations add what the canary records.
        CREATE TABLE canary_runs (
            id           TEXT PRIMARY KEY,
            build_id     TEXT NOT NULL REFERENCES runner_builds (build_id),
            state        TEXT NOT NULL CHECK (state IN
                ('pending', 'running', 'passed', 'failed', 'errored')),
            started_at   TEXT,
            completed_at TEXT,
            created_at   TEXT NOT NULL
        );
        CREATE INDEX canary_runs_state ON canary_runs (state);

        -- Post-update sweeps; later migrations add their per-repository runs.
        CREATE TABLE sweeps (
            id           TEXT PRIMARY KEY,
            state        TEXT NOT NULL CHECK (state IN
                ('pending', 'running', 'completed', 'failed', 'cancelled')),
            created_at   TEXT NOT NULL,
            completed_at TEXT
        );
        CREATE INDEX sweeps_state ON sweeps (state);

        -- API tokens: only the SHA-256 of the secret is kept.
        CREATE TABLE api_tokens (
            id           INTEGER PRIMARY KEY,
            name         TEXT NOT NULL,
            token_hash   TEXT NOT NULL UNIQUE,
            role         TEXT NOT NULL CHECK (role IN ('admin', 'viewer', 'runner')),
            org_id       TEXT,
            created_at   TEXT NOT NULL,
            expires_at   TEXT,
            last_used_at TEXT,
            revoked_at   TEXT
        );
        -- A name belongs to one live token; revoked ones stay for the audit trail.
        CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;

        -- The event log (design section 5.1), pruned to the newest entries.
        CREATE TABLE events (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            type       TEXT NOT NULL,
            created_at TEXT NOT NULL,
            data       TEXT NOT NULL CHECK (json_valid(data))
        );
        CREATE INDEX events_type ON events (type, id);
        """,
    ),
)

MIGRATIONS += (
    Migration(
        2,
        "GitHub App installations",
        """
        -- Where the App is installed, kept current from webhooks and periodic reconciling.
        CREATE TABLE installations (
            id            INTEGER PRIMARY KEY,
            account_login TEXT NOT NULL,
            account_type  TEXT NOT NULL,
            suspended     INTEGER NOT NULL DEFAULT 0 CHECK (suspended IN (0, 1)),
            updated_at    TEXT NOT NULL
        );
        CREATE INDEX installations_account ON installations (account_login);

        CREATE TABLE installation_repositories (
            installation_id INTEGER NOT NULL REFERENCES installations (id) ON DELETE CASCADE,
            repo_id         INTEGER NOT NULL,
            full_name       TEXT NOT NULL,
            PRIMARY KEY (installation_id, repo_id)
        );
        CREATE INDEX installation_repositories_name
            ON installation_repositories (full_name COLLATE NOCASE);
        """,
    ),
)

MIGRATIONS += (
    Migration(
        3,
        "webhook deliveries",
        """
        -- Verified webhook deliveries, stored before they are acknowledged, processed by a
        -- background worker. The delivery id makes a redelivery a no-op.
        CREATE TABLE webhook_deliveries (
            delivery_id     TEXT PRIMARY KEY,
            event           TEXT NOT NULL,
            action          TEXT,
            installation_id INTEGER,
            payload         TEXT NOT NULL,
            status          TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'done', 'failed')),
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT NOT NULL,
            last_error      TEXT,
            received_at     TEXT NOT NULL,
            finished_at     TEXT
        );
        CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
        CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);
        """,
    ),
)

MIGRATIONS += (
    Migration(
        4,
        "outbox",
        """
        -- GitHub side effects, written in the same transaction as the change they follow
        -- and applied by a worker. Entries with the same target apply one at a time, in
        -- id order. A pending entry with a replace key is overwritten by a newer one with
        -- the same key (revision counts the overwrites, so an entry being applied while it
        -- is overwritten is applied again rather than marked done).
        CREATE TABLE outbox (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            installation_id INTEGER NOT NULL,
            target          TEXT NOT NULL,
            kind            TEXT NOT NULL,
            payload         TEXT NOT NULL CHECK (json_valid(payload)),
            replace_key     TEXT,
            revision        INTEGER NOT NULL DEFAULT 0,
            status          TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'done', 'failed')),
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT NOT NULL,
            last_error      TEXT,
            result          TEXT CHECK (result IS NULL OR json_valid(result)),
            created_at      TEXT NOT NULL,
            finished_at     TEXT
        );
        CREATE INDEX outbox_queue ON outbox (status, target, id);
        CREATE UNIQUE INDEX outbox_pending_replace_key ON outbox (replace_key)
            WHERE status = 'pending' AND replace_key IS NOT NULL;
        CREATE INDEX outbox_finished ON outbox (finished_at) WHERE status != 'pending';
        """,
    ),
)

MIGRATIONS += (
    Migration(
        5,
        "version discovery",
        """
        -- Where a version was first seen (npm, github, heartbeat); whether it is a
        -- prerelease (a beta candidate); when new_version_detected was emitted for it
        -- (NULL while only runners have reported it); and when it was handed to the
        -- canary (NULL until it was, or while it is younger than the minimum age).
        -- Versions recorded by the first check of a provider are its history: they
        -- are recorded without an event and never handed to the canary (baseline).
        ALTER TABLE runtime_versions ADD COLUMN source TEXT NOT NULL DEFAULT 'npm';
        ALTER TABLE runtime_versions ADD COLUMN prerelease INTEGER NOT NULL DEFAULT 0
            CHECK (prerelease IN (0, 1));
        ALTER TABLE runtime_versions ADD COLUMN announced_at TEXT;
        ALTER TABLE runtime_versions ADD COLUMN handed_to_canary_at TEXT;
        ALTER TABLE runtime_versions ADD COLUMN baseline INTEGER NOT NULL DEFAULT 0
            CHECK (baseline IN (0, 1));
        UPDATE runtime_versions SET announced_at = created_at, baseline = 1;
        CREATE INDEX runtime_versions_listed ON runtime_versions (released_at, id);
        CREATE INDEX runtime_versions_canary_queue ON runtime_versions (released_at)
            WHERE announced_at IS NOT NULL AND handed_to_canary_at IS NULL AND baseline = 0;
        """,
    ),
)

MIGRATIONS += (
    Migration(
        6,
        "canary runs and channels",
        """
        -- Where a build was made from (a commit of the runner repository, when known).
        ALTER TABLE runner_builds ADD COLUMN repository TEXT;
        ALTER TABLE runner_builds ADD COLUMN commit_sha TEXT;
        CREATE INDEX runner_builds_listed ON runner_builds (created_at, build_id);

        -- A build's canary runs (attempt 1, then re-runs): the deadline for results,
        -- which survives restarts; the metrics, per provider too; the posted results.
        ALTER TABLE canary_runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE canary_runs ADD COLUMN deadline_at TEXT;
        ALTER TABLE canary_runs ADD COLUMN metrics TEXT;
        ALTER TABLE canary_runs ADD COLUMN results TEXT;
        ALTER TABLE canary_runs ADD COLUMN error TEXT;
        ALTER TABLE canary_runs ADD COLUMN workflow_run_id TEXT;
        ALTER TABLE canary_runs ADD COLUMN reported_by TEXT;
        CREATE UNIQUE INDEX canary_runs_attempt ON canary_runs (build_id, attempt);
        CREATE INDEX canary_runs_deadline ON canary_runs (deadline_at)
            WHERE state IN ('pending', 'running');

        -- Why a channel recommends its build, and who (or which rollout) said so.
        ALTER TABLE recommended_builds ADD COLUMN reason TEXT;
        ALTER TABLE recommended_builds ADD COLUMN set_by TEXT;
        """,
    ),
)

MIGRATIONS += (
    Migration(
        7,
        "canaries on GitHub",
        """
        -- Where a run's workflow is dispatched (a branch of the runner repository), the
        -- keys its check run and dispatch are found again by, and the dispatched run.
        ALTER TABLE canary_runs ADD COLUMN ref TEXT;
        ALTER TABLE canary_runs ADD COLUMN check_key TEXT;
        ALTER TABLE canary_runs ADD COLUMN dispatch_key TEXT;
        CREATE INDEX canary_runs_workflow_run ON canary_runs (workflow_run_id)
            WHERE workflow_run_id IS NOT NULL;
        CREATE INDEX canary_runs_dispatch_key ON canary_runs (dispatch_key)
            WHERE dispatch_key IS NOT NULL;

        -- The runtime manifest a build was read from, to point at its lines.
        ALTER TABLE runner_builds ADD COLUMN manifest TEXT;

        -- The build a pull request of the runner repository currently carries, so a new
        -- head can supersede it.
        CREATE TABLE pull_request_builds (
            repository TEXT NOT NULL,
            number     INTEGER NOT NULL,
            build_id   TEXT NOT NULL REFERENCES runner_builds (build_id),
            head_sha   TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (repository, number)
        );
        """,
    ),
)

MIGRATIONS += (
    Migration(
        8,
        "fleet",
        """
        -- Customer organisations: their channel, pins, and whether rollouts need their
        -- approval. Created on an org's first heartbeat.
        CREATE TABLE orgs (
            org_id            TEXT PRIMARY KEY,
            channel           TEXT NOT NULL DEFAULT 'stable' CHECK (channel IN ('stable', 'beta')),
            pinned_build_id   TEXT REFERENCES runner_builds (build_id),
            version_pins      TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(version_pins)),
            approval_required INTEGER NOT NULL DEFAULT 0 CHECK (approval_required IN (0, 1)),
            created_at        TEXT NOT NULL,
            updated_at        TEXT NOT NULL
        );
        CREATE INDEX orgs_channel ON orgs (channel);

        -- Each runner's last heartbeat: the counters of its current boot, so the next
        -- heartbeat counts only what is new.
        CREATE TABLE runners (
            runner_id    TEXT PRIMARY KEY,
            org_id       TEXT NOT NULL,
            boot_id      TEXT NOT NULL,
            build_id     TEXT,
            runtimes     TEXT NOT NULL DEFAULT '{}',
            started      INTEGER NOT NULL,
            failed       INTEGER NOT NULL,
            disconnected INTEGER NOT NULL,
            last_seen_at TEXT NOT NULL
        );
        CREATE INDEX runners_org ON runners (org_id);
        CREATE INDEX runners_build ON runners (build_id);

        -- Sessions counted from heartbeats, per rollout stage, org, build and hour of
        -- receipt ('' and -1 outside any rollout); pruned after the retention period.
        CREATE TABLE session_counts (
            rollout_id   TEXT NOT NULL DEFAULT '',
            stage        INTEGER NOT NULL DEFAULT -1,
            org_id       TEXT NOT NULL,
            build_id     TEXT NOT NULL,
            hour         TEXT NOT NULL,
            started      INTEGER NOT NULL DEFAULT 0,
            failed       INTEGER NOT NULL DEFAULT 0,
            disconnected INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (rollout_id, stage, org_id, build_id, hour)
        );
        CREATE INDEX session_counts_hour ON session_counts (hour);
        """,
    ),
)

MIGRATIONS += (
    Migration(
        9,
        "runners per org",
        """
        -- A runner id is unique within its org, not across the fleet: two orgs may both
        -- have a runner-1, and neither's heartbeats may touch the other's counters.
        CREATE TABLE runners_by_org (
            org_id       TEXT NOT NULL,
            runner_id    TEXT NOT NULL,
            boot_id      TEXT NOT NULL,
            build_id     TEXT,
            runtimes     TEXT NOT NULL DEFAULT '{}',
            started      INTEGER NOT NULL,
            failed       INTEGER NOT NULL,
            disconnected INTEGER NOT NULL,
            last_seen_at TEXT NOT NULL,
            PRIMARY KEY (org_id, runner_id)
        );
        INSERT INTO runners_by_org SELECT org_id, runner_id, boot_id, build_id, runtimes,
            started, failed, disconnected, last_seen_at FROM runners;
        DROP TABLE runners;
        ALTER TABLE runners_by_org RENAME TO runners;
        CREATE INDEX runners_build ON runners (build_id);
        CREATE INDEX runners_last_seen ON runners (last_seen_at);
        """,
    ),
)

MIGRATIONS += (
    Migration(
        10,
        "rollouts",
        """
        -- A rollout's progress, kept so a restart resumes it exactly: the stage plan it
        -- started with, the current stage, when that stage started and when its watch
        -- ends (no deadline while paused, with what was left of it kept aside, and
        -- none at the last stage). Percentages may be fractional (0.5%).
        ALTER TABLE active_rollouts ADD COLUMN plan TEXT NOT NULL DEFAULT '';
        ALTER TABLE active_rollouts ADD COLUMN stage INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE active_rollouts ADD COLUMN stage_started_at TEXT;
        ALTER TABLE active_rollouts ADD COLUMN deadline_at TEXT;
        ALTER TABLE active_rollouts ADD COLUMN paused_at TEXT;
        ALTER TABLE active_rollouts ADD COLUMN remaining_seconds REAL;
        -- The channel's recommended build when the rollout started (the baseline), and
        -- the one its completion replaced (restored by a rollback after completion).
        ALTER TABLE active_rollouts ADD COLUMN previous_build_id TEXT;
        ALTER TABLE active_rollouts ADD COLUMN replaced_build_id TEXT;
        ALTER TABLE active_rollouts ADD COLUMN started_by TEXT NOT NULL DEFAULT '';
        ALTER TABLE active_rollouts ADD COLUMN forced_reason TEXT;
        ALTER TABLE active_rollouts ADD COLUMN finished_at TEXT;
        ALTER TABLE active_rollouts ADD COLUMN rollback TEXT
            CHECK (rollback IS NULL OR json_valid(rollback));
        -- Bumped by every change: a change made from a stale read is refused.
        ALTER TABLE active_rollouts ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
        CREATE UNIQUE INDEX active_rollouts_one_per_channel ON active_rollouts (channel)
            WHERE state IN ('pending', 'rolling_out', 'paused');

        -- Each org a rollout included: when, at which stage, and the build it ran
        -- before (restored by a rollback).
        CREATE TABLE rollout_orgs (
            rollout_id        TEXT NOT NULL REFERENCES active_rollouts (rollout_id),
            org_id            TEXT NOT NULL,
            stage             INTEGER NOT NULL,
            included_at       TEXT NOT NULL,
            previous_build_id TEXT,
            PRIMARY KEY (rollout_id, org_id)
        );
        CREATE INDEX rollout_orgs_org ON rollout_orgs (org_id, included_at);

        -- Enterprise orgs' decisions on a rollout; a rollback after completion voids them.
        CREATE TABLE rollout_approvals (
            rollout_id TEXT NOT NULL REFERENCES active_rollouts (rollout_id),
            org_id     TEXT NOT NULL,
            decision   TEXT NOT NULL CHECK (decision IN ('approved', 'skipped')),
            decided_by TEXT NOT NULL,
            decided_at TEXT NOT NULL,
            voided_at  TEXT,
            PRIMARY KEY (rollout_id, org_id)
        );

        -- Every transition and command: who, when, from which state to which.
        CREATE TABLE rollout_history (
            id         INTEGER PRIMARY KEY,
            rollout_id TEXT NOT NULL REFERENCES active_rollouts (rollout_id),
            at         TEXT NOT NULL,
            actor      TEXT NOT NULL,
            action     TEXT NOT NULL,
            from_state TEXT,
            to_state   TEXT NOT NULL,
            stage      INTEGER NOT NULL,
            percentage REAL NOT NULL,
            reason     TEXT,
            details    TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(details))
        );
        CREATE INDEX rollout_history_rollout ON rollout_history (rollout_id, id);

        -- The global freeze: while this row exists no rollout starts or advances.
        CREATE TABLE freeze (
            id        INTEGER PRIMARY KEY CHECK (id = 1),
            reason    TEXT NOT NULL,
            frozen_by TEXT NOT NULL,
            frozen_at TEXT NOT NULL
        );
        """,
    ),
)

MIGRATIONS += (
    Migration(
        11,
        "rollout tracking issues",
        """
        -- The GitHub issue that tracks a rollout: the key its hidden marker carries (a
        -- new key when the issue is recreated) and, once GitHub has made it, its number.
        CREATE TABLE tracking_issues (
            rollout_id      TEXT PRIMARY KEY REFERENCES active_rollouts (rollout_id),
            repo            TEXT NOT NULL,
            installation_id INTEGER NOT NULL,
            issue_key       TEXT NOT NULL,
            issue_number    INTEGER,
            created_at      TEXT NOT NULL
        );
        CREATE INDEX tracking_issues_number ON tracking_issues (repo, issue_number);

        -- Commands acted on, by a key of their source (a comment and the command's place
        -- in it), written with the change they made: a delivery processed again after a
        -- crash finds its command done and does not act twice.
        CREATE TABLE rollout_commands (
            key        TEXT PRIMARY KEY,
            rollout_id TEXT NOT NULL,
            at         TEXT NOT NULL
        );

        -- A rolled-back rollout keeps sending its orgs back to their previous builds
        -- until its channel's recommendation is set again, which sets this.
        ALTER TABLE active_rollouts ADD COLUMN restore_ended INTEGER NOT NULL DEFAULT 0;
        """,
    ),
)

MIGRATIONS += (
    Migration(
        12,
        "sweeps",
        """
        -- What a sweep sweeps for: a provider's version, or a build's versions, and the
        -- rollout it belongs to, if any.
        ALTER TABLE sweeps ADD COLUMN provider TEXT;
        ALTER TABLE sweeps ADD COLUMN version TEXT;
        ALTER TABLE sweeps ADD COLUMN build_id TEXT;
        ALTER TABLE sweeps ADD COLUMN rollout_id TEXT;
        ALTER TABLE sweeps ADD COLUMN started_by TEXT NOT NULL DEFAULT '';
        ALTER TABLE sweeps ADD COLUMN updated_at TEXT;
        CREATE INDEX sweeps_created ON sweeps (created_at);

        -- Each repository where the App is installed, as far as sweeps go: whether its
        -- .github/update-pipeline.yml opts in (the config as JSON), is absent, or is
        -- misconfigured (why), and whether an admin excluded it.
        CREATE TABLE sweep_repos (
            repo            TEXT PRIMARY KEY,
            installation_id INTEGER NOT NULL,
            state           TEXT NOT NULL CHECK (state IN
                ('unread', 'opted_in', 'absent', 'misconfigured', 'unreadable')),
            config          TEXT CHECK (config IS NULL OR json_valid(config)),
            error           TEXT,
            read_at         TEXT,
            excluded_at     TEXT,
            excluded_by     TEXT,
            last_sweep_id   TEXT,
            last_conclusion TEXT
        );

        -- One row per repository a sweep dispatches to, from waiting to a final state.
        CREATE TABLE sweep_runs (
            sweep_id        TEXT NOT NULL REFERENCES sweeps (id),
            repo            TEXT NOT NULL,
            installation_id INTEGER NOT NULL,
            workflow        TEXT NOT NULL,
            ref             TEXT NOT NULL,
            inputs          TEXT NOT NULL CHECK (json_valid(inputs)),
            state           TEXT NOT NULL CHECK (state IN ('waiting', 'dispatching', 'queued',
                'in_progress', 'completed', 'failed', 'timed_out')),
            run_id          INTEGER,
            run_attempt     INTEGER,
            run_url         TEXT,
            conclusion      TEXT,
            error           TEXT,
            results         TEXT CHECK (results IS NULL OR json_valid(results)),
            dispatched_at   TEXT,
            deadline_at     TEXT,
            finished_at     TEXT,
            updated_at      TEXT NOT NULL,
            PRIMARY KEY (sweep_id, repo)
        );
        CREATE INDEX sweep_runs_run ON sweep_runs (run_id) WHERE run_id IS NOT NULL;
        CREATE INDEX sweep_runs_state ON sweep_runs (state);
        """,
    ),
    Migration(
        13,
        "the delivery that acted on each comment's slash commands; indexes to prune deliveries",
        """
        -- Only a delivery's body is signed, so an old comment can arrive again under a
        -- new delivery id; its commands are acted on by the first delivery only.
        CREATE TABLE comment_commands (
            comment_id  INTEGER PRIMARY KEY,
            delivery_id TEXT NOT NULL,
            at          TEXT NOT NULL
        );
        CREATE INDEX comment_commands_at ON comment_commands (at);

        -- The daily dropping of processed deliveries' payloads, which a month of
        -- deliveries would otherwise make a scan of the whole table under the write lock
        -- (their age has its index since migration 3).
        CREATE INDEX webhook_deliveries_payload ON webhook_deliveries (finished_at)
            WHERE status = 'done' AND payload != '{}';
        """,
    ),
    Migration(
        14,
        "dashboard sign-in sessions",
        """
        -- A signed-in dashboard browser. Only the SHA-256 of the random session id the
        -- cookie carries is kept, so a copy of the database signs no one in. A session
        -- made from an API token ends with that token (revoked, expired).
        CREATE TABLE dashboard_sessions (
            id_hash    TEXT PRIMARY KEY,
            kind       TEXT NOT NULL CHECK (kind IN ('github', 'token')),
            login      TEXT NOT NULL,
            level      TEXT NOT NULL,
            token_id   INTEGER REFERENCES api_tokens (id),
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL
        );
        CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);
        """,
    ),
)

LATEST_SCHEMA = MIGRATIONS[-1].version
