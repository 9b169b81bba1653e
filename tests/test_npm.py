"""The npm source: finding the registry as npm does, and reading a package's releases
from it (against the fake registry in tests/fake_npm_registry.py, never a real one)."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.config import Secret
from app.pipeline.version.npm import (
    NotModified,
    NpmSource,
    PackageReleases,
    SourceError,
    TransientSourceError,
    loads_in_pieces,
)
from app.pipeline.version.npmrc import (
    NpmRegistry,
    escape_package_name,
    expand_env,
    normalise_registry_url,
    parse_npmrc,
    resolve_registry,
)
from tests.fake_npm_registry import FakeNpmRegistry

PACKAGE = "@acme/agent"
TOKEN = "npm_s3cr3tT0kenValue1234567890"
T0 = datetime(2026, 1, 5, 9, 30, 15, 123000, tzinfo=UTC)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
async def registry() -> AsyncIterator[FakeNpmRegistry]:
    async with FakeNpmRegistry() as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def source_for(
    fake: FakeNpmRegistry,
    session: aiohttp.ClientSession,
    package: str = PACKAGE,
    *,
    token: str | None = None,
    **options: Any,
) -> NpmSource:
    registry = NpmRegistry(fake.url, "test", Secret(token) if token else None)
    return NpmSource(package, registry, session, **options)


@dataclass
class Host:
    """A machine as npm sees it: an environment, a project folder, a home folder, and a
    folder for a fake ``npm`` that is first on PATH (the only thing on it by default)."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for folder in (self.project, self.home, self.bin):
            folder.mkdir(exist_ok=True)
        self.env.setdefault("PATH", str(self.bin))
        self.env.setdefault("HOME", str(self.home))

    @property
    def project(self) -> Path:
        return self.root / "project"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def project_npmrc(self, text: str) -> Path:
        return _write(self.project / ".npmrc", text)

    def user_npmrc(self, text: str) -> Path:
        return _write(self.home / ".npmrc", text)

    def fake_npm(self, script: str) -> Path:
        """An ``npm`` that runs ``script`` (sh) and records its arguments and environment."""
        npm = self.bin / "npm"
        record = self.root / "npm-call"
        npm.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$*" "$npm_config_update_notifier" > "{record}"\n' + script + "\n"
        )
        npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
        return npm

    def npm_call(self) -> list[str]:
        path = self.root / "npm-call"
        return path.read_text().splitlines() if path.exists() else []

    def resolve(self, package: str = PACKAGE, **options: Any) -> NpmRegistry | None:
        return resolve_registry(package, env=self.env, cwd=self.project, home=self.home, **options)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


# -- .npmrc parsing ---------------------------------------------------------------------


def test_npmrc_reads_keys_values_comments_and_quotes() -> None:
    text = (
        "# a comment\n"
        "; another comment\n"
        "   registry = http://127.0.0.1:4873/  \n"
        'quoted = "value with spaces # and a hash"\n'
        "single = 'it''s'\n"
        "inline = value ; trailing comment\n"
        "escaped = a\\;b\\#c\n"
        "flag\n"
        "\n"
        "@acme:registry=http://127.0.0.1:4874/\r\n"
        "registry=http://127.0.0.1:4875/\n"
        "list[] = one\n"
        "[section]\n"
        "ignored = yes\n"
    )
    assert parse_npmrc(text, {}) == {
        "registry": "http://127.0.0.1:4875/",  # a later line wins
        "quoted": "value with spaces # and a hash",
        "single": "it''s",
        "inline": "value",
        "escaped": "a;b#c",
        "flag": "true",
        "@acme:registry": "http://127.0.0.1:4874/",
    }


def test_npmrc_expands_environment_variables_in_keys_and_values() -> None:
    env = {"NPM_TOKEN": "abc", "HOST": "127.0.0.1:4873"}
    text = "//${HOST}/:_authToken=${NPM_TOKEN}\nplain=${NPM_TOKEN}-x\n"
    assert parse_npmrc(text, env) == {"//127.0.0.1:4873/:_authToken": "abc", "plain": "abc-x"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${SET}", "value"),
        ("${UNSET}", "${UNSET}"),  # npm leaves an unset variable as written
        ("${UNSET?}", ""),  # ... unless it is marked optional
        ("\\${SET}", "${SET}"),  # one backslash escapes
        ("\\\\${SET}", "\\value"),  # two are one literal backslash
        ("a${SET}b${SET}", "avaluebvalue"),
        ("$SET", "$SET"),  # only the braced form
    ],
)
def test_expand_env_follows_npm(text: str, expected: str) -> None:
    assert expand_env(text, {"SET": "value"}) == expected


_PLAIN = st.text(
    st.characters(codec="ascii", categories=["L", "N"], include_characters="-._~:/@%+="),
    min_size=1,
    max_size=40,
)


@given(key=_PLAIN.filter(lambda k: "=" not in k and not k.endswith("[]")), value=_PLAIN)
def test_npmrc_gives_back_any_plain_value(key: str, value: str) -> None:
    assert parse_npmrc(f"{key}={value}\n", {}) == {key: value}


# -- where the registry comes from ------------------------------------------------------


def test_environment_beats_project_npmrc_beats_user_npmrc_beats_npm(host: Host) -> None:
    host.env["npm_config_registry"] = "http://127.0.0.1:1001/"
    project = host.project_npmrc("registry=http://127.0.0.1:1002/\n")
    user = host.user_npmrc("registry=http://127.0.0.1:1003/\n")
    host.fake_npm('echo "http://127.0.0.1:1004/"')

    found = host.resolve()
    assert found is not None
    assert (found.url, found.origin) == (
        "http://127.0.0.1:1001/",
        "environment npm_config_registry",
    )

    del host.env["npm_config_registry"]
    found = host.resolve()
    assert found is not None
    assert (found.url, found.origin) == ("http://127.0.0.1:1002/", str(project))

    project.unlink()
    found = host.resolve()
    assert found is not None
    assert (found.url, found.origin) == ("http://127.0.0.1:1003/", str(user))

    user.unlink()
    assert host.npm_call() == []  # npm is asked only when no file or variable answers
    found = host.resolve()
    assert found is not None
    assert (found.url, found.origin) == ("http://127.0.0.1:1004/", "npm config get registry")
    assert host.npm_call() == ["config get registry", "false"]  # update check off


def test_uppercase_environment_variable_counts_and_lowercase_wins(host: Host) -> None:
    host.env["NPM_CONFIG_REGISTRY"] = "http://127.0.0.1:1001/"
    found = host.resolve()
    assert found is not None
    assert (found.url, found.origin) == (
        "http://127.0.0.1:1001/",
        "environment NPM_CONFIG_REGISTRY",
    )

    host.env["npm_config_registry"] = "http://127.0.0.1:1002/"
    found = host.resolve()
    assert found is not None
    assert found.url == "http://127.0.0.1:1002/"


def test_empty_environment_value_is_ignored_as_npm_does(host: Host) -> None:
    host.env["npm_config_registry"] = ""
    host.user_npmrc("registry=http://127.0.0.1:1003/\n")
    found = host.resolve()
    assert found is not None
    assert found.url == "http://127.0.0.1:1003/"


def test_userconfig_variable_moves_the_user_npmrc(host: Host) -> None:
    host.user_npmrc("registry=http://127.0.0.1:1003/\n")
    other = _write(host.root / "elsewhere.npmrc", "registry=http://127.0.0.1:1005/\n")
    host.env["npm_config_userconfig"] = str(other)
    found = host.resolve()
    assert found is not None
    assert (found.url, found.origin) == ("http://127.0.0.1:1005/", str(other))


def test_home_tilde_in_userconfig(host: Host) -> None:
    _write(host.home / "npm.rc", "registry=http://127.0.0.1:1006/\n")
    host.env["NPM_CONFIG_USERCONFIG"] = "~/npm.rc"
    found = host.resolve()
    assert found is not None
    assert found.url == "http://127.0.0.1:1006/"


def test_registry_url_is_normalised_with_a_trailing_slash(host: Host) -> None:
    host.env["npm_config_registry"] = "  http://127.0.0.1:4873/mirror/npm  "
    found = host.resolve()
    assert found is not None
    assert found.url == "http://127.0.0.1:4873/mirror/npm/"
    assert found.package_url("@acme/agent") == "http://127.0.0.1:4873/mirror/npm/@acme%2fagent"


@pytest.mark.parametrize(
    "value",
    [
        "ftp://127.0.0.1/",
        "127.0.0.1:4873",
        "http://user:password@127.0.0.1:4873/",
        "http://127.0.0.1:4873/?x=1",
        "http:///nohost",
    ],
)
def test_unusable_registry_url_disables_the_source_without_showing_it(
    host: Host, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    host.env["npm_config_registry"] = value
    host.user_npmrc("registry=http://127.0.0.1:1003/\n")  # never silently used instead
    with caplog.at_level(logging.DEBUG, logger="update_pipeline"):
        assert host.resolve() is None
    assert "environment npm_config_registry" in caplog.text
    assert "password" not in caplog.text


def test_nothing_resolvable_gives_none(host: Host) -> None:
    assert host.resolve() is None  # no variables, no files, no npm on PATH


def test_npm_that_fails_gives_none(host: Host) -> None:
    host.fake_npm('echo "npm ERR! config broken" >&2\nexit 1')
    assert host.resolve() is None


def test_npm_answering_undefined_gives_none(host: Host) -> None:
    host.fake_npm("echo undefined")
    assert host.resolve() is None


def test_npm_that_hangs_is_killed_after_the_timeout(host: Host) -> None:
    # The real PATH after the fake bin folder, as a service's would be; `sleep` is a
    # child of the script, so only killing the whole process group frees the pipe.
    host.env["PATH"] = f"{host.bin}{os.pathsep}{os.environ['PATH']}"
    host.fake_npm("sleep 30\necho http://127.0.0.1:1004/")
    started = time.monotonic()
    assert host.resolve(npm_timeout=0.5) is None
    assert time.monotonic() - started < 10


def test_npm_command_and_runner_are_injectable(host: Host) -> None:
    calls: list[tuple[list[str], Path]] = []

    def runner(argv: Any, env: Any, cwd: Path) -> str:
        calls.append((list(argv), cwd))
        return "npm WARN something\nhttp://127.0.0.1:1007/\n"

    npm = host.fake_npm("exit 1")
    found = host.resolve(npm=str(npm), run=runner)
    assert found is not None
    assert found.url == "http://127.0.0.1:1007/"
    assert calls == [([str(npm), "config", "get", "registry"], host.project)]


# -- scoped registries ------------------------------------------------------------------


def test_scoped_registry_beats_the_default_for_its_scope_only(host: Host) -> None:
    host.env["npm_config_registry"] = "http://127.0.0.1:1001/"
    user = host.user_npmrc("@acme:registry=http://127.0.0.1:2001/\n")

    scoped = host.resolve("@acme/agent")
    assert scoped is not None
    assert (scoped.url, scoped.origin) == ("http://127.0.0.1:2001/", f"{user} (@acme:registry)")

    for other in ("@other/agent", "agent"):
        found = host.resolve(other)
        assert found is not None
        assert found.url == "http://127.0.0.1:1001/"


def test_scoped_registry_from_the_environment(host: Host) -> None:
    host.project_npmrc("@acme:registry=http://127.0.0.1:2002/\n")
    host.env["npm_config_@acme:registry"] = "http://127.0.0.1:2001/"
    found = host.resolve("@acme/agent")
    assert found is not None
    assert (found.url, found.origin) == (
        "http://127.0.0.1:2001/",
        "environment npm_config_@acme:registry",
    )


def test_package_document_url_encodes_the_scope_slash() -> None:
    assert escape_package_name("@acme/agent") == "@acme%2fagent"
    assert escape_package_name("agent.js") == "agent.js"
    for bad in ("", "../etc/passwd", "@acme/", "@acme/a/b", "a b", "@/x", ".hidden", "x?y"):
        with pytest.raises(ValueError, match="not an npm package name"):
            escape_package_name(bad)


# -- auth tokens ------------------------------------------------------------------------


def test_token_is_matched_by_the_longest_registry_prefix(host: Host) -> None:
    host.env["npm_config_registry"] = "http://127.0.0.1:4873/mirror/npm/"
    host.user_npmrc(
        "//127.0.0.1:4873/:_authToken=host-wide\n"
        "//127.0.0.1:4873/mirror/npm/:_authToken=exact\n"
        "//127.0.0.1:9999/mirror/npm/:_authToken=other-port\n"
    )
    found = host.resolve()
    assert found is not None and found.token is not None
    assert found.token.reveal() == "exact"

    host.user_npmrc("//127.0.0.1:4873/:_authToken=host-wide\n")
    found = host.resolve()
    assert found is not None and found.token is not None
    assert found.token.reveal() == "host-wide"

    host.user_npmrc("//127.0.0.1:9999/:_authToken=other-port\n")
    found = host.resolve()
    assert found is not None
    assert found.token is None
    assert found.headers() == {}


def test_token_comes_from_an_environment_variable_through_the_npmrc(host: Host) -> None:
    host.env["NPM_TOKEN"] = TOKEN
    host.project_npmrc(
        "registry=http://127.0.0.1:4873/\n//127.0.0.1:4873/:_authToken=${NPM_TOKEN}\n"
    )
    found = host.resolve()
    assert found is not None
    assert found.headers() == {"Authorization": f"Bearer {TOKEN}"}


def test_token_for_a_scoped_registry_follows_that_registry(host: Host) -> None:
    host.user_npmrc(
        "registry=http://127.0.0.1:1001/\n"
        "//127.0.0.1:1001/:_authToken=default-token\n"
        "@acme:registry=http://127.0.0.1:2001/\n"
        "//127.0.0.1:2001/:_authToken=scoped-token\n"
    )
    scoped = host.resolve("@acme/agent")
    plain = host.resolve("agent")
    assert scoped is not None and scoped.token == Secret("scoped-token")
    assert plain is not None and plain.token == Secret("default-token")


def test_token_never_shows_in_repr_str_description_or_logs(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    host.env["npm_config_registry"] = "http://127.0.0.1:4873/"
    host.env["npm_config_//127.0.0.1:4873/:_authToken"] = TOKEN
    with caplog.at_level(logging.DEBUG, logger="update_pipeline"):
        found = host.resolve()
    assert found is not None and found.token is not None
    assert found.token.reveal() == TOKEN
    shown = [repr(found), str(found), found.describe(), repr(found.token)]
    assert all(TOKEN not in text for text in shown), shown
    assert "with an auth token" in found.describe()
    assert TOKEN not in caplog.text


# -- checking a package -----------------------------------------------------------------


async def test_first_check_lists_every_release_with_its_time(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "1.0.0", T0)
    registry.publish(PACKAGE, "1.10.0", T0 + timedelta(days=2))
    registry.publish(PACKAGE, "1.2.0", T0 + timedelta(days=1))  # a backport, published late
    source = source_for(registry, session)

    result = await source.check()

    assert isinstance(result, PackageReleases)
    assert [r.version for r in result.releases] == ["1.0.0", "1.2.0", "1.10.0"]  # semver order
    assert [r.released_at for r in result.releases] == [
        T0,
        T0 + timedelta(days=1),
        T0 + timedelta(days=2),
    ]
    assert all(r.released_at.tzinfo is UTC for r in result.releases)
    assert result.latest.version == "1.2.0"  # npm publish moves latest, even backwards
    assert result.latest.tags == ("latest",)
    (request,) = registry.requests
    assert request.method == "GET"
    assert request.headers["Accept"] == "application/json"
    assert "If-None-Match" not in request.headers
    assert "Authorization" not in request.headers


async def test_second_check_is_conditional_and_finds_nothing_new(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "1.0.0", T0)
    source = source_for(registry, session)
    await source.check()

    assert await source.check() == NotModified(PACKAGE)

    first, second = registry.requests
    assert "If-None-Match" not in first.headers
    assert second.headers["If-None-Match"] == registry.etag(PACKAGE) == source.etag
    assert "If-Modified-Since" in second.headers
    assert second.status == 304


async def test_new_publish_gives_a_new_etag_and_the_new_release(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "1.0.0", T0)
    source = source_for(registry, session)
    await source.check()
    old_etag = source.etag

    registry.publish(PACKAGE, "1.1.0", T0 + timedelta(hours=3))
    result = await source.check()

    assert isinstance(result, PackageReleases)
    assert [r.version for r in result.releases] == ["1.0.0", "1.1.0"]
    assert result.latest.released_at == T0 + timedelta(hours=3)
    assert registry.requests[-1].headers["If-None-Match"] == old_etag
    assert source.etag == registry.etag(PACKAGE) != old_etag
    assert await source.check() == NotModified(PACKAGE)


async def test_times_in_other_offsets_come_back_in_utc(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "1.0.0", T0)
    registry.edit(PACKAGE, lambda d: d["time"].update({"1.0.0": "2026-01-05T11:30:15+02:00"}))
    result = await source_for(registry, session).check()
    assert isinstance(result, PackageReleases)
    assert result.latest.released_at == datetime(2026, 1, 5, 9, 30, 15, tzinfo=UTC)
    assert result.latest.released_at.tzinfo == UTC


async def test_scoped_package_is_requested_with_its_slash_encoded(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish("@acme/agent", "1.0.0", T0)
    registry.publish("agent", "2.0.0", T0)
    await source_for(registry, session, "@acme/agent").check()
    await source_for(registry, session, "agent").check()
    assert [r.path for r in registry.requests] == ["/@acme%2fagent", "/agent"]


async def test_token_is_sent_as_a_bearer_header(session: aiohttp.ClientSession) -> None:
    async with FakeNpmRegistry(token=TOKEN) as registry:
        registry.publish(PACKAGE, "1.0.0", T0)
        result = await source_for(registry, session, token=TOKEN).check()
    assert isinstance(result, PackageReleases)
    assert registry.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


async def test_refused_token_is_a_lasting_error_that_does_not_show_it(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeNpmRegistry(token="the-right-one") as registry:
        registry.publish(PACKAGE, "1.0.0", T0)
        source = source_for(registry, session, token=TOKEN)
        with (
            caplog.at_level(logging.DEBUG, logger="update_pipeline"),
            pytest.raises(SourceError) as raised,
        ):
            await source.check()
    assert not raised.value.transient
    assert raised.value.status == 401
    assert "auth token" in str(raised.value)
    assert TOKEN not in str(raised.value) + repr(raised.value) + caplog.text + repr(source)


async def test_resolved_registry_and_token_work_end_to_end(
    host: Host, session: aiohttp.ClientSession
) -> None:
    async with FakeNpmRegistry(token=TOKEN) as registry:
        registry.publish(PACKAGE, "1.0.0", T0)
        port = registry.url.split(":")[-1].rstrip("/")
        host.env["NPM_TOKEN"] = TOKEN
        host.user_npmrc(
            f"@acme:registry={registry.url}\n//127.0.0.1:{port}/:_authToken=${{NPM_TOKEN}}\n"
        )
        resolved = host.resolve()
        assert resolved is not None
        result = await NpmSource(PACKAGE, resolved, session).check()
    assert isinstance(result, PackageReleases)
    assert result.latest.version == "1.0.0"


# -- prereleases ------------------------------------------------------------------------


async def test_prereleases_are_semver_ones_and_anything_above_latest(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "0.9.0", T0)
    registry.publish(PACKAGE, "1.0.0", T0 + timedelta(days=1))
    registry.publish(PACKAGE, "1.1.0-beta.1", T0 + timedelta(days=2), tag="beta")
    registry.publish(PACKAGE, "1.1.0", T0 + timedelta(days=3), tag="next")
    source = source_for(registry, session)

    result = await source.check()
    assert isinstance(result, PackageReleases)
    assert {r.version: (r.prerelease, r.tags) for r in result.releases} == {
        "0.9.0": (False, ()),
        "1.0.0": (False, ("latest",)),
        "1.1.0-beta.1": (True, ("beta",)),
        "1.1.0": (True, ("next",)),  # not promoted yet: only `next` reaches it
    }
    assert result.latest.version == "1.0.0"

    registry.tag(PACKAGE, "latest", "1.1.0")  # promoted
    result = await source.check()
    assert isinstance(result, PackageReleases)
    promoted = {r.version: r.prerelease for r in result.releases}
    assert promoted == {"0.9.0": False, "1.0.0": False, "1.1.0-beta.1": True, "1.1.0": False}
    assert result.latest.tags == ("latest", "next")


# -- source_url -------------------------------------------------------------------------


async def test_source_url_prefers_template_then_homepage_then_document(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "1.0.0", T0, homepage="https://agent.example.test/docs")
    registry.publish("agent", "2.0.0", T0)
    template = "https://packages.example.test/{package}/v/{version}"

    with_template = await source_for(registry, session, page_url_template=template).check()
    with_homepage = await source_for(registry, session).check()
    bare = source_for(registry, session, "agent")
    without = await bare.check()

    assert isinstance(with_template, PackageReleases)
    assert with_template.latest.source_url == "https://packages.example.test/@acme/agent/v/1.0.0"
    assert isinstance(with_homepage, PackageReleases)
    assert with_homepage.latest.source_url == "https://agent.example.test/docs"
    assert isinstance(without, PackageReleases)
    assert without.latest.source_url == bare.url == f"{registry.url}agent"


async def test_template_fields_are_replaced_not_formatted(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "1.0.0", T0)
    template = "https://x.example.test/{package.__class__}/{version}"
    result = await source_for(registry, session, page_url_template=template).check()
    assert isinstance(result, PackageReleases)
    assert result.latest.source_url == "https://x.example.test/{package.__class__}/1.0.0"


# -- failures ---------------------------------------------------------------------------


async def _checked_once(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession, **options: Any
) -> NpmSource:
    registry.publish(PACKAGE, "1.0.0", T0)
    registry.publish(PACKAGE, "1.1.0", T0 + timedelta(days=1))
    source = source_for(registry, session, **options)
    assert isinstance(await source.check(), PackageReleases)
    return source


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ({"status": 500}, 500),
        ({"status": 503}, 503),
        ({"status": 429, "headers": {"Retry-After": "120"}}, 429),
    ],
)
async def test_server_errors_are_transient(
    registry: FakeNpmRegistry,
    session: aiohttp.ClientSession,
    fault: dict[str, Any],
    status: int,
) -> None:
    source = await _checked_once(registry, session)
    etag = source.etag
    registry.fail_next(**fault)
    with pytest.raises(TransientSourceError) as raised:
        await source.check()
    assert raised.value.transient and raised.value.status == status
    assert raised.value.retry_after == (120.0 if status == 429 else None)
    assert source.etag == etag
    assert await source.check() == NotModified(PACKAGE)  # the registry is back


async def test_timeout_is_transient(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    source = await _checked_once(registry, session, timeout=0.3)
    registry.fail_next(status=None, delay=5)
    with pytest.raises(TransientSourceError, match="no answer"):
        await source.check()


async def test_reset_connection_is_transient(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    source = await _checked_once(registry, session)
    registry.fail_next(2, reset=True)  # twice: a client may retry a dropped keep-alive once
    with pytest.raises(TransientSourceError):
        await source.check()


async def test_unreachable_registry_is_transient(session: aiohttp.ClientSession) -> None:
    async with FakeNpmRegistry() as registry:
        url = registry.url
    source = NpmSource(PACKAGE, NpmRegistry(url, "test"), session)
    with pytest.raises(TransientSourceError, match="cannot fetch"):
        await source.check()


async def test_unknown_package_is_a_lasting_error(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(SourceError, match="no such package") as raised:
        await source_for(registry, session, "@acme/missing").check()
    assert not raised.value.transient and raised.value.status == 404


async def test_not_modified_to_a_plain_request_is_an_error(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "1.0.0", T0)
    registry.fail_next(status=304)
    with pytest.raises(SourceError, match="304"):
        await source_for(registry, session).check()


async def test_document_above_the_size_limit_is_refused(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "1.0.0", T0)
    with pytest.raises(SourceError, match="larger than 200 bytes"):
        await source_for(registry, session, max_bytes=200).check()


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


def _add_version(key: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        document["versions"][key] = {"name": PACKAGE, "version": key}
        document["time"][key] = "2026-01-09T00:00:00.000Z"

    return change


BROKEN_DOCUMENTS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no versions": (_drop("versions"), "no 'versions' object"),
    "no time": (_drop("time"), "no 'time' object"),
    "no dist-tags": (_drop("dist-tags"), "no 'dist-tags' object"),
    "versions not an object": (_set(("versions",), []), "no 'versions' object"),
    "a version without a time": (_drop("time", "1.1.0"), "no release time for '1.1.0'"),
    "an unparsable time": (_set(("time", "1.1.0"), "last tuesday"), "not a date"),
    "a time that is not text": (_set(("time", "1.1.0"), 1767225600), "no release time"),
    "a key that is not semver": (_add_version("nightly"), "'nightly', which is not a semantic"),
    "a key with spaces": (_add_version(" 1.2.0"), "not a semantic version"),
    "latest names no version": (_set(("dist-tags", "latest"), "9.9.9"), "'9.9.9'"),
    "no latest tag": (_drop("dist-tags", "latest"), "latest dist-tag (None)"),
    "a manifest that is not an object": (_set(("versions", "1.1.0"), "1.1.0"), "no manifest"),
    "another package's document": (_set(("name",), "@acme/other"), "another package"),
}


@pytest.mark.parametrize("case", BROKEN_DOCUMENTS, ids=list(BROKEN_DOCUMENTS))
async def test_broken_document_is_an_error_and_the_etag_stays(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession, case: str
) -> None:
    change, message = BROKEN_DOCUMENTS[case]
    source = await _checked_once(registry, session)
    good_etag = source.etag
    registry.edit(PACKAGE, change)

    for _ in range(2):  # the broken revision is not remembered, so it is fetched again
        with pytest.raises(SourceError, match="the registry's document") as raised:
            await source.check()
        assert message in str(raised.value)
        assert not raised.value.transient
        assert registry.requests[-1].headers["If-None-Match"] == good_etag
        assert registry.requests[-1].status == 200
    assert source.etag == good_etag


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "is not JSON"),
        (b"\xff\xfe\x00garbage", "is not JSON"),
        (b"", "is not JSON"),
        (b'["a list"]', "is not a JSON object"),
        (b'{"name": "@acme/agent", "versions": {}', "is not JSON"),  # cut short
    ],
)
async def test_malformed_body_is_an_error_and_the_etag_stays(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession, body: bytes, message: str
) -> None:
    source = await _checked_once(registry, session)
    good_etag = source.etag
    registry.fail_next(body=body)  # answered 200 with an ETag of its own
    with pytest.raises(SourceError, match=message) as raised:
        await source.check()
    assert not raised.value.transient
    assert source.etag == good_etag
    assert await source.check() == NotModified(PACKAGE)
    assert registry.requests[-1].headers["If-None-Match"] == good_etag


# -- decoding in pieces -----------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@given(value=_JSON, indent=st.sampled_from([None, 0, 2]))
def test_decoding_in_pieces_gives_what_json_loads_gives(value: Any, indent: int | None) -> None:
    assert loads_in_pieces(json.dumps(value, indent=indent).encode()) == value


@given(st.text(alphabet='{}[]":, \n\tab01-.e\\', max_size=30))
def test_decoding_in_pieces_refuses_what_json_loads_refuses(text: str) -> None:
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            loads_in_pieces(text.encode())
    else:
        assert loads_in_pieces(text.encode()) == expected


@pytest.mark.parametrize(
    "body",
    [b'{"a":1,}', b'{"a" 1}', b'{"a":1 "b":2}', b'{"a":{"b":1,}}', b"{1:2}", b'{"a":1}x'],
)
def test_decoding_in_pieces_refuses_broken_objects(body: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(ValueError):
        loads_in_pieces(body)


# -- the fake itself --------------------------------------------------------------------


async def test_fake_accepts_an_unencoded_scoped_name_and_if_modified_since(
    registry: FakeNpmRegistry, session: aiohttp.ClientSession
) -> None:
    registry.publish(PACKAGE, "1.0.0", T0)
    async with session.get(f"{registry.url}@acme/agent") as response:
        assert response.status == 200
        document = await response.json()
        last_modified = response.headers["Last-Modified"]
    assert document["dist-tags"] == {"latest": "1.0.0"}
    assert document["versions"]["1.0.0"]["dist"]["tarball"].startswith(registry.url)
    assert set(document["time"]) == {"created", "modified", "1.0.0"}
    headers = {"If-Modified-Since": last_modified}
    async with session.get(f"{registry.url}@acme%2fagent", headers=headers) as response:
        assert response.status == 304


def test_normalise_registry_url_examples() -> None:
    assert normalise_registry_url("https://127.0.0.1") == "https://127.0.0.1/"
    assert normalise_registry_url("HTTP://127.0.0.1:80/a") == "http://127.0.0.1/a/"
    assert normalise_registry_url("not a url") is None
