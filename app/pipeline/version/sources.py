"""The upstream sources of each provider, built from the settings at start."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import aiohttp

from app.config import Settings
from app.github.app import GitHubApp
from app.logs import get_logger
from app.pipeline.version import npm
from app.pipeline.version.github_releases import GitHubReleasesSource
from app.pipeline.version.npmrc import NPM_TIMEOUT, CommandRunner, resolve_registry, run_command
from app.pipeline.version.watcher import Release, Source, SourceError
from app.store import Store

log = get_logger("pipeline.versions")


class NpmVersions:
    """A provider's npm package, as a watcher source."""

    kind = "npm"

    def __init__(self, provider_id: str, source: npm.NpmSource) -> None:
        self.provider_id = provider_id
        self.source = source
        self.key = f"npm:{source.package}"

    async def fetch(self) -> list[Release] | None:
        try:
            found = await self.source.check()
        except npm.SourceError as exc:
            raise SourceError(str(exc), retry_after=exc.retry_after) from None
        if isinstance(found, npm.NotModified):
            return None
        return [
            Release(r.version, r.released_at, r.prerelease, r.source_url) for r in found.releases
        ]


def _once(run: CommandRunner) -> CommandRunner:
    """``npm config get registry`` answers the same for every package: ask it once."""
    answers: dict[tuple[str, ...], str | None] = {}
    lock = threading.Lock()

    def cached(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> str | None:
        key = (*argv, str(cwd))
        with lock:
            if key not in answers:
                answers[key] = run(argv, env, cwd)
            return answers[key]

    return cached


async def upstream_sources(
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    github: GitHubApp | None,
    store: Store,
) -> list[Source]:
    """Every source the providers name. An npm package whose registry cannot be resolved
    from npm's configuration is left out with a warning; so is a GitHub source while the
    App is not configured."""
    sources: list[Source] = []
    run = _once(partial(run_command, timeout=NPM_TIMEOUT))
    for provider in settings.providers:
        if provider.npm_package is not None:
            registry = await asyncio.to_thread(resolve_registry, provider.npm_package, run=run)
            if registry is None:
                log.warning(
                    "no npm registry is configured for %s (npm_config_registry, .npmrc or"
                    " 'npm config get registry'): its npm source is off",
                    provider.npm_package,
                )
            else:
                log.info(
                    "%s: npm package %s on %s",
                    provider.id,
                    provider.npm_package,
                    registry.describe(),
                )
                source = npm.NpmSource(
                    provider.npm_package,
                    registry,
                    session,
                    page_url_template=settings.package_page_url,
                )
                sources.append(NpmVersions(provider.id, source))
        if provider.github_repo is not None:
            if github is None:
                log.warning(
                    "%s: GitHub releases of %s need the GitHub App; that source is off",
                    provider.id,
                    provider.github_repo,
                )
            else:
                sources.append(
                    GitHubReleasesSource(provider.id, provider.github_repo, github, store)
                )
    return sources
