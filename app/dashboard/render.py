"""HTML building blocks for the dashboard: the page layout, times, rates, verdicts, bars
and the stage chart. Every piece of text passes through ``esc`` (``html.escape``) here or
in the caller; nothing user-provided is ever put in HTML unescaped.

The pages carry a Content-Security-Policy without inline scripts or styles, so graphics
are SVG with presentation attributes (a ``style`` attribute would be refused).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from urllib.parse import quote

from aiohttp import web

from app.clock import isoformat

STATIC = "/dashboard/static"
# Assets are named by content version so a browser never mixes an old script with a
# new page; bump with any change to them.
ASSET_VERSION = "1"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    # Pages show live state and whom it is shown to: never from a cache.
    "Cache-Control": "no-store",
}


def esc(value: object) -> str:
    return escape(str(value), quote=True)


def path(*parts: str) -> str:
    """A dashboard path with each part percent-encoded (ids are user-influenced)."""
    return "/dashboard/" + "/".join(quote(p, safe="") for p in parts)


@dataclass(frozen=True, slots=True)
class Chrome:
    """What the layout needs about who is looking."""

    who: str | None  # shown in the header; None on the sign-in page
    csrf: str | None  # for the sign-out form
    live_events: Sequence[str] = ()  # SSE names the page refreshes on; none: not live


def page(
    title: str,
    body: str,
    chrome: Chrome,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A whole page: skip link, header with navigation and sign-out, ``main``, and the
    live-status region the script speaks through."""
    user = ""
    if chrome.who is not None and chrome.csrf is not None:
        user = (
            f'<form class="signout" method="post" action="/dashboard/logout">'
            f'<span class="who">{esc(chrome.who)}</span> '
            f'<input type="hidden" name="csrf" value="{esc(chrome.csrf)}">'
            f'<button type="submit">Sign out</button></form>'
        )
    live = ""
    if chrome.live_events:
        live = f' data-live-events="{esc(" ".join(chrome.live_events))}"'
    html = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · update-pipeline</title>
<link rel="stylesheet" href="{STATIC}/dashboard.css?v={ASSET_VERSION}">
<script src="{STATIC}/dashboard.js?v={ASSET_VERSION}" defer></script>
</head>
<body{live}>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<nav aria-label="Main"><a href="/" class="brand">update-pipeline</a></nav>
{user}
</header>
<main id="main" tabindex="-1">
{body}
</main>
<footer>
<p id="live-status" role="status" aria-live="polite">{"Connecting…" if live else ""}</p>
</footer>
</body>
</html>
"""
    response = web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
    response.headers.update(SECURITY_HEADERS)
    response.headers.update(headers or {})
    return response


def time(moment: datetime | None) -> str:
    """UTC in the markup and on hover; the script shows it in the viewer's local time."""
    if moment is None:
        return "—"
    utc = moment.astimezone(UTC)
    return (
        f'<time datetime="{esc(isoformat(utc))}" title="{utc:%Y-%m-%d %H:%M:%S} UTC">'
        f"{utc:%Y-%m-%d %H:%M} UTC</time>"
    )


def rate(value: float) -> str:
    return f"{value * 100:.1f}%"


def share(value: float) -> str:
    return f"{value:g}%"


VERDICT_TEXT = {
    "pass": ("✓", "pass: within thresholds"),
    "insufficient": ("…", "insufficient data"),
    "held": ("!", "held"),
    "rollback": ("✗", "roll back"),
    "passed": ("✓", "passed"),
    "failed": ("✗", "failed"),
    "errored": ("✗", "errored"),
    "running": ("…", "running"),
    "pending": ("…", "pending"),
    "cancelled": ("\u2013", "cancelled"),
    "rolling_out": ("→", "rolling out"),
    "paused": ("‖", "paused"),
    "completed": ("✓", "completed"),
    "rolled_back": ("✗", "rolled back"),
    "success": ("✓", "success"),
    "failure": ("✗", "failure"),
    "timed_out": ("✗", "timed out"),
}
_TONE = {
    "pass": "good",
    "passed": "good",
    "completed": "good",
    "success": "good",
    "rollback": "bad",
    "failed": "bad",
    "errored": "bad",
    "rolled_back": "bad",
    "failure": "bad",
    "timed_out": "bad",
    "held": "warn",
    "paused": "warn",
}


def badge(outcome: str | None, text: str | None = None) -> str:
    """A verdict or state in words, with a symbol; colour only repeats what they say."""
    if outcome is None:
        return '<span class="badge">—</span>'
    symbol, words = VERDICT_TEXT.get(outcome, ("", outcome.replace("_", " ")))
    tone = _TONE.get(outcome, "neutral")
    label = text if text is not None else words
    mark = f'<span aria-hidden="true">{symbol}</span> ' if symbol else ""
    return f'<span class="badge badge-{tone}">{mark}{esc(label)}</span>'


def table(
    caption: str, headers: Sequence[str], rows: Iterable[Sequence[str]], *, empty: str = "None."
) -> str:
    """A table of already-rendered cells (escape what goes in them); ``empty`` when
    there are no rows."""
    body = "".join("<tr>" + "".join(_cell(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    if not body:
        return f'<p class="empty">{esc(caption)}: {esc(empty)}</p>'
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    return (
        f'<div class="scroll"><table><caption>{esc(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _cell(index: int, content: str) -> str:
    return f'<th scope="row">{content}</th>' if index == 0 else f"<td>{content}</td>"


PALETTE = 6  # colour classes for bar segments, repeated beyond that


def share_bar(label: str, parts: Sequence[tuple[str, int]]) -> str:
    """One channel's runners by build: an SVG bar whose segments are also named in text
    (the list beside it), so the bar is a picture of what the text says."""
    total = sum(n for _, n in parts)
    if total == 0:
        return ""
    x = 0.0
    rects = []
    for index, (name, count) in enumerate(parts):
        width = count / total * 100
        rects.append(
            f'<rect class="seg seg-{index % PALETTE}" x="{x:.3f}%" y="0" width="{width:.3f}%"'
            f' height="100%"><title>{esc(name)}: {count} runner(s)</title></rect>'
        )
        x += width
    items = "".join(
        f'<li><span class="key seg-{i % PALETTE}" aria-hidden="true"></span>'
        f"<code>{esc(name)}</code> {count} runner(s), {count / total * 100:.0f}%</li>"
        for i, (name, count) in enumerate(parts)
    )
    return (
        f'<figure class="share"><figcaption>{esc(label)}</figcaption>'
        f'<svg class="bar" role="presentation" aria-hidden="true" focusable="false"'
        f' preserveAspectRatio="none">{"".join(rects)}</svg>'
        f'<ul class="legend">{items}</ul></figure>'
    )


@dataclass(frozen=True, slots=True)
class ChartStage:
    label: str  # "1%"
    sessions: int
    failure: float
    disconnect: float
    reached: bool


def stage_chart(stages: Sequence[ChartStage], max_failure: float, max_disconnect: float) -> str:
    """Failure and disconnect rates per stage as grouped bars, with each threshold as a
    dashed line. Hidden from assistive technology: the table after it says the same."""
    width, height, pad = 640, 220, 36
    top = max([max_failure, max_disconnect] + [max(s.failure, s.disconnect) for s in stages])
    scale = max(top * 1.25, 0.01)
    plot_h = height - pad * 2
    slot = (width - pad * 2) / max(len(stages), 1)

    def y(value: float) -> float:
        return height - pad - value / scale * plot_h

    parts = [
        f'<line class="axis" x1="{pad}" y1="{height - pad}" x2="{width - pad}"'
        f' y2="{height - pad}"/>'
    ]
    for index, stage in enumerate(stages):
        left = pad + index * slot + slot * 0.15
        bar = slot * 0.3
        for offset, (kind, value) in enumerate(
            (("failure", stage.failure), ("disconnect", stage.disconnect))
        ):
            if stage.reached:
                top_y = y(value)
                parts.append(
                    f'<rect class="bar-{kind}" x="{left + offset * bar:.1f}" y="{top_y:.1f}"'
                    f' width="{bar:.1f}" height="{height - pad - top_y:.1f}"/>'
                )
        center = pad + index * slot + slot / 2
        parts.append(
            f'<text class="tick" x="{center:.1f}" y="{height - pad + 16}"'
            f' text-anchor="middle">{esc(stage.label)}</text>'
        )
        sessions = f"n={stage.sessions}" if stage.reached else "not reached"
        parts.append(
            f'<text class="tick" x="{center:.1f}" y="{height - pad + 30}"'
            f' text-anchor="middle">{esc(sessions)}</text>'
        )
    for kind, limit in (("failure", max_failure), ("disconnect", max_disconnect)):
        line_y = y(limit)
        parts.append(
            f'<line class="limit-{kind}" x1="{pad}" y1="{line_y:.1f}" x2="{width - pad}"'
            f' y2="{line_y:.1f}"/>'
            f'<text class="limit-label" x="{width - pad}" y="{line_y - 4:.1f}"'
            f' text-anchor="end">max {kind} {rate(limit)}</text>'
        )
    legend = (
        '<p class="chart-legend" aria-hidden="true"><span class="key bar-failure"></span>'
        ' failure rate <span class="key bar-disconnect"></span> disconnect rate'
        " (dashed: thresholds)</p>"
    )
    return (
        f'<figure class="chart"><svg viewBox="0 0 {width} {height}" role="presentation"'
        f' aria-hidden="true" focusable="false">{"".join(parts)}</svg>{legend}</figure>'
    )
