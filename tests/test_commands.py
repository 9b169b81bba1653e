"""Slash commands: parsing, bots, the permission matrix against the fake GitHub, the
permission cache, escaping echoed text, and the registry's /help."""

from __future__ import annotations

import re
import string
import time
import unicodedata
from datetime import timedelta

import pytest
from gidgethub import BadRequest
from hypothesis import given
from hypothesis import strategies as st

from app.clock import ManualClock
from app.github.app import GitHubApp
from app.github.commands import (
    ELLIPSIS,
    MAX_BODY_CHARS,
    MAX_COMMANDS,
    ZWJ,
    Command,
    CommandRegistry,
    Permission,
    PermissionCache,
    escape_for_comment,
    is_bot,
    parse_commands,
    permission_from,
    permission_of,
)
from tests.fake_github import FakeGitHub

KNOWN = {"deploy", "rollback", "help"}
PERMISSION_KEY = "GET /repos/{owner}/{repo}/collaborators/{username}/permission"


def _flags(level: int) -> dict[str, bool]:
    """A collaborator's ``permissions`` flags up to ``level`` (1 pull ... 5 admin)."""
    names = ("pull", "triage", "push", "maintain", "admin")
    return {name: n < level for n, name in enumerate(names)}


def parsed(body: str) -> list[tuple[str, str, int]]:
    return [(c.name, c.args, c.line) for c in parse_commands(body, KNOWN)]


# -- parsing ----------------------------------------------------------------------------


def test_a_command_line_gives_name_args_and_line() -> None:
    assert parse_commands("/deploy  v1.2.3  ", KNOWN) == [Command("deploy", "v1.2.3", 1)]
    assert parsed("/Deploy") == [("deploy", "", 1)]


@pytest.mark.parametrize(
    "body",
    [
        "please /deploy",  # not at the start of the line
        "    /deploy",  # four spaces: an indented code block
        "\t/deploy",
        "`/deploy`",  # inline code
        "`` /deploy ``",
        "x `/deploy`",
        "/deploy,",  # the name must end the line or be followed by whitespace
        "/deploy/now",
        "/etc/passwd",
        "/unknown",
        "/",
        "//deploy",
        "\\/deploy",
    ],
)
def test_not_a_command(body: str) -> None:
    assert parsed(body) == []


def test_up_to_three_spaces_of_indentation() -> None:
    assert parsed(" /deploy\n  /deploy\n   /deploy") == [
        ("deploy", "", 1),
        ("deploy", "", 2),
        ("deploy", "", 3),
    ]


def test_several_commands_in_order_with_their_lines() -> None:
    body = "Thanks!\n/rollback v1\nsome text\n\n/deploy v2 --fast\n/help"
    assert parsed(body) == [("rollback", "v1", 2), ("deploy", "v2 --fast", 5), ("help", "", 6)]


def test_help_is_recognised_only_when_known() -> None:
    assert parse_commands("/help", {"deploy"}) == []
    assert parse_commands("/help", {"help"}) == [Command("help", "", 1)]
    assert parse_commands("/deploy", set()) == []


@pytest.mark.parametrize("fence", ["```", "~~~", "````", "```python", "~~~ yaml title", "``` sh"])
def test_fenced_code_blocks_hide_commands(fence: str) -> None:
    close = fence[0] * (len(fence) - len(fence.lstrip(fence[0])))
    body = f"/deploy a\n{fence}\n/deploy b\n/rollback\n{close}\n/deploy c"
    assert parsed(body) == [("deploy", "a", 1), ("deploy", "c", 6)]


def test_a_fence_closes_only_with_the_same_character_at_least_as_long() -> None:
    body = "\n".join(
        [
            "````",
            "```",  # shorter: content
            "/deploy 1",
            "~~~~",  # other character: content
            "/deploy 2",
            "```` not a closing fence",  # closing fences carry no info string
            "/deploy 3",
            "   `````  ",  # longer, indented, trailing spaces: closes
            "/deploy 4",
        ]
    )
    assert parsed(body) == [("deploy", "4", 9)]


def test_an_unterminated_fence_runs_to_the_end() -> None:
    assert parsed("/deploy a\n```\n/deploy b\n/rollback") == [("deploy", "a", 1)]
    assert parsed("~~~\n/deploy") == []


def test_backtick_run_with_backticks_after_it_is_inline_code_not_a_fence() -> None:
    assert parsed("``` a ` b\n/deploy") == [("deploy", "", 2)]


def test_indented_fences_open_only_with_up_to_three_spaces() -> None:
    assert parsed("   ```\n/deploy\n```") == []
    assert parsed("    ```\n/deploy") == [("deploy", "", 2)]  # indented code, not a fence


def test_quotes_hide_commands() -> None:
    assert parsed("> /deploy\n>/deploy\n   > /deploy\n>> /deploy") == []


def test_a_quote_takes_in_the_following_lines_until_a_blank_line() -> None:
    body = "> you wrote this\n/deploy lazy\n\n/deploy after"
    assert parsed(body) == [("deploy", "after", 4)]
    # An empty quote line, or one opening a fence, leaves no paragraph to continue.
    assert parsed(">\n/deploy") == [("deploy", "", 2)]
    assert parsed("> ```\n/deploy") == [("deploy", "", 2)]
    # A line of no-break spaces is not blank: the quote goes on.
    assert parsed("> q\n\u00a0\n/deploy") == []


def test_a_fence_inside_a_quote_does_not_swallow_the_comment() -> None:
    assert parsed("> ```\n> /deploy\n\n/deploy ok") == [("deploy", "ok", 4)]


@pytest.mark.parametrize("newline", ["\r\n", "\r", "\n"])
def test_line_endings(newline: str) -> None:
    body = newline.join(["hi", "/deploy x", "```", "/deploy y", "```", "/rollback"])
    assert parsed(body) == [("deploy", "x", 2), ("rollback", "", 6)]


def test_unicode() -> None:
    assert parsed("\uff0fdeploy") == []  # full-width slash
    assert parsed("\u00a0/deploy") == []  # no-break space is not indentation
    assert parsed("\u200b/deploy") == []  # zero-width space
    assert parsed("\u2215deploy") == []  # division slash
    assert parsed("/d\u0435ploy") == []  # Cyrillic e
    assert parsed("/\u212aill") == []  # Kelvin sign, which lower-cases to k
    # Only \n, \r and \r\n end lines: U+2028 and friends are within a line.
    assert parsed("hello\u2028/deploy\x0c/deploy\x85/deploy") == []
    assert parsed("/deploy\u00a0caf\u00e9 \U0001f680") == [("deploy", "caf\u00e9 \U0001f680", 1)]
    assert parsed("/deploy\u3000x") == [("deploy", "x", 1)]


def test_many_commands_are_capped() -> None:
    body = "\n".join(f"/deploy {i}" for i in range(10_000))
    found = parsed(body)
    assert len(found) == MAX_COMMANDS
    assert found[-1] == ("deploy", str(MAX_COMMANDS - 1), MAX_COMMANDS)


def test_huge_comments_are_read_up_to_githubs_limit_and_fast() -> None:
    filler = "x" * (MAX_BODY_CHARS - len("/deploy early\n"))
    body = "/deploy early\n" + filler + "\n/deploy late\n" + "/deploy\n" * 100_000
    started = time.perf_counter()
    assert parsed(body) == [("deploy", "early", 1)]
    assert parsed("a\n" * 1_000_000) == []
    assert parsed("/" * 1_000_000) == []
    assert parsed("```\n" * 200_000 + "/deploy") == []
    assert time.perf_counter() - started < 1.0


FRAGMENTS = st.sampled_from(
    [
        "/deploy",
        "/DEPLOY x",
        "/help",
        "/rollback v1",
        "/etc",
        "```",
        "````",
        "```py",
        "~~~",
        ">",
        "> ",
        " ",
        "   ",
        "\t",
        "`",
        "\n",
        "\r\n",
        "\r",
        "\u2028",
        "\u00a0",
        "\uff0fdeploy",
        "deploy",
        "/",
    ]
)
BODIES = st.lists(st.one_of(FRAGMENTS, st.text(max_size=4)), max_size=40).map("".join)


@given(BODIES)
def test_property_parse_never_raises_and_commands_are_real_lines(body: str) -> None:
    commands = parse_commands(body, KNOWN)
    lines = re.split(r"\r\n|\r|\n", body)
    assert len(commands) <= MAX_COMMANDS
    assert [c.line for c in commands] == sorted({c.line for c in commands})
    for command in commands:
        assert command.name in KNOWN
        line = lines[command.line - 1]
        text = line.lstrip(" ")
        assert len(line) - len(text) <= 3
        assert text.lower().startswith("/" + command.name)
        assert command.args == text[1 + len(command.name) :].strip()


# -- bots ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "bot"),
    [
        ({"login": "update-pipeline[bot]", "type": "Bot"}, True),
        ({"login": "dependabot[bot]", "type": "User"}, True),
        ({"login": "some-app", "type": "Bot"}, True),
        ({"login": "alice", "type": "User"}, False),
        ({"login": "bot", "type": "User"}, False),
        ({}, False),
    ],
)
def test_is_bot(sender: dict[str, str], bot: bool) -> None:
    assert is_bot(sender) is bot


async def test_the_apps_own_comments_come_from_a_bot(github: FakeGitHub) -> None:
    assert is_bot(github.bot())
    assert not is_bot(github.user("alice"))


# -- permissions ----------------------------------------------------------------------------


def test_permissions_are_ordered() -> None:
    order = [
        Permission.NONE,
        Permission.READ,
        Permission.TRIAGE,
        Permission.WRITE,
        Permission.MAINTAIN,
        Permission.ADMIN,
    ]
    assert sorted(reversed(order)) == order
    assert str(Permission.MAINTAIN) == "maintain"


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("read", Permission.READ),
        ("triage", Permission.TRIAGE),  # legacy permission: read
        ("write", Permission.WRITE),
        ("maintain", Permission.MAINTAIN),  # legacy permission: write
        ("admin", Permission.ADMIN),
        ("none", Permission.NONE),
    ],
)
async def test_permission_matrix_for_built_in_roles(
    github: FakeGitHub, app_github: GitHubApp, installation: int, role: str, expected: Permission
) -> None:
    github.set_permission("acme/runner", "alice", role_name=role)
    client = app_github.installation(installation)
    assert await permission_of(client, "acme/runner", "alice") == expected
    (call,) = github.calls(PERMISSION_KEY)
    assert call.path == "/repos/acme/runner/collaborators/alice/permission"
    assert call.installation_id == installation


@pytest.mark.parametrize(
    ("role", "base", "expected"),
    [
        ("deployer", "write", Permission.WRITE),
        ("auditor", "read", Permission.READ),
        ("release-manager", "admin", Permission.ADMIN),
        # Above what the legacy field says (write, read): the user's permission flags.
        ("release-captain", "maintain", Permission.MAINTAIN),
        ("reviewer", "triage", Permission.TRIAGE),
    ],
)
async def test_a_custom_role_counts_as_its_base_role(
    github: FakeGitHub,
    app_github: GitHubApp,
    installation: int,
    role: str,
    base: str,
    expected: Permission,
) -> None:
    github.set_permission("acme/runner", "carol", role, base=base)
    client = app_github.installation(installation)
    assert await permission_of(client, "acme/runner", "carol") == expected
    assert len(github.calls(PERMISSION_KEY)) == 1


async def test_an_unknown_user_has_no_permission(
    github: FakeGitHub, app_github: GitHubApp, installation: int
) -> None:
    client = app_github.installation(installation)
    assert await permission_of(client, "acme/runner", "mallory") == Permission.NONE
    assert github.last(PERMISSION_KEY).status == 404


async def test_other_errors_are_raised(
    github: FakeGitHub, app_github: GitHubApp, installation: int, clock: ManualClock
) -> None:
    github.set_permission("acme/runner", "alice", role_name="admin")
    github.inject(PERMISSION_KEY, status=403, body={"message": "Resource not accessible"})
    cache = PermissionCache(clock)
    client = app_github.installation(installation)
    with pytest.raises(BadRequest) as raised:
        await cache.get(client, "acme/runner", "alice")
    assert raised.value.status_code == 403
    # Not remembered: the next lookup asks again.
    assert await cache.get(client, "acme/runner", "alice") == Permission.ADMIN
    assert len(github.calls(PERMISSION_KEY)) == 2


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"role_name": "maintain", "permission": "write"}, Permission.MAINTAIN),
        ({"role_name": "triage", "permission": "read"}, Permission.TRIAGE),
        ({"role_name": "deployer", "permission": "write"}, Permission.WRITE),
        ({"role_name": "deployer", "permission": "maintain"}, Permission.NONE),  # not legacy
        ({"role_name": "deployer", "permission": "superuser"}, Permission.NONE),
        ({"role_name": "Admin", "permission": "read"}, Permission.READ),  # exact names only
        ({"permission": "admin"}, Permission.ADMIN),
        ({"role_name": None, "permission": None}, Permission.NONE),
        ({}, Permission.NONE),
        (
            {"role_name": "captain", "permission": "write", "user": {"permissions": _flags(4)}},
            Permission.MAINTAIN,
        ),
        (
            {"role_name": "reviewer", "permission": "read", "user": {"permissions": _flags(2)}},
            Permission.TRIAGE,
        ),
        ({"role_name": "x", "user": {"permissions": _flags(0)}}, Permission.NONE),
    ],
)
def test_permission_from_an_answer(body: dict[str, object], expected: Permission) -> None:
    assert permission_from(body) == expected


async def test_the_cache_asks_once_per_repository_and_user_until_the_ttl(
    github: FakeGitHub, app_github: GitHubApp, installation: int, clock: ManualClock
) -> None:
    github.set_permission("acme/runner", "alice", role_name="write")
    github.set_permission("acme/runner", "bob", role_name="read")
    cache = PermissionCache(clock, ttl=60)
    client = app_github.installation(installation)

    assert await cache.get(client, "acme/runner", "alice") == Permission.WRITE
    assert await cache.get(client, "ACME/Runner", "Alice") == Permission.WRITE
    assert len(github.calls(PERMISSION_KEY)) == 1
    assert await cache.get(client, "acme/runner", "bob") == Permission.READ
    assert len(github.calls(PERMISSION_KEY)) == 2

    github.set_permission("acme/runner", "alice", role_name="read")
    clock.advance(timedelta(seconds=59))
    assert await cache.get(client, "acme/runner", "alice") == Permission.WRITE
    assert len(github.calls(PERMISSION_KEY)) == 2
    clock.advance(timedelta(seconds=2))
    assert await cache.get(client, "acme/runner", "alice") == Permission.READ
    assert len(github.calls(PERMISSION_KEY)) == 3


async def test_the_cache_remembers_a_404_and_can_forget(
    github: FakeGitHub, app_github: GitHubApp, installation: int, clock: ManualClock
) -> None:
    cache = PermissionCache(clock)
    client = app_github.installation(installation)
    assert await cache.get(client, "acme/runner", "mallory") == Permission.NONE
    assert await cache.get(client, "acme/runner", "mallory") == Permission.NONE
    assert len(github.calls(PERMISSION_KEY)) == 1
    github.set_permission("acme/runner", "mallory", role_name="triage")
    cache.forget("acme/runner", "MALLORY")
    assert await cache.get(client, "acme/runner", "mallory") == Permission.TRIAGE


# -- escaping --------------------------------------------------------------------------------


def unescape(escaped: str) -> str:
    """What a reader sees: Markdown escapes and entities resolved, zero-width joiners gone."""
    text = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", escaped)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return text.replace(ZWJ, "")


def assert_inert(escaped: str) -> None:
    """Every ASCII punctuation character is escaped, and no mention can form."""
    assert "\n" not in escaped and "\r" not in escaped
    assert "<" not in escaped and ">" not in escaped
    assert re.search(r"[@#](?!" + ZWJ + ")", escaped) is None
    bare = re.sub(r"&(amp|lt|gt);", "", escaped)
    bare = re.sub(r"\\[!-/:-@\[-`{-~]", "", bare)
    assert not set(bare) & (set(string.punctuation) - {"@"})


def test_mentions_do_not_ping() -> None:
    escaped = escape_for_comment("cc @alice and @acme/security, see #12 and acme/runner#3")
    assert "@alice" not in escaped and "@acme" not in escaped
    assert "#12" not in escaped and "#3" not in escaped
    assert f"@{ZWJ}alice" in escaped
    assert unescape(escaped) == "cc @alice and @acme/security, see #12 and acme/runner#3"
    assert_inert(escaped)


@pytest.mark.parametrize(
    "text",
    [
        "**bold** _it_ ~~gone~~",
        "[click](https://evil.example) ![img](x.png) <https://x>",
        "# heading",
        "1. item",
        "- item | a | b |",
        "$x^2$ and $$math$$",
        "trailing backslash \\",
        "[^note] :smile: {curly}",
    ],
)
def test_markdown_is_escaped(text: str) -> None:
    escaped = escape_for_comment(text)
    assert unescape(escaped) == text
    assert_inert(escaped)


def test_html_is_escaped() -> None:
    text = '<img src=x onerror="alert(1)"> &amp; <!-- hidden --> </details>'
    escaped = escape_for_comment(text)
    assert escaped.startswith("&lt;img")
    assert "&amp;amp\\;" in escaped
    assert unescape(escaped) == text
    assert_inert(escaped)


def test_backticks_are_escaped() -> None:
    escaped = escape_for_comment("run `rm -rf /` or ```sh\nx```")
    assert "`" not in escaped.replace("\\`", "")
    assert unescape(escaped) == "run `rm -rf /` or ```sh x```"


def test_newlines_and_controls_are_collapsed() -> None:
    assert escape_for_comment("a\r\n\r\nb\tc\u2028d\u00a0 e") == "a b c d e"
    assert escape_for_comment("a\x00b\x1bc\u202eevil\u2066") == "abcevil"
    assert escape_for_comment("  \n ") == ""


def test_long_text_is_truncated_with_an_ellipsis() -> None:
    assert escape_for_comment("x" * 300) == "x" * 199 + ELLIPSIS
    assert escape_for_comment("x" * 200) == "x" * 200
    assert escape_for_comment("abc def", limit=5) == "abc" + ELLIPSIS
    # Cut before escaping: no escape is broken in half.
    escaped = escape_for_comment("<" * 50, limit=10)
    assert escaped == "&lt;" * 9 + ELLIPSIS


def readable_form(text: str, limit: int = 200) -> str:
    """What ``escape_for_comment`` should show a reader, worked out independently."""
    bidi = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
    kept = "".join(
        c for c in text if c.isspace() or (unicodedata.category(c) != "Cc" and c not in bidi)
    )
    words = " ".join(kept.split())
    if len(words) > limit:
        words = words[: limit - 1].rstrip() + ELLIPSIS
    return words.replace(ZWJ, "")


@given(st.text(max_size=250), st.integers(min_value=1, max_value=220))
def test_property_escaped_text_is_inert_and_reads_as_the_original(text: str, limit: int) -> None:
    escaped = escape_for_comment(text, limit)
    assert_inert(escaped)
    assert unescape(escaped) == readable_form(text, limit)


# -- registry ------------------------------------------------------------------------------


async def nothing(*_: object) -> None:
    return None


@pytest.fixture
def registry() -> CommandRegistry:
    registry = CommandRegistry()
    registry.register("status", Permission.READ, "show the rollout", nothing)
    registry.register("deploy", Permission.WRITE, "start a rollout", nothing, usage="<version>")

    @registry.command("rollback", Permission.MAINTAIN, "roll back to the last good version")
    async def rollback(*_: object) -> None:
        return None

    return registry


def test_help_lists_what_each_permission_may_use(registry: CommandRegistry) -> None:
    assert registry.help_text(Permission.WRITE) == "\n".join(
        [
            "Commands you can use here (your permission: write):",
            "",
            "- `/help`: list the commands you can use here",
            "- `/deploy <version>`: start a rollout (needs write)",
            "- `/status`: show the rollout (needs read)",
            "",
            "1 more command(s) need a higher permission on this repository.",
        ]
    )
    assert "/rollback" in registry.help_text(Permission.ADMIN)
    assert "more command" not in registry.help_text(Permission.ADMIN)
    none = registry.help_text(Permission.NONE)
    assert "/help" in none and "/status" not in none and "3 more command(s)" in none


def test_registry_names_and_parsing(registry: CommandRegistry) -> None:
    assert registry.known == {"help", "status", "deploy", "rollback"}
    assert registry.parse("/Deploy 1.2\n/help\n/nope") == [
        Command("deploy", "1.2", 1),
        Command("help", "", 2),
    ]
    spec = registry.get("deploy")
    assert spec is not None and spec.permission is Permission.WRITE
    assert registry.get("help") is None and registry.get("nope") is None
    assert [s.name for s in registry.available(Permission.TRIAGE)] == ["status"]


@pytest.mark.parametrize("name", ["help", "deploy", "Deploy", "/deploy", "", "de ploy", "1x"])
def test_registering_a_bad_or_taken_name_fails(registry: CommandRegistry, name: str) -> None:
    with pytest.raises(ValueError):
        registry.register(name, Permission.READ, "?", nothing)
