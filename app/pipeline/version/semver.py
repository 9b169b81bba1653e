"""Semantic Versioning 2.0.0 precedence, enough to pick the newest of several versions."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import total_ordering

_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$",
    re.ASCII,  # \d alone takes any script's digits: int() reads "1" and an Arabic-Indic 1 as 11
)


@total_ordering
class Version:
    __slots__ = ("core", "prerelease", "text")

    def __init__(self, text: str) -> None:
        match = _SEMVER.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not a semantic version")
        self.text = text.strip()
        self.core = (int(match[1]), int(match[2]), int(match[3]))
        self.prerelease: tuple[tuple[int, int | str], ...] = tuple(
            (0, int(part)) if part.isdigit() else (1, part)
            for part in (match[4].split(".") if match[4] else ())
        )

    @property
    def canonical(self) -> str:
        """The text without a leading "v": how a version is stored and compared."""
        return self.text.removeprefix("v")

    def _key(self) -> tuple[object, ...]:
        # A release sorts above its pre-releases; build metadata never counts.
        return (self.core, not self.prerelease, self.prerelease)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Version({self.text!r})"


def newest(versions: Iterable[str], *, stable: bool = False) -> str | None:
    """The highest valid version (``stable``: the highest that is not a prerelease);
    text that is not a version is ignored."""
    best: Version | None = None
    for text in versions:
        try:
            candidate = Version(text)
        except ValueError:
            continue
        if stable and candidate.prerelease:
            continue
        if best is None or candidate > best:
            best = candidate
    return best.text if best else None
