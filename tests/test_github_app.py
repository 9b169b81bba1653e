"""Wiring the App into the service: with credentials, without them, with a bad key."""

from __future__ import annotations

import logging

import pytest

from app.config import ConfigError, Secret, Settings
from app.github.app import GitHubApp
from app.github.installations import InstallationRegistry
from app.server import github_components
from tests.conftest import MakeApi


def test_without_credentials_github_is_off_and_the_log_says_so_once(
    settings: Settings, clock, caplog
):
    with caplog.at_level(logging.INFO, logger="update_pipeline.github"):
        assert GitHubApp.from_settings(settings, clock) is None
    said = [r for r in caplog.records if "not configured" in r.getMessage()]
    assert len(said) == 1


def test_a_malformed_private_key_is_a_clear_start_up_error(settings: Settings, clock):
    broken = settings.replace(github_app_id=7, github_private_key=Secret("-----BEGIN nonsense"))
    with pytest.raises(ConfigError, match=r"GITHUB_PRIVATE_KEY\(_PATH\): not a PEM private key"):
        GitHubApp.from_settings(broken, clock)


async def test_the_log_names_the_key_by_fingerprint_only(github_settings, github, clock, caplog):
    with caplog.at_level(logging.INFO, logger="update_pipeline.github"):
        app = GitHubApp.from_settings(github_settings, clock)
    assert app is not None
    try:
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert app.key.fingerprint in text
        assert "PRIVATE KEY" not in text
    finally:
        await app.close()


async def test_status_reports_the_github_connection(make_api: MakeApi, github_settings, github):
    github.add_installation(account="acme", repos=["acme/runner"])
    api = await make_api(settings_override=github_settings, with_github=True)
    viewer = await api.token("viewer")
    assert api.services.github is not None
    registry = InstallationRegistry(api.services.store, api.services.github, api.services.clock)
    await registry.reconcile()
    _, body = await api.get("/status", token=viewer)
    assert body["github"] == "ok"


async def test_without_credentials_only_the_webhook_worker_runs(make_api: MakeApi):
    api = await make_api()
    assert [c.name for c in github_components(api.services)] == ["webhooks"]


async def test_with_credentials_installations_are_kept_in_sync_and_the_outbox_applied(
    make_api: MakeApi, github_settings, github
):
    api = await make_api(settings_override=github_settings, with_github=True)
    assert [c.name for c in github_components(api.services)] == [
        "installations",
        "missed-deliveries",
        "outbox",
        "sweeps",
        "webhooks",
    ]
