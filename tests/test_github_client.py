"""The GitHub client: retries, rate limits, pacing, conditional requests and stats."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from cachetools import LRUCache
from gidgethub import BadRequest, GitHubBroken

from app.clock import ManualClock
from app.github.app import GitHubApp, InstallationSuspended
from app.github.auth import InstallationAuth
from app.github.client import (
    GitHubClient,
    GitHubRateLimited,
    GitHubStats,
    GitHubUnavailable,
    Pacer,
    RetryPolicy,
)
from tests.fake_github import FakeGitHub


class ClockSleep:
    """An injected sleep that records each delay and moves the clock by it, at once."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.advance(timedelta(seconds=seconds))
        await asyncio.sleep(0)


@pytest.fixture
def clock_sleep(clock: ManualClock) -> ClockSleep:
    return ClockSleep(clock)


@pytest.fixture
def github_sleep(clock_sleep: ClockSleep) -> ClockSleep:
    """Here the GitHub client's waits move the clock, so rate limits and pacing play out."""
    return clock_sleep


# -- Pacing (the Pacer alone, on a ManualClock) -----------------------------------------


async def send_paced(pacer: Pacer, key: str, method: str, sent: list[tuple[str, float]]) -> None:
    async with pacer.lock(key):
        await pacer.wait_turn(key, method)
        sent.append((key, pacer.clock.monotonic()))
        # The request itself takes a moment; nobody else of this key may go meanwhile.
        await asyncio.sleep(0)
        assert sent[-1][0] == key


async def test_mutations_of_one_installation_go_one_at_a_time_a_second_apart(
    clock: ManualClock, clock_sleep: ClockSleep
) -> None:
    pacer = Pacer(clock, clock_sleep)
    sent: list[tuple[str, float]] = []
    inside = 0
    most_inside = 0

    async def one(method: str) -> None:
        nonlocal inside, most_inside
        async with pacer.lock("installation:1"):
            inside += 1
            most_inside = max(most_inside, inside)
            await pacer.wait_turn("installation:1", method)
            sent.append(("installation:1", clock.monotonic()))
            await asyncio.sleep(0)
            inside -= 1

    await asyncio.gather(*(one(m) for m in ["POST", "PATCH", "POST", "DELETE", "PUT"]))

    assert most_inside == 1
    times = [t for _, t in sent]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    assert times[-1] - times[0] == pytest.approx(4.0)


async def test_different_installations_do_not_wait_on_each_other(
    clock: ManualClock, clock_sleep: ClockSleep
) -> None:
    pacer = Pacer(clock, clock_sleep)
    sent: list[tuple[str, float]] = []

    await send_paced(pacer, "installation:1", "POST", sent)
    await send_paced(pacer, "installation:2", "POST", sent)
    await send_paced(pacer, "installation:3", "PATCH", sent)
    assert clock_sleep.delays == []

    await send_paced(pacer, "installation:1", "POST", sent)
    assert clock_sleep.delays == [pytest.approx(1.0)]


async def test_a_mutation_after_a_quiet_second_is_not_delayed(
    clock: ManualClock, clock_sleep: ClockSleep
) -> None:
    pacer = Pacer(clock, clock_sleep)
    sent: list[tuple[str, float]] = []
    await send_paced(pacer, "installation:1", "POST", sent)
    clock.advance(timedelta(seconds=0.4))
    await send_paced(pacer, "installation:1", "POST", sent)
    clock.advance(timedelta(seconds=5))
    await send_paced(pacer, "installation:1", "POST", sent)
    assert clock_sleep.delays == [pytest.approx(0.6)]


async def test_more_than_80_creations_in_a_minute_wait_for_the_window(
    clock: ManualClock, clock_sleep: ClockSleep
) -> None:
    # No per-request spacing here, so only the per-minute budget holds them back.
    pacer = Pacer(clock, clock_sleep, interval=0.0)
    sent: list[tuple[str, float]] = []
    for _ in range(80):
        await send_paced(pacer, "installation:1", "POST", sent)
    assert clock_sleep.delays == []

    await send_paced(pacer, "installation:1", "POST", sent)
    assert clock_sleep.delays == [pytest.approx(60.0)]
    times = [t for _, t in sent]
    assert all(sum(1 for t in times if start <= t < start + 60) <= 80 for start in times)

    # Updates (PATCH) are not content creation: they are not held to the budget.
    for _ in range(79):
        await send_paced(pacer, "installation:1", "POST", sent)
    await send_paced(pacer, "installation:1", "PATCH", sent)
    assert len(clock_sleep.delays) == 1


async def test_more_than_500_creations_in_an_hour_wait_for_the_window(
    clock: ManualClock, clock_sleep: ClockSleep
) -> None:
    pacer = Pacer(clock, clock_sleep)  # the defaults: a second apart, 80/min, 500/h
    sent: list[tuple[str, float]] = []
    for _ in range(501):
        await send_paced(pacer, "installation:1", "POST", sent)

    times = [t for _, t in sent]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    assert times[499] - times[0] == pytest.approx(499.0)
    assert times[500] - times[0] == pytest.approx(3600.0)
    assert all(sum(1 for t in times if start <= t < start + 3600) <= 500 for start in times)


# -- The client against the fake GitHub ---------------------------------------------------

GET_TOPICS = "GET /repos/{owner}/{repo}/topics"
TOPICS = "/repos/acme/runner/topics"
CREATE_ISSUE = "POST /repos/{owner}/{repo}/issues"
ISSUES = "/repos/acme/runner/issues"


class TopJitter(random.Random):
    """Jitter that always picks the ceiling, so the backoff schedule itself shows."""

    def uniform(self, a: float, b: float) -> float:
        return b


MakeClient = Callable[..., GitHubClient]


@pytest.fixture
def make_client(
    app_github: GitHubApp, installation: int, clock: ManualClock, clock_sleep: ClockSleep
) -> MakeClient:
    """An installation client with its own policy, seeded jitter and stats, and no pacer."""

    def make(
        policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> GitHubClient:
        return GitHubClient(
            app_github.session,
            auth=InstallationAuth(installation, app_github.tokens),
            base_url=app_github.settings.github_api_url,
            clock=clock,
            policy=policy,
            stats=GitHubStats(),
            sleep=clock_sleep,
            cache=LRUCache(maxsize=100),
            rng=rng or random.Random(1234),
        )

    return make


def statuses(github: FakeGitHub, pattern: str) -> list[int | None]:
    return [c.status for c in github.calls(pattern)]


async def new_issue(client: GitHubClient, title: str = "Roll out 1.2.3") -> Any:
    return await client.post(ISSUES, data={"title": title})


# -- Retries --


async def test_a_get_is_retried_on_502_and_succeeds_on_a_later_try(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client()
    github.inject(GET_TOPICS, status=502, times=2)

    assert await client.getitem(TOPICS) == {"names": ["runner"]}

    assert statuses(github, GET_TOPICS) == [502, 502, 200]
    assert len(clock_sleep.delays) == 2
    assert client.stats.retries == 2


async def test_a_get_is_retried_after_a_timeout(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client(RetryPolicy(timeout=0.2))
    github.inject(GET_TOPICS, status=None, delay=1.0)  # answers, but too late

    assert await client.getitem(TOPICS) == {"names": ["runner"]}

    assert len(github.calls(GET_TOPICS)) == 2
    assert len(clock_sleep.delays) == 1
    assert client.stats.errors["timeout"] == 1


async def test_a_get_is_retried_after_the_connection_is_reset(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client()
    # aiohttp itself resends an idempotent request once on a dropped connection, so it
    # takes two resets in a row to reach the client's own retry.
    github.inject(GET_TOPICS, reset=True, times=2)

    assert await client.getitem(TOPICS) == {"names": ["runner"]}

    assert statuses(github, GET_TOPICS) == [None, None, 200]
    assert len(clock_sleep.delays) == 1
    assert client.stats.errors["ServerDisconnectedError"] == 1


async def test_a_get_that_keeps_failing_with_502_gives_up_after_the_allowed_attempts(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client(RetryPolicy(attempts=3))
    github.inject(GET_TOPICS, status=502, times=None)

    with pytest.raises(GitHubBroken) as caught:
        await client.getitem(TOPICS)

    assert caught.value.status_code == 502
    assert statuses(github, GET_TOPICS) == [502, 502, 502]
    assert len(clock_sleep.delays) == 2


@pytest.mark.parametrize("fault", ["timeout", "reset"])
async def test_a_get_that_never_gets_an_answer_gives_up_as_unavailable(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep, fault: str
) -> None:
    client = make_client(RetryPolicy(attempts=3, timeout=0.2))
    if fault == "timeout":
        github.inject(GET_TOPICS, status=None, delay=1.0, times=None)
    else:
        github.inject(GET_TOPICS, reset=True, times=None)

    with pytest.raises(GitHubUnavailable, match=r"GET \S+/topics failed: (timeout|Server)"):
        await client.getitem(TOPICS)

    # A reset is resent once by aiohttp itself within each of the client's tries.
    assert len(github.calls(GET_TOPICS)) == (3 if fault == "timeout" else 6)
    assert len(clock_sleep.delays) == 2


async def test_a_post_is_not_retried_on_502(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client()
    github.inject(CREATE_ISSUE, status=502)

    with pytest.raises(GitHubBroken):
        await new_issue(client)

    assert statuses(github, CREATE_ISSUE) == [502]
    assert clock_sleep.delays == []
    assert client.stats.retries == 0


async def test_a_post_is_not_retried_after_a_timeout(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client(RetryPolicy(timeout=0.2))
    # GitHub may well have created it: sending it again could make a second one.
    github.inject(CREATE_ISSUE, status=None, delay=0.5)

    with pytest.raises(GitHubUnavailable, match="timeout"):
        await new_issue(client)

    assert len(github.calls(CREATE_ISSUE)) == 1
    assert clock_sleep.delays == []


async def test_backoff_doubles_from_the_base_delay_up_to_the_cap(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    policy = RetryPolicy(attempts=7, base_delay=0.5, max_delay=3.0)
    client = make_client(policy, rng=TopJitter())
    github.inject(GET_TOPICS, status=503, times=None)

    with pytest.raises(GitHubBroken):
        await client.getitem(TOPICS)

    assert clock_sleep.delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


async def test_backoff_is_jittered_between_zero_and_the_ceiling(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    policy = RetryPolicy(attempts=8, base_delay=0.5, max_delay=4.0)
    client = make_client(policy, rng=random.Random(99))
    github.inject(GET_TOPICS, status=502, times=None)

    with pytest.raises(GitHubBroken):
        await client.getitem(TOPICS)

    ceilings = [min(4.0, 0.5 * 2 ** (n - 1)) for n in range(1, 8)]
    assert len(clock_sleep.delays) == len(ceilings)
    assert all(0 <= d <= c for d, c in zip(clock_sleep.delays, ceilings, strict=True))
    # Full jitter: not simply the ceilings (a client without jitter would sleep those).
    assert clock_sleep.delays != ceilings
    expected = random.Random(99)
    assert clock_sleep.delays == [expected.uniform(0, c) for c in ceilings]


# -- Primary rate limit --


async def test_an_exhausted_rate_limit_makes_the_next_request_wait_for_the_reset(
    github: FakeGitHub,
    make_client: MakeClient,
    clock_sleep: ClockSleep,
    clock: ManualClock,
    installation: int,
) -> None:
    client = make_client()
    github.set_rate_limit(1, installation_id=installation, reset_in=120)

    await client.getitem(TOPICS)  # the last request of the window
    assert clock_sleep.delays == []
    reset_at = clock.now().timestamp() + 120

    assert await client.getitem(TOPICS) == {"names": ["runner"]}

    (waited,) = clock_sleep.delays
    assert 120 <= waited <= 122
    assert clock.now().timestamp() >= reset_at
    # Sent only after the reset: the fake never had to refuse it.
    assert statuses(github, GET_TOPICS) == [200, 304]
    assert client.stats.rate_limit_waits == 1


async def test_a_403_for_the_primary_limit_waits_for_the_reset_and_tries_again(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep, installation: int
) -> None:
    client = make_client()
    github.set_rate_limit(0, installation_id=installation, reset_in=30)

    assert await client.getitem(TOPICS) == {"names": ["runner"]}

    assert statuses(github, GET_TOPICS) == [403, 200]
    (waited,) = clock_sleep.delays
    assert 30 <= waited <= 32


async def test_a_reset_beyond_the_bound_fails_fast_without_sending(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep, installation: int
) -> None:
    client = make_client(RetryPolicy(max_rate_limit_wait=600))
    github.set_rate_limit(1, installation_id=installation, reset_in=1800)
    await client.getitem(TOPICS)

    for _ in range(2):
        with pytest.raises(GitHubRateLimited, match="rate limit") as caught:
            await client.getitem(TOPICS)
        assert 1800 <= caught.value.reset_in <= 1802
        assert "600s" in str(caught.value)

    assert len(github.calls(GET_TOPICS)) == 1
    assert clock_sleep.delays == []


async def test_a_403_for_the_primary_limit_beyond_the_bound_is_not_retried(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep, installation: int
) -> None:
    client = make_client(RetryPolicy(max_rate_limit_wait=600))
    github.set_rate_limit(0, installation_id=installation, reset_in=1800)

    with pytest.raises(GitHubRateLimited):
        await new_issue(client)

    assert statuses(github, CREATE_ISSUE) == [403]
    assert clock_sleep.delays == []


# -- Secondary rate limits --


@pytest.mark.parametrize("status", [403, 429])
async def test_a_secondary_limit_with_retry_after_waits_that_long(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep, status: int
) -> None:
    client = make_client()
    github.inject(GET_TOPICS, status=status, headers={"Retry-After": "7"})

    assert await client.getitem(TOPICS) == {"names": ["runner"]}

    assert clock_sleep.delays == [7.0]
    assert statuses(github, GET_TOPICS) == [status, 200]


async def test_a_post_refused_by_a_secondary_limit_is_sent_again_after_retry_after(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client()
    # GitHub did not process a request it refused, so sending it again is safe.
    github.inject(CREATE_ISSUE, status=403, headers={"Retry-After": "7"})

    issue = await new_issue(client)

    assert clock_sleep.delays == [7.0]
    assert statuses(github, CREATE_ISSUE) == [403, 201]
    assert list(github.repo("acme/runner").issues) == [issue["number"]]


async def test_a_secondary_limit_without_retry_after_waits_a_minute_then_doubles(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client()
    github.inject(CREATE_ISSUE, status=403, times=3)  # "exceeded a secondary rate limit"

    await new_issue(client)

    assert clock_sleep.delays == [60.0, 120.0, 240.0]
    assert statuses(github, CREATE_ISSUE) == [403, 403, 403, 201]


async def test_a_secondary_limit_that_never_lifts_ends_in_the_403(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client(RetryPolicy(secondary_attempts=2))
    github.inject(GET_TOPICS, status=403, times=None)

    with pytest.raises(BadRequest) as caught:
        await client.getitem(TOPICS)

    assert caught.value.status_code == 403
    assert clock_sleep.delays == [60.0, 120.0]
    assert len(github.calls(GET_TOPICS)) == 3


async def test_a_403_that_is_no_rate_limit_is_returned_at_once(
    github: FakeGitHub, make_client: MakeClient, clock_sleep: ClockSleep
) -> None:
    client = make_client()
    github.inject(
        GET_TOPICS, status=403, body={"message": "Resource not accessible by integration"}
    )

    with pytest.raises(BadRequest, match="not accessible"):
        await client.getitem(TOPICS)

    assert clock_sleep.delays == []
    assert len(github.calls(GET_TOPICS)) == 1


# -- Pacing, through the App's clients --


async def test_mutations_of_an_installation_are_sent_a_second_apart_and_gets_are_not_paced(
    github: FakeGitHub,
    app_github: GitHubApp,
    installation: int,
    clock_sleep: ClockSleep,
    clock: ManualClock,
) -> None:
    other = github.add_installation(account="other", repos=["other/runner"])
    client = app_github.installation(installation)

    await asyncio.gather(*(new_issue(client, f"issue {n}") for n in range(3)))
    assert clock_sleep.delays == [1.0, 1.0]

    for _ in range(3):
        await client.getitem(TOPICS)
    await app_github.installation(other).post(
        "/repos/other/runner/issues", data={"title": "elsewhere"}
    )
    assert clock_sleep.delays == [1.0, 1.0]

    await client.patch(f"{ISSUES}/1", data={"state": "closed"})
    assert clock_sleep.delays == [1.0, 1.0, 1.0]  # a second after the last POST

    clock.advance(timedelta(seconds=5))
    await client.patch(f"{ISSUES}/1", data={"state": "open"})
    assert clock_sleep.delays == [1.0, 1.0, 1.0]
    assert len(github.calls(CREATE_ISSUE)) == 4


# -- Conditional requests --


async def test_a_repeated_get_is_conditional_and_a_304_returns_the_cached_body(
    github: FakeGitHub, make_client: MakeClient
) -> None:
    client = make_client()
    first = await client.getitem(TOPICS)
    second = await client.getitem(TOPICS)

    assert first == second == {"names": ["runner"]}
    assert statuses(github, GET_TOPICS) == [200, 304]
    plain, conditional = github.calls(GET_TOPICS)
    assert "If-None-Match" not in plain.headers
    assert conditional.headers["If-None-Match"]

    # A change on GitHub's side is seen: the old ETag no longer matches.
    github.repo("acme/runner").topics = ["runner", "canary"]
    assert await client.getitem(TOPICS) == {"names": ["runner", "canary"]}
    assert await client.getitem(TOPICS) == {"names": ["runner", "canary"]}
    assert statuses(github, GET_TOPICS) == [200, 304, 200, 304]
    new_etag = github.calls(GET_TOPICS)[3].headers["If-None-Match"]
    assert new_etag != conditional.headers["If-None-Match"]


async def test_each_installation_client_of_the_app_keeps_its_own_etags(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    client = app_github.installation(installation)
    await client.getitem(TOPICS)
    await client.getitem(TOPICS)
    assert statuses(github, GET_TOPICS) == [200, 304]
    assert app_github.installation(installation) is client


# -- Stats --


async def test_stats_count_calls_retries_waits_and_headroom(
    github: FakeGitHub, make_client: MakeClient, installation: int
) -> None:
    client = make_client()
    github.inject(GET_TOPICS, status=502)
    github.inject(CREATE_ISSUE, status=429, headers={"Retry-After": "7"})

    await client.getitem(TOPICS)  # 502, then 200
    await client.getitem(TOPICS)  # 304
    await new_issue(client)  # 429, then 201
    await new_issue(client)  # 201

    stats = client.stats
    assert stats.calls == {
        ("GET", 502): 1,
        ("GET", 200): 1,
        ("GET", 304): 1,
        ("POST", 429): 1,
        ("POST", 201): 2,
    }
    assert stats.retries == 1
    assert stats.rate_limit_waits == 1
    assert stats.rate_limit_wait_seconds == 7.0
    window = github.rate_windows[f"installation:{installation}"]
    assert stats.headroom == {
        (f"installation:{installation}", "core"): (
            window.limit - window.used,
            window.limit,
            window.reset,
        )
    }
    assert window.used == 3  # what GitHub counted: the 200 and the two 201s


async def test_the_apps_clients_share_one_stats_keyed_by_credential(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    await app_github.installation(installation).getitem(TOPICS)

    stats = app_github.stats
    assert stats.calls == {("POST", 201): 1, ("GET", 200): 1}
    assert set(stats.headroom) == {("app", "core"), (f"installation:{installation}", "core")}
    remaining, limit, _ = stats.headroom[("app", "core")]
    assert (remaining, limit) == (limit - 1, github.rate_limit)


# -- Suspended installations --


async def test_a_suspended_installation_gets_no_client_and_no_request(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    app_github.suspended.add(installation)

    with pytest.raises(InstallationSuspended, match=str(installation)):
        app_github.installation(installation)
    assert github.requests == []

    app_github.suspended.discard(installation)
    assert await app_github.installation(installation).getitem(TOPICS) == {"names": ["runner"]}
