"""Against the real world: the npm registry this host's npm is configured with.

Not run by default (it needs the network); run it with ``pytest -m live``.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from datetime import timedelta

import aiohttp
import pytest

from app.clock import Clock
from app.config import Settings
from app.pipeline.events import EventBus
from app.pipeline.version.providers import BUILTIN_PROVIDERS
from app.pipeline.version.semver import newest
from app.pipeline.version.sources import upstream_sources
from app.pipeline.version.watcher import VersionWatcher
from app.store import SqliteStore

pytestmark = pytest.mark.live


def npm_view_version(package: str) -> str:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed")
    done = subprocess.run(
        [npm, "view", package, "version"], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


async def test_the_newest_stable_versions_are_what_npm_view_prints(store: SqliteStore) -> None:
    clock = Clock()
    async with aiohttp.ClientSession() as session:
        settings = Settings()
        sources = await upstream_sources(settings, session, github=None, store=store)
        if len(sources) < len(BUILTIN_PROVIDERS):
            pytest.skip("npm's configuration names no registry on this host")
        watcher = VersionWatcher(
            store,
            EventBus(store, clock),
            clock,
            [p.id for p in BUILTIN_PROVIDERS],
            sources,
            interval=timedelta(minutes=5),
            polling=False,
            rng=random.Random(),
        )
        report = await watcher.check()
    assert [o.outcome for o in report.outcomes] == ["new"] * len(BUILTIN_PROVIDERS), report
    status = await store.status_counts([p.id for p in BUILTIN_PROVIDERS])

    for provider in BUILTIN_PROVIDERS:
        assert provider.npm_package is not None
        expected = npm_view_version(provider.npm_package)
        assert newest(status.versions[provider.id], stable=True) == expected, provider.id
