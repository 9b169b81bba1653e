"""Crash safety of slash commands and the outbox, with the real service killed by SIGKILL
while it talks to a fake GitHub.

The promise under test: a command typed in a comment is answered exactly once, in order
(👀, the reply, 🚀), however often the service dies on the way, and GitHub ends up with
no duplicate comment. Kills land while deliveries are waiting, while handlers ask GitHub
for the commenter's permission, and while the outbox is between (paced) requests.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest

from app.github.outbox import marker
from tests.fake_github import FakeGitHub
from tests.service_process import ServiceProcess, post_webhook

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock are POSIX-only")

REPO = "acme/runner"
WEBHOOKS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "webhooks"
BASE = json.loads((WEBHOOKS / "issue_comment.created.0.json").read_text())
COMMENTS = 3
KILLS = 4
SETTLE_TIMEOUT = 60.0


def comment_delivery(installation: int, issue: int, comment_id: int) -> bytes:
    payload = copy.deepcopy(BASE)
    author = {**payload["comment"]["user"], "login": "octocat", "type": "User"}
    payload["comment"].update(id=comment_id, body="Which commands?\n/help", user=author)
    payload["sender"] = author
    payload["issue"].update(number=issue, labels=[])
    payload["issue"].pop("pull_request", None)
    payload["repository"]["full_name"] = REPO
    payload["installation"] = {"id": installation}
    return json.dumps(payload).encode()


def answered(github: FakeGitHub, comments: dict[int, int]) -> bool:
    repo = github.repo(REPO)
    replies = [c for c in repo.comments.values() if c["user"]["type"] == "Bot"]
    reactions = [repo.reactions.get(("comment", c), []) for c in comments]
    return len(replies) >= len(comments) and all(
        [r["content"] for r in found] == ["eyes", "rocket"] for found in reactions
    )


async def test_commands_are_answered_once_and_in_order_across_kills(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    async with FakeGitHub() as github:
        installation = github.add_installation(account="acme", repos=[REPO])
        github.set_permission(REPO, "octocat", "read")
        env = {
            "GITHUB_APP_ID": str(github.app_id),
            "GITHUB_PRIVATE_KEY": github.private_key_pem,
            "GITHUB_API_URL": github.url,
            "UPDATE_PIPELINE_ENABLED": "false",
        }
        async with ServiceProcess(tmp_path, env=env) as service:
            await service.start()
            comments: dict[int, int] = {}  # comment id -> issue number
            async with aiohttp.ClientSession() as session:
                for n in range(COMMENTS):
                    issue = github.add_issue(REPO, f"Rollout {n}")
                    comment_id = github.add_comment(REPO, issue, "/help", user="octocat")
                    comments[comment_id] = issue
                    reply = await post_webhook(
                        session,
                        service.webhook_url,
                        event="issue_comment",
                        delivery_id=str(uuid.uuid4()),
                        body=comment_delivery(installation, issue, comment_id),
                        secret=service.webhook_secret,
                    )
                    assert reply is not None and reply.status == 202
            # Stored, not yet processed: the pipeline is off.
            await service.kill()

            await service.start(env={"UPDATE_PIPELINE_ENABLED": "true"})
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.2, 2.0))
                await service.kill()
                await service.start()
            for _ in range(int(SETTLE_TIMEOUT / 0.1)):
                if answered(github, comments):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(
                    f"commands not all answered (CRASH_SEED={seed}):\n" + service.output(last=2)
                )
            await service.stop()

        repo = github.repo(REPO)
        replies = sorted(
            (c for c in repo.comments.values() if c["user"]["type"] == "Bot"),
            key=lambda c: c["id"],
        )
        assert len(replies) == COMMENTS, f"duplicate replies (CRASH_SEED={seed})"
        for comment_id, issue in comments.items():
            (reply,) = [r for r in replies if r["issue_url"].endswith(f"/issues/{issue}")]
            assert reply["body"].endswith(marker(f"reply-{comment_id}"))
            assert "your permission: read" in reply["body"]
            # What reached GitHub for this comment, in the order it was created there.
            created = [
                call.json.get("content", "reply")
                for call in github.calls("POST /repos/*")
                if call.status == 201
                and (
                    call.params.get("comment_id") == str(comment_id)
                    or call.params.get("issue_number") == str(issue)
                )
            ]
            assert created == ["eyes", "reply", "rocket"], f"CRASH_SEED={seed}"

    with closing(sqlite3.connect(f"{service.db.as_uri()}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        statuses = db.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall()
        assert statuses == [("done", 3 * COMMENTS)]
        deliveries = db.execute("SELECT status, attempts FROM webhook_deliveries").fetchall()
        assert deliveries == [("done", 1)] * COMMENTS
