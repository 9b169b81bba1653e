"""Fuzzing every parser directly: whatever the input, a parser returns a valid value or
refuses it with its own error, which names what is wrong; no other exception escapes.

Covered: slash commands in comments (commands.py), the checkboxes of tracking issues
(tracking.py), stage plans and durations (plan.py, config.py), the settings from the
environment (Settings.from_env), the providers file (providers.py), a repository's
``.github/update-pipeline.yml`` (sweeps/config.py), semantic versions (the heartbeat's
runtimes and build manifests go through it), canary results and their judgement, and
the parts of webhook payloads read at intake or for permissions.

The inputs are hostile on purpose: any Unicode (line and paragraph separators, bidi
controls, non-ASCII digits), huge comments, nested code fences, mentions, and documents
that are almost valid. tests/fuzzing.py says how to run a longer search.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from app import config as config_module
from app.config import ConfigError, Settings, format_duration, parse_duration
from app.github.commands import MAX_BODY_CHARS, MAX_COMMANDS, Permission, parse_commands
from app.github.commands import permission_from as permission_in
from app.github.tracking import listed, ticked
from app.github.webhooks import delivery_fields
from app.pipeline.canary import metrics as canary
from app.pipeline.version.providers import (
    BUILTIN_PROVIDERS,
    ProvidersFileError,
    load_providers,
)
from app.pipeline.version.semver import Version
from app.rollouts.plan import Stage, format_stages, parse_stages
from app.sweeps import config as sweep_config
from app.sweeps.config import INPUT_VALUE_MAX, SweepConfig, parse_config
from tests.fuzzing import fuzz, json_values, text

# -- Slash commands -----------------------------------------------------------------------

KNOWN = ("help", "pause", "rollback", "advance", "approve", "freeze", "sweep")


def one_line(raw: str) -> str:
    """Only CR and LF end a line in Markdown (U+2028 and friends do not)."""
    return raw.replace("\r", " ").replace("\n", " ")


# Text that can sit on a line of its own without being a command, a fence or a quote.
PROSE = text(30).map(lambda s: "x" + one_line(s))
ARGS = text(40).map(one_line) | st.sampled_from(
    ["@octocat", "@org/team", "#12", "<b>x</b>", "`code`", "x" * 2000, "\u202eevil", "a\u2028b"]
)
NAMES = st.sampled_from(KNOWN).flatmap(
    lambda name: st.sampled_from([name, name.upper(), name.capitalize()])
)


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[str, tuple[str, str]]:
    """A command line as people type it, and the (name, args) it must parse to."""
    name = draw(NAMES)
    indent = " " * draw(st.integers(0, 3))
    args = draw(st.none() | ARGS)
    if args is None:
        return f"{indent}/{name}", (name.lower(), "")
    separator = draw(st.sampled_from([" ", "\t", "\u00a0", "  "]))
    return f"{indent}/{name}{separator}{args}", (name.lower(), args.strip())


@st.composite
def fenced(draw: st.DrawFn) -> list[str]:
    """A fenced code block full of commands (and shorter or other fences, nested)."""
    char = draw(st.sampled_from("`~"))
    size = draw(st.integers(3, 6))
    other = "~" if char == "`" else "`"
    inside = draw(
        st.lists(
            command_lines().map(lambda c: c[0])
            | PROSE
            | st.just(char * (size - 1))  # shorter: does not close
            | st.just(other * size)  # the other character: does not close either
            | st.just(char * size + " not a close"),
            max_size=5,
        )
    )
    info = draw(st.sampled_from(["", "python", "sh {.x}"])) if char == "`" else ""
    return [char * size + info, *inside, char * draw(st.integers(size, size + 2))]


@st.composite
def comments(draw: st.DrawFn) -> tuple[str, list[tuple[str, str, int]]]:
    """A comment made of paragraphs, fenced blocks, quotes and commands, with the
    commands it holds: exactly the command lines outside fences and quotes."""
    lines: list[str] = []
    expected: list[tuple[str, str, int]] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["command", "prose", "fence", "quote", "blank"]))
        if kind == "command":
            line, (name, args) = draw(command_lines())
            lines.append(line)
            expected.append((name, args, len(lines)))
        elif kind == "prose":
            lines.append(draw(PROSE))
        elif kind == "fence":
            lines += draw(fenced())
        elif kind == "quote":
            # A quote's paragraph takes in the next line: the command is quoted too.
            lines += ["> " + draw(PROSE), draw(command_lines())[0], ""]
        else:
            lines.append(draw(st.sampled_from(["", " ", "\t"])))
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return ending.join(lines), expected


@fuzz(100)
@given(comments())
@example(("```\n/pause\n~~~\n/pause\n````\n/pause", [("pause", "", 6)]))  # ```` closes ```
@example(("> quote\n/rollback now", []))
def test_commands_are_exactly_the_command_lines_outside_code_and_quotes(
    comment: tuple[str, list[tuple[str, str, int]]],
) -> None:
    body, expected = comment
    found = [(c.name, c.args, c.line) for c in parse_commands(body, KNOWN)]
    assert found == expected[:MAX_COMMANDS]


@fuzz(100)
@given(text(300), st.integers(0, 3))
def test_any_comment_parses_to_commands_on_its_own_lines(noise: str, count: int) -> None:
    body = "\n".join([noise, *["/pause now"] * count, noise])
    lines = re.split(r"\r\n|\r|\n", body)
    for command in parse_commands(body, KNOWN):
        assert command.name in KNOWN
        assert lines[command.line - 1].lstrip(" ").lower().startswith("/" + command.name)


@fuzz(10)
@given(st.integers(0, 200), st.sampled_from(["x", "\u00e9", "\U0001f600", "`", "/"]))
def test_only_the_start_of_a_huge_comment_is_read(extra: int, filler: str) -> None:
    # GitHub caps comments at 65,536 characters; anything past that cannot be from GitHub.
    body = filler * (MAX_BODY_CHARS + extra) + "\n/pause\n"
    assert parse_commands(body, KNOWN) == []
    many = "\n".join(["/pause"] * (MAX_COMMANDS * 50))
    assert len(parse_commands(many, KNOWN)) == MAX_COMMANDS


@fuzz(100)
@given(text(300))
def test_checkboxes_read_from_an_issue_body_are_org_ids(body: str) -> None:
    org = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
    assert ticked(body) <= listed(body)
    assert all(org.fullmatch(o) for o in listed(body))


# -- Stage plans and durations --------------------------------------------------------------

PLANNISH = st.text(st.sampled_from(list("0123456789.,%:hmsd \t\u0661")), max_size=30)


@fuzz(300)
@given(PLANNISH | text(30))
@example("1%:1h,10%:2h,50%:4h,100%")
@example("\u0661%:1h,100%")  # an Arabic-Indic one: \d takes it, so does float()
@example("50%:" + "9" * 5000 + "d,100%")
def test_a_stage_plan_parses_to_a_valid_plan_or_is_refused(plan: str) -> None:
    try:
        stages = parse_stages(plan)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    shares = [s.percentage for s in stages]
    assert shares == sorted(set(shares)) and shares[0] > 0 and shares[-1] == 100
    assert stages[-1].duration is None
    assert all(s.duration is not None and s.duration > timedelta(0) for s in stages[:-1])
    # What the settings store is the formatted plan: it must read back the same.
    assert parse_stages(format_stages(stages)) == stages


@st.composite
def plans(draw: st.DrawFn) -> tuple[Stage, ...]:
    hundredths = draw(st.lists(st.integers(1, 9999), unique=True, max_size=5))
    minutes = st.integers(1, 60 * 24 * 30).map(lambda m: timedelta(minutes=m))
    return (
        *(Stage(h / 100, draw(minutes)) for h in sorted(hundredths)),
        Stage(100.0, None),
    )


@fuzz(100)
@given(plans())
def test_every_valid_plan_reads_back_as_written(stages: tuple[Stage, ...]) -> None:
    assert parse_stages(format_stages(stages)) == stages


@fuzz(200)
@given(st.text(st.sampled_from(list("0123456789msdh \u0661\u00b2")), max_size=20) | text(20))
@example("9" * 5000 + "s")  # longer than int() converts
@example("99999999999999999d")
def test_a_duration_parses_to_a_span_or_is_refused_quoting_it(raw: str) -> None:
    try:
        span = parse_duration(raw)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert span >= timedelta(0)
    assert parse_duration(format_duration(span)) == span


# -- Settings from the environment ------------------------------------------------------------

# Reading a file these name is covered below (the providers file) and by tests/test_config.py.
FILE_VARIABLES = ("GITHUB_PRIVATE_KEY_PATH", "UPDATE_PIPELINE_PROVIDERS_FILE")
VARIABLES = sorted(
    set(
        re.findall(
            r'"((?:UPDATE_PIPELINE|GITHUB)_[A-Z_]+)"', Path(config_module.__file__).read_text()
        )
    )
    - set(FILE_VARIABLES)
)
PLAUSIBLE = st.sampled_from(
    [
        "",
        " ",
        "true",
        "0",
        "1",
        "-1",
        "1024",
        "65536",
        "0.5",
        "nan",
        "1e-400",
        "30s",
        "1h30m",
        "0s",
        "1%:1h,100%",
        "https://example.test/",
        "http://[::1",
        "acme/runner",
        "@acme/team",
        "pause=maintain",
        "canary.yml",
        "\u0661\u0662",
        "\u00b2",
        "9" * 5000,
    ]
)


@fuzz(150)
@given(st.dictionaries(st.sampled_from(VARIABLES), PLAUSIBLE | text(30), max_size=8))
@example({"UPDATE_PIPELINE_PORT": "\u00b2"})  # isdigit() says yes, int() says no
@example({"UPDATE_PIPELINE_MAX_BODY_BYTES": "9" * 5000})
def test_settings_come_out_valid_or_every_problem_names_its_variable(env: dict[str, str]) -> None:
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            named = problem.split(":", 1)[0]
            assert named in env or "GITHUB_APP_ID" in problem, problem
        return
    # What was accepted is what the rest of the app relies on.
    assert 0 <= settings.port <= 65535
    assert settings.max_body_bytes >= 1024 and settings.webhook_max_bytes >= 1024
    assert parse_stages(settings.stages_stable) and parse_stages(settings.stages_beta)
    rates = [settings.max_failure_rate, settings.canary_min_pass_rate, settings.sweep_gate]
    assert all(r is None or 0 <= r <= 1 for r in rates)
    assert settings.poll_interval > timedelta(0) and settings.sweep_concurrency >= 1


# -- The providers file -----------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if value == value else "nan"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + pairs + "}"
    return json.dumps(value, ensure_ascii=False)  # near enough to a TOML basic string


def providers_toml(document: dict[str, dict[str, Any]], extra: str) -> str:
    lines = []
    for provider, table in document.items():
        lines.append(f"[providers.{_toml_key(provider)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + extra


PROVIDER_IDS = st.sampled_from(["codex", "claude_code", "aider", "Bad-Id", "x" * 70, ""]) | text(8)
SOURCES = (
    st.sampled_from(
        ["@openai/codex", "aider-chat", "openai/codex", "UPPER", "@scope/", "https://x", ""]
    )
    | st.booleans()
    | json_values(surrogates=False)
)
TABLES = st.dictionaries(
    st.sampled_from(["name", "npm", "github", "other"]),
    SOURCES | text(20),
    max_size=4,
)


@fuzz(60)
@given(
    document=st.dictionaries(PROVIDER_IDS, TABLES, max_size=3),
    extra=st.sampled_from(["", "\n", "\nunknown = 1", "\n[providers", "\nproviders = 3", "\n\x7f"])
    | text(20).map(lambda t: "\n" + t),
)
def test_the_providers_file_gives_valid_providers_or_problems_with_a_line(
    tmp_path_factory: pytest.TempPathFactory, document: dict[str, dict[str, Any]], extra: str
) -> None:
    path = tmp_path_factory.mktemp("providers") / "providers.toml"
    content = providers_toml(document, extra)
    path.write_text(content, encoding="utf-8")
    try:
        providers = load_providers(path)
    except ProvidersFileError as exc:
        line_count = content.count("\n") + 1
        for problem in exc.problems:
            assert problem.startswith(str(path)), problem
            where = problem[len(str(path)) :].split(": ", 1)[0]
            assert where == "" or 1 <= int(where.removeprefix(":")) <= line_count, problem
        return
    assert providers[: len(BUILTIN_PROVIDERS)] == tuple(
        next(p for p in providers if p.id == b.id) for b in BUILTIN_PROVIDERS
    )
    for provider in providers:
        assert re.fullmatch(r"[a-z][a-z0-9_]{0,63}", provider.id)
        assert provider.npm_package or provider.github_repo
        assert provider.name.strip() and provider.name.isprintable()


# -- .github/update-pipeline.yml ---------------------------------------------------------------

PROVIDERS = ("claude_code", "codex", "gemini_cli")
VALID_SWEEP = {
    "workflow": "sweep.yml",
    "ref": "main",
    "providers": ["codex"],
    "inputs": {"suite": "smoke"},
}
FIELDS = ("workflow", "ref", "providers", "inputs")


def _valid_config(config: SweepConfig) -> None:
    assert re.fullmatch(r"[A-Za-z0-9._-]+\.ya?ml", config.workflow)
    assert config.providers is None or set(config.providers) <= set(PROVIDERS)
    for name, value in config.inputs.items():
        assert isinstance(value, str) and len(value) <= INPUT_VALUE_MAX, name
    for value in [config.ref or "", *config.inputs, *config.inputs.values()]:
        # It is stored and served as JSON, and sent to GitHub: Unicode text only.
        value.encode("utf-8")


@fuzz(100)
@given(
    field=st.sampled_from([*FIELDS, "unknown"]),
    value=json_values(surrogates=False)
    | st.sampled_from(["../x.yml", "a b", "refs/..", "x" * 300, "\ud800", ["\udfff"]])
    | st.dictionaries(text(12), text(12, surrogates=True) | json_values(), max_size=4),
    drop=st.booleans(),
)
@example(field="ref", value="main\ud800", drop=False)  # a YAML "\ud800" escape
@example(field="inputs", value={"suite": "\udfff"}, drop=False)
def test_a_sweep_config_with_one_bad_field_is_refused_naming_that_field(
    field: str, value: Any, drop: bool
) -> None:
    sweep: dict[str, Any] = dict(VALID_SWEEP)
    if drop:
        sweep.pop(field, None)
    else:
        sweep[field] = value
    document = yaml.safe_dump({"sweep": sweep}, allow_unicode=False)
    try:
        config = parse_config(document, PROVIDERS)
    except sweep_config.ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith((f"sweep.{field}", "sweep: unknown key", "line ")), message
        if message.startswith("line "):  # a value YAML itself cannot hold
            assert re.match(r"line \d+, column \d+: ", message), message
        return
    assert config is not None
    _valid_config(config)


@fuzz(150)
@given(text(200, surrogates=False) | st.binary(max_size=200))
@example(b"sweep: &a [*a]")
@example("sweep:\n" + "  - " * 40 + "x")
@example('sweep:\n  workflow: s.yml\n  ref: "\\ud800"')
def test_any_sweep_config_text_parses_or_is_refused_in_one_line(document: str | bytes) -> None:
    try:
        config = parse_config(document, PROVIDERS)
    except sweep_config.ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    if config is not None:
        _valid_config(config)


# -- Semantic versions (heartbeat runtimes, build manifests) -----------------------------------

STRICT_SEMVER = re.compile(
    r"v?(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*)?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?",
    re.ASCII,
)
VERSIONISH = st.text(st.sampled_from(list("0123456789.-+vabrc \u0661\u00b2\uff11")), max_size=16)


@fuzz(300)
@given(VERSIONISH | text(20))
@example("1\u0661.0.0")  # an Arabic-Indic digit: not a semantic version
@example("1.0.0-\u00b2")
@example("1." + "9" * 5000 + ".0")
def test_a_version_is_a_semantic_version_in_ascii_or_is_refused(raw: str) -> None:
    try:
        version = Version(raw)
    except ValueError as exc:
        assert "semantic version" in str(exc) or "digits" in str(exc)
        return
    # It is recorded as it was reported, so what is accepted must be SemVer's own text.
    assert STRICT_SEMVER.fullmatch(version.canonical) or STRICT_SEMVER.fullmatch(
        "v" + version.canonical
    )
    assert Version(version.canonical) == version


# -- Canary results ---------------------------------------------------------------------------

MILLISECONDS = st.none() | st.floats(0, 86_400_000) | st.integers(0, 86_400_000)
RESULTS = st.lists(
    st.builds(
        canary.TestResult,
        name=text(30).filter(bool),
        provider=st.sampled_from(["codex", "claude_code", "gemini_cli", "other"]),
        status=st.sampled_from(canary.TEST_STATUSES),
        session_start_ms=MILLISECONDS,
        time_to_first_output_ms=MILLISECONDS,
        disconnected=st.booleans(),
        message=st.none() | text(50),
    ),
    max_size=30,
)


@fuzz(60)
@given(
    results=RESULTS,
    providers=st.lists(st.sampled_from(["codex", "claude_code", "gemini_cli"]), max_size=3),
    thresholds=st.builds(canary.Thresholds, st.floats(0, 1), st.floats(0, 1)),
)
def test_any_canary_results_get_a_verdict_with_rates_between_0_and_1(
    results: list[canary.TestResult], providers: list[str], thresholds: canary.Thresholds
) -> None:
    verdict = canary.judge(results, providers, thresholds)
    assert verdict.state in ("passed", "failed", "errored")
    for metrics in [verdict.metrics, *verdict.per_provider.values()]:
        assert 0 <= metrics.pass_rate <= 1 and 0 <= metrics.disconnect_rate <= 1
    assert set(verdict.known_good_for) <= set(providers or verdict.per_provider)
    if verdict.state == "passed":
        assert verdict.known_good_for
    # Results are stored as JSON and judged again from it: the round trip is exact.
    assert [
        canary.TestResult.from_json(json.loads(json.dumps(r.as_json()))) for r in results
    ] == results


# -- Webhook payloads: what intake and the permission check read ---------------------------


@fuzz(80)
@given(json_values(surrogates=False))
@example({"action": ["created"], "installation": {"id": "1"}})
@example({"action": "created", "installation": {"id": True}})
def test_intake_reads_an_action_and_installation_id_only_of_the_right_type(payload: Any) -> None:
    action, installation_id = delivery_fields(payload)
    assert action is None or isinstance(action, str)
    # JSON's true is a Python int too, but no installation's id.
    assert installation_id is None or type(installation_id) is int


@fuzz(60)
@given(
    st.dictionaries(
        st.sampled_from(["role_name", "permission", "user"]),
        json_values(surrogates=False)
        | st.sampled_from(["admin", "write", "maintain", "custom"])
        | st.fixed_dictionaries({"permissions": json_values(surrogates=False)}),
    )
)
def test_a_permission_answer_of_any_shape_reads_as_a_level(body: dict[str, Any]) -> None:
    assert isinstance(permission_in(body), Permission)
