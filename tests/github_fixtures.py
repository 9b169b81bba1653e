"""Fixtures for the fake GitHub, and the check that no test sent GitHub a request it would
refuse: a conformance violation fails the test that made it, and the session as a whole.
At the end of the session, the operations the app made are also checked against the
App's permissions in app.yml (tests/test_manifest.py).

Registered from tests/conftest.py with ``pytest_plugins = ["tests.github_fixtures"]``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from app.clock import ManualClock
from app.config import Secret, Settings
from app.github.app import GitHubApp
from app.github.client import REQUESTER
from app.github.keys import load_private_key
from tests import fake_github
from tests.fake_github import FakeGitHub

WEBHOOK_SECRET = "test-secret"

# Violations already reported by a test, so the session check can name them again.
_reported: list[str] = []
# The operations (conformance keys) the app's own client sent to any fake this session.
# gidgethub sends REQUESTER as the User-Agent; tests that talk to a fake themselves send
# another, so their requests say nothing about what the app needs.
APP_OPERATIONS: set[str] = set()
# Tests left out of this session other than by addopts' `-m 'not live'` (-k, --lf, ...),
# and the files of the live tests it leaves out.
_deselected: list[str] = []
_live_files: set[Path] = set()
# The test files whose tests started, here or (for the controller of pytest -n) in any
# worker, and the workers that reported.
_ran_files: set[Path] = set()
_workers_seen: list[object] = []
_root: list[Path] = [Path.cwd()]


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


class RecordedSleep:
    """The GitHub client's sleep in tests: records each delay and returns at once.
    A test module that needs time to pass overrides the ``github_sleep`` fixture."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def github_sleep() -> RecordedSleep:
    return RecordedSleep()


@pytest.fixture
async def app_github(
    github_settings: Settings, clock: ManualClock, github_sleep: RecordedSleep
) -> AsyncIterator[GitHubApp]:
    """The app's GitHub connection, authenticated against the fake."""
    key = load_private_key(github_settings)
    assert key is not None
    app = GitHubApp(github_settings, key, clock, sleep=github_sleep)
    yield app
    await app.close()


@pytest.fixture
def installation(github: FakeGitHub) -> int:
    """One installation, on the organisation acme, covering acme/runner."""
    installation = github.add_installation(account="acme", repos=["acme/runner"])
    github.repo("acme/runner").topics = ["runner"]
    return installation


def _collect() -> list[str]:
    """Take the violations of every fake made so far; forget the fakes that are closed."""
    found: list[str] = []
    for fake in list(fake_github.LIVE):
        found += fake.violations
        fake.violations.clear()
        APP_OPERATIONS.update(
            r.operation
            for r in fake.requests
            if r.operation is not None and r.headers.get("User-Agent") == REQUESTER
        )
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
def _github_conformance_session(request: pytest.FixtureRequest) -> Iterator[None]:
    """Zero violations in the whole session, or the run fails (belt and braces for fakes
    outliving a test, and a summary of every test's violations at the end). Then the
    App's permissions in app.yml must cover what the app called."""
    yield
    problems = _reported + _collect()
    if problems:
        pytest.fail(_report(problems, "in this session"), pytrace=False)
    config = request.config
    if _is_worker(config):
        # One of several processes (pytest -n): it ran part of the suite, so it checks
        # only that nothing it saw lacks a permission, and hands what it saw to the
        # controller, which checks the whole run (pytest_sessionfinish below).
        output = config.workeroutput  # type: ignore[attr-defined]
        output["app_operations"] = sorted(APP_OPERATIONS)
        output["ran_files"] = sorted(str(f) for f in _ran_files | _live_files)
        output["deselected"] = bool(_deselected)
        _fail_on(_permission_problems(complete=False))
        return
    _fail_on(_permission_problems(complete=_whole_suite(request.session)))


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("live") is None:
            _deselected.append(item.nodeid)
        else:
            _live_files.add(Path(item.path))


def pytest_configure(config: pytest.Config) -> None:
    _root[:] = [config.rootpath]


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    # The location is relative to the root directory.
    _ran_files.add((_root[0] / location[0]).resolve())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """pytest-xdist, in the controller: a worker ended; keep what it saw."""
    output = getattr(node, "workeroutput", {})
    APP_OPERATIONS.update(output.get("app_operations", ()))
    _ran_files.update(Path(f) for f in output.get("ran_files", ()))
    if output.get("deselected"):
        _deselected.append("(in a worker)")
    _workers_seen.append(node)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _is_worker(session.config) or not _workers_seen:
        return  # a single process checked it in the session fixture
    problems = _permission_problems(complete=_whole_suite(session))
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(_permission_report(problems), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _permission_problems(*, complete: bool) -> list[str]:
    """Every operation the app made needs a permission app.yml grants, always. That
    app.yml grants nothing more is checked only when the whole suite ran: after a part
    of it, an unused permission may just belong to the tests left out."""
    # The table of operations and permissions lives with the manifest's own tests.
    from tests.test_manifest import permission_problems

    return permission_problems(APP_OPERATIONS, complete=complete)


def _permission_report(problems: list[str]) -> str:
    listed = "\n".join(f"  - {p}" for p in problems)
    return (
        "app.yml's permissions do not match the GitHub calls the app made in this"
        f" session (see OPERATION_PERMISSIONS in tests/test_manifest.py):\n{listed}"
    )


def _fail_on(problems: list[str]) -> None:
    if problems:
        pytest.fail(_permission_report(problems), pytrace=False)


def _whole_suite(session: pytest.Session) -> bool:
    """Whether every test file ran, nothing was deselected and nothing failed (a failed
    test may have stopped before its calls). CHECK_MANIFEST_COVERAGE=1 (or 0) says so
    instead, for runs this cannot tell apart."""
    forced = os.environ.get("CHECK_MANIFEST_COVERAGE", "").strip().lower()
    if forced in ("1", "true", "0", "false"):
        return forced in ("1", "true")
    if session.testsfailed or session.shouldstop or session.shouldfail or _deselected:
        return False
    ran = _ran_files | {f.resolve() for f in _live_files}
    return {f.resolve() for f in Path(__file__).parent.glob("test_*.py")} <= ran
