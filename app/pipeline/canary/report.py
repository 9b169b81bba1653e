"""A canary outcome as a GitHub check run's content: conclusion, title, Markdown summary
and text, and annotations on the build's runtime manifest. Pure functions.

Everything the suite reports (test names, messages, provider ids, versions) is untrusted
and goes through ``escape_for_comment`` before it lands in Markdown, and through
``_plain`` before it lands in plain-text fields (title, annotations).

GitHub refuses a ``summary`` or ``text`` over 65,535 *bytes* (the documentation says
characters; the API counts UTF-8 bytes: "summary exceeds a maximum bytesize of 65535"),
so both are kept under ``OUTPUT_BUDGET`` UTF-8 bytes, cut at a line boundary, with a
closing line that says what was left out and where the whole of it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

from app.github.commands import ELLIPSIS, escape_for_comment
from app.pipeline.canary.metrics import Metrics, TestResult, Thresholds, Verdict

Conclusion = Literal["success", "failure", "timed_out", "cancelled"]
STATES = ("passed", "failed", "errored", "cancelled")
# GitHub's limit is 65,535 bytes for summary and for text; this leaves a margin.
GITHUB_OUTPUT_LIMIT = 65_535
OUTPUT_BUDGET = 65_000
MAX_ANNOTATIONS_PER_REQUEST = 50
NAME_CHARS = 200  # a test's name in the text, before escaping
MESSAGE_CHARS = 500  # a test's message in the text, before escaping
DASH = "\u2014"  # shown for a value that is not there
PASS, FAIL = "\u2705", "\u274c"
_FAILING = ("failed", "errored")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CheckOutput:
    """What a check run shows. ``summary`` and ``text`` are Markdown within GitHub's
    limits (``text`` is "" when no test failed or errored); ``annotations`` are in
    GitHub's format, all of them: send them ``annotation_batches`` at a time."""

    conclusion: Conclusion
    title: str
    summary: str
    text: str
    annotations: list[dict[str, Any]] = field(default_factory=list)

    def output(self, annotations: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """The ``output`` object of a create/update check run request, with the given
        batch of annotations (at most 50; none by default). ``text`` is left out when
        empty."""
        if len(annotations) > MAX_ANNOTATIONS_PER_REQUEST:
            raise ValueError(
                f"GitHub takes at most {MAX_ANNOTATIONS_PER_REQUEST} annotations a request"
            )
        body: dict[str, Any] = {"title": self.title, "summary": self.summary}
        if self.text:
            body["text"] = self.text
        if annotations:
            body["annotations"] = [dict(a) for a in annotations]
        return body


def check_output(
    build_id: str,
    verdict: Verdict | None,
    *,
    state: str,
    results: Sequence[TestResult] = (),
    thresholds: Thresholds,
    runtime_versions: Mapping[str, str],
    metrics_url: str | None = None,
    error: str | None = None,
    manifest_path: str,
    manifest_text: str | None = None,
    timed_out: bool = False,
    cancelled: bool = False,
) -> CheckOutput:
    """The check run content of a finished canary run of ``build_id``.

    ``state`` is the run's final state (``passed``, ``failed``, ``errored``, or
    ``cancelled``) and decides the conclusion: ``passed`` → success, ``failed`` →
    failure, ``errored`` → failure, or ``timed_out`` when ``timed_out`` is true (the run
    errored because no results came before its deadline), ``cancelled`` → cancelled.
    ``cancelled=True`` makes any state cancelled (a run superseded by a re-run is stored
    as errored, but was cancelled, not failed). ``timed_out`` is only allowed with
    ``errored`` and not with ``cancelled``; any other state is a ValueError.
    ``verdict`` is the judgement of ``results`` (None when there was none: a timeout, a
    cancellation before results); the metrics and provider tables come from it and are
    left out without it. ``error`` (and the verdict's reason) is shown when the state is
    not ``passed``. ``metrics_url`` (http or https) is linked from the
    summary and from any truncation note. Annotations: one per provider the verdict
    found failing (the build's providers, or the reported ones when
    ``runtime_versions`` is empty, that are not known-good), for ``failed`` and
    ``errored`` runs with a verdict, on the line of ``manifest_path`` where
    ``manifest_text`` has that provider's key (line 1 when it has not, or is None).
    """
    if state not in STATES:
        raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
    if timed_out and (state != "errored" or cancelled):
        raise ValueError(
            f"timed_out is only for an errored run that was not cancelled, not {state!r}"
        )
    if cancelled:
        state = "cancelled"
    link = _link(metrics_url) if metrics_url is not None else None
    failing = _failing_providers(verdict, runtime_versions) if state in _FAILING else []
    return CheckOutput(
        conclusion=_conclusion(state, timed_out),
        title=_title(state, verdict, thresholds, error, failing, timed_out=timed_out),
        summary=_summary(
            build_id, verdict, state, thresholds, runtime_versions, error, link, timed_out
        ),
        text=_text(results, link),
        annotations=[
            _annotation(p, verdict, thresholds, runtime_versions, manifest_path, manifest_text)
            for p in failing
            if verdict is not None
        ],
    )


def annotation_batches(annotations: Sequence[T], size: int = 50) -> list[list[T]]:
    """``annotations`` in order, split into requests of at most ``size`` (1 to 50: GitHub
    takes at most 50 annotations per create or update request). No annotations, no
    batches."""
    if not 1 <= size <= MAX_ANNOTATIONS_PER_REQUEST:
        raise ValueError(f"size must be between 1 and {MAX_ANNOTATIONS_PER_REQUEST}")
    return [list(annotations[i : i + size]) for i in range(0, len(annotations), size)]


def manifest_line(manifest_text: str | None, key: str) -> int:
    """The 1-based line where ``key`` is a key of the manifest's JSON object: the last
    top-level occurrence (the one a JSON parser keeps), else the first at any depth, else
    line 1 (also when ``manifest_text`` is None). The scan skips strings properly, so a
    value equal to the key, or the key inside another string, does not count; it needs no
    valid JSON, so a broken manifest still gets lines where it can."""
    if not manifest_text:
        return 1
    text = manifest_text
    top: int | None = None
    nested: int | None = None
    depth = 0
    line = 1
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        elif c == '"':
            start, start_line = i, line
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                if i < n and text[i] == "\n":
                    line += 1
                i += 1
            j = i + 1
            while j < n and text[j] in " \t\r\n":
                j += 1
            if j < n and text[j] == ":" and _json_string(text[start : i + 1]) == key:
                if depth == 1:
                    top = start_line
                elif nested is None:
                    nested = start_line
        i += 1
    return top or nested or 1


# -- pieces ---------------------------------------------------------------------------------


def _conclusion(state: str, timed_out: bool) -> Conclusion:
    if state == "passed":
        return "success"
    if state == "cancelled":
        return "cancelled"
    return "timed_out" if timed_out else "failure"


def _title(
    state: str,
    verdict: Verdict | None,
    thresholds: Thresholds,
    error: str | None,
    failing: Sequence[str],
    *,
    timed_out: bool,
) -> str:
    if state == "cancelled":
        return "Canary cancelled" + (f": {_plain(error, 100)}" if error else "")
    if timed_out:
        return "Canary timed out: " + (_plain(error, 100) if error else "no results in time")
    if verdict is None:
        return f"Canary {state}: " + (_plain(error, 100) if error else "no results")
    metrics = verdict.metrics
    if metrics.ran == 0:
        return f"Canary {state}: no test ran"
    rates = (
        f"{_pct(metrics.pass_rate, thresholds.min_pass_rate)} pass rate, "
        f"{_pct(metrics.disconnect_rate, thresholds.max_disconnect_rate)} disconnects"
    )
    if state == "passed" or not failing:
        return f"Canary {state}: {rates}"
    shown = ", ".join(_plain(p, 40) for p in failing[:3])
    more = f" +{len(failing) - 3} more" if len(failing) > 3 else ""
    return f"Canary {state} ({shown}{more}): {rates}"


def _summary(
    build_id: str,
    verdict: Verdict | None,
    state: str,
    thresholds: Thresholds,
    runtime_versions: Mapping[str, str],
    error: str | None,
    link: str | None,
    timed_out: bool,
) -> str:
    outcome = {
        "passed": f"{PASS} passed",
        "failed": f"{FAIL} failed",
        "errored": "\u23f1\ufe0f timed out" if timed_out else f"{FAIL} errored",
        "cancelled": "cancelled",
    }[state]
    lines = [f"**Build:** {escape_for_comment(build_id, 100)} {DASH} canary {outcome}", ""]
    if state != "passed":
        if verdict is not None:
            lines += [f"**Reason:** {escape_for_comment(verdict.reason, 1000)}", ""]
        if error and (verdict is None or error != verdict.reason):
            label = "Error" if state == "errored" else "Reason"
            lines += [f"**{label}:** {escape_for_comment(error, 1000)}", ""]
    if verdict is None:
        lines += ["No test results were recorded, so there are no metrics.", ""]
    else:
        lines += _metrics_table(verdict.metrics, thresholds)
        lines += _providers_table(verdict, runtime_versions)
    if link is not None:
        lines.append(
            f"Full metrics, and every test result at its `/results`: [metrics API]({link})"
        )
    while lines and not lines[-1]:
        lines.pop()

    full = "\n".join(lines)

    def note(left: int) -> str:
        chars = len(full) - len("\n".join(lines[: len(lines) - left]))
        return (
            f"_{ELLIPSIS} {chars:,} more characters of this summary were left out"
            f" (GitHub's size limit); the full metrics are in {_api(link)}._"
        )

    return _fit(lines, len(lines), note, keep_first=0)


def _metrics_table(m: Metrics, thresholds: Thresholds) -> list[str]:
    ran = m.ran > 0
    pass_ok = ran and m.pass_rate >= thresholds.min_pass_rate
    disconnect_ok = ran and m.disconnect_rate <= thresholds.max_disconnect_rate
    return [
        "### Metrics",
        "",
        "| Metric | Value | Threshold | |",
        "| --- | --- | --- | :-: |",
        f"| Pass rate | {_pct(m.pass_rate, thresholds.min_pass_rate) if ran else DASH}"
        f" | \u2265 {_pct(thresholds.min_pass_rate)} | {PASS if pass_ok else FAIL} |",
        f"| Disconnect rate"
        f" | {_pct(m.disconnect_rate, thresholds.max_disconnect_rate) if ran else DASH}"
        f" | \u2264 {_pct(thresholds.max_disconnect_rate)} | {PASS if disconnect_ok else FAIL} |",
        f"| Tests | {m.total_tests}: {m.passed} passed, {m.failed} failed, {m.errored} errored,"
        f" {m.skipped} skipped | | |",
        f"| Avg session start | {_ms(m.avg_session_start_ms)} | | |",
        f"| Avg time to first output | {_ms(m.avg_time_to_first_output_ms)} | | |",
        "",
        "The run passes only if every provider meets the thresholds on its own tests.",
        "",
    ]


def _providers_table(verdict: Verdict, runtime_versions: Mapping[str, str]) -> list[str]:
    expected = set(runtime_versions) or set(verdict.per_provider)
    lines = [
        "### Providers",
        "",
        "| Provider | Version | Tests | Pass rate | Disconnect rate | Avg session start"
        " | Verdict |",
        "| --- | --- | --: | --: | --: | --: | --- |",
    ]
    for provider in sorted(expected | set(verdict.per_provider)):
        m = verdict.per_provider.get(provider)
        ran = m is not None and m.ran > 0
        if provider in verdict.known_good_for:
            judged = f"{PASS} known-good"
        elif provider not in expected:
            judged = f"{DASH} not in the build"
        elif not ran:
            judged = f"{FAIL} no test ran"
        else:
            judged = f"{FAIL} below the thresholds"
        version = runtime_versions.get(provider)
        cells = [
            escape_for_comment(provider, 100),
            escape_for_comment(version, 100) if version is not None else DASH,
            str(m.total_tests) if m is not None else "0",
            _pct(m.pass_rate) if m is not None and ran else DASH,
            _pct(m.disconnect_rate) if m is not None and ran else DASH,
            _ms(m.avg_session_start_ms) if m is not None else DASH,
            judged,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _text(results: Sequence[TestResult], link: str | None) -> str:
    failed = [r for r in results if r.status in _FAILING]
    if not failed:
        return ""
    count = f"{len(failed):,} test{'' if len(failed) == 1 else 's'}"
    head = [f"### Failed and errored tests ({count})", ""]
    # Entries are made as they are needed: a suite of thousands of failures with long
    # messages has most of them left out, and escaping them all would cost seconds.
    lines = chain(head, map(_entry, failed))

    def note(tests: int) -> str:
        more = f"{tests:,} more failed or errored test" + (" was" if tests == 1 else "s were")
        return (
            f"_{ELLIPSIS} and {more} left out (GitHub's size limit);"
            f" the full list is at the `/results` beside {_api(link)}._"
        )

    return _fit(lines, len(head) + len(failed), note, keep_first=len(head))


def _entry(r: TestResult) -> str:
    entry = (
        f"- **{escape_for_comment(r.name, NAME_CHARS)}**"
        f" ({escape_for_comment(r.provider, 100)}, {escape_for_comment(r.status, 20)}"
        f"{', disconnected' if r.disconnected else ''})"
    )
    if r.message:
        entry += f": {escape_for_comment(r.message, MESSAGE_CHARS)}"
    return entry


def _failing_providers(verdict: Verdict | None, runtime_versions: Mapping[str, str]) -> list[str]:
    if verdict is None:
        return []
    expected = sorted(runtime_versions) or sorted(verdict.per_provider)
    return [p for p in expected if p not in verdict.known_good_for]


def _annotation(
    provider: str,
    verdict: Verdict,
    thresholds: Thresholds,
    runtime_versions: Mapping[str, str],
    manifest_path: str,
    manifest_text: str | None,
) -> dict[str, Any]:
    name = _plain(provider, 100)
    version = runtime_versions.get(provider)
    carried = f"{name} {_plain(version, 100)}" if version is not None else name
    m = verdict.per_provider.get(provider)
    if m is None or m.ran == 0:
        title = f"Canary: no {name} test ran"
        message = f"No test of {carried} ran in the canary, so it is not known-good."
    else:
        title = f"Canary: {name} below the thresholds"
        message = (
            f"{carried} fell below the canary thresholds: pass rate"
            f" {_pct(m.pass_rate, thresholds.min_pass_rate)}"
            f" (minimum {_pct(thresholds.min_pass_rate)}), disconnect rate"
            f" {_pct(m.disconnect_rate, thresholds.max_disconnect_rate)}"
            f" (maximum {_pct(thresholds.max_disconnect_rate)}); {m.passed} of {m.ran}"
            " tests passed."
        )
    line = manifest_line(manifest_text, provider)
    return {
        "path": manifest_path,
        "start_line": line,
        "end_line": line,
        "annotation_level": "failure",
        "message": message,
        "title": title,
    }


# -- formatting -------------------------------------------------------------------------------


def _fit(lines: Iterable[str], count: int, note: Callable[[int], str], *, keep_first: int) -> str:
    """The ``count`` ``lines`` joined, or, when that is over ``OUTPUT_BUDGET`` UTF-8 bytes,
    the longest run of whole lines from the start (at least ``keep_first`` of them) that
    fits with a blank line and ``note(lines left out)`` after it. Lines are taken from
    ``lines`` only until the budget is spent."""
    budget = OUTPUT_BUDGET
    # The note for more lines left out is never shorter, so this is room enough for it.
    reserve = 2 + _size(note(count))
    kept: list[str] = []
    used = -1  # no newline before the first line
    with_note = 0  # how many lines fit with the note after them
    for line in lines:
        used += 1 + _size(line)
        if used > budget:
            break
        kept.append(line)
        if used + reserve <= budget or len(kept) <= keep_first:
            with_note = len(kept)
    else:
        return "\n".join(kept)
    return "\n".join(kept[:with_note]) + "\n\n" + note(count - with_note)


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _pct(value: float, against: float | None = None) -> str:
    """A rate as a percentage with one decimal, without a trailing ".0"; with a bound to
    compare against, with more decimals (up to 4) when one would show the two as equal
    while they are not (94.96% is not shown as 95% next to a 95% minimum)."""
    text = _percent(value, 1)
    if against is not None and value != against:
        for digits in (2, 3, 4):
            if text != _percent(against, digits - 1):
                break
            text = _percent(value, digits)
    return text


def _percent(value: float, digits: int) -> str:
    return f"{value * 100:.{digits}f}".rstrip("0").rstrip(".") + "%"


def _ms(value: float | None) -> str:
    if value is None:
        return DASH
    if value < 10_000:
        return f"{value:,.0f} ms"
    return f"{value / 1000:,.1f} s"


def _plain(text: str, limit: int) -> str:
    """Untrusted text for a plain-text field: one line, no control or format (bidi)
    characters, at most ``limit`` characters."""
    flat = " ".join("".join(c for c in text if c.isprintable() or c.isspace()).split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + ELLIPSIS


def _link(url: str) -> str:
    """A Markdown link destination for an http(s) URL: in angle brackets, with anything
    that could end it (spaces, ``<``, ``>``, newlines) percent-encoded."""
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ValueError(f"metrics_url must be an http or https URL, not {url!r}")
    return "<" + quote(url, safe="!#$%&'()*+,-./:;=?@[]_~") + ">"


def _api(link: str | None) -> str:
    return "the [metrics API](" + link + ")" if link is not None else "the metrics API"


def _json_string(literal: str) -> str | None:
    try:
        value = json.loads(literal)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
