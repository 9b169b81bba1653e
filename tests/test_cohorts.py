"""Rollout cohorts: deterministic, monotone, the right share, never empty above 0%."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.fleet.cohorts import bucket, included, members

ORGS = [f"org-{n:05d}" for n in range(10_000)]


def test_a_bucket_is_stable_and_in_range() -> None:
    assert bucket("r-1", "org-1") == bucket("r-1", "org-1")
    assert 0 <= bucket("r-1", "org-1") < 100
    assert round(bucket("r-1", "org-1") * 100) == bucket("r-1", "org-1") * 100  # 0.01 steps
    assert bucket("r-1", "org-1") != bucket("r-2", "org-1")


@settings(max_examples=10, deadline=None)
@given(st.text(min_size=1, max_size=20), st.sampled_from([1, 5, 10, 25, 50, 90]))
def test_the_share_is_within_one_and_a_half_points_over_ten_thousand_orgs(
    rollout: str, percentage: int
) -> None:
    share = sum(bucket(rollout, org) < percentage for org in ORGS) / len(ORGS) * 100
    assert abs(share - percentage) <= 1.5


@settings(max_examples=50, deadline=None)
@given(
    st.text(min_size=1, max_size=20),
    st.lists(st.floats(min_value=0, max_value=100), min_size=2, max_size=6),
)
def test_an_org_once_in_stays_in_as_the_percentage_grows(
    rollout: str, percentages: list[float]
) -> None:
    sample = ORGS[:500]
    previous: set[str] = set()
    for percentage in sorted(percentages):
        now = members(rollout, sample, percentage)
        assert previous <= now
        previous = now


def test_members_agrees_with_included() -> None:
    sample = ORGS[:300]
    for percentage in (0, 0.3, 7, 50, 100):
        expected = {org for org in sample if included("r-5", org, percentage, sample)}
        assert members("r-5", sample, percentage) == expected


def test_a_small_fleet_always_has_someone_in_a_stage() -> None:
    orgs = ["org-a", "org-b", "org-c"]
    members = [org for org in orgs if included("r-9", org, 1, orgs)]
    assert len(members) >= 1
    assert not any(included("r-9", org, 0, orgs) for org in orgs)
    assert included("r-9", "org-a", 100, orgs)
