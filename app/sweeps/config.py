"""A repository's sweep config: ``.github/update-pipeline.yml``, parsed and validated.

A repository opts in to post-update sweeps by committing::

    sweep:
      workflow: sweep.yml        # required: a file in .github/workflows/
      ref: main                  # optional: branch or tag; default: the default branch
      providers: [claude_code]   # optional: only sweep for these providers; default: all
      inputs:                    # optional: extra workflow_dispatch inputs, sent every time
        suite: smoke

The file is written by people who are not running this service, so every refusal is one
line that names the key (``sweep.providers[1]: ...``) or, for broken YAML, the line and
column. Parsing is pure: the caller fetches the file and stores the result.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml  # type: ignore[import-untyped]

CONFIG_PATH = ".github/update-pipeline.yml"
# Every dispatch sets these, so a repository's own inputs may not reuse the names.
STANDARD_INPUTS = ("sweep_id", "provider", "version", "build_id")
MAX_INPUTS = 25  # GitHub's cap on a workflow_dispatch's inputs
MAX_BYTES = 64 * 1024
INPUT_VALUE_MAX = 1000

TOP_KEYS = ("sweep",)
SWEEP_KEYS = ("workflow", "ref", "providers", "inputs")

_WORKFLOW = re.compile(r"(?:\.github/workflows/)?([A-Za-z0-9._-]+\.ya?ml)")
_INPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,99}")
# What git check-ref-format refuses anywhere in a name (whitespace and control characters
# included), so a typo is caught when the file is read rather than when a dispatch fails.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
REF_MAX = 255
# A YAML escape such as "\ud800" gives half of a UTF-16 pair, which no text can hold: it
# could be neither stored as UTF-8 nor sent to GitHub.
_SURROGATE = re.compile("[\ud800-\udfff]")
# The schema is three levels deep; anything much deeper is a mistake or an attack, and
# PyYAML's composer recurses once per level.
_MAX_DEPTH = 16


class ConfigError(ValueError):
    """The file is present but cannot be used; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class SweepConfig:
    """What a repository asked for. Hashing fails (``inputs`` is a dict): compare instead."""

    workflow: str  # the bare file name in .github/workflows/
    ref: str | None = None  # None: the repository's default branch
    providers: tuple[str, ...] | None = None  # None: every provider
    inputs: Mapping[str, str] = field(default_factory=dict)

    def wants(self, provider: str) -> bool:
        return self.providers is None or provider in self.providers

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "ref": self.ref,
            "providers": None if self.providers is None else list(self.providers),
            "inputs": dict(self.inputs),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SweepConfig:
        """Trusts what ``to_json`` stored: a provider retired since must not make the
        stored row unreadable, it just stops being wanted."""
        providers = data.get("providers")
        return cls(
            workflow=str(data["workflow"]),
            ref=data.get("ref"),
            providers=None if providers is None else tuple(str(p) for p in providers),
            inputs={str(k): str(v) for k, v in (data.get("inputs") or {}).items()},
        )


def parse_config(text: str | bytes, providers: Collection[str]) -> SweepConfig | None:
    """Parse the file's contents; ``providers`` are the known provider ids.

    Returns None when the repository has not opted in: an empty file, a mapping without a
    ``sweep`` key, or ``sweep: false`` / ``sweep: null`` (a way to switch sweeps off without
    deleting the file). Anything else that is not a valid config raises ConfigError, so
    that a typo is reported to the repository instead of silently opting it out.
    """
    data = _load(text)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"the file must be a mapping with a 'sweep' key, not {_kind(data)}")
    _refuse_unknown_keys(data, TOP_KEYS, "")
    sweep = data.get("sweep")
    if sweep is None or sweep is False:
        return None
    if not isinstance(sweep, dict):
        raise ConfigError(
            f"sweep: must be a mapping with at least 'workflow', or false to opt out,"
            f" not {_kind(sweep)}"
        )
    _refuse_unknown_keys(sweep, SWEEP_KEYS, "sweep")
    return SweepConfig(
        workflow=_workflow(sweep.get("workflow")),
        ref=_ref(sweep.get("ref")),
        providers=_providers(sweep.get("providers"), providers),
        inputs=_inputs(sweep.get("inputs")),
    )


# -- Fields ----------------------------------------------------------------------------------


def _workflow(value: object) -> str:
    if value is None:
        raise ConfigError("sweep.workflow: required: the workflow file to run, like sweep.yml")
    if not isinstance(value, str):
        raise ConfigError(f"sweep.workflow: must be a file name like sweep.yml, not {_kind(value)}")
    match = _WORKFLOW.fullmatch(value)
    if match is None:
        raise ConfigError(
            f"sweep.workflow: {_short(value)} is not a workflow file in .github/workflows/"
            " (letters, digits, '.', '_' or '-', ending in .yml or .yaml)"
        )
    return match[1]


def _ref(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"sweep.ref: must be a branch or tag name, not {_kind(value)}")
    problem = _ref_problem(value)
    if problem:
        raise ConfigError(f"sweep.ref: {_short(value)} is not a branch or tag name: {problem}")
    return value


def _ref_problem(ref: str) -> str | None:
    if not 1 <= len(ref) <= REF_MAX:
        return f"it must be 1 to {REF_MAX} characters long"
    if _SURROGATE.search(ref):
        return "it contains an escaped lone surrogate (\\ud800 to \\udfff), which is not text"
    bad = _REF_FORBIDDEN.search(ref)
    if bad:
        return f"it contains {bad[0]!r}"
    if ref.startswith(("-", "/")):
        return f"it starts with {ref[0]!r}"
    if ref.endswith(("/", ".", ".lock")):
        return "it ends with '/', '.' or '.lock'"
    if ref == "@" or any(part.startswith(".") for part in ref.split("/")):
        return "git does not allow it (a part starting with '.', or a lone '@')"
    return None


def _providers(value: object, known: Collection[str]) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ConfigError(
            f"sweep.providers: must be a list of provider ids, like [claude_code],"
            f" not {_kind(value)}"
        )
    if not value:
        raise ConfigError(
            "sweep.providers: the list is empty; leave the key out for every provider,"
            " or set sweep: false to opt out"
        )
    known_list = ", ".join(sorted(known)) or "none are configured"
    seen: list[str] = []
    for index, item in enumerate(value):
        where = f"sweep.providers[{index}]"
        if not isinstance(item, str):
            raise ConfigError(f"{where}: must be a provider id, not {_kind(item)}")
        if item not in known:
            raise ConfigError(f"{where}: {_short(item)} is not a known provider ({known_list})")
        if item in seen:
            raise ConfigError(f"{where}: {item!r} is already listed")
        seen.append(item)
    return tuple(seen)


def _inputs(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"sweep.inputs: must be a mapping of name: value, not {_kind(value)}")
    allowed = MAX_INPUTS - len(STANDARD_INPUTS)
    if len(value) > allowed:
        raise ConfigError(
            f"sweep.inputs: {len(value)} inputs, at most {allowed}: GitHub allows"
            f" {MAX_INPUTS} workflow_dispatch inputs and every sweep sets"
            f" {len(STANDARD_INPUTS)} ({', '.join(STANDARD_INPUTS)})"
        )
    inputs: dict[str, str] = {}
    folded: dict[str, str] = {}
    for name, raw in value.items():
        if isinstance(name, bool):  # YAML 1.1 reads a bare on, off, yes or no as one
            raise ConfigError(f"sweep.inputs: {name!r} is not an input name; quote the name")
        if not isinstance(name, str) or not _INPUT_NAME.fullmatch(name):
            raise ConfigError(
                f"sweep.inputs: {_short(name)} is not an input name (a letter or '_', then"
                " letters, digits, '_' or '-'; at most 100 characters)"
            )
        # GitHub compares input names without regard to case (inputs.Suite is
        # inputs.suite), so two names that differ only in case would collide.
        if name.lower() in STANDARD_INPUTS:
            raise ConfigError(
                f"sweep.inputs.{name}: is set by the service on every sweep; use another name"
            )
        if name.lower() in folded:
            raise ConfigError(
                f"sweep.inputs.{name}: same name as {folded[name.lower()]!r}"
                " (GitHub ignores case in input names)"
            )
        folded[name.lower()] = name
        inputs[name] = _input_value(f"sweep.inputs.{name}", raw)
    return inputs


def _input_value(where: str, value: object) -> str:
    # bool before int: True is an int, and a workflow reads booleans as true/false.
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | int | float):
        text = str(value)
    elif value is None:
        raise ConfigError(f"{where}: has no value; write '' for an empty string")
    elif isinstance(value, list | dict):
        raise ConfigError(f"{where}: must be a string, number or boolean, not {_kind(value)}")
    else:
        raise ConfigError(
            f"{where}: must be a string, number or boolean, not {_kind(value)}"
            " (quote it to pass it as text)"
        )
    if _SURROGATE.search(text):
        raise ConfigError(
            f"{where}: contains an escaped lone surrogate (\\ud800 to \\udfff), which is not text"
        )
    if len(text) > INPUT_VALUE_MAX:
        raise ConfigError(f"{where}: {len(text):,} characters long, at most {INPUT_VALUE_MAX:,}")
    return text


def _refuse_unknown_keys(mapping: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [key for key in mapping if key not in allowed]
    if not unknown:
        return
    what = f"{where}: unknown key" if where else "unknown top-level key"
    plural = "s" if len(unknown) > 1 else ""
    hint = ""
    if isinstance(unknown[0], str):
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    names = ", ".join(_short(key) for key in unknown)
    raise ConfigError(f"{what}{plural} {names} (allowed: {', '.join(allowed)}){hint}")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- YAML --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """The loader ``yaml.safe_load`` uses, with three more refusals.

    Aliases are refused because they are the one way a small document becomes a huge
    structure (and the schema has no use for them); nesting is capped because PyYAML
    recurses per level; duplicate keys are refused because PyYAML would silently keep
    the last one. Errors a constructor raises outside PyYAML's own hierarchy (a date
    like 2024-13-45, an over-long integer) are given the node's position.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in this file; write the value out",
                self.peek_event().start_mark,
            )
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested more than {_MAX_DEPTH} levels deep",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # e.g. ValueError from datetime.date(2024, 13, 45)
            tag = str(node.tag).rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{_short(node.value, 40)} is not a valid {tag} ({exc}); quote it if it is text",
                node.start_mark,
            ) from exc

    def construct_document(self, node: Any) -> Any:
        # Collections are filled in here, after construct_object returned: the same net.
        try:
            return super().construct_document(node)
        except yaml.YAMLError:
            raise
        except Exception as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this document ({exc})", None
            ) from exc

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        # A !!map tag on a scalar or a list: PyYAML itself refuses that, with the position.
        pairs = node.value if isinstance(node, yaml.MappingNode) else []
        for key_node, _ in pairs:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: PyYAML refuses it below, with its position
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_short(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def _load(text: str | bytes) -> Any:
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise ConfigError(f"the file is {size:,} bytes, at most {MAX_BYTES:,}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{_position(text, exc.start)}: not UTF-8 (byte 0x{text[exc.start]:02x})"
            ) from exc
    try:
        loader = _Loader(text)
        try:
            data = loader.get_data() if loader.check_data() else None
            if loader.check_data():
                mark = loader.peek_event().start_mark
                raise ConfigError(
                    f"line {mark.line + 1}, column {mark.column + 1}: a second YAML document"
                    " starts here; the file must hold one"
                )
            return data
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as exc:
        raise ConfigError(
            f"{_position(text, exc.position)}: character U+{exc.character:04X}"
            " is not allowed in YAML"
        ) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        if exc.context and exc.problem:
            problem += f" ({' '.join(str(exc.context).split())})"
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "invalid YAML"
        raise ConfigError(f"{where}: {problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {' '.join(str(exc).split())}") from exc


def _position(text: str | bytes, offset: int) -> str:
    head = text[:offset]
    if isinstance(head, bytes):
        head = head.decode("utf-8", "replace")
    line = head.count("\n") + 1
    column = len(head) - head.rfind("\n")  # rfind gives -1 on the first line
    return f"line {line}, column {column}"
