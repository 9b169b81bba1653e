"""Stage plans: what share of a channel's orgs a rollout reaches, and for how long."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from app.config import format_duration, parse_duration

# Design section 6.2 for stable; beta moves faster.
STABLE = "1%:1h,10%:2h,50%:4h,100%"
BETA = "10%:30m,100%"

_STAGE = re.compile(r"^\s*(\d+(?:\.\d{1,2})?)%\s*(?::\s*(\S+))?\s*$")


@dataclass(frozen=True, slots=True)
class Stage:
    percentage: float  # of the channel's eligible orgs, 0 < p <= 100
    duration: timedelta | None  # how long its metrics are watched; None for the last


def parse_stages(text: str) -> tuple[Stage, ...]:
    """A plan such as ``1%:1h,10%:2h,50%:4h,100%``: percentages rising to 100, each
    before the last with a duration (the shared duration syntax), the last without."""
    parts = [p for p in text.split(",")]
    if not text.strip() or any(not p.strip() for p in parts):
        raise ValueError(f"{text!r} is not a stage plan such as {STABLE}")
    stages: list[Stage] = []
    for index, part in enumerate(parts):
        match = _STAGE.match(part)
        if not match:
            raise ValueError(f"stage {part.strip()!r} is not PERCENT% or PERCENT%:DURATION")
        percentage = float(match[1])
        last = index == len(parts) - 1
        if not 0 < percentage <= 100:
            raise ValueError(f"stage {part.strip()!r}: the share must be above 0% and at most 100%")
        if stages and percentage <= stages[-1].percentage:
            raise ValueError(f"stage {part.strip()!r}: shares must rise from stage to stage")
        if last:
            if percentage != 100:
                raise ValueError("the last stage must be 100%")
            if match[2] is not None:
                raise ValueError("the last stage (100%) takes no duration: it is the end")
            stages.append(Stage(percentage, None))
            continue
        if match[2] is None:
            raise ValueError(f"stage {part.strip()!r} needs a duration, such as {part.strip()}:1h")
        duration = parse_duration(match[2])
        if duration <= timedelta(0):
            raise ValueError(f"stage {part.strip()!r}: the duration must be above zero")
        stages.append(Stage(percentage, duration))
    return tuple(stages)


def format_stages(stages: tuple[Stage, ...]) -> str:
    return ",".join(
        f"{s.percentage:g}%" + (f":{format_duration(s.duration)}" if s.duration else "")
        for s in stages
    )
