"""A canary outcome as check run content: conclusions, titles, tables, escaping, GitHub's
size limits, annotations on the manifest and their batches."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from app.github.commands import ZWJ
from app.pipeline.canary import report
from app.pipeline.canary.metrics import TestResult as Result
from app.pipeline.canary.metrics import Thresholds, Verdict, judge
from app.pipeline.canary.report import (
    GITHUB_OUTPUT_LIMIT,
    CheckOutput,
    annotation_batches,
    check_output,
    manifest_line,
)

THRESHOLDS = Thresholds(min_pass_rate=0.95, max_disconnect_rate=0.05)
VERSIONS = {"claude_code": "2.1.0", "codex": "0.46.0"}
MANIFEST = json.dumps(VERSIONS, indent=2) + "\n"  # claude_code on line 2, codex on line 3
URL = "https://pipeline.example/api/update-pipeline/canary/build-1/metrics"


def suite(provider: str, passed: int, failed: int = 0, **extra: Any) -> list[Result]:
    return [
        Result(f"{provider}-pass-{n}", provider, "passed", session_start_ms=400.0, **extra)
        for n in range(passed)
    ] + [
        Result(f"{provider}-fail-{n}", provider, "failed", message=f"assertion {n} failed")
        for n in range(failed)
    ]


def outcome(
    results: list[Result],
    *,
    state: str | None = None,
    verdict: Verdict | None = None,
    judged: bool = True,
    versions: dict[str, str] | None = None,
    **options: Any,
) -> CheckOutput:
    versions = VERSIONS if versions is None else versions
    if judged and verdict is None:
        verdict = judge(results, versions, THRESHOLDS)
    options.setdefault("metrics_url", URL)
    options.setdefault("manifest_text", MANIFEST)
    return check_output(
        "build-1",
        verdict,
        state=state or (verdict.state if verdict else "errored"),
        results=results,
        thresholds=THRESHOLDS,
        runtime_versions=versions,
        manifest_path="runtimes.json",
        **options,
    )


def row(summary: str, first_cell: str) -> str:
    (line,) = [x for x in summary.splitlines() if x.startswith(f"| {first_cell} |")]
    return line


def size(text: str) -> int:
    return len(text.encode())


# -- outcomes ---------------------------------------------------------------------------


def test_a_passing_canary() -> None:
    results = suite("claude_code", 50) + suite("codex", 48, 1)
    results.append(Result("codex-flaky", "codex", "passed", disconnected=True))
    out = outcome(results)
    assert out.conclusion == "success"
    assert out.title == "Canary passed: 99% pass rate, 1% disconnects"
    assert "canary \u2705 passed" in out.summary
    assert row(out.summary, "Pass rate") == "| Pass rate | 99% | \u2265 95% | \u2705 |"
    assert row(out.summary, "Disconnect rate") == "| Disconnect rate | 1% | \u2264 5% | \u2705 |"
    assert "| Tests | 100: 99 passed, 1 failed, 0 errored, 0 skipped | | |" in out.summary
    assert "| Avg session start | 400 ms | | |" in out.summary
    assert "| Avg time to first output | \u2014 | | |" in out.summary  # None is a dash
    assert row(out.summary, r"claude\_code") == (
        r"| claude\_code | 2\.1\.0 | 50 | 100% | 0% | 400 ms | ✅ known-good |"
    )
    assert row(out.summary, "codex") == (
        r"| codex | 0\.46\.0 | 50 | 98% | 2% | 400 ms | ✅ known-good |"
    )
    assert f"[metrics API](<{URL}>)" in out.summary
    assert "Reason" not in out.summary and "Error" not in out.summary
    # The one failed test is still listed; nothing is annotated.
    assert out.text.splitlines()[0] == "### Failed and errored tests (1 test)"
    assert out.annotations == []
    assert out.output() == {"title": out.title, "summary": out.summary, "text": out.text}


def test_a_provider_below_the_thresholds_fails_the_canary() -> None:
    results = suite("claude_code", 50) + suite("codex", 40, 10)
    out = outcome(results)
    assert out.conclusion == "failure"
    assert out.title == "Canary failed (codex): 90% pass rate, 0% disconnects"
    assert r"**Reason:** below the thresholds\: codex" in out.summary
    assert row(out.summary, "Pass rate").endswith("| \u274c |")
    assert row(out.summary, "codex") == (
        r"| codex | 0\.46\.0 | 50 | 80% | 0% | 400 ms | ❌ below the thresholds |"
    )
    assert "✅ known-good" in row(out.summary, r"claude\_code")
    assert out.annotations == [
        {
            "path": "runtimes.json",
            "start_line": 3,
            "end_line": 3,
            "annotation_level": "failure",
            "message": "codex 0.46.0 fell below the canary thresholds: pass rate 80%"
            " (minimum 95%), disconnect rate 0% (maximum 5%); 40 of 50 tests passed.",
            "title": "Canary: codex below the thresholds",
        }
    ]
    lines = out.text.splitlines()
    assert lines[:2] == ["### Failed and errored tests (10 tests)", ""]
    assert lines[2] == r"- **codex\-fail\-0** (codex, failed): assertion 0 failed"
    assert len(lines) == 12


def test_a_provider_that_ran_no_test_and_one_not_in_the_build() -> None:
    results = suite("claude_code", 20) + suite("gemini", 3)
    out = outcome(results)
    assert out.conclusion == "failure"
    assert row(out.summary, "codex") == r"| codex | 0\.46\.0 | 0 | — | — | — | ❌ no test ran |"
    assert row(out.summary, "gemini") == (
        "| gemini | \u2014 | 3 | 100% | 0% | 400 ms | \u2014 not in the build |"
    )
    (note,) = out.annotations
    assert note["start_line"] == 3
    assert note["title"] == "Canary: no codex test ran"
    assert out.text == ""
    assert "text" not in out.output()


def test_rates_get_more_decimals_rather_than_look_like_the_threshold() -> None:
    results = suite("codex", 9496, 504)  # 94.96%: "95%" would read as passing
    out = outcome(results, versions={"codex": "0.46.0"})
    assert row(out.summary, "Pass rate") == "| Pass rate | 94.96% | \u2265 95% | \u274c |"
    assert "94.96% pass rate" in out.title
    assert "pass rate 94.96% (minimum 95%)" in out.annotations[0]["message"]
    assert "33.3%" in report._pct(1 / 3)


def test_errored_with_no_results() -> None:
    out = outcome([], error="the canary workflow failed before reporting")
    assert out.conclusion == "failure"
    assert out.title == "Canary errored: no test ran"
    assert r"**Reason:** no test ran" in out.summary
    assert r"**Error:** the canary workflow failed before reporting" in out.summary
    assert "| Pass rate | \u2014 | \u2265 95% | \u274c |" in out.summary
    assert out.text == ""
    # Nothing ran for any provider: every one is annotated on its own line.
    assert [(a["title"], a["start_line"]) for a in out.annotations] == [
        ("Canary: no claude_code test ran", 2),
        ("Canary: no codex test ran", 3),
    ]

    unjudged = outcome([], judged=False, error="the workflow crashed")
    assert unjudged.conclusion == "failure"
    assert unjudged.title == "Canary errored: the workflow crashed"
    assert "No test results were recorded" in unjudged.summary
    assert "### Metrics" not in unjudged.summary
    assert unjudged.annotations == []


def test_timed_out() -> None:
    out = outcome([], judged=False, error="no results within 0:30:00", timed_out=True)
    assert out.conclusion == "timed_out"
    assert out.title == "Canary timed out: no results within 0:30:00"
    assert r"**Error:** no results within 0\:30\:00" in out.summary
    assert "timed out" in out.summary.splitlines()[0]
    assert out.annotations == [] and out.text == ""
    with pytest.raises(ValueError, match="timed_out"):
        outcome(suite("codex", 5), timed_out=True)  # a passed run did not time out
    with pytest.raises(ValueError, match="timed_out"):
        outcome([], judged=False, timed_out=True, cancelled=True)


def test_cancelled() -> None:
    superseded = outcome(
        [], judged=False, state="errored", cancelled=True, error="superseded by a re-run"
    )
    assert superseded.conclusion == "cancelled"
    assert superseded.title == "Canary cancelled: superseded by a re-run"
    assert r"**Reason:** superseded by a re\-run" in superseded.summary
    assert superseded.annotations == []
    by_state = outcome(suite("claude_code", 1, 1), state="cancelled")
    assert by_state.conclusion == "cancelled"
    assert by_state.title == "Canary cancelled"
    assert by_state.annotations == []  # a cancelled run judges no provider
    with pytest.raises(ValueError, match="state"):
        outcome([], judged=False, state="running")


def test_the_metrics_link_is_optional_and_only_http() -> None:
    out = outcome(suite("codex", 5), versions={"codex": "1"}, metrics_url=None)
    assert "metrics API" not in out.summary
    hostile = "https://x.example/a b<c>)\n[y](javascript:alert(1))"
    linked = outcome(suite("codex", 5), versions={"codex": "1"}, metrics_url=hostile)
    (line,) = [x for x in linked.summary.splitlines() if "metrics API" in x]
    assert line.endswith(
        "[metrics API](<https://x.example/a%20b%3Cc%3E)%0A[y](javascript:alert(1))>)"
    )
    with pytest.raises(ValueError, match="http"):
        outcome(suite("codex", 5), metrics_url="javascript:alert(1)")


# -- untrusted text ---------------------------------------------------------------------


HOSTILE_NAME = "@everyone <script>alert(1)</script> [x](javascript:alert(1)) `code` #1"
HOSTILE_MESSAGE = "see ](javascript:alert(1)) ``` fenced\n# heading\n<img src=x onerror=y> @admin"


def test_hostile_test_names_and_messages_are_escaped() -> None:
    results = [Result(HOSTILE_NAME, "codex", "errored", message=HOSTILE_MESSAGE)]
    out = outcome(results, versions={"codex": "0.46.0"})
    entry = out.text.splitlines()[2]
    assert "\n" not in entry  # one list item, no heading from the message
    assert "<" not in entry and ">" not in entry  # no HTML
    assert "&lt;script&gt;" in entry
    assert "@everyone" not in entry and f"@{ZWJ}everyone" in entry  # nobody is pinged
    assert "@admin" not in entry
    assert f"\\#{ZWJ}1" in entry  # no issue reference
    # Every bracket, parenthesis and backtick is escaped: no link, no code span.
    assert re.search(r"(?<!\\)[\[\]()`]", entry.replace("**", "", 2).split(" (codex")[0]) is None
    message = entry.split("(codex, errored): ", 1)[1]
    assert re.search(r"(?<!\\)[\[\]()`]", message) is None
    assert r"\]\(javascript\:alert\(1\)\)" in message
    assert r"\`\`\`" in message


def test_hostile_provider_names_versions_and_build_ids_are_escaped() -> None:
    provider = "x|y"
    results = [Result("t", provider, "failed", message="m")]
    versions = {provider: "1.0 <b>|`x`"}
    out = outcome(results, versions=versions, manifest_text=None)
    table = row(out.summary, r"x\|y")
    assert table.count("|") - table.count(r"\|") == 8  # still seven cells
    assert "<b>" not in out.summary and r"\`x\`" in table
    assert out.annotations[0]["start_line"] == 1
    built = check_output(
        "build `@here`",
        None,
        state="errored",
        thresholds=THRESHOLDS,
        runtime_versions={},
        manifest_path="m.json",
    )
    assert r"**Build:** build \`@" + ZWJ + r"here\`" in built.summary
    assert built.text == ""


def test_long_names_and_messages_are_cut() -> None:
    results = [Result("n" * 5000, "codex", "failed", message="m" * 5000)]
    entry = outcome(results, versions={"codex": "1"}).text.splitlines()[2]
    name = entry.split("**")[1]
    message = entry.split("): ", 1)[1]
    assert len(name) == report.NAME_CHARS and name.endswith("\u2026")
    assert len(message) == report.MESSAGE_CHARS and message.endswith("\u2026")


def test_control_characters_stay_out_of_titles_and_annotations() -> None:
    provider = "co\u202edex\x00\nnext"
    results = [Result("t", provider, "failed")]
    out = outcome(results, versions={provider: "1\u202e.0\n"}, manifest_text=None)
    assert "\u202e" not in out.title and "\n" not in out.title and "\x00" not in out.title
    (note,) = out.annotations
    assert note["title"] == "Canary: codex next below the thresholds"
    assert note["message"].startswith("codex next 1.0 fell below")


# -- GitHub's limits --------------------------------------------------------------------


def test_ten_thousand_failing_tests_are_cut_to_fit() -> None:
    long = "\u00e9@<" * 2000  # two-byte letters and escapes: bytes, not characters, count
    results = [
        Result(f"test {n} " + "x" * 300, "codex", "failed", message=f"{n}: {long}")
        for n in range(10_000)
    ]
    out = outcome(results, versions={"codex": "0.46.0"})
    assert size(out.summary) <= GITHUB_OUTPUT_LIMIT
    assert size(out.text) <= GITHUB_OUTPUT_LIMIT
    assert size(out.text) > report.OUTPUT_BUDGET - 2000  # filled, not cut short
    lines = out.text.splitlines()
    assert lines[0] == "### Failed and errored tests (10,000 tests)"
    shown = [x for x in lines if x.startswith("- **")]
    assert lines[-2] == ""
    left_out = re.fullmatch(
        r"_… and ([\d,]+) more failed or errored tests were left out \(GitHub's size"
        r" limit\); the full list is at the `/results` beside the \[metrics API\]\(<(.+)>\)\._",
        lines[-1],
    )
    assert left_out is not None
    assert len(shown) + int(left_out[1].replace(",", "")) == 10_000
    assert left_out[2] == URL
    # Whole entries only, in order.
    assert all(x.startswith(f"- **test {n} ") for n, x in enumerate(shown))
    assert all(x.endswith("\u2026") for x in shown)

    # Without a link the note still says where the list is.
    plain = outcome(results, versions={"codex": "0.46.0"}, metrics_url=None)
    assert plain.text.splitlines()[-1].endswith("`/results` beside the metrics API._")


def test_cutting_is_exact_around_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # Entries longer than the note: one byte over the budget leaves out exactly one.
    results = [Result(f"t{n}", "codex", "failed", message="m" * 600) for n in range(20)]
    full = outcome(results, versions={"codex": "1"}).text
    monkeypatch.setattr(report, "OUTPUT_BUDGET", size(full))
    assert outcome(results, versions={"codex": "1"}).text == full  # exactly fits: not cut
    monkeypatch.setattr(report, "OUTPUT_BUDGET", size(full) - 1)
    cut = outcome(results, versions={"codex": "1"}).text
    assert size(cut) <= size(full) - 1
    *kept, blank, note = cut.splitlines()
    assert kept == full.splitlines()[:-1] and blank == ""
    assert note.startswith("_… and 1 more failed or errored test was left out")
    # Far smaller budgets: whole entries, in order, and an accurate count.
    for budget in (2000, 5000, 9000):
        monkeypatch.setattr(report, "OUTPUT_BUDGET", budget)
        cut = outcome(results, versions={"codex": "1"}).text
        assert size(cut) <= budget
        shown = [x for x in cut.splitlines() if x.startswith("- **")]
        assert shown == full.splitlines()[2 : 2 + len(shown)]
        assert len(shown) + int(re.findall(r"and (\d+) more", cut)[0]) == 20
        # Nearly full: one more entry would not have fitted.
        assert budget - size(cut) < size(shown[0]) + 200


def test_a_summary_of_thousands_of_providers_is_cut_to_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = [Result("t", f"provider_{n:05d}_" + "p" * 40, "passed") for n in range(3000)]
    versions: dict[str, str] = {}
    out = outcome(results, versions=versions)
    assert size(out.summary) <= GITHUB_OUTPUT_LIMIT
    *_, blank, note = out.summary.splitlines()
    assert blank == ""
    found = re.fullmatch(
        r"_… ([\d,]+) more characters of this summary were left out \(GitHub's size limit\);"
        r" the full metrics are in the \[metrics API\]\(<.+>\)\._",
        note,
    )
    assert found is not None
    kept = out.summary[: out.summary.rindex("\n\n")]
    monkeypatch.setattr(report, "OUTPUT_BUDGET", 10**9)
    full = outcome(results, versions=versions).summary
    assert full.startswith(kept + "\n")
    assert int(found[1].replace(",", "")) == len(full) - len(kept)
    assert full.endswith(f"[metrics API](<{URL}>)")


def test_annotations_are_sent_fifty_at_a_time() -> None:
    annotations = [{"n": n} for n in range(120)]
    batches = annotation_batches(annotations)
    assert [len(b) for b in batches] == [50, 50, 20]
    assert [a for b in batches for a in b] == annotations
    assert annotation_batches([]) == []
    assert [len(b) for b in annotation_batches(annotations[:100])] == [50, 50]
    assert [len(b) for b in annotation_batches(annotations[:7], size=3)] == [3, 3, 1]
    for size_ in (0, 51):
        with pytest.raises(ValueError):
            annotation_batches(annotations, size=size_)
    out = outcome(suite("codex", 1, 1), versions={"codex": "1"})
    assert out.output(out.annotations)["annotations"] == out.annotations
    with pytest.raises(ValueError):
        out.output(annotations)  # 120 at once is too many


# -- the manifest -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ('{\n  "claude_code": "2.1.0",\n  "codex": "0.46.0"\n}\n', "codex", 3),
        ('{\n  "claude_code": "2.1.0",\n  "codex": "0.46.0"\n}\n', "claude_code", 2),
        ('{"claude_code": "2.1.0", "codex": "0.46.0"}', "codex", 1),
        ('\n\n{"claude_code": "2.1.0", "codex": "0.46.0"}', "codex", 3),
        ('{\n  "claude_code": "2.1.0"\n}\n', "codex", 1),  # missing
        (None, "codex", 1),
        ("", "codex", 1),
        # Odd layouts: key and colon apart, several keys a line, CRLF, tabs.
        ('{\r\n\t"claude_code"\r\n\t:\r\n\t"2.1.0",\r\n\t"codex"\r\n\t: "1"\r\n}', "codex", 5),
        ('{ "a": "1",\n  "b": "2", "codex":\n  "3" }', "codex", 2),
        # A value equal to the key, or the key inside a string, is not the key.
        (
            '{\n  "claude_code": "codex",\n  "note": "\\"codex\\": x",\n  "codex": "1"\n}',
            "codex",
            4,
        ),
        ('{\n  "claude_code": "codex"\n}', "codex", 1),
        # Escaped keys are keys; a duplicated key is where a JSON parser takes it from.
        ('{\n  "cod\\u0065x": "1"\n}', "codex", 2),
        ('{\n  "codex": "1",\n  "codex": "2"\n}', "codex", 3),
        # A nested key counts only when there is no top-level one.
        ('{\n  "runtimes": {\n    "codex": "1"\n  }\n}', "codex", 3),
        ('{\n  "x": {"codex": "1"},\n  "codex": "2"\n}', "codex", 3),
        # Broken JSON still gets a line.
        ('{\n  "claude_code": "2.1.0",,\n  "codex": "0.46.0"', "codex", 3),
        ('{\n  "unterminated', "codex", 1),
    ],
)
def test_the_manifest_line_of_a_provider(text: str | None, key: str, line: int) -> None:
    assert manifest_line(text, key) == line


def test_annotations_follow_the_manifest_layout() -> None:
    results = suite("claude_code", 1, 5) + suite("codex", 1, 5)
    one_line = outcome(results, manifest_text=json.dumps(VERSIONS))
    assert [a["start_line"] for a in one_line.annotations] == [1, 1]
    pretty = outcome(results, manifest_text='{\n\n  "codex": "0.46.0",\n  "claude_code": "2.1.0"}')
    assert [(a["title"], a["start_line"], a["end_line"]) for a in pretty.annotations] == [
        ("Canary: claude_code below the thresholds", 4, 4),
        ("Canary: codex below the thresholds", 3, 3),
    ]
    missing = outcome(results, manifest_text="{}")
    assert [a["start_line"] for a in missing.annotations] == [1, 1]
