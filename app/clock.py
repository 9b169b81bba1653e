"""Time as one object, so tests can move it and code never reads the wall clock directly."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


class Clock:
    """The real clock: aware UTC datetimes and a monotonic counter."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock(Clock):
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, delta: timedelta) -> None:
        self._now += delta
        self._mono += delta.total_seconds()


def isoformat(moment: datetime) -> str:
    """Fixed-width UTC text with milliseconds: sorts as text in the same order as in time."""
    utc = moment.astimezone(UTC)
    # Formatted by hand: strftime writes year 80 as "80", which would sort after "2026".
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}"
        f":{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


def parse_iso(text: str) -> datetime:
    """An ISO 8601 time as an aware UTC datetime; ValueError for anything else, including
    a time whose offset takes it out of the years datetime can hold."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from None
