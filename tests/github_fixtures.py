"""Fixtures for the fake GitHub, and the check that no test sent GitHub a request it would
refuse: a conformance violation fails the test that made it, and the session as a whole.

Registered from tests/conftest.py with ``pytest_plugins = ["tests.github_fixtures"]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from app.clock import ManualClock
from app.config import Secret, Settings
from tests import fake_github
from tests.fake_github import FakeGitHub

WEBHOOK_SECRET = "test-secret"

# Violations already reported by a test, so the session check can name them again.
_reported: list[str] = []


@pytest.fixture
async def github(clock: ManualClock) -> AsyncIterator[FakeGitHub]:
    """A started fake GitHub on the test's clock (JWTs and token expiry follow it)."""
    async with FakeGitHub(clock) as fake:
        yield fake


@pytest.fixture
def github_settings(settings: Settings, github: FakeGitHub) -> Settings:
    """The test's settings, with the App's credentials pointing at the fake."""
    return settings.replace(
        github_app_id=github.app_id,
        github_private_key=Secret(github.private_key_pem),
        github_api_url=github.url,
        github_webhook_secret=Secret(WEBHOOK_SECRET),
    )


def _collect() -> list[str]:
    """Take the violations of every fake made so far; forget the fakes that are closed."""
    found: list[str] = []
    for fake in list(fake_github.LIVE):
        found += fake.violations
        fake.violations.clear()
        if fake.closed:
            fake_github.LIVE.remove(fake)
    return found


def _report(problems: list[str], where: str) -> str:
    listed = "\n".join(f"  - {p}" for p in problems)
    return (
        f"{len(problems)} request(s) to the fake GitHub {where} would be refused by GitHub"
        f" (checked against ../shared/conformance/github-rest-subset.json):\n{listed}\n"
        "A test that sends a bad request on purpose wraps it in `with"
        " github.expect_violations():`."
    )


@pytest.fixture(autouse=True)
def _github_conformance() -> Iterator[None]:
    """Fail the test (at teardown, after its fakes are closed) that made a bad request."""
    yield
    problems = _collect()
    if problems:
        _reported.extend(problems)
        pytest.fail(_report(problems, "in this test"), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _github_conformance_session() -> Iterator[None]:
    """Zero violations in the whole session, or the run fails (belt and braces for fakes
    outliving a test, and a summary of every test's violations at the end)."""
    yield
    problems = _reported + _collect()
    if problems:
        pytest.fail(_report(problems, "in this session"), pytrace=False)
