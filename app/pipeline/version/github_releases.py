"""A provider's versions from its GitHub releases (optional, per provider)."""

from __future__ import annotations

import re
from typing import Any

from gidgethub import GitHubException

from app.clock import parse_iso
from app.github.app import GitHubApp
from app.logs import get_logger
from app.pipeline.version.watcher import Release, SourceError
from app.store import Store

log = get_logger("pipeline.versions.github")

RECENT = 30  # the newest releases are enough: older ones were seen by earlier checks
# Tags carry prefixes ("v1.2.3", "rust-v0.46.0"): the version is what ends the tag.
_TAG_VERSION = re.compile(
    r"(?:^|[^0-9A-Za-z.])v?(\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?)$"
)


def version_of_tag(tag: str) -> str | None:
    match = _TAG_VERSION.search(tag)
    return match.group(1) if match else None


class GitHubReleasesSource:
    kind = "github"

    def __init__(self, provider_id: str, repo: str, github: GitHubApp, store: Store) -> None:
        self.provider_id = provider_id
        self.repo = repo
        self.key = f"github:{repo}"
        self.github = github
        self.store = store

    async def fetch(self) -> list[Release]:
        client = await self._client()
        owner, _, name = self.repo.partition("/")
        try:
            page: Any = await client.getitem(
                "/repos/{owner}/{repo}/releases{?per_page}",
                {"owner": owner, "repo": name, "per_page": str(RECENT)},
            )
        except GitHubException as exc:
            raise SourceError(f"GitHub releases of {self.repo}: {exc}") from None
        if not isinstance(page, list):
            raise SourceError(f"GitHub releases of {self.repo}: not a list")
        releases = []
        for item in page:
            release = self._release(item)
            if release is not None:
                releases.append(release)
        return releases

    async def _client(self) -> Any:
        # Reading releases needs an installation token: the repository's own installation
        # when the App is installed there, else any (public repositories are readable).
        installation = await self.store.installation_for_repository(self.repo)
        if installation is None:
            installations = [i for i in await self.store.list_installations() if not i.suspended]
            if not installations:
                raise SourceError("the GitHub App is not installed anywhere")
            installation = installations[0]
        return self.github.installation(installation.id)

    def _release(self, item: Any) -> Release | None:
        if not isinstance(item, dict) or item.get("draft"):
            return None
        tag = item.get("tag_name")
        published = item.get("published_at")
        if not isinstance(tag, str) or not isinstance(published, str):
            raise SourceError(f"GitHub releases of {self.repo}: a release without tag or date")
        version = version_of_tag(tag)
        if version is None:
            log.debug("release tag %r of %s names no version; skipped", tag, self.repo)
            return None
        try:
            released_at = parse_iso(published)
        except ValueError:
            raise SourceError(f"GitHub releases of {self.repo}: bad date {published!r}") from None
        return Release(
            version,
            released_at,
            prerelease=bool(item.get("prerelease")),
            source_url=item.get("html_url") if isinstance(item.get("html_url"), str) else None,
        )
