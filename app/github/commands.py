"""Slash commands in issue comments: parsing, permission levels, escaping, the registry,
and the ``issue_comment`` handler that runs them.

Features register their commands (with the permission each needs) in the one
``CommandRegistry`` the server builds. The handler answers through the outbox, queued with
the delivery's completion: 👀 when a comment's commands are taken, then one reply when
there is something to say, then 🚀 if a command succeeded and 😕 if one was refused.
"""

from __future__ import annotations

import re
import string
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache
from gidgethub import BadRequest, routing, sansio
from gidgethub.abc import GitHubAPI

from app.clock import Clock
from app.github.auth import InstallationSuspended
from app.github.outbox import add_comment, add_reaction
from app.logs import get_logger
from app.store import NewEffect

if TYPE_CHECKING:
    from app.github.webhooks import WebhookContext

log = get_logger("github.commands")

# GitHub refuses comment bodies longer than 65536 characters, so a longer body cannot come
# from GitHub; scanning stops there, which also bounds the work one webhook can cause.
MAX_BODY_CHARS = 65536
# A comment is a request from one person: a few commands at most. More are ignored, so a
# pasted log or a hostile comment cannot queue thousands of actions (and reactions).
MAX_COMMANDS = 20

# Markdown line endings only: str.splitlines would also split on U+2028, U+0085, form feeds
# and more, which GitHub renders within a line.
_LINE_END = re.compile(r"\r\n|\r|\n")
# Up to three spaces (more is an indented code block), a slash, an ASCII name (ASCII so
# that case-folding tricks such as the Kelvin sign cannot spell a name), then whitespace
# (any, a no-break space renders as one) or the end of the line: "/etc/passwd" and
# "/deploy," are not commands.
_COMMAND = re.compile(r" {0,3}/([A-Za-z][A-Za-z0-9_-]*)(?:\s(.*))?", re.DOTALL)
# An opening code fence: 3+ backticks (info string without backticks) or 3+ tildes.
_FENCE_OPEN = re.compile(r" {0,3}(`{3,}(?=[^`]*$)|~{3,})")
_QUOTE = re.compile(r" {0,3}>")


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # without the slash, lower-cased
    args: str  # the rest of the line, stripped
    line: int  # 1-based line of the comment it is on


def _lines(body: str) -> Iterator[tuple[int, str]]:
    start = 0
    number = 1
    for match in _LINE_END.finditer(body):
        yield number, body[start : match.start()]
        start = match.end()
        number += 1
    yield number, body[start:]


def parse_commands(body: str, known: Collection[str]) -> list[Command]:
    """The commands in a comment, in order: lines ``/name args`` whose ``name`` is in
    ``known``, outside fenced code blocks and block quotes.

    Markdown rules followed, as GitHub renders them: a command line may be indented by up
    to three spaces (four make it code); a fence is 3+ backticks or tildes, closed only by
    a line of the same character at least as long with nothing after it, and an
    unterminated fence runs to the end of the comment; a quote's paragraph goes on over
    the following lines until a blank line (lazy continuation), so ``> text`` then
    ``/deploy`` on the next line is quoted. A line starting with a backtick (inline code)
    or any other character is not a command. At most ``MAX_COMMANDS`` are returned and
    only the first ``MAX_BODY_CHARS`` characters are read.
    """
    names = {name.lower() for name in known}
    found: list[Command] = []
    if "/" not in body or not names:
        return found
    fence: str | None = None  # the opening fence's run of ` or ~ while inside a block
    quoted = False  # inside a quote's paragraph, which lazily takes in the next lines
    for number, line in _lines(body[:MAX_BODY_CHARS]):
        if fence is not None:
            stripped = line.strip(" \t")
            if (
                len(line) - len(line.lstrip(" ")) <= 3
                and stripped.startswith(fence)
                and stripped.rstrip(fence[0]) == ""
            ):
                fence = None
            continue
        if not line.strip(" \t"):  # blank in Markdown terms: spaces and tabs only
            quoted = False
            continue
        quote = _QUOTE.match(line)
        if quote:
            # "> ```" opens a fence inside the quote; it ends with the quote, so a quote
            # line with only a fence leaves no paragraph to continue.
            rest = line[quote.end() :].strip()
            quoted = bool(rest) and not rest.startswith(("```", "~~~"))
            continue
        opening = _FENCE_OPEN.match(line)
        if opening:
            fence = opening.group(1)
            quoted = False
            continue
        if quoted:
            continue
        command = _COMMAND.fullmatch(line)
        if command and command.group(1).lower() in names:
            args = (command.group(2) or "").strip()
            found.append(Command(command.group(1).lower(), args, number))
            if len(found) >= MAX_COMMANDS:
                break
    return found


def is_bot(sender: Mapping[str, Any]) -> bool:
    """Whether a webhook ``sender`` is a bot (the App itself included)."""
    login = sender.get("login")
    return sender.get("type") == "Bot" or (isinstance(login, str) and login.endswith("[bot]"))


# -- permissions ------------------------------------------------------------------------


class Permission(IntEnum):
    """A user's level on a repository, ordered: compare with ``<``/``>=``."""

    NONE = 0
    READ = 1
    TRIAGE = 2
    WRITE = 3
    MAINTAIN = 4
    ADMIN = 5

    def __str__(self) -> str:
        return self.name.lower()


BUILT_IN_ROLES = {p.name.lower(): p for p in Permission if p is not Permission.NONE}
LEGACY_PERMISSIONS = {
    "admin": Permission.ADMIN,
    "write": Permission.WRITE,
    "read": Permission.READ,
    "none": Permission.NONE,
}
PERMISSION_URL = "/repos/{owner}/{repo}/collaborators/{username}/permission"


_FLAGS = (
    ("admin", Permission.ADMIN),
    ("maintain", Permission.MAINTAIN),
    ("push", Permission.WRITE),
    ("triage", Permission.TRIAGE),
    ("pull", Permission.READ),
)


def permission_from(body: Mapping[str, Any]) -> Permission:
    """The level in GitHub's answer: ``role_name`` when a built-in role; for a custom role,
    the highest of the user's ``permissions`` flags (its base role's: the legacy
    ``permission`` says only admin, write or read, so a role based on maintain would read
    as write and one based on triage as read), else that legacy ``permission``; anything
    unknown counts as none."""
    role = body.get("role_name")
    if isinstance(role, str) and role in BUILT_IN_ROLES:
        return BUILT_IN_ROLES[role]
    user = body.get("user")
    flags = user.get("permissions") if isinstance(user, Mapping) else None
    if isinstance(flags, Mapping):
        return next((level for flag, level in _FLAGS if flags.get(flag) is True), Permission.NONE)
    legacy = body.get("permission")
    if isinstance(legacy, str):
        return LEGACY_PERMISSIONS.get(legacy, Permission.NONE)
    return Permission.NONE


async def permission_of(client: GitHubAPI, repo_full_name: str, username: str) -> Permission:
    """``username``'s permission on ``owner/repo``; none when GitHub says 404."""
    owner, _, repo = repo_full_name.partition("/")
    try:
        body = await client.getitem(
            PERMISSION_URL, url_vars={"owner": owner, "repo": repo, "username": username}
        )
    except BadRequest as exc:
        if exc.status_code == 404:
            return Permission.NONE
        raise
    return permission_from(body)


class PermissionCache:
    """``permission_of``, remembered briefly per (repository, user): a comment with several
    commands, or a burst of comments, asks GitHub once. Kept short so that a revoked
    permission stops working within ``ttl`` seconds. Errors are not remembered."""

    def __init__(self, clock: Clock, *, ttl: float = 60.0, maxsize: int = 4096) -> None:
        self._cache: TTLCache[tuple[str, str], Permission] = TTLCache(
            maxsize=maxsize, ttl=ttl, timer=clock.monotonic
        )

    async def get(self, client: GitHubAPI, repo_full_name: str, username: str) -> Permission:
        key = (repo_full_name.lower(), username.lower())
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        permission = await permission_of(client, repo_full_name, username)
        self._cache[key] = permission
        return permission

    def forget(self, repo_full_name: str, username: str) -> None:
        self._cache.pop((repo_full_name.lower(), username.lower()), None)


# -- echoing user text --------------------------------------------------------------------

ZWJ = "\u200d"
ELLIPSIS = "\u2026"
# Bidirectional overrides and isolates: they can make echoed text read differently.
_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


# Dropped before anything else: control characters that are not whitespace (whitespace,
# newlines included, is collapsed instead), and the bidi controls.
_DROP: dict[int, None] = {
    code: None
    for code in [*range(0x20), *range(0x7F, 0xA0), *map(ord, _BIDI)]
    if not chr(code).isspace()
}


def _escapes() -> dict[int, str]:
    table = {ord(c): "\\" + c for c in string.punctuation}
    table.update(
        {
            ord("&"): "&amp;",
            ord("<"): "&lt;",
            ord(">"): "&gt;",
            # GitHub links mentions and issue references in rendered text, after Markdown
            # escapes are gone: a zero-width joiner keeps the name from following the sign.
            ord("@"): "@" + ZWJ,
            ord("#"): "\\#" + ZWJ,
        }
    )
    return table


_ESCAPES = _escapes()


def escape_for_comment(text: str, limit: int = 200) -> str:
    """User text made safe to put in a Markdown paragraph of a bot comment.

    The approach: the text is shown as plain text rather than inline code (a code span is
    literal only in Markdown context, and raw HTML would come back inside an HTML block).
    Whitespace runs, newlines included, become one space; control and bidi characters are
    dropped; text longer than ``limit`` characters is cut to ``limit - 1`` and ends in
    "…". Then every ASCII punctuation character is backslash-escaped (valid CommonMark for
    all of them, so no emphasis, links, images, code, tables, math or list markers can
    form, wherever the text lands in a line), except ``& < >``, which become entities (no
    HTML, also inside an HTML block), and ``@`` and ``#`` are followed by a zero-width
    joiner, so no one is pinged and no issue gets a reference. Cutting before escaping
    means an escape is never cut in half.
    """
    plain = " ".join(text.translate(_DROP).split())
    if len(plain) > limit:
        plain = plain[: max(limit - 1, 0)].rstrip() + ELLIPSIS
    return plain.translate(_ESCAPES)


# -- the registry ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Place:
    """The issue or pull request a command was typed on."""

    repo: str  # owner/name
    issue_number: int
    is_pull_request: bool
    labels: frozenset[str]  # lower-cased
    closed: bool = False


@dataclass
class Invocation:
    """One command to run, with who asked, where, and how the handler answers: it returns
    a Markdown line for the reply (or None), raises ``CommandRefused``, and appends any
    further GitHub side effects to ``effects``."""

    command: Command
    place: Place
    actor: str
    permission: Permission
    installation_id: int
    delivery_id: str
    comment_id: int
    effects: list[NewEffect]


class CommandRefused(Exception):
    """A command that cannot run as asked (missing argument, wrong state). The message is
    Markdown written by the handler; user text in it must go through ``escape_for_comment``."""


Handler = Callable[[Invocation], Awaitable[str | None]]
Where = Callable[[Place], bool]
HELP = "help"
_NAME = re.compile(r"[a-z][a-z0-9_-]*", re.ASCII)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    permission: Permission  # the least a commenter needs on the repository
    help: str  # one line, Markdown, written by us (never user text)
    handler: Handler
    usage: str = ""  # arguments, e.g. "<version>"
    where: Where | None = None  # where the command applies; None: everywhere

    def applies(self, place: Place | None) -> bool:
        return self.where is None or place is None or self.where(place)


class CommandRegistry:
    """The commands features offer, with the permission each needs; ``/help`` is built in."""

    def __init__(self) -> None:
        self._commands: dict[str, CommandSpec] = {}

    def register(
        self,
        name: str,
        permission: Permission,
        help: str,
        handler: Handler,
        *,
        usage: str = "",
        where: Where | None = None,
    ) -> CommandSpec:
        if not _NAME.fullmatch(name):
            raise ValueError(f"command name {name!r}: lower-case letters, digits, - and _")
        if name == HELP or name in self._commands:
            raise ValueError(f"command /{name} is already registered")
        spec = CommandSpec(name, permission, help, handler, usage, where)
        self._commands[name] = spec
        return spec

    def command(
        self,
        name: str,
        permission: Permission,
        help: str,
        *,
        usage: str = "",
        where: Where | None = None,
    ) -> Callable[[Handler], Handler]:
        """Decorator form of ``register``."""

        def decorate(handler: Handler) -> Handler:
            self.register(name, permission, help, handler, usage=usage, where=where)
            return handler

        return decorate

    @property
    def known(self) -> frozenset[str]:
        """Every name ``parse_commands`` should recognise, ``help`` included."""
        return frozenset(self._commands) | {HELP}

    def get(self, name: str) -> CommandSpec | None:
        return self._commands.get(name)

    def parse(self, body: str) -> list[Command]:
        return parse_commands(body, self.known)

    def here(self, place: Place | None) -> list[CommandSpec]:
        return sorted(
            (s for s in self._commands.values() if s.applies(place)), key=lambda s: s.name
        )

    def available(self, permission: Permission, place: Place | None = None) -> list[CommandSpec]:
        return [s for s in self.here(place) if permission >= s.permission]

    def help_text(self, permission: Permission, place: Place | None = None) -> str:
        """The ``/help`` reply: the commands someone with ``permission`` can use at
        ``place`` (everywhere when None)."""
        lines = [f"Commands you can use here (your permission: {permission}):", ""]
        lines.append(f"- `/{HELP}`: list the commands you can use here")
        available = self.available(permission, place)
        for spec in available:
            usage = f" {spec.usage}" if spec.usage else ""
            lines.append(f"- `/{spec.name}{usage}`: {spec.help} (needs {spec.permission})")
        hidden = len(self.here(place)) - len(available)
        if hidden:
            lines += ["", f"{hidden} more command(s) need a higher permission on this repository."]
        return "\n".join(lines)


# -- running commands from comments ----------------------------------------------------------

router = routing.Router()

EYES, ROCKET, CONFUSED = "eyes", "rocket", "confused"


@router.register("issue_comment", action="created")
async def comment_created(event: sansio.Event, context: WebhookContext) -> None:
    """Run the commands in a new comment. Edited and deleted comments are never acted
    on: an edit must not re-run a command, nor run one that was not there when posted."""
    data = event.data
    comment = data["comment"]
    if is_bot(comment.get("user") or {}) or is_bot(data.get("sender") or {}):
        return
    registry = context.commands
    commands = registry.parse(comment.get("body") or "")
    if not commands:
        return
    if context.github is None:
        log.info("commands in a comment ignored: the GitHub App is not configured")
        return
    if context.store is not None:
        # Only a delivery's body is signed, so the same comment can arrive again under a
        # new delivery id (replayed by someone who saw it). Its commands act for the
        # first delivery only; that one, processed again after a crash, goes on, as
        # handlers tolerate running twice.
        delivery = str(event.delivery_id)
        first = await context.store.claim_comment(int(comment["id"]), delivery, context.clock.now())
        if first != delivery:
            log.info(
                "commands of comment %s ignored: acted on by delivery %s already",
                comment["id"],
                first,
            )
            return
    installation_id = int(data["installation"]["id"])
    repo = str(data["repository"]["full_name"])
    issue = data["issue"]
    place = Place(
        repo,
        int(issue["number"]),
        "pull_request" in issue,
        frozenset(str(label.get("name", "")).lower() for label in issue.get("labels") or ()),
        issue.get("state") == "closed",
    )
    actor = str(comment["user"]["login"])
    try:
        client = context.github.installation(installation_id)
    except InstallationSuspended:
        log.info("commands on %s#%d ignored: installation suspended", repo, place.issue_number)
        return
    # A failure here (GitHub unreachable) fails the delivery before anything ran, so the
    # delivery's retry starts afresh.
    permission = await context.permissions.get(client, repo, actor)
    runner = _CommentRun(registry, place, actor, permission, installation_id, event, comment)
    context.effects.extend(await runner.run(commands))


class _CommentRun:
    def __init__(
        self,
        registry: CommandRegistry,
        place: Place,
        actor: str,
        permission: Permission,
        installation_id: int,
        event: sansio.Event,
        comment: Mapping[str, Any],
    ) -> None:
        self.registry = registry
        self.place = place
        self.actor = actor
        self.permission = permission
        self.installation_id = installation_id
        self.delivery_id = str(event.delivery_id)
        self.comment_id = int(comment["id"])
        self.effects: list[NewEffect] = []

    def _reaction(self, content: str) -> NewEffect:
        return add_reaction(
            self.installation_id,
            self.place.repo,
            self.place.issue_number,
            content,
            comment_id=self.comment_id,
        )

    async def run(self, commands: list[Command]) -> list[NewEffect]:
        head = [self._reaction(EYES)]
        replies: list[str] = []
        succeeded = refused = False
        for command in commands:
            said, ok = await self._one(command)
            succeeded |= ok
            refused |= not ok
            if said:
                replies.append(said)
        if replies:
            head.append(
                add_comment(
                    self.installation_id,
                    self.place.repo,
                    self.place.issue_number,
                    "\n\n".join(replies),
                    key=f"reply-{self.comment_id}",
                )
            )
        # The handlers' own effects come after the 👀 and before the verdict.
        tail = [self._reaction(ROCKET)] if succeeded else []
        if refused:
            tail.append(self._reaction(CONFUSED))
        return head[:1] + self.effects + head[1:] + tail

    async def _one(self, command: Command) -> tuple[str | None, bool]:
        """What to say about one command, and whether it succeeded."""
        label = f"`/{command.name}`"
        if command.name == HELP:
            return self.registry.help_text(self.permission, self.place), True
        spec = self.registry.get(command.name)
        if spec is None or not spec.applies(self.place):
            return f"{label} is not available here; `/help` lists what is.", False
        if self.permission < spec.permission:
            return (
                f"{label} needs **{spec.permission}** permission on this repository;"
                f" {escape_for_comment(self.actor, 100)} has **{self.permission}**.",
                False,
            )
        invocation = Invocation(
            command,
            self.place,
            self.actor,
            self.permission,
            self.installation_id,
            self.delivery_id,
            self.comment_id,
            self.effects,
        )
        try:
            said = await spec.handler(invocation)
        except CommandRefused as exc:
            return f"{label}: {exc}", False
        except Exception:
            # Earlier commands of this comment may have acted already, so the delivery is
            # not retried as a whole: this command is reported failed instead.
            log.exception(
                "/%s on %s#%d failed", command.name, self.place.repo, self.place.issue_number
            )
            return (
                f"{label} failed with an internal error; the service log has the details"
                f" (delivery {escape_for_comment(self.delivery_id, 100)}).",
                False,
            )
        return (f"{label}: {said}" if said else None), True
