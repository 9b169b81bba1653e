"""Providers: the built-in runtimes, and the operator's TOML file that adds or changes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from app.pipeline.version.providers import (
    BUILTIN_PROVIDERS,
    Provider,
    ProvidersFileError,
    load_providers,
    providers_from_env,
)

BUILTIN_IDS = ("claude_code", "codex", "gemini_cli")


Write = Callable[[str], Path]


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """Writes a providers file (as UTF-8, newlines kept as given) and returns its path."""

    def write(text: str) -> Path:
        path = tmp_path / "providers.toml"
        path.write_bytes(text.encode("utf-8"))
        return path

    return write


def load(path: Path) -> dict[str, Provider]:
    return {p.id: p for p in load_providers(path)}


def problems(path: Path) -> list[str]:
    with pytest.raises(ProvidersFileError) as caught:
        load_providers(path)
    return caught.value.problems


def only_problem(path: Path) -> str:
    found = problems(path)
    assert len(found) == 1, found
    return found[0]


# -- Built-ins -------------------------------------------------------------------------


def test_without_a_file_the_built_ins_are_the_providers() -> None:
    for unset in (None, "", "   "):
        assert providers_from_env(unset) == BUILTIN_PROVIDERS

    assert [p.id for p in BUILTIN_PROVIDERS] == list(BUILTIN_IDS)
    assert [p.npm_package for p in BUILTIN_PROVIDERS] == [
        "@anthropic-ai/claude-code",
        "@openai/codex",
        "@google/gemini-cli",
    ]
    assert all(p.github_repo is None for p in BUILTIN_PROVIDERS)
    assert [p.name for p in BUILTIN_PROVIDERS] == ["Claude Code", "Codex", "Gemini CLI"]


def test_a_providers_display_name_defaults_to_its_id() -> None:
    assert Provider("aider", "aider-chat-bin").name == "aider"
    assert Provider("aider", "aider-chat-bin", name="Aider").name == "Aider"


def test_a_provider_needs_at_least_one_source() -> None:
    assert Provider("x", None, "owner/x").npm_package is None
    with pytest.raises(ValueError, match="no source"):
        Provider("x", None)


def test_an_empty_file_or_an_empty_providers_table_changes_nothing(write: Write) -> None:
    assert load_providers(write("")) == BUILTIN_PROVIDERS
    assert load_providers(write("# nothing yet\n[providers]\n")) == BUILTIN_PROVIDERS


def test_the_environment_value_names_the_file(write: Write) -> None:
    path = write('[providers.aider]\nnpm = "aider-chat-bin"\n')

    providers = providers_from_env(f"  {path}  ")

    assert [p.id for p in providers] == [*BUILTIN_IDS, "aider"]


# -- Adding and changing providers -----------------------------------------------------


def test_a_new_provider_is_added_after_the_built_ins(write: Write) -> None:
    path = write('[providers.aider]\nname = "Aider"\nnpm = "aider-chat-bin"\n')

    providers = load_providers(path)

    assert providers[: len(BUILTIN_PROVIDERS)] == BUILTIN_PROVIDERS
    assert providers[-1] == Provider("aider", "aider-chat-bin", None, "Aider")


def test_a_new_provider_may_have_only_a_github_source(write: Write) -> None:
    path = write('[providers.opencode]\ngithub = "sst/opencode"\n')

    assert load(path)["opencode"] == Provider("opencode", None, "sst/opencode", "opencode")


def test_a_github_source_is_added_to_a_built_in(write: Write) -> None:
    path = write('[providers.codex]\ngithub = "openai/codex"\n')

    codex = load(path)["codex"]

    assert codex == Provider("codex", "@openai/codex", "openai/codex", "Codex")


def test_the_npm_package_of_a_built_in_is_changed(write: Write) -> None:
    path = write('[providers.claude_code]\nnpm = "@anthropic-ai/claude-code-next"\n')

    providers = load(path)

    assert providers["claude_code"].npm_package == "@anthropic-ai/claude-code-next"
    assert providers["claude_code"].name == "Claude Code"
    assert providers["codex"] == BUILTIN_PROVIDERS[1]


def test_npm_false_removes_the_npm_source_of_a_built_in(write: Write) -> None:
    path = write('[providers.gemini_cli]\nnpm = false\ngithub = "google-gemini/gemini-cli"\n')

    gemini = load(path)["gemini_cli"]

    assert gemini.npm_package is None
    assert gemini.github_repo == "google-gemini/gemini-cli"


def test_a_built_in_can_be_renamed(write: Write) -> None:
    path = write('[providers.codex]\nname = "OpenAI Codex"\n')

    assert load(path)["codex"] == Provider("codex", "@openai/codex", None, "OpenAI Codex")


@pytest.mark.parametrize(
    "text",
    [
        '[providers.codex]\ngithub = "openai/codex"\n[providers.aider]\nnpm = "aider-chat-bin"\n',
        '[providers]\ncodex.github = "openai/codex"\naider.npm = "aider-chat-bin"\n',
        'providers.codex.github = "openai/codex"\nproviders.aider.npm = "aider-chat-bin"\n',
        '[providers]\ncodex = { github = "openai/codex" }\naider = { npm = "aider-chat-bin" }\n',
        "[providers.\"codex\"]\ngithub = 'openai/codex'\n"
        '[ providers . aider ]\nnpm = "aider-chat-bin"',
    ],
    ids=["tables", "dotted-in-table", "dotted", "inline", "quoted"],
)
def test_every_toml_spelling_of_the_same_providers_gives_the_same_result(
    write: Write, text: str
) -> None:
    providers = load_providers(write(text))

    assert [p.id for p in providers] == [*BUILTIN_IDS, "aider"]
    assert providers[1].github_repo == "openai/codex"
    assert providers[-1].npm_package == "aider-chat-bin"


def test_built_ins_keep_their_order_and_new_providers_follow_in_file_order(write: Write) -> None:
    path = write(
        '[providers.zeta]\nnpm = "zeta"\n'
        '[providers.gemini_cli]\ngithub = "google-gemini/gemini-cli"\n'
        '[providers.alpha]\nnpm = "alpha"\n'
        '[providers.claude_code]\nname = "Claude"\n'
        '[providers.mid]\ngithub = "acme/mid"\n'
    )

    assert [p.id for p in load_providers(path)] == [*BUILTIN_IDS, "zeta", "alpha", "mid"]


@pytest.mark.parametrize(
    "package",
    [
        "a",
        "aider-chat-bin",
        "@openai/codex",
        "@scope/name.with_dots-and-dashes",
        "x" * 214,
        "@" + "s" * 100 + "/" + "n" * 112,
        "http",  # a Node core module name: npm only warns about it
    ],
)
def test_valid_npm_package_names_are_accepted(write: Write, package: str) -> None:
    path = write(f'[providers.p]\nnpm = "{package}"\n')

    assert load(path)["p"].npm_package == package


@pytest.mark.parametrize("repo", ["openai/codex", "a/b", "Some-Org/repo.name_2", "x" * 39 + "/r"])
def test_valid_github_repositories_are_accepted(write: Write, repo: str) -> None:
    assert load(write(f'[providers.p]\ngithub = "{repo}"\n'))["p"].github_repo == repo


# -- Problems, each with its file and line ----------------------------------------------


def test_a_syntax_error_names_the_line_and_column(write: Write) -> None:
    path = write('[providers.codex]\ngithub = "openai/codex"\nnpm = @openai/codex\n')

    problem = only_problem(path)

    assert problem.startswith(f"{path}:3: TOML syntax error: ")
    assert "(column 7)" in problem


def test_a_syntax_error_at_the_end_of_the_file_names_the_last_line(write: Write) -> None:
    path = write('[providers.codex]\nname = """Codex\n\n')

    assert only_problem(path) == (
        f"{path}:2: TOML syntax error: Unterminated string (at the end of the file)"
    )


def test_a_key_given_twice_is_a_syntax_error(write: Write) -> None:
    path = write('[providers.codex]\nnpm = "a"\nnpm = "b"\n\n[providers.x]\nnpm = "x"\n')

    assert only_problem(path).startswith(f"{path}:3: TOML syntax error: ")


def test_an_unknown_key_in_a_provider_names_its_line(write: Write) -> None:
    path = write('[providers.codex]\ngithub = "openai/codex"\nnmp = "@openai/codex"\n')

    assert only_problem(path) == (
        f"{path}:3: providers.codex.nmp: unknown key 'nmp' (a provider takes name, npm, github)"
    )


def test_an_unknown_top_level_key_names_its_line(write: Write) -> None:
    path = write('# a typo in the table name\n\n[provider.codex]\ngithub = "openai/codex"\n')

    assert only_problem(path) == (
        f"{path}:3: unknown key 'provider': provider tables go under [providers]"
    )


@pytest.mark.parametrize("bad_id", ["Codex", "claude-code", "2fast", "_x", "a" * 65, "é"])
def test_a_bad_provider_id_names_its_table_line(write: Write, bad_id: str) -> None:
    path = write(f'[providers]\n\n[providers."{bad_id}"]\nnpm = "x"\n')

    problem = only_problem(path)

    assert problem.startswith(f"{path}:3: {bad_id!r} is not a provider id: ")


@pytest.mark.parametrize(
    ("package", "reason"),
    [
        ("Claude-Code", "npm names are lower case"),
        ("@Anthropic-AI/claude-code", "npm names are lower case"),
        ("aider chat", "cannot contain spaces"),
        (" aider", "spaces around it"),
        ("x" * 215, "longer than 214 characters"),
        ("", "it is empty"),
        (".hidden", "cannot start with . or _"),
        ("_private", "cannot start with . or _"),
        ("node_modules", "is reserved"),
        ("wow!", "cannot contain any of"),
        ("@/codex", "both parts non-empty"),
        ("@openai", "both parts non-empty"),
        ("@openai/", "both parts non-empty"),
        ("openai/codex", "only a scoped name"),
        ("@open/ai/codex", "both parts non-empty"),
        ("@open%ai/codex", "may only contain"),
        ("@.openai/codex", "can start with ."),
        ("@openai/.codex", "can start with ."),
        ("codex@1.0", "may only contain"),
        ("ünïcode", "may only contain"),
    ],
)
def test_a_bad_npm_package_name_names_its_line_and_the_rule(
    write: Write, package: str, reason: str
) -> None:
    path = write(f'[providers.p]\nname = "P"\nnpm = "{package}"\n')

    problem = only_problem(path)

    assert problem.startswith(
        f"{path}:3: providers.p.npm: {package!r} is not a valid npm package name: "
    )
    assert reason in problem


@pytest.mark.parametrize(
    ("repo", "reason"),
    [
        ("openai", "write owner/name"),
        ("openai/codex/extra", "write owner/name"),
        ("/codex", "the owner ''"),
        ("openai/", "the name ''"),
        ("-openai/codex", "the owner '-openai'"),
        ("openai-/codex", "the owner 'openai-'"),
        ("open_ai/codex", "the owner 'open_ai'"),
        ("x" * 40 + "/codex", "1 to 39"),
        ("openai/co dex", "the name 'co dex'"),
        ("openai/..", "the name '..'"),
        ("openai/" + "c" * 101, "1 to 100"),
        ("https://github.com/openai/codex", "not a URL"),
        ("github.com/openai/codex", "not a URL"),
    ],
)
def test_a_bad_github_repository_names_its_line_and_the_rule(
    write: Write, repo: str, reason: str
) -> None:
    path = write(f'[providers.codex]\n\ngithub = "{repo}"\n')

    problem = only_problem(path)

    assert problem.startswith(f"{path}:3: providers.codex.github: {repo!r} is not a GitHub ")
    assert reason in problem


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("npm = 1", "providers.p.npm must be a string or false (no npm source), not the number 1"),
        (
            "npm = true",
            "providers.p.npm must be a string or false (no npm source), not the boolean",
        ),
        ('github = ["a/b"]', "providers.p.github must be a string or false (no github source)"),
        ("name = 3", "providers.p.name must be a string, not the number 3"),
        ('name = "  "', "providers.p.name: '  ' is not a display name"),
        ('name = "a\\tb"', "providers.p.name: 'a\\tb' is not a display name"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_line(write: Write, line: str, expected: str) -> None:
    path = write(f"[providers.p]\n\n{line}\n")

    problem = only_problem(path)

    assert problem.startswith(f"{path}:3: ")
    assert expected in problem


def test_a_provider_that_is_not_a_table_names_its_line(write: Write) -> None:
    path = write('[providers]\ncodex = "openai/codex"\n')

    assert only_problem(path).startswith(f"{path}:2: providers.codex must be a table")


def test_providers_that_is_not_a_table_names_its_line(write: Write) -> None:
    path = write('\nproviders = ["codex"]\n')

    assert only_problem(path).startswith(f"{path}:2: 'providers' must be a table of providers")


def test_a_new_provider_without_a_source_names_its_table_line(write: Write) -> None:
    path = write('[providers.codex]\n\n[providers.aider]\nname = "Aider"\n')

    assert only_problem(path) == (
        f'{path}:3: providers.aider: a new provider needs a source: npm = "package" or'
        ' github = "owner/name"'
    )


def test_removing_the_only_source_of_a_built_in_names_the_npm_line(write: Write) -> None:
    path = write('[providers.claude_code]\nname = "Claude"\nnpm = false\n')

    assert only_problem(path).startswith(
        f"{path}:3: providers.claude_code: this leaves the built-in provider with no source"
    )


def test_problems_in_dotted_keys_and_inline_tables_name_their_own_lines(write: Write) -> None:
    path = write(
        "[providers]\n"
        'codex.github = "openai"\n'
        'aider = { name = "Aider", npm = "Aider" }\n'
        "\n"
        'providers.other.npm = "x"  # not inside [providers]: providers.providers.other\n'
    )

    found = problems(path)

    assert [p.split(": ", 1)[0] for p in found] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "providers.codex.github" in found[0]
    assert "providers.aider.npm" in found[1]
    assert "providers.providers.other: unknown key 'other'" in found[2]


def test_every_problem_is_reported_at_once_in_file_order(write: Write) -> None:
    path = write(
        'title = "my providers"\n'  # 1: unknown top-level key
        "[providers.codex]\n"
        'github = "openai/codex/releases"\n'  # 3: bad repo
        'verison = "1"\n'  # 4: unknown key
        '[providers."Bad-Id"]\n'  # 5: bad id
        'npm = "ok"\n'
        "[providers.aider]\n"
        'npm = "Aider"\n'  # 8: bad package (checked after the name on line 9)
        "name = 7\n"  # 9: wrong type
        "[providers.empty]\n"  # 10: no source
    )

    with pytest.raises(ProvidersFileError) as caught:
        load_providers(path)
    error = caught.value

    assert [p.split(": ", 1)[0] for p in error.problems] == [
        f"{path}:{n}" for n in (1, 3, 4, 5, 8, 9, 10)
    ]
    assert str(error) == "; ".join(error.problems)
    assert error.path == path
    assert isinstance(error, ValueError)


# -- The file itself -------------------------------------------------------------------


def test_a_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"

    assert problems(path) == [f"{path}: cannot read the providers file: No such file or directory"]
    with pytest.raises(ProvidersFileError):
        providers_from_env(str(path))


def test_a_folder_is_not_a_providers_file(tmp_path: Path) -> None:
    assert only_problem(tmp_path).startswith(f"{tmp_path}: cannot read the providers file: ")


def test_a_file_that_is_not_utf8_names_the_line_of_the_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[providers.aider]\nname = "Aïder"\nnpm = "aider"\n'.encode("latin-1"))

    assert only_problem(path) == f"{path}:2: not UTF-8 text (byte 0xef); save it as UTF-8"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes('[providers.aider]\nname = "Aïder"\nnpm = "aider"\n'.encode("utf-8-sig"))

    assert load(path)["aider"].name == "Aïder"


def test_windows_line_endings_keep_line_numbers(write: Write) -> None:
    path = write('[providers.codex]\r\n\r\ngithub = "nope"\r\n')

    assert only_problem(path).startswith(f"{path}:3: providers.codex.github: ")


def test_strings_that_look_like_keys_or_headers_do_not_move_line_numbers(write: Write) -> None:
    path = write(
        "[providers.aider]\n"
        'name = """Aider\n'
        "[providers.fake]\n"
        'npm = "not a key"\n'
        '"""\n'
        "npm = 'aider # not a comment'\n"
    )

    found = problems(path)

    assert [p.split(": ", 1)[0] for p in found] == [f"{path}:2", f"{path}:6"]
    assert "providers.aider.name" in found[0]
    assert "providers.aider.npm: 'aider # not a comment'" in found[1]
