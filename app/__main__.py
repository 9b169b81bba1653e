"""The update-pipeline command: serve, migrate, manage API tokens, simulate a fleet, back
up the database, and register the GitHub App."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from app import __version__, backup
from app.auth import Role, TokenService, TokenSpec, TokenSpecError, token_state
from app.clock import Clock, isoformat
from app.config import DURATION_HELP, ConfigError, Settings, parse_duration, parse_port
from app.fleet.simulator import add_arguments as add_simulate_arguments
from app.github.manifest import add_arguments as add_setup_arguments
from app.logs import configure
from app.store import Conflict, InstanceLock, SqliteStore, StoreError, TokenRecord
from app.store.migrations import LATEST_SCHEMA

PROG = "update-pipeline"


class CommandError(Exception):
    """A one-line message for the operator; the command exits 1."""


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    try:
        return parse_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Watch runtime versions, canary runner builds and roll them out safely.",
        epilog="Settings come from the environment (see docs/configuration.md); "
        "flags override them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db_help = "SQLite database file (default: $UPDATE_PIPELINE_DB or ./update-pipeline.db)"

    serve = commands.add_parser("serve", help="run the HTTP service (and the pipeline if enabled)")
    serve.add_argument(
        "--host", help="address to listen on (default: $UPDATE_PIPELINE_HOST or 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=_port,
        help="port to listen on (default: $UPDATE_PIPELINE_PORT or 8080; 0 picks a free one)",
    )
    serve.add_argument("--db", type=Path, help=db_help)

    migrate = commands.add_parser("migrate", help="create or upgrade the database schema")
    migrate.add_argument("--db", type=Path, help=db_help)

    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    create = token_commands.add_parser(
        "create", help="issue a token; the secret is printed once, alone on the last line"
    )
    create.add_argument("--name", required=True, help="unique name, e.g. ci-deployer")
    create.add_argument(
        "--role",
        required=True,
        choices=[r.value for r in Role],
        help="admin: everything; viewer: reads; runner: heartbeats for one org",
    )
    create.add_argument(
        "--org",
        dest="org_id",
        metavar="ORG_ID",
        help="organisation a runner token reports for (runner tokens only)",
    )
    create.add_argument(
        "--expires",
        type=_duration,
        metavar="DURATION",
        help=f"lifetime, {DURATION_HELP} (default: never)",
    )
    create.add_argument("--db", type=Path, help=db_help)

    listing = token_commands.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    listing.add_argument("--db", type=Path, help=db_help)

    revoke = token_commands.add_parser("revoke", help="revoke the live token with this name")
    revoke.add_argument("name")
    revoke.add_argument("--db", type=Path, help=db_help)

    simulate = commands.add_parser(
        "simulate",
        help="play a fleet of runners sending heartbeats to a running service",
        description="Play N runners sending heartbeats to the service at --url, obeying its "
        "answers (switching builds), with a live progress line on stderr and a summary at "
        "the end. Exits 1 when no heartbeat succeeded.",
    )
    add_simulate_arguments(simulate)

    backup.add_arguments(
        commands.add_parser("backup", help=backup.HELP, description=backup.DESCRIPTION)
    )

    setup = commands.add_parser(
        "setup", help="register the GitHub App from app.yml (GitHub's manifest flow)"
    )
    add_setup_arguments(setup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        configure(settings.log_format, settings.log_level, settings.secrets())
        if args.command == "serve":
            _serve(settings)
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "simulate":
            _simulate(args)
        elif args.command == "backup":
            return backup.run(args, settings)
        elif args.command == "setup":
            from app.github.manifest import run as run_setup

            return run_setup(args)
        else:
            asyncio.run(_token(args, settings))
    # OSError: the database's folder is missing or read-only; the operator needs the
    # reason, not a traceback.
    except (ConfigError, StoreError, CommandError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    overrides = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "db_path": getattr(args, "db", None),
    }
    return settings.replace(**{k: v for k, v in overrides.items() if v is not None})


def _serve(settings: Settings) -> None:
    # Imported here so the token and migrate commands do not pay for loading aiohttp.
    from app.server import ServeError, serve

    try:
        asyncio.run(serve(settings))
    except ServeError as exc:
        raise CommandError(str(exc)) from None


def _simulate(args: argparse.Namespace) -> None:
    # Imported here so the other commands do not pay for loading aiohttp.
    from app.fleet.simulator import SimulatorError, options_from_args, simulate

    try:
        report = asyncio.run(simulate(options_from_args(args)))
    except SimulatorError as exc:
        raise CommandError(str(exc)) from None
    if not report.succeeded:
        raise CommandError("no heartbeat succeeded")


CLI_ACTOR = "command line"


async def _open_store(settings: Settings) -> SqliteStore:
    """Open the database, migrating it only while no server runs on it: a schema change
    under a running (older) server could break it."""
    store = await SqliteStore.open(settings.db_path, migrate=False)
    if await store.schema_version() >= LATEST_SCHEMA:
        return store
    await store.close()
    lock = InstanceLock(settings.db_path)
    try:
        lock.acquire()
    except StoreError as exc:
        raise CommandError(f"{exc}; the schema needs upgrading, which needs it stopped") from None
    try:
        return await SqliteStore.open(settings.db_path)
    finally:
        lock.release()


async def _migrate(settings: Settings) -> None:
    store = await _open_store(settings)
    try:
        version = await store.schema_version()
    finally:
        await store.close()
    print(f"database {settings.db_path} is at schema version {version}")


async def _token(args: argparse.Namespace, settings: Settings) -> None:
    store = await _open_store(settings)
    try:
        clock = Clock()
        service = TokenService(store, clock)
        if args.token_command == "create":
            await _create(service, args)
        elif args.token_command == "list":
            _print_tokens(await service.list(include_revoked=args.all), clock)
        else:
            record = await service.revoke(args.name, by=CLI_ACTOR)
            if record is None:
                raise CommandError(f"no active token named {args.name!r}")
            print(f"revoked token {record.name!r} ({record.role})")
    finally:
        await store.close()


async def _create(service: TokenService, args: argparse.Namespace) -> None:
    spec = TokenSpec(args.name, Role(args.role), args.org_id, args.expires)
    try:
        (issued,) = await service.issue([spec], by=CLI_ACTOR)
    except (TokenSpecError, Conflict) as exc:
        raise CommandError(str(exc)) from None
    record = issued.record
    expires = isoformat(record.expires_at) if record.expires_at else "never"
    org = f", org {record.org_id}" if record.org_id else ""
    print(f"created {record.role} token {record.name!r}{org}, expires {expires}")
    print("store it now: the secret is not shown again")
    print(issued.secret)


def _print_tokens(records: list[TokenRecord], clock: Clock) -> None:
    if not records:
        print("no tokens")
        return
    now = clock.now()
    rows = [("NAME", "ROLE", "ORG", "STATE", "CREATED", "EXPIRES", "LAST USED")]
    for r in records:
        rows.append(
            (
                r.name,
                r.role,
                r.org_id or "-",
                token_state(r, now),
                isoformat(r.created_at)[:19] + "Z",
                isoformat(r.expires_at)[:19] + "Z" if r.expires_at else "never",
                isoformat(r.last_used_at)[:19] + "Z" if r.last_used_at else "never",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
