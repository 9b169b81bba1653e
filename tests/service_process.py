"""The real service as a child process, for tests that must crash it.

``ServiceProcess`` runs ``python -m app serve`` with a minimal environment, on a port and
a database that stay the same across restarts, so a test can SIGKILL it and start it
again on the same state. Its output goes to files (a pipe nobody reads would fill up and
stall the service), one per run, and every failure to start or stop quotes them.

``post_webhook`` sends a delivery signed the way GitHub signs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

PREFIX = "/api/update-pipeline"
WEBHOOK_PATH = "/api/github/webhooks"
WEBHOOK_SECRET = "service-process-secret"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


class ServiceError(AssertionError):
    """The service did not start or stop as expected; the message carries its output."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """``python -m app serve`` on ``workdir/service.db`` and a port fixed at creation.

    ``env`` is added to the minimal environment (PATH, HOME and the service's database,
    address, webhook secret and JSON logs); ``start(env=...)`` changes it for this run and
    the ones after. Use it as an async context manager: on exit the process is killed if
    it still runs, so a failing test never leaves a server behind.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        webhook_secret: str = WEBHOOK_SECRET,
        db: Path | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.workdir = workdir
        self.db = db or workdir / "service.db"
        self.host = host
        self.port = free_port(host)
        self.webhook_secret = webhook_secret
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.env: dict[str, str] = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": os.environ.get("HOME", str(workdir)),
            "UPDATE_PIPELINE_DB": str(self.db),
            "UPDATE_PIPELINE_HOST": host,
            "UPDATE_PIPELINE_PORT": str(self.port),
            "UPDATE_PIPELINE_LOG_FORMAT": "json",
            "GITHUB_WEBHOOK_SECRET": webhook_secret,
            **(env or {}),
        }
        self.process: asyncio.subprocess.Process | None = None
        self.runs = 0
        self.logs: list[Path] = []

    # -- addresses ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def api_url(self, path: str) -> str:
        return f"{self.url}{PREFIX}{path}"

    @property
    def webhook_url(self) -> str:
        return f"{self.url}{WEBHOOK_PATH}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    # -- output -------------------------------------------------------------------------

    def output(self, last: int | None = None) -> str:
        """What the service wrote (stdout and stderr), run by run; ``last`` runs only."""
        parts = []
        for number, path in enumerate(self.logs, start=1):
            if last is not None and number <= len(self.logs) - last:
                continue
            text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
            parts.append(f"--- run {number} ({path.name}) ---\n{text}")
        return "\n".join(parts)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Start the service and wait until ``GET /health`` answers 200; its body."""
        if self.running:
            raise ServiceError(f"service already running (pid {self.pid})")
        self.env.update(env or {})
        self.runs += 1
        # Named by port too, so two services sharing a folder keep their own logs.
        log = self.workdir / f"service-{self.port}-run{self.runs}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            # The child gets its own copy of the file; ours can close at once.
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "app",
                "serve",
                cwd=self.workdir,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        try:
            return await self._wait_healthy()
        except BaseException:
            await self.kill()
            raise

    async def _wait_healthy(self) -> dict[str, Any]:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise ServiceError(
                        f"service exited with status {self.process.returncode} during start:\n"
                        + self.output(last=1)
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.api_url("/health")) as response:
                        if response.status == 200:
                            body: dict[str, Any] = await response.json()
                            return body
                await asyncio.sleep(0.05)
        raise ServiceError(
            f"service did not answer /health within {self.start_timeout}s:\n" + self.output(last=1)
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would; returns once the process is gone
        (so its port and instance lock are free for the next start)."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        await process.wait()

    async def stop(self) -> None:
        """SIGTERM, and fail unless the service shuts down cleanly (status 0) in time."""
        process = self.process
        if process is None or process.returncode is not None:
            raise ServiceError("service is not running")
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(process.wait(), self.stop_timeout)
        except TimeoutError:
            await self.kill()
            raise ServiceError(
                f"service did not exit within {self.stop_timeout}s of SIGTERM:\n"
                + self.output(last=1)
            ) from None
        if code != 0:
            raise ServiceError(
                f"service exited with status {code} after SIGTERM:\n" + self.output(last=1)
            )

    async def __aenter__(self) -> ServiceProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()


# -- webhooks ---------------------------------------------------------------------------


def signature(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    """``X-Hub-Signature-256`` as GitHub computes it: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class WebhookReply:
    status: int
    body: Any  # the parsed JSON, or None when the answer was not JSON


async def post_webhook(
    session: aiohttp.ClientSession,
    url: str,
    *,
    event: str,
    delivery_id: str,
    body: bytes,
    secret: str = WEBHOOK_SECRET,
) -> WebhookReply | None:
    """Post one signed delivery. None when no answer came back (refused, reset, closed,
    timed out): the service may or may not have stored it, so, as GitHub would, the
    caller may send it again under the same delivery id."""
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id,
        "X-Hub-Signature-256": signature(body, secret),
    }
    try:
        async with session.post(url, data=body, headers=headers) as response:
            text = await response.text()
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            return WebhookReply(response.status, parsed)
    except (aiohttp.ClientError, TimeoutError):
        return None
