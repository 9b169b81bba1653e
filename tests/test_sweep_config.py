"""The sweep config file: what it accepts, and how it explains what it refuses."""

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from app.sweeps.config import (
    CONFIG_PATH,
    MAX_BYTES,
    MAX_INPUTS,
    STANDARD_INPUTS,
    ConfigError,
    SweepConfig,
    parse_config,
)

PROVIDERS = ("claude_code", "codex", "gemini_cli")

FULL = """\
# Post-update sweeps for this repository.
sweep:
  workflow: sweep.yml
  ref: main
  providers: [claude_code, codex]
  inputs:
    suite: smoke
    shards: 4
"""


def parse(text: str | bytes) -> SweepConfig | None:
    return parse_config(text, PROVIDERS)


def refused(text: str | bytes) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    message = str(caught.value)
    assert "\n" not in message
    return message


def with_sweep(body: str) -> str:
    """A file whose sweep mapping is ``workflow: sweep.yml`` plus ``body`` (indented)."""
    lines = "".join(f"  {line}\n" for line in body.splitlines())
    return f"sweep:\n  workflow: sweep.yml\n{lines}"


def test_constants():
    assert CONFIG_PATH == ".github/update-pipeline.yml"
    assert STANDARD_INPUTS == ("sweep_id", "provider", "version", "build_id")
    assert MAX_INPUTS == 25
    assert MAX_BYTES == 64 * 1024


def test_a_full_file():
    assert parse(FULL) == SweepConfig(
        workflow="sweep.yml",
        ref="main",
        providers=("claude_code", "codex"),
        inputs={"suite": "smoke", "shards": "4"},
    )


def test_bytes_are_read_as_utf8():
    assert parse(FULL.encode()) == parse(FULL)
    assert parse("\ufeff" + FULL) == parse(FULL)  # a byte order mark from an editor


def test_only_the_workflow():
    config = parse("sweep:\n  workflow: sweep.yaml\n")
    assert config == SweepConfig(workflow="sweep.yaml", ref=None, providers=None, inputs={})


@pytest.mark.parametrize("workflow", ["sweep.yml", ".github/workflows/sweep.yml"])
def test_the_workflow_is_stored_without_its_folder(workflow):
    config = parse(f"sweep:\n  workflow: {workflow}\n")
    assert config is not None and config.workflow == "sweep.yml"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# nothing yet\n",
        "{}\n",
        "sweep:\n",
        "sweep: null\n",
        "sweep: ~\n",
        "sweep: false\n",
    ],
)
def test_opted_out(text):
    assert parse(text) is None


@pytest.mark.parametrize(
    "key",
    ["ref", "providers", "inputs"],
)
def test_an_empty_optional_key_is_the_default(key):
    config = parse(with_sweep(f"{key}:"))
    assert config == SweepConfig(workflow="sweep.yml", ref=None, providers=None, inputs={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sweep:\n  workflow: a.yml\n   ref: main\n", "line 3, column 7: mapping values"),
        ("sweep: [unclosed\n", "line 2, column 1: "),
        ("\tsweep: {}\n", "line 1, column 1: found character '\\t'"),
        ("sweep: {workflow: a.yml}\x07\n", "line 1, column 25: character U+0007"),
        ("sweep:\n  workflow: a.yml\n  workflow: b.yml\n", "line 3, column 3: duplicate key"),
        ("sweep: &s {workflow: a.yml}\nmore: *s\n", "line 2, column 7: aliases"),
        ("sweep:\n  inputs: {day: 2024-13-45}\n", "line 2, column 17: '2024-13-45' is not"),
        ("a: " + "[" * 100 + "]" * 100, "line 1, column 19: nested more than 16 levels"),
        ("a: " + "1" * 5000, "line 1, column 4: "),
        ("a: !!python/object/apply:os.system [ls]\n", "line 1, column 4: "),
    ],
)
def test_invalid_yaml_names_line_and_column(text, expected):
    assert refused(text).startswith(expected)


def test_multiple_documents():
    message = refused("sweep:\n  workflow: a.yml\n---\nsweep: false\n")
    assert message.startswith("line 3, column 1: a second YAML document")


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- sweep\n", "a list"), ("sweep\n", "the string 'sweep'"), ("42\n", "the number 42")],
)
def test_not_a_mapping(text, kind):
    assert refused(text) == f"the file must be a mapping with a 'sweep' key, not {kind}"


@pytest.mark.parametrize("text", ["sweep: true\n", "sweep: sweep.yml\n", "sweep: [a.yml]\n"])
def test_sweep_not_a_mapping(text):
    assert refused(text).startswith("sweep: must be a mapping with at least 'workflow'")


def test_unknown_top_level_key():
    message = refused("sweeps:\n  workflow: a.yml\n")
    assert message == "unknown top-level key 'sweeps' (allowed: sweep); did you mean 'sweep'?"
    assert refused("sweep: false\ncanary: true\n").startswith("unknown top-level key 'canary'")


def test_unknown_sweep_keys():
    assert refused(with_sweep("branch: main\nflavour: x")) == (
        "sweep: unknown keys 'branch', 'flavour' (allowed: workflow, ref, providers, inputs)"
    )
    assert refused(with_sweep("input: {a: 1}")).endswith("did you mean 'inputs'?")


@pytest.mark.parametrize("text", ["sweep: {}\n", "sweep:\n  ref: main\n", "sweep: {workflow: }\n"])
def test_missing_workflow(text):
    assert refused(text).startswith("sweep.workflow: required")


@pytest.mark.parametrize(
    "workflow",
    [
        "''",
        "sweep",
        "sweep.json",
        "sweep.yml.txt",
        "sweep.YML",
        "workflows/sweep.yml",
        ".github/sweep.yml",
        ".github/workflows/sub/sweep.yml",
        "../sweep.yml",
        "'my sweep.yml'",
        "'sweep.yml\n'",
        '"sweep.yml\\n"',
    ],
)
def test_bad_workflow_name(workflow):
    message = refused(f"sweep:\n  workflow: {workflow}\n")
    assert message.startswith("sweep.workflow: ")
    assert "is not a workflow file in .github/workflows/" in message


@pytest.mark.parametrize("workflow", ["4", "true", "[a.yml]"])
def test_workflow_not_a_string(workflow):
    assert refused(f"sweep:\n  workflow: {workflow}\n").startswith(
        "sweep.workflow: must be a file name like sweep.yml, not "
    )


@pytest.mark.parametrize("ref", ["main", "v1.2.3", "release/2024-q1", "refs/heads/main", "'@x'"])
def test_good_refs(ref):
    config = parse(with_sweep(f"ref: {ref}"))
    assert config is not None and config.ref == ref.strip("'")


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("'a b'", "contains ' '"),
        ("a..b", "contains '..'"),
        ("'a~1'", "contains '~'"),
        ("'a^'", "contains '^'"),
        ("'a:b'", "contains ':'"),
        ("'a?'", "contains '?'"),
        ("'a*'", "contains '*'"),
        ("'a[b'", "contains '['"),
        ("'a\\b'", "contains '\\\\'"),
        ('"a\\tb"', "contains '\\t'"),
        ("'a@{1}'", "contains '@{'"),
        ("a//b", "contains '//'"),
        ("-main", "starts with '-'"),
        ("/main", "starts with '/'"),
        ("main/", "ends with"),
        ("main.", "ends with"),
        ("main.lock", "ends with"),
        ("a/.hidden", "starting with '.'"),
        ("'@'", "lone '@'"),
        ("''", "1 to 255 characters"),
        ("a" * 256, "1 to 255 characters"),
    ],
)
def test_bad_refs(ref, problem):
    message = refused(with_sweep(f"ref: {ref}"))
    assert message.startswith("sweep.ref: ")
    assert "is not a branch or tag name" in message and problem in message


@pytest.mark.parametrize("ref", ["1.0", "2024", "true", "[main]"])
def test_ref_not_a_string(ref):
    assert refused(with_sweep(f"ref: {ref}")).startswith("sweep.ref: must be a branch or tag name")


def test_unknown_provider():
    assert refused(with_sweep("providers: [codex, gpt]")) == (
        "sweep.providers[1]: 'gpt' is not a known provider (claude_code, codex, gemini_cli)"
    )


def test_duplicate_providers():
    message = refused(with_sweep("providers: [codex, claude_code, codex]"))
    assert message == "sweep.providers[2]: 'codex' is already listed"


def test_empty_providers_list():
    assert refused(with_sweep("providers: []")).startswith("sweep.providers: the list is empty")


@pytest.mark.parametrize(
    ("providers", "expected"),
    [
        ("codex", "sweep.providers: must be a list of provider ids"),
        ("{codex: 1}", "sweep.providers: must be a list of provider ids"),
        ("[codex, 3]", "sweep.providers[1]: must be a provider id, not the number 3"),
    ],
)
def test_providers_of_the_wrong_shape(providers, expected):
    assert refused(with_sweep(f"providers: {providers}")).startswith(expected)


def test_providers_are_checked_against_the_known_ones():
    text = with_sweep("providers: [aider]")
    config = parse_config(text, ["aider", "codex"])
    assert config is not None and config.providers == ("aider",)
    with pytest.raises(ConfigError, match=r"not a known provider \(none are configured\)"):
        parse_config(text, [])


@pytest.mark.parametrize("name", [*STANDARD_INPUTS, "Sweep_ID", "VERSION"])
def test_a_standard_input_name_is_refused(name):
    message = refused(with_sweep(f"inputs:\n  {name}: x"))
    assert message == (
        f"sweep.inputs.{name}: is set by the service on every sweep; use another name"
    )


def test_input_names_differing_only_in_case():
    message = refused(with_sweep("inputs:\n  suite: a\n  Suite: b"))
    assert message.startswith("sweep.inputs.Suite: same name as 'suite'")


@pytest.mark.parametrize("name", ["'a b'", "1st", "-x", "'x.y'", "3", "'" + "a" * 101 + "'", "on"])
def test_bad_input_names(name):
    message = refused(with_sweep(f"inputs:\n  {name}: x"))
    assert message.startswith("sweep.inputs: ") and "is not an input name" in message


@pytest.mark.parametrize("name", ["_x", "a-b", "A_1", "a" * 100])
def test_good_input_names(name):
    config = parse(with_sweep(f"inputs:\n  {name}: x"))
    assert config is not None and config.inputs == {name: "x"}


def inputs_file(count: int) -> str:
    return with_sweep("inputs:\n" + "".join(f"  in{i}: {i}\n" for i in range(count)))


def test_at_most_21_inputs():
    config = parse(inputs_file(21))
    assert config is not None and len(config.inputs) == 21 == MAX_INPUTS - len(STANDARD_INPUTS)
    message = refused(inputs_file(22))
    assert message.startswith("sweep.inputs: 22 inputs, at most 21")
    assert "25" in message and "sweep_id, provider, version, build_id" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("smoke", "smoke"),
        ("'4'", "4"),
        ("''", ""),
        ("4", "4"),
        ("-7", "-7"),
        ("0x10", "16"),
        ("1.5", "1.5"),
        ("true", "true"),
        ("False", "false"),
        ("yes", "true"),
        ("'yes'", "yes"),
        ("'2024-01-01'", "2024-01-01"),
        ("x" * 1000, "x" * 1000),
    ],
)
def test_input_values_become_strings(value, expected):
    config = parse(with_sweep(f"inputs:\n  v: {value}"))
    assert config is not None and config.inputs == {"v": expected}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "sweep.inputs.v: has no value; write '' for an empty string"),
        ("null", "sweep.inputs.v: has no value"),
        ("[1, 2]", "sweep.inputs.v: must be a string, number or boolean, not a list"),
        ("{a: 1}", "sweep.inputs.v: must be a string, number or boolean, not a mapping"),
        ("2024-01-01", "sweep.inputs.v: must be a string, number or boolean, not a date"),
        ("x" * 1001, "sweep.inputs.v: 1,001 characters long, at most 1,000"),
    ],
)
def test_input_values_refused(value, expected):
    assert refused(with_sweep(f"inputs:\n  v: {value}")).startswith(expected)


@pytest.mark.parametrize("inputs", ["[a, b]", "smoke", "4"])
def test_inputs_not_a_mapping(inputs):
    assert refused(with_sweep(f"inputs: {inputs}")).startswith(
        "sweep.inputs: must be a mapping of name: value"
    )


def test_oversized_file():
    padding = "#" * 80 + "\n"
    text = FULL + padding * (MAX_BYTES // len(padding))
    assert len(text.encode()) > MAX_BYTES
    assert refused(text) == f"the file is {len(text):,} bytes, at most 65,536"
    assert refused(text.encode()) == refused(text)
    assert parse(text[: MAX_BYTES - 1]) is not None
    # The limit is in bytes: 30,000 three-byte characters are too many.
    assert refused("# " + "€" * 30_000).startswith("the file is 90,002 bytes")


def test_non_utf8_bytes():
    message = refused(b"sweep:\n  workflow: caf\xe9.yml\n")
    assert message == "line 2, column 16: not UTF-8 (byte 0xe9)"


def test_wants():
    everything = SweepConfig(workflow="sweep.yml", ref=None, providers=None, inputs={})
    assert everything.wants("codex") and everything.wants("anything")
    some = SweepConfig(workflow="sweep.yml", ref=None, providers=("codex",), inputs={})
    assert some.wants("codex") and not some.wants("claude_code")


@pytest.mark.parametrize(
    "text", [FULL, "sweep: {workflow: a.yml}", with_sweep("providers: [gemini_cli]")]
)
def test_json_round_trip(text):
    config = parse(text)
    assert config is not None
    stored = json.loads(json.dumps(config.to_json()))
    assert SweepConfig.from_json(stored) == config
    assert stored["workflow"] == config.workflow


def test_to_json():
    config = parse(FULL)
    assert config is not None and config.to_json() == {
        "workflow": "sweep.yml",
        "ref": "main",
        "providers": ["claude_code", "codex"],
        "inputs": {"suite": "smoke", "shards": "4"},
    }


def test_from_json_keeps_a_provider_no_longer_known():
    stored = {"workflow": "a.yml", "ref": None, "providers": ["retired"], "inputs": {}}
    config = SweepConfig.from_json(stored)
    assert config.providers == ("retired",) and not config.wants("codex")


def check_any(text: str | bytes) -> None:
    try:
        result = parse(text)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert result is None or isinstance(result, SweepConfig)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_parses_or_is_refused(text):
    check_any(text)


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_any_bytes_parse_or_are_refused(data):
    check_any(data)


YAMLISH = st.text(
    alphabet=st.sampled_from(list("sweep:workflow.ymlref-_[]{},&*!|>'\"#?%@`~ \t\n0123456789")),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(YAMLISH)
def test_yaml_like_text_parses_or_is_refused(text):
    check_any(text)


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["workflow", "ref", "providers", "inputs", "other"]), VALUES, max_size=5
    )
    | VALUES
)
def test_any_yaml_structure_parses_or_is_refused(sweep):
    check_any(yaml.safe_dump({"sweep": sweep}))
