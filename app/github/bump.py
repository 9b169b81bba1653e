"""Bump pull requests: a runtime version ready for the canary becomes a pull request in the
runner repository that pins it in the runtime manifest.

The manifest is a JSON object mapping provider ids to versions (``runtimes.json``)::

    {
      "claude_code": "2.1.0",
      "codex": "0.46.0"
    }

``BumpHandoff`` is the version watcher's ``CanaryHandoff``: each version it is given is
queued as an outbox entry of kind ``bump_pull_request`` (``bump_effect``), one target per
(repository, provider), so the bumps of one provider are applied in the order they were
queued and a newer one waits for the older. The applier keeps at most one open bump pull
request per provider: it opens one on the branch ``update-pipeline/bump-<provider>-<version>``,
and a newer version updates that pull request (a commit on its branch, a new title and
body) instead of opening another. Nothing is done when the base branch already has the
version or a newer one.

Every step is safe to repeat. An attempt always starts from what GitHub shows (the
manifest on the base branch, the open pull requests, the manifest on the branch), not
from what an earlier attempt may have done, so a crash at any point, an attempt after a
newer version was applied, or the same version handed over twice creates nothing twice:
an existing branch is reused (GitHub answers 422 "Reference already exists"), a branch
that already has the version gets no second commit, and an existing pull request is found
(in the list of open ones, or after GitHub answers 422 "A pull request already exists").
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

from gidgethub import BadRequest

from app.clock import isoformat
from app.github.client import GitHubClient
from app.github.outbox import Attempt, Outbox, applier, marker
from app.logs import get_logger
from app.pipeline.version.providers import PROVIDER_ID, PROVIDER_ID_MAX
from app.pipeline.version.semver import Version
from app.store import NewEffect, RuntimeVersionRecord, Store

log = get_logger("github.bump")

KIND = "bump_pull_request"
BRANCH_PREFIX = "update-pipeline/bump-"
DEFAULT_MANIFEST = "runtimes.json"
# Source links go into the pull request as an autolink only when they are plain web URLs.
_PLAIN_URL = re.compile(r"https?://[^\s<>\"'`\\\x00-\x1f\x7f]{1,2000}")


class BumpRefused(Exception):
    """The bump cannot be made as asked (no such provider in the manifest, a manifest that
    is not a JSON object of versions). Waiting does not cure it: the entry is parked."""


# -- building entries -----------------------------------------------------------------------


def bump_target(repo: str, provider: str) -> str:
    """The outbox target of a provider's bumps in a repository: they apply in order."""
    return f"{repo.lower()}@bump:{provider}"


def bump_branch(provider: str, version: str) -> str:
    return f"{BRANCH_PREFIX}{provider}-{version}"


def bump_key(provider: str) -> str:
    """The key of the hidden marker in a bump pull request's body."""
    return f"bump-{provider}"


def bump_effect(
    installation_id: int,
    repo: str,
    *,
    provider: str,
    version: str,
    released_at: datetime,
    source_url: str | None,
    manifest_path: str,
    base_branch: str | None,
) -> NewEffect:
    """An outbox entry that opens (or updates) ``repo``'s bump pull request for ``provider``
    so that the manifest at ``manifest_path`` pins ``version``. ``base_branch`` None: the
    repository's default branch, looked up when the entry is applied."""
    if not PROVIDER_ID.fullmatch(provider) or len(provider) > PROVIDER_ID_MAX:
        raise ValueError(f"provider id {provider!r}: lower-case letters, digits and _ only")
    canonical = Version(version).canonical  # ValueError for a version that is not semantic
    path = manifest_path.strip("/")
    if not path:
        raise ValueError("manifest_path is empty")
    marker(bump_key(provider))
    payload = {
        "repo": repo,
        "provider": provider,
        "version": canonical,
        "released_at": isoformat(released_at),
        "source_url": source_url,
        "manifest_path": path,
        "base_branch": base_branch,
    }
    return NewEffect(installation_id, bump_target(repo, provider), KIND, payload)


# -- the canary hand-over -------------------------------------------------------------------


class BumpHandoff:
    """The version watcher's ``CanaryHandoff``: a version ready for the canary is queued as a
    bump pull request in the runner repository, where merging it starts the canary build.

    Prereleases are not bumped: they belong to the beta channel, and the manifest pins
    what the stable runner ships. ``version_ready`` answers True for them, so they are
    marked handed over and not asked about again. It answers False (ask again later) while
    the App has no installation on the runner repository. Queuing is not in one transaction
    with the watcher marking the version handed over, so a crash in between queues the
    version again after a restart; the applier finds the pull request the first entry made.
    """

    def __init__(
        self,
        outbox: Outbox,
        store: Store,
        runner_repo: str,
        manifest_path: str = DEFAULT_MANIFEST,
        *,
        base_branch: str | None = None,
    ) -> None:
        owner, _, name = runner_repo.partition("/")
        if not owner or not name or "/" in name:
            raise ValueError(f"runner repository {runner_repo!r}: expected owner/name")
        if not manifest_path.strip("/"):
            raise ValueError("manifest_path is empty")
        self.outbox = outbox
        self.store = store
        self.runner_repo = runner_repo
        self.manifest_path = manifest_path
        self.base_branch = base_branch

    async def version_ready(self, version: RuntimeVersionRecord) -> bool:
        label = f"{version.provider_id} {version.version}"
        try:
            prerelease = version.prerelease or bool(Version(version.version).prerelease)
        except ValueError:
            log.warning("not bumping %s: not a semantic version", label)
            return True
        if prerelease:
            log.info("not bumping %s in %s: a prerelease", label, self.runner_repo)
            return True
        installation = await self.store.installation_for_repository(self.runner_repo)
        if installation is None:
            log.warning(
                "cannot bump %s: the GitHub App is not installed on %s; asking again later",
                label,
                self.runner_repo,
            )
            return False
        effect = bump_effect(
            installation.id,
            self.runner_repo,
            provider=version.provider_id,
            version=version.version,
            released_at=version.released_at,
            source_url=version.source_url,
            manifest_path=self.manifest_path,
            base_branch=self.base_branch,
        )
        await self.outbox.add([effect])
        log.info("queued a bump of %s in %s", label, self.runner_repo)
        return True


# -- applying entries -----------------------------------------------------------------------


@applier(KIND)
async def apply_bump(attempt: Attempt) -> Mapping[str, Any]:
    """Open or update the provider's bump pull request; see the module's docstring.

    Unlike a plain create, this looks for existing objects on every attempt, not only when
    ``attempt.repeated``: an open pull request may come from an earlier entry (an older
    version), which this one updates."""
    return await _Bump(attempt).apply()


class _Bump:
    def __init__(self, attempt: Attempt) -> None:
        p = attempt.payload
        self.client: GitHubClient = attempt.client
        self.repo = str(p["repo"])
        self.repo_vars = attempt.repo_vars
        self.provider = str(p["provider"])
        self.version = str(p["version"])
        self.wanted = Version(self.version)
        self.path = str(p["manifest_path"])
        self.released_at = str(p["released_at"])
        self.source_url = p.get("source_url")
        self.base_branch = p.get("base_branch")
        self.title = f"Bump {self.provider} to {self.version}"

    async def apply(self) -> Mapping[str, Any]:
        base = str(self.base_branch or await self._default_branch())
        manifest, _ = await self._manifest(base)
        current = _pinned(manifest, self.provider, self.path, base)
        if current >= self.wanted:
            log.info(
                "%s already has %s %s (asked for %s); no bump",
                base,
                self.provider,
                current.text,
                self.version,
            )
            return {"skipped": "up_to_date", "version": self.version, "base_version": current.text}
        body = self._body(current.text)
        pull = await self._open_bump_pull()
        if pull is not None:
            return await self._update(pull, body)
        return await self._create(base, body)

    # -- an open bump pull request: bring it to this version --

    async def _update(self, pull: Mapping[str, Any], body: str) -> Mapping[str, Any]:
        branch = str(pull["head"]["ref"])
        result: dict[str, Any] = {
            "number": pull["number"],
            "url": pull["html_url"],
            "version": self.version,
            "branch": branch,
        }
        manifest, sha = await self._manifest(branch)
        on_branch = manifest.get(self.provider)
        newer = _version_or_none(on_branch)
        if newer is not None and newer > self.wanted:
            # Only when an older entry is retried after a newer one: never go back.
            log.info("#%s already bumps %s to %s", pull["number"], self.provider, newer.text)
            return {**result, "skipped": "superseded", "open_version": newer.text}
        if on_branch != self.version:
            await self._commit(manifest, sha, branch)
            result["updated_from"] = on_branch
        await self._describe(pull, body)
        if "updated_from" not in result:
            result["found"] = True
        return result

    # -- no open bump pull request: branch, commit, open one --

    async def _create(self, base: str, body: str) -> Mapping[str, Any]:
        branch = bump_branch(self.provider, self.version)
        base_ref = await self.client.getitem(
            "/repos/{owner}/{repo}/git/ref/{+ref}",
            url_vars={**self.repo_vars, "ref": quote(f"heads/{base}")},
        )
        try:
            await self.client.post(
                "/repos/{owner}/{repo}/git/refs",
                url_vars=self.repo_vars,
                data={"ref": f"refs/heads/{branch}", "sha": base_ref["object"]["sha"]},
            )
        except BadRequest as exc:
            if not _already_exists(exc):
                raise
            log.info("branch %s exists (an earlier attempt made it); reusing it", branch)
        manifest, sha = await self._manifest(branch)
        if manifest.get(self.provider) != self.version:
            await self._commit(manifest, sha, branch)
        try:
            pull = await self.client.post(
                "/repos/{owner}/{repo}/pulls",
                url_vars=self.repo_vars,
                data={"title": self.title, "head": branch, "base": base, "body": body},
            )
            found = False
        except BadRequest as exc:
            if not _already_exists(exc):
                raise
            pull = await self._pull_from(branch)
            if pull is None:
                raise
            await self._describe(pull, body)
            found = True
        log.info("bump pull request #%s: %s", pull["number"], self.title)
        result = {
            "number": pull["number"],
            "url": pull["html_url"],
            "version": self.version,
            "branch": branch,
        }
        return {**result, "found": True} if found else result

    # -- GitHub calls --

    async def _default_branch(self) -> str:
        repo = await self.client.getitem("/repos/{owner}/{repo}", url_vars=self.repo_vars)
        return str(repo["default_branch"])

    async def _manifest(self, ref: str) -> tuple[dict[str, Any], str]:
        """The manifest at ``ref`` (a branch), and its blob SHA."""
        entry = await self.client.getitem(
            "/repos/{owner}/{repo}/contents/{+path}{?ref}",
            url_vars={**self.repo_vars, "path": quote(self.path), "ref": ref},
        )
        where = f"{self.path} on {ref}"
        if not isinstance(entry, Mapping) or entry.get("type") != "file":
            raise BumpRefused(f"{where} is not a file")
        if entry.get("encoding") != "base64":
            raise BumpRefused(f"{where} is too large for the contents API")
        try:
            text = base64.b64decode(str(entry["content"])).decode("utf-8")
            manifest = json.loads(text)
        except ValueError as exc:
            raise BumpRefused(f"{where} is not JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise BumpRefused(f"{where} is not a JSON object of provider versions")
        return manifest, str(entry["sha"])

    async def _commit(self, manifest: dict[str, Any], sha: str, branch: str) -> None:
        """Commit the manifest with this version on ``branch`` (``sha``: the file's blob
        there). The other keys keep their values and order."""
        changed = {**manifest, self.provider: self.version}
        text = json.dumps(changed, indent=2, ensure_ascii=False) + "\n"
        await self.client.put(
            "/repos/{owner}/{repo}/contents/{+path}",
            url_vars={**self.repo_vars, "path": quote(self.path)},
            data={
                "message": self.title,
                "content": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                "sha": sha,
                "branch": branch,
            },
        )

    async def _open_bump_pull(self) -> Mapping[str, Any] | None:
        """The open bump pull request of this provider, if any: the one on this version's
        branch, else the newest one. Its version is read from its branch, as a pull request
        updated to a newer version keeps its first branch name."""
        prefix = f"{BRANCH_PREFIX}{self.provider}-"
        candidates: list[Mapping[str, Any]] = []
        async for pull in self.client.getiter(
            "/repos/{owner}/{repo}/pulls{?state,per_page}",
            {**self.repo_vars, "state": "open", "per_page": "100"},
        ):
            head = pull.get("head") or {}
            head_repo = head.get("repo") or {}
            ref = str(head.get("ref") or "")
            if (
                str(head_repo.get("full_name") or "").lower() == self.repo.lower()  # no forks
                and ref.startswith(prefix)
                and _version_or_none(ref.removeprefix(prefix)) is not None
            ):
                candidates.append(pull)
        if not candidates:
            return None
        if len(candidates) > 1:
            log.warning(
                "%d open bump pull requests for %s in %s: %s",
                len(candidates),
                self.provider,
                self.repo,
                ", ".join(f"#{p['number']}" for p in candidates),
            )
        mine = bump_branch(self.provider, self.version)
        return max(candidates, key=lambda p: (p["head"]["ref"] == mine, int(p["number"])))

    async def _pull_from(self, branch: str) -> Mapping[str, Any] | None:
        owner = self.repo_vars["owner"]
        async for pull in self.client.getiter(
            "/repos/{owner}/{repo}/pulls{?state,head,per_page}",
            {**self.repo_vars, "state": "open", "head": f"{owner}:{branch}", "per_page": "100"},
        ):
            found: Mapping[str, Any] = pull
            return found
        return None

    async def _describe(self, pull: Mapping[str, Any], body: str) -> None:
        """Give the pull request this version's title and body, if it has others."""
        changes = {
            name: value
            for name, value in (("title", self.title), ("body", body))
            if pull.get(name) != value
        }
        if changes:
            await self.client.patch(
                "/repos/{owner}/{repo}/pulls/{pull_number}",
                url_vars={**self.repo_vars, "pull_number": str(pull["number"])},
                data=changes,
            )

    def _body(self, current: str) -> str:
        lines = [
            f"Bumps {_code(self.provider)} in {_code(self.path)}"
            f" from {_code(current)} to {_code(self.version)}.",
            "",
            f"- Released: {self.released_at}",
        ]
        if _plain_url(self.source_url):
            lines.append(f"- Source: <{self.source_url}>")
        lines += [
            "",
            f"update-pipeline opened this pull request because {self.provider}"
            f" {self.version} is ready for the canary. It updates this pull request when a"
            " newer version is ready, rather than opening another.",
            "",
            marker(bump_key(self.provider)),
        ]
        return "\n".join(lines)


def _pinned(manifest: Mapping[str, Any], provider: str, path: str, ref: str) -> Version:
    """The version the base branch's manifest pins for ``provider``."""
    if provider not in manifest:
        raise BumpRefused(
            f"{path} on {ref} has no {provider!r}; add the provider to the runner by hand"
        )
    version = _version_or_none(manifest[provider])
    if version is None:
        raise BumpRefused(
            f"{path} on {ref} pins {provider!r} to {manifest[provider]!r},"
            " which is not a semantic version"
        )
    return version


def _version_or_none(value: object) -> Version | None:
    if not isinstance(value, str):
        return None
    try:
        return Version(value)
    except ValueError:
        return None


def _plain_url(value: object) -> bool:
    """Whether an upstream source link can go into the body as an autolink: a web URL with
    no spaces, quotes or angle brackets. Anything else is left out, not escaped."""
    return (
        isinstance(value, str)
        and _PLAIN_URL.fullmatch(value) is not None
        and bool(urlsplit(value).netloc)
    )


def _already_exists(exc: BadRequest) -> bool:
    """GitHub's 422 for a branch or pull request an earlier attempt made."""
    return int(exc.status_code) == 422 and "already exists" in str(exc).lower()


def _code(text: str) -> str:
    """``text`` as a Markdown code span, whatever backticks it holds."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
