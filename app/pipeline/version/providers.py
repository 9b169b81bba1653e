"""The runtimes the pipeline knows, and where their releases are published.

Three providers are built in. An operator can add more, or change the sources of the
built-in ones, with a TOML providers file named by ``UPDATE_PIPELINE_PROVIDERS_FILE``::

    [providers.codex]
    github = "openai/codex"            # add a GitHub releases source

    [providers.claude_code]
    npm = "@anthropic-ai/claude-code"  # change the npm package

    [providers.aider]                  # a new provider
    name = "Aider"
    npm = "aider-chat-bin"

Each provider table takes ``name`` (display name), ``npm`` (an npm package name, or
``false`` for no npm source) and ``github`` (``owner/name`` of a repository whose
releases to watch, or ``false`` for none). Every problem in the file is reported at
once, each as ``path:line: ...``.

This module imports nothing from ``app.config`` so that the settings can import it.
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROVIDERS_FILE_ENV = "UPDATE_PIPELINE_PROVIDERS_FILE"

PROVIDER_ID = re.compile(r"[a-z][a-z0-9_]*")
PROVIDER_ID_MAX = 64
NAME_MAX = 100
NPM_NAME_MAX = 214
PROVIDER_KEYS = ("name", "npm", "github")


@dataclass(frozen=True, slots=True)
class Provider:
    """A runtime and its release sources; at least one of npm and GitHub is set.

    ``name`` is the display name; left empty, it is the id.
    """

    id: str
    npm_package: str | None
    github_repo: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.id)
        if self.npm_package is None and self.github_repo is None:
            raise ValueError(f"provider {self.id!r} has no source (npm or GitHub)")


BUILTIN_PROVIDERS: tuple[Provider, ...] = (
    Provider("claude_code", "@anthropic-ai/claude-code", name="Claude Code"),
    Provider("codex", "@openai/codex", name="Codex"),
    Provider("gemini_cli", "@google/gemini-cli", name="Gemini CLI"),
)


class ProvidersFileError(ValueError):
    """The providers file is unusable; each problem names the file and, when known, the line.

    The same shape as ``app.config.ConfigError``: ``problems`` lists every problem, and
    the message joins them with ``"; "``.
    """

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("; ".join(problems))


def providers_from_env(value: str | None) -> tuple[Provider, ...]:
    """The providers for a ``UPDATE_PIPELINE_PROVIDERS_FILE`` value.

    Unset, empty or blank means no file: the built-ins. Otherwise the file is loaded
    (a relative path is relative to the working directory), and any problem raises
    ProvidersFileError.
    """
    if value is None or not value.strip():
        return BUILTIN_PROVIDERS
    return load_providers(Path(value.strip()))


def load_providers(path: Path) -> tuple[Provider, ...]:
    """The built-ins merged with the providers file at ``path``.

    Built-ins come first, in their order, then new providers in the order the file
    defines them. Raises ProvidersFileError listing every problem.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ProvidersFileError(
            path, [f"{path}: cannot read the providers file: {reason}"]
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ProvidersFileError(
            path,
            [f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8"],
        ) from None
    # Some editors start UTF-8 files with a byte-order mark, which TOML does not allow.
    text = text.removeprefix("\ufeff")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProvidersFileError(path, [_syntax_problem(path, text, exc)]) from None
    except RecursionError:
        raise ProvidersFileError(path, [f"{path}: TOML values nest too deeply"]) from None
    return _Merger(path, text, document).providers()


# -- Validation ------------------------------------------------------------------------


class _Merger:
    """Checks the parsed file against the format and merges it into the built-ins."""

    def __init__(self, path: Path, text: str, document: dict[str, Any]) -> None:
        self.path = path
        self.document = document
        self.lines = _key_lines(text)
        self.found: list[tuple[int, str]] = []

    def problem(self, keys: tuple[str, ...], message: str) -> None:
        line = self._line_of(keys)
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        self.found.append((line or 0, f"{where}: {message}"))

    def _line_of(self, keys: tuple[str, ...]) -> int | None:
        # The key itself, or else the nearest enclosing table that has a line.
        for end in range(len(keys), 0, -1):
            line = self.lines.get(keys[:end])
            if line is not None:
                return line
        return None

    def providers(self) -> tuple[Provider, ...]:
        for key in self.document:
            if key != "providers":
                self.problem(
                    (key,), f"unknown key {_dotted((key,))!r}: provider tables go under [providers]"
                )
        tables = self.document.get("providers", {})
        if not isinstance(tables, dict):
            self.problem(
                ("providers",),
                "'providers' must be a table of providers, like [providers.codex]",
            )
            tables = {}
        builtins = {p.id: p for p in BUILTIN_PROVIDERS}
        merged = dict(builtins)
        for provider_id, table in tables.items():
            provider = self._provider(provider_id, table, builtins.get(provider_id))
            if provider is not None:
                merged[provider_id] = provider
        if self.found:
            # In file order, as an editor shows them; sorted() is stable within a line.
            problems = [message for _, message in sorted(self.found, key=lambda f: f[0])]
            raise ProvidersFileError(self.path, problems)
        return tuple(merged.values())

    def _provider(
        self, provider_id: str, table: object, builtin: Provider | None
    ) -> Provider | None:
        keys = ("providers", provider_id)
        ok = True
        if not _valid_id(provider_id):
            ok = False
            self.problem(
                keys,
                f"{provider_id!r} is not a provider id: use a lower-case letter, then lower-case"
                f" letters, digits or _ (at most {PROVIDER_ID_MAX} characters), like 'claude_code'",
            )
        if not isinstance(table, dict):
            self.problem(
                keys,
                f"{_dotted(keys)} must be a table, like [{_dotted(keys)}] followed by"
                " npm = ... or github = ...",
            )
            return None
        for key in table:
            if key not in PROVIDER_KEYS:
                self.problem(
                    (*keys, key),
                    f"{_dotted((*keys, key))}: unknown key {key!r}"
                    f" (a provider takes {', '.join(PROVIDER_KEYS)})",
                )
                ok = False

        name = builtin.name if builtin else provider_id
        if "name" in table:
            checked_name = self._name(keys, table["name"])
            ok = ok and checked_name is not None
            name = checked_name or name
        npm = builtin.npm_package if builtin else None
        if "npm" in table:
            checked, npm = self._source(keys, "npm", table["npm"], _npm_problem)
            ok = ok and checked
        github = builtin.github_repo if builtin else None
        if "github" in table:
            checked, github = self._source(keys, "github", table["github"], _github_problem)
            ok = ok and checked
        if not ok:
            return None
        if npm is None and github is None:
            if builtin is None:
                self.problem(
                    keys,
                    f"{_dotted(keys)}: a new provider needs a source:"
                    ' npm = "package" or github = "owner/name"',
                )
            else:
                removed = [k for k in ("npm", "github") if table.get(k) is False]
                self.problem(
                    (*keys, removed[0]) if removed else keys,
                    f"{_dotted(keys)}: this leaves the built-in provider with no source;"
                    ' keep npm or add github = "owner/name"',
                )
            return None
        return Provider(provider_id, npm, github, name)

    def _name(self, keys: tuple[str, ...], value: object) -> str | None:
        where = _dotted((*keys, "name"))
        if not isinstance(value, str):
            self.problem((*keys, "name"), f"{where} must be a string, not {_toml_type(value)}")
            return None
        if not value.strip() or len(value) > NAME_MAX or not value.isprintable():
            self.problem(
                (*keys, "name"),
                f"{where}: {value!r} is not a display name"
                f" (1 to {NAME_MAX} printable characters, not blank)",
            )
            return None
        return value

    def _source(
        self,
        keys: tuple[str, ...],
        key: str,
        value: object,
        problem_of: Callable[[str], str | None],
    ) -> tuple[bool, str | None]:
        """(valid, source): ``false`` means no source of this kind."""
        where = _dotted((*keys, key))
        if value is False:
            return True, None
        if not isinstance(value, str):
            self.problem(
                (*keys, key),
                f"{where} must be a string or false (no {key} source), not {_toml_type(value)}",
            )
            return False, None
        reason = problem_of(value)
        if reason is not None:
            self.problem((*keys, key), f"{where}: {reason}")
            return False, None
        return True, value


def _valid_id(provider_id: str) -> bool:
    return len(provider_id) <= PROVIDER_ID_MAX and PROVIDER_ID.fullmatch(provider_id) is not None


# Characters JavaScript's encodeURIComponent leaves alone, which npm calls URL-friendly.
_URL_SAFE = re.compile(r"[A-Za-z0-9\-_.!~*'()]+")
_NPM_SCOPED = re.compile(r"@([^/]+)/([^/]+)")
_NPM_RESERVED = ("node_modules", "favicon.ico")


def _npm_problem(name: str) -> str | None:
    """Why ``name`` is not a valid name for a new npm package, or None.

    The rules of npm's validate-npm-package-name for new packages: at most 214
    characters, lower case, URL-friendly, optionally ``@scope/name``. Core module names
    (``http``, ``fs``) are allowed, as npm only warns about them.
    """
    bad = f"{name!r} is not a valid npm package name"
    if not name:
        return f"{bad}: it is empty"
    if name.strip() != name:
        return f"{bad}: it has spaces around it"
    if len(name) > NPM_NAME_MAX:
        return f"{bad}: it is longer than {NPM_NAME_MAX} characters ({len(name)})"
    if any(char.isspace() for char in name):
        return f"{bad}: it cannot contain spaces"
    if name.lower() != name:
        return f"{bad}: npm names are lower case"
    if name.startswith((".", "_")):
        return f"{bad}: it cannot start with . or _"
    if name in _NPM_RESERVED:
        return f"{bad}: {name!r} is reserved"
    if re.search(r"[~'!()*]", name.rsplit("/", 1)[-1]):
        return f"{bad}: it cannot contain any of ~'!()*"
    if _URL_SAFE.fullmatch(name):
        return None
    scoped = _NPM_SCOPED.fullmatch(name)
    if scoped is None:
        if name.startswith("@"):
            return f"{bad}: a scoped name is @scope/name, with one / and both parts non-empty"
        if "/" in name:
            return f"{bad}: only a scoped name (@scope/name) may contain /"
        return f"{bad}: it may only contain a-z, 0-9 and - . _"
    scope, package = scoped.groups()
    if not (_URL_SAFE.fullmatch(scope) and _URL_SAFE.fullmatch(package)):
        return f"{bad}: it may only contain a-z, 0-9 and - . _ (and @scope/)"
    if scope.startswith(".") or package.startswith("."):
        return f"{bad}: neither the scope nor the name can start with ."
    return None


# GitHub's rules: an owner is 1 to 39 letters, digits or hyphens, not starting or ending
# with a hyphen; a repository name is 1 to 100 letters, digits, '.', '-' or '_'.
_GITHUB_OWNER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,37}[A-Za-z0-9])?")
_GITHUB_REPO = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _github_problem(repo: str) -> str | None:
    bad = f"{repo!r} is not a GitHub repository"
    if "://" in repo or repo.startswith(("github.com/", "git@")):
        return f"{bad}: write owner/name (like 'openai/codex'), not a URL"
    owner, slash, name = repo.partition("/")
    if not slash or "/" in name:
        return f"{bad}: write owner/name, like 'openai/codex'"
    if not _GITHUB_OWNER.fullmatch(owner):
        return (
            f"{bad}: the owner {owner!r} must be 1 to 39 letters, digits or hyphens,"
            " not starting or ending with a hyphen"
        )
    if not _GITHUB_REPO.fullmatch(name) or name in (".", ".."):
        return f"{bad}: the name {name!r} must be 1 to 100 letters, digits, '.', '-' or '_'"
    return None


def _dotted(keys: tuple[str, ...]) -> str:
    return ".".join(k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _quote(k) for k in keys)


def _quote(key: str) -> str:
    escaped = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


# -- Positions -------------------------------------------------------------------------

_SYNTAX_AT = re.compile(r"^(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_SYNTAX_AT_END = " (at end of document)"


def _syntax_problem(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    found = _SYNTAX_AT.match(message)
    if found:
        return (
            f"{path}:{found['line']}: TOML syntax error: {found['message']}"
            f" (column {found['column']})"
        )
    if message.endswith(_SYNTAX_AT_END):
        last_line = text.rstrip().count("\n") + 1
        return (
            f"{path}:{last_line}: TOML syntax error: {message.removesuffix(_SYNTAX_AT_END)}"
            " (at the end of the file)"
        )
    return f"{path}: TOML syntax error: {message}"


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line where each key path (and each table) is first defined.

    tomllib gives no positions, so this walks the (already valid) document once,
    reading table headers, dotted keys and inline tables and skipping over values.
    It never raises: if it meets something it does not follow, it keeps what it found,
    and errors fall back to the nearest enclosing table's line, or to no line.
    """
    scanner = _KeyScanner(text)
    # Best effort: a slip here must never hide the problem being reported.
    with contextlib.suppress(_ScanError, IndexError, ValueError, RecursionError):
        scanner.document()
    return scanner.found


class _ScanError(Exception):
    pass


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BASIC_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_LITERAL_STRING = re.compile(r"'[^'\n]*'")
_PLAIN_VALUE = re.compile(r"[^,\]}#\n]*")


class _KeyScanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.found: dict[tuple[str, ...], int] = {}
        self.explicit: set[tuple[str, ...]] = set()
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    @property
    def line(self) -> int:
        return bisect_right(self.line_starts, self.pos)

    def record(self, keys: tuple[str, ...], line: int) -> None:
        # A header or key defines its path there, even if a longer path named it before
        # ([providers.x] then [providers]); it also defines its enclosing tables, which
        # are placed where they first appear unless they have a header of their own.
        if keys not in self.explicit:
            self.explicit.add(keys)
            self.found[keys] = line
        for end in range(1, len(keys)):
            self.found.setdefault(keys[:end], line)

    def peek(self, size: int = 1) -> str:
        return self.text[self.pos : self.pos + size]

    def expect(self, literal: str) -> None:
        if not self.text.startswith(literal, self.pos):
            raise _ScanError(literal)
        self.pos += len(literal)

    def skip_spaces(self) -> None:
        while self.peek() in (" ", "\t") and self.peek():
            self.pos += 1

    def skip_blank(self) -> None:
        """Spaces, newlines and comments (inside arrays)."""
        while True:
            char = self.peek()
            if char in (" ", "\t", "\r", "\n") and char:
                self.pos += 1
            elif char == "#":
                self.skip_comment()
            else:
                return

    def skip_comment(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end == -1 else end

    def document(self) -> None:
        table: tuple[str, ...] = ()
        while self.pos < len(self.text):
            self.skip_blank()
            if self.pos >= len(self.text):
                return
            line = self.line
            if self.peek(2) == "[[":
                self.pos += 2
                table = self.keys()
                self.expect("]]")
                self.record(table, line)
            elif self.peek() == "[":
                self.pos += 1
                table = self.keys()
                self.expect("]")
                self.record(table, line)
            else:
                self.key_value(table)

    def key_value(self, table: tuple[str, ...]) -> None:
        line = self.line
        keys = (*table, *self.keys())
        self.expect("=")
        self.record(keys, line)
        self.skip_spaces()
        self.value(keys)

    def keys(self) -> tuple[str, ...]:
        parts = []
        while True:
            self.skip_spaces()
            parts.append(self.key_part())
            self.skip_spaces()
            if self.peek() != ".":
                return tuple(parts)
            self.pos += 1

    def key_part(self) -> str:
        for pattern in (_BARE_KEY, _BASIC_STRING, _LITERAL_STRING):
            found = pattern.match(self.text, self.pos)
            if found:
                self.pos = found.end()
                raw = found.group()
                # Let tomllib decode a quoted key's escapes exactly as it did for the data.
                return raw if pattern is _BARE_KEY else str(tomllib.loads(f"k = {raw}")["k"])
        raise _ScanError("key")

    def value(self, keys: tuple[str, ...]) -> None:
        char = self.peek()
        if char == "{":
            self.pos += 1
            self.skip_spaces()
            while self.peek() != "}":
                self.key_value(keys)
                self.skip_spaces()
                if self.peek() == ",":
                    self.pos += 1
                self.skip_spaces()
            self.pos += 1
        elif char == "[":
            self.pos += 1
            self.skip_blank()
            while self.peek() != "]":
                # Keys inside arrays have no path of their own; their items are skipped.
                self.value((*keys, "[]"))
                self.skip_blank()
                if self.peek() == ",":
                    self.pos += 1
                self.skip_blank()
            self.pos += 1
        elif char in ('"', "'"):
            self.string()
        else:
            # Numbers, booleans and dates: up to the end of the value.
            found = _PLAIN_VALUE.match(self.text, self.pos)
            if found is None or found.end() == self.pos:
                raise _ScanError("value")
            self.pos = found.end()

    def string(self) -> None:
        quote = self.peek()
        if self.peek(3) == quote * 3:
            # Multi-line: up to the closing triple quote (which may be followed by up to
            # two more quote characters that belong to the content).
            self.pos += 3
            while True:
                if quote == '"' and self.peek() == "\\":
                    self.pos += 2
                    continue
                if self.peek(3) == quote * 3:
                    self.pos += 3
                    while self.peek() == quote:
                        self.pos += 1
                    return
                if not self.peek():
                    raise _ScanError("string")
                self.pos += 1
        pattern = _BASIC_STRING if quote == '"' else _LITERAL_STRING
        found = pattern.match(self.text, self.pos)
        if found is None:
            raise _ScanError("string")
        self.pos = found.end()
