"""Deterministic rollout cohorts: which organisations a rollout at N% includes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

RESOLUTION = 10_000  # buckets: 0.01 percentage points each


def bucket(rollout_id: str, org_id: str) -> float:
    """An org's place in a rollout, in [0, 100) with 0.01 resolution: the same for the
    same (rollout, org) in every process and after every restart."""
    digest = hashlib.sha256(f"{rollout_id}\0{org_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % RESOLUTION / 100


def included(rollout_id: str, org_id: str, percentage: float, eligible: Iterable[str] = ()) -> bool:
    """Whether a rollout at ``percentage`` includes the org: its bucket is below the
    percentage, so growing the percentage only ever adds orgs. Above 0%, the eligible
    org with the lowest bucket is always in, so a small fleet never waits on an empty
    stage (pass ``eligible`` for that rule; ties go to the smaller org id)."""
    if percentage <= 0:
        return False
    if bucket(rollout_id, org_id) < percentage:
        return True
    first = min(eligible, key=lambda o: (bucket(rollout_id, o), o), default=None)
    return first == org_id


def members(rollout_id: str, orgs: Iterable[str], percentage: float) -> set[str]:
    """The eligible orgs a rollout at ``percentage`` includes (``included`` for each, with
    every bucket computed once)."""
    if percentage <= 0:
        return set()
    buckets = {org: bucket(rollout_id, org) for org in orgs}
    chosen = {org for org, b in buckets.items() if b < percentage}
    if not chosen and buckets:
        chosen.add(min(buckets, key=lambda o: (buckets[o], o)))
    return chosen
